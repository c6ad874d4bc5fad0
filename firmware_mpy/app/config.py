# The board's configuration, key and boot epoch, kept in its flash under
# pulsebridge/ (the working directory is the flash root on an ESP32):
#   pulsebridge/config.json  device id, link, sensors, pins (written at provisioning)
#   pulsebridge/device.key   the 32-byte device key, raw (written at provisioning)
#   pulsebridge/epoch        boot counter, incremented at every boot
import json
import os

from micropython import const

DIR = "pulsebridge"
CONFIG = DIR + "/config.json"
KEY = DIR + "/device.key"
EPOCH = DIR + "/epoch"
_KEY_SIZE = const(32)
_MAX_CONFIG_BYTES = const(4096)

DEFAULTS = {
    "link": "serial",
    "window_ms": 1000,
    "outbox_bytes": 24576,  # about 20 s of ECG + PPG when the hub is out of reach
    "outbox_frames": 48,
    "retransmit_ms": 3000,
    "status_every_ms": 10000,
    "origin_every_ms": 10000,  # an origin checkpoint at least this often (app/origin.py)
    "poll_ms": 10,
    "ecg": {"chip": "max30003", "rate_hz": 512, "gain": 20},
    "ppg": {"chip": "max30102", "rate_hz": 100, "pulse_width_us": 411, "adc_range_na": 16384,
            "led_red_ua": 7000, "led_ir_ua": 7000},
}


class ConfigError(Exception):
    pass


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def on_trial():
    # This boot runs a new firmware version on trial (boot.py; app/ota.py confirms it).
    return _exists(DIR + "/boot.trial")


def rolled_back():
    # boot.py left a version on trial that never confirmed itself: the hub is told (app/ota.py).
    return _exists(DIR + "/boot.rolled_back")


def release_name(default):
    # The running slot's release name (app/ota.py writes <slot>/.release:
    # "version floor name"), or default: the firmware it was provisioned with.
    for path in (DIR + "/boot.trial", DIR + "/boot.ok"):
        try:
            with open(path) as f:
                slot = f.read().strip()
            break
        except OSError:
            slot = "a"
    try:
        with open(slot + "/.release") as f:
            return f.read(160).split(" ", 2)[2].strip() or default
    except (OSError, IndexError):
        return default


def load():
    if not _exists(CONFIG):
        raise ConfigError("no %s on this board: provision it first" % CONFIG)
    with open(CONFIG) as f:
        text = f.read(_MAX_CONFIG_BYTES + 1)
    if len(text) > _MAX_CONFIG_BYTES:
        raise ConfigError("%s is larger than %d bytes" % (CONFIG, _MAX_CONFIG_BYTES))
    try:
        cfg = json.loads(text)
    except ValueError:
        raise ConfigError("%s is not valid JSON" % CONFIG) from None
    if not isinstance(cfg, dict):
        raise ConfigError("%s must hold a JSON object" % CONFIG)
    out = dict(DEFAULTS)
    out.update(cfg)
    dev = out.get("device_id")
    if not isinstance(dev, str) or not 1 <= len(dev) <= 16:
        raise ConfigError("device_id in %s must be 1 to 16 characters" % CONFIG)
    for c in dev:
        if not ("a" <= c <= "z" or "0" <= c <= "9" or c == "-"):
            raise ConfigError("device_id may hold only a-z, 0-9 and '-'")
    if out["link"] not in ("serial", "ble"):
        raise ConfigError("link must be 'serial' or 'ble', not %r" % (out["link"],))
    if not out.get("ecg") and not out.get("ppg"):
        raise ConfigError("no sensor configured: set ecg or ppg")
    return out


def load_key():
    if not _exists(KEY):
        raise ConfigError("no device key (%s): this board is not provisioned, so it will not stream" % KEY)
    with open(KEY, "rb") as f:
        key = f.read(_KEY_SIZE + 1)
    if len(key) != _KEY_SIZE:
        raise ConfigError("%s must hold exactly %d bytes, it holds %d" % (KEY, _KEY_SIZE, len(key)))
    return key


# What the boot counter held when next_epoch() could not read a number in
# it, else None: the app reports it at start.
epoch_unreadable = None


def next_epoch():
    # Reads, increments and durably rewrites the boot counter. A file that
    # holds no number is taken as lost and the count starts over: no
    # keystream comes back (each boot's key has its own salt) and the hub
    # moves a stale epoch on (epoch resync, SPEC.md), so a board never stays
    # down for it.
    global epoch_unreadable
    epoch = 0
    if _exists(EPOCH):
        with open(EPOCH) as f:
            text = f.read(24).strip()
        try:
            epoch = int(text)
        except ValueError:
            epoch = -1
        if epoch < 0:
            epoch_unreadable = text
            epoch = 0
    epoch += 1
    save_epoch(epoch)
    return epoch


def save_epoch(epoch):
    # Durably writes the boot counter (a temporary file, then renamed over
    # the old one: a power cut leaves either the old or the new value, never
    # a torn one). Also for an epoch resync (SPEC.md), before the epoch is used.
    tmp = EPOCH + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % epoch)
    os.rename(tmp, EPOCH)


def ring_bytes():
    # The outbox ring's size this board will ask for (at boot, before the
    # app's modules load: app.outbox.preallocate); the default if unsure.
    try:
        cfg = load()
    except ConfigError:
        return DEFAULTS["outbox_bytes"]
    return cfg["outbox_bytes"]
