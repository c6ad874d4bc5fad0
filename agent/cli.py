"""The pulsebridge command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.registry import Registry


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pulsebridge")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


# The command line as the operator typed it (main sets it): what a "run it as ..." hint repeats.
_argv: list[str] = []

# Who runs the commands when the hub's files are not the caller's: the service user (README,
# "Installing the agent"), unless the file's directory says another owns them.
SERVICE_USER = "pulsebridge"


def _run_as_owner(path: Path) -> str:
    """This command, as the user who owns the hub's files at path: the owner of the nearest of path
    and its directories this user can see (its own directory, 0700, cannot be looked into), or
    SERVICE_USER when that is root or unknown."""
    import pwd
    import shlex

    user = SERVICE_USER
    for p in (path, *path.parents):
        try:
            uid = p.stat().st_uid
        except OSError:
            continue
        if uid not in (0, os.geteuid()):
            try:
                user = pwd.getpwuid(uid).pw_name
            except KeyError:  # a uid with no name on this system
                pass
        break
    return "sudo -u %s %s" % (user, shlex.join(["pulsebridge", *_argv]))


def _permission_error(path: Path | str) -> str:
    """A file of the hub this user may not read or open, named, with how to run the command instead."""
    return ("cannot open %s: permission denied (the hub's files are its service user's, not yours): run %s"
            % (path, _run_as_owner(Path(path))))


def _load_config(path: Path) -> AgentConfig:
    from agent.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as e:
        if isinstance(e.__cause__, PermissionError):
            raise SystemExit("pulsebridge: configuration error: %s" % _permission_error(path)) from None
        raise SystemExit("pulsebridge: configuration error: %s" % e) from None


def cmd_agent(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from agent import logs
    from agent.errors import PulsebridgeError
    from agent.supervisor import Agent

    cfg = _load_config(args.config)
    logs.setup(cfg.log_format, logging.DEBUG if args.verbose else logging.INFO)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(cfg).run(stop)

    try:
        asyncio.run(run())
    except PulsebridgeError as e:  # the store, the registry or the instance lock refused to start
        print("pulsebridge: the agent will not start: %s" % e, file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        print("pulsebridge: the agent will not start: %s" % _path_error(e, args.config), file=sys.stderr)
        return 2
    except sqlite3.OperationalError as e:  # the store cannot be opened: a full or failing card
        print("pulsebridge: the agent will not start: %s" % _data_error(e, cfg), file=sys.stderr)
        return 2
    return 0


def _data_error(e: sqlite3.OperationalError, cfg: AgentConfig) -> str:
    """SQLite could not open or write the hub's data (a full card, a failing one), in words naming where."""
    from agent.store import disk_full_hint

    return "the hub's data in %s cannot be written (%s)%s" % (
        cfg.data_dir, e, disk_full_hint(cfg.data_dir) or ": is its disk failing?")


def _path_error(e: OSError, config: Path) -> str:
    """A file or directory a command could not make or open (a data_dir under a file, a card not mounted),
    named with what is wrong: its traceback told an operator nothing more."""
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the path is fine: its disk is not
        return "cannot use %s: %s (its disk is full)" % (e.filename, e.strerror)
    return "cannot use %s: %s (a path set in %s, or under one?)" % (e.filename, e.strerror, config)


def _registry(cfg: AgentConfig) -> Registry:
    from agent.audit import AuditLog
    from agent.registry import Registry

    return Registry(cfg.registry_path, AuditLog(cfg.audit_path))


# `pulsebridge devices ACTION`: each action and what it does, for both --help texts (the operator's
# `pulsebridge --help` said "list, add or revoke boards", leaving export out).
DEVICE_ACTIONS = {
    "list": "the registered boards, one a line: id, state, label",
    "add": "register board ID under a new key (--key-out FILE writes it)",
    "revoke": "refuse board ID's frames from now on (--reason)",
    "export": "write the active boards' keys to --out FILE (end-to-end checks)",
}


def cmd_devices(args: argparse.Namespace) -> int:
    from agent.registry import RegistryError, valid_device_id, write_private

    if args.action in ("add", "revoke") and not args.device_id:
        raise SystemExit("pulsebridge: devices %s needs a device id (pulsebridge devices %s ID)"
                         % (args.action, args.action))
    if args.device_id and not valid_device_id(args.device_id):  # an escape or a newline would drive the terminal
        raise SystemExit("pulsebridge: device id must be 1 to 16 of a-z, 0-9, '-': %r" % args.device_id)
    for option, out in (("--key-out", args.key_out), ("--out", args.out)):
        # A key file that cannot be written is found before the key is made: after, the board was
        # registered under a key nobody had, and running it again said "already registered"
        if out and (Path(out).is_dir() or not Path(out).absolute().parent.is_dir()):
            raise SystemExit("pulsebridge: devices %s: %s %s: %s" % (
                args.action, option, out, "is a directory, give a file" if Path(out).is_dir() else
                "its directory %s does not exist" % Path(out).absolute().parent))
    cfg = _load_config(args.config)
    reg = _registry(cfg)
    try:
        if args.action == "list":
            for d in reg.all():
                print("%-16s %-8s %s" % (d.device_id, d.state, d.label))
            for problem in reg.damaged:  # rows edited by hand: named, each, and the listing's exit status says so
                print("pulsebridge: %s" % problem, file=sys.stderr)
            if reg.damaged:
                return 1
        elif args.action == "add":
            dev = reg.add(args.device_id, label=args.label or "", patient_ref=args.patient or "")
            if args.key_out:
                write_private(Path(args.key_out), dev.key.hex().encode() + b"\n")
                print("%s registered; key written to %s (mode 0600)" % (dev.device_id, args.key_out))
            else:
                print("%s registered (its key goes to the board at provisioning)" % dev.device_id)
        elif args.action == "revoke":
            reg.revoke(args.device_id, args.reason or "revoked by operator")
            print("%s revoked: its frames are refused from now on" % args.device_id)
        elif args.action == "export":
            # What a backend needs to verify frames end to end (COSE_Mac0, external AAD
            # "pulsebridge/1 board-to-hub"): the keys of the active devices.
            if not args.out:
                raise RegistryError("export needs --out FILE (keys are never printed)")
            keys = {d.device_id: d.key.hex() for d in reg.all() if d.state == "active"
                    and (not args.device_id or d.device_id == args.device_id)}
            for problem in reg.damaged:
                print("pulsebridge: not exported: %s" % problem, file=sys.stderr)
            # recorded first: keys leave the hub only once the record of it is written
            reg.audit.record("device.export_keys", args.device_id or "*", count=len(keys))
            write_private(Path(args.out), json.dumps(keys, indent=1).encode())
            print("%d device keys written to %s (mode 0600)" % (len(keys), args.out))
    except RegistryError as e:
        print("pulsebridge: %s" % e, file=sys.stderr)
        return 1
    finally:
        reg.close()
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    from agent.registry import valid_device_id
    from agent.store import Store

    if not valid_device_id(args.device):  # a typo, or a newline that would forge a line of the printout
        raise SystemExit("pulsebridge: device id must be 1 to 16 of a-z, 0-9, '-': %r" % args.device)
    cfg = _load_config(args.config)
    store = Store(cfg.store_path, [b.name for b in cfg.backends])
    store.open()
    n = store.erase_now(args.device)
    store.close()
    reg = _registry(cfg)
    existed = reg.row(args.device) is not None  # its row as stored: one edited by hand is erased too
    from agent.audit import AuditError, AuditLog

    try:
        if existed:
            reg.remove(args.device)  # with its audit record, or not at all
        AuditLog(cfg.audit_path).record("device.erase", args.device, frames_erased=n, registry_entry_removed=existed)
    except AuditError as e:
        print("pulsebridge: %s: %d frames of %s erased, but not its registry entry nor the record of the erasure: "
              "free some space there and run this again" % (e, n, args.device), file=sys.stderr)
        return 1
    finally:
        reg.close()
    if not n and not existed:  # the request is audited, but a mistyped id must not read as done
        print("pulsebridge: this hub holds nothing of %s (not registered, no frames): nothing erased; check the id"
              % args.device, file=sys.stderr)
        return 1
    print("erased %d frames and every record of %s held by this hub" % (n, args.device))
    return 0


def cmd_export_data(args: argparse.Namespace) -> int:
    """`pulsebridge export-data`: everything the hub holds of a device, as JSON Lines (GDPR art. 15, 20)."""
    from collections.abc import Iterator

    from agent.audit import AuditLog
    from agent.errors import PulsebridgeError
    from agent.forwarders.base import Subjects, document, encode_json
    from agent.registry import valid_device_id, write_private
    from agent.store import Store

    if not valid_device_id(args.device):  # a typo, or a newline that would forge a line of the printout
        raise SystemExit("pulsebridge: device id must be 1 to 16 of a-z, 0-9, '-': %r" % args.device)
    if args.out.is_dir() or not args.out.absolute().parent.is_dir():
        raise SystemExit("pulsebridge: export-data: --out %s: %s" % (args.out, "is a directory, give a file" if
                         args.out.is_dir() else "its directory %s does not exist" % args.out.absolute().parent))
    cfg = _load_config(args.config)
    reg = _registry(cfg)
    store = Store(cfg.store_path, [b.name for b in cfg.backends])
    db = store.reader()  # beside a running agent too (WAL)
    counts = {"records": 0, "undecodable": 0}
    try:
        dev = reg.get(args.device)
        first = db.execute("SELECT 1 FROM frames WHERE device_id=? LIMIT 1", (args.device,)).fetchone()
        if dev is None and first is None:  # the request is not recorded: nothing of anyone's leaves the hub
            print("pulsebridge: this hub holds nothing of %s (not registered, no frames): nothing written; check the "
                  "id" % args.device, file=sys.stderr)
            return 1
        # Recorded first: health data leaves the hub only once the record of it is written.
        AuditLog(cfg.audit_path).record("device.export_data", args.device, out=str(args.out.absolute()))
        subjects = Subjects(reg)

        def lines() -> Iterator[bytes]:
            if dev is not None:  # its registration, never its keys
                counts["records"] += 1
                yield encode_json({"type": "device", "device_id": dev.device_id, "state": dev.state, "label": dev.label,
                                   "patient_ref": dev.patient_ref, "registered_at": dev.created_at,
                                   "revoked_at": dev.revoked_at}) + b"\n"
            for row in Store.device_rows(db, args.device):
                try:
                    doc = document(row, cfg.hub_id, subjects.of(row.device_id, row.received_at))
                except PulsebridgeError as e:  # a row stored without what a document needs: said, not skipped
                    counts["undecodable"] += 1
                    doc = {"type": "undecodable", "device_id": row.device_id, "epoch": row.epoch, "seq": row.seq,
                           "error": str(e)}
                counts["records"] += 1
                yield encode_json(doc) + b"\n"

        write_private(args.out, lines())
    finally:
        db.close()
        reg.close()
    print("%d records of %s written to %s (mode 0600), JSON Lines: its registration, its frames, the hub's vitals, "
          "alerts and gap records about it, as the backends receive them%s" % (
              counts["records"], args.device, args.out,
              "; %d stored without their samples (type undecodable)" % counts["undecodable"]
              if counts["undecodable"] else ""))
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from agent.provision.provision import Provisioner
    from agent.registry import MAX_LABEL_CHARS, MAX_PATIENT_REF_CHARS, text_problem

    for problem in (text_problem("--label", args.label, MAX_LABEL_CHARS),
                    text_problem("--patient", args.patient, MAX_PATIENT_REF_CHARS)):
        if problem:  # the registry refuses it at its step, after the firmware's install
            print("pulsebridge provision: %s" % problem, file=sys.stderr)
            return 2
    if not args.origin_key_out.is_dir():  # found at the key step, after the firmware's install
        print("pulsebridge provision: --origin-key-out %s is not a directory: make it first (the board's origin "
              "key for the backend goes there)" % args.origin_key_out, file=sys.stderr)
        return 2
    cfg = _load_config(args.config)

    def confirm(question: str) -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            return False
        return input(question + " [y/N] ").strip().lower() in ("y", "yes", "o", "oui")

    prov = Provisioner(cfg, args.port, lambda s: print(s, flush=True), confirm)
    prov.flash_offset = args.flash_offset
    prov.origin_key_dir = args.origin_key_out
    try:
        prov.vendor_keys = [bytes.fromhex(k) for k in args.vendor_key or []]
    except ValueError:
        prov.vendor_keys = [b""]
    if len(prov.vendor_keys) > 2 or any(len(k) != 32 for k in prov.vendor_keys):
        print("pulsebridge provision: --vendor-key takes a 32-byte Ed25519 public key in hex, at most twice",
              file=sys.stderr)
        return 2
    res = prov.run(
        args.device_id, args.label, args.patient, args.dry_run, args.flash, args.self_test_seconds, args.link)
    return 0 if res.ok else 130 if res.interrupted else 1


def cmd_rotate(args: argparse.Namespace) -> int:
    from agent.provision.provision import Provisioner

    res = Provisioner(_load_config(args.config), args.port, lambda s: print(s, flush=True)).rotate(
        args.self_test_seconds)
    return 0 if res.ok else 130 if res.interrupted else 1


def cmd_verify_origin(args: argparse.Namespace) -> int:
    from agent import verify_origin

    try:
        rep = verify_origin.verify(args.inputs, args.key)
    except verify_origin.InputError as e:
        print("pulsebridge verify-origin: %s" % e, file=sys.stderr)
        return verify_origin.EXIT_INPUT_ERROR
    print(json.dumps(rep.as_dict(), indent=1) if args.json else verify_origin.text(rep))
    return verify_origin.EXIT_STATUS[rep.status]


def cmd_ota_push(args: argparse.Namespace) -> int:
    import time

    from agent import ota
    from agent.registry import valid_device_id
    from protocols import messages

    if not valid_device_id(args.device):  # an escape or a newline would drive or forge the operator's terminal
        print("pulsebridge: device id must be 1 to 16 of a-z, 0-9, '-': %r" % args.device, file=sys.stderr)
        return 2
    cfg = _load_config(args.config)
    reg = _registry(cfg)
    dev = reg.get(args.device)
    if dev is None or dev.state != "active":
        print("pulsebridge: %s is not an active board in the registry" % args.device, file=sys.stderr)
        return 2
    try:
        data = _read_bounded(args.bundle, messages.MAX_BUNDLE)
    except OSError as e:
        print("pulsebridge: ota push: bundle %s: %s" % (args.bundle, _unreadable(e)), file=sys.stderr)
        return 2
    except ota.PushError as e:
        print("pulsebridge: ota push: bundle %s: %s" % (args.bundle, e), file=sys.stderr)
        return 2
    try:
        m = ota.push(cfg.run_dir, cfg.audit_path, args.device, data)
    except ota.PushError as e:
        print("pulsebridge: ota push: bundle %s: %s" % (args.bundle, e), file=sys.stderr)
        return 2
    except OSError as e:  # the spool or the audit log (under run_dir, log_dir) cannot be written
        print("pulsebridge: ota push: %s" % _path_error(e, args.config), file=sys.stderr)
        return 2
    print("%s: %s (version %d, %d bytes) spooled; the agent sends it over the board's link"
          % (args.device, m.name, m.version, len(data)))
    if not _agent_answers(cfg):
        print("pulsebridge: no agent is running on %s (nothing answers on %s): the update is sent once it runs "
              "(systemctl start pulsebridge-agent)" % (args.config, cfg.status_socket), file=sys.stderr)
    if args.wait_s <= 0:
        return 0
    end = time.monotonic() + args.wait_s
    said = ""
    while time.monotonic() < end:
        st = ota.read_state(cfg.run_dir, args.device) or {}
        state = str(st.get("state", ""))
        if state and state != said:
            said = state
            print("  %s (byte %s of %d)" % (state, st.get("offset"), len(data)), flush=True)
        if state == "confirmed":
            return 0
        if state.startswith("refused"):
            print("pulsebridge: the board refused the bundle (%s); it runs its previous version"
                  % ota.refusal(state, m.key_id.hex()), file=sys.stderr)
            return 1
        if state == "rolled_back":
            print("pulsebridge: the new version did not stream with acknowledgements on trial: the board went "
                  "back to its previous version", file=sys.stderr)
            return 1
        time.sleep(0.5)
    if not said and not _agent_answers(cfg):
        print("pulsebridge: not sent within %.0f s: no agent is running; the update waits in %s until one runs"
              % (args.wait_s, cfg.run_dir / "ota"), file=sys.stderr)
        return 1
    print("pulsebridge: not confirmed within %.0f s (last: %s); the agent goes on sending it, a board that does "
          "not confirm a new version returns to its previous one" % (args.wait_s, said or "no answer"),
          file=sys.stderr)
    return 1


def _wait_seconds(text: str) -> float:
    """--wait-s: a finite number of seconds, 0 or more (nan or inf followed nothing, or for ever)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: %r" % text) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("%r: give a finite number of seconds, 0 or more" % text)
    return value


# --self-test-seconds: a board sends about a frame a second and 2 must verify; a longer test is a stream.
SELF_TEST_S = (3.0, 600.0)
_SELF_TEST_HELP = "how long the board streams to the hub to prove its key (%g to %g s, default 6)" % SELF_TEST_S


def _self_test_seconds(text: str) -> float:
    """--self-test-seconds: finite, within SELF_TEST_S (-3 or 0.5 failed every board's self-test after its
    key was written and registered, all then put back; nan was taken)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    low, high = SELF_TEST_S
    if not (math.isfinite(value) and low <= value <= high):
        raise argparse.ArgumentTypeError("%r: give %g to %g seconds (a board sends about a frame a second, and 2 "
                                         "must verify)" % (text, low, high))
    return value


def _unreadable(e: OSError) -> str:
    """Why a file given on the command line cannot be read, in words (Python's own, "[Errno 2] No such
    file or directory: '<path>'", gave the path twice and an errno the operator has no use for)."""
    import errno

    if e.errno == errno.ENOENT:
        return "no such file"
    if e.errno == errno.EISDIR:
        return "is a directory, not a file"
    return "cannot be read: %s" % (e.strerror.lower() if e.strerror else e)


def _read_bounded(path: Path, limit_bytes: int) -> bytes:
    """The file's bytes, reading at most limit_bytes + 1 of them (a huge file, /dev/zero or a pipe
    is not read whole into memory). Raises OSError; ota.PushError above limit_bytes."""
    from agent import ota

    with path.open("rb") as f:
        data = f.read(limit_bytes + 1)
    if len(data) > limit_bytes:
        raise ota.PushError("the file is larger than the %d bytes a board takes: not a bundle" % limit_bytes)
    return data


def _agent_answers(cfg: AgentConfig) -> bool:
    """Whether an agent answers on the configuration's status socket."""
    import asyncio

    from agent.status_server import read_status

    try:
        asyncio.run(read_status(cfg.status_socket))
    except (OSError, TimeoutError, ValueError):
        return False
    return True


def cmd_status(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from agent import status_text
    from agent.status_server import read_status

    cfg = _load_config(args.config)
    try:
        snap = asyncio.run(read_status(cfg.status_socket))
    except (FileNotFoundError, ConnectionRefusedError):  # none made, or one a killed agent left
        print("pulsebridge: no agent is running on %s (no status socket at %s): systemctl start pulsebridge-agent"
              % (args.config, cfg.status_socket), file=sys.stderr)
        return 1
    except PermissionError as e:  # the socket, or its directory, is the agent's user's
        print("pulsebridge: %s" % _permission_error(e.filename or cfg.status_socket), file=sys.stderr)
        return 1
    except (OSError, TimeoutError) as e:
        print("pulsebridge: the agent is not answering on %s (%s)" % (cfg.status_socket, e), file=sys.stderr)
        return 1
    except ValueError as e:  # oversized, cut or not JSON: not the agent's snapshot
        print("pulsebridge: what answers on %s is not the agent's status (%s)" % (cfg.status_socket, e),
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(snap, indent=1))
        return 0
    from agent.logs import escape

    def say(line: str) -> None:  # a backend's error body, a board's words: never a terminal's commands
        print(escape(line))

    say("hub %s, up %.0f s" % (snap["hub_id"], snap["uptime_s"]))
    for b in snap["boards"]:
        say("  " + _board_line(b, snap.get("store")))
    for problem in snap.get("registry_damaged", []):
        say("  " + problem)
    for name, t in sorted(snap.get("tasks", {}).items()):
        if t["restarts"]:
            say("  task %s restarted %d times%s (last: %s)" % (
                name, t["restarts"], ", restarting now" if t["restarting"] else "", t["last_error"]))
    sd = snap.get("systemd", {})
    if sd and not sd.get("alive", True):
        say("  the agent's loops are stuck (%s): systemd will restart it" % sd.get("reason", ""))
    for f in snap["backends"]:
        say("  backend %-12s %-8s backlog %d, forwarded %d%s%s" % (
            f["name"], f["state"], f["backlog"], f["forwarded"],
            (", refused %d (quarantined)" % f["refused"]) if f.get("refused") else "",
            (", " + f["last_error"]) if f["last_error"] else ""))
    for dev, vitals in sorted(snap.get("last_vitals", {}).items()):
        say("  " + _vitals_line(dev, vitals, time.time()))
    alerts = snap.get("vitals", {}).get("active_alerts", [])
    say("  alerts: " + (", ".join("%s %s" % (d, a) for d, a in alerts) if alerts else "none"))
    st = snap.get("store", {})
    for line in status_text.store_lines(st, time.time()):
        say("  " + line)
    rec = st.get("recovery")
    if rec:
        say("  store recovered at %s from a damaged store (%s; kept as %s): %s rows recovered, %d ranges "
              "unreadable" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["at"])), rec["problem"],
                              rec["kept"], sum(rec["rows_recovered"].values()), rec["unreadable_ranges"]))
    if snap["rejects"]:
        say("  rejected: " + ", ".join("%s %d" % kv for kv in sorted(snap["rejects"].items())))
    if snap.get("status_page", "on") != "on":
        say("  status page " + snap["status_page"])
    page = snap.get("status_page_clients") or {}
    if any(page.get(k) for k in ("wrong_passwords", "connections_refused", "connections_timed_out",
                                 "malformed_requests")):
        say("  status page: %d wrong passwords, %d lockouts (%d clients locked now), %d connections refused "
              "over the limits, %d cut for half-sent requests, %d malformed requests answered 400" % (
                  page["wrong_passwords"], page["lockouts"], page["locked_clients"], page["connections_refused"],
                  page["connections_timed_out"], page.get("malformed_requests", 0)))
    return 0


def _ota_describe(update: Any) -> str:
    from agent import ota

    return ota.describe(update)


def _vitals_line(device_id: str, vitals: dict[str, Any], now: float) -> str:
    """A board's last vitals and how old they are (a board unplugged a minute ago kept showing its last
    heart rate as if live). vitals: {kind: {"value", "at": ISO 8601 UTC}}; now: UTC seconds."""
    from datetime import datetime

    line = "vitals %-12s %s" % (device_id, ", ".join("%s %s" % (k, v["value"]) for k, v in sorted(vitals.items())))
    times = [datetime.fromisoformat(v["at"]).timestamp() for v in vitals.values() if v.get("at")]
    return line + (" (%.0f s ago)" % max(0.0, now - max(times)) if times else "")


def _board_line(b: dict[str, Any], store: dict[str, Any] | None = None) -> str:
    """A board's line in `pulsebridge status`; store: the snapshot's store state (a store fault holds
    a connected board's frames)."""
    import time

    from agent import status_text

    last = "never" if not b["last_frame_at"] else "%.0f s ago" % (time.time() - b["last_frame_at"])
    state = status_text.board_state(b, store or {})
    if b.get("retry_in_s") is not None and b["state"] != "searching":
        state += " (next try in %.0f s)" % b["retry_in_s"]
    line = "board %-12s %s, on %s, last frame %s" % (b["device_id"] or "?", state, b.get("port") or b["link"], last)
    if b.get("firmware"):
        line += ", firmware %s" % b["firmware"]
    update = _ota_describe(b.get("update"))
    if update:
        line += "; " + update
    ends = b.get("ends") or {}
    if ends:
        line += "; sessions ended: " + ", ".join("%s %d" % kv for kv in sorted(ends.items()))
    if b["state"] != "connected" and b.get("last_error"):
        line += "; last: " + b["last_error"]
    if b.get("identity"):
        line += "; FAULT: " + b["identity"]
    reported = b.get("board_errors") or {}
    if reported:
        line += "; the board reported: %s (last: %s)" % (", ".join("%s %d" % kv for kv in sorted(reported.items())),
                                                          b.get("last_board_error", ""))
    dropped = (b.get("discarded") or {}).get("overflow", 0)
    if dropped:
        line += "; %d messages dropped (hub busy, the board resends them)" % dropped
    if b.get("held_back"):
        line += "; %d frames left on the board while the store could take no more (it sends them again)" % (
            b["held_back"])
    if b.get("board_dropped"):
        line += "; %d frames dropped by the board unacknowledged (its outbox full: the oldest go)" % (
            b["board_dropped"])
    return line


def _address(text: str) -> int:
    """A flash address as written: 0x1000 or 4096."""
    return int(text, 0)


_address.__name__ = "address"  # argparse: "invalid address value: 'zz'", not "invalid <lambda> value"


# The agent's configuration file unless --config names another (agent/deploy/agent.toml is an example).
DEFAULT_CONFIG = Path("/etc/pulsebridge/agent.toml")
_CONFIG_HELP = "the agent's configuration file (default: %s)" % DEFAULT_CONFIG
_DEVICE_HELP = "the board's device id, as `pulsebridge devices list` shows it"


def build_parser() -> argparse.ArgumentParser:
    """The `pulsebridge` command line: every command and option, each with its help."""
    parser = argparse.ArgumentParser(prog="pulsebridge", description="Home telemonitoring gateway.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log in detail (debug) on stderr")
    parser.add_argument("--version", action="version", version="pulsebridge %s" % _version())
    sub = parser.add_subparsers(dest="command", required=True)

    default_cfg = DEFAULT_CONFIG
    p = sub.add_parser("agent", help="run the hub agent",
                       description="Run the hub agent in the foreground (systemd runs it as pulsebridge-agent): "
                                   "it opens the boards' links, verifies and stores their frames, and forwards them "
                                   "to the configured backends. SIGTERM or Ctrl-C stops it.")
    p.add_argument("--config", type=Path, default=default_cfg, help=_CONFIG_HELP)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("devices", help="the device registry: %s" % ", ".join(DEVICE_ACTIONS),
                       description="The device registry: what each action does.\n\n" + "\n".join(
                           "  %-8s%s" % kv for kv in DEVICE_ACTIONS.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=default_cfg, help=_CONFIG_HELP)
    p.add_argument("action", choices=list(DEVICE_ACTIONS), help="one of the actions above")
    p.add_argument("device_id", nargs="?", help="add, revoke: the board's device id (1 to 16 of a-z, 0-9, '-')")
    p.add_argument("--label", help="add: where the board is, as the status page shows it (e.g. \"bedroom\")")
    p.add_argument("--patient", help="a reference to the patient in the care team's records (no name)")
    p.add_argument("--key-out", help="add: write the new key (hex) to this file, mode 0600")
    p.add_argument("--reason", help="revoke: why")
    p.add_argument("--out", help="export: write {device id: key hex} of active devices to this file, mode 0600")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("erase", help="erase everything the hub holds for a device (GDPR erasure)",
                       description="Erase now, without asking, every frame this hub holds of a device and its registry "
                                   "entry (the audit log keeps a record of the erasure). It cannot be undone: run "
                                   "export-data first if the patient asked for a copy.")
    p.add_argument("--config", type=Path, default=default_cfg, help=_CONFIG_HELP)
    p.add_argument("--device", required=True, help=_DEVICE_HELP)
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("export-data", help="everything the hub holds of a device, to a file (GDPR art. 15 and "
                                           "20: access, portability)")
    p.add_argument("--config", type=Path, default=default_cfg, help=_CONFIG_HELP)
    p.add_argument("--device", required=True, help=_DEVICE_HELP)
    p.add_argument("--out", type=Path, required=True, help="the file to write (JSON Lines, mode 0600)")
    p.set_defaults(func=cmd_export_data)

    p = sub.add_parser("status", help="boards, backends and rejects, from the running agent")
    p.add_argument("--config", type=Path, default=default_cfg, help=_CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="the agent's whole status as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("provision", help="provision a board over USB serial: firmware, key, registry, self-test")
    p.add_argument("--config", type=Path, default=default_cfg, help=_CONFIG_HELP)
    p.add_argument("--port", required=True, help="the board's serial port")
    p.add_argument("--device-id", help="default: pb- and 8 random hex digits")
    p.add_argument("--label", default="", help="where the board is, as the status page shows it (e.g. \"bedroom\")")
    p.add_argument("--patient", default="", help="a reference to the patient in the care team's records (no name)")
    p.add_argument("--link", choices=["serial", "ble"], default="serial",
                   help="how the board reaches the hub: USB serial (default) or Bluetooth Low Energy")
    p.add_argument("--flash", type=Path, help="write this MicroPython image with esptool first")
    p.add_argument("--flash-offset", type=_address, default=0x1000,
                   help="where the image goes: 0x1000 on an ESP32 (default), 0x0 on an ESP32-S3 or C3")
    p.add_argument("--dry-run", action="store_true", help="show the steps, change nothing")
    p.add_argument("--yes", action="store_true", help="re-key an already provisioned board without asking")
    p.add_argument("--self-test-seconds", type=_self_test_seconds, default=6.0, help=_SELF_TEST_HELP)
    p.add_argument("--vendor-key", action="append",
                   help="the firmware vendor's Ed25519 public key (hex), whose signed updates the board will "
                        "install; up to twice (the current key and the next)")
    p.add_argument("--origin-key-out", type=Path, default=Path("."),
                   help="directory for DEVICE.origin.json, the board's origin key for the backend (default: here); "
                        "move it off the hub")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("rotate-key", help="give the board on PORT a new key, with no gap in accepted frames")
    p.add_argument("--config", type=Path, default=default_cfg, help=_CONFIG_HELP)
    p.add_argument("--port", required=True, help="the board's serial port")
    p.add_argument("--self-test-seconds", type=_self_test_seconds, default=6.0, help=_SELF_TEST_HELP)
    p.set_defaults(func=cmd_rotate)

    p = sub.add_parser("ota", help="firmware updates (signed bundles, pulsebridge-dev release)")
    ota_sub = p.add_subparsers(dest="ota_command", required=True)
    p = ota_sub.add_parser("push", help="send a signed bundle to a board over its current link, through the "
                                        "running agent; resumes after a cut")
    p.add_argument("--config", type=Path, default=default_cfg, help=_CONFIG_HELP)
    p.add_argument("--device", required=True, help=_DEVICE_HELP)
    p.add_argument("bundle", type=Path, help="the signed bundle file (pulsebridge-dev release sign --out)")
    p.add_argument("--wait-s", type=_wait_seconds, default=600.0,
                   help="how long to follow the update until the board confirms it (default 600 s; 0: "
                        "spool it and return)")
    p.set_defaults(func=cmd_ota_push)

    p = sub.add_parser("verify-origin", help="prove, without trusting the hub, that frames a backend received "
                                             "came from the boards unaltered, and list what is missing")
    p.add_argument("inputs", type=Path, nargs="+",
                   help="raw COSE captures, or JSON / JSON Lines documents (MQTT, webhook) or FHIR Bundles")
    p.add_argument("--key", type=Path, action="append", required=True,
                   help="an origin key file (from provisioning, or a simulator's origin_keys.json); repeatable")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_verify_origin)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _argv[:] = sys.argv[1:] if argv is None else argv
    from agent import logs

    logs.setup("text", logging.DEBUG if args.verbose else logging.WARNING)
    if args.command == "agent":
        return int(args.func(args))
    from agent.errors import PulsebridgeError

    try:
        return int(args.func(args))
    except PulsebridgeError as e:  # the registry or the store refused (a file readable by others, damaged)
        print("pulsebridge: %s" % e, file=sys.stderr)
        return 1
    except sqlite3.OperationalError as e:  # the store cannot be opened or written (erase on a full card)
        if not hasattr(args, "config"):
            raise
        print("pulsebridge: %s" % _data_error(e, _load_config(args.config)), file=sys.stderr)
        return 1
    except BrokenPipeError:  # `pulsebridge status | head`: the reader left, as a SIGPIPE'd command would end
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141
    except OSError as e:  # a path the configuration names that cannot be made or opened
        if e.filename is None or not hasattr(args, "config"):
            raise
        if isinstance(e, PermissionError):  # the hub's files, run as another user than the hub's
            print("pulsebridge: %s" % _permission_error(e.filename), file=sys.stderr)
            return 1
        print("pulsebridge: %s" % _path_error(e, args.config), file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before a command could handle it (provision handles its own)
        print("\npulsebridge: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
