"""Run a campaign's stages in order: build each stage's space, evaluate its trials, record its decision.

Each stage's search space comes from its registered decision kind (``olmopt.search.kinds``: greedy
swaps enqueue every candidate, joint stages sample within a budget). The evaluation loop is
``search.evaluation.StageEvaluation``; the decision (feasible Pareto set, then Copeland over
per-objective ranks, Borda and a fixed order breaking ties; with nothing feasible the incumbent stays)
is the pure ``search.decide.decide``, which this module calls under the stage's decide lock.

Resumable and shareable: decided stages are skipped, finished trials are kept, candidates are enqueued
once under a storage-wide lock, trials left RUNNING by a dead worker are failed (SQLite: at start, since
this process is the only writer; RDB: by heartbeat) and retried, and every worker waits for the stage's
last trial before the (deterministic, hence idempotent) decision is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from olmopt.recipe import Recipe
from olmopt.search import trials as T
from olmopt.search.annotate import annotate_decision
from olmopt.search.campaign import Campaign, record_decision, stage_decision
from olmopt.search.coordination import POLL_SECONDS, WORKER_ID, StageLock, next_poll
from olmopt.search.decide import DecideRules, decide
from olmopt.search.decision import Decision
from olmopt.search.eval_cache import EvalCache, cached_scorer, open_cache
from olmopt.search.evaluation import StageEvaluation, extension_granted
from olmopt.search.identity import ModelKeys
from olmopt.search.kind import EXTENDED, Stage, StageSpace
from olmopt.search.kinds import get_kind
from olmopt.search.near_ties import RESUME_ATTR
from olmopt.search.seeding import TrialSeeded
from olmopt.search.storage import is_sqlite
from olmopt.search.workers import Evaluators


@dataclass
class RunOutcome:
    finished: bool
    stages_run: int
    trials_run: int
    final: Recipe | None


def make_sampler(
    campaign: Campaign, stage: Stage, worker_seed: int = 0, env: Any = None
) -> optuna.samplers.BaseSampler:
    """The kind's own sampler if it has one; else greedy stages only pop enqueued trials and joint stages
    use the configured sampler (per-worker seed)."""
    cfg = campaign.config.sampler
    seed = cfg.seed + 1000 * stage.index + worker_seed
    kind = get_kind(stage.kind)
    own = kind.sampler(stage, campaign.config, seed, env)
    if own is not None:
        return own
    if not kind.joint:
        return optuna.samplers.RandomSampler(seed=seed)
    name = kind.sampler_name(campaign.config) or cfg.name
    if name == "catcma":
        space = kind.distributions(stage, env)
        if space is not None:  # a kind that cannot declare its space up front gets TPE
            from olmopt.search.catcma_sampler import CatCmaSampler

            return CatCmaSampler(space, seed=seed, population_size=cfg.population_size)
    inner: optuna.samplers.BaseSampler
    if name == "nsga2":
        inner = optuna.samplers.NSGAIISampler(seed=seed, population_size=cfg.nsga2_population(stage.n_trials))
    elif name == "gp":
        inner = optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    elif name == "random":
        inner = optuna.samplers.RandomSampler(seed=seed)
    else:  # group=True keeps conditional parameters (per-method knobs, per-slot scales) in joint models
        inner = optuna.samplers.TPESampler(
            seed=seed,
            multivariate=cfg.multivariate,
            group=cfg.multivariate,
            n_startup_trials=cfg.n_startup_trials,
        )
    return TrialSeeded(inner, seed)  # a resumed stage suggests what an uninterrupted one would


@dataclass
class _Env:
    config: Any
    pool_names: list[str]
    adapter: Any
    param_names: list[str]
    context: Any  # the in-process EvalContext (resident model, tokenizer), for spaces that need it
    pool: Any  # the ModelPool of that context
    decisions: dict[str, Decision] = field(default_factory=dict)


class CampaignRunner:
    """Drives one campaign to completion (or until a timeout)."""

    def __init__(
        self,
        campaign: Campaign,
        evaluators: Evaluators,
        progress: bool = True,
        n_trials: int | None = None,
        timeout: float | None = None,
        log: Callable[[str], None] | None = None,
        worker_seed: int = 0,
    ) -> None:
        self.c = campaign
        self.ev = evaluators
        self.progress = progress
        self.n_trials = n_trials
        self.deadline = time.monotonic() + timeout if timeout else None
        self.log = log or (lambda _msg: None)
        self.worker_seed = worker_seed
        self.names = campaign.objective_names()
        self.directions = campaign.directions()
        self.pool_names = list(campaign.config.pool.models)
        self.trials_run = 0
        self._env: _Env | None = None
        self._overall: tqdm | None = None  # the campaign bar, in trials
        self._keys: ModelKeys | None = None
        self._cache: EvalCache | None | bool = False  # False: not opened yet

    @property
    def env(self) -> _Env:
        if self._env is None:
            working = self.ev.local.working
            self._env = _Env(
                self.c.config,
                self.pool_names,
                working.adapter,
                working.param_names,
                self.ev.local,
                self.ev.local.pool,
            )
        return self._env

    @property
    def keys(self) -> ModelKeys:
        """Model identity (``patch.model_key``) for this campaign's architecture."""
        if self._keys is None:
            self._keys = ModelKeys(self.env.adapter, self.env.param_names, self.env.pool)
        return self._keys

    @property
    def cache(self) -> EvalCache | None:
        """Objective values across the storage's campaigns (``search.eval_cache``; None: not cached)."""
        if self._cache is False:
            self._cache = open_cache(self.c.storage, self.ev.local, self.c.name)
        return self._cache if isinstance(self._cache, EvalCache) else None

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def run(self) -> RunOutcome:
        stages_run = 0
        decisions = self.c.decisions()
        self.env.decisions = decisions  # spaces read earlier decisions (the ES sigma search)
        pending = [s for s in self.c.plan if s.key not in decisions]
        # the campaign bar counts trials (its ETA follows
        # them); a stage's estimate is corrected when it starts
        expected = sum(self._expected_trials(s) for s in pending)
        overall = tqdm(
            total=expected, desc=f"campaign {self.c.name}", unit="trial", disable=not self.progress
        )
        self._overall = overall
        self.log(
            f"campaign {self.c.name}: {len(pending)} of {len(self.c.plan)} stages to run (about {expected} "
            "trials)"
        )
        try:
            for stage in self.c.plan:
                if stage.key in decisions:
                    continue
                if self._out_of_time():
                    break
                decision = self.run_stage(stage, decisions)
                if decision is None:
                    break
                decisions[stage.key] = decision
                stages_run += 1
        finally:
            overall.close()  # also on Ctrl-C: the bar ends its line, so the message that follows has its own
        finished = all(s.key in decisions for s in self.c.plan)
        return RunOutcome(finished, stages_run, self.trials_run, self.c.final_recipe())

    def _expected_trials(self, stage: Stage) -> int:
        """Trials a stage will probably take before its space
        is built: its budget, else one per pool model."""
        if stage.n_trials:
            return self.n_trials or stage.n_trials
        return len(self.pool_names)

    # -- one stage -------------------------------------------------------------------------------------
    def run_stage(self, stage: Stage, decisions: dict[str, Decision]) -> Decision | None:
        incumbent = self.c.incumbent_before(stage, decisions)
        study = self.c.stage_study(stage, make_sampler(self.c, stage, self.worker_seed, self.env))
        existing = stage_decision(study)
        if existing:
            return existing
        space = get_kind(stage.kind).build(stage, incumbent, self.env)
        if self.n_trials and space.budget is not None:
            space.budget = self.n_trials
        if is_sqlite(self.c.url):
            T.fail_running(study)  # we hold the single-writer lock: RUNNING trials are orphans
        evaluation = StageEvaluation(
            self.c, self.ev, study, stage, space, incumbent, self._references(decisions, incumbent),
            self.keys, self.env.decisions, self._out_of_time, self.log, cache=self.cache,
        )  # fmt: skip
        evaluation.enqueue_missing()
        try:
            complete = evaluation.run(self.progress, self._overall, self._expected_trials(stage))
        finally:
            self.trials_run += evaluation.evaluated
        if not complete:
            return None
        return self._decide(study, stage, incumbent, space)

    def _references(
        self, decisions: dict[str, Decision], incumbent: Recipe | None
    ) -> dict[str, dict[str, float]]:
        """Metrics the degradation constraints compare with: the base stage's, and the incumbent's."""
        refs: dict[str, dict[str, float]] = {}
        base_key = self.c.plan[0].key
        if base_key in decisions:
            refs["base"] = decisions[base_key].metrics
        earlier = self.keys.earlier_decision(incumbent, decisions)
        if earlier is not None:
            refs["incumbent"] = earlier.metrics
        return refs

    def _decide(
        self, study: optuna.Study, stage: Stage, incumbent: Recipe | None, space: StageSpace
    ) -> Decision:
        """The stage's decision: recorded by exactly one worker (the holder of the stage's decide lock);
        the others wait for it. A decider that dies leaves a stale lock, which the next worker breaks."""
        if is_sqlite(self.c.url):  # this process is the only writer
            return stage_decision(study) or self._record_decision(study, stage, incumbent, space)
        lock = StageLock(self.c.storage, f"{self.c.stage_study_name(stage)}#decide")
        poll = POLL_SECONDS[0]
        while True:
            existing = stage_decision(study)
            if existing:
                return existing
            if lock.acquire():
                break
            time.sleep(poll)
            poll = next_poll(poll)
        try:
            existing = stage_decision(study)  # recorded between the check and the lock
            return existing if existing else self._record_decision(study, stage, incumbent, space)
        finally:
            lock.release()

    def _record_decision(
        self, study: optuna.Study, stage: Stage, incumbent: Recipe | None, space: StageSpace
    ) -> Decision:
        trials: dict[str, FrozenTrial] = {}
        for t in sorted(
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number
        ):
            trials.setdefault(
                str(t.user_attrs.get(T.LABEL_ATTR, f"#{t.number}")), t
            )  # a retry: first result counts
        selection = self.c.config.selection
        rules = DecideRules(
            self.names, self.directions, self.pool_names, selection, get_kind(stage.kind).joint,
            any(o.held_out > 0 for o in self.c.config.objectives),
            {o.name: o.metric for o in self.ev.local.objectives}, self.ev.local.item_counts(),
            self._perplexity_tokens(),
        )  # fmt: skip
        earlier = self.keys.earlier_decision(incumbent, self.env.decisions)
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        resumed = {int(t.user_attrs[RESUME_ATTR]): t.number for t in finished if RESUME_ATTR in t.user_attrs}
        pruned = {
            str(t.user_attrs.get(T.LABEL_ATTR, f"#{t.number}")): str(t.user_attrs.get(T.PRUNED_ATTR, ""))
            + (f"; resumed as trial {resumed[t.number]}" if t.number in resumed else "")
            for t in finished
            if t.state == TrialState.PRUNED
        }  # stopped early: recorded, never winners (a near-tie's resume trial competes in its place)
        score = cached_scorer(self.cache, lambda r: self.keys.key_of_json(r.to_json()), self.ev.local.score)
        local = self.ev.local
        decision = decide(
            stage, trials, space, incumbent, rules, self.keys, earlier, score, WORKER_ID, pruned,
            items_of=lambda recipe, split: local.evaluate(recipe, split).items,
        )  # fmt: skip
        extended = extension_granted(study, space)
        if extended:
            decision = decision.with_details({EXTENDED: extended})
        record_decision(study, decision)
        annotate_decision(self.c, study, decision)
        label = decision.winner
        why = decision.reason.removeprefix(f"{label!r}: ")
        figures = self._figures(decision.metrics, decision.held_out)
        stopped = f", {len(pruned)} stopped early" if pruned else ""
        self.log(f"{stage.key}: winner {label} ({why}); {len(trials)} trials{stopped}; {figures}")
        return decision

    def _perplexity_tokens(self) -> dict[str, dict[int, int]]:
        """Perplexity objective -> search item -> answer tokens (the paired bootstrap's denominators)."""
        local = self.ev.local
        return {
            o.name: local.evaluator.answer_tokens(o)
            for o in local.objectives
            if o.metric == "perplexity" and o.kind not in ("recipe", "lm_eval") and o.has_part("search")
        }

    def _figures(self, metrics: dict[str, float], held_out: dict[str, float]) -> str:
        """``acc 0.9333 ppl 1.204`` (held-out figures in brackets) for log lines."""

        def cell(n: str) -> str:
            held = f" [{held_out[n]:.4g}]" if n in held_out else ""
            return f"{n} {metrics[n]:.4g}{held}" if n in metrics else f"{n} -"

        return " ".join(cell(n) for n in self.names)
