# A firmware bundle's signature check on the board (pulsebridge-dev bench
# ota): protocols/ed25519.py's stepped check of a signature made by the
# release tool, in CPU time here (each slice and the whole) and scaled to a
# chip by the calibrated factor (sim/speedbench.py). Prints one JSON line.
# Each slice is a span of its own between two readings of the meter: what
# the meter's own reading costs inside a span (its tare, ~6 us here: a
# quarter of a 25 us slice; sim.tare) is measured on empty
# spans and taken off each,
# or the 467 slices' sum would count it 467 times, the whole check once.
import json
import sys

from protocols import bundle
from sim.tare import tare_milli


def sliced(meter, steps, tare):
    # One run of the generator steps a slice at a time: (its total, each
    # slice's time), in us, each less the meter's tare (thousandths of a
    # us; never below 0).
    total_milli = 0
    times = []
    while True:
        t0 = meter.now_us()
        try:
            next(steps)
        except StopIteration:
            total_milli += max(0, (meter.now_us() - t0) * 1000 - tare)
            break
        dt = max(0, (meter.now_us() - t0) * 1000 - tare)
        total_milli += dt
        times.append(dt // 1000)
    return total_milli // 1000, times


def main(target, path, key_hex):
    from sim import speedbench
    from sim.cpu import ThreadCpu

    meter = ThreadCpu()
    factor, _each = speedbench.calibrate(target, meter)
    with open(path, "rb") as f:
        data = f.read()
    key = bytes.fromhex(key_hex)
    manifest, signature, _at = bundle.read_header(data)
    tare = tare_milli(meter)
    best_total = 0
    times = []
    for _ in range(3):
        total, run = sliced(meter, bundle.signature_steps(manifest, signature, key), tare)
        times += run
        if not best_total or total < best_total:
            best_total = total
    slices = len(times) // 3
    times.sort()
    median = times[len(times) // 2]
    p99 = times[len(times) * 99 // 100]
    worst_slice = times[-1]
    t0 = meter.now_us()
    m = bundle.check(data, [key], 0, 0, bundle.parse_manifest(manifest).target)
    whole = max(0, ((meter.now_us() - t0) * 1000 - tare) // 1000)
    print(json.dumps({"target": target, "factor_x1000": factor, "slices": slices, "tare_host_milli_us": tare,
                      "signature_host_us": best_total, "signature_chip_us": best_total * factor // 1000,
                      "median_slice_chip_us": median * factor // 1000, "p99_slice_chip_us": p99 * factor // 1000,
                      "worst_slice_host_us": worst_slice, "worst_slice_chip_us": worst_slice * factor // 1000,
                      "bundle_bytes": len(data), "files": len(m.files),
                      "whole_check_host_us": whole, "whole_check_chip_us": whole * factor // 1000}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
