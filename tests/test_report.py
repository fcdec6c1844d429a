"""`rlhf-influence report`: a self-contained page with the expected sections, model text escaped,
rendered by headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest
from test_audit import make_run

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


def test_report_sections_and_escaping(report):
    page = report.read_text()
    for section in ("id='curves'", "id='distributions'", "id='jumps'", "id='jump-4'", 'id="reward"', 'id="kept"',
                    'id="influence-all"'):  # fmt: skip
        assert section in page, section
    assert "<script" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return path


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = chromium()
    profile = tempfile.mkdtemp()
    shot = tmp_path / "report.png"
    run = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1000,1400",
         f"--screenshot={shot}", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp()}", "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert "Reward jumps and the records that drove them" in dom
    assert "Round 4: reward +0.880, driven by round 3" in dom
    assert "&lt;script&gt;alert('pwned')&lt;/script&gt;" in dom  # shown as text, never run
    assert "<script>" not in dom


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
