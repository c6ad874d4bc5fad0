"""The agent's garbage collector settings, applied once its start-up is done.

The collector is process-wide, so its settings live here, in one place: the
supervisor applies them when the agent has built its parts (Agent.run), and
the benchmarks (agent/dev/bench_agent.py) call the same function once they
have built theirs, so they measure what the daemon runs.

Why: a frame in flight holds some 16 container objects (tuples, the message,
its record, the store's item, the outcome). With CPython's default young
generation (a collection every 700 net allocations of containers) they
outlive several young collections, get promoted, and the older generations'
collections walk everything the agent holds: ~7 us of CPU a frame in
verify+commit, measured with `./run bench agent --part verify-commit`. A
young generation of 20,000 lets a frame's objects die young (reference
counting frees them; the collector sees them only if it runs meanwhile),
and freezing what start-up made (modules, classes, the agent's parts:
gc.freeze) keeps it out of every later full collection. The cost is memory:
cyclic garbage waits for up to 20,000 allocations instead of 700, a few MB at
most (the realistic load's RSS is in the bench's report).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

# Allocations less deallocations of container objects between two young
# collections. CPython's default, 700, is the objects of some 40 frames in
# flight; 20,000 those of ~1,200 (20 boards, each with its pipeline full:
# agent.session.PIPELINE_DEPTH, 64, at ~16 objects a frame).
YOUNG_THRESHOLD = 20_000


def tune() -> Callable[[], None]:
    """Collects what start-up left as garbage, freezes what is alive (it is never
    examined again), and raises the young generation's threshold to
    YOUNG_THRESHOLD (the older generations' as they were). Returns a function
    that puts the collector back as it was (unfrozen, its thresholds), for an
    agent run inside a longer process (tests)."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *before[1:])

    def restore() -> None:
        gc.unfreeze()
        gc.set_threshold(*before)

    return restore
