"""PNG plots of a campaign (matplotlib, Agg canvas; no pyplot state, no display needed).

Sizes are fixed by the data's shape so that pages and tests can rely on them: see ``*_size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from olmopt.recipe import Recipe

DPI = 100
WIDTH = 960
PARETO_SIZE = (720, 540)
PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]
UNKNOWN = "#dddddd"


def short_name(donor: str) -> str:
    """A donor as people read it: a local path's last component, a hub id as is."""
    return Path(donor).name if donor.startswith(("/", ".", "~")) else donor


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _figure(width: int, height: int) -> Figure:
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")


def _arrow(direction: str) -> str:
    return "↓" if direction == "minimize" else "↑"


# -- donor map --------------------------------------------------------------------------------------
def donor_map_size(num_layers: int) -> tuple[int, int]:
    """(width, height) in pixels of the donor map of a model with ``num_layers`` layers."""
    return WIDTH, max(480, 200 + 24 * num_layers)


def _layer_of(unit: str) -> int | None:
    parts = unit.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _column_of(unit: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``."""
    parts = unit.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[i + 2 :]) or "layer"
    return unit


def unit_donor(recipe: Recipe, unit: str) -> str:
    """The donor that supplies ``unit`` in ``recipe`` (unit swap, else layer swap, else boundary/base)."""
    if unit in recipe.units:
        return recipe.units[unit]
    layer = _layer_of(unit)
    if layer is not None:
        return recipe.layers.get(layer, recipe.base)
    return recipe.boundary or recipe.base


def donor_map_png(recipe: Recipe, units: Sequence[str], num_layers: int, path: Path) -> Path:
    """Layers x units grid coloured by donor (boundary units on top; ``es`` marks ES-perturbed units).

    ``units`` are full unit names (``ArchitectureAdapter.all_units``); with none, one column per layer.
    """
    layer_units = [u for u in units if _layer_of(u) is not None]
    boundary = [u for u in units if _layer_of(u) is None] or ["boundary"]
    columns = list(dict.fromkeys(_column_of(u) for u in layer_units)) or ["layer"]
    es_units = {s.unit for s in recipe.es}

    def donor(layer: int | None, column: str) -> str:
        if layer is None:
            return recipe.boundary or recipe.base if column == "boundary" else unit_donor(recipe, column)
        return unit_donor(
            recipe, f"model.layers.{layer}.{column}" if column != "layer" else f"model.layers.{layer}"
        )

    grid = [[donor(i, c) for c in columns] for i in range(num_layers)]
    top = [donor(None, u) for u in boundary]
    donors = list(dict.fromkeys([recipe.base, *sorted({d for row in grid for d in row} | set(top))]))
    colour = {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(donors)}
    index = {d: i for i, d in enumerate(donors)}
    cmap = ListedColormap([colour[d] for d in donors] or [UNKNOWN])

    fig = _figure(*donor_map_size(num_layers))
    axes = fig.subplots(2, 1, height_ratios=[1, max(num_layers, 1)])
    ax_top, ax = axes[0], axes[1]
    ax_top.imshow([[index[d] for d in top]], cmap=cmap, vmin=-0.5, vmax=len(donors) - 0.5, aspect="auto")
    ax_top.set_xticks(
        range(len(boundary)), [_column_of(u).removeprefix("model.") for u in boundary], fontsize=8
    )
    ax_top.set_yticks([0], ["boundary"], fontsize=8)
    for j, u in enumerate(boundary):
        if u in es_units:
            ax_top.text(j, 0, "es", ha="center", va="center", fontsize=7, color="black")
    if num_layers:
        ax.imshow(
            [[index[d] for d in row] for row in grid],
            cmap=cmap,
            vmin=-0.5,
            vmax=len(donors) - 0.5,
            aspect="auto",
        )
        ax.set_yticks(
            range(num_layers), [str(i) for i in range(num_layers)], fontsize=7 if num_layers > 24 else 8
        )
        for i in range(num_layers):
            for j, c in enumerate(columns):
                if f"model.layers.{i}.{c}" in es_units:
                    ax.text(j, i, "es", ha="center", va="center", fontsize=7, color="black")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    for a, rows, cols in ((ax_top, 1, len(boundary)), (ax, num_layers, len(columns))):
        a.set_xticks([x - 0.5 for x in range(1, cols)], minor=True)
        a.set_yticks([y - 0.5 for y in range(1, rows)], minor=True)
        a.grid(which="minor", color="white", linewidth=0.8)
        a.tick_params(which="minor", length=0)
    ax.set_ylabel("layer")
    title = "Donor map"
    extras = [
        *(["param merge: " + recipe.param_merge.method] if recipe.param_merge else []),
        *([f"fusion steps: {len(recipe.fusion)}"] if recipe.fusion else []),
        *(["data-flow path"] if recipe.dfs else []),
        *([f"ES steps: {len(recipe.es)}"] if recipe.es else []),
    ]
    ax_top.set_title(title + (f" ({', '.join(extras)})" if extras else ""))
    handles = [
        Patch(color=colour[d], label=short_name(d) + (" (base)" if d == recipe.base else "")) for d in donors
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8)
    return _save(fig, path)


# -- metrics across stages --------------------------------------------------------------------------
def metrics_size(n_objectives: int) -> tuple[int, int]:
    return WIDTH, 160 + 220 * n_objectives


def metrics_png(stages: list[dict[str, Any]], objectives: dict[str, str], path: Path) -> Path:
    """Each objective's decided value per stage: search (solid) and held-out (dashed)."""
    decided = [s for s in stages if s.get("decision")]
    fig = _figure(*metrics_size(len(objectives)))
    axes = fig.subplots(len(objectives), 1, squeeze=False, sharex=True)[:, 0]
    x = list(range(len(decided)))
    for ax, (name, direction) in zip(axes, objectives.items(), strict=True):
        search = [_num(s["decision"]["metrics"].get(name)) for s in decided]
        held = [_num((s["decision"].get("held_out") or {}).get(name)) for s in decided]
        ax.plot(x, search, marker="o", label="search")
        if any(not math.isnan(v) for v in held):
            ax.plot(x, held, marker="s", linestyle="--", label="held-out")
        ax.set_ylabel(f"{name} {_arrow(direction)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_title("Objectives after each stage")
    axes[-1].set_xticks(
        x, [_short_key(s["key"]) for s in decided], rotation=45, ha="right", fontsize=7 if len(x) > 20 else 8
    )
    return _save(fig, path)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and value is not None else math.nan


# -- Pareto front of a joint stage ------------------------------------------------------------------
def pareto_png(stage: dict[str, Any], objectives: dict[str, str], path: Path) -> Path:
    """Trials of a joint stage: with two objectives, a scatter with the Pareto set highlighted and the
    selected trial starred; with three or more, parallel coordinates (a scatter of two of them would show
    points of the Pareto set, the selected one included, as dominated); with one objective, the
    objective against the trial number, with the best-so-far line.
    """
    names = list(objectives)
    points = stage["points"]
    selected = (stage.get("decision") or {}).get("trial")
    fig = _figure(*PARETO_SIZE)
    ax = fig.subplots()
    if len(names) > 2:
        # 3+ objectives on two axes would make Pareto points look dominated: one line per trial instead
        chosen = _parallel_coordinates(ax, points, objectives, selected)
    elif len(names) == 2:
        fx, fy = names[0], names[1]

        def xy(p: dict[str, Any]) -> tuple[float, float]:
            return _num(p["values"].get(fx)), _num(p["values"].get(fy))

        groups = [
            ("infeasible", [p for p in points if not p["feasible"]], dict(marker="x", color="#e15759")),
            (
                "feasible",
                [p for p in points if p["feasible"] and not p["pareto"]],
                dict(marker="o", color="#9e9e9e", alpha=0.7),
            ),
            ("Pareto set", [p for p in points if p["pareto"]], dict(marker="o", color="#4e79a7")),
        ]
        for label, group, style in groups:
            if group:
                ax.scatter([xy(p)[0] for p in group], [xy(p)[1] for p in group], label=label, s=30, **style)  # type: ignore[arg-type]
        ax.set_xlabel(f"{fx} {_arrow(objectives[fx])}")
        ax.set_ylabel(f"{fy} {_arrow(objectives[fy])}")
        chosen = [xy(p) for p in points if p["number"] == selected]
    else:
        (name,) = names
        sign = 1.0 if objectives[name] == "minimize" else -1.0
        ordered = sorted(points, key=lambda p: p["number"])
        ys = [_num(p["values"].get(name)) for p in ordered]
        best, run = math.inf, []
        for y in ys:
            best = min(best, sign * y) if not math.isnan(y) else best
            run.append(sign * best)
        ax.scatter([p["number"] for p in ordered], ys, s=30, color="#9e9e9e", label="trials")
        ax.plot([p["number"] for p in ordered], run, color="#4e79a7", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{name} {_arrow(objectives[name])}")
        chosen = [
            (float(p["number"]), _num(p["values"].get(name))) for p in ordered if p["number"] == selected
        ]
    if chosen and len(names) <= 2:
        ax.scatter(
            [chosen[0][0]],
            [chosen[0][1]],
            marker="*",
            s=260,
            color="#edc948",
            edgecolors="black",
            zorder=5,
            label=f"selected (trial {selected})",
        )
    ax.set_title(f"Stage {stage['key']}: {len(points)} trials")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _parallel_coordinates(
    ax: Any, points: list[dict[str, Any]], objectives: dict[str, str], selected: int | None
) -> list[tuple[float, float]]:
    """Every objective on its own vertical axis, scaled to the stage's range with better up; one line per
    trial (infeasible, feasible, Pareto set over all objectives), the selected trial drawn on top."""
    names = list(objectives)
    seen = {n: [v for p in points if not math.isnan(v := _num(p["values"].get(n)))] for n in names}
    lo = {n: min(seen[n], default=0.0) for n in names}
    hi = {n: max(seen[n], default=1.0) for n in names}

    def scaled(p: dict[str, Any]) -> list[float]:
        out = []
        for n in names:
            v, span = _num(p["values"].get(n)), hi[n] - lo[n]
            x = 0.5 if not span or math.isnan(v) else (v - lo[n]) / span
            out.append(1.0 - x if objectives[n] == "minimize" else x)
        return out

    xs = list(range(len(names)))
    styles = [
        ("infeasible", lambda p: not p["feasible"], dict(color="#e15759", alpha=0.5, linestyle=":")),
        ("feasible", lambda p: p["feasible"] and not p["pareto"], dict(color="#9e9e9e", alpha=0.6)),
        ("Pareto set (all objectives)", lambda p: p["pareto"], dict(color="#4e79a7", alpha=0.8)),
    ]
    for label, keep, style in styles:
        for i, p in enumerate(q for q in points if keep(q) and q["number"] != selected):
            ax.plot(
                xs, scaled(p), marker="o", markersize=3, linewidth=1, label=label if i == 0 else None, **style
            )
    chosen = [p for p in points if p["number"] == selected]
    if chosen:
        ax.plot(xs, scaled(chosen[0]), marker="*", markersize=14, linewidth=3, color="#edc948",
                markeredgecolor="black", zorder=5, label=f"selected (trial {selected})")  # fmt: skip
    ax.set_xticks(xs, [f"{n} {_arrow(objectives[n])}\n{_span(lo[n], hi[n])}" for n in names], fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("within the stage's range (better up)")
    return []


def _span(lo: float, hi: float) -> str:
    return f"{lo:.3g}" if lo == hi else f"{lo:.3g} .. {hi:.3g}"


# -- ES progress ------------------------------------------------------------------------------------
def es_png(stages: list[dict[str, Any]], objectives: dict[str, str], path: Path) -> Path:
    """ES generations (stages whose ``plot`` is "es"): every candidate and the accepted value."""
    fig = _figure(*metrics_size(len(objectives)))
    axes = fig.subplots(len(objectives), 1, squeeze=False, sharex=True)[:, 0]
    for ax, (name, direction) in zip(axes, objectives.items(), strict=True):
        xs, ys, accepted = [], [], []
        for g, stage in enumerate(stages):
            d = stage.get("decision") or {}
            for cand in (d.get("candidates") or {}).values():
                xs.append(g)
                ys.append(_num(cand["metrics"].get(name)))
            accepted.append(_num((d.get("metrics") or {}).get(name)))
        ax.scatter(xs, ys, s=12, color="#9e9e9e", label="candidates")
        ax.plot(range(len(stages)), accepted, marker="o", color="#4e79a7", label="accepted")
        ax.set_ylabel(f"{name} {_arrow(direction)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_title("Evolution strategies: progress per generation")
    axes[-1].set_xticks(
        range(len(stages)), [_short_key(s["key"]) for s in stages], rotation=45, ha="right", fontsize=8
    )
    return _save(fig, path)


def _short_key(key: str) -> str:
    """Stage keys as tick labels: ``005-unit-model.layers.2.mlp.up_proj`` -> ``005-unit-L2.mlp.up_proj``."""
    return key.replace("model.layers.", "L")
