"""The server's page in a real browser: Debian's Chromium, headless, loads the page, runs the
query its address asks for, and shows the proponents, the opponents and the saved audit. The
DOM it prints after the page's scripts ran is what a user would see (``--dump-dom``); no
driver library is needed. `.ci/run` installs Chromium; without it this module is skipped."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import pytest

from conftest import WORDS, run_cli, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs it)")


@pytest.fixture(scope="module")
def served(bert_dir, tmp_path_factory):
    """A tiny index with known-noisy rows and a saved audit, served by a real uvicorn process."""
    from lite_influence import build_index
    from lite_influence.serve import find_server

    folder = tmp_path_factory.mktemp("browser")
    rng = random.Random(4)
    rows = [(" ".join(rng.choices(WORDS, k=rng.randint(3, 9))), i % 2, int(i % 5 == 0)) for i in range(20)]
    (folder / "train.tsv").write_text("sentence\tlabel\tnoisy\n" + "".join(f"{t}\t{y}\t{z}\n" for t, y, z in rows))
    (folder / "queries.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y, _ in rows[:6]))
    index = build_index(bert_dir, folder / "train.tsv", folder / "tiny", projection="random").path
    process = start_server(index, folder / "server.log")
    yield {"index": index, "folder": folder, "url": find_server(index)}
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def page(url: str, tmp_path: Path) -> str:
    """The DOM after the page's scripts ran (the query and the audit are fetched on load)."""
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                          "--virtual-time-budget=15000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def section(dom: str, element_id: str) -> str:
    match = re.search(rf'<(section|table|div)[^>]*id="{element_id}"[^>]*>(.*?)</\1>', dom, re.S)
    assert match, element_id
    return match.group(0)


def test_the_page_runs_a_query_and_shows_the_saved_audit(served, capsys, tmp_path):
    code, _, err = run_cli(capsys, "audit", served["index"], served["folder"] / "queries.tsv", "--save", "--agg", "rank")
    assert code == 0, err
    text = "good movie very fine"
    dom = page(f"{served['url']}/?{urlencode({'index': 'tiny', 'text': text, 'k': 3})}", tmp_path)
    result = section(dom, "result")
    assert 'id="result" hidden' not in dom and "prediction" in result
    for side in ("proponents", "opponents"):
        assert len(re.findall(r"<tr", section(dom, side))) == 1 + 3, side  # a header and k rows
    audit = section(dom, "audit")
    assert 'id="audit" hidden' not in dom
    saved = json.loads((served["index"] / "audit.json").read_text())
    assert "NDR@30" in audit and "training loss" in audit and "polyline" in audit
    first = saved["ranking"]["rows"][0]
    ranking = section(dom, "audit-ranking")
    assert f'<td class="num">{first["id"]}</td>' in ranking
    assert ranking.count("(noisy)") == sum(r["noisy"] for r in saved["ranking"]["rows"][:50])


def test_the_page_explains_a_training_example_by_id(served, tmp_path):
    """The page's query by id (what clicking a row, then "explain", runs), from its address:
    with cosine, an example heads its own proponents; no model runs for it."""
    from lite_influence import InfluenceIndex

    expected = InfluenceIndex.open(served["index"]).query_ids([7], k=3)
    dom = page(f"{served['url']}/?{urlencode({'index': 'tiny', 'id': 7, 'k': 3})}", tmp_path)
    assert 'id="result" hidden' not in dom
    assert "training example #7" in section(dom, "prediction")
    for side in ("proponents", "opponents"):
        shown = re.findall(r'<tr data-id="(\d+)"', section(dom, side))
        assert shown == [str(row["id"]) for row in expected[side]], side
    assert expected["proponents"][0]["id"] == 7
