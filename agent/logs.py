"""How the agent logs: text or JSON, to stderr, as journald or a terminal wants it.

- Under systemd with journald (JOURNAL_STREAM names stderr), lines carry no
  timestamp (journald stamps each line) and start with the syslog priority
  `<N>` (sd-daemon(3)), so `journalctl -p warning` filters by level.
- JSON (log_format = "json") is python-json-logger's formatter: one object a
  line, tracebacks kept (exc_info as one escaped string).
- What a peer controls (a device id from a forged frame, a backend's error
  text) can carry newlines or terminal escapes: every message is escaped
  (control characters as \\n, \\x1b, ...), so one record is one line and no
  line can be forged. A traceback, which is ours, keeps its lines.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

# sd-daemon(3) priorities: what journald reads from a `<N>` prefix.
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The common escapes by name; any other character that is not printable is shown as \xNN, \uNNNN or \UNNNNNNNN.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """text with what is not printable as visible escapes: controls (newline, CR, ESC, DEL, and the C1
    ones such as the 8-bit CSI, U+009B), formatting characters (a bidirectional override, U+202E, shows
    text in another order) and separators other than the space. A peer's text (a forged device id, a
    backend's error body) must not drive a terminal nor forge a line."""
    if text.isprintable():  # the usual case: one pass in C
        return text
    return "".join(c if c.isprintable() else _NAMED.get(c) or _code(ord(c)) for c in text)


def _code(n: int) -> str:
    return "\\x%02x" % n if n < 0x100 else "\\u%04x" % n if n < 0x10000 else "\\U%08x" % n


def under_journald(stream: TextIO) -> bool:
    """True if stream is the journal's (systemd sets JOURNAL_STREAM to its device:inode)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == "%d:%d" % (st.st_dev, st.st_ino)


class EscapeFilter(logging.Filter):
    """Makes each record's message one line: its arguments merged and escaped."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = escape(record.getMessage())
        record.args = None
        return True


class JournalFormatter(logging.Formatter):
    """No timestamp (journald adds its own), the syslog priority as a `<N>` prefix on every line."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "<%d>" % SYSLOG_PRIORITY.get(record.levelno, 6)
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(JSON_FIELDS, rename_fields={"asctime": "at", "levelname": "level", "name": "logger"})


def setup(log_format: str = "text", level: int = logging.WARNING, stream: TextIO | None = None) -> logging.Handler:
    """One handler on the root logger (replacing any), writing to stream (default stderr). Returns it."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapeFilter())
    if log_format == "json":
        handler.setFormatter(json_formatter())
    elif under_journald(stream):
        handler.setFormatter(JournalFormatter(JOURNAL_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
