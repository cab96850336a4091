"""The HTML report in a real headless Chromium (benchmarks/check_report_html.py): renders, images load, tables fit.

    python -m pytest -q tests/test_report_browser.py

Skipped where no Chromium is installed (Debian: apt-get install -y chromium).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from check_report_html import check, find_browser  # noqa: E402

from lrpilot.importer import import_published  # noqa: E402
from lrpilot.report import build_report  # noqa: E402

SEED = Path(__file__).parent / "data" / "seed-experiments"
BROWSER = find_browser()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(BROWSER is None, reason="no Chromium: apt-get install -y chromium"),
]


def test_the_published_report_renders_with_every_image_and_narrow_tables(tmp_path):
    import_published(SEED, tmp_path / "campaign")
    d = build_report(tmp_path / "campaign", [], tmp_path / "out")
    html = Path(d.html_path)
    problems, res = check(html, BROWSER, screenshot=tmp_path / "shot.png")
    assert problems == [], problems
    assert res["images"] == len([f for f in d.figures if f.path is not None]) >= 4
    assert res["tables"] and all(t["width"] <= 1280 for t in res["tables"])
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the check can fail: a broken image and a table too wide for the page are both reported
    text = html.read_text()
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    bad = tmp_path / "bad.html"
    wide = '<table style="width:2000px"><tr><td>wide</td></tr></table>'
    bad.write_text(text[:start] + "AAAA" + text[start + 200 :].replace("</body>", wide + "</body>", 1))
    problems, _ = check(bad, BROWSER)
    assert any(p.startswith("image does not load") for p in problems), problems
    assert any("px wide (> 1280)" in p for p in problems), problems
