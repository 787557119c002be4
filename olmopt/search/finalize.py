"""``export best``: the winning Recipe of a campaign, checked on a fresh load and written out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from olmopt.confidence import mean_with_interval
from olmopt.errors import InputError, ModelError
from olmopt.evaluate.early_stop import Scored
from olmopt.export import (
    ReproductionError,
    metrics_match,
    model_card,
    olm_report_sections,
    provenance,
    write_model_dir,
)
from olmopt.model_ids import public_ids, renamed_everywhere
from olmopt.outdir import check_output
from olmopt.recipe import Recipe
from olmopt.report import add_donor_map
from olmopt.sealed_split import sealed_test_report
from olmopt.search.annotate import annotate_export
from olmopt.search.api import check_inputs_unchanged
from olmopt.search.campaign import Campaign
from olmopt.search.context import EvalContext
from olmopt.search.kinds import get_kind
from olmopt.search.kinds.es import REFINE_INFO, refine_targets
from olmopt.search.storage import redact, sqlite_path
from olmopt.search.trials import RECIPE_ATTR, nonfinite_objectives

REPORT_STAGE_KEYS = (
    "stage", "winner", "trial", "kept_incumbent", "metrics", "held_out", "reason", "ties", "significance",
    "intervals", "runner_up", "incumbent_label",
)  # fmt: skip


def pick_recipe(
    campaign: Campaign, trial: int | None, stage_key: str | None
) -> tuple[Recipe, dict[str, float], str, int | None]:
    """(recipe, expected search metrics, stage key, trial number) to export."""
    decisions = campaign.decisions()
    if trial is None and stage_key is None:
        for stage in reversed(campaign.plan):
            d = decisions.get(stage.key)
            if d:
                if stage is not campaign.plan[-1]:
                    raise InputError(
                        f"campaign {campaign.name!r} is not finished (run `olmopt study run {campaign.name}`)"
                    )
                return d.recipe, d.metrics, stage.key, d.trial
        raise InputError(f"campaign {campaign.name!r} has no decided stage yet")
    stages = {s.key: s for s in campaign.plan}
    key = stage_key or campaign.plan[-1].key
    if key not in stages:
        raise InputError(f"no stage {key!r} in campaign {campaign.name!r} (see `olmopt study status`)")
    study = campaign.existing_stage_study(stages[key])
    if study is None:
        raise InputError(f"stage {key!r} has not run yet")
    if trial is None:
        d = decisions.get(key)
        if not d:
            raise InputError(f"stage {key!r} is not decided yet; pass --trial N")
        return d.recipe, d.metrics, key, d.trial
    match = [t for t in study.get_trials(deepcopy=False) if t.number == trial and t.values]
    if not match:
        raise InputError(f"stage {key!r} has no complete trial {trial}")
    t = match[0]
    names = campaign.objective_names()
    return Recipe.from_json(t.user_attrs[RECIPE_ATTR]), dict(zip(names, t.values, strict=False)), key, trial


def export_best(
    name: str,
    url: str,
    out: Path,
    trial: int | None = None,
    stage_key: str | None = None,
    force: bool = False,
    progress: bool = True,
    compare_donors: bool = True,
    refine: str | None = None,
    es_units: list[str] | None = None,
) -> dict[str, Any]:
    """Export the campaign's winner; ``refine="es"`` first runs ES stages on its units (resumable)."""
    campaign = Campaign.load(name, url)
    check_output(out, _campaign_inputs(campaign, url), force)
    check_inputs_unchanged(campaign)
    if refine not in (None, "es"):
        raise InputError(f"--refine {refine!r}: the only refinement is 'es'")
    if refine and (trial is not None or stage_key is not None):
        raise InputError("--refine refines the campaign's winner: do not combine it with --trial or --stage")
    if refine and REFINE_INFO not in campaign.info:
        pick_recipe(campaign, None, None)  # the campaign must be finished before it is refined
    ctx = EvalContext(campaign.config)
    check_output(out, [m.path for m in ctx.pool.models.values()], force)
    refined = refine_es(campaign, ctx, es_units, progress) if refine else None
    recipe, expected, key, trial_number = pick_recipe(campaign, trial, stage_key)
    searched = ctx.evaluate(recipe, "search")
    got = searched.metrics
    nonfinite = nonfinite_objectives(got, list(got))
    if nonfinite:
        where = f"trial {trial_number} of stage {key}" if trial_number is not None else f"stage {key}"
        raise ModelError(
            f"{where}: the model gives non-finite outputs (NaN/inf logits) on {', '.join(nonfinite)}; not "
            "exported"
        )
    if not metrics_match(expected, got):
        raise ReproductionError(
            f"rebuilt recipe does not reproduce the trial's metrics: expected {expected}, got {got}"
        )
    has_held = any(o.held_out > 0 for o in ctx.objectives)
    held = ctx.score(recipe, "held_out") if has_held else {}
    sealed = sealed_test(campaign, ctx, recipe, searched)  # the one reading of the test part
    table = [{"model": "merged (olmopt)", "search": got, "held_out": held}]
    refine_report = None
    if refined is not None:
        refine_report = refinement_report(campaign, ctx, refined, recipe, got, held)
        before = refine_report["before"]
        table.append(
            {"model": "merged, before ES", "search": before["search"], "held_out": before["held_out"]}
        )
    if compare_donors:
        for model in campaign.config.pool.models:
            donor = Recipe(base=model)
            table.append(
                {
                    "model": model + (" (base)" if model == recipe.base else ""),
                    "search": ctx.score(donor, "search"),
                    "held_out": ctx.score(donor, "held_out") if has_held else {},
                }
            )
    names = campaign.objective_names()
    directions = campaign.directions()
    counts = (
        {o.name: held_out_items(ctx, o) for o in ctx.objectives if o.kind != "recipe"} if has_held else {}
    )
    verdict = copeland_verdict(table, directions, counts) if has_held and compare_donors else None
    decisions = campaign.decisions()
    report = olm_report_sections(
        get_kind(s.kind).olm_report(s, decisions[s.key]) for s in campaign.plan if s.key in decisions
    )
    report.update(
        {
            "recipe": recipe.to_dict(),
            "objectives": {
                o.name: {
                    "metric": o.metric,
                    "direction": o.direction,
                    "dataset": str(o.path),
                    "held_out": o.held_out,
                }
                | ({"test": o.test} if o.test > 0 else {})
                | ({"lm_eval_task": o.lm_eval.task} if o.lm_eval is not None else {})
                for o in ctx.objectives
            },
            "stages": [
                {k: v for k, v in d.to_dict().items() if k in REPORT_STAGE_KEYS}
                for d in (decisions[s.key] for s in campaign.plan if s.key in decisions)
            ],
            "merged": {"search": got, "held_out": held} | ({"test": sealed["values"]} if sealed else {}),
            "comparison": table,
            "held_out_copeland": verdict,
            "provenance": provenance(redact(url), name, key, trial_number, campaign.info.get("datasets", {})),
        }
    )
    if refine_report is not None:
        report["refine"] = refine_report
    if sealed:
        report["test"] = sealed
    # the directory is meant to be shared: models by hub id or directory name, no local path anywhere
    config = campaign.config
    ids = public_ids(list(config.pool.models), config.path(config.pool.base_dir or "."))
    to_id = {m: v["id"] for m, v in ids.items()}
    report = renamed_everywhere(report, to_id)
    report["pool"] = {v["id"]: {"source": v["source"]} for v in ids.values()}
    for info in report["objectives"].values():
        info["dataset"] = Path(info["dataset"]).name
    card = model_card(
        f"{name} (olmopt merge)", recipe.renamed(to_id), renamed_everywhere(table, to_id), names, directions,
        pool=report["pool"], objective_info=report["objectives"], campaign=name, sealed_test=sealed,
    )  # fmt: skip
    adapter = ctx.pool.adapter
    units = adapter.all_units(ctx.pool[recipe.base].checkpoint.keys())
    write_model_dir(  # the donor map is written before the directory appears: complete or absent
        ctx.pool, recipe, out, report, card, force=force, progress=progress,
        finish=lambda tmp: add_donor_map(tmp, recipe, units, adapter.num_layers),
    )  # fmt: skip
    annotate_export(campaign, out)
    result: dict[str, Any] = {
        "out": str(out),
        "recipe": recipe.to_dict(),
        "stage": key,
        "trial": trial_number,
    }
    result.update({"metrics": got, "held_out": held, "comparison": table, "held_out_copeland": verdict})
    if sealed:
        result["test"] = sealed
    if refine_report is not None:
        result["refine"] = refine_report
    return result


def refine_es(
    campaign: Campaign, ctx: EvalContext, units: list[str] | None, progress: bool
) -> dict[str, Any]:
    """Append ES stages for the winner's units to the plan (once) and run them like any stage.

    Returns the campaign's refine info ``{"method", "before" (stage key), "first" (stage index)}``. A
    second call resumes (or finds done) the stages planned by the first; ``units`` then is ignored.
    """
    from olmopt.search.runner import CampaignRunner
    from olmopt.search.storage import single_writer
    from olmopt.search.workers import Evaluators

    with single_writer(campaign.url):
        info = campaign.info.get(REFINE_INFO)
        if info is None:
            recipe, _, key, _ = pick_recipe(campaign, None, None)
            specs = refine_targets(campaign, recipe, ctx.pool.adapter, ctx.working.param_names, units)
            info = {"method": "es", "before": key, "first": len(campaign.plan)}
            campaign.extend_plan(specs, {REFINE_INFO: info})
        outcome = CampaignRunner(campaign, Evaluators(campaign.config, 1, ctx), progress).run()
    if not outcome.finished:
        raise InputError(f"campaign {campaign.name!r}: ES refinement stopped early; run it again to resume")
    return dict(info)


def refinement_report(
    campaign: Campaign,
    ctx: EvalContext,
    info: dict[str, Any],
    recipe: Recipe,
    got: dict[str, float],
    held: dict[str, float],
) -> dict[str, Any]:
    """Before/after metrics, the ES stages and the accepted steps of a refinement."""
    decision = campaign.decisions()[info["before"]]
    before = decision.recipe
    has_held = any(o.held_out > 0 for o in ctx.objectives)
    return {
        "method": info["method"],
        "stages": [s.key for s in campaign.plan[info["first"] :]],
        "acceptance": campaign.config.decisions.es.acceptance,
        "steps": [step.model_dump(mode="json") for step in recipe.es[len(before.es) :]],
        "before": {
            "stage": info["before"],
            "search": decision.metrics,
            "held_out": ctx.score(before, "held_out") if has_held else {},
        },
        "after": {"search": got, "held_out": held},
    }


def sealed_test(campaign: Campaign, ctx: EvalContext, recipe: Recipe, search: Scored) -> dict[str, Any]:
    """The merged model on the sealed test part (``objectives[].test``), scored here and nowhere else:
    ``sealed_split.sealed_test_report`` (intervals from both parts' per-item values) plus the figures as
    ``values``; {} when no objective has one."""
    sealed = [o for o in ctx.objectives if o.test > 0]
    if not sealed:
        return {}
    tested = ctx.evaluate(recipe, "test")
    values = tested.metrics
    ev = ctx.evaluator
    counts = {o.name: (len(ev.encoded(o, "search")), len(ev.encoded(o, "test"))) for o in sealed}
    metric_of = {o.name: o.metric for o in sealed}
    per_item = {
        o.name: (search.items[o.name], tested.items[o.name])
        for o in sealed
        if search.items.get(o.name) and tested.items.get(o.name)
    }
    tokens = {
        o.name: (ev.answer_tokens(o, "search"), ev.answer_tokens(o, "test"))
        for o in sealed
        if o.metric == "perplexity"
    }
    level = campaign.config.selection.confidence
    report = sealed_test_report(
        search.metrics, values, campaign.directions(), metric_of, counts, level, per_item, tokens
    )
    return {"values": values} | report


def held_out_items(ctx: EvalContext, objective: Any) -> int:
    """Number of held-out items of an objective (0 when it has none)."""
    if objective.held_out <= 0 or objective.lm_eval is not None:  # lm-eval documents: not counted here
        return 0
    return len(ctx.evaluator.encoded(objective, "held_out"))


def copeland_verdict(
    table: list[dict[str, Any]], directions: dict[str, str], counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """The merged model (``table[0]``) against every single pool model on the held-out objectives.

    Copeland scores hide magnitudes, so the verdict also gives each model's held-out mean with a 95 %
    interval (``mean_with_interval``; only when every objective is maximised accuracy-like), the donors
    whose mean is higher than the merge's, and the donors the merge only draws with (as many held-out
    objectives won as lost)."""
    from olmopt.select import copeland, rank_table

    held = {row["model"]: row["held_out"] for row in table}
    scores = {o: {m: v[o] for m, v in held.items()} for o in directions}
    cope = copeland(rank_table(scores, directions))
    merged = table[0]["model"]
    best_single = max(v for m, v in cope.items() if m != merged)
    means = {m: mean_with_interval(v, directions, counts) for m, v in held.items()}
    merged_mean = means[merged]
    higher = [m for m, mv in means.items() if m != merged and mv and merged_mean and mv[0] > merged_mean[0]]
    draws = []
    for m, values in held.items():
        if m == merged:
            continue
        sign = {o: 1 if d == "maximize" else -1 for o, d in directions.items()}
        wins = sum(sign[o] * (held[merged][o] - values[o]) > 0 for o in directions)
        losses = sum(sign[o] * (held[merged][o] - values[o]) < 0 for o in directions)
        if wins == losses:
            draws.append(m)
    return {
        "scores": cope,
        "merged_is_sole_winner": cope[merged] > best_single,
        "means": means,
        "higher_mean": higher,
        "draws": draws,
    }


def _campaign_inputs(campaign: Campaign, url: str) -> list[Path]:
    """Files ``export best`` reads besides the pool: the datasets and the storage's file."""
    inputs = [campaign.config.path(o.dataset) for o in campaign.config.objectives]
    if url.startswith("journal:"):
        inputs.append(Path(url[len("journal:") :]))
    elif (database := sqlite_path(url)) is not None:
        inputs.append(database)
    return inputs
