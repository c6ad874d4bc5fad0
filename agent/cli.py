"""The pulsebridge command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _sim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--boards", type=int, default=2, help="number of simulated boards (default 2)")
    p.add_argument("--ecg", choices=["max30003", "ad8232", "none"], default="max30003",
                   help="ECG front end of each board (default max30003)")
    p.add_argument("--no-ppg", action="store_true", help="boards without the MAX30102 pulse oximeter")
    p.add_argument("--spo2", type=float, default=97.0, help="SpO2 %% the simulated finger has (default 97)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--dir", type=Path, default=None, help="keep the boards' flash directories here")
    p.add_argument("--json", action="store_true", help="print a final machine-readable summary only")


def _options(args: argparse.Namespace, **kw: object):  # type: ignore[no-untyped-def]
    from agent.simrun import SimOptions

    if args.boards < 1 or args.boards > 32:
        raise SystemExit("pulsebridge: --boards must be 1 to 32")
    return SimOptions(boards=args.boards, ecg=None if args.ecg == "none" else args.ecg, ppg=not args.no_ppg,
                      seconds=args.seconds, directory=args.dir, spo2_pct=args.spo2, json=args.json,
                      **kw)  # type: ignore[arg-type]


def cmd_sim(args: argparse.Namespace) -> int:
    from agent import simrun

    opts = _options(args, capture=args.capture, attach_hub=args.capture is not None, live=False)
    if opts.capture is None and opts.seconds is None and not opts.json:
        print("Open the ports above with the agent (pulsebridge agent), or any serial tool. Ctrl-C stops.")
    result = simrun.run(opts)
    if args.json or args.capture:
        print(json.dumps(result, indent=1) if args.json else "capture written to %s" % args.capture)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent import demo

    opts = _options(args, live=True)
    try:
        result = demo.main(opts)
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("generated %d frames, acknowledged %d, forwarded %d, lost %d; %d rejected" % (
            result["frames_generated"], result["frames_acknowledged"], result["frames_forwarded"],
            result["frames_lost"], sum(result["rejects"].values())))
    ok = result["frames_lost"] == 0 and result["store_integrity"] == "ok" and not result["backend_invalid"]
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pulsebridge", description="Home telemonitoring gateway.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sim", help="run simulated boards (firmware under micropython) on pseudo-terminals")
    _sim_args(p)
    p.add_argument("--capture", type=Path, default=None,
                   help="verify and acknowledge the boards' frames, writing DIR/<device-id>.cbor and DIR/keys.json")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("demo", help="simulated boards streaming to the hub, verified and summarised live")
    _sim_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    p.add_argument("what", choices=["firmware", "encoding"], help="which benchmark")
    p.add_argument("--minutes", type=float, default=10.0, help="simulated minutes (firmware benchmark)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


def cmd_bench(args: argparse.Namespace) -> int:
    from agent import bench

    return bench.main(args.what, args.minutes, args.json)


if __name__ == "__main__":
    sys.exit(main())
