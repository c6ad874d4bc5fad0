"""`pulsebridge bench agent`: the hub's throughput, latency and footprint.

From one run on one machine:
- verify+commit: frames/s, and frames per CPU-second (per core), through the
  agent's Ingestor and store (SQLite WAL, synchronous=FULL, group commit);
- the same plus forwarding to a local Mosquitto over TLS (QoS 1), with the
  JSON payload and with the binary (CBOR) one, with 25 documents a message,
  and with the MQTT client in its own process (client = "process");
- the drain of a one-hour backlog of 20 boards (144,000 frames) to Mosquitto
  (--part forward: also with 25 documents a message, and with the client's process);
- a profile (CPU time, this process's main thread) of verify+commit+forward,
  and one of a drain: where the remaining time goes, by area and by function;
- a baseline in the same run: pycose verification, decryption of the samples
  (cryptography) and one commit per frame
  (pycose runs in its own environment, it needs cbor2 < 6);
- a realistic load (20 boards x 2 streams x 1 frame/s): the latency the agent
  adds (frame in, ack ready), p50/p99, its RSS and its CPU share.
Figures only; nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import binascii
import cProfile
import dataclasses
import gc
import getpass
import json
import os
import pstats
import pty
import resource
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tty
import types
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent import gc_tuning
from agent.audit import AuditLog
from agent.forwarders import mqtt
from agent.forwarders.mqtt import MqttConfig, MqttForwarder
from agent.ingest import Ingestor, Outcome, record_of
from agent.links import LinkManager
from agent.record import FrameRecord
from agent.registry import Registry
from agent.session import PIPELINE_DEPTH, coalesced_acks
from agent.store import COMMIT_INTERVAL_S, Ingest, Store
from agent.transports.serial import SerialTransport
from agent.vitals.alerts import AlertEngine
from agent.vitals.engine import VitalsEngine
from agent.vitals.runner import VitalsRunner
from protocols import cipher, cose, hub, link, messages

BOARDS = 20
PYCOSE_VENV = Path(__file__).resolve().parents[2] / ".venv-pycose"
BASELINE_SCRIPT = r'''
import json, sqlite3, sys, time, cbor2
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message
from pycose.headers import KID
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
frames = cbor2.load(open(sys.argv[1], "rb"))
raw_keys = {k: bytes.fromhex(v) for k, v in json.load(open(sys.argv[2])).items()}
keys = {k: SymmetricKey(k=v) for k, v in raw_keys.items()}
sample_keys = {}  # (device, boot salt) -> that boot's sample key
db = sqlite3.connect(sys.argv[3], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE frames(device_id TEXT, epoch INT, seq INT, raw BLOB, plain BLOB, "
           "UNIQUE(device_id, epoch, seq))")
t, c = time.perf_counter(), time.process_time()
for raw in frames:
    m = Mac0Message.decode(raw)
    dev = m.phdr[KID].decode()
    m.key = keys[dev]
    m.external_aad = b"pulsebridge/1 board-to-hub"
    assert m.verify_tag()
    p = cbor2.loads(m.payload)
    iv = p[2].to_bytes(4, "big") + p[3].to_bytes(4, "big") + bytes(8)
    if (dev, p[15]) not in sample_keys:
        sample_keys[dev, p[15]] = HKDF(hashes.SHA256(), 32, p[15], b"pulsebridge/1 A256CTR samples").derive(
            raw_keys[dev])
    plain = Cipher(algorithms.AES(sample_keys[dev, p[15]]), modes.CTR(iv)).decryptor().update(b"".join(p[13]))
    db.execute("INSERT INTO frames VALUES(?,?,?,?,?)", (dev, p[2], p[3], raw, plain))  # one commit a frame
print(json.dumps({"frames": len(frames), "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}))
'''


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# What a fresh interpreter holds after importing the hub agent's modules without the
# vitals engine, then after the vitals engine (its filters on numpy alone: scipy.signal's
# package imported scipy.stats, optimize, interpolate, spatial, sparse, linalg and special
# with it, +74 MB), then the whole agent (the supervisor and the operator's CLI).
_FOOTPRINT = """
import importlib, json, sys
def mem():
    with open("/proc/self/smaps_rollup") as f:
        d = {l.split()[0].rstrip(":"): int(l.split()[1]) / 1024 for l in f if len(l.split()) == 3}
    return {"rss_mb": d["Rss"], "anonymous_mb": d["Anonymous"], "pss_mb": d["Pss"], "modules": len(sys.modules)}
out = {"python": mem()}
for m in ("agent.ingest", "agent.store", "agent.forwarders.mqtt", "agent.session", "agent.status_server"):
    importlib.import_module(m)
out["agent_without_vitals"] = mem()
importlib.import_module("agent.vitals.engine")
out["agent_with_vitals"] = mem()
importlib.import_module("agent.cli")
out["agent_cli"] = mem()
print(json.dumps(out))
"""


def import_footprint() -> dict[str, dict[str, float]]:
    """Memory (MB, /proc/self/smaps_rollup) of a fresh interpreter: bare, after the agent's
    modules without the vitals engine, after the vitals engine too, and after the whole
    agent (agent.cli, which imports the supervisor and every module it runs)."""
    done = subprocess.run([sys.executable, "-c", _FOOTPRINT], check=True, timeout=600, capture_output=True, text=True)
    out: dict[str, dict[str, float]] = json.loads(done.stdout)
    return out


def _recording() -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    # bench_vitals.recorded_signals(), read by another process: wfdb and pandas, which read
    # the record, stay out of this one (its RSS is a figure).
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "a103l.npz"
        subprocess.run([sys.executable, "-c", "import sys, numpy; from agent.dev.bench_vitals import "
                        "recorded_signals; numpy.savez(sys.argv[1], *recorded_signals())", str(out)],
                       check=True, timeout=600)
        with np.load(out) as z:
            return z["arr_0"], z["arr_1"], z["arr_2"]


class Fleet:
    """Boards' frames, made as the firmware makes them. recorded=False: the same
    1 s of a random walk in every frame (ECG/PPG-like deltas); True: each board
    plays PhysioNet record a103l (ECG lead II at 512 Hz, a PPG synthesised from its
    pleth at 100 Hz), from its own place in it, each stream's frames continuing
    one another: what the vitals engine works on at a hub."""

    def __init__(self, n: int = BOARDS, recorded: bool = False) -> None:
        self.keys = {"pb-bench%02d" % i: secrets.token_bytes(32) for i in range(n)}
        self.sealers = {d: cose.MacKey(k, d.encode(), cose.AAD_UPLINK) for d, k in self.keys.items()}
        self.ciphers = {d: cipher.SampleCipher(k, secrets.token_bytes(cipher.BOOT_SALT_SIZE))  # one boot each
                        for d, k in self.keys.items()}
        self.seq = dict.fromkeys(self.keys, 0)
        self.sent = {(d, s): 0 for d in self.keys for s in (messages.STREAM_ECG_MAX30003, messages.STREAM_PPG_MAX30102)}
        self.recording: tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32]] | None = None
        if recorded:
            self.recording = _recording()
        rng = np.random.default_rng(7)
        self.ecg = [int(x) for x in np.cumsum(rng.integers(-40, 41, 512))]
        self.red = [int(x) for x in 90000 + np.cumsum(rng.integers(-20, 21, 100))]
        self.ir = [int(x) for x in 140000 + np.cumsum(rng.integers(-25, 26, 100))]

    def _window(self, dev: str, stream: int) -> list[list[int]]:
        # The next second of this board's stream (random walk, or the recording from the board's place in it).
        k = self.sent[(dev, stream)]
        self.sent[(dev, stream)] = k + 1
        if self.recording is None:
            return [self.ecg] if stream == messages.STREAM_ECG_MAX30003 else [self.red, self.ir]
        ecg, red, ir = self.recording
        seconds = len(ecg) // 512
        i = (list(self.keys).index(dev) * 7 + k) % seconds  # boards 7 s apart in the recording
        if stream == messages.STREAM_ECG_MAX30003:
            return [ecg[i * 512:(i + 1) * 512].tolist()]
        return [red[i * 100:(i + 1) * 100].tolist(), ir[i * 100:(i + 1) * 100].tolist()]

    def frame(self, dev: str, stream: int) -> bytes:
        seq = self.seq[dev]
        self.seq[dev] = seq + 1
        k = self.sent[(dev, stream)]
        channels = self._window(dev, stream)
        if stream == messages.STREAM_ECG_MAX30003:
            f = messages.SampleFrame(1, seq, stream, k * 1000, k * 512, 512, 512, (1000000, 2621440), None,
                                     (0, 0, 0, 0), channels)
        else:
            f = messages.SampleFrame(1, seq, stream, k * 1000, k * 100, 100, 100, (16384, 262144),
                                     (7000, 7000, 16384, 411), (0, 0, 0, 0), channels)
        return self.sealers[dev].seal(messages.encoded(f, sealer=self.ciphers[dev]))

    def batch(self, n: int) -> list[bytes]:
        devs = list(self.keys)
        out = []
        for i in range(n):
            dev = devs[i % len(devs)]
            out.append(self.frame(dev, messages.STREAM_ECG_MAX30003 if (i // len(devs)) % 2 == 0
                                  else messages.STREAM_PPG_MAX30102))
        return out


def _setup(tmp: Path, fleet: Fleet, backends: list[str],
           commit_interval_s: float = COMMIT_INTERVAL_S) -> tuple[Store, Ingestor]:
    reg = Registry(tmp / "registry.db", AuditLog(tmp / "audit.log"))
    for dev, key in fleet.keys.items():
        reg.add(dev, key=key, actor="bench")
    store = Store(tmp / "store.db", backends, commit_interval_s=commit_interval_s)
    store.start()
    ing = Ingestor(store, reg)
    gc_tuning.tune()  # as the agent does once it has built its parts (the bench's process stays so)
    return store, ing


async def _ingest_all(ing: Ingestor, raws: list[bytes]) -> int:
    """Submits raws in order and acknowledges each once stored, as each board's
    session does (its outcomes in a queue of its own, at most PIPELINE_DEPTH judged
    and not yet acknowledged, one sealed ack for a run of stored frames:
    agent.session.coalesced_acks). Returns the acks sealed."""
    queues: dict[str, asyncio.Queue[Outcome | None]] = {}
    tasks = []
    sealed = 0

    async def acker(q: asyncio.Queue[Outcome | None]) -> None:
        nonlocal sealed
        carried: list[Outcome | None] = []
        while True:
            out = carried.pop() if carried else await q.get()
            if out is None:
                return
            if out.stored is not None:
                await out.stored
            sealed += len(coalesced_acks(out, q, carried, ing.hub))

    for raw in raws:
        out = ing.submit(raw, "bench")
        if out.stored is None:
            raise RuntimeError("frame not accepted: %s" % out.received.reason)
        dev = out.received.device_id or ""
        if dev not in queues:
            queues[dev] = asyncio.Queue(PIPELINE_DEPTH)
            tasks.append(asyncio.create_task(acker(queues[dev])))
        await queues[dev].put(out)  # a board's session reads no further while its pipeline is full
    for q in queues.values():
        await q.put(None)
    await asyncio.gather(*tasks)
    return sealed


def _thread_cpu_s(thread: threading.Thread | None) -> float:
    # A running thread's CPU time so far (Linux: its own clock).
    if thread is None or thread.ident is None:
        return float("nan")
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _thread_system_s(thread: threading.Thread | None) -> float:
    # A running thread's CPU time in the kernel so far (Linux /proc: its stime, in clock ticks).
    if thread is None or thread.native_id is None:
        return float("nan")
    with open("/proc/self/task/%d/stat" % thread.native_id) as f:
        return int(f.read().rsplit(")", 1)[1].split()[12]) / os.sysconf("SC_CLK_TCK")


class _GcTimer:
    """CPU time (each collecting thread's own) the garbage collector takes while installed."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self._started: dict[int, float] = {}

    def __enter__(self) -> _GcTimer:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        now = time.thread_time()
        if phase == "start":
            self._started[threading.get_ident()] = now
        else:
            self.cpu_s += now - self._started.pop(threading.get_ident(), now)


def verify_commit(n: int, profile: cProfile.Profile | None = None, recorded: bool = False) -> dict[str, float]:
    """n frames through the Ingestor and the store; CPU time in all, and that of the
    event loop's thread (verify, decode, records, acks) and of the store's writer (of
    it, in system calls: writing WAL pages, checkpoints), and the garbage collector's.
    recorded: the boards play a real recording (Fleet(recorded=True)), not a random walk."""
    fleet = Fleet(recorded=recorded)
    raws = fleet.batch(n)
    with tempfile.TemporaryDirectory() as tmp:
        store, ing = _setup(Path(tmp), fleet, ["none"])
        writer = store._thread
        w0, s0 = _thread_cpu_s(writer), _thread_system_s(writer)
        if profile is not None:
            profile.enable()
        with _GcTimer() as collector:
            t, c, m = time.perf_counter(), time.process_time(), time.thread_time()
            asyncio.run(_ingest_all(ing, raws))
            wall, cpu, loop_cpu = time.perf_counter() - t, time.process_time() - c, time.thread_time() - m
        if profile is not None:
            profile.disable()
        writer_cpu, writer_system = _thread_cpu_s(writer) - w0, _thread_system_s(writer) - s0
        commits = store.stats.commits
        store.close()
    return {"frames": n, "wall_s": wall, "cpu_s": cpu, "frames_per_s": n / wall, "frames_per_cpu_s": n / cpu,
            "commits": commits, "loop_thread_cpu_s": loop_cpu, "store_writer_cpu_s": writer_cpu,
            "store_writer_system_cpu_s": writer_system, "gc_cpu_s": collector.cpu_s}


def baseline(n: int) -> dict[str, float]:
    import cbor2

    py = PYCOSE_VENV / "bin" / "python"
    if not py.exists():
        raise FileNotFoundError("%s is missing: ./run bench (or ./run tests) creates it" % PYCOSE_VENV)
    fleet = Fleet()
    raws = fleet.batch(n)
    with tempfile.TemporaryDirectory() as tmp:
        frames = Path(tmp) / "frames.cbor"
        frames.write_bytes(cbor2.dumps(raws))
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps({d: k.hex() for d, k in fleet.keys.items()}))
        script = Path(tmp) / "baseline.py"
        script.write_text(BASELINE_SCRIPT)
        out = subprocess.run([str(py), str(script), str(frames), str(keys), str(Path(tmp) / "b.db")],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError("baseline failed: " + out.stderr[-2000:])
    r: dict[str, float] = json.loads(out.stdout)
    r["frames_per_s"] = r["frames"] / r["wall_s"]
    r["frames_per_cpu_s"] = r["frames"] / r["cpu_s"]
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pki_apart(directory: Path) -> types.SimpleNamespace:
    """The broker's test CA and certificate (agent.dev.tlsgen.make_pki), made by another
    process: its X.509 modules (~10 MB) stay out of this one, whose RSS stands for the
    agent's. Returns the paths (ca_cert, server_cert, server_key...) as attributes."""
    done = subprocess.run([sys.executable, "-c", "import dataclasses, json, pathlib, sys; from agent.dev.tlsgen "
                           "import make_pki; print(json.dumps({k: str(v) for k, v in dataclasses.asdict("
                           "make_pki(pathlib.Path(sys.argv[1]))).items()}))", str(directory)],
                          check=True, timeout=120, capture_output=True, text=True)
    return types.SimpleNamespace(**{k: Path(v) for k, v in json.loads(done.stdout).items()})


def _process_cpu_s(pid: int) -> float:
    # A process's CPU time so far (user + system; Linux /proc).
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client_process_cpu_s(fw: MqttForwarder) -> float:
    """The CPU time so far of the forwarder's MQTT client process (agent/mqtt_process.py, one
    per connection: the run's one, from its start); 0 when it has none."""
    connection = fw._connection
    return _process_cpu_s(connection.pid) if connection is not None and connection.pid is not None else 0.0


def _client_process_rss_mb(fw: MqttForwarder) -> float:
    # The forwarder's MQTT client process's RSS (MB; 0 when it has none).
    connection = fw._connection
    if connection is None or connection.pid is None:
        return 0.0
    with open("/proc/%d/status" % connection.pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Broker:
    def __init__(self, tmp: Path) -> None:
        import shutil

        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.pki = _pki_apart(tmp / "pki")
        self.port = _free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text("listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\nallow_anonymous true\n"
                        "persistence false\nmax_inflight_messages 0\nmax_queued_messages 0\nuser %s\n" % (
                            self.port, self.pki.ca_cert, self.pki.server_cert, self.pki.server_key, getpass.getuser()))
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("mosquitto did not start")

    def backend(self, payload: str = "json", client: str = MqttConfig.client,
                documents_per_message: int = 1) -> MqttConfig:
        return MqttConfig(name="mqtt", type="mqtt", url="mqtts://localhost:%d" % self.port,
                          ca_file=self.pki.ca_cert, batch=500, payload=payload, client=client,
                          documents_per_message=documents_per_message)

    def cpu_s(self) -> float:
        """The broker's CPU time so far (user + system; Linux /proc)."""
        return _process_cpu_s(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def verify_commit_forward(n: int, payload: str = "json", profile: cProfile.Profile | None = None,
                          client: str = MqttConfig.client, documents_per_message: int = 1) -> dict[str, float]:
    """Frames verified, committed and forwarded to Mosquitto (client: where the MQTT client runs,
    documents_per_message: as the backend's settings)."""
    fleet = Fleet()
    raws = fleet.batch(n)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        broker = Broker(tmp)
        try:
            store, ing = _setup(tmp, fleet, ["mqtt"])

            async def go() -> tuple[float, float]:
                wake = asyncio.Event()
                fw = MqttForwarder(broker.backend(payload, client, documents_per_message), store, "bench-hub", wake)
                store.on_commit = wake.set  # on the loop, after each commit
                task = asyncio.create_task(fw.run())
                if profile is not None:
                    profile.enable()
                t, c, m, b = time.perf_counter(), time.process_time(), time.thread_time(), broker.cpu_s()
                await _ingest_all(ing, raws)
                ingested_s = time.perf_counter() - t
                while fw.forwarded < n:
                    await asyncio.sleep(0.01)
                wall, cpu, loop_cpu = time.perf_counter() - t, time.process_time() - c, time.thread_time() - m
                client_cpu = _client_process_cpu_s(fw)
                cpu += client_cpu
                out.update(ingested_s=ingested_s, loop_thread_cpu_s=loop_cpu, broker_cpu_s=broker.cpu_s() - b,
                           client_process_cpu_s=client_cpu)
                if profile is not None:
                    profile.disable()
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                return wall, cpu

            out: dict[str, float] = {}
            wall, cpu = asyncio.run(go())
            store.close()
        finally:
            broker.close()
    return {"frames": n, "wall_s": wall, "cpu_s": cpu, "frames_per_s": n / wall, "frames_per_cpu_s": n / cpu, **out}


# A one-hour backlog: 20 boards x 2 streams x 1 frame/s x 3600 s.
BACKLOG_FRAMES = BOARDS * 2 * 3600


def _backlog(store: Store, fleet: Fleet, n: int) -> None:
    """n frames of the fleet's boards in the store, as ingest stores them: one
    hour of each board's ECG and PPG. Sealed and decoded once per board and
    stream, then stored under each seq (forwarding reads the records, never
    the COSE bytes, so the backlog costs its storing only)."""
    templates: dict[tuple[str, int], FrameRecord] = {}
    ing_hub = hub.Hub(decode_samples=False)
    for dev, key in fleet.keys.items():
        ing_hub.add_device(dev, key)
        for stream in (messages.STREAM_ECG_MAX30003, messages.STREAM_PPG_MAX30102):
            raw = fleet.frame(dev, stream)
            m = ing_hub.receive(raw).message
            assert isinstance(m, messages.SampleFrame)
            templates[(dev, stream)] = record_of(dev, m, m.channels, raw, None)  # type: ignore[arg-type]
    devs = list(fleet.keys)
    per_stream = n // (2 * len(devs))

    async def go() -> None:
        pending: list[asyncio.Future[Any]] = []
        for k in range(per_stream):
            for dev in devs:
                for i, stream in enumerate((messages.STREAM_ECG_MAX30003, messages.STREAM_PPG_MAX30102)):
                    t = templates[(dev, stream)]
                    seq = 2 * k + i
                    f = dataclasses.replace(t, seq=seq, first_index=k * t.count, t0_ms=k * 1000,
                                            t0_utc_ms=1_800_000_000_000 + k * 1000)
                    pending.append(store.submit_ingest(Ingest.frame(f, (1, seq, 1, None))))
            if len(pending) >= 4096:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)

    asyncio.run(go())


def drain(n: int = BACKLOG_FRAMES, payload: str = "json", profile: cProfile.Profile | None = None,
          client: str = MqttConfig.client, documents_per_message: int = 1) -> dict[str, float]:
    """The time to forward a backlog of n frames (one hour of 20 boards) to
    Mosquitto over TLS, QoS 1, every one PUBACKed and its outbox row deleted
    (profile: enabled while it drains; client, documents_per_message: as the backend's settings)."""
    fleet = Fleet()
    with tempfile.TemporaryDirectory(dir=os.environ.get("PULSEBRIDGE_BENCH_DIR")) as tmp_s:
        tmp = Path(tmp_s)
        broker = Broker(tmp)
        try:
            store = Store(tmp / "store.db", ["mqtt"])
            store.start()
            gc_tuning.tune()  # as _setup does
            _backlog(store, fleet, n)
            held = store.stats.ingested

            async def go() -> tuple[float, float]:
                fw = MqttForwarder(broker.backend(payload, client, documents_per_message), store, "bench-hub",
                                   asyncio.Event())
                if profile is not None:
                    profile.enable()
                t, c, m, b = time.perf_counter(), time.process_time(), time.thread_time(), broker.cpu_s()
                task = asyncio.create_task(fw.run())
                while fw.forwarded < held:
                    await asyncio.sleep(0.05)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                client_cpu = _client_process_cpu_s(fw)
                cpu += client_cpu
                out.update(loop_thread_cpu_s=time.thread_time() - m, broker_cpu_s=broker.cpu_s() - b,
                           client_process_cpu_s=client_cpu)
                if profile is not None:
                    profile.disable()
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                return wall, cpu

            out: dict[str, float] = {}
            wall, cpu = asyncio.run(go())
            store.close()
        finally:
            broker.close()
    return {"frames": held, "wall_s": wall, "cpu_s": cpu, "frames_per_s": held / wall, "frames_per_cpu_s": held / cpu,
            **out}


# Where the time goes: a function's file tells its area.
_VERIFY = "verify and decode (protocols/ and its fast paths: COSE, CBOR, AES-CTR, replay)"
_SAMPLES = "samples (numpy: decoding them, packing and unpacking records)"
# agent/fastdecode.py holds the fast wire decoders and the sample decoder: told apart by function.
# agent/record.py packs a record's steps and sums its samples from them: samples too.
_SAMPLE_DECODERS = ("decode", "decode_with_steps", "short_steps", "_short_steps", "pack_steps", "unpacked_steps",
                    "_cumulated")
AREAS = (
    ("protocols/", _VERIFY),
    ("agent/fastdecode", _VERIFY),
    ("numpy", _SAMPLES),
    ("agent/store", "store (SQLite, this thread)"),
    ("sqlite3", "store (SQLite, this thread)"),
    ("paho", "MQTT client (paho)"),
    ("agent/mqtt_link", "batches handed to (or read by) the MQTT client's process"),
    ("agent/mqtt_process", "the MQTT connection's own code (batches, PUBACK bookkeeping)"),
    ("ssl", "TLS"),
    ("json", "documents (JSON, CBOR, record)"),
    ("cbor2", "documents (JSON, CBOR, record)"),
    ("agent/forwarders", "documents (JSON, CBOR, record)"),
    ("agent/record", "documents (JSON, CBOR, record)"),
    ("agent/ingest", "ingest (records, outcomes)"),
    ("agent/vitals", "vitals (engine, runner)"),
    ("agent/dev", "the bench's own loop (the boards' timing, the latencies)"),
    ("asyncio", "asyncio (tasks, futures, callbacks, the loop's wake-ups)"),
    ("selectors", "asyncio (tasks, futures, callbacks, the loop's wake-ups)"),
    ("threading", "threads (executor hand-overs, locks)"),
    ("concurrent/futures", "threads (executor hand-overs, locks)"),
    ("queue.py", "threads (executor hand-overs, locks)"),
)


def profile_summary(n: int, payload: str = "json", top: int = 12, what: str = "forward") -> dict[str, Any]:
    """verify+commit+forward of n frames (what="forward"), verify+commit alone
    (what="commit"), or the drain of a backlog of n (what="drain"), under cProfile,
    timed in this thread's CPU time (the store's threads are not in it): total per
    area, and the functions that take most of it (own time)."""
    prof = cProfile.Profile(time.thread_time)
    if what == "commit":
        r = verify_commit(n, profile=prof)
        return {"what": what, "frames": n, "payload": payload, "frames_per_s_under_profile": r["frames_per_s"],
                **_by_area(prof, top)}
    # The MQTT client's process under cProfile too (python -m cProfile, its stats written at its end).
    with tempfile.TemporaryDirectory() as tmp:
        stats = str(Path(tmp) / "client.pstats")
        args, mqtt.PROCESS_ARGS = mqtt.PROCESS_ARGS, ("-m", "cProfile", "-o", stats, *mqtt.PROCESS_ARGS)
        try:
            r = verify_commit_forward(n, payload, profile=prof) if what == "forward" else \
                drain(n, payload, profile=prof)
        finally:
            mqtt.PROCESS_ARGS = args
        client = _by_area(stats, top, idle=_IDLE) if Path(stats).exists() else None
    return {"what": what, "frames": n, "payload": payload, "frames_per_s_under_profile": r["frames_per_s"],
            **_by_area(prof, top), "client_process": client}


# The MQTT client process's wait for its socket or its stdin: wall time (cProfile's clock there), not work.
_IDLE = ("<method 'poll' of 'select.epoll' objects>",)


def _by_area(prof: cProfile.Profile | str, top: int, idle: tuple[str, ...] = ()) -> dict[str, Any]:
    # A profile's own time by area (AREAS; a builtin's goes to its callers' areas) and the
    # functions that take most; idle: functions (as named in the profile) left out.
    st = pstats.Stats(prof)
    entries = {k: v for k, v in st.stats.items() if k[2] not in idle}  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1.0
    areas: dict[str, float] = {}
    functions = []

    def area_of(file: str, name: str) -> str:
        if ("agent/fastdecode" in file or "agent/record" in file) and name in _SAMPLE_DECODERS:
            return _SAMPLES
        return next((a for key, a in AREAS if key in file), "other Python")

    for (file, line, name), (_cc, _nc, own, _cum, callers) in entries.items():
        if file == "~" and callers:  # a builtin: its time goes to its callers' areas, as they spent it
            spent = sum(c[2] for c in callers.values()) or 1.0
            for (cfile, _l, cname), c in callers.items():
                areas[area_of(cfile, cname)] = areas.get(area_of(cfile, cname), 0.0) + own * c[2] / spent
        else:
            areas[area_of(file, name)] = areas.get(area_of(file, name), 0.0) + own
        where = "/".join(file.split("/")[-2:])
        functions.append((own, "%s:%d %s" % (where, line, name) if file != "~" else name))
    functions.sort(reverse=True)
    return {"profiled_cpu_s": total,
            "areas": {a: round(100 * t / total, 1) for a, t in sorted(areas.items(), key=lambda kv: -kv[1])},
            "top_functions": [(round(100 * own / total, 1), f) for own, f in functions[:top]]}


def profile_realistic(seconds: float, top: int = 14) -> dict[str, Any]:
    """The realistic load (vitals on) under cProfile, the event loop's thread in its CPU time
    (the store's writer is not in it: realistic() gives its CPU apart): by area, and the
    functions that take most (own time)."""
    prof = cProfile.Profile(time.thread_time)
    r = realistic(seconds, profile=prof)
    return {"what": "realistic", "frames": r["frames"], "payload": "json", **_by_area(prof, top)}


class _TimedVitalsEngine(VitalsEngine):
    """The vitals engine, its CPU time (this thread's) per ECG and per PPG frame counted."""

    def __init__(self) -> None:
        super().__init__(AlertEngine())
        self.cpu_s = {"ecg": 0.0, "ppg": 0.0}
        self.frames = {"ecg": 0, "ppg": 0}

    def frame(self, f: FrameRecord, device_id: str, t0_utc_s: float, key: str) -> list[dict[str, Any]]:
        c0 = time.thread_time()
        out = super().frame(f, device_id, t0_utc_s, key)
        kind = "ppg" if f.stream == messages.STREAM_PPG_MAX30102 else "ecg"
        self.cpu_s[kind] += time.thread_time() - c0
        self.frames[kind] += 1
        return out


class _CountingSelector:
    """An event loop's selector, its select() calls that returned counted: the loop's
    wake-ups (each one a turn of the loop: an epoll_wait, the ready callbacks run)."""

    def __init__(self, selector: Any) -> None:
        self._selector = selector
        self.wakeups = 0

    def select(self, timeout: float | None = None) -> Any:
        ready = self._selector.select(timeout)
        self.wakeups += 1
        return ready

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


# The boards' process is given this long to start before its first frame is due.
BOARDS_START_S = 3.0


class _PtyBoards:
    """The boards' side of the realistic load over serial links: a pty a board, its
    controller written by another process (play_boards) as a board writes its port (each
    frame framed for the link at its time, in chunk_bytes pieces if given), the acks read
    back and matched to the frames they cover (the round trip a board sees). Its CPU and
    the interpreter lock it takes stay out of the agent's process."""

    def __init__(self, n: int) -> None:
        self.ptys = [pty.openpty() for _ in range(n)]
        for _, device in self.ptys:
            tty.setraw(device)
        self.paths = [os.ttyname(device) for _, device in self.ptys]
        self.round_trips: list[float] = []
        self.unacked = 0

    async def run(self, schedule: list[tuple[float, int, int, bytes]], t0: float, bound_s: float,
                  chunk_bytes: int = 0) -> None:
        """schedule: (s after t0, board, seq, frame), in time order (t0: time.perf_counter(),
        the system's monotonic clock, which the other process reads too)."""
        controllers = [c for c, _ in self.ptys]
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            f.write(json.dumps([(at, b, seq, raw.hex()) for at, b, seq, raw in schedule]).encode())
            f.flush()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "import sys; from agent.dev.bench_agent import _play_main; _play_main()",
                f.name, json.dumps(controllers), repr(t0), repr(bound_s), str(chunk_bytes),
                pass_fds=controllers, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError("the boards' process failed (exit %s)" % proc.returncode)
        done = json.loads(out)
        self.round_trips, self.unacked = done["round_trips"], done["unacked"]

    def close(self) -> None:
        for c, device in self.ptys:
            os.close(c)
            os.close(device)


def _acked(line: bytes) -> tuple[int, list[tuple[int, int]]] | None:
    # A downlink line (protocols.hub_link.downlink_line): the ack's epoch and seq ranges, if an ack.
    if not line.startswith(b"~"):
        return None
    body = binascii.a2b_base64(line[1:])[:-4]  # the CRC is the link's business
    m = messages.decode_payload(cose.parse(body).payload, messages.DOWNLINK_TYPES)
    return (m.epoch, m.ranges) if isinstance(m, messages.Ack) else None


def play_boards(controllers: list[int], schedule: list[tuple[float, int, int, bytes]], t0: float, bound_s: float,
                chunk_bytes: int = 0) -> tuple[list[float], int]:
    """The boards: each frame of schedule written to its board's pty controller at its time
    (in chunk_bytes pieces, as a USB link delivers them, if not 0), acks read back. Until
    every frame is acknowledged or bound_s after the last is due. Returns the acks' round
    trips (s) and how many frames were not acknowledged."""
    framer = link.StreamFramer()
    board_of = {c: b for b, c in enumerate(controllers)}
    lines = [bytearray() for _ in controllers]
    sent: dict[tuple[int, int], float] = {}
    round_trips: list[float] = []
    i = 0
    end = t0 + (schedule[-1][0] if schedule else 0.0) + bound_s
    while (i < len(schedule) or sent) and time.perf_counter() < end:
        wait_s = t0 + schedule[i][0] - time.perf_counter() if i < len(schedule) else 0.5
        ready, _, _ = select.select(controllers, [], [], max(0.0, wait_s))
        for c in ready:
            buf = lines[board_of[c]]
            buf += os.read(c, 65536)
            while (nl := buf.find(b"\n")) >= 0:
                ack = _acked(bytes(buf[:nl]))
                del buf[:nl + 1]
                if ack is None:
                    continue
                now = time.perf_counter()
                for first, last in ack[1]:
                    for seq in range(first, last + 1):
                        at = sent.pop((board_of[c], seq), None)
                        if at is not None:
                            round_trips.append(now - at)
        while i < len(schedule) and time.perf_counter() >= t0 + schedule[i][0]:
            _, b, seq, raw = schedule[i]
            framed = framer.frame(raw)
            step = chunk_bytes or len(framed)
            for at in range(0, len(framed), step):
                os.write(controllers[b], framed[at:at + step])
                if chunk_bytes:
                    time.sleep(0.0002)  # a full-speed USB packet's pace, about
            sent[(b, seq)] = time.perf_counter()
            i += 1
    return round_trips, len(sent) + len(schedule) - i


def _play_main() -> None:
    # The boards' process: argv = schedule file, controllers (JSON), t0, bound_s, chunk_bytes.
    path, controllers, t0, bound_s, chunk = sys.argv[1:6]
    with open(path) as f:
        schedule = [(at, b, seq, bytes.fromhex(raw)) for at, b, seq, raw in json.load(f)]
    round_trips, unacked = play_boards(json.loads(controllers), schedule, float(t0), float(bound_s), int(chunk))
    print(json.dumps({"round_trips": round_trips, "unacked": unacked}))


def realistic(seconds: float, vitals: bool = True, commit_interval_s: float = COMMIT_INTERVAL_S,
              profile: cProfile.Profile | None = None, links: bool = False, chunk_bytes: int = 0) -> dict[str, float]:
    """20 boards x 2 streams x 1 frame/s of a real recording (Fleet(recorded=True)) through
    ingest, the store (commits of board frames at most every commit_interval_s) and
    forwarding to Mosquitto, with the vitals engine on (as the agent wires it: each stored
    frame offered to the vitals runner, its vitals and alerts stored and forwarded) unless
    vitals=False. Besides the process's CPU: the event loop's thread's and the store
    writer's, and the loop's wake-ups (profile: enabled on the loop's thread while it runs).
    links: the frames come over serial links (a pty a board, _PtyBoards: the boards in another
    process), each read, judged and acknowledged by the agent's link manager and board
    sessions, as the agent serves USB boards; the latency is then the ack's round trip at the
    board (chunk_bytes: each frame written in pieces of that many bytes, as USB delivers them)."""
    fleet = Fleet(recorded=True)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        broker = Broker(tmp)
        try:
            store, ing = _setup(tmp, fleet, ["mqtt"], commit_interval_s)
            latencies: list[float] = []
            engine = _TimedVitalsEngine()
            runner = VitalsRunner(store, engine, ing.hub.has_device) if vitals else None
            if runner is not None:
                ing.on_stored = runner.offer

            async def go() -> tuple[float, float, float]:
                loop = asyncio.get_running_loop()
                loop_selector = loop._selector  # type: ignore[attr-defined]
                selector = loop._selector = _CountingSelector(loop_selector)  # type: ignore[attr-defined]
                wake = asyncio.Event()
                fw = MqttForwarder(broker.backend(), store, "bench-hub", wake)
                store.on_commit = wake.set  # on the loop, after each commit
                task = asyncio.create_task(fw.run())
                vitals_task = asyncio.create_task(runner.run()) if runner is not None else None
                devs = list(fleet.keys)
                # Each board sends its ECG and its PPG frame once a second, boards spread over the second.
                slot = 1.0 / (2 * len(devs))
                total = int(seconds / slot)
                # Made beforehand: sealing frames is the boards' work, not the agent's.
                frames, schedule = [], []
                for i in range(total):
                    b = (i // 2) % len(devs)
                    seq = fleet.seq[devs[b]]
                    frames.append(fleet.frame(devs[b], messages.STREAM_ECG_MAX30003 if i % 2 == 0
                                              else messages.STREAM_PPG_MAX30102))
                    schedule.append((i * slot, b, seq, frames[-1]))
                sessions: list[asyncio.Task[Any]] = []
                if boards is not None:  # the agent's link manager, a session on each board's port
                    manager = LinkManager(ing)
                    for path in boards.paths:
                        sessions.append(asyncio.create_task(manager.attempt(
                            manager.link("serial", "port:" + path), SerialTransport(path), identify=False)))
                    await _until(lambda: all(lk.stats is not None and lk.stats.connected
                                             for lk in manager.links.values()) and len(manager.links) == len(devs))
                    # The boards' process starts (its imports) before the first frame is due.
                    playing = asyncio.ensure_future(boards.run(schedule, time.perf_counter() + BOARDS_START_S,
                                                               30.0, chunk_bytes))
                    await asyncio.sleep(BOARDS_START_S)
                k = 0
                pending: list[asyncio.Future[Any]] = []

                def done_at(start: float) -> Any:
                    return lambda f: latencies.append(time.perf_counter() - start)

                t0 = time.perf_counter()
                c0 = time.process_time()
                m0, w0, s0 = time.thread_time(), _thread_cpu_s(store._thread), selector.wakeups
                if profile is not None:
                    profile.enable()
                if boards is not None:
                    await playing
                    latencies.extend(boards.round_trips)
                for raw in frames if boards is None else []:
                    due = t0 + k * slot
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                    start = time.perf_counter()
                    out = ing.submit(raw, "bench")
                    assert out.stored is not None
                    out.stored.add_done_callback(done_at(start))
                    pending.append(out.stored)
                    k += 1
                await asyncio.gather(*pending)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if profile is not None:
                    profile.disable()
                threads.update(loop_thread_cpu_s=time.thread_time() - m0,
                               store_writer_cpu_s=_thread_cpu_s(store._thread) - w0,
                               loop_wakeups=selector.wakeups - s0)
                # The MQTT client's process (its start's imports and connection too: a higher bound).
                threads.update(client_process_cpu_s=_client_process_cpu_s(fw),
                               client_process_rss_mb=_client_process_rss_mb(fw))
                cpu += threads["client_process_cpu_s"]
                rss = _rss_mb()
                for t in (task, vitals_task, *sessions):
                    if t is not None:
                        t.cancel()
                        try:
                            await t
                        except asyncio.CancelledError:
                            pass
                loop._selector = loop_selector  # type: ignore[attr-defined]
                return wall, cpu, rss

            threads: dict[str, float] = {}
            boards = _PtyBoards(len(fleet.keys)) if links else None
            try:
                wall, cpu, rss = asyncio.run(go())
            finally:
                if boards is not None:
                    boards.close()
            commits = store.stats.commits
            store.close()
        finally:
            broker.close()
        if boards is not None and boards.unacked:
            raise RuntimeError("%d frames not acknowledged over the links" % boards.unacked)
    lat = np.array(latencies) * 1000
    return {"frames": len(latencies), "seconds": wall, "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p99_ms": float(np.percentile(lat, 99)), "cpu_percent_of_one_core": 100 * cpu / wall,
            "commits_per_s": commits / wall, "commit_interval_s": commit_interval_s, "rss_mb": rss,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "vitals_made": runner.made if runner is not None else 0,
            "vitals_cpu_us_per_ecg_frame": 1e6 * engine.cpu_s["ecg"] / max(1, engine.frames["ecg"]),
            "vitals_cpu_us_per_ppg_frame": 1e6 * engine.cpu_s["ppg"] / max(1, engine.frames["ppg"]),
            "vitals_cpu_percent_of_one_core": 100 * sum(engine.cpu_s.values()) / wall,
            "cpu_ms_per_frame": 1000 * cpu / len(latencies),
            "loop_thread_cpu_percent_of_one_core": 100 * threads["loop_thread_cpu_s"] / wall,
            "store_writer_cpu_percent_of_one_core": 100 * threads["store_writer_cpu_s"] / wall,
            "loop_wakeups_per_frame": threads["loop_wakeups"] / len(latencies),
            "client_process_cpu_percent_of_one_core": 100 * threads["client_process_cpu_s"] / wall,
            "client_process_rss_mb": threads["client_process_rss_mb"], "links": links}


async def _until(done: Any, bound_s: float = 60.0) -> None:
    # Waits for done() (polled) at most bound_s.
    async with asyncio.timeout(bound_s):
        while not done():
            await asyncio.sleep(0.05)


def vitals_profile(seconds: int = 30, top: int = 10) -> dict[str, Any]:
    """The vitals engine alone, fed as the realistic load feeds it (BOARDS boards, each its
    ECG and PPG frame a second of a103l from its own place) for `seconds`: its CPU per
    board-second (this thread, run warm, best of 3), then where it goes under cProfile
    (own time of the functions that take most)."""
    ecg, red, ir = _recording()
    frames = []
    span = len(ecg) // 512
    for k in range(seconds):
        for b in range(BOARDS):
            i, dev = (b * 7 + k) % span, "pb-bench%02d" % b
            frames.append(FrameRecord(dev, 1, 2 * k, messages.STREAM_ECG_MAX30003, 512, k * 1000, k * 512, 512,
                                      1000000, 2621440, None, 0, 0, 0, 0, (ecg[i * 512:(i + 1) * 512],), None,
                                      0.0, b""))
            frames.append(FrameRecord(dev, 1, 2 * k + 1, messages.STREAM_PPG_MAX30102, 100, k * 1000, k * 100,
                                      100, 1, 1, (7, 7, 0, 0), 0, 0, 0, 0,
                                      (red[i * 100:(i + 1) * 100], ir[i * 100:(i + 1) * 100]), None, 0.0, b""))

    def feed(engine: VitalsEngine) -> None:
        for f in frames:
            engine.frame(f, f.device_id, 1_800_000_000.0 + f.first_index / f.rate_hz, f.key)

    best = float("inf")
    for _ in range(3):
        engine = VitalsEngine()
        c0 = time.thread_time()
        feed(engine)
        best = min(best, time.thread_time() - c0)
    prof = cProfile.Profile(time.thread_time)
    prof.runcall(feed, VitalsEngine())
    entries = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1.0
    functions = sorted(((own, "/".join(file.split("/")[-2:]) + ":%d %s" % (line, name) if file != "~" else name)
                        for (file, line, name), (_cc, _nc, own, _cum, _callers) in entries.items()), reverse=True)
    parts = {}  # cumulative time of the engine's main steps
    for (file, _line, name), (_cc, _nc, _own, cum, _callers) in entries.items():
        where = "/".join(file.split("/")[-2:]) + " " + name
        if where in _VITALS_PARTS:
            parts[_VITALS_PARTS[where]] = round(100 * cum / total, 1)
    parts = {part: parts[part] for part in _VITALS_PARTS.values() if part in parts}  # in the table's order
    return {"board_seconds": BOARDS * seconds, "cpu_ms_per_board_second": 1000 * best / (BOARDS * seconds),
            "cpu_percent_of_one_core": 100 * best / seconds, "profiled_cpu_s": total, "parts": parts,
            "top_functions": [(round(100 * own / total, 1), f) for own, f in functions[:top]]}


# The vitals engine's main steps, by function (file, name): their cumulative share is printed.
_VITALS_PARTS = {
    "vitals/rpeak.py push_frame": "R peaks (an ECG frame)",
    "vitals/spo2.py push": "a PPG frame's samples (the band-pass's carried state over them)",
    "vitals/spo2.py estimate": "SpO2, pulse rate, perfusion (a PPG frame's 8 s window)",
    "vitals/iir.py window_and_band": "  of it the window's zero-phase band (its ends and trend)",
    "vitals/spo2.py pulse_period": "  of it the pulse's period (autocorrelation)",
    "vitals/spo2.py _consistency": "  of it R's consistency across stretches",
    "vitals/iir.py filter": "the Butterworth filters (R peaks' band-pass and the window's)",
    "vitals/alerts.py observe": "alert rules",
}


def _write_bytes() -> int:
    # Bytes this process caused to be written to storage (Linux /proc/self/io):
    # what an SD card would have to take, checkpoints included.
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def card_writes(seconds: float, commit_interval_s: float = COMMIT_INTERVAL_S, boards: int = BOARDS) -> dict[str, float]:
    """Bytes written to the card per frame stored, under the realistic load
    (20 boards x 2 streams x 1 frame/s), with a backend taking every frame
    within a second (outbox deletes are writes too) and the store closed at
    the end (its last checkpoint counted)."""
    fleet = Fleet(boards)
    with tempfile.TemporaryDirectory(dir=os.environ.get("PULSEBRIDGE_BENCH_DIR")) as tmp_s:
        tmp = Path(tmp_s)
        store, ing = _setup(tmp, fleet, ["backend"], commit_interval_s)
        devs = list(fleet.keys)
        slot = 1.0 / (2 * len(devs))
        frames = [fleet.frame(devs[(i // 2) % len(devs)], messages.STREAM_ECG_MAX30003 if i % 2 == 0
                              else messages.STREAM_PPG_MAX30102) for i in range(int(seconds / slot))]
        reader = store.reader()

        async def go() -> None:
            pending: list[asyncio.Future[Any]] = []
            t0 = time.perf_counter()
            next_delivery = t0 + 1.0
            for k, raw in enumerate(frames):
                await asyncio.sleep(max(0.0, t0 + k * slot - time.perf_counter()))
                out = ing.submit(raw, "bench")
                assert out.stored is not None
                pending.append(out.stored)
                if time.perf_counter() >= next_delivery:  # the backend acknowledges what it was sent
                    next_delivery += 1.0
                    rows = await asyncio.to_thread(Store.fetch_outbox, reader, "backend", 1000)
                    await store.delivered("backend", [r.id for r in rows])
            await asyncio.gather(*pending)
            rows = await asyncio.to_thread(Store.fetch_outbox, reader, "backend", 100000)
            await store.delivered("backend", [r.id for r in rows])

        before, t0 = _write_bytes(), time.perf_counter()
        asyncio.run(go())
        wall = time.perf_counter() - t0
        reader.close()
        commits = store.stats.commits
        store.close()
        written = _write_bytes() - before
    frame_bytes = sum(len(f) for f in frames)
    return {"frames": len(frames), "commits": commits, "commits_per_s": commits / wall,
            "commit_interval_s": commit_interval_s, "frame_bytes": frame_bytes, "written_bytes": written,
            "written_per_frame": written / len(frames), "written_per_frame_byte": written / frame_bytes}


# Commit intervals compared beside the agent's own (COMMIT_INTERVAL_S), at the realistic load:
# 50 ms, and 500 ms, which commits as the former 0.5 s linger did (2 a second).
COMPARED_INTERVALS_S = (0.05, 0.5)
# A heavier load (boards), where the interval's cap on commits a second takes hold; it is
# compared with no cap (0: every commit at once).
HEAVY_BOARDS = 100


def commit_intervals(seconds: float) -> list[dict[str, Any]]:
    """The ack's latency against the card's writes, by commit interval: at the realistic
    load (20 boards) for each of COMPARED_INTERVALS_S (the agent's own is realistic_load
    and card_writes), then the card's writes at HEAVY_BOARDS boards with the agent's
    interval and with none."""
    rows: list[dict[str, Any]] = []
    for interval_s in COMPARED_INTERVALS_S:
        rows.append({"boards": BOARDS, "commit_interval_s": interval_s,
                     "latency": realistic(seconds, commit_interval_s=interval_s),
                     "card": card_writes(seconds, interval_s)})
    for interval_s in (COMMIT_INTERVAL_S, 0.0):
        rows.append({"boards": HEAVY_BOARDS, "commit_interval_s": interval_s, "latency": None,
                     "card": card_writes(seconds / 2, interval_s, HEAVY_BOARDS)})
    return rows


def run_realistic(seconds: float = 20.0) -> dict[str, Any]:
    """The realistic load alone (20 boards x 2 streams x 1 frame/s): with the vitals engine,
    without it, over serial links (a pty a board, the agent's sessions), and under the profiler."""
    return {"realistic_load": realistic(seconds),  # first: RSS before other runs grow the heap
            "realistic_load_no_vitals": realistic(seconds, vitals=False),
            "realistic_load_links": realistic(seconds, links=True),
            "profile_realistic": profile_realistic(seconds)}


def run(frames: int = 20000, baseline_frames: int = 3000, seconds: float = 20.0,
        backlog_frames: int = BACKLOG_FRAMES) -> dict[str, Any]:
    os.environ.setdefault("PYTHONHASHSEED", "0")
    r: dict[str, Any] = run_realistic(seconds)
    r["vitals_profile"] = vitals_profile()
    r["import_footprint"] = import_footprint()
    r["card_writes"] = card_writes(seconds)
    r["commit_intervals"] = commit_intervals(seconds)
    r.update(run_verify_commit(frames, baseline_frames, profile=False))
    r.update(forward_variants(frames))
    r["drain_backlog_mqtt"] = drain(backlog_frames)
    r["profile_commit"] = profile_summary(min(frames, 10000), what="commit")
    r["profile"] = profile_summary(min(frames, 10000))
    r["profile_drain"] = profile_summary(min(backlog_frames, 20000), what="drain")
    return r


def run_verify_commit(frames: int = 20000, baseline_frames: int = 3000, profile: bool = True) -> dict[str, Any]:
    """verify+commit alone (`bench agent --part verify-commit`; run() includes it): the agent's
    ingest of frames (random walk, then a real recording), the pycose baseline beside it, their
    ratios, and (profile) where verify+commit's time goes."""
    r: dict[str, Any] = {}
    r["verify_commit"] = verify_commit(frames)
    r["verify_commit_recorded"] = verify_commit(frames, recorded=True)
    r["baseline_pycose_commit_per_frame"] = baseline(baseline_frames)
    r["speedup_vs_baseline_per_core"] = (r["verify_commit"]["frames_per_cpu_s"]
                                         / r["baseline_pycose_commit_per_frame"]["frames_per_cpu_s"])
    r["speedup_vs_baseline_wall"] = (r["verify_commit"]["frames_per_s"]
                                     / r["baseline_pycose_commit_per_frame"]["frames_per_s"])
    if profile:
        r["profile_commit"] = profile_summary(min(frames, 10000), what="commit")
    return r


def verify_commit_lines(r: dict[str, Any]) -> list[str]:
    """verify+commit's figures, the baseline's and their ratios (and the profile when r has it)."""
    vc, b = r["verify_commit"], r["baseline_pycose_commit_per_frame"]
    return [
        "  verify+commit:           %7.0f frames/s, %7.0f frames per CPU-second (%d frames, %d commits; "
        "goal >= 20000 per CPU-second)" % (
            vc["frames_per_s"], vc["frames_per_cpu_s"], vc["frames"], vc["commits"]),
        "    CPU per frame: %.0f us on the event loop's thread (verify, decode, records, acks), %.0f us in the "
        "store's writer (of it %.0f us in system calls: its WAL pages written, checkpoints); the garbage "
        "collector's %.1f us of them" % (
            1e6 * vc["loop_thread_cpu_s"] / vc["frames"], 1e6 * vc["store_writer_cpu_s"] / vc["frames"],
            1e6 * vc["store_writer_system_cpu_s"] / vc["frames"], 1e6 * vc["gc_cpu_s"] / vc["frames"]),
        "  the same, frames of a real recording (a103l; ECG's QRS steps take two bytes): %7.0f frames per "
        "CPU-second, %.0f us on the event loop's thread" % (
            r["verify_commit_recorded"]["frames_per_cpu_s"],
            1e6 * r["verify_commit_recorded"]["loop_thread_cpu_s"] / r["verify_commit_recorded"]["frames"]),
        "  baseline (pycose, one commit per frame): %7.0f frames/s, %7.0f per CPU-second (%d frames)" % (
            b["frames_per_s"], b["frames_per_cpu_s"], b["frames"]),
        "  ratio to baseline:       %.1fx per CPU-second, %.1fx wall (goal >= 5x per CPU-second)" % (
            r["speedup_vs_baseline_per_core"], r["speedup_vs_baseline_wall"]),
    ]


def report_verify_commit(r: dict[str, Any]) -> list[str]:
    """run_verify_commit()'s report."""
    return ["agent benchmark, verify+commit alone (this machine; ECG 512-sample and PPG 100-sample frames, "
            "20 boards)", *verify_commit_lines(r), *profile_lines(r["profile_commit"])]


def report(r: dict[str, Any]) -> list[str]:
    return [
        "agent benchmark (one run, this machine; ECG 512-sample and PPG 100-sample frames, 20 boards)",
        *verify_commit_lines(r),
        *forward_lines(r),
        "  drain of a one-hour backlog of %d boards (%d frames) to Mosquitto (TLS, QoS 1, JSON): %.1f s "
        "(%.0f frames/s, %.0f per CPU-second; goal <= 30 s)" % (
            BOARDS, r["drain_backlog_mqtt"]["frames"], r["drain_backlog_mqtt"]["wall_s"],
            r["drain_backlog_mqtt"]["frames_per_s"], r["drain_backlog_mqtt"]["frames_per_cpu_s"]),
        *wall_lines("drain", r["drain_backlog_mqtt"]),
        *realistic_lines(r),
        *vitals_profile_lines(r["vitals_profile"]),
        *footprint_lines(r["import_footprint"]),
        "  written to the card, same load, every frame forwarded (/proc/self/io write_bytes):",
        "    %.0f bytes per frame stored, %.1fx the frame's size (%d frames of %.0f B on average, %d commits)" % (
            r["card_writes"]["written_per_frame"], r["card_writes"]["written_per_frame_byte"],
            r["card_writes"]["frames"], r["card_writes"]["frame_bytes"] / r["card_writes"]["frames"],
            r["card_writes"]["commits"]),
        *commit_interval_lines(r),
        *profile_lines(r["profile_realistic"]),
        *profile_lines(r["profile_commit"]),
        *profile_lines(r["profile"]),
        *profile_lines(r["profile_drain"]),
    ]


def realistic_lines(r: dict[str, Any]) -> list[str]:
    """The realistic load's figures (run_realistic's, or run's)."""
    rl, nv, li = r["realistic_load"], r["realistic_load_no_vitals"], r["realistic_load_links"]
    return [
        "  realistic load (20 boards x 2 streams x 1 frame/s of a recording, %.0f s, forwarding to Mosquitto, "
        "vitals engine on: %d vitals and alerts made):" % (rl["seconds"], rl["vitals_made"]),
        "    added latency (frame in -> ack ready) p50 %.2f ms, p99 %.2f ms" % (
            rl["latency_p50_ms"], rl["latency_p99_ms"]),
        "    CPU %.2f %% of one core (goal <= 2 %%), %.2f ms a frame; RSS %.1f MB (goal <= 80 MB; this process, "
        "the bench's own modules too%s)" % (
            rl["cpu_percent_of_one_core"], rl["cpu_ms_per_frame"], rl["rss_mb"],
            "; the MQTT client's process apart: %.1f MB" % rl["client_process_rss_mb"]
            if rl["client_process_rss_mb"] else "; the MQTT client runs in it"),
        "    of it: the event loop's thread %.2f %% (the MQTT client's work too, unless it has its own process), "
        "the store's writer %.2f %% (%.1f commits/s),%s other threads %.2f %% (outbox reads, documents); %.1f "
        "wake-ups of the event loop a frame" % (
            rl["loop_thread_cpu_percent_of_one_core"], rl["store_writer_cpu_percent_of_one_core"],
            rl["commits_per_s"],
            " the MQTT client's process %.2f %%," % rl["client_process_cpu_percent_of_one_core"]
            if rl["client_process_rss_mb"] else "",
            rl["cpu_percent_of_one_core"] - rl["loop_thread_cpu_percent_of_one_core"]
            - rl["store_writer_cpu_percent_of_one_core"] - rl["client_process_cpu_percent_of_one_core"],
            rl["loop_wakeups_per_frame"]),
        "    of it the vitals engine's own work: %.2f %% of one core (%.0f us an ECG frame: R peaks; %.0f us a PPG "
        "frame: its SpO2 window's estimate)" % (rl["vitals_cpu_percent_of_one_core"],
                                               rl["vitals_cpu_us_per_ecg_frame"], rl["vitals_cpu_us_per_ppg_frame"]),
        "    the same without the vitals engine: CPU %.2f %% of one core (the event loop's thread %.2f %%, the "
        "store's writer %.2f %%, %.1f commits/s), latency p99 %.2f ms" % (
            nv["cpu_percent_of_one_core"], nv["loop_thread_cpu_percent_of_one_core"],
            nv["store_writer_cpu_percent_of_one_core"], nv["commits_per_s"], nv["latency_p99_ms"]),
        "    the same over serial links (a pty a board; the agent's link manager and board sessions read, judge "
        "and acknowledge each frame; the boards in another process): CPU %.2f %% of one core (the event loop's "
        "thread %.2f %%, the store's writer %.2f %%), %.1f wake-ups of the event loop a frame; the ack's round "
        "trip at the board p50 %.2f ms, p99 %.2f ms" % (
            li["cpu_percent_of_one_core"], li["loop_thread_cpu_percent_of_one_core"],
            li["store_writer_cpu_percent_of_one_core"], li["loop_wakeups_per_frame"], li["latency_p50_ms"],
            li["latency_p99_ms"]),
    ]


def report_realistic(r: dict[str, Any]) -> list[str]:
    """run_realistic's figures and profile."""
    return ["agent benchmark, the realistic load alone (this machine)", *realistic_lines(r),
            *profile_lines(r["profile_realistic"])]


# documents_per_message of the batched runs: 25 of a topic's documents a PUBLISH (~100 kB of ECG JSON).
BENCH_DOCUMENTS_PER_MESSAGE = 25


def forward_variants(frames: int) -> dict[str, dict[str, float]]:
    """verify+commit+forward as configured by default (JSON, the MQTT client on the agent's loop,
    a document a message), then with CBOR, with BENCH_DOCUMENTS_PER_MESSAGE documents a message,
    and with the client in its own process (client = "process")."""
    return {"verify_commit_forward_mqtt": verify_commit_forward(frames),
            "verify_commit_forward_mqtt_cbor": verify_commit_forward(frames, "cbor"),
            "verify_commit_forward_mqtt_batched": verify_commit_forward(
                frames, documents_per_message=BENCH_DOCUMENTS_PER_MESSAGE),
            "verify_commit_forward_mqtt_process": verify_commit_forward(frames, client="process")}


def forward_lines(r: dict[str, Any]) -> list[str]:
    """forward_variants()' figures, with where their wall time went."""
    variants = (("verify_commit_forward_mqtt", "JSON"), ("verify_commit_forward_mqtt_cbor", "CBOR"),
                ("verify_commit_forward_mqtt_batched", "JSON, %d documents a message" % BENCH_DOCUMENTS_PER_MESSAGE),
                ("verify_commit_forward_mqtt_process", "JSON, the client in its own process"))
    out = []
    for key, what in variants:
        if key in r:
            out.append("  verify+commit+forward (Mosquitto, TLS, QoS 1), %s: %7.0f frames/s, %7.0f per CPU-second%s" % (
                what, r[key]["frames_per_s"], r[key]["frames_per_cpu_s"],
                " (goal >= 10000 frames/s)" if key == "verify_commit_forward_mqtt" else ""))
    for key, what in variants:
        if key in r:
            out += wall_lines("verify+commit+forward, %s" % what, r[key])
    return out


def run_forward(frames: int = 20000, backlog_frames: int = BACKLOG_FRAMES) -> dict[str, Any]:
    """verify+commit+forward to Mosquitto alone (JSON, then CBOR), with verify+commit beside
    it (what forwarding adds), the backlog's drain, and the profiles of the forward and the drain."""
    os.environ.setdefault("PYTHONHASHSEED", "0")
    return {"verify_commit": verify_commit(frames),
            **forward_variants(frames),
            "drain_backlog_mqtt": drain(backlog_frames),
            "drain_backlog_mqtt_batched": drain(backlog_frames, documents_per_message=BENCH_DOCUMENTS_PER_MESSAGE),
            "drain_backlog_mqtt_process": drain(backlog_frames, client="process"),
            "profile": profile_summary(min(frames, 10000)),
            "profile_drain": profile_summary(min(backlog_frames, 20000), what="drain")}


def report_forward(r: dict[str, Any]) -> list[str]:
    """run_forward()'s figures: its lines of report(), in the same words."""
    vc = r["verify_commit"]
    out = [
        "agent benchmark, forwarding (one run, this machine; ECG 512-sample and PPG 100-sample frames, 20 boards)",
        "  verify+commit:           %7.0f frames/s, %7.0f frames per CPU-second (%d frames)" % (
            vc["frames_per_s"], vc["frames_per_cpu_s"], vc["frames"]),
        *forward_lines(r),
    ]
    for key, what in (("drain_backlog_mqtt", "JSON"),
                      ("drain_backlog_mqtt_batched", "JSON, %d documents a message" % BENCH_DOCUMENTS_PER_MESSAGE),
                      ("drain_backlog_mqtt_process", "JSON, the client in its own process")):
        d = r[key]
        out.append("  drain of a backlog of %d frames to Mosquitto (TLS, QoS 1, %s): %.1f s (%.0f frames/s, %.0f per "
                   "CPU-second%s)" % (d["frames"], what, d["wall_s"], d["frames_per_s"], d["frames_per_cpu_s"],
                                      "; goal <= 30 s for 144000" if key == "drain_backlog_mqtt" else ""))
        out += wall_lines("drain, %s" % what, d)
    return [*out, *profile_lines(r["profile"]), *profile_lines(r["profile_drain"])]


def wall_lines(what: str, p: dict[str, float]) -> list[str]:
    """Where a phase's wall time went, in CPU time: the event loop's thread (verify, decode; paho
    and TLS when the MQTT client runs on it), the agent's other threads (the store's writer,
    outbox reads, documents), its MQTT client's process when it has one (paho, TLS), the broker;
    the rest is neither (waiting: the card's fsyncs, the network, other jobs on this machine;
    negative when the agent's parts ran at once, on two cores)."""
    client = p.get("client_process_cpu_s", 0.0)
    other = p["cpu_s"] - p["loop_thread_cpu_s"] - client
    waiting = p["wall_s"] - p["cpu_s"] - p["broker_cpu_s"]
    process = " its MQTT client's process %.2f s (%.0f us a frame)," % (client, 1e6 * client / p["frames"]) \
        if client else ""
    out = ["    %s: %.2f s wall, of it CPU: the event loop's thread %.2f s (%.0f us a frame), the agent's other "
           "threads %.2f s (store writer, outbox reads, documents),%s Mosquitto %.2f s; neither: %.2f s" % (
               what, p["wall_s"], p["loop_thread_cpu_s"], 1e6 * p["loop_thread_cpu_s"] / p["frames"], other,
               process, p["broker_cpu_s"], waiting)]
    if "ingested_s" in p:
        out.append("      (the %d frames ingested and acknowledged after %.2f s, all forwarded after %.2f s)"
                   % (p["frames"], p["ingested_s"], p["wall_s"]))
    return out


def vitals_profile_lines(p: dict[str, Any]) -> list[str]:
    """The vitals engine alone: its CPU, and where it goes."""
    out = ["    the vitals engine alone, the same frames fed in a row (%d board-seconds, warm): %.3f ms a "
           "board-second, %.2f %% of one core for %d boards; where it goes (under the profiler, each step "
           "with what it calls):" % (
               p["board_seconds"], p["cpu_ms_per_board_second"], p["cpu_percent_of_one_core"], BOARDS)]
    out += ["    %5.1f %%  %s" % (pct, part) for part, pct in p["parts"].items()]
    out.append("    the functions that take most (own time):")
    out += ["    %5.1f %%  %s" % (pct, f) for pct, f in p["top_functions"]]
    return out


def footprint_lines(fp: dict[str, dict[str, float]]) -> list[str]:
    """Where the RSS goes: the imports, in a fresh interpreter."""
    base, without, with_ = fp["python"], fp["agent_without_vitals"], fp["agent_with_vitals"]
    whole = fp["agent_cli"]
    return ["    RSS of the imports alone (fresh interpreter; RSS, of it anonymous, PSS): python %.0f MB; the agent's "
            "modules without the vitals engine %.0f MB (%.0f anonymous, PSS %.0f, %d modules); with it %.0f MB "
            "(%.0f, PSS %.0f, %d modules): the vitals engine's import %+.0f MB; the whole agent (agent.cli) "
            "%.0f MB (%.0f, PSS %.0f, %d modules)" % (
                base["rss_mb"], without["rss_mb"], without["anonymous_mb"], without["pss_mb"], without["modules"],
                with_["rss_mb"], with_["anonymous_mb"], with_["pss_mb"], with_["modules"],
                with_["rss_mb"] - without["rss_mb"], whole["rss_mb"], whole["anonymous_mb"], whole["pss_mb"],
                whole["modules"])]


def commit_interval_lines(r: dict[str, Any]) -> list[str]:
    """The ack's latency against the card's writes, one line per commit interval, the agent's first."""
    own = {"boards": BOARDS, "commit_interval_s": COMMIT_INTERVAL_S, "latency": r["realistic_load"],
           "card": r["card_writes"]}
    out = ["  commits of board frames at most every N ms (agent.toml commit_interval_ms; the agent's: %.0f ms):"
           % (1000 * COMMIT_INTERVAL_S)]
    for row in [own, *r["commit_intervals"]]:
        lat, card = row["latency"], row["card"]
        p50, p99 = ("%6.1f ms" % lat["latency_p50_ms"], "%6.1f ms" % lat["latency_p99_ms"]) if lat else ("-",) * 2
        out.append("    %3d boards, %3.0f ms: ack p50 %9s, p99 %9s; %5.1f commits/s; %5.0f bytes to the card "
                   "per frame" % (row["boards"], 1000 * row["commit_interval_s"], p50, p99, card["commits_per_s"],
                                  card["written_per_frame"]))
    return out


def profile_lines(p: dict[str, Any]) -> list[str]:
    what = {"drain": "drain of a backlog of", "commit": "verify+commit,",
            "realistic": "the realistic load, vitals on,"}.get(p.get("what", ""), "verify+commit+forward,")
    out = ["  where the time goes (%s %d frames, %s; CPU time of the main thread, %.1f s "
           "under the profiler):" % (what, p["frames"], p["payload"], p["profiled_cpu_s"])]
    out += ["    %5.1f %%  %s" % (pct, area) for area, pct in p["areas"].items()]
    out.append("    the functions that take most (own time):")
    out += ["    %5.1f %%  %s" % (pct, f) for pct, f in p["top_functions"]]
    client = p.get("client_process")
    if client is not None:
        out.append("    and in the MQTT client's process (its time in functions, waiting for its socket and stdin left "
                   "out: %.1f s under the profiler):" % client["profiled_cpu_s"])
        out += ["    %5.1f %%  %s" % (pct, area) for area, pct in client["areas"].items()]
        out.append("    the functions that take most there (own time):")
        out += ["    %5.1f %%  %s" % (pct, f) for pct, f in client["top_functions"]]
    return out
