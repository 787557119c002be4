"""Campaign operations used by the CLI: create (with pre-flight validation), run, status."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from olmopt.config import StudyConfig
from olmopt.errors import InputError
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
    """Validate pool homology and every dataset (tokenized) before any heavy work; return the plan."""
    from transformers import AutoTokenizer

    from olmopt.evaluate.datasets import file_digest
    from olmopt.evaluate.engine import Evaluator
    from olmopt.search.context import objectives_of, open_pool

    pool = open_pool(config)
    pool.check_homology()
    base = config.base_model
    tokenizer = AutoTokenizer.from_pretrained(pool[base].path)
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
    names = pool[base].checkpoint.keys()
    if pool.adapter.tied_embeddings:
        names = [n for n in names if not n.startswith(pool.adapter.lm_head)]
    plan = plan_stages(config, pool.adapter, names)
    extra = {
        "datasets": {o.name: {"path": str(o.path), "sha256": file_digest(o.path)} for o in objectives if o.kind != "recipe"}
    }
    if lm_eval_info:
        extra["lm_eval"] = lm_eval_info
    return plan, extra


class _NoModel:
    """Stand-in model for tokenizing datasets without loading weights."""


def create_campaign(config: StudyConfig, url: str) -> Campaign:
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
    campaign = Campaign.load(name, url)
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
            campaign.record_run("failed", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise
        campaign.record_run("finished" if outcome.finished else "stopped")
        return outcome


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
                "state": "decided" if d else ("pending" if study is None else ("running" if running else "started")),
                "trials": counts,
                "winner": d["winner"] if d else None,
                "metrics": d["metrics"] if d else None,
                "held_out": d["held_out"] if d else None,
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
