"""What the hub's state means, in the words every text view prints.

`pulsebridge status` and the demo (its live view, its plain lines, its
summary) read the same snapshot (Agent.snapshot); the words for a link's
state and for the store's are here, once, so no view says "connected" or
"ok" where another says the store cannot write. The status page has its
own words, in French and English (agent/status_page.py).
"""

from __future__ import annotations

from typing import Any

# What each link state means.
STATE_WORDS = {
    "searching": "not plugged in", "connecting": "connecting", "connected": "connected",
    "stalled": "stalled: nothing received", "backoff": "reconnecting", "out_of_range": "out of range",
    "released": "not a registered board: port left alone",
}
# A connected board whose frames the store cannot write: heard, but nothing of it is kept.
HELD_WORDS = "connected, its frames held: the store cannot write"
# A stalled board while the store cannot write: nothing heard from it (a frame waiting on the store
# is not a stall); its last error says what.
STALLED_HELD_WORDS = "stalled: nothing delivered while the store cannot write"


def store_fault(store: dict[str, Any]) -> bool:
    """True while the store's commits fail (disk full, I/O error): nothing new is stored or acknowledged."""
    return store.get("state") == "fault"


def streaming(board: dict[str, Any], store: dict[str, Any]) -> bool:
    """A board is streaming when its link delivers and its frames are stored: connected, with a frame
    stored, and the store writing (a connected board whose frames wait on a store fault is not)."""
    return board.get("state") == "connected" and bool(board.get("frames")) and not store_fault(store)


def board_state(board: dict[str, Any], store: dict[str, Any]) -> str:
    """A board's state in words: its link's, unless its frames are held by a store fault."""
    if board.get("state") == "connected" and store_fault(store):
        return HELD_WORDS
    if board.get("state") == "stalled" and store_fault(store):
        return STALLED_HELD_WORDS
    state = str(board.get("state", ""))
    return STATE_WORDS.get(state, state)


def store_lines(store: dict[str, Any], now: float) -> list[str]:
    """The store's state (Store.status()) as `pulsebridge status` prints it, one fact a line.
    now: UTC s."""
    st = store
    lines = []
    if store_fault(st):
        lines.append("store FAULT for %.0f s: %s; nothing new is acknowledged until it is stored (retrying)" % (
            now - (st.get("fault_since") or now), st.get("fault")))
    else:
        lines.append("store ok: %d frames stored, %d refused and quarantined, %d storage faults recovered, %d holes "
                     "in the boards' streams sent as gap records" % (st.get("ingested", 0), st.get("refused", 0),
                                                                     st.get("faults_recovered", 0),
                                                                     st.get("gaps_found", 0)))
    if st.get("short_of_space"):
        lines.append("store SHORT OF SPACE (%s): %d frames deleted before every backend had them, the last %.0f s "
                     "ago (gap records sent); free some space or raise disk_quota_mb" % (
                         st["short_of_space"], st.get("dropped_undelivered", 0), now - (st.get("last_drop_at") or now)))
    return lines


def store_brief(store: dict[str, Any], now: float) -> str:
    """The store's trouble in a few words for a one-line view ("" when it has none). now: UTC s."""
    if store_fault(store):
        return "STORE FAULT %.0f s: %s: nothing new stored or acknowledged" % (
            now - (store.get("fault_since") or now), store.get("fault"))
    if store.get("short_of_space"):
        return "STORE SHORT OF SPACE (%s): %d frames deleted undelivered" % (
            store["short_of_space"], store.get("dropped_undelivered", 0))
    return ""
