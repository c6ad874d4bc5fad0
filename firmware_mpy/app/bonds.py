# Bonds with paired phones, kept in flash so that a phone paired once (LE
# Secure Connections, for the standard services) still reads the board
# after the board restarts. MicroPython's `bluetooth` stack does not keep
# them itself: it asks the application through _IRQ_SET_SECRET (store)
# and _IRQ_GET_SECRET (look up), and BleLink answers from this store.
#
# pulsebridge/bonds.bin, written whole to a temporary file and renamed:
#   "PBB1", count (1 byte), records, CRC-32 of all that (4 bytes, LE);
#   record: secret type, key length, value length (1 byte each), key, value.
# The store is bounded (entries, key and value sizes); when it is full the
# least recently stored secret goes. A file that is torn, too large or
# malformed is ignored as a whole: the phones pair again, nothing worse.
# Provisioning a board for a new patient removes the file.
import os
import struct

from micropython import const

from protocols.link import crc32

_MAGIC = b"PBB1"
MAX_ENTRIES = const(24)  # about 8 phones: 3 secrets each (ours, theirs, subscriptions)
MAX_KEY = const(64)
MAX_VALUE = const(160)
_HEAD = const(5)  # magic and count
_CRC = const(4)
MAX_FILE = const(_HEAD + MAX_ENTRIES * (3 + MAX_KEY + MAX_VALUE) + _CRC)


def parse(buf):
    # Returns [[type, key, value], ...]; raises ValueError naming the fault.
    n = len(buf)
    if n > MAX_FILE:
        raise ValueError("bonds file: %d bytes, more than %d" % (n, MAX_FILE))
    if n < _HEAD + _CRC or bytes(buf[:4]) != _MAGIC:
        raise ValueError("bonds file: not a bonds file")
    body = memoryview(buf)[:n - _CRC]
    if crc32(body) != struct.unpack_from("<I", buf, n - _CRC)[0]:
        raise ValueError("bonds file: CRC mismatch (torn or altered)")
    count = buf[4]
    if count > MAX_ENTRIES:
        raise ValueError("bonds file: %d entries, more than %d" % (count, MAX_ENTRIES))
    out = []
    i = _HEAD
    end = n - _CRC
    for _ in range(count):
        if i + 3 > end:
            raise ValueError("bonds file: truncated record header")
        t, kl, vl = buf[i], buf[i + 1], buf[i + 2]
        if kl > MAX_KEY or vl > MAX_VALUE:
            raise ValueError("bonds file: record larger than allowed")
        i += 3
        if i + kl + vl > end:
            raise ValueError("bonds file: truncated record")
        out.append([t, bytes(buf[i:i + kl]), bytes(buf[i + kl:i + kl + vl])])
        i += kl + vl
    if i != end:
        raise ValueError("bonds file: %d stray bytes after the records" % (end - i))
    return out


def serialise(entries):
    out = bytearray(_MAGIC)
    out.append(len(entries))
    for t, key, value in entries:
        out.append(t)
        out.append(len(key))
        out.append(len(value))
        out += key
        out += value
    out += struct.pack("<I", crc32(out))
    return out


class BondStore:
    def __init__(self, path):
        self.path = path
        self.entries = []
        self.error = ""  # why a file on flash was ignored, for the console
        self.dirty = False
        try:
            with open(path, "rb") as f:
                buf = f.read(MAX_FILE + 1)
        except OSError:
            return  # no bond yet
        try:
            self.entries = parse(buf)
        except ValueError as e:
            self.error = str(e)

    def get(self, sec_type, index, key):
        # The index'th secret of this type when key is None, else the one
        # stored under key; None when there is none.
        if key is not None:
            key = bytes(key)  # the stack may hand a memoryview, valid during the IRQ only
        k = 0
        for t, ek, ev in self.entries:
            if t != sec_type:
                continue
            if key is None:
                if k == index:
                    return ev
                k += 1
            elif ek == key:
                return ev
        return None

    def set(self, sec_type, key, value):
        # Stores (value None: deletes) a secret; False when it is too large
        # (and whatever was stored under that key stays).
        key = bytes(key)
        if value is not None and (len(key) > MAX_KEY or len(value) > MAX_VALUE):
            return False
        for i in range(len(self.entries)):
            e = self.entries[i]
            if e[0] == sec_type and e[1] == key:
                self.entries.pop(i)
                self.dirty = True
                break
        if value is None:
            return True
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.pop(0)  # the least recently stored
        self.entries.append([sec_type, key, bytes(value)])
        self.dirty = True
        return True

    def flush(self):
        # Writes the store if it changed: from the app's loop, never from
        # the IRQ handler. A power cut leaves the old file or the new one.
        # A full or failing flash costs the bonds, never the stream: the
        # next change tries again.
        # (The write apart: flush runs at every loop, and its try and with
        # would put its call frame past the VM's 11 words, on the heap.)
        if self.dirty:
            self._write()

    def _write(self):
        self.dirty = False
        tmp = self.path + ".new"
        try:
            with open(tmp, "wb") as f:
                f.write(serialise(self.entries))
            os.rename(tmp, self.path)
        except OSError as e:
            self.error = "bonds not saved: %s" % (e,)
