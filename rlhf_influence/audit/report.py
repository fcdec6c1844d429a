"""One self-contained HTML page for a run: curves, distributions and the records behind each jump.

The figures are Plotly charts (hover a round for its numbers, click a jump to reach its
tables), with plotly.js inlined: the file opens offline and loads nothing. Every text that
comes from the run (prompts, responses) is model output and so untrusted: it is HTML-escaped
in the tables and never enters a chart or a script.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
import statistics
from dataclasses import dataclass

from ..store import AttributionStore
from .jumps import AuditReport, Jump, RecordView, audit_run, finite_or_none

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SCRIPT_SRC_PLACEHOLDER = "script-src 'none'"  # replaced by the hashes of the page's own scripts
LEGEND = (
    "Influence is on the round's return target: <b>helpful</b> records (positive) pushed the policy "
    "towards higher return, <b>harmful</b> ones (negative) away from it. A record's <b>advantage</b> "
    "decides which way its update pushed its own response: positive made it more likely, negative "
    "less, so a low-reward record with a negative advantage can be helpful."
)


@dataclass
class RunCurves:
    """What the charts show of one run, per stored round."""

    rounds: list[int]
    reward: list[float]
    kl: list[float | None]
    kl_coef: list[float | None]
    kept: list[float]

    @classmethod
    def of(cls, report: AuditReport) -> RunCurves:
        return cls(
            rounds=[r.round for r in report.rounds],
            reward=[r.mean_reward for r in report.rounds],
            kl=[r.kl for r in report.rounds],
            kl_coef=[r.kl_coef for r in report.rounds],
            kept=[r.kept / max(1, r.kept + r.dropped) for r in report.rounds],
        )


def influence_quantiles(per_round: list[list[float]]) -> dict[float, list[float | None]]:
    """Per round, the QUANTILES of its records' finite influence scores (None where it has none)."""
    out: dict[float, list[float | None]] = {q: [] for q in QUANTILES}
    for round_values in per_round:
        values = sorted(v for v in round_values if math.isfinite(v))
        for q in QUANTILES:
            out[q].append(values[round(q * (len(values) - 1))] if values else None)
    return out


def fixed_scale(values: list[float]) -> tuple[int, str]:
    """A power of 1000 that puts the largest |value| in [1, 1000), and the column header's note."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if not finite:
        return 0, ""
    exponent = 3 * math.floor(math.log10(max(finite)) / 3)
    return exponent, (f" (x 1e{exponent})" if exponent else "")


def _number(value: float, digits: int = 3, scale: int = 0) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value / 10**scale:+.{digits}f}"


def records_table(rows: list[RecordView], kind: str, what: str = "influence") -> str:
    """Records as a table: reward, advantages, influence in fixed notation (one scale per table), kept, text."""
    scale, note = fixed_scale([r.influence for r in rows])
    head = (
        "<tr><th>record</th><th>reward</th><th>advantage (mean)</th><th>advantage (last token)</th>"
        f"<th>{html.escape(what)}{note}</th><th>kept</th><th>prompt</th><th>response</th></tr>"
    )
    body = "".join(
        f'<tr class="{kind}"><td class="num">{html.escape(str(r.record))}</td><td class="num">{_number(r.reward)}</td>'
        f'<td class="num">{_number(r.advantage_mean)}</td><td class="num">{_number(r.advantage_last)}</td>'
        f'<td class="num infl">{_number(r.influence, 2, scale)}</td><td>{"yes" if r.kept else "no"}</td>'
        f"<td>{html.escape(str(r.prompt))}</td><td>{html.escape(str(r.response))}</td></tr>"
        for r in rows
    )
    return f'<table class="{kind}">{head}{body}</table>'


def responses_table(rows: list[RecordView]) -> str:
    head = "<tr><th>record</th><th>reward</th><th>prompt</th><th>response</th></tr>"
    body = "".join(
        f'<tr><td class="num">{html.escape(str(r.record))}</td><td class="num">{_number(r.reward)}</td>'
        f"<td>{html.escape(str(r.prompt))}</td><td>{html.escape(str(r.response))}</td></tr>"
        for r in rows
    )
    return f'<table class="responses">{head}{body}</table>'


# ------------------------------------------------------------------ the figures (Plotly JSON)
def _layout(title: str, height: int, **extra) -> dict:
    return {
        "title": {"text": title, "x": 0, "y": 0.99, "yanchor": "top", "font": {"size": 15}},
        "template": "plotly_white",
        "height": height,
        "margin": {"l": 60, "r": 20, "t": 60, "b": 45},
        "hovermode": "x unified",
        "legend": {"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom", "font": {"size": 11}},
        **extra,
    }


def reward_kl_figure(run: RunCurves, jumps: list[Jump], compare: RunCurves | None, compare_name: str) -> dict:
    """Mean reward and KL to the reference per round, on one shared round axis; jumps clickable."""
    data = [
        {"type": "scatter", "mode": "lines+markers", "x": run.rounds, "y": run.reward, "name": "mean reward",
         "line": {"color": "#2c6fbb"}, "marker": {"size": 4}, "xaxis": "x", "yaxis": "y",
         "hovertemplate": "%{y:+.3f}"},
        {"type": "scatter", "mode": "markers", "x": [j.round for j in jumps],
         "y": [run.reward[run.rounds.index(j.round)] for j in jumps], "name": "jump (click for its records)",
         "customdata": [j.round for j in jumps], "marker": {"color": "#c0392b", "size": 11, "symbol": "diamond"},
         "xaxis": "x", "yaxis": "y", "hovertemplate": "jump %{y:+.3f}"},
        {"type": "scatter", "mode": "lines", "x": run.rounds, "y": run.kl, "name": "KL to the reference",
         "line": {"color": "#8e44ad"}, "xaxis": "x", "yaxis": "y2", "hovertemplate": "%{y:.3f}"},
    ]  # fmt: skip
    if any(v is not None for v in run.kl_coef):
        data.append(
            {"type": "scatter", "mode": "lines", "x": run.rounds, "y": run.kl_coef, "name": "KL coefficient",
             "line": {"color": "#e67e22", "dash": "dot"}, "xaxis": "x", "yaxis": "y3", "hovertemplate": "%{y:.4g}"}
        )  # fmt: skip
    if compare is not None:
        data += [
            {"type": "scatter", "mode": "lines", "x": compare.rounds, "y": compare.reward,
             "name": f"mean reward, {compare_name}", "line": {"color": "#7f8c8d", "dash": "dash"},
             "xaxis": "x", "yaxis": "y", "hovertemplate": "%{y:+.3f}"},
            {"type": "scatter", "mode": "lines", "x": compare.rounds, "y": compare.kl,
             "name": f"KL, {compare_name}", "line": {"color": "#bdc3c7", "dash": "dash"},
             "xaxis": "x", "yaxis": "y2", "hovertemplate": "%{y:.3f}"},
        ]  # fmt: skip
    layout = _layout(
        "Mean reward and KL to the reference per round",
        520,
        xaxis={"title": {"text": "round"}, "anchor": "y2", "showgrid": True},
        yaxis={"title": {"text": "mean reward"}, "domain": [0.45, 1.0], "showgrid": True},
        yaxis2={"title": {"text": "KL"}, "domain": [0.0, 0.35], "showgrid": True, "rangemode": "tozero"},
        yaxis3={"title": {"text": "KL coefficient"}, "overlaying": "y2", "side": "right", "showgrid": False,
                "rangemode": "tozero"},
    )  # fmt: skip
    return {"data": data, "layout": layout}


def kept_figure(run: RunCurves) -> dict:
    data = [{"type": "bar", "x": run.rounds, "y": run.kept, "name": "kept", "marker": {"color": "#27ae60"},
             "hovertemplate": "%{y:.0%} kept<extra></extra>"}]  # fmt: skip
    layout = _layout(
        "Share of each round's records kept by IIF",
        240,
        xaxis={"title": {"text": "round"}},
        yaxis={"range": [0, 1], "tickformat": ".0%"},
    )
    return {"data": data, "layout": layout}


def influence_rounds_figure(rounds: list[int], quantiles: dict[float, list[float | None]]) -> dict:
    """Each round's influence distribution as bands: 5-95% and 25-75% of its records, and the median."""
    data = []
    for lo, hi, colour, label in ((0.05, 0.95, "rgba(44,111,187,0.15)", "5-95% of records"),
                                  (0.25, 0.75, "rgba(44,111,187,0.35)", "25-75%")):  # fmt: skip
        data.append({"type": "scatter", "mode": "lines", "x": rounds, "y": quantiles[hi], "line": {"width": 0},
                     "showlegend": False, "hoverinfo": "skip"})  # fmt: skip
        data.append({"type": "scatter", "mode": "lines", "x": rounds, "y": quantiles[lo], "line": {"width": 0},
                     "fill": "tonexty", "fillcolor": colour, "name": label, "hoverinfo": "skip"})  # fmt: skip
    data.append({"type": "scatter", "mode": "lines", "x": rounds, "y": quantiles[0.5], "name": "median",
                 "line": {"color": "#2c6fbb"}, "hovertemplate": "median %{y:.3g}"})  # fmt: skip
    layout = _layout(
        "Influence on the return target, per round",
        300,
        xaxis={"title": {"text": "round"}},
        yaxis={"title": {"text": "influence"}, "zeroline": True, "zerolinecolor": "#c0392b"},
    )
    return {"data": data, "layout": layout}


def influence_histogram_figure(values: list[float], bins: int = 40) -> dict:
    """All records' influence, binned here (the page carries counts, not every value); harmful bins red."""
    values = sorted(v for v in values if math.isfinite(v))
    if not values:
        return {"data": [], "layout": _layout("No finite influence score", 120)}
    # Bins span the 1st-99th percentiles; the few outliers beyond are counted in the edge bins.
    lo, hi = values[int(0.01 * (len(values) - 1))], values[int(0.99 * (len(values) - 1))]
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[max(0, min(bins - 1, int((v - lo) / width)))] += 1
    centres = [lo + (i + 0.5) * width for i in range(bins)]
    colours = ["#c0392b" if c + width / 2 <= 0 else "#2c6fbb" for c in centres]
    data = [{"type": "bar", "x": centres, "y": counts, "width": width * 0.95, "marker": {"color": colours},
             "name": "records", "hovertemplate": "%{y} records near %{x:.3g}<extra></extra>"}]  # fmt: skip
    layout = _layout(
        f"All {len(values)} records (red: harmful, blue: helpful; edge bins hold the outer 1%)",
        280,
        xaxis={"title": {"text": "influence"}},
        yaxis={"title": {"text": "records"}},
        hovermode="closest",
    )
    return {"data": data, "layout": layout}


def _script_json(value) -> str:
    """JSON that is safe inside a <script> element (no '<', '>' or '&' can close it)."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, default=_finite)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value):
    raise TypeError(f"not JSON: {type(value).__name__}")


def plot(ident: str, figure: dict) -> str:
    config = {"displaylogo": False, "responsive": True, "displayModeBar": "hover"}
    return (
        f'<div id="{ident}" class="plot"></div><script>Plotly.newPlot("{ident}",'
        f"{_script_json(finite_or_none(figure['data']))},{_script_json(finite_or_none(figure['layout']))},{_script_json(config)});"
        "</script>"
    )


JUMP_CLICK = """<script>document.getElementById("reward").on("plotly_click",function(e){
var p=e.points.find(function(q){return q.customdata!==undefined});if(p){location.hash="jump-"+p.customdata;}});</script>"""

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{margin-top:1.6em}
table{border-collapse:collapse;width:100%;margin:.4em 0 1.2em;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f4f6f8}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
tr.top td.infl{color:#1e6b2f}tr.bottom td.infl{color:#c0392b}tr.raised td.infl{color:#1e6b2f}
.meta,.legend{color:#555}.legend{background:#f8f9fa;border-left:3px solid #2c6fbb;padding:.4em .8em}
.plot{margin:.5em 0 1em}
"""


def _jump_section(jump: Jump) -> str:
    cause = jump.attributed_round
    parts = [
        f"<h3 id='jump-{jump.round}'>Round {jump.round}: reward {jump.reward_delta:+.3f}, "
        f"driven by round {cause}</h3>",
        f"<p>Round {cause}'s records by influence on that round's return target. Most helpful:</p>",
        records_table(jump.top_records, "top"),
        "<p>Most harmful:</p>",
        records_table(jump.bottom_records, "bottom"),
    ]
    best = jump.best_responses
    if best is not None and best.note:
        parts.append(
            f"<p class='meta'>Which records taught round {jump.round}'s best responses: {html.escape(best.note)}</p>"
        )
    elif best is not None:
        parts += [
            f"<p>Round {jump.round}'s {len(best.responses)} highest-reward responses:</p>",
            responses_table(best.responses),
            f"<p>Round {cause}'s records that most raised their probability (influence on their summed "
            f"log-probability at round {cause}'s snapshot). {html.escape(best.kept_text())}:</p>",
            records_table(best.records, "raised", what="influence on these responses"),
        ]
    return "".join(parts)


def render_report(
    path,
    z: float = 1.5,
    min_delta: float = 0.0,
    top: int = 5,
    responses: int = 4,
    compare=None,
) -> str:
    """The HTML page for the run at ``path`` (a string; nothing is written).

    ``responses``: trace each jump round's highest-reward responses to the records that made
    them more likely (0: skip). ``compare``: another run whose reward and KL are overlaid.
    """
    from plotly.offline import get_plotlyjs

    store = AttributionStore.open(path)
    report = audit_run(path, z=z, min_delta=min_delta, top=top, responses=responses)
    run = RunCurves.of(report)
    other, other_name = None, ""
    if compare is not None:
        other = RunCurves.of(audit_run(compare, z=z, min_delta=min_delta, top=top))
        other_name = AttributionStore.open(compare).run_dir.name
    per_round = [store.read_records(k).column("influence").to_pylist() for k in run.rounds]
    influences = [v for values in per_round for v in values]
    quantiles = influence_quantiles(per_round)
    manifest = store.manifest
    meta = ", ".join(
        f"{key}: {html.escape(str(getattr(manifest, key)))}"
        for key in ("target", "score", "schedule", "drop_fraction", "num_processes", "records_per_round")
    )
    kls = [v for v in run.kl if v is not None]
    summary = (
        f"{len(run.rounds)} rounds; mean reward {run.reward[0]:+.3f} -> {run.reward[-1]:+.3f} "
        f"(best {max(run.reward):+.3f})"
        + (f"; KL to the reference {kls[-1]:.3f} at the end" if kls else "")
        + f"; {statistics.fmean(run.kept):.0%} of records kept; {len(report.jumps)} jump(s)"
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; "
        f'{SCRIPT_SRC_PLACEHOLDER}; img-src data:; font-src data:">',
        f"<title>rlhf-influence report: {html.escape(str(store.path))}</title><style>{STYLE}</style>",
        f"<script>{get_plotlyjs()}</script></head><body>",
        f"<h1>rlhf-influence report</h1><p class='meta'>{html.escape(str(store.path))}<br>{meta}<br>"
        f"{html.escape(summary)}"
        + (f"<br>dashed: {html.escape(other_name)} ({html.escape(str(compare))})" if other else "")
        + "</p>",
        "<section id='curves'><h2>Reward, KL and filtering per round</h2>",
        plot("reward", reward_kl_figure(run, report.jumps, other, other_name)),
        JUMP_CLICK,
        plot("kept", kept_figure(run)),
        "</section><section id='distributions'><h2>Influence on the return target</h2>",
        plot("influence-rounds", influence_rounds_figure(run.rounds, quantiles)),
        plot("influence-all", influence_histogram_figure(influences)),
        "</section><section id='jumps'><h2>Reward jumps and the records that drove them</h2>",
        f"<p>Round k is a jump when its mean reward minus round k-1's exceeds {z} standard deviations of all "
        "round-to-round changes; it is attributed to round k-1's records, whose update produced round k's "
        "policy. Click a red diamond above to come here.</p>",
        f"<p class='legend'>{LEGEND}</p>",
    ]
    if not report.jumps:
        parts.append("<p>No jump in this run.</p>")
    parts += [_jump_section(jump) for jump in report.jumps]
    parts.append("</section></body></html>")
    return _allow_only_these_scripts("".join(parts))


def _allow_only_these_scripts(page: str) -> str:
    """The CSP lets exactly the page's own inline scripts run (by their SHA-256), no other."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii") + "'"
        for body in re.findall(r"<script>(.*?)</script>", page, re.S)
    ]
    return page.replace(SCRIPT_SRC_PLACEHOLDER, "script-src " + " ".join(hashes), 1)
