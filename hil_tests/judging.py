"""Judging a bench measurement that carries its uncertainty.

A figure whose uncertainty is wider than the limit it is judged against
cannot pass or fail: the case is skipped, saying so with the figure (and
how to narrow it), rather than passing on noise (before, the drift case
passed while measuring "0 +/- 9229 ppm").
"""

from __future__ import annotations

import pytest


def judge_within(what: str, value: float, uncertainty: float, limit: float, unit: str, narrow: str) -> None:
    """Passes if |value| is within limit given its uncertainty; fails (AssertionError) if it is out of
    limit by more than its uncertainty; skips, with the figure, if the uncertainty alone exceeds the limit.
    narrow: how a run gets a smaller uncertainty (said in the skip)."""
    figure = "%.0f +/- %.0f %s" % (value, uncertainty, unit)
    if uncertainty > limit:
        pytest.skip("%s too uncertain to judge against +/-%.0f %s: %s; %s" % (what, limit, unit, figure, narrow))
    assert abs(value) - uncertainty <= limit, "%s out of +/-%.0f %s: %s" % (what, limit, unit, figure)
