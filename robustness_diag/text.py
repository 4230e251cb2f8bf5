r"""Text that reaches a terminal: untrusted strings (file names, paths, error reasons) with their controls escaped.

A file name may hold a newline or an ANSI escape sequence; printed as is it could forge a line of output (a fake
``FAILED ...`` line) or recolour the terminal. :func:`printable` is applied to every path or user string the
commands print (summaries, error lines, progress descriptions).

>>> printable("a\nFAILED b.png")
'a\\nFAILED b.png'
>>> printable("\x1b[31mred\x1b[0m.png")
'\\x1b[31mred\\x1b[0m.png'
>>> printable("café/été.png")
'café/été.png'
"""
from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{ord(ch):02x}"


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F or ch in ("\u2028", "\u2029")


def printable(s) -> str:
    """``str(s)`` with C0 controls, DEL and C1 controls escaped (``\\n``, ``\\r``, ``\\t``, else ``\\xNN``; the
    Unicode line and paragraph separators as ``\\xNNNN``); everything else, non-ASCII letters included, unchanged.
    A backslash stays a single backslash, so ordinary Windows paths read as they are."""
    text = str(s)
    if not any(_is_control(c) for c in text):
        return text
    return "".join(_escape(c) if _is_control(c) else c for c in text)


__all__ = ["printable"]
