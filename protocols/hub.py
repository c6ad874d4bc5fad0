# The hub's side of the protocol, sans I/O: opens what boards send (parse,
# key lookup, MAC, payload, replay window) and seals what the hub sends back
# (acks, time requests, commands). The caller owns every byte of I/O and
# decides when a message is durably stored; only then does it commit() the
# message to the replay window and ack() it. Between receive(commit=False)
# and commit(), accept() holds the message's (epoch, seq) as in flight: a
# copy arriving meanwhile is a duplicate, and accept() returns the window
# to store with the message (the window once it is committed); abandon()
# forgets what is in flight when storing failed. A message refused because its
# boot epoch is stale (old_epoch, epoch_rollback) comes with a sealed epoch
# resync in Received.reply, for the caller to send back at once: the board
# then moves its epoch past the newest one seen (SPEC.md, "Epoch resync").

from protocols import cbor, cipher, cose, messages, replay
from protocols.errors import AuthenticationError, ProtocolError, RemoteProtocolError

TYPE_CHECKING = False  # type checkers take this as true; MicroPython has no typing module
if TYPE_CHECKING:
    from collections.abc import Callable

# Verdicts of receive().
ACCEPTED = "accepted"  # authentic and new: store it, then commit and ack
DUPLICATE = "duplicate"  # authentic, seen before: ack again, store nothing
REJECTED = "rejected"  # not to be stored nor forwarded; reason says why


class Received:
    # message: the decoded message (None when it was refused before its
    # payload was read); reply: a sealed downlink message to send back now
    # (an epoch resync), else None.
    def __init__(self, verdict: str, device_id: "str | None", message: "messages.Message | None", raw: bytes,
                 reason: str = "", reply: "bytes | None" = None) -> None:
        self.verdict = verdict
        self.device_id = device_id
        self.message = message
        self.raw = raw
        self.reason = reason
        self.reply = reply

    def __repr__(self) -> str:
        return "Received(%s, %s, %r%s)" % (self.verdict, self.device_id, self.message,
                                           ", " + self.reason if self.reason else "")


class _Device:
    # keys: the device's key, and during a key rotation the next one too. The
    # hub answers with the key the board last used, so acks always verify.
    def __init__(self, device_id: str, keys: "list[bytes]") -> None:
        kid = device_id.encode()
        self.ups = [cose.MacKey(k, kid, cose.AAD_UPLINK) for k in keys]
        self.downs = [cose.MacKey(k, kid, cose.AAD_DOWNLINK) for k in keys]
        self.ciphers = [cipher.SampleCipher(k) for k in keys]
        self.active = 0
        self.window = replay.ReplayWindow()  # what is committed (stored)
        # The window with the messages accepted and not yet committed (None: none in flight).
        self.ahead: "replay.ReplayWindow | None" = None

    @property
    def down(self) -> cose.MacKey:
        return self.downs[self.active]


class Hub:
    # Sample frames come out decrypted (protocols/cipher.py), once their MAC
    # has verified. decode_samples=False: their channels stay undecoded
    # bytes (checked for size): the store needs the header, not the samples.
    # decode_payload, parse: messages.decode_payload and cose.parse (None), or
    # decoders that answer as they do, value or error, for any input (the
    # hub's: agent/fastdecode.py).
    def __init__(self, decode_samples: bool = True,
                 decode_payload: "Callable[..., messages.Message] | None" = None,
                 parse: "Callable[[bytes], cose.Mac0] | None" = None) -> None:
        self.decode_samples = decode_samples
        self.decode_payload = messages.decode_payload if decode_payload is None else decode_payload
        self.parse = cose.parse if parse is None else parse
        self._ackbuf = bytearray(512)
        self._devices: "dict[bytes, _Device]" = {}
        self.rejects: "dict[str, int]" = {}
        self._nonce = 0

    def add_device(self, device_id: str, key: bytes, next_key: "bytes | None" = None) -> None:
        self._devices[device_id.encode()] = _Device(device_id, [key] if next_key is None else [key, next_key])

    def set_keys(self, device_id: str, key: bytes, next_key: "bytes | None" = None) -> None:
        # A rotation begins (next_key) or ends: the replay window is kept.
        dev = self._devices[device_id.encode()]
        fresh = _Device(device_id, [key] if next_key is None else [key, next_key])
        fresh.window = dev.window
        fresh.ahead = dev.ahead
        self._devices[device_id.encode()] = fresh

    def key_in_use(self, device_id: str) -> int:
        """0: the board's frames verify under its key; 1: under the next one."""
        return self._devices[device_id.encode()].active

    def remove_device(self, device_id: str) -> None:
        self._devices.pop(device_id.encode(), None)

    def has_device(self, device_id: str) -> bool:
        return device_id.encode() in self._devices

    def device_ids(self) -> "list[str]":
        return [k.decode() for k in self._devices]

    def set_window(self, device_id: str, epoch: int, top: int, bitmap: int, salt: "bytes | None" = None) -> None:
        dev = self._devices[device_id.encode()]
        w = dev.window
        w.epoch, w.top, w.bitmap, w.salt = epoch, top, bitmap, salt
        dev.ahead = None

    def window(self, device_id: str) -> replay.ReplayWindow:
        return self._devices[device_id.encode()].window

    def _reject(self, raw: bytes, reason: str, device_id: "str | None" = None) -> Received:
        self.rejects[reason] = self.rejects.get(reason, 0) + 1
        return Received(REJECTED, device_id, None, raw, reason)

    def receive(self, raw: bytes, commit: bool = True) -> Received:
        # commit=False leaves the replay window alone: the caller commits
        # after storing (see commit()).
        try:
            msg = self.parse(raw)
        except RemoteProtocolError as e:
            return self._reject(raw, "malformed:" + e.reason)
        dev = self._devices.get(msg.kid)
        device_id = str(msg.kid, "ascii", "replace")
        if dev is None:
            return self._reject(raw, "unknown_device", device_id)
        for i, up in enumerate(dev.ups):
            try:
                up.verify(msg)
            except AuthenticationError:
                continue
            dev.active = i
            break
        else:
            return self._reject(raw, "bad_mac", device_id)
        try:
            m = self.decode_payload(msg.payload, messages.UPLINK_TYPES, self.decode_samples, dev.ciphers[dev.active])
        except RemoteProtocolError as e:
            return self._reject(raw, "malformed:" + e.reason, device_id)
        epoch, seq = m.epoch, m.seq  # type: ignore[attr-defined]
        salt = m.boot_salt if isinstance(m, messages.SampleFrame) else None
        verdict = (dev.ahead or dev.window).check(epoch, seq, salt)
        if verdict == replay.DUPLICATE:
            return Received(DUPLICATE, device_id, m, raw)
        if verdict != replay.FRESH:
            r = self._reject(raw, "replay:" + verdict, device_id)
            r.message = m
            if verdict == replay.OLD_EPOCH or verdict == replay.EPOCH_ROLLBACK:
                r.reply = self.resync(device_id, epoch)
            return r
        if commit:
            dev.window.commit(epoch, seq, salt)
        return Received(ACCEPTED, device_id, m, raw)

    def accept(self, device_id: str, epoch: int, seq: int,
               salt: "bytes | None" = None) -> "tuple[int, int, int, bytes | None]":
        # A message receive(commit=False) found fresh is on its way to the
        # store: held as in flight until commit() (or abandon()). Returns the
        # replay window to store with it: the committed one with every
        # message in flight, this one included.
        dev = self._devices[device_id.encode()]
        if dev.ahead is None:
            dev.ahead = replay.ReplayWindow(*dev.window.state())
        dev.ahead.commit(epoch, seq, salt)
        return dev.ahead.state()

    def abandon(self, device_id: str) -> None:
        # Storing what was in flight failed: only the committed window counts.
        dev = self._devices.get(device_id.encode())
        if dev is not None:
            dev.ahead = None

    def commit(self, device_id: str, epoch: int, seq: int, salt: "bytes | None" = None) -> None:
        # The message is stored: the replay window moves. salt: the boot salt
        # of a sample frame (SampleFrame.boot_salt), else None.
        dev = self._devices[device_id.encode()]
        if epoch >= dev.window.epoch:  # else: an earlier boot's message, stored after the board rebooted
            dev.window.commit(epoch, seq, salt)
        if dev.ahead is not None and dev.ahead.state() == dev.window.state():
            dev.ahead = None  # nothing in flight any more

    def resync(self, device_id: str, refused_epoch: int) -> bytes:
        # The sealed epoch resync for a message of refused_epoch the replay
        # window refused: it names the newest epoch seen from the board.
        dev = self._devices[device_id.encode()]
        newest = (dev.ahead or dev.window).epoch  # what is in flight counts: it is on its way to the store
        return self._seal(device_id, messages.EpochResync(refused_epoch, newest))

    def _seal(self, device_id: str, msg: messages.Message) -> bytes:
        dev = self._devices.get(device_id.encode())
        if dev is None:
            raise ProtocolError("unknown device %s" % device_id, "unknown_device", device_id=device_id)
        return dev.down.seal(messages.encoded(msg, 512))

    def ack(self, device_id: str, epoch: int, seqs: "list[int]") -> "list[bytes]":
        # Sealed acks covering seqs, as few as the range limit allows.
        dev = self._devices.get(device_id.encode())
        if dev is None:
            raise ProtocolError("unknown device %s" % device_id, "unknown_device", device_id=device_id)
        out = []
        ranges = seq_ranges(seqs)
        for i in range(0, len(ranges), messages.MAX_ACK_RANGES):
            w = cbor.Writer(self._ackbuf)
            messages.encode_ack(w, epoch, ranges[i:i + messages.MAX_ACK_RANGES])
            out.append(dev.down.seal(memoryview(self._ackbuf)[:w.pos]))
        return out

    def time_request(self, device_id: str, utc_ms: int) -> "tuple[int, bytes]":
        self._nonce += 1
        return self._nonce, self._seal(device_id, messages.TimeRequest(self._nonce, utc_ms))

    def update_chunk(self, device_id: str, epoch: int, offset: int, bundle: bytes,
                     size: int = messages.MAX_UPDATE_CHUNK) -> bytes:
        # The sealed chunk of a firmware bundle at offset (SPEC.md, Firmware updates).
        return self._seal(device_id, messages.UpdateChunk(epoch, offset, len(bundle),
                                                          bytes(bundle[offset:offset + size])))

    def command(self, device_id: str, epoch: int, nonce: int, name: str) -> bytes:
        return self._seal(device_id, messages.Command(epoch, nonce, name))


def seq_ranges(seqs: "list[int]") -> "list[tuple[int, int]]":
    out: "list[tuple[int, int]]" = []
    for s in sorted(set(seqs)):
        if out and out[-1][1] + 1 == s:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out
