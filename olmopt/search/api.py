"""Campaign operations used by the CLI: create (with pre-flight validation), run, status."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from olmopt.config import NAME_RE, StudyConfig
from olmopt.errors import InputError, StudyKeyError
from olmopt.model_ids import short_names
from olmopt.search.campaign import Campaign
from olmopt.search.plan import Stage, plan_stages
from olmopt.search.storage import single_writer
from olmopt.search.workers import Evaluators

if TYPE_CHECKING:
    from olmopt.search.runner import RunOutcome

# torch and transformers (seconds of imports) are imported inside the functions: `study run --workers K`
# starts its worker processes first, so their imports overlap this process's own


def preflight(config: StudyConfig) -> tuple[list[Stage], dict[str, Any]]:
    """Validate pool homology, finite weights and every dataset
    (tokenized) before any heavy work; return the plan."""
    from olmopt.evaluate.datasets import file_digest
    from olmopt.evaluate.engine import Evaluator
    from olmopt.pool.model_pool import load_tokenizer
    from olmopt.search.context import objectives_of, open_pool

    check_device(config.evaluation.device)
    pool = open_pool(config)
    check_against_pool(config, pool.names, pool.adapter.num_layers)
    pool.check_homology()
    pool.check_finite()  # a damaged checkpoint would score as a (bad but finite-looking) model otherwise
    base = config.base_model
    tokenizer = load_tokenizer(pool[base])
    lm_eval_info = {}
    if any(o.kind == "lm_eval" for o in config.objectives):
        from olmopt.evaluate.lmeval import resolve_objectives

        lm_eval_info = resolve_objectives(config)  # fills in metric and direction from each task
    objectives = [o for o in objectives_of(config) if o.kind != "lm_eval"]
    evaluator = Evaluator(_NoModel(), tokenizer, objectives)  # type: ignore[arg-type]
    for split in ("search", "held_out"):
        if split == "held_out" and not any(o.held_out > 0 for o in objectives):
            continue
        for obj in objectives:
            if obj.kind == "recipe":
                continue
            enc = evaluator.encoded(obj, split)
            if obj.kind == "choice" and not enc.choice_ids:
                raise InputError(f"dataset {obj.path}: metric {obj.metric} needs multiple-choice items")
            check_context(obj.path, enc, getattr(pool[base].config, "max_position_embeddings", None))
    names = pool[base].checkpoint.keys()
    if pool.adapter.tied_embeddings:
        names = [n for n in names if not n.startswith(pool.adapter.lm_head)]
    plan = plan_stages(config, pool.adapter, names)
    extra = {
        "datasets": {
            o.name: {"path": str(o.path), "sha256": file_digest(o.path)}
            for o in objectives
            if o.kind != "recipe"
        }
    }
    if lm_eval_info:
        extra["lm_eval"] = lm_eval_info
    return plan, extra


def check_against_pool(config: StudyConfig, pool_names: list[str], num_layers: int) -> None:
    """Cross-field checks that need the opened pool: layer indices within the model, decision models in
    the pool (each a one-line InputError naming the key)."""
    d = config.decisions
    for key, swap in (("layers", d.layers), ("tensors", d.tensors)):
        for index in swap.only or []:
            if not 0 <= index < num_layers:
                raise StudyKeyError(
                    f"decisions.{key}.only: layer {index} is outside the model (layers 0..{num_layers - 1})"
                )
        if swap.only is not None and len(set(swap.only)) != len(swap.only):
            raise StudyKeyError(f"decisions.{key}.only lists a layer twice: {swap.only}")
    for key, models in (("merge", d.merge.models), ("dfs", d.dfs.models)):
        for model in models or []:
            if model not in pool_names:
                raise StudyKeyError(f"decisions.{key}.models: {model!r} is not in pool.models")
    if d.merge.mode in ("joint", "challenge"):
        from olmopt.search.kinds.merge import check_variant_count

        check_variant_count(d.merge.methods, len(d.merge.models) if d.merge.models else len(pool_names) - 1)


class _NoModel:
    """Stand-in model for tokenizing datasets without loading weights."""


def create_campaign(config: StudyConfig, url: str) -> Campaign:
    if not NAME_RE.match(config.name):  # a name given on the command line skipped the study file's check
        raise InputError(
            f"campaign name {config.name!r} must be 1-64 letters, digits, '_', '.', '-' (starting with a "
            "letter or digit)"
        )
    plan, extra = preflight(config)
    return Campaign.create(config, url, plan, extra)


def run_campaign(
    name: str,
    url: str,
    workers: int = 1,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> RunOutcome:
    check_run_limits(workers, n_trials, timeout)
    campaign = Campaign.load(name, url)
    check_inputs_unchanged(campaign)
    with single_writer(url):
        campaign.record_run("running")  # `study status` tells running, interrupted, stopped and failed apart
        try:
            evaluators = Evaluators(campaign.config, workers)  # K > 1: the worker processes start now
            try:
                from olmopt.search.runner import CampaignRunner

                runner = CampaignRunner(campaign, evaluators, progress, n_trials, timeout, log)
                outcome = runner.run()
            finally:
                evaluators.close()
        except KeyboardInterrupt:
            campaign.record_run("interrupted")
            raise
        except BaseException as exc:
            campaign.record_run(
                "failed", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            raise
        campaign.record_run("finished" if outcome.finished else "stopped")
        return outcome


def check_inputs_unchanged(campaign: Campaign) -> None:
    """The datasets recorded at ``study create`` are still there with the same bytes (their sha256), so a
    campaign never mixes scores of two versions of a file; else one line naming the file."""
    from olmopt.evaluate.datasets import file_digest

    for objective, entry in sorted((campaign.info.get("datasets") or {}).items()):
        path = Path(entry["path"])
        if not path.is_file():
            raise InputError(
                f"dataset {path} (objective {objective}) is gone since `study create`; restore it"
            )
        if file_digest(path) != entry["sha256"]:
            raise InputError(
                f"dataset {path} (objective {objective}) changed since `study create` (sha256 differs); "
                "restore it, or create a new campaign for the new data"
            )


def check_device(device: str | None) -> None:
    """``evaluation.device`` names a device this machine has (found at create, not after writes at run)."""
    if not device:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise StudyKeyError(
            f"evaluation.device: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise StudyKeyError(f"evaluation.device: {device!r} but this machine has no CUDA device")
        if dev.index is not None and dev.index >= count:
            raise StudyKeyError(f"evaluation.device: {device!r} but this machine has {count} CUDA device(s)")
    elif dev.type not in ("cpu", "meta"):
        available = getattr(torch, dev.type, None)
        if available is None or not getattr(available, "is_available", lambda: False)():
            raise StudyKeyError(f"evaluation.device: {device!r} is not available on this machine")


def check_context(path: Path, enc: Any, context: int | None) -> None:
    """Every item (prompt and answer) fits the model's context window; else one line naming the item."""
    if not context:
        return
    for i, (prompt, answer) in enumerate(zip(enc.prompts, enc.answers, strict=True)):
        if len(prompt) + len(answer) > context:
            raise InputError(
                f"dataset {path}: item {i} has {len(prompt) + len(answer)} tokens, more than the model's "
                f"context of {context} (max_position_embeddings)"
            )


def check_run_limits(workers: int, n_trials: int | None, timeout: float | None) -> None:
    """``--workers``, ``--n-trials`` and ``--timeout`` of ``study run``: positive (and finite), or refused."""
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if n_trials is not None and n_trials < 1:
        raise InputError(f"--n-trials must be >= 1, got {n_trials}")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise InputError(f"--timeout must be a positive number of seconds, got {timeout:g}")


def campaign_status(name: str, url: str) -> dict[str, Any]:
    """Stages with their state, trial counts, winners and metrics (JSON-ready)."""
    import optuna

    campaign = Campaign.load(name, url)
    decisions = campaign.decisions()
    state, detail = campaign.state(decisions)
    running = state == "running"
    stages = []
    for stage in campaign.plan:
        study = campaign.existing_stage_study(stage)
        counts = {"complete": 0, "running": 0, "waiting": 0, "failed": 0}
        if study is not None:
            for t in study.get_trials(deepcopy=False):
                key = {
                    optuna.trial.TrialState.COMPLETE: "complete",
                    optuna.trial.TrialState.RUNNING: "running",
                    optuna.trial.TrialState.WAITING: "waiting",
                    optuna.trial.TrialState.FAIL: "failed",
                }.get(t.state)
                if key:
                    counts[key] += 1
        d = decisions.get(stage.key)
        stages.append(
            {
                "stage": stage.key,
                "kind": stage.kind,
                "target": stage.target,
                "state": "decided"
                if d
                else ("pending" if study is None else ("running" if running else "started")),
                "trials": counts,
                "winner": d.winner if d else None,
                "metrics": d.metrics if d else None,
                "held_out": d.held_out if d else None,
            }
        )
    final = campaign.final_recipe()
    return {
        "name": name,
        "pool": short_names(list(campaign.config.pool.models)),
        "state": state,
        "error": detail,
        "finished": all(s["state"] == "decided" for s in stages),
        "objectives": campaign.directions(),
        "stages": stages,
        "recipe": final.to_dict() if final else None,
    }
