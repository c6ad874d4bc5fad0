# The downlink messages a hub sends all the time, acks (one per frame, two
# a second) and time requests (one a minute), and a firmware update's
# chunks (several a second while one is sent), read in place: no dict, list,
# tuple or bytes copy is built. The shared decoder (protocols.cose.parse,
# messages.decode_payload) builds about 3 kB of objects per ack, which the
# board's GC then spends tens of milliseconds collecting while a sensor
# FIFO fills; and its code (protocols/decode.py) stays out of the board's
# RAM until a rarer message comes.
#
# Only the one deterministic form the hub writes is read here:
#   17([h'A2 01 05 04 <kid>' (our own protected header), {}, payload, tag])
#   payload = {0: 2, 1: VERSION, 2: epoch, 3: [[first, last], ...]}
#          or {0: 3, 1: VERSION, 2: nonce, 3: utc_ms}
#          or {0: 11, 1: VERSION, 2: epoch, 3: offset, 4: total, 5: data}
#             (data: 1 to MAX_UPDATE_CHUNK bytes, offset + len(data) <= total
#             <= MAX_BUNDLE; read where it lies in the message)
# with every head in its shortest form, 1 to MAX_ACK_RANGES ranges, first <=
# last, integers below 2^30 (small ints on a 32-bit port) but utc_ms, which
# is only checked to be an unsigned integer (the board has no use for the
# hub's clock; a 64-bit one on a 32-bit port would be a heap int). Anything else
# (another message type, extension keys, other key orders, larger
# integers) is declined and goes to the shared decoder, which accepts a
# superset and refuses what is wrong: this reader never accepts what that
# one would refuse (tests/firmware/mpy_test_acks.py fuzzes the two against
# each other). Nothing is acted upon before the MAC verifies.
from micropython import const

from protocols import fields

DECLINED = const(0)  # not an ack in the form above: the shared decoder decides
ACKED = const(1)  # an authentic ack: ranges in first/last[:count]
FORGED = const(2)  # a message in the form above whose MAC does not verify
TIME_REQUEST = const(3)  # an authentic time request: its nonce in nonce
UPDATE_CHUNK = const(4)  # an authentic update chunk: epoch, offset, total; its data at data[data_at:data_at + data_len]



class AckReader:
    def __init__(self, mac_key):
        # mac_key: the downlink cose.MacKey of this device.
        self._key = mac_key
        p = mac_key.protected
        self._protected = p
        self.epoch = 0
        self.count = 0
        self.nonce = 0
        self.offset = 0
        self.total = 0
        self.data_at = 0
        self.data_len = 0
        self.first = [0] * fields.MAX_ACK_RANGES
        self.last = [0] * fields.MAX_ACK_RANGES
        self._buf = b""
        self._pos = 0
        self._end = 0
        self._pstart = 0
        self._plen = 0

    def _head(self, major):
        # The value of a head of this major type at _pos in shortest form
        # and below 2^30, moving past it; -1 (and _pos unspecified) if not.
        buf = self._buf
        p = self._pos
        if p >= self._end:
            return -1
        ib = buf[p]
        if ib >> 5 != major:
            return -1
        ai = ib & 0x1F
        if ai < 24:
            self._pos = p + 1
            return ai
        if ai == 24:
            if p + 2 > self._end:
                return -1
            v = buf[p + 1]
            if v < 24:
                return -1
            self._pos = p + 2
            return v
        if ai == 25:
            if p + 3 > self._end:
                return -1
            v = (buf[p + 1] << 8) | buf[p + 2]
            if v < 0x100:
                return -1
            self._pos = p + 3
            return v
        if ai == 26:
            if p + 5 > self._end or buf[p + 1] > 0x3F:
                return -1
            v = (buf[p + 1] << 24) | (buf[p + 2] << 16) | (buf[p + 3] << 8) | buf[p + 4]
            if v < 0x10000:
                return -1
            self._pos = p + 5
            return v
        return -1

    def _skip_uint(self):
        # Past an unsigned integer's head in shortest form, of any size up to
        # 2^64 - 1, its value never built; False (and _pos unspecified) if
        # there is none.
        buf = self._buf
        p = self._pos
        if p >= self._end:
            return False
        ib = buf[p]
        if ib >> 5 != 0 or (ib & 0x1F) < 26:
            return self._head(0) >= 0
        if ib == 0x1A:  # 4 bytes: at least 2^16
            if p + 5 > self._end or not (buf[p + 1] | buf[p + 2]):
                return False
            self._pos = p + 5
            return True
        if ib != 0x1B or p + 9 > self._end:
            return False
        if not (buf[p + 1] | buf[p + 2] | buf[p + 3] | buf[p + 4]):
            return False  # 8 bytes: at least 2^32
        self._pos = p + 9
        return True

    # An ack comes twice a second: read() and its pieces keep within the
    # VM's 11 words of frame (locals and stack), so none takes its frame
    # from the heap (README, "call frames"); what they share is kept here
    # (_buf, _pos, _end; the payload's _pstart and _plen).
    def read(self, data, n=-1):
        # data[:n] (n < 0: all of it): one downlink message, not yet
        # authenticated. Returns DECLINED, ACKED (epoch, count, first, last
        # hold the ack), TIME_REQUEST (nonce holds its nonce), UPDATE_CHUNK
        # (epoch, offset, total, data_at, data_len) or FORGED.
        self._buf = data
        self._pos = 0
        self._end = len(data) if n < 0 else n
        if not self._envelope():
            return DECLINED
        kind = self._kind()
        if kind == fields.T_ACK:
            return self._ack()
        if kind == fields.T_TIME_REQUEST:
            return self._time_request()
        if kind == fields.T_UPDATE_CHUNK:
            return self._chunk()
        return DECLINED

    def _envelope(self):
        # The COSE_Mac0 around the payload, as the hub writes it: then the
        # payload at _pstart (_plen bytes, _end: its end) followed by the tag.
        if self._head(6) != 17 or self._head(4) != 4:
            return False
        if self._head(2) != len(self._protected) or not self._protected_read():
            return False
        if self._head(5) != 0:
            return False
        plen = self._head(2)
        if plen < 0:
            return False
        pend = self._pos + plen
        if pend + 34 != self._end or self._buf[pend] != 0x58 or self._buf[pend + 1] != 32:
            return False
        self._pstart = self._pos
        self._plen = plen
        self._end = pend
        return True

    def _protected_read(self):
        # Our own protected header's bytes at _pos, moving past them.
        prot = self._protected
        p = self._pos
        k = len(prot)
        if p + k > self._end:
            return False
        buf = self._buf
        for i in range(k):
            if buf[p + i] != prot[i]:
                return False
        self._pos = p + k
        return True

    def _kind(self):
        # The payload's message type after its map head and type key, the
        # version key and value and key 2 (-1 if any is not as the hub writes it).
        nfields = self._head(5)
        if self._head(0) != 0:
            return -1
        kind = self._head(0)
        if nfields != (6 if kind == fields.T_UPDATE_CHUNK else 4):
            return -1
        if self._head(0) != 1 or self._head(0) != fields.VERSION or self._head(0) != 2:
            return -1
        return kind

    def _verified(self):
        # Whether the tag after the payload is its MAC.
        return self._key.verify_at(self._buf, self._pstart, self._plen, self._end + 2)

    def _ack(self):
        epoch = self._head(0)
        if epoch < 0 or self._head(0) != 3:
            return DECLINED
        count = self._head(4)
        if not 0 < count <= fields.MAX_ACK_RANGES:
            return DECLINED
        for i in range(count):
            if not self._range(i):
                return DECLINED
        if self._pos != self._end:
            return DECLINED
        if not self._verified():
            return FORGED
        self.epoch = epoch
        self.count = count
        return ACKED

    def _range(self, i):
        # Range i of an ack, [first, last], into first[i] and last[i].
        if self._head(4) != 2:
            return False
        a = self._head(0)
        b = self._head(0)
        if a < 0 or b < a:
            return False
        self.first[i] = a
        self.last[i] = b
        return True

    def _time_request(self):
        nonce = self._head(0)
        if nonce < 0 or self._head(0) != 3 or not self._skip_uint() or self._pos != self._end:
            return DECLINED
        if not self._verified():
            return FORGED
        self.nonce = nonce
        return TIME_REQUEST

    def _chunk(self):
        # The rest of an update chunk's payload, from its epoch on.
        epoch = self._head(0)
        if epoch < 0 or self._head(0) != 3:
            return DECLINED
        offset = self._head(0)
        if offset < 0 or self._head(0) != 4:
            return DECLINED
        total = self._head(0)
        if not 0 <= total <= fields.MAX_BUNDLE or self._head(0) != 5:
            return DECLINED
        n = self._head(2)
        if not 0 < n <= fields.MAX_UPDATE_CHUNK or self._pos + n != self._end or offset + n > total:
            return DECLINED
        if not self._verified():
            return FORGED
        self.epoch = epoch
        self.offset = offset
        self.total = total
        self.data_at = self._pos
        self.data_len = n
        return UPDATE_CHUNK
