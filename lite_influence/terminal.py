"""Showing a user's strings on a terminal without letting them act on it.

Texts, label names and column values come from files we did not write. Printed raw, an ESC
sequence clears the screen or retitles the window, a CR overwrites the line before it, and
through rich a ``[link=...]`` or ``[/x]`` is markup (the second one crashes the print). Every
user string the CLI prints goes through ``shown``: control characters become visible escapes
(``\\x1b``, ``\\r``, ``\\n``), so what is on screen is what is in the file, and square
brackets are escaped for rich. JSON output needs none of this (``json.dumps`` escapes control
characters itself).
"""

from __future__ import annotations

import unicodedata

from rich.markup import escape

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def is_unsafe(ch: str) -> bool:
    """C0 and C1 controls, DEL, and the format characters that reorder or hide text (bidi
    overrides, zero-width marks: category Cf)."""
    return unicodedata.category(ch) in ("Cc", "Cf") and ch != " "


def plain(value) -> str:
    """``value`` as text with every control character made visible; no markup escaping."""
    text = str(value)
    if not any(is_unsafe(ch) for ch in text):
        return text
    return "".join(_visible(ch) if is_unsafe(ch) else ch for ch in text)


def shown(value) -> str:
    """``plain(value)``, escaped for rich markup: safe inside ``console.print(f"...")``."""
    return escape(plain(value))
