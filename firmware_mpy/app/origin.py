# Origin proof, the board's side (protocols/origin.py, SPEC.md "Origin
# proof"): the digest of each sample frame goes into a preallocated list;
# every every_ms (or once MAX_ENTRIES wait) the list becomes a checkpoint
# MACed under the origin key, which only this board and the backend hold.
# Per frame: one SHA-256 over the payload into preallocated state (viper,
# protocols/_sha256.py) and 16 bytes copied; nothing allocated. Per
# checkpoint: built in preallocated buffers, put in the outbox like a frame
# (so it is resent until the hub acknowledges it).
import array

from micropython import const

from app import ticks
from protocols import _sha256, cbor, cipher, cose, fields, link, origin

PATH = "pulsebridge/origin.key"  # 32 raw bytes, written at provisioning
_N = const(32)  # origin.MAX_ENTRIES
_DIGEST = const(16)  # origin.DIGEST_SIZE
_HEADROOM = const(8)
# The whole message as the outbox keeps it: 32 seqs of at most 5 bytes, 32
# digests, salt, wrapped key and heads (~750 B), the checkpoint's COSE_Mac0
# (~60 B) and the outer message's (~80 B).
WORST_BYTES = const(1000)


def load_key():
    # The origin key, or None: a board provisioned before origin proof
    # streams as before (its frames are then not provable).
    try:
        with open(PATH, "rb") as f:
            key = f.read(33)
    except OSError:
        return None
    return key if len(key) == 32 else None


class OriginLog:
    def __init__(self, origin_key, kid, device_key, boot_salt, every_ms, now_ms, up):
        # up: the device's uplink cose.MacKey, which seals each checkpoint.
        self.mac = cose.MacKey(origin_key, kid, origin.AAD_ORIGIN)
        boot_key = cipher.derive_key(device_key, boot_salt)
        self.salt = bytes(boot_salt)
        self.wrapped = origin.xor32(boot_key, origin.key_pad(origin_key, boot_salt))
        self.every_ms = every_ms
        self.due_ms = ticks.add(now_ms, every_ms)
        self.seqs = array.array("I", bytes(4 * _N))
        self.digests = bytearray(_N * _DIGEST)
        self.n = 0
        self.index = 0  # checkpoints made this boot
        self.unlisted = 0
        self._st = array.array("I", bytes(32))
        self._blk = bytearray(64)
        self._out = bytearray(32)
        self.up = up
        self.between = None  # called between a checkpoint's pieces (the app reads its FIFOs)
        self._base = 0  # (checkpoint_into: where the message starts)

    # add() runs at every frame: it and _list keep within the VM's 11 words
    # of frame, so neither takes its frame from the heap (README, "call frames").
    def add(self, seq, buf, start, n):
        # A sample frame sealed with payload buf[start:start+n].
        if self.n >= _N:  # not expected (due() leaves _HEADROOM): the frame shows as unproven
            self.unlisted += 1
            return
        _sha256.sha256_into(self, buf, start, n)  # into self._out, hashed in self._st and self._blk
        self._list(seq)

    def _list(self, seq):
        # The digest just made (its first _DIGEST bytes), with its seq.
        k = self.n
        link.copy_into(self.digests, k * _DIGEST, self._out, 0, _DIGEST)
        self.seqs[k] = seq
        self.n = k + 1

    def due(self, now_ms):
        # _HEADROOM below full: a loop iteration may frame a few windows
        # before it gets here (an epoch resync re-seals one a loop).
        return self.n >= _N - _HEADROOM or (self.n > 0 and ticks.diff(now_ms, self.due_ms) >= 0)

    def forget(self):
        # An epoch resync: the frames listed so far are sent again under new
        # seqs (each added again as it is re-sealed).
        self.n = 0

    # A checkpoint is made every every_ms: checkpoint_into and its pieces
    # keep within the VM's 11 words of frame, so none takes its frame from
    # the heap (README, "call frames"); up and between are attributes.
    def checkpoint_into(self, w, epoch, seq, now_ms):
        # Writes the type 10 message, sealed under the device key (self.up,
        # the app's uplink cose.MacKey), at w.buf[w.pos:] (an outbox region
        # of WORST_BYTES, w.end its end): the checkpoint COSE_Mac0 is made
        # where it stays, inside the outer payload (no copy, no view, nothing
        # allocated). The list then starts again. self.between: called after
        # the list and after its MAC (the board reads its FIFOs there: 15-25
        # ms at an ESP32's speed in all); it must leave w alone.
        self._base = w.pos
        self._outer_head(w, epoch, seq)
        self._inner_into(w, epoch)
        self.up.seal_written(w, self._base + self.up.payload_offset, self._base)
        self.n = 0
        self.index += 1
        self.due_ms = ticks.add(now_ms, self.every_ms)

    def _outer_head(self, w, epoch, seq):
        w.pos = self._base + self.up.payload_offset
        w.map(5)
        w.uint(0)
        w.uint(fields.T_ORIGIN)
        w.uint(1)
        w.uint(fields.VERSION)
        w.uint(2)
        w.uint(epoch)
        w.uint(3)
        w.uint(seq)
        w.uint(4)

    def _inner_into(self, w, epoch):
        # The checkpoint, sealed under the origin key, as the byte string's content.
        ibase = w.pos + cbor.BSTR_HEAD_MAX
        w.pos = ibase + self.mac.payload_offset
        self._payload(w, epoch)
        if self.between is not None:
            self.between()
        self.mac.seal_written(w, ibase + self.mac.payload_offset, ibase)
        if self.between is not None:
            self.between()
        self._inner_head(w, ibase)

    def _payload(self, w, epoch):
        origin.encode_checkpoint_head(w, epoch, self.index, self.salt, self.wrapped, self.n)
        origin.encode_checkpoint_list(w, self.seqs, self.digests, self.n)

    def _inner_head(self, w, ibase):
        # The byte string's head before the checkpoint at ibase, which ends at w.pos.
        n = w.pos - ibase
        w.pos = ibase - cbor.BSTR_HEAD_MAX
        w.bstr_written(ibase, n)
