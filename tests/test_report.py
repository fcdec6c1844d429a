"""`rlhf-influence report`: a self-contained page with the expected sections, model text escaped,
rendered by headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

import pytest
from test_audit import REWARDS, make_run

from rlhf_influence.cli import main
from rlhf_influence.store import AttributionStore

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
EVIL = "<script>alert('pwned')</script><img src=x onerror=alert(1)>"


@pytest.fixture
def report(tmp_path):
    run = make_run(tmp_path)
    store = AttributionStore.open(run)
    # Rewrite round 3 (the one behind the jump at round 4) with a response carrying markup.
    table = store.read_records(3).to_pydict()
    table["response"][5] = EVIL
    shutil.rmtree(store.round_dir(3))
    store.write_round(3, table, {"objective/scores": 0.02})
    out = tmp_path / "report.html"
    assert main(["report", str(run), "-o", str(out)]) == 0
    return out


def outside_plotly(page: str) -> str:
    """The page without the inlined plotly.js (the first script element)."""
    start = page.index("<script>")
    return page[:start] + page[page.index("</script>", start) :]


def test_report_sections_and_escaping(report):
    page = report.read_text()
    for section in ("id='curves'", "id='distributions'", "id='jumps'", "id='jump-4'", 'id="reward"', 'id="kept"',
                    'id="influence-rounds"', 'id="influence-all"'):  # fmt: skip
        assert section in page, section
    # model text only ever appears escaped, in the tables; never inside a script
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<img" not in page and "pwned" not in "".join(re.findall(r"<script>(.*?)</script>", page, re.S))
    # self-contained: nothing is loaded (CSP forbids it; no URL outside plotly.js's own code)
    assert "default-src 'none'" in page
    # only the page's own scripts may run: each allowed by its hash, no 'unsafe-inline'
    policy = re.search(r"script-src ([^;]*);", page).group(1)
    assert "unsafe-inline" not in policy
    assert policy.count("'sha256-") == page.count("<script>") >= 6
    assert "http://" not in outside_plotly(page) and "https://" not in outside_plotly(page)
    assert "<link" not in page


def test_report_tables_show_advantages_fixed_influence_and_legend(tmp_path):
    """Reward, both advantages, influence scaled to fixed notation, kept; the one-line legend."""
    run = make_run(tmp_path)
    store = AttributionStore.open(run)
    table = store.read_records(3).to_pydict()
    table["influence"] = [v * 1e-4 for v in table["influence"]]
    table["advantage_mean"] = [0.25 * i for i in range(6)]
    table["advantage_last"] = [-0.5 * i for i in range(6)]
    shutil.rmtree(store.round_dir(3))
    store.write_round(3, table, {"objective/scores": 0.02})
    out = tmp_path / "r.html"
    assert main(["report", str(run), "-o", str(out), "--top", "1"]) == 0
    page = out.read_text()
    jump = page[page.index("id='jump-4'") :]
    assert "<th>advantage (mean)</th><th>advantage (last token)</th>" in jump
    assert "influence (x 1e-6)" in jump  # largest |influence| 7.5e-4 -> 750 x 1e-6
    # record 5: influence (5 - 2.5) * 3 * 1e-4 = 7.5e-4, advantages +1.25 and -2.5
    assert (
        '<td class="num">5</td><td class="num">+0.020</td><td class="num">+1.250</td><td class="num">-2.500</td>'
        '<td class="num infl">+750.00</td>' in jump
    )
    assert "helpful</b> records (positive)" in page and "<b>advantage</b>" in page
    assert "e-0" not in jump.replace("x 1e-6", "")  # no scientific notation in the cells


def test_report_compare_overlays_a_second_run(tmp_path):
    run = make_run(tmp_path / "a")
    other = make_run(tmp_path / "b", rewards=[0.1] * 7)
    out = tmp_path / "r.html"
    assert main(["report", str(run), "-o", str(out), "--compare", str(other)]) == 0
    page = out.read_text()
    data = json.loads(re.search(r'Plotly.newPlot\("reward",(\[.*?\]),\{', page).group(1))
    names = [trace["name"] for trace in data]
    assert names == ["mean reward", "jump (click for its records)", "KL to the reference", "mean reward, run",
                     "KL, run"]  # fmt: skip
    assert data[3]["y"] == pytest.approx([0.1] * 7) and data[0]["y"] == pytest.approx(list(REWARDS))
    assert data[1]["customdata"] == [4]  # the jump marker leads to its tables
    assert main(["report", str(run), "-o", str(out), "--compare", str(tmp_path / "none")]) == 2


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return path


def test_report_renders_in_headless_chromium(report, tmp_path):
    """The charts render (Plotly's SVG in the DOM, the reward line's blue in the screenshot) and
    model text shows as text, never as markup."""
    from PIL import Image

    browser = chromium()
    shot = tmp_path / "report.png"
    run = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1100,1400",
         "--virtual-time-budget=10000", f"--screenshot={shot}", report.as_uri()],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    reward_blue = sum(1 for pixel in image.getdata() if pixel == (44, 111, 187))
    assert reward_blue > 200, reward_blue  # the reward line (and the median band) were drawn
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp()}", "--virtual-time-budget=10000",
         "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=180,
    ).stdout  # fmt: skip
    assert dom.count('class="main-svg"') >= 4  # every chart rendered by plotly.js
    assert "Reward jumps and the records that drove them" in dom
    assert "Round 4: reward +0.880, driven by round 3" in dom
    assert "&lt;script&gt;alert('pwned')&lt;/script&gt;" in dom  # shown as text, never run
    assert "<img" not in dom


def test_report_never_writes_inside_the_run(tmp_path, capsys):
    from test_audit import tree_digest

    run = make_run(tmp_path)
    before = tree_digest(run)
    for target in (run / "report.html", run / "attribution" / "manifest.json", run):
        assert main(["report", str(run), "-o", str(target)]) == 2
        assert "lies inside the run" in capsys.readouterr().err
    assert main(["report", str(run), "-o", str(tmp_path)]) == 2
    assert "is a directory; name the HTML file to write" in capsys.readouterr().err
    assert main(["report", str(run), "-o", str(tmp_path / "no-such-dir" / "r.html")]) == 2
    assert "cannot write --output" in capsys.readouterr().err
    assert tree_digest(run) == before


def test_non_finite_values_and_missing_metrics(tmp_path, capsys):
    """A NaN influence, a round whose metrics cannot be read and stores without advantage columns:
    the report renders, and audit --json stays valid JSON (null, never NaN)."""
    run = make_run(tmp_path)
    store = AttributionStore.open(run)
    table = store.read_records(3).to_pydict()
    table["influence"][2] = float("nan")
    shutil.rmtree(store.round_dir(3))
    store.write_round(3, table, {"objective/scores": 0.02})
    (store.round_dir(5) / "metrics.json").unlink()
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    assert main(["audit", str(run), "--json"]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in JSON")

    report = json.loads(capsys.readouterr().out.split("\n", 1)[1], parse_constant=refuse)
    assert report["rounds"][4]["kl"] is None
    assert report["jumps"][0]["top_records"][0]["advantage_mean"] is None
