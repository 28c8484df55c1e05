import io

import pytest
from rich.console import Console

from lite_influence.terminal import plain, shown


@pytest.mark.parametrize("raw,expected", [
    ("\x1b[2Jcleared", "\\x1b[2Jcleared"), ("over\rwrite", "over\\rwrite"), ("bell\x07", "bell\\x07"),
    ("two\nlines", "two\\nlines"), ("del\x7f", "del\\x7f"), ("c1\x9b31m", "c1\\x9b31m"),
    ("bidi\u202eevil", "bidi\\u202eevil"), ("zero\u200bwidth", "zero\\u200bwidth"),
    ("plain text, é ü 中文 🙂", "plain text, é ü 中文 🙂"),
])
def test_plain_makes_controls_visible(raw, expected):
    assert plain(raw) == expected


@pytest.mark.parametrize("raw", ["[/x]", "[link=file:///etc/passwd]click[/link]", "[bold red]loud", "a]b[c"])
def test_shown_is_never_markup(raw):
    out = io.StringIO()
    Console(file=out, color_system="truecolor", force_terminal=True, width=200, highlight=False).print(f"label: {shown(raw)}")
    printed = out.getvalue()
    assert raw in printed  # the brackets are printed as they are, not interpreted
    assert "\x1b]8;" not in printed  # no hyperlink escape was emitted


def test_shown_output_holds_no_control_bytes():
    out = io.StringIO()
    Console(file=out, color_system=None, width=200).print(shown("a\x1b[2J\x07\r[b]"))
    assert not any(ord(c) < 32 and c != "\n" for c in out.getvalue())
