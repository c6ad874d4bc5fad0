# The origin proof's cost on the board (pulsebridge-dev bench origin): the
# per-frame digest (app/origin.py OriginLog.add) over payloads of the sizes a
# board sends, and one checkpoint, in CPU time here and scaled to a chip by
# the calibrated factor (sim/speedbench.py). Prints one JSON line. Each
# run is timed less the meter's own reading inside its span (sim/tare.py:
# ~6 us here, against a frame's digest of tens of us).
import json
import sys

from sim.tare import tare_milli

_RUNS = 60


def best(meter, fn, tare):
    # fn's shortest of _RUNS runs, in us, less the meter's tare (thousandths of a us; never below 0).
    least = -1
    for _ in range(_RUNS):
        t0 = meter.now_us()
        fn()
        dt = max(0, (meter.now_us() - t0) * 1000 - tare)
        if least < 0 or dt < least:
            least = dt
    return least // 1000


def main(target, ecg_bytes, ppg_bytes):
    from app import origin
    from protocols import cbor, cose
    from sim import speedbench
    from sim.cpu import ThreadCpu

    meter = ThreadCpu()
    factor, _each = speedbench.calibrate(target, meter)
    tare = tare_milli(meter)
    up = cose.MacKey(bytes(32), b"pb-bench01", cose.AAD_UPLINK)
    log = origin.OriginLog(bytes(range(32)), b"pb-bench01", bytes(32), bytes(16), 10000, 0, up)
    ecg = bytearray(ecg_bytes)
    ppg = bytearray(ppg_bytes)
    buf = bytearray(origin.WORST_BYTES)
    w = cbor.Writer(buf)

    def add_ecg():
        log.n = 0
        log.add(1, ecg, 0, len(ecg))

    def add_ppg():
        log.n = 0
        log.add(1, ppg, 0, len(ppg))

    def checkpoint():
        log.n = 20  # 10 s of ECG + PPG at 1 s windows
        w.pos = 0
        log.checkpoint_into(w, 1, 21, 0)

    def mac_ecg():  # what the board already does per frame, for scale
        up._tag_into(ecg, 0, len(ecg))

    out = {"target": target, "factor_x1000": factor, "tare_host_milli_us": tare}
    for name, fn in (("digest_ecg_frame", add_ecg), ("digest_ppg_frame", add_ppg), ("checkpoint_20_frames", checkpoint),
                     ("device_mac_ecg_frame", mac_ecg)):
        host = best(meter, fn, tare)
        out[name + "_host_us"] = host
        out[name + "_chip_us"] = host * factor // 1000
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
