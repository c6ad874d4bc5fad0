"""Streaming on a board: everything it measures arrives, verified, once."""

import pytest

from hil_tests.conftest import BoardUnderTest, stream


def test_stream_with_zero_loss(board: BoardUnderTest, request: pytest.FixtureRequest) -> None:
    seconds = request.config.getoption("--stream-seconds")
    st = stream(board, seconds)
    print("%s board %s: %d frames verified, samples %s, rejects %s" % (
        board.kind, board.device_id, st.frames, st.samples_received(), dict(st.rejects)))
    assert not st.rejects
    assert st.frames >= 2 * (seconds - 5), st.frames  # two streams, 1 s windows, start-up allowed
    assert st.samples_missing() and all(v == 0 for v in st.samples_missing().values())
    assert st.fifo_lost == 0 and st.board_dropped == 0
