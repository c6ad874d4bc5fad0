"""`pulsebridge-dev bench origin`: the origin proof's cost per frame on the
board (at a chip's speed: firmware_mpy/sim/bench_origin.py under MicroPython)
and at a backend's verifier (protocols.origin_verify.Verifier on CPython)."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from agent.dev.sim import boards
from agent.dev.sim.runner import find_micropython
from agent.provision.build import FIRMWARE_DIR
from protocols import cbor, cipher, cose, messages, origin, origin_verify

# Payload sizes of a 1 s window as the simulated boards send them (measured on
# a capture of record a103l): ECG 512 samples at ~1.12 B, PPG 2 x 100 at ~1.26 B.
ECG_PAYLOAD_BYTES = 660
PPG_PAYLOAD_BYTES = 330
FRAMES = 2000


def _board(target: str) -> dict[str, Any]:
    env = boards.micropython_env()
    p = subprocess.run([find_micropython(), "-X", "heapsize=4M", str(FIRMWARE_DIR / "sim" / "bench_origin.py"), target,
                        str(ECG_PAYLOAD_BYTES), str(PPG_PAYLOAD_BYTES)], env=env, capture_output=True, text=True,
                       timeout=600)
    if p.returncode:
        raise RuntimeError("bench_origin under micropython failed: " + p.stderr[-2000:])
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def _verifier() -> dict[str, Any]:
    key, okey, kid, salt = bytes(32), bytes(range(32)), b"pb-bench01", bytes(16)
    seal = cose.MacKey(key, kid, cose.AAD_UPLINK)
    sealer = cipher.SampleCipher(key, salt)
    omac = cose.MacKey(okey, kid, origin.AAD_ORIGIN)
    wrapped = origin.xor32(cipher.derive_key(key, salt), origin.key_pad(okey, salt))
    frames: list[tuple[bytes, list[list[int]]]] = []
    ckpts: list[bytes] = []
    seqs: list[int] = []
    digests = b""
    for seq in range(FRAMES):
        chans = [[(seq * 31 + i * 7) % 300 - 150 for i in range(512)]]
        f = messages.SampleFrame(1, seq * 2, 1, seq * 1000, seq * 512, 512, 512, (381, 1000), None, (0, 0, 0, 0),
                                 chans)
        raw = seal.seal(messages.encoded(f, sealer=sealer))
        frames.append((raw, chans))
        seqs.append(seq * 2)
        digests += origin_verify.frame_digest(cose.parse(raw).payload)
        if len(seqs) == 20:
            w = cbor.Writer(bytearray(1024))
            origin.encode_checkpoint(w, 1, len(ckpts), salt, wrapped, seqs, digests, len(seqs))
            msg = messages.OriginCheckpoint(1, seq * 2 + 1, omac.seal(bytes(w.buf[:w.pos])))
            ckpts.append(seal.seal(messages.encoded(msg)))
            seqs, digests = [], b""
    out: dict[str, Any] = {"frames": FRAMES}
    for name, with_samples in (("bytes_only", False), ("with_document_samples", True)):
        t0 = time.process_time()
        v = origin_verify.Verifier({kid.decode(): okey})
        for c in ckpts:
            v.add(c)
        for raw, chans in frames:
            v.add(raw, chans if with_samples else None)
        rep = v.report()
        dt = time.process_time() - t0
        if not rep.ok or rep.count(origin_verify.PROVEN) != FRAMES:
            raise AssertionError("verifier bench: %r" % rep.as_dict())
        out["verifier_%s_us_per_frame" % name] = round(dt * 1e6 / FRAMES, 1)
    return out


def run(target: str = "esp32") -> dict[str, Any]:
    return {"board": _board(target), "verifier": _verifier()}


def report(r: dict[str, Any]) -> list[str]:
    b, v = r["board"], r["verifier"]
    return [
        "origin proof, board at %s speed (factor %.0f, calibrated now):" % (b["target"], b["factor_x1000"] / 1000),
        "  digest per ECG frame (%d B payload): %d us here, %d us on the chip"
        % (ECG_PAYLOAD_BYTES, b["digest_ecg_frame_host_us"], b["digest_ecg_frame_chip_us"]),
        "  digest per PPG frame (%d B payload): %d us here, %d us on the chip"
        % (PPG_PAYLOAD_BYTES, b["digest_ppg_frame_host_us"], b["digest_ppg_frame_chip_us"]),
        "  one checkpoint of 20 frames (every 10 s): %d us here, %d us on the chip"
        % (b["checkpoint_20_frames_host_us"], b["checkpoint_20_frames_chip_us"]),
        "  (for scale, the device-key MAC the board already makes per ECG frame: %d us on the chip)"
        % b["device_mac_ecg_frame_chip_us"],
        "verifier (CPython, this machine), %d ECG frames of 512 samples:" % v["frames"],
        "  bytes proven: %.1f us per frame; with each document's samples decrypted and compared: %.1f us per frame"
        % (v["verifier_bytes_only_us_per_frame"], v["verifier_with_document_samples_us_per_frame"]),
    ]
