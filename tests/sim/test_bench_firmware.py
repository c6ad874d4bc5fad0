# bench firmware end to end: the firmware under micropython, its link served
# by the benchmark's hub, the figures printed.
import json

import pytest

from agent.dev import bench


@pytest.mark.micropython
@pytest.mark.parametrize("link", ["serial", "ble"])
def test_the_firmware_benchmark_at_host_speed_delivers_its_frames_to_the_hub(
        micropython: str, link: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Over serial at host speed the board wrote its frames to its own stdout,
    # not to the benchmark's hub: the report line came after frame bytes and
    # the benchmark ended in a JSONDecodeError.
    assert bench.main("firmware", 0.1, True, "host", link) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["link"] == link and r["gaps"] == 0 and r["hub_acks"] > 0, r
    for name, s in r["streams"].items():
        assert s["frames"] >= 4 and s["lost"] == 0, (name, s)
    # Call frames are allocations too (allocator time on the chip): the
    # figure the report leads with holds them and the garbage both.
    assert r["alloc_bytes_per_s"] >= r["frame_bytes_per_s"] + r["garbage_bytes_per_s"] - 1e-6, r
    assert r["ble_enomem"] >= 0 if link == "ble" else r["ble_enomem"] == 0, r
    assert any("bytes/s from the firmware's heap" in line for line in bench.firmware_report(r)), r


@pytest.mark.micropython
@pytest.mark.slow
def test_the_firmware_benchmark_at_chip_speed_names_this_machines_share_of_the_firmwares_time(
        micropython: str, capsys: pytest.CaptureFixture[str]) -> None:
    # At a chip's speed one span of a host interrupt's work, or of CPU the
    # kernel charged while the meter read its count, cost a 10-minute run
    # its samples: the report names both, and gives the FIFO services that
    # waited on the host apart from the others (their worst latency, their
    # samples overflowed), beside the figures that count them all.
    assert bench.main("firmware", 0.1, True, "esp32", "serial", stretches=True) == 0
    r = json.loads(capsys.readouterr().out)
    c = r["chip"]
    assert c["host_spans"] >= 0 and c["outside_us"] >= 0 and c["outside_spans"] >= 0, c  # this machine has /proc
    ecg = c["fifos"]["max30003"]
    assert 0 <= ecg["host_services"] <= ecg["irqs"] and 0 <= ecg["host_lost"] <= ecg["overflowed"], ecg
    assert ecg["clean_latency_us"] <= ecg["irq_latency_us"], ecg
    lines = bench.firmware_report(r)
    assert any("not charged" in line for line in lines), lines
    assert any("the others' worst latency" in line for line in lines), lines
    assert any("the longest the host was not seen in" in line for line in lines), lines
