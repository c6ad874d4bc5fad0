# Runs before main.py on every boot: chooses the firmware slot (SPEC.md,
# Firmware updates: install). Wi-Fi stays off (boards talk to the hub over
# USB or BLE only) and the REPL stays on the console.
#
# The firmware runs from directory a or b of the flash: the one in
# pulsebridge/boot.ok (a if none), or once, on trial, the one in
# pulsebridge/boot.next, which is removed before it runs: whatever the new
# version then does (crash, hang, never acknowledged), the next reset runs
# boot.ok again unless it confirmed itself (app/ota.py), and leaves
# pulsebridge/boot.rolled_back for the hub to hear of. A board flashed
# before slots (app/ at the root) runs as it is.
import os
import sys

_OK = "pulsebridge/boot.ok"
_NEXT = "pulsebridge/boot.next"
_TRIAL = "pulsebridge/boot.trial"
_ROLLED_BACK = "pulsebridge/boot.rolled_back"
_TRIAL_WATCHDOG_MS = 5000  # a trial version that hangs before its loop feeds the watchdog is reset


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def _has_firmware(slot):
    try:
        os.stat(slot + "/app")
        return True
    except OSError:
        return False


def choose():
    # The slot to run now, and whether it is on trial.
    ok = _read(_OK) or "a"
    nxt = _read(_NEXT)
    if nxt is not None:
        _remove(_NEXT)  # once only
    if nxt in ("a", "b") and nxt != ok and _has_firmware(nxt):
        _write(_TRIAL, nxt)
        return nxt, True
    trial = _read(_TRIAL)
    if trial is not None and trial != ok:
        # The version on trial was reset before it confirmed itself: back to
        # boot.ok, and the hub is told (app/ota.py reports it, then removes this).
        _write(_ROLLED_BACK, trial)
    _remove(_TRIAL)
    return ok, False


def start():
    slot, trial = choose()
    if _has_firmware(slot):
        sys.path.insert(0, slot if sys.platform == "linux" else "/" + slot)
    if trial and sys.platform != "linux":
        import machine

        machine.WDT(timeout=_TRIAL_WATCHDOG_MS)  # main's loop feeds it; a crash at import leaves it unfed
    return slot, trial


if __name__ == "__main__":
    start()
