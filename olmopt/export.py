"""The finalizer: rebuild a Recipe on a fresh load, check it, and write a Hugging Face model directory.

The directory holds config, tokenizer (with chat template), generation config, sharded safetensors
with an index, ``merge_report.json`` (OLM's keys plus the Recipe, stage decisions, held-out figures and
provenance) and a README model card. It is written atomically: temp dir, then rename.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from olmopt import __version__
from olmopt.errors import InputError, OlmoptError
from olmopt.outdir import ShardedSafetensorsWriter, atomic_output_dir, check_output, copy_side_files
from olmopt.patch import materialize
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import Recipe
from olmopt.sealed_split import card_section
from olmopt.textio import read_text

REPORT_FILE = "merge_report.json"
DEFAULT_SHARD_BYTES = 2 * 10**9


class ReproductionError(OlmoptError):
    """Exported weights do not reproduce the metrics recorded for the trial."""


def metrics_match(
    expected: dict[str, float], got: dict[str, float], rel: float = 1e-4, abs_: float = 1e-5
) -> bool:
    return all(
        name in got
        and (
            math.isclose(v, got[name], rel_tol=rel, abs_tol=abs_) or (math.isnan(v) and math.isnan(got[name]))
        )
        for name, v in expected.items()
    )


def write_model_dir(
    pool: ModelPool,
    recipe: Recipe,
    out: Path,
    report: dict[str, Any],
    card: str,
    force: bool = False,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    finish: Callable[[Path], object] | None = None,
) -> Path:
    """Materialise ``recipe`` from ``pool`` into ``out`` atomically, with report and model card.

    ``finish(tmp)`` adds the last files (the donor map) before the directory appears at ``out``.
    """
    with atomic_output_dir(out, force, inputs=[m.path for m in pool.models.values()]) as tmp:
        copy_side_files(pool[recipe.base].path, tmp)
        if recipe.fusion or recipe.dfs:
            _write_architecture_recipe(pool, recipe, tmp)
        else:
            names = pool[recipe.base].checkpoint.keys()
            with ShardedSafetensorsWriter(tmp, max_shard_bytes) as writer:
                for name, tensor in tqdm(
                    materialize(pool, recipe),
                    total=len(names),
                    desc="writing",
                    disable=not progress,
                    leave=False,
                ):
                    writer.add(name, tensor)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=True) + "\n")
        (tmp / "README.md").write_text(card)
        if finish is not None:
            finish(tmp)
    return out


def _write_architecture_recipe(pool: ModelPool, recipe: Recipe, tmp: Path) -> None:
    """Fusion: patch the swap part on a fresh CPU model, fuse, save. Data-flow path: fold and save."""
    if recipe.dfs is not None:
        from olmopt.methods.dfs.resident import export_dfs

        export_dfs(pool, recipe, tmp)
        return
    from olmopt.methods.fusion.resident import export_fused, without_fusion
    from olmopt.patch import WorkingModel

    working = WorkingModel(pool, recipe.base, device="cpu")
    working.apply(without_fusion(recipe))
    export_fused(working.model, recipe, tmp)


def olm_report_sections(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """OLM's report keys (base_model, boundary_layers, layers, tensors) from the stages' parts, in plan
    order (each decision kind's ``olm_report``): ``layers`` and ``tensors`` collect, the others are set."""
    report: dict[str, Any] = {"layers": {}, "tensors": {}}
    for part in parts:
        for key, value in part.items():
            if key in ("layers", "tensors"):
                report[key].update(value)
            else:
                report[key] = value
    return report


def model_card(
    title: str,
    recipe: Recipe,
    table: list[dict[str, Any]],
    objectives: list[str],
    directions: dict[str, str],
    pool: dict[str, dict[str, str]] | None = None,
    objective_info: dict[str, dict[str, Any]] | None = None,
    campaign: str | None = None,
    sealed_test: dict[str, Any] | None = None,
) -> str:
    """README.md ready for the Hub: front matter (``base_model`` lists the Hub ids among the merged
    models), the merged models with their roles, the recipe in words and as JSON, the objectives and the
    search / held-out metrics table, and the sealed test section (``sealed_split``) when there is one.
    ``recipe``, ``table`` and ``pool`` (model id -> {source}) already
    name models by their public ids (``model_ids.public_ids``): no local path appears."""
    pool = pool or {}
    used = _roles(recipe)
    hub = [m for m in used if pool.get(m, {}).get("source") == "hub"]
    local = [m for m in [*used, *pool] if pool.get(m, {}).get("source") == "local"]
    front = ["---"]
    if hub:
        front += ["base_model:", *(f"- {m}" for m in hub), "base_model_relation: merge"]
    front += ["library_name: transformers", "tags:", "- merge", "- olmopt", "---"]
    what = f"campaign `{campaign}`" if campaign else "a campaign"
    lines = [
        *front,
        f"# {title}",
        "",
        f"A merge of {len(used)} model{'s' if len(used) != 1 else ''} found by [olmopt](https://github.com/) "
        f"{__version__}: {what} searched the merge decisions below by black-box optimization and selected "
        "each one on the search data; held-out figures are on items the search never saw.",
        "",
    ]
    if local:
        names = ", ".join(f"`{m}`" for m in dict.fromkeys(local))
        lines += [
            f"> **Note:** {names} {'are local models' if len(set(local)) > 1 else 'is a local model'}, named "
            "here by directory name: not a Hugging Face Hub id. Replace such names by Hub ids before "
            "uploading if the models are published (`olmopt rebuild --models-dir DIR` finds them as "
            "`DIR/NAME`).",
            "",
        ]
    lines += ["## Merged models", "", "| model | role |", "|---|---|"]
    for model, roles in used.items():
        lines.append(f"| `{model}` | {'; '.join(roles)} |")
    for model in pool:
        if model not in used:
            lines.append(f"| `{model}` | in the pool, not selected |")
    lines += ["", "## Recipe", "", *_recipe_lines(recipe), ""]
    lines += [
        "<details><summary>The recipe as JSON (<code>merge_report.json</code> holds it too; "
        "<code>olmopt rebuild</code> rebuilds the model from it)</summary>",
        "",
        "```json",
        json.dumps(recipe.to_dict(), indent=2, sort_keys=True),
        "```",
        "",
        "</details>",
        "",
    ]
    if objective_info:
        lines += [
            "## Objectives",
            "",
            "| objective | metric | direction | dataset | held-out fraction |",
            "|---|---|---|---|---|",
        ]
        for n in objectives:
            o = objective_info.get(n, {})
            lines.append(
                f"| {n} | {o.get('metric', '-')} | {directions[n]} | {o.get('dataset', '-')} | "
                f"{o.get('held_out', '-')} |"
            )
        lines.append("")
    lines += [
        "## Metrics",
        "",
        "Arrows give each objective's direction; `search` is the data the search saw, `held-out` is not.",
        "",
    ]
    arrows = {n: "↓" if directions[n] == "minimize" else "↑" for n in objectives}
    header = "| model | " + " | ".join(f"{n} {arrows[n]} search | {n} held-out" for n in objectives) + " |"
    lines += [header, "|" + "---|" * (1 + 2 * len(objectives))]
    for row in table:
        cells = []
        for n in objectives:
            cells += [_fmt(row["search"].get(n)), _fmt(row.get("held_out", {}).get(n))]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    if sealed_test:
        lines += ["", *card_section(sealed_test)]
    return "\n".join(lines) + "\n"


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(f"`{i}`" for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _roles(recipe: Recipe) -> dict[str, list[str]]:
    """Model -> what it supplies in ``recipe`` (the base first)."""
    roles: dict[str, list[str]] = {recipe.base: ["base: every tensor not supplied by another model"]}

    def add(model: str, role: str) -> None:
        roles.setdefault(model, []).append(role)

    if recipe.boundary:
        add(recipe.boundary, "boundary: embeddings, final norm and head")
    by_layer: dict[str, list[int]] = {}
    for layer, donor in sorted(recipe.layers.items()):
        by_layer.setdefault(donor, []).append(layer)
    for donor, layers in by_layer.items():
        add(donor, f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}")
    by_unit: dict[str, list[str]] = {}
    for unit, donor in sorted(recipe.units.items()):
        by_unit.setdefault(donor, []).append(unit)
    for donor, units in by_unit.items():
        add(donor, f"{len(units)} tensor unit{'s' if len(units) > 1 else ''}: {_listing(units)}")
    if recipe.param_merge:
        for model in recipe.param_merge.models:
            add(model, f"delta merged into the base ({recipe.param_merge.method})")
    if recipe.dfs:
        hops: dict[str, int] = {}
        for hop_model, _layer in recipe.dfs.hops:
            hops[str(hop_model)] = hops.get(str(hop_model), 0) + 1
        for model, n in hops.items():
            add(model, f"{n} layer{'s' if n > 1 else ''} of the data-flow path")
    return roles


def _recipe_lines(recipe: Recipe) -> list[str]:
    """The recipe in words, one bullet per kind of decision."""
    out = [f"- **base model:** `{recipe.base}`"]
    if recipe.boundary:
        out.append(f"- **boundary** (embeddings, final norm, head) **from** `{recipe.boundary}`")
    if recipe.layers:
        out.append(
            "- **whole layers:** " + ", ".join(f"{i} ← `{d}`" for i, d in sorted(recipe.layers.items()))
        )
    if recipe.units:
        out.append("- **tensor units:**")
        out += [f"  - `{u}` ← `{d}`" for u, d in sorted(recipe.units.items())]
    if recipe.es:
        out.append(f"- **evolution-strategy steps:** {len(recipe.es)} (replayed from their seeds):")
        out += [f"  - {s.kind} on `{s.unit}`, sigma {s.sigma:g}, seed {s.seed}" for s in recipe.es]
    if recipe.param_merge:
        pm = recipe.param_merge
        params = ", ".join(f"{k} {v}" for k, v in sorted(pm.params.items())) or "defaults"
        models = ", ".join(f"`{m}`" for m in pm.models)
        out.append(
            f"- **parameter merge:** {pm.method} of {models} onto `{pm.base}` ({params}; seed {pm.seed})"
        )
    if recipe.fusion:
        steps = ", ".join(
            f"{json.dumps(step.model_dump(mode='json'), sort_keys=True)}" for step in recipe.fusion
        )
        out.append(f"- **depth fusion:** {len(recipe.fusion)} step(s): {steps}")
    if recipe.dfs:
        path = " → ".join(f"`{m}`[{layer}]" for m, layer in recipe.dfs.hops)
        out.append(f"- **data-flow path** ({len(recipe.dfs.hops)} layers): {path}")
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def provenance(
    url_redacted: str, campaign: str, stage: str | None, trial: int | None, datasets: dict[str, Any]
) -> dict[str, Any]:
    """Where the model came from, without local paths: a file storage and the datasets by file name."""
    storage = url_redacted
    for prefix in ("sqlite:///", "journal:"):
        if storage.startswith(prefix):
            storage = prefix + Path(storage.removeprefix(prefix)).name
    return {
        "olmopt_version": __version__,
        "storage": storage,
        "campaign": campaign,
        "stage": stage,
        "trial": trial,
        "datasets": {
            n: {**d, "path": Path(d["path"]).name} if "path" in d else d for n, d in datasets.items()
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- rebuild from a report ---------------------------------------------------------------------------
def recipe_from_report(report: dict[str, Any]) -> Recipe:
    """The report's Recipe, or one derived from OLM's keys for a report written by the original tool."""
    if "recipe" in report:
        return Recipe.from_dict(report["recipe"])
    try:
        base = report["base_model"]["name"]
    except (KeyError, TypeError):
        raise InputError("report: neither 'recipe' nor OLM's 'base_model.name' is present") from None
    boundary_entry = report.get("boundary_layers") or {}
    if isinstance(boundary_entry, dict):  # OLM: {"name": model, ...}
        boundary_entry = boundary_entry.get("name")
    boundary = _olm_model(boundary_entry, "boundary_layers")
    layers = {}
    for key, entry in _olm_section(report, "layers").items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise InputError(f"report: layers: key {key!r} is not a layer index") from None
        model = _olm_model(entry, f"layers.{key}")
        if model:
            layers[index] = model
    units = {}
    for name, entry in _olm_section(report, "tensors").items():
        model = _olm_model(entry, f"tensors.{name}")
        if model:
            units[name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name] = model
    if not isinstance(base, str) or not base:
        raise InputError("report: base_model.name must be a model name")
    return Recipe(base=base, boundary=boundary, layers=layers, units=units)


def _olm_section(report: dict[str, Any], key: str) -> dict[str, Any]:
    section = report.get(key) or {}
    if isinstance(section, list):  # [{"layer": 3, "best_model": ...}, ...] or [model, ...] by position
        out: dict[str, Any] = {}
        for i, entry in enumerate(section):
            where = entry.get("layer", entry.get("name", i)) if isinstance(entry, dict) else i
            out[str(where)] = entry
        return out
    if not isinstance(section, dict):
        raise InputError(
            f"report: {key} must be a mapping (or a list) of entries, got {type(section).__name__}"
        )
    return section


def _olm_model(entry: Any, where: str) -> str | None:
    """The model an OLM entry names: ``{"best_model": M}``, ``{"name": M}`` or ``M`` itself."""
    if entry is None or isinstance(entry, str):
        return entry or None
    if isinstance(entry, dict):
        model = entry.get("best_model", entry.get("name"))
        if model is None or isinstance(model, str):
            return model or None
    raise InputError(
        f"report: {where}: expected a model name or an entry with 'best_model', got {entry!r}"[:200]
    )


def resolve_report_models(
    recipe: Recipe, models_dir: Path | None, pool: dict[str, Any] | None = None
) -> dict[str, str]:
    """Donor name -> pool reference: ``models_dir/NAME`` (OLM kept ``org/name`` as ``models_dir/org_name``),
    else the name itself (a hub id, or a path in reports written before ids). ``pool`` (the report's
    model id -> {source}) says which names were local directories: those need ``models_dir``."""
    refs = {}
    for name in [recipe.base, *sorted(recipe.donors() - {recipe.base})]:
        found = None
        if models_dir is not None:
            found = next(
                (p for p in (models_dir / name, models_dir / name.replace("/", "_")) if p.is_dir()), None
            )
        if found is None and (pool or {}).get(name, {}).get("source") == "local":
            where = (
                f"no {models_dir / name}"
                if models_dir is not None
                else "pass --models-dir DIR, the directory that holds it"
            )
            raise InputError(f"report: model {name!r} was a local directory ({where})")
        refs[name] = str(found) if found is not None else name
    return refs


def rebuild(
    report_path: Path, out: Path, models_dir: Path | None = None, force: bool = False, progress: bool = True
) -> Recipe:
    """Rebuild a model directory from a merge report alone (olmopt's or the original OLM's)."""
    try:
        report = json.loads(read_text(report_path, "report"))
    except json.JSONDecodeError as exc:
        raise InputError(f"report {report_path}: not valid JSON ({exc})") from None
    if not isinstance(report, dict):
        raise InputError(f"report {report_path}: expected a JSON object")
    recipe = recipe_from_report(report)
    mapping = resolve_report_models(recipe, models_dir, report.get("pool"))
    recipe = recipe.renamed(mapping)
    pool = ModelPool(list(dict.fromkeys(mapping.values())))
    check_output(out, [report_path, *(m.path for m in pool.models.values())], force)
    pool.check_homology()
    try:  # a recipe that does not fit the models it names (a layer they lack) is refused, not written
        recipe.validate_against(
            pool.names, pool.adapter.num_layers, pool.adapter.all_units(pool[recipe.base].checkpoint.keys())
        )
    except InputError as exc:
        raise InputError(f"report {report_path}: {exc}") from None
    card = f"# Rebuilt merge\n\nRebuilt by olmopt {__version__} from `{report_path.name}`.\n"
    write_model_dir(pool, recipe, out, report, card, force=force, progress=progress)
    return recipe
