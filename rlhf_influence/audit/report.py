"""One self-contained HTML page for a run: curves, distributions and the records behind each jump.

No scripts, no external files: plots are inline SVG. Every text that comes from the run
(prompts, responses) is model output and so untrusted: it is HTML-escaped everywhere.
"""

from __future__ import annotations

import html
import math

from ..store import AttributionStore
from .jumps import AuditReport, RecordView, audit_run

WIDTH, HEIGHT, PAD = 720, 220, 40


def _scale(values: list[float], lo: float, hi: float, size: float, flip: bool = False):
    span = (hi - lo) or 1.0

    def f(v: float) -> float:
        x = (v - lo) / span * size
        return size - x if flip else x

    return f


def line_chart(title: str, ys: list[float], marks: list[int] = (), y_label: str = "", ident: str = "") -> str:
    """An SVG line over rounds 1..len(ys); rounds in ``marks`` get a red dot."""
    if not ys:
        return ""
    lo, hi = min(ys), max(ys)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    sx = _scale(list(range(len(ys))), 0, max(1, len(ys) - 1), WIDTH - 2 * PAD)
    sy = _scale(ys, lo, hi, HEIGHT - 2 * PAD, flip=True)
    points = " ".join(f"{PAD + sx(i):.1f},{PAD + sy(y):.1f}" for i, y in enumerate(ys))
    dots = "".join(
        f'<circle cx="{PAD + sx(k - 1):.1f}" cy="{PAD + sy(ys[k - 1]):.1f}" r="4" fill="#c0392b">'
        f"<title>jump at round {k}</title></circle>"
        for k in marks
        if 0 < k <= len(ys)
    )
    return (
        f'<figure id="{ident}"><figcaption>{html.escape(title)}</figcaption>'
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">'
        f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" fill="#fafafa" stroke="#ccc"/>'
        f'<polyline points="{points}" fill="none" stroke="#2c6fbb" stroke-width="2"/>{dots}'
        f'<text x="{PAD}" y="{PAD - 8}" font-size="11">{hi:+.3g}</text>'
        f'<text x="{PAD}" y="{HEIGHT - PAD + 14}" font-size="11">{lo:+.3g} {html.escape(y_label)}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 14}" font-size="11" text-anchor="end">round {len(ys)}</text>'
        "</svg></figure>"
    )


def histogram(title: str, values: list[float], bins: int = 30, ident: str = "") -> str:
    """An SVG histogram; negative bins red (harmful), positive blue (helpful)."""
    values = sorted(v for v in values if math.isfinite(v))
    if not values:
        return ""
    # Bins span the 1st-99th percentiles; the few outliers beyond are counted in the edge bins.
    lo, hi = values[int(0.01 * (len(values) - 1))], values[int(0.99 * (len(values) - 1))]
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    counts = [0] * bins
    for v in values:
        counts[max(0, min(bins - 1, int((v - lo) / (hi - lo) * bins)))] += 1
    top = max(counts)
    bar_w = (WIDTH - 2 * PAD) / bins
    bars = []
    for i, c in enumerate(counts):
        h = c / top * (HEIGHT - 2 * PAD)
        left = lo + i * (hi - lo) / bins
        colour = "#c0392b" if left + (hi - lo) / bins <= 0 else "#2c6fbb"
        bars.append(
            f'<rect x="{PAD + i * bar_w:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
            f'fill="{colour}"><title>{c} records in [{left:.3g}, {left + (hi - lo) / bins:.3g})</title></rect>'
        )
    return (
        f'<figure id="{ident}"><figcaption>{html.escape(title)}</figcaption>'
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">{"".join(bars)}'
        f'<text x="{PAD}" y="{HEIGHT - PAD + 14}" font-size="11">&lt;= {lo:.3g}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 14}" font-size="11" text-anchor="end">&gt;= {hi:.3g}</text>'
        "</svg></figure>"
    )


def records_table(rows: list[RecordView], kind: str) -> str:
    head = "<tr><th>influence</th><th>reward</th><th>kept</th><th>prompt</th><th>response</th></tr>"
    body = "".join(
        f'<tr class="{kind}"><td>{r.influence:+.3e}</td><td>{r.reward:+.3f}</td><td>{"yes" if r.kept else "no"}</td>'
        f"<td>{html.escape(str(r.prompt))}</td><td>{html.escape(str(r.response))}</td></tr>"
        for r in rows
    )
    return f'<table class="{kind}">{head}{body}</table>'


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
figure{margin:1em 0}figcaption{font-weight:600;margin-bottom:.3em}
table{border-collapse:collapse;width:100%;margin:.5em 0 1.5em}
td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left}
tr.top td:first-child{color:#1e6b2f}tr.bottom td:first-child{color:#c0392b}
.meta{color:#555}
"""


def render_report(path, z: float = 1.5, min_delta: float = 0.0, top: int = 5) -> str:
    """The HTML page for the run at ``path`` (a string; nothing is written)."""
    store = AttributionStore.open(path)
    report: AuditReport = audit_run(path, z=z, min_delta=min_delta, top=top)
    rounds = [r.round for r in report.rounds]
    rewards = [r.mean_reward for r in report.rounds]
    kept = [r.kept / max(1, r.kept + r.dropped) for r in report.rounds]
    influences = []
    for k in rounds:
        influences.extend(store.read_records(k).column("influence").to_pylist())
    manifest = store.manifest
    meta = ", ".join(
        f"{html.escape(str(key))}: {html.escape(str(manifest[key]))}"
        for key in ("target", "schedule", "drop_fraction", "num_processes", "records_per_round")
        if key in manifest
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>rlhf-influence report: {html.escape(str(store.path))}</title><style>{STYLE}</style></head><body>",
        f"<h1>rlhf-influence report</h1><p class='meta'>{html.escape(str(store.path))}<br>{meta}</p>",
        "<section id='curves'><h2>Reward and filtering per round</h2>",
        line_chart(
            "Mean reward per round (red: jumps)", rewards, [j.round for j in report.jumps], ident="reward"
        ),
        line_chart("Fraction of records kept by IIF", kept, ident="kept"),
        "</section><section id='distributions'><h2>Influence on the return target</h2>",
        histogram(
            f"All {len(influences)} records of {len(rounds)} rounds (red: harmful, blue: helpful)",
            influences,
            ident="influence-all",
        ),
        "</section><section id='jumps'><h2>Reward jumps and the records that drove them</h2>",
        f"<p>Round k is a jump when its mean reward minus round k-1's exceeds {z} standard deviations of all "
        "round-to-round changes; it is attributed to round k-1's records, whose update produced round k's policy.</p>",
    ]
    if not report.jumps:
        parts.append("<p>No jump in this run.</p>")
    for jump in report.jumps:
        parts.append(
            f"<h3 id='jump-{jump.round}'>Round {jump.round}: reward {jump.reward_delta:+.3f}, "
            f"driven by round {jump.attributed_round}</h3><p>Most helpful records</p>"
            + records_table(jump.top_records, "top")
            + "<p>Most harmful records</p>"
            + records_table(jump.bottom_records, "bottom")
        )
    parts.append("</section></body></html>")
    return "".join(parts)
