from hypothesis import strategies as st

from protocols import messages


def keys() -> st.SearchStrategy[bytes]:
    return st.binary(min_size=32, max_size=32)


def kids() -> st.SearchStrategy[bytes]:
    return st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=16).map(str.encode)


@st.composite
def frames(draw: st.DrawFn) -> messages.SampleFrame:
    stream = draw(st.sampled_from([messages.STREAM_ECG_MAX30003, messages.STREAM_ECG_AD8232,
                                   messages.STREAM_PPG_MAX30102]))
    count = draw(st.integers(1, 64))
    nch = messages.STREAM_CHANNELS[stream]
    sample = st.integers(-(2**17), 2**17 - 1)
    channels = [draw(st.lists(sample, min_size=count, max_size=count)) for _ in range(nch)]
    u32 = st.integers(0, 2**32 - 1)
    drive = draw(st.tuples(u32, u32, u32, u32)) if stream == messages.STREAM_PPG_MAX30102 else None
    return messages.SampleFrame(
        epoch=draw(st.integers(0, 2**32 - 1)), seq=draw(st.integers(0, 2**32 - 1)), stream=stream,
        t0_ms=draw(st.integers(0, 2**53 - 1)), first_index=draw(st.integers(0, 2**53 - 1)),
        rate_hz=draw(st.integers(1, 100000)), count=count,
        scale=(draw(u32), draw(st.integers(1, 2**32 - 1))), ppg_drive=drive,
        status=(draw(u32), draw(u32), draw(u32), draw(u32)), channels=channels)
