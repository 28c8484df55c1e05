"""plots.py and ``audit --plot``: a real PNG of the detection curves, and the bars."""

from __future__ import annotations

import pytest

from conftest import run_cli
from test_audit import env  # noqa: F401 (the module fixture)

PNG = b"\x89PNG\r\n\x1a\n"


def test_audit_plot_writes_a_png(capsys, env, tmp_path):  # noqa: F811
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    code, _, err = run_cli(capsys, "audit", env["index"].path, env["queries"], "--plot", path)
    assert code == 0, err
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5_000
    assert f"wrote {path}" in err


def test_layer_bars_png(env, tmp_path):  # noqa: F811
    pytest.importorskip("matplotlib")
    from lite_influence.plots import layer_bars

    result = env["index"].audit(env["queries"], layers="each", aggs="rank,vote")
    path = layer_bars(result, tmp_path / "bars.png")
    assert path.read_bytes()[:8] == PNG
