# Firmware update on the board (SPEC.md, Firmware updates: install).
# Imported only when an update starts (the first chunk) or on a trial boot:
# a board that streams keeps none of this in RAM.
#
# Slots: the firmware runs from directory "a" or "b" of the flash root
# (boot.py chooses); pulsebridge/ holds the state, each file written whole
# (temporary file, then renamed):
#   boot.ok     the confirmed slot          boot.next  the slot to try once
#   boot.trial  the slot on trial now (boot.py writes it as it consumes boot.next)
#   boot.rolled_back  a slot that was on trial and reset unconfirmed (boot.py), until reported
#   floor       the anti-rollback floor     vendor.keys  the vendor keys (32 B each)
# In the spare slot: .part (the bundle as received: its size is where a cut
# resumes), .total, then the bundle's files, .release ("version floor name")
# and .next_keys.
#
# Install, one piece per loop iteration (step()): receive chunks in order
# (read in place: app/acks.py; .part kept open while they come) and, while
# they come, load the check's code, a module per iteration, then read and
# check the header, in pieces, as soon as it is in (a bundle this board
# refuses from its header alone, an unknown key say, is refused then, not
# after the whole bundle came) -> signature in slices (protocols/ed25519.py)
# -> copy each file out of .part, hashing it -> boot.next -> once the outbox
# is acknowledged (bounded), reboot. Each piece stays well inside the time the fastest
# sensor FIFO takes to fill (62 ms at 512 Hz on an ESP32): at that speed
# the check's code loaded in one piece at the first chunk took 0.65 s. Trial: confirmed (boot.ok) after
# _CONFIRM_MS of acknowledged streaming; not confirmed within _TRIAL_MAX_MS
# -> reboot, and boot.py goes back to boot.ok.
import gc
import hashlib
import os
import sys

from micropython import const

from app import ticks
from protocols import messages

DIR = "pulsebridge/"
OK = DIR + "boot.ok"
NEXT = DIR + "boot.next"
TRIAL = DIR + "boot.trial"
ROLLED_BACK = DIR + "boot.rolled_back"
FLOOR = DIR + "floor"
KEYS = DIR + "vendor.keys"
PART = ".part"
TOTAL = ".total"
RELEASE = ".release"
NEXT_KEYS = ".next_keys"
TARGET = "esp32"
_COPY = const(512)  # bytes of a file copied (and hashed) per loop iteration
_CONFIRM_MS = const(60000)  # acknowledged streaming before a new version is kept
_ACK_FRESH_MS = const(10000)  # ...with an ack at most this old
_TRIAL_MAX_MS = const(180000)  # a trial not confirmed by then is rolled back (a reboot)
_OOM_TRIES = const(20)  # pieces of an update that may find no memory (each retried) before it is given up
_OOM_MS = const(10000)  # ... and for at least this long: right after the last chunk a busy heap recovers in time
_REPEAT_MS = const(10000)  # an outcome's report said again this often...
_REPEATS = const(6)  # ...this many times in all (a minute: the hub's port reopened meanwhile)
_DRAIN_MAX_MS = const(10000)  # waiting for the outbox's acks before the reboot, at most

RECEIVING = const(0)  # (an install's states in their order)
LOADING = const(1)
HEADER = const(2)
SIGNATURE = const(3)
FILES = const(4)
REBOOT = const(5)
TRIAL_RUN = const(6)
IDLE = const(7)
# The check's code, loaded one module per loop iteration once the bundle is
# in (ed25519 brings our SHA-512 where hashlib has none; the header is read
# with cbor_items, which cbor.decode would load in the middle of that
# piece otherwise): a chip that keeps
# them frozen in flash loads each in microseconds; from a file system
# (the simulation, a board running .mpy files) each takes 20-40 ms.
_LOAD = ("protocols.cbor_items", "protocols.ed25519", "protocols.bundle")
# The header's pieces (_header()), one per loop iteration.
_H_SIZE = const(0)  # its size from its first bytes, then (once it is all in) what was received flushed
_H_COLLECT = const(1)
_H_READ = const(2)
_H_SPLIT = const(3)
_H_MANIFEST = const(4)
_H_CHECK = const(5)
_PREFIX = const(7)  # the bytes that give the header's size (bundle.header_size)


class _NotLoaded(Exception):
    # Stands for bundle.BundleError until protocols/bundle.py is loaded.
    reason = ""


def read(path, default=None):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return default


def write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return -1


def rmtree(path):
    try:
        entries = list(os.ilistdir(path))
    except OSError:
        return
    for e in entries:
        p = path + "/" + e[0]
        if e[1] == 0x4000:
            rmtree(p)
            os.rmdir(p)
        else:
            os.remove(p)


def makedirs(path, between=None):
    # The directories of path (a file's); between(): called after each.
    at = 0
    while True:
        at = path.find("/", at + 1)
        if at < 0:
            return
        try:
            os.mkdir(path[:at])
        except OSError:
            pass
        if between is not None:
            between()


def slot_text(path):
    s = read(path)
    return s.decode().strip() if s else None


def running_slot():
    return slot_text(TRIAL) or slot_text(OK) or "a"


def release(slot):
    # (version, floor, name) of a slot's release; the factory slot has none: (0, 0, "").
    s = read(slot + "/" + RELEASE)
    if not s:
        return 0, 0, ""
    v, f, name = s.decode().split(" ", 2)
    return int(v), int(f), name


def vendor_keys():
    raw = read(KEYS, b"")
    return [raw[i:i + 32] for i in range(0, len(raw) - 31, 32)]


class Updater:
    def __init__(self, app, now):
        self.app = app
        self.slot = running_slot()
        self.spare = "b" if self.slot == "a" else "a"
        self.state = IDLE
        self.since_ms = now
        self.total = 0
        self.files = None
        self.gen = None
        self.signed = (b"", b"", b"")  # (manifest, signature, vendor key) while the signature is checked
        self.src = None  # while the files are copied: the bundle's .part, and the file being written
        self.dst = None
        self.buf = bytearray(0)
        self.pending = None  # (offset, state) not yet taken by the link
        self.final = None  # an outcome (confirmed, rolled back) to say again at final_at
        self.final_at = 0
        self.repeats = 0
        self.oom = 0  # pieces that found no memory
        self.oom_since = 0  # when the first of them did (board ms)
        self.part = None  # the spare slot's .part, open for appending while chunks come
        self.have = 0  # bytes in it
        self.loaded = 0  # modules of _LOAD loaded
        self.bundle_error = _NotLoaded
        self.head_piece = _H_SIZE
        self.prefix = None  # the bundle's first _PREFIX bytes, kept from its first chunk
        self.head_need = 0  # the header's size in bytes, once its first bytes are read
        self.head_ok = False  # the header is checked (while receiving, or after)
        self.head_later = False  # no room for its check while chunks came: it runs after the last
        self.refused = None  # (total, state) of the bundle last refused: its late chunks are answered so
        if slot_text(TRIAL) == self.slot:
            self.state = TRIAL_RUN
            self.first_ack_ms = None
        back = slot_text(ROLLED_BACK)
        if back is not None:  # (boot.py) the version in slot `back` never confirmed itself
            app.board.console("pulsebridge: the update in slot %s was rolled back" % back)
            # Sent from the loop (step()); an outcome's offset is its release's version (the
            # hub tells an earlier update's, said again, from its push's).
            self.pending = (release(back)[0], "rolled_back")

    def report(self, offset, text):
        # The latest state only is kept until the link takes it: a state the
        # link had no room for (busy with a frame) goes at a later loop, so
        # the hub is never left waiting on one that was dropped.
        self.pending = (offset, text)
        self.flush()

    def flush(self):
        # The pending state, if the link takes it now (the seq used only then).
        p = self.pending
        if p is None:
            return
        a = self.app
        if a.link.connected and a._send_small(messages.UpdateState(a.epoch, a.seq, p[0], p[1])):
            a.seq += 1
            self.pending = None
            if p[1] in ("confirmed", "rolled_back"):
                # An outcome is said again every _REPEAT_MS, _REPEATS times: a report
                # is not resent as frames are, and one sent while no hub session read
                # the link (a serial port reopened after the boot) is lost.
                self.repeats += 1
                if self.repeats < _REPEATS:
                    self.final = p
                    self.final_at = ticks.add(a.board.ticks_ms(), _REPEAT_MS)
                else:
                    self.final = None
                    if p[1] == "rolled_back":
                        remove(ROLLED_BACK)  # said

    # ---- receiving (a chunk from the hub, authenticated by the downlink key) ----
    def chunk(self, offset, total, buf, at, n):
        # Bytes [offset, offset + n) of a bundle of `total` bytes, at buf[at:at + n].
        p = self.pending
        if p is not None and p[1] in ("confirmed", "rolled_back"):
            # An outcome not said yet (a rollback found at boot) answers the
            # hub's chunks until the link takes it: this may be the rolled
            # back bundle's last chunk, sent again by a hub that never heard
            # it installed (not a new bundle to receive).
            self.flush()
            return
        if self.state == TRIAL_RUN:
            self.report(0, "refused:on_trial")  # one update at a time: this one is confirmed first
            return
        if self.state not in (IDLE, RECEIVING):
            self.report(total, self._state_text())  # still checking or installing what it has
            return
        r = self.refused
        if r is not None and offset and total == r[0]:
            # The chunks the hub sent before it heard the refusal (its window):
            # the refusal again, not a new bundle begun, nor the refusal
            # replaced by a "receiving" before the link took it.
            self.report(0, r[1])
            return
        self.refused = None
        part = self.part
        if part is None or total != self.total:
            part = self._open_part(total, offset)
            if part is None:  # a chunk past the start of a bundle this board holds nothing of: from the start
                self.report(0, "receiving")
                return
        self.state = RECEIVING
        self.total = total
        have = self.have
        if offset == have and have < total:
            if have == 0:
                self.prefix = bytes(buf[at:at + min(n, _PREFIX)])  # (else read back from .part)
            part.write(memoryview(buf)[at:at + n])
            have += n
            self.have = have
        if have >= total:  # (also a whole bundle received before a reset: checked again from its header)
            self._close_part()
            # What of the header's check is left (most often none: it ran while the chunks came).
            self.state = SIGNATURE if self.head_ok else HEADER if self.loaded == len(_LOAD) else LOADING
            self.report(have, "verifying")
        else:
            # At every chunk: a hub that may have one only in flight (BLE: the
            # control characteristic's 512 bytes) sends the next at once; while
            # the link is busy the reports coalesce (report()). Not taken: the
            # hub resumes from what this board holds.
            self.report(have, "receiving")

    def _open_part(self, total, offset):
        # The spare slot's .part, opened for appending: what an earlier boot
        # received of this bundle (its size says how much), or a new one if
        # the chunk is its first (offset 0; else None, nothing made).
        # The FIFOs that ask are read between the file operations (tens of
        # ms each on a chip's flash).
        self._close_part()
        part = self.spare + "/" + PART
        have = size(part)
        if have < 0 or read(self.spare + "/" + TOTAL) != b"%d" % total:
            if offset:
                return None
            # A new bundle: the spare slot is cleared of whatever it held,
            # boot.rolled_back with it (said once already: chunk()), or this
            # bundle's trial boot would say that rollback again, as its own.
            # (The repeats in RAM go on: their version is the earlier one's.)
            remove(ROLLED_BACK)
            fifos = self.app._read_fifos
            fifos()
            rmtree(self.spare)
            fifos()
            try:
                os.mkdir(self.spare)
            except OSError:
                pass
            fifos()
            write(self.spare + "/" + TOTAL, b"%d" % total)  # (.part is made after it: a cut between leaves none)
            fifos()
            self.part = f = open(part, "wb")
            self.have = 0
            return f
        self.part = f = open(part, "ab")
        self.have = have
        return f

    def _close_part(self):
        if self.part is not None:
            self.part.close()
            self.part = None

    def _state_text(self):
        return "installed" if self.state == REBOOT else "verifying"

    def _refuse(self, reason, why=""):
        self._close_part()
        for f in (self.src, self.dst):
            if f is not None:
                f.close()
        self.src = self.dst = None
        rmtree(self.spare)  # nothing of the refused bundle stays; the running version streams on
        self.state = IDLE
        self.head_ok = False
        self.head_later = False
        self.signed = (b"", b"", b"")  # nothing of the refused bundle's check kept
        self.gen = None
        self.prefix = None
        self.head_need = 0
        self.head_piece = _H_SIZE
        self.refused = (self.total, "refused:" + reason)
        self.app.board.console("pulsebridge: update refused (%s): %s" % (reason, why))
        self.report(0, "refused:" + reason)

    # ---- one piece per loop iteration; False once nothing is left to do ----
    def step(self, now):
        if self.final is not None and self.pending is None and ticks.diff(now, self.final_at) >= 0:
            self.pending = self.final
        self.flush()
        s = self.state
        try:
            if s == RECEIVING:
                if not (self.head_ok or self.head_later):  # the header's check, a piece per loop while chunks come
                    if self.loaded < len(_LOAD):
                        self._load()
                    else:
                        self._header()
            elif s == LOADING:
                self._load()
            elif s == HEADER:
                self._header()
            elif s == SIGNATURE:
                gen = self.gen
                if gen is None:  # (its first slice; after a MemoryError: the check starts over)
                    manifest, signature, key = self.signed
                    self.gen = sys.modules["protocols.bundle"].signature_steps(manifest, signature, key)
                    return True
                try:
                    next(gen)
                except StopIteration:
                    self.signed = (b"", b"", b"")
                    self.gen = None
                    self.state = FILES
                    self.files_at = 0
                    self.src = None
                    self.dst = None
                    self.finish = 0
            elif s == FILES:
                self._copy()
            elif s == REBOOT:
                if self.app.outbox.depth() == 0 or ticks.diff(now, self.since_ms) >= _DRAIN_MAX_MS:
                    self.app.board.console("pulsebridge: update installed in slot %s: rebooting on trial"
                                           % self.spare)
                    reboot(self.app.board)
            elif s == TRIAL_RUN:
                return self._trial(now)
        except self.bundle_error as e:
            self._refuse(e.reason, str(e))
        except MemoryError as e:
            # The header (a few kB) or the signature's numbers found no
            # room: the same piece again next loop after a collection; a
            # heap that never has room for a piece (_OOM_TRIES failures in
            # a row over at least _OOM_MS: an update has hundreds of pieces,
            # and a busy heap may fail any one now and then, or several for
            # a moment) ends the update, saying so. A
            # generator that raised is over, its next() ending as if the
            # signature held: the signature's check starts over.
            if s == SIGNATURE:
                self.gen = None
            gc.collect()
            if s == RECEIVING:
                # The header's early check (its modules, its one 8 kB block)
                # found no room while chunks come: it is only there to refuse
                # a bundle sooner, so it waits for the last chunk and runs
                # then, as the whole check did before, never a refusal here.
                self.head_later = True
                return True
            if self.oom == 0:
                self.oom_since = now
            self.oom += 1
            if self.oom > _OOM_TRIES and ticks.diff(now, self.oom_since) >= _OOM_MS:
                import micropython

                micropython.mem_info()  # (the console: the heap's state, for the technician)
                self._refuse("no_memory", "no room for the update's work %d times in a row (in state %d: %s)"
                             % (self.oom, s, e))
            return True
        self.oom = 0
        return self.state != IDLE or self.pending is not None or self.final is not None

    def _load(self):
        # The next module of the check's code.
        name = _LOAD[self.loaded]
        __import__(name)
        self.loaded += 1
        if self.loaded == len(_LOAD):
            self.bundle_error = sys.modules[name].BundleError
            self.head_piece = _H_SIZE
            if self.state == LOADING:  # (while receiving, the state stays)
                self.state = HEADER

    def _header(self):
        # The header (a few kB), read and checked in pieces; while chunks
        # come, once it is all in.
        bundle = sys.modules["protocols.bundle"]  # (_load)
        piece = self.head_piece
        if piece == _H_SIZE:
            if self.head_need == 0:
                if self.have < min(_PREFIX, self.total):
                    return
                prefix = self.prefix
                if prefix is None:  # (received before a reboot)
                    with open(self.spare + "/" + PART, "rb") as f:
                        prefix = f.read(_PREFIX)
                self.head_need = min(bundle.header_size(prefix), self.total)
                return
            if self.have < self.head_need:
                return  # not all in yet
            if self.part is not None:
                self.part.flush()  # what came so far, readable through another file object (a chip's file system)
        elif piece == _H_COLLECT:
            gc.collect()  # the header in one block
        elif piece == _H_READ:
            with open(self.spare + "/" + PART, "rb") as f:
                self.head = f.read(self.head_need)
        elif piece == _H_SPLIT:
            self.head = bundle.read_header(self.head)  # (manifest, signature, data_at)
        elif piece == _H_MANIFEST:
            manifest = self.head[0]
            self.manifest = bundle.parse_manifest(manifest, self.app._read_fifos)
        else:
            manifest, signature, self.data_at = self.head
            m = self.manifest
            version, _, _ = release(self.slot)
            floor = read(FLOOR)
            key = bundle.check_manifest(m, vendor_keys(), version, int(floor) if floor else 0,
                                        self.app.cfg.get("target", TARGET))
            if self.data_at + m.size() != self.total:  # shorter: cut; longer: bytes after its files
                raise self.bundle_error("the bundle is %d bytes, its header and files %d" % (
                    self.total, self.data_at + m.size()), "truncated" if self.total < self.data_at + m.size()
                    else "malformed")
            self.signed = (manifest, signature, key)
            self.head = None  # (kept until here: a MemoryError above runs this piece again)
            self.head_ok = True
            if self.state == HEADER:  # (while receiving, the state stays until the last chunk)
                self.state = SIGNATURE  # (its generator made at the next step)
        self.head_piece = piece + 1

    def _copy(self):
        # One file operation: open the bundle, open the next file, copy and
        # hash a piece of it (closing and checking it at its end), or one of
        # the closing writes. On a chip a file's creation or a flash write can
        # take tens of ms (an erase): two in one loop iteration would let the
        # fastest sensor FIFO fill.
        if self.src is None:
            self.src = open(self.spare + "/" + PART, "rb")
            self.src.seek(self.data_at)
            self.buf = bytearray(_COPY)
            return
        files = self.manifest.files
        if self.dst is None:
            if self.files_at < len(files):
                path, n, _ = files[self.files_at]
                full = self.spare + "/" + path
                fifos = self.app._read_fifos
                fifos()
                makedirs(full, fifos)
                fifos()
                self.hash = hashlib.sha256()  # (before the file: a MemoryError here leaves dst None, this piece again)
                self.dst = open(full, "wb")
                self.left = n
            else:
                self._finish()
            return
        n = min(self.left, _COPY)
        mv = memoryview(self.buf)[:n]
        if self.src.readinto(mv) != n:
            raise self.bundle_error("the bundle ends inside a file", "truncated")
        self.dst.write(mv)
        self.hash.update(mv)
        self.left -= n
        if self.left:
            return
        self.dst.close()
        self.dst = None
        path, _, digest = files[self.files_at]
        if self.hash.digest() != digest:
            raise self.bundle_error("%s does not match the manifest" % path, "hash_mismatch")
        self.files_at += 1

    def _finish(self):
        # The files are in: the closing writes, one per call, boot.next last.
        m = self.manifest
        k = self.finish
        self.finish = k + 1
        if k == 0:
            src = self.src
            if src is not None:
                src.close()  # (closed, kept: _copy comes here while src is set)
            remove(self.spare + "/" + PART)
        elif k == 1:
            remove(self.spare + "/" + TOTAL)
        elif k == 2:
            write(self.spare + "/" + RELEASE, ("%d %d %s" % (m.version, m.min_version, m.name)).encode())
        elif k == 3:
            if m.next_keys:
                write(self.spare + "/" + NEXT_KEYS, b"".join(m.next_keys))
        else:
            write(NEXT, self.spare.encode())
            self.state = REBOOT
            self.since_ms = self.app.board.ticks_ms()
            self.app.checkpoint_now()  # the frames since the last checkpoint: provable, drained with the rest
            self.report(self.total, "installed")

    # ---- a trial boot ----
    def _trial(self, now):
        acked = self.app.acked_ms
        if acked is not None and self.first_ack_ms is None and ticks.diff(acked, self.since_ms) >= 0:
            self.first_ack_ms = acked
        if (self.first_ack_ms is not None and ticks.diff(now, self.first_ack_ms) >= _CONFIRM_MS
                and ticks.diff(now, acked) <= _ACK_FRESH_MS):
            confirm(self.slot)
            self.app.board.console("pulsebridge: update in slot %s confirmed" % self.slot)
            self.report(release(self.slot)[0], "confirmed")
            self.state = IDLE
            return True  # (its report said again: step())
        if ticks.diff(now, self.since_ms) >= _TRIAL_MAX_MS:
            self.app.board.console("pulsebridge: slot %s streamed without acks: rolling back" % self.slot)
            reboot(self.app.board)  # boot.trial is not boot.ok: boot.py goes back
        return True


def confirm(slot):
    # The trial slot becomes the one that boots; its floor and key set are
    # taken now (a release that rolls back leaves them as they were).
    _, floor, _ = release(slot)
    old = read(FLOOR)
    if floor > (int(old) if old else 0):
        write(FLOOR, b"%d" % floor)
    keys = read(slot + "/" + NEXT_KEYS)
    if keys:
        write(KEYS, keys)
    write(OK, slot.encode())
    remove(TRIAL)


def reboot(board):
    r = getattr(board, "reboot", None)
    if r is not None:
        r()
    import machine

    machine.reset()
