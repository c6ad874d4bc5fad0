# The board's GATT table and advertising data (app/link_ble.py), made once
# when the link starts: apart, so that their code (1.3 kB of a board's heap
# as .mpy) leaves RAM after (BleLink.__init__ forgets this module).
#
# Service (UUIDs in protocols/SPEC.md): the data characteristic (notify)
# and the control characteristic (write); beside it Device Information
# (0x180A), Battery (0x180F), Pulse Oximeter (0x1822, PLX Continuous
# Measurement) and Heart Rate (0x180D).
import binascii
import struct

from micropython import const

SERVICE_UUID = "7b3e0001-6c1a-4f5e-9d35-2f0e5a1c9b10"
DATA_UUID = "7b3e0002-6c1a-4f5e-9d35-2f0e5a1c9b10"
CONTROL_UUID = "7b3e0003-6c1a-4f5e-9d35-2f0e5a1c9b10"

_FLAG_READ = const(0x0002)
_FLAG_WRITE_NO_RESPONSE = const(0x0004)
_FLAG_WRITE = const(0x0008)
_FLAG_NOTIFY = const(0x0010)
# Bytes the stack keeps for control writes between two reads: acks are
# about 130 characters as lines, a few per second.
_CONTROL_BUFFER = const(512)
_UUID_DIS = const(0x180A)
_UUID_BATTERY = const(0x180F)
_UUID_PLX = const(0x1822)
_UUID_HRS = const(0x180D)


def register(link, bluetooth, device_id, model, firmware):
    # Registers the services with link._ble and sets link's handles (_h_*);
    # returns the advertising payload and scan response.
    ble = link._ble
    u = bluetooth.UUID
    service = (u(SERVICE_UUID), (
        (u(DATA_UUID), _FLAG_READ | _FLAG_NOTIFY),
        (u(CONTROL_UUID), _FLAG_WRITE | _FLAG_WRITE_NO_RESPONSE),
    ))
    dis = (u(_UUID_DIS), ((u(0x2A29), _FLAG_READ), (u(0x2A24), _FLAG_READ), (u(0x2A25), _FLAG_READ),
                          (u(0x2A26), _FLAG_READ)))
    battery = (u(_UUID_BATTERY), ((u(0x2A19), _FLAG_READ | _FLAG_NOTIFY),))
    plx = (u(_UUID_PLX), ((u(0x2A5F), _FLAG_NOTIFY), (u(0x2A60), _FLAG_READ)))
    hrs = (u(_UUID_HRS), ((u(0x2A37), _FLAG_NOTIFY), (u(0x2A38), _FLAG_READ)))
    ((link._h_data, link._h_ctrl), h_dis, (link._h_battery,), (link._h_plx, h_plx_features),
     (link._h_hr, h_hr_location)) = ble.gatts_register_services((service, dis, battery, plx, hrs))
    ble.gatts_set_buffer(link._h_ctrl, _CONTROL_BUFFER, True)
    for h, value in zip(h_dis, (b"pulsebridge", model.encode(), device_id.encode(), firmware.encode())):
        ble.gatts_write(h, value)
    ble.gatts_write(h_plx_features, b"\x00\x00")  # no optional PLX features
    ble.gatts_write(h_hr_location, b"\x01")  # chest
    return _adv_payload(_uuid128_le(SERVICE_UUID), device_id.encode())


def _uuid128_le(text):
    # A 128-bit UUID as advertised: its 16 bytes, least significant first.
    raw = binascii.unhexlify(text.replace("-", ""))
    out = bytearray(16)
    for i in range(16):
        out[i] = raw[15 - i]
    return bytes(out)


def _adv_payload(uuid_bytes, name):
    # Flags (LE general discoverable, BR/EDR not supported), the 128-bit
    # service UUID and the 16-bit PLX and HRS ones (27 of the 31 bytes); the
    # name goes in the scan response.
    adv = bytearray(b"\x02\x01\x06")
    adv += bytes((len(uuid_bytes) + 1, 0x07)) + uuid_bytes
    adv += b"\x05\x03" + struct.pack("<HH", _UUID_PLX, _UUID_HRS)
    resp = bytes((len(name) + 1, 0x09)) + name
    return bytes(adv), resp
