"""Check a report.html in a real headless browser: it renders, every image loads, no table is wider than 1280 px.

    python benchmarks/check_report_html.py runs/demo/report/report.html [--screenshot docs/report.png]

Needs Chromium (Debian: `apt-get install -y chromium`; or pass --chromium PATH). The page is opened at
1280 px wide from a copy with a small script added that, once the page has loaded, measures every image
(complete and naturalWidth > 0) and every table (its rendered and scrolled width) and writes the result into
the DOM; `chromium --headless --dump-dom` returns it. `--screenshot` also saves a PNG of the page as rendered.
Exit code 0 when everything passes, 1 with one line per problem, 2 when the browser or the file is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: the widest a table may render, in CSS px (a laptop screen; the report's own max width is below it)
MAX_TABLE_PX = 1280
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_PROBE = """
<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60));
  const tables = Array.from(document.querySelectorAll("table")).map((t, n) => ({
    n: n, width: Math.max(t.getBoundingClientRect().width, t.scrollWidth),
    head: (t.rows[0] ? t.rows[0].innerText : "").slice(0, 60)}));
  const out = {images: imgs.length, broken: broken, tables: tables,
               page_width: document.documentElement.scrollWidth, text_chars: document.body.innerText.length};
  const pre = document.createElement("pre");
  pre.id = "lrpilot-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def find_browser(given: str | None = None) -> str | None:
    if given:
        return given if shutil.which(given) or Path(given).is_file() else None
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _headless(browser: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2200",
           "--virtual-time-budget=10000", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check(html: Path, browser: str, screenshot: Path | None = None) -> tuple[list[str], dict]:
    """(problems, measurements) for the report at `html`, rendered by `browser`."""
    text = html.read_text(encoding="utf-8")
    probed = text.replace("</body>", _PROBE + "</body>") if "</body>" in text else text + _PROBE
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / html.name  # beside nothing: the report must be self-contained
        page.write_text(probed, encoding="utf-8")
        proc = _headless(browser, "--dump-dom", page.as_uri())
    m = re.search(r'<pre id="lrpilot-check">(.*?)</pre>', proc.stdout, re.S)
    if m is None:
        return [f"the page did not render (browser exit {proc.returncode}): {proc.stderr.strip()[-300:]}"], {}
    import html as htmllib

    res = json.loads(htmllib.unescape(m.group(1)))
    problems = []
    if res["images"] == 0:
        problems.append("no image in the report")
    problems += [f"image does not load: {b}" for b in res["broken"]]
    problems += [
        f"table {t['n']} ({t['head']!r}) is {t['width']:.0f} px wide (> {MAX_TABLE_PX})"
        for t in res["tables"]
        if t["width"] > MAX_TABLE_PX
    ]
    if res["text_chars"] < 200:
        problems.append(f"the page shows almost no text ({res['text_chars']} characters)")
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        shot = _headless(browser, f"--screenshot={screenshot.resolve()}", html.resolve().as_uri())
        if not screenshot.is_file():
            problems.append(f"no screenshot written (browser exit {shot.returncode})")
    return problems, res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path, help="a report.html written by `lrpilot report` or `lrpilot demo`")
    p.add_argument("--screenshot", type=Path, default=None, help="also save a 1280 px wide PNG of the page here")
    p.add_argument("--chromium", default=None, help="the browser binary (default: chromium on PATH)")
    args = p.parse_args(argv)
    if not args.html.is_file():
        print(f"check_report_html: error: {args.html}: no such file; run `lrpilot report` first", file=sys.stderr)
        return 2
    browser = find_browser(args.chromium)
    if browser is None:
        print("check_report_html: error: no Chromium found; apt-get install -y chromium, or pass --chromium PATH",
              file=sys.stderr)  # fmt: skip
        return 2
    problems, res = check(args.html, browser, args.screenshot)
    widest = max((t["width"] for t in res.get("tables", [])), default=0)
    print(f"{args.html}: {res.get('images', 0)} images, {len(res.get('tables', []))} tables (widest {widest:.0f} px)")
    for line in problems:
        print(f"FAIL {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
