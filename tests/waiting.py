"""Bounded waits on the condition a test needs, never fixed sleeps.

`wait_for` polls a predicate until it holds or a generous bound passes, then
fails with what it waited for and the last state it saw, so a slow, busy
machine only makes a test slower, never wrong (STYLE.md section 16).
`async_wait_for` is its twin for tests that run on an asyncio loop: it yields
to the loop between polls, so the code under test keeps running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

POLL_S = 0.05


def _failure(what: str, timeout_s: float, last: Any, observe: Callable[[], Any] | None) -> AssertionError:
    state = observe() if observe is not None else last
    return AssertionError("timed out after %.0f s waiting for %s; last seen: %r" % (timeout_s, what, state))


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str,
             observe: Callable[[], Any] | None = None, poll_s: float = POLL_S) -> T:
    """Polls `predicate` until it returns something true, and returns that.

    timeout_s: the bound, generous (a loaded machine is slow, not wrong).
    what: what is awaited, for the failure message.
    observe: the state to report on a timeout (default: the predicate's last result).
    Raises AssertionError naming `what` and the last state when the bound passes.
    """
    end = time.monotonic() + timeout_s
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= end:
            raise _failure(what, timeout_s, last, observe)
        time.sleep(poll_s)


async def async_wait_for(predicate: Callable[[], T], timeout_s: float, what: str,
                         observe: Callable[[], Any] | None = None, poll_s: float = POLL_S) -> T:
    """`wait_for` for a test on an asyncio loop: the loop runs between polls."""
    end = time.monotonic() + timeout_s
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= end:
            raise _failure(what, timeout_s, last, observe)
        await asyncio.sleep(poll_s)
