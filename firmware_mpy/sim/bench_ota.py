# A firmware bundle's signature check on the board (pulsebridge-dev bench
# ota): protocols/ed25519.py's stepped check of a signature made by the
# release tool, in CPU time here (each slice and the whole) and scaled to a
# chip by the calibrated factor (sim/speedbench.py). Prints one JSON line.
import json
import sys

from protocols import bundle
from sim import speedbench
from sim.cpu import ThreadCpu


def main(target, path, key_hex):
    meter = ThreadCpu()
    factor, _each = speedbench.calibrate(target, meter)
    with open(path, "rb") as f:
        data = f.read()
    key = bytes.fromhex(key_hex)
    manifest, signature, _at = bundle.read_header(data)
    best_total = 0
    worst_slice = 0
    slices = 0
    times = []
    for _ in range(3):
        g = bundle.signature_steps(manifest, signature, key)
        total = 0
        slices = 0
        while True:
            t0 = meter.now_us()
            try:
                next(g)
            except StopIteration:
                total += meter.now_us() - t0
                break
            dt = meter.now_us() - t0
            total += dt
            slices += 1
            times.append(dt)
            if dt > worst_slice:
                worst_slice = dt
        if not best_total or total < best_total:
            best_total = total
    times.sort()
    median = times[len(times) // 2]
    p99 = times[len(times) * 99 // 100]
    t0 = meter.now_us()
    m = bundle.check(data, [key], 0, 0, bundle.parse_manifest(manifest).target)
    whole = meter.now_us() - t0
    print(json.dumps({"target": target, "factor_x1000": factor, "slices": slices,
                      "signature_host_us": best_total, "signature_chip_us": best_total * factor // 1000,
                      "median_slice_chip_us": median * factor // 1000, "p99_slice_chip_us": p99 * factor // 1000,
                      "worst_slice_host_us": worst_slice, "worst_slice_chip_us": worst_slice * factor // 1000,
                      "bundle_bytes": len(data), "files": len(m.files),
                      "whole_check_host_us": whole, "whole_check_chip_us": whole * factor // 1000}))


main(sys.argv[1], sys.argv[2], sys.argv[3])
