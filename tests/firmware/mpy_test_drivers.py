# The drivers against the datasheets (through the chip models in
# firmware_mpy/sim/models.py, which decode the registers as the datasheets
# define them). Runs under the MicroPython unix port.
import array

from drivers.max30003 import MAX30003
from sim import models
from sim.clock import VirtualClock
from sim.waveform import Waveform
from tests.firmware.mpy_test_app import _ppg_chip, _sim


def _sync(model):
    # Lets the chip model catch up with the clock, as any bus access does.
    models.SimI2C([model]).readfrom_mem_into(model.ADDRESS, 0xFF, bytearray(1))


def _ecg(clock):
    sim = _sim()
    model = models.MAX30003Model(clock, Waveform(sim["ecg"]["file"], sim["ecg"]["rate_hz"], 1))
    cs = models.SimPin(1)
    return MAX30003(models.SimSPI([(cs, model)]), cs), model


def _ecg_streaming(clock):
    # The ECG chip configured at 512 Hz (lead-off at 20) and started.
    chip, model = _ecg(clock)
    chip.configure(512, 20)
    chip.start()
    return chip, model


def _ppg_streaming(clock):
    # The PPG chip configured at 100 Hz and started, with a red and an IR buffer of 64 samples.
    chip, model = _ppg_chip(clock)
    chip.configure(rate_hz=100)
    chip.start()
    return chip, model, array.array("i", bytes(4 * 64)), array.array("i", bytes(4 * 64))


def test_max30003_lead_bias_and_lead_off_threshold_as_the_reference_sets_them():
    clock = VirtualClock()
    chip, model = _ecg(clock)
    chip.configure(512, 20)
    assert model.lead_bias_mohm() == 100  # EN_RBIAS 01, RBIASV 01, RBIASP and RBIASN on
    assert model.dcloff_vth_mv() == 300  # VTH 00: what the driver's comment says
    chip.start()
    out = array.array("i", bytes(4 * 600))
    n = 0
    for _ in range(200):
        clock.sleep_ms(10)
        n += chip.read_into((out,), n, 600 - n)
        if n >= 500:
            break
    assert n >= 500
    # Biased inputs carry the recording, not a rail.
    assert max(out[:n]) < 0x1FFFF and min(out[:n]) > -0x1FFFF, (max(out[:n]), min(out[:n]))


def test_max30003_without_lead_bias_rails():
    # The model's side of the check above: inputs with no bias float to a rail.
    clock = VirtualClock()
    chip, model = _ecg(clock)
    chip.configure(512, 20)
    chip.write_reg(0x10, 0x080000 | (1 << 12))  # EN_ECG, DC lead-off, no bias
    chip.start()
    out = array.array("i", bytes(4 * 64))
    clock.sleep_ms(40)
    n = chip.read_into((out,), 0, 64)
    assert n == 16 and chip.saturated


def test_max30003_bursts_take_what_the_fifo_holds_never_past_it():
    # Polled at uneven intervals, the driver reads every sample exactly once,
    # loses none and never clocks a word out of an empty FIFO (a fixed-size
    # burst would, and would pop any sample arriving meanwhile).
    clock = VirtualClock()
    chip, model = _ecg_streaming(clock)
    out = array.array("i", bytes(4 * 64))
    got = 0
    steps = (3, 7, 30, 1, 12, 28, 5, 20, 2, 9)  # ms; 15 left + 30 ms of samples still fit 32
    for k in range(200):
        clock.sleep_ms(steps[k % len(steps)])
        got += chip.read_into((out,), 0, 64)
        assert chip.lost == 0 and model.lost == 0
    assert model.empty_words_clocked == 0, model.empty_words_clocked
    assert got + model.count == model.index, (got, model.count, model.index)
    assert model.count < 16 and got > 1100  # 2.34 s at 512 Hz: 1198 converted


def test_max30003_rest_under_the_threshold_is_read_to_the_last_sample_never_past_it():
    # After a burst read (whole bursts of 16), what is left under the
    # threshold is read one sample at a time up to the one the chip marks
    # last: the FIFO is then empty, no word was clocked out of an empty
    # FIFO, and every sample the chip converted was read exactly once.
    clock = VirtualClock()
    chip, model = _ecg_streaming(clock)
    out = array.array("i", bytes(4 * 2048))
    n = 0
    bursts = 0
    steps = (3, 40, 7, 30, 1, 12, 28, 5, 20, 2, 9, 45)  # ms
    for k in range(48):
        clock.sleep_ms(steps[k % len(steps)])
        got = chip.read_into((out,), n, len(out) - n)
        n += got
        model._advance()
        left = model.count
        rest = chip.read_rest_into((out,), n, len(out) - n)
        n += rest
        # After a burst, all the rest; with none read (under 16 unread), as
        # far as the last word read said more follow: never past the last.
        assert left < 16 and (rest == left if got else rest in (0, left)), (k, got, rest, left)
        if got:
            bursts += 1
            model._advance()
            assert model.count == 0, model.count
        rest = chip.read_rest_into((out,), n, len(out) - n)  # nothing more: the last one read said so
        assert rest == 0, rest
        assert chip.lost == 0 and model.lost == 0
    assert model.empty_words_clocked == 0, model.empty_words_clocked
    assert bursts >= 20 and n + model.count == model.index, (bursts, n, model.count, model.index)


def test_max30102_exactly_full_fifo_is_read_as_full():
    clock = VirtualClock()
    chip, model, red, ir = _ppg_streaming(clock)
    clock.sleep_ms(320)  # exactly 32 samples at 100 Hz: WR_PTR == RD_PTR, nothing lost yet
    _sync(model)
    assert model.unread() == 32 and model.regs[0x05] == 0
    n = chip.read_into((red, ir), 0, 64)
    assert (n, chip.lost) == (32, 0), (n, chip.lost)
    assert model.unread() == 0 and model.lost == 0
    clock.sleep_ms(100)  # and an empty FIFO is still empty once read
    n = chip.read_into((red, ir), 0, 64)
    assert (n, chip.lost) == (10, 0), (n, chip.lost)
    n = chip.read_into((red, ir), 0, 64)
    assert (n, chip.lost) == (0, 0), (n, chip.lost)


class _BusTimeClock(VirtualClock):
    # A fake of a chip's bus time: each transfer moves the clock by its bits
    # (sim.models.SimI2C charges them before the chip answers), so samples
    # arrive between the driver's pointer read and its FIFO burst.
    def charge_io_us(self, us):
        self.t_us += us


def test_max30102_samples_overwritten_during_a_drain_are_counted_and_never_read_twice():
    # At 100 kHz a whole FIFO's burst takes 17.6 ms: a full FIFO (pointers,
    # then the burst) has 1-2 of its oldest overwritten before the burst
    # pops the first, which clears OVF_COUNTER: the driver counted only what
    # OVF_COUNTER said at the pointer read. And those writes set A_FULL after
    # the status read: the next drain found WR_PTR == RD_PTR with A_FULL set
    # on an empty FIFO and read `room` stale samples (a 10-minute run at
    # esp32 speed: PPG "lost -10", more received than converted).
    clock = _BusTimeClock()
    chip, model = _ppg_chip(clock, bus_hz=100000)
    chip.configure(rate_hz=100)
    chip.start()
    red = array.array("i", bytes(4 * 256))
    ir = array.array("i", bytes(4 * 256))
    held = 0
    reported = 0
    overflows = 0
    for ms in (500, 0, 0, 345, 0, 90, 400, 0, 0, 550, 0, 5):  # (each overflow under OVF_COUNTER's 31)
        clock.sleep_ms(ms)
        lost0 = model.lost
        n = chip.read_into((red, ir), held, min(64, len(red) - held))
        assert chip.lost >= 0, chip.lost  # (never saturated here)
        held += n
        reported += chip.lost
        overflows += model.lost > lost0
        # Exactly: every sample converted is held, still in the FIFO, or
        # counted lost, by the chip and by the driver alike.
        assert held + model.unread() + model.lost == model.index, (ms, held, model.unread(), model.lost, model.index)
        assert reported == model.lost, (ms, reported, model.lost)
    assert overflows >= 3 and model.lost > 40, (overflows, model.lost)
    # And what the driver read is the chip's sequence with the lost ones cut out: no sample twice.
    for k in range(1, held):
        assert (red[k], ir[k]) != (red[k - 1], ir[k - 1]), k


def test_max30102_full_then_partly_drained_stays_counted():
    # A drain cut short by the room left still leaves the pointers right.
    clock = VirtualClock()
    chip, model, red, ir = _ppg_streaming(clock)
    clock.sleep_ms(320)
    assert chip.read_into((red, ir), 0, 20) == 20
    clock.sleep_ms(200)  # 12 left + 20 new: full again, by A_FULL
    _sync(model)
    assert model.unread() == 32 and model.regs[0x05] == 0
    assert (chip.read_into((red, ir), 0, 64), chip.lost) == (32, 0)
    assert model.lost == 0
