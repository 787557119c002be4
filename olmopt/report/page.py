"""The report page: plots written beside ``index.html`` (or embedded as base64 with ``embed``)."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from olmopt.recipe import Recipe
from olmopt.report import plots

INDEX = "index.html"
STYLE = (
    "\n"
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222;padding:0 1em}\n"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}\n"
    "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}\n"
    "img{max-width:100%;border:1px solid #eee;margin:.5em 0}"
    "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}\n"
    ".muted{color:#777}\n"
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def write_report(data: dict[str, Any], out: Path, embed: bool = False) -> dict[str, Any]:
    """Write ``index.html`` and its PNGs under ``out``; returns {"index": path, "plots": {name: path}}."""
    out.mkdir(parents=True, exist_ok=True)
    objectives: dict[str, str] = data["objectives"]
    stages: list[dict[str, Any]] = data["stages"]
    figures: list[tuple[str, str, Path]] = []  # (section title, caption, png)
    if data.get("recipe"):
        recipe = Recipe.from_dict(data["recipe"])
        png = plots.donor_map_png(
            recipe, data.get("units") or [], int(data.get("num_layers") or 0), out / "donor_map.png"
        )
        figures.append(
            ("Donor map", "Which pool model supplies each layer and tensor unit of the final Recipe.", png)
        )
    if any(s.get("decision") for s in stages):
        png = plots.metrics_png(stages, objectives, out / "metrics.png")
        figures.append(
            ("Metrics across stages", "Each objective after each decided stage; held-out data dashed.", png)
        )
    for stage in stages:
        if stage.get("plot") == "pareto" and stage["points"]:
            png = plots.pareto_png(stage, objectives, out / f"pareto_{_slug(stage['key'])}.png")
            caption = (
                "Trials on the first two objectives; the Pareto set (over all objectives, feasible trials) "
                "in blue, the selected trial starred."
                if len(objectives) > 1
                else "Trials and the best value so far; the selected trial starred."
            )
            figures.append((f"Stage {stage['key']}", caption, png))
    es = [s for s in stages if s.get("plot") == "es"]
    if es:
        png = plots.es_png(es, objectives, out / "es_progress.png")
        figures.append(
            ("Evolution strategies", "Every ES candidate per generation and the accepted value.", png)
        )
    index = out / INDEX
    index.write_text(_page(data, figures, out, embed), encoding="utf-8")
    return {"index": str(index), "plots": {png.stem: str(png) for _, _, png in figures}}


def _img(png: Path, out: Path, embed: bool, alt: str) -> str:
    if embed:
        src = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    else:
        src = png.relative_to(out).as_posix()
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4f}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape('-' if value is None else str(value))}</td>"


def _page(data: dict[str, Any], figures: list[tuple[str, str, Path]], out: Path, embed: bool) -> str:
    e = html.escape
    objectives: dict[str, str] = data["objectives"]
    names = list(objectives)
    arrows = {n: "↓" if d == "minimize" else "↑" for n, d in objectives.items()}
    decided = sum(1 for s in data["stages"] if s["state"] == "decided")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>olmopt report: {e(data['name'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Campaign {e(data['name'])}</h1>",
        f'<p class="muted">storage {e(str(data.get("storage")))} &middot; created '
        f"{e(str(data.get('created')))} "
        f"&middot; olmopt {e(str(data.get('olmopt_version')))} &middot; {decided} of {len(data['stages'])} "
        f"stages decided{'' if data.get('finished') else ' (in progress)'}</p>",
        "<h2>Pool and objectives</h2><ul>",
        *[
            f"<li>{e(plots.short_name(m))} <span class='muted'>{e(m)}</span></li>"
            for m in data.get("pool", [])
        ],
        "</ul><p>" + ", ".join(f"{e(n)} {arrows[n]}" for n in names) + "</p>",
        "<h2>Stages</h2><table><tr><th>stage</th><th>state</th><th>winner</th><th>trial</th>",
        *[f"<th>{e(n)} {arrows[n]}</th><th>{e(n)} held-out</th>" for n in names],
        "<th>reason</th></tr>",
    ]
    for s in data["stages"]:
        d = s.get("decision") or {}
        metrics, held = d.get("metrics") or {}, d.get("held_out") or {}
        cells = "".join(_cell(metrics.get(n)) + _cell(held.get(n)) for n in names)
        winner = plots.short_name(str(d["winner"])) if d.get("winner") else None
        parts.append(
            f"<tr>{_cell(s['key'])}{_cell(s['state'])}{_cell(winner)}{_cell(d.get('trial'))}{cells}{_cell(d.get('reason'))}</tr>"
        )
    parts.append("</table>")
    parts += _significance(data["stages"], names)
    for title, caption, png in figures:
        parts += [f"<h2>{e(title)}</h2>", f"<p>{e(caption)}</p>", _img(png, out, embed, title)]
    if data.get("recipe"):
        parts += [
            "<h2>Final Recipe</h2>",
            f"<pre>{e(json.dumps(data['recipe'], indent=2, sort_keys=True))}</pre>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _significance(stages: list[dict[str, Any]], names: list[str]) -> list[str]:
    """The decisions' significance tables: per stage, the runner-up and the incumbent against the winner,
    per objective: the difference, its interval, the rule and whether it is significant."""
    rows = [row for s in stages for row in _significance_rows(s, names)]
    if not rows:
        return []
    rules = [
        f"<li>{html.escape(s['key'])}: {html.escape(str(s['decision']['ties']))}</li>"
        for s in stages
        if (s.get("decision") or {}).get("ties")
    ]
    return [
        "<h2>Significant differences</h2>",
        "<p>Per stage, the runner-up and the incumbent against the winner: the difference (candidate minus "
        "winner), its confidence interval and whether it is significant (a tie when the interval holds 0). "
        "Every candidate's verdict is in the stage's decision (<code>significance</code>) and the exported "
        "<code>merge_report.json</code>.</p>",
        '<table class="significance"><tr><th>stage</th><th>candidate</th><th>role</th><th>objective</th>'
        "<th>difference</th><th>interval</th><th>rule</th><th>significant</th></tr>",
        *rows,
        '</table><ul class="muted">',
        *rules,
        "</ul>",
    ]


def _significance_rows(stage: dict[str, Any], names: list[str]) -> list[str]:
    d = stage.get("decision") or {}
    table = d.get("intervals") or {}
    roles: dict[str, list[str]] = {}  # label -> its roles (the runner-up may be the incumbent)
    for name, label in (("runner-up", d.get("runner_up")), ("incumbent", d.get("incumbent_label"))):
        if label and label in table:
            roles.setdefault(str(label), []).append(name)
    candidates = d.get("candidates") or {}
    best = (candidates.get(str(d.get("winner"))) or {}).get("metrics") or {}
    rows = []
    for label, of in roles.items():
        mine = (candidates.get(label) or {}).get("metrics") or {}
        for n in names:
            entry = table[label].get(n)
            if entry is None:
                continue
            verdict, interval = str(entry.get("verdict")), entry.get("interval")
            span = f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval else None
            diff = mine[n] - best[n] if n in mine and n in best else None
            significant = "no (tie)" if verdict == "tie" else f"yes ({verdict})"
            rows.append(
                f"<tr>{_cell(stage['key'])}{_cell(plots.short_name(label))}{_cell(' and '.join(of))}"
                f"{_cell(n)}{_cell(diff)}{_cell(span)}{_cell(entry.get('rule'))}{_cell(significant)}</tr>"
            )
    return rows
