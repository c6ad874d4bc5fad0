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
