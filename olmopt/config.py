"""Typed study files: the one place that validates user input and words its errors.

A study file (YAML) names the pool, the objectives, the decisions to search, selection rules, sampler
and storage. ``pool`` and ``objectives`` may be inline or paths to files in configs/ and objectives/.
The original OLM configuration (olm_config.yaml) is accepted too and converted.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from olmopt.errors import InputError
from olmopt.methods.delta import canonical_name  # torch-free: the merge-method registry
from olmopt.textio import load_yaml, read_text

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # nan/inf in a study file: one line


def _off_from_yaml(value: object) -> object:
    """YAML 1.1 reads a bare ``off`` as False; take it as the mode "off"."""
    return "off" if value is False else value


def _on_off(value: object) -> object:
    """YAML 1.1 reads bare ``on``/``off`` as True/False."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class PoolConfig(_Strict):
    models: list[str] = Field(min_length=1)
    base_dir: str | None = None
    trust_remote_code: bool = False


LM_EVAL_KEYS = (
    "task", "include_path", "num_fewshot", "limit", "apply_chat_template", "fewshot_as_multiturn",
    "gen_kwargs", "seed",
)  # fmt: skip


class ObjectiveConfig(_Strict):
    """A dataset scored with a metric (``kind: dataset``) or an lm-evaluation-harness task (``kind: lm_eval``,
    docs/lmeval.md: ``task``, ``include_path``, ``metric``
    from the task, ``limit``, few-shot/chat options)."""

    kind: Literal["dataset", "lm_eval"] = "dataset"
    dataset: str = ""  # not needed by metrics read off the Recipe (layers_removed)
    metric: str = ""  # required for datasets; lm_eval: default the task's first metric
    name: str | None = None
    held_out: float = Field(0.25, ge=0.0, lt=1.0)
    # the sealed test part (datasets only): items search and selection never read, scored once at export
    test: float = Field(0.0, ge=0.0, lt=1.0)
    samples: int | None = Field(None, gt=0)
    # lm_eval only
    task: str | None = None
    include_path: str | None = None
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, gt=0)
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    gen_kwargs: dict[str, Any] | None = None
    seed: int = 1234  # shuffles the task's documents before the held-out split
    direction: Literal["maximize", "minimize"] | None = None  # lm_eval: read from the task at create

    @model_validator(mode="after")
    def _kind_keys(self) -> ObjectiveConfig:
        if self.kind == "lm_eval":
            if not self.task:
                raise ValueError("task: required for kind lm_eval")
            for key in ("dataset", "samples", "test"):
                if getattr(self, key):
                    raise ValueError(f"{key}: not a key of kind lm_eval (use task / limit)")
            if self.fewshot_as_multiturn and not self.apply_chat_template:
                raise ValueError("fewshot_as_multiturn: needs apply_chat_template: true")
        else:
            if not self.metric:
                raise ValueError("metric: required")
            if self.held_out + self.test >= 1:
                held, test = self.held_out, self.test
                raise ValueError(f"held_out + test must leave items to search (got {held} + {test})")
            for key in (*LM_EVAL_KEYS, "direction"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(f"{key}: only for kind lm_eval")
        return self


class BaseDecision(_Strict):
    """The base model: ``fixed`` (``model``, else the first pool model) or ``auto`` (every pool model
    evaluated, the best by the selection rule). ``lookahead`` = n > 1 (``auto`` only) adds the stage
    ``base-lookahead``: on each base candidate tied with the winner and with a boundary of its own, every
    other pool model in each of n runs of adjacent layers; a winner on another boundary must be
    significantly better (search and held-out items) than the base winner, at ``switch_confidence``
    (default ``selection.confidence``). Its evaluations come out of the joint layer stage's budget, where
    there is one (search/kinds/base_lookahead.py). ``own_union`` (with ``layers.warm_own``) adds, on every
    other boundary that two or more partial fine-tunes share, all their own layers together."""

    mode: Literal["fixed", "auto"] = "fixed"
    model: str | None = None
    lookahead: int = Field(0, ge=0, le=8)
    switch_confidence: float | None = Field(None, gt=0.0, lt=1.0)
    # with the lookahead and layers.warm_own: every boundary but the winner's that two or more partial
    # fine-tunes share also gets all their own layers together as one candidate, tied or not
    own_union: bool = False

    @model_validator(mode="after")
    def _lookahead(self) -> BaseDecision:
        if self.lookahead == 1:
            raise ValueError("lookahead: 1 run of layers is the whole model, already evaluated; use 0 or 2-8")
        if self.switch_confidence is not None and not self.lookahead:
            raise ValueError("switch_confidence is the lookahead's boundary switch level: needs lookahead")
        if self.own_union and not self.lookahead:
            raise ValueError("own_union is a candidate of the lookahead: needs lookahead")
        if self.lookahead and self.mode != "auto":
            raise ValueError(
                "lookahead looks ahead from the base decision's tied candidates: needs mode auto"
            )
        return self


JointSampler = Literal["tpe", "catcma", "nsga2", "gp", "random"]


class SwapDecision(_Strict):
    """Layer or tensor-unit donors: greedy (OLM traversal, one stage per slot) or joint (one search).

    Greedy: ``windows`` are the widths of the blocks of adjacent layers swapped as one slot (``[1]`` is
    OLM's traversal; ``[2, 1]`` swaps pairs, then single layers), repeated for ``passes`` sweeps; a sweep
    after one that changed nothing costs no evaluation. ``then_joint`` > 0 adds a joint stage of that many
    evaluations after the greedy sweeps, warm-started with their winner. Joint: ``warm_start`` enqueues
    the incumbent and each donor's whole model first, and with ``warm_blocks`` = n > 1 (layers only) each
    donor in each of n runs of adjacent layers on the incumbent (n = 2: the lower and the upper half),
    and with ``warm_own`` (layers only) each partial fine-tune's own layers on the incumbent (the layers
    whose weights no other pool model has; search/equal_donors.py); ``sampler`` overrides the campaign's
    sampler;
    ``polish`` > 0 adds that many greedy sweeps over single slots after the joint stage, starting from its
    winner (a model-based search rarely pins every slot; one swap at a time does, and a slot whose
    candidates repeat known weights costs nothing; search/kinds/polish.py).
    """

    mode: Literal["greedy", "joint", "off"] = "greedy"
    direction: Literal["forward", "backward"] = "forward"
    only: list[int] | None = None  # restrict to these layer indices
    skip_norm: bool = True
    n_trials: int = Field(50, gt=0)
    windows: list[int] = Field(default_factory=lambda: [1], min_length=1)
    passes: int = Field(1, ge=1, le=20)
    then_joint: int = Field(0, ge=0)
    polish: int = Field(0, ge=0, le=20)
    warm_start: bool = True
    warm_blocks: int = Field(1, ge=1, le=8)
    warm_own: bool = False
    sampler: JointSampler | None = None

    _mode = field_validator("mode", mode="before")(_off_from_yaml)

    @model_validator(mode="after")
    def _polish_after_joint(self) -> SwapDecision:
        if self.polish and not has_joint_stage(self):
            raise ValueError(
                "polish (greedy sweeps after a joint stage) needs mode: joint, or then_joint > 0"
            )
        if self.warm_blocks > 1 and not (self.mode == "joint" and self.warm_start):
            raise ValueError("warm_blocks (warm starts of a joint stage) needs mode: joint and warm_start")
        if self.warm_own and not (self.mode == "joint" and self.warm_start):
            raise ValueError("warm_own (warm starts of a joint stage) needs mode: joint and warm_start")
        return self

    @field_validator("windows")
    @classmethod
    def _positive_windows(cls, value: list[int]) -> list[int]:
        if any(w < 1 for w in value) or len(set(value)) != len(value):
            raise ValueError("must be distinct block widths >= 1, e.g. [2, 1]")
        return value


def has_joint_stage(decision: SwapDecision) -> bool:
    """Whether a layer or unit decision plans a joint stage (``mode: joint``, or greedy with
    ``then_joint``)."""
    return decision.mode == "joint" or (decision.mode == "greedy" and decision.then_joint > 0)


class BoundaryDecision(_Strict):
    """The donor of the embeddings, final norm and head: one greedy stage (``greedy``, OLM's), or one more
    slot of the joint layer stage (``joint``: with every layer searched too, the base decision is only the
    starting point, since a base whose boundary would be a poor fit can be left entirely).

    ``donors`` (joint only): ``all`` offers every pool model's boundary, and each polish sweep begins
    with a boundary stage; ``tied`` offers only the boundaries of the base candidates whose search mean
    is within the base winner's 95 % interval, one per distinct set of boundary weights, and no slot when
    that leaves one (needs ``base: auto``; search/tied_boundaries.py).

    ``switch`` (joint only): ``best`` lets the joint stage's winner take any offered boundary;
    ``significant`` lets it leave the incumbent's boundary only when it beats the best candidate on the
    incumbent's boundary on the search and held-out items together (a paired test at
    ``selection.confidence``), else that candidate wins; the polish sweeps' boundary stages likewise
    (search/boundary_switch.py)."""

    mode: Literal["greedy", "joint", "off"] = "greedy"
    donors: Literal["all", "tied"] = "all"
    switch: Literal["best", "significant"] = "best"

    _mode = field_validator("mode", mode="before")(_off_from_yaml)


def _es_switch(value: object) -> object:
    """``svd: off``/``false`` -> None (not run); ``svd: on``/``true`` -> the defaults."""
    if value is False:
        return None
    return {} if value is True else value


class EsTuneDecision(_Strict):
    """The "ES sigma" decision: a small search over initial sigma and generations before the ES stages.

    ``sigma`` and ``generations`` are [low, high] ranges (defaults: sigma / 4 .. sigma * 4 and
    1 .. the strategy's generations); the objective is the improvement reached per evaluation spent.
    """

    trials: int = Field(6, gt=0)
    sigma: list[float] | None = Field(None, min_length=2, max_length=2)
    generations: list[int] | None = Field(None, min_length=2, max_length=2)

    @field_validator("sigma")
    @classmethod
    def _sigma_range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not (0 < value[0] <= value[1] < float("inf")):
            raise ValueError("must be [low, high] with 0 < low <= high")
        return value

    @field_validator("generations")
    @classmethod
    def _generation_range(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not (1 <= value[0] <= value[1]):
            raise ValueError("must be [low, high] with 1 <= low <= high")
        return value


class EsKindDecision(_Strict):
    """One evolution strategy: ``generations`` ES stages per unit, initial ``sigma``, optional unit list."""

    generations: int = Field(1, gt=0)
    sigma: float = Field(gt=0, allow_inf_nan=False)
    units: list[str] | None = Field(None, min_length=1)  # None: the units of the tensor stages
    tune: EsTuneDecision | None = None  # None: no sigma search, ``sigma`` and ``generations`` as given

    @field_validator("tune", mode="before")
    @classmethod
    def _tune_switch(cls, value: object) -> object:
        return _es_switch(value)

    @model_validator(mode="after")
    def _tune_within_plan(self) -> EsKindDecision:
        if self.tune is not None and self.tune.generations and self.tune.generations[1] > self.generations:
            raise ValueError(
                f"tune.generations goes up to {self.tune.generations[1]}, more than generations "
                f"({self.generations})"
            )
        return self

    def tune_ranges(self) -> tuple[tuple[float, float], tuple[int, int]]:
        """(sigma low, high), (generations low, high) of the sigma search."""
        tune = self.tune or EsTuneDecision()
        sigma = tune.sigma or [self.sigma / 4, self.sigma * 4]
        generations = tune.generations or [1, self.generations]
        return (sigma[0], sigma[1]), (generations[0], generations[1])


class SvdEsDecision(EsKindDecision):
    sigma: float = Field(0.05, gt=0, allow_inf_nan=False)  # times std of the singular values


class NormEsDecision(EsKindDecision):
    sigma: float = Field(0.005, gt=0, allow_inf_nan=False)  # on the log row norms


class EsDecision(_Strict):
    """ES refinement stages after the tensor stages (SVD-ES, then norm-ES, per unit); see docs/es.md."""

    svd: SvdEsDecision | None = None
    norm: NormEsDecision | None = None
    acceptance: Literal["pareto", "any"] = "pareto"

    _switch = field_validator("svd", "norm", mode="before")(_es_switch)


class MergeDecision(_Strict):
    """Parameter-space merge searched jointly over ``methods`` (names in ``olmopt.methods.registry``):
    ``joint`` right after the base (its winner is the layer stages' donor ``@merge``), ``challenge`` after
    the layer decisions on the pool's base, the layer merge one of its candidates
    (``search/kinds/merge_challenge.py``)."""

    mode: Literal["joint", "challenge", "off"] = "off"
    methods: list[str] = Field(default_factory=lambda: ["circuit", "della", "task_arithmetic"], min_length=1)
    models: list[str] | None = None  # variants; default: every pool model but the base
    n_trials: int = Field(40, gt=0)
    search_order: bool = True  # search the variants' priority order (methods where it matters: circuit)
    # layer-wise search (docs/methods.md): ``layerwise`` parameters (per variant) get one value per group of
    # ``group_size`` adjacent layers (1 = per layer); None keeps one global value (the setting before)
    group_size: int | None = Field(None, gt=0)
    layerwise: list[str] = Field(default_factory=lambda: ["weights", "density"], min_length=1)
    # the stage's sampler (None: the study's ``sampler.name``); cmaes: Optuna's CmaEsSampler on the Borda
    # scalarisation of the objectives, one method at a time
    sampler: Literal["tpe", "gp", "cmaes"] | None = None
    # mergekit YAMLs enqueued as the stage's first trials (their values must lie in the stage's space)
    enqueue: list[str] = Field(default_factory=list)
    # challenge only: when the joint layer search still leads with its incumbent after its n_trials, it
    # gets this stage's n_trials more and the challenge is skipped (docs/strategies.md)
    yield_to_layers: bool = False
    # challenge only: a merge that wins the stage replaces the incumbent only when significantly better on
    # the search and held-out items together, at this level (None: the higher held-out mean suffices)
    switch_confidence: float | None = Field(None, gt=0.0, lt=1.0)

    _mode = field_validator("mode", mode="before")(_off_from_yaml)

    @model_validator(mode="after")
    def _yield_needs_challenge(self) -> MergeDecision:
        if self.yield_to_layers and self.mode != "challenge":
            raise ValueError(f"yield_to_layers gives a challenge's trials away; mode is {self.mode!r}")
        if self.switch_confidence is not None and self.mode != "challenge":
            raise ValueError(f"switch_confidence is the merge challenge's level; mode is {self.mode!r}")
        return self

    @model_validator(mode="after")
    def _cmaes_one_method(self) -> MergeDecision:
        if self.sampler == "cmaes" and len(self.methods) != 1:
            raise ValueError(
                f"sampler cmaes searches one method; list one in methods (got {', '.join(self.methods)})"
            )
        return self

    @field_validator("methods")
    @classmethod
    def _registered_methods(cls, methods: list[str]) -> list[str]:
        """Registered merge methods, aliases resolved; duplicates refused."""
        names = []
        for method in methods:
            try:
                names.append(canonical_name(method))
            except InputError as exc:
                raise ValueError(str(exc)) from None
        if len(set(names)) != len(names):
            raise ValueError(f"a method is listed twice: {methods}")
        return names


FUSION_BASELINES: tuple[Literal["mka", "gradient"], ...] = ("mka", "gradient")


class FusionDecision(_Strict):
    """Depth fusion of the last layers: number of steps and one alpha per step."""

    mode: Literal["joint", "off"] = "off"
    max_steps: int = Field(1, gt=0)
    alpha_low: float = Field(0.0, ge=0.0, le=1.0)
    alpha_high: float = Field(1.0, ge=0.0, le=1.0)
    n_trials: int = Field(30, gt=0)
    baselines: list[Literal["mka", "gradient"]] = Field(default_factory=lambda: list(FUSION_BASELINES))
    calibration_samples: int = Field(64, gt=0)

    _mode = field_validator("mode", mode="before")(_off_from_yaml)

    @model_validator(mode="after")
    def _range(self) -> FusionDecision:
        if self.alpha_low > self.alpha_high:
            raise ValueError(f"alpha_low {self.alpha_low} is above alpha_high {self.alpha_high}")
        return self


class DfsDecision(_Strict):
    """Data-flow-space layer path over two or more pool models."""

    mode: Literal["joint", "off"] = "off"
    models: list[str] | None = None  # default: the first two pool models
    repetitions: int = Field(2, gt=0)
    scale_low: float = Field(0.5, gt=0.0)
    scale_high: float = Field(1.5, gt=0.0)
    n_trials: int = Field(40, gt=0)
    sampler: Literal["tpe", "cmaes"] = "tpe"

    _mode = field_validator("mode", mode="before")(_off_from_yaml)

    @model_validator(mode="after")
    def _range(self) -> DfsDecision:
        if self.scale_low > self.scale_high:
            raise ValueError(f"scale_low {self.scale_low} is above scale_high {self.scale_high}")
        return self


class Decisions(_Strict):
    base: BaseDecision = Field(default_factory=BaseDecision)
    boundary: BoundaryDecision = Field(default_factory=lambda: BoundaryDecision(mode="off"))
    layers: SwapDecision = Field(default_factory=SwapDecision)
    tensors: SwapDecision = Field(default_factory=lambda: SwapDecision(mode="off"))
    es: EsDecision = Field(default_factory=EsDecision)
    merge: MergeDecision = Field(default_factory=MergeDecision)
    fusion: FusionDecision = Field(default_factory=FusionDecision)
    dfs: DfsDecision = Field(default_factory=DfsDecision)


class SelectionConfig(_Strict):
    improve_all: str | None = None  # None, "base", "all" or a metric name
    held_out_check: bool = True
    # ties (docs/selection.md): by default a difference of accuracy-like scores inside its ``confidence``
    # interval is a tie; an explicit ``tolerance`` replaces that rule by a fixed margin on every objective
    tolerance: float | None = Field(None, ge=0.0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    # joint stages: the winner is the best held-out mean among the top K of the search selection (0, 1: off)
    held_out_guard: int = Field(0, ge=0)
    # how a stage orders its feasible candidates: Copeland over per-objective ranks (OLM's), or the mean of
    # the objective values (magnitudes count; for objectives on one scale, such as accuracies)
    score: Literal["copeland", "mean"] = "copeland"


class SamplerConfig(_Strict):
    """The sampler of joint stages (a joint decision's own ``sampler`` overrides ``name``).

    ``population_size``: NSGA-II's generation size (Optuna's default 50 never leaves its random first
    generation within a budget below 100) and CatCMA's (default: its own rule, 4 + 3 ln n).
    """

    name: JointSampler = "tpe"
    seed: int = 0
    multivariate: bool = True
    population_size: int | None = Field(None, ge=2)
    n_startup_trials: int = Field(10, ge=0)

    def nsga2_population(self, n_trials: int) -> int:
        """NSGA-II's generation size for a budget: ``population_size``, else budget / 5 within [4, 50]
        (Optuna's default 50 never leaves its random first generation in a 100-evaluation budget)."""
        return self.population_size or max(4, min(50, n_trials // 5))


class EarlyStopConfig(_Strict):
    """Paired sequential early stopping (olmopt.evaluate.sequential, docs/early_stop.md): candidates are
    scored in chunks of ``chunk`` items of each dataset and stopped (PRUNED) once the stage's leader (or
    the incumbent) is significantly better at level ``alpha``, spent over the looks by ``boundary``.
    ``auto`` (the default): on when stages select by ``selection.score: mean``, off under Copeland
    (whose counts change when a dominated candidate leaves the field: OLM's selection stays exact).
    ``spare_front`` (under ``score: mean``): a candidate ahead of its reference on some objective, on the
    items seen, is not stopped: it may lie on the Pareto front that the multi-objective sampler learns
    from (without it, the main job lost the best merge on one zoo family in 3 of 6 campaigns).
    ``spare_level`` below 1 spares only a lead that the one-sided test calls one at that level (0.2:
    three discordant items to none on an accuracy); 1 (the default) spares any lead."""

    mode: Literal["auto", "on", "off"] = "auto"
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    chunk: int = Field(20, gt=0)
    boundary: Literal["pocock", "obrien-fleming", "bonferroni"] = "pocock"
    spare_front: bool = True
    spare_level: float = Field(1.0, gt=0.0, le=1.0)

    _mode = field_validator("mode", mode="before")(_on_off)


class RacingConfig(_Strict):
    """Successive halving over item budgets in joint stages (docs/early_stop.md): at the rungs after
    ``first``, ``first * eta``, ... chunks (``early_stop.chunk`` items each) a candidate goes on only when
    its partial score is among the top ``1 / eta`` of the stage's candidates that reached the rung; before
    the stage decides, race-stopped near-ties of the leader are resumed (olmopt.search.near_ties).
    Off by default: candidates it stops at a rung are failures to the sampler, which then steered the
    main job away from the best merge on one zoo family in 4 of 6 campaigns (docs/early_stop.md)."""

    mode: Literal["on", "off"] = "off"
    eta: int = Field(3, ge=2)
    first: int = Field(1, ge=1)

    _mode = field_validator("mode", mode="before")(_on_off)


class EvaluationConfig(_Strict):
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    racing: RacingConfig = Field(default_factory=RacingConfig)
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    stop_at_first_mismatch: bool = True
    device: str | None = None
    cache: bool = True  # reuse values across campaigns of the same storage (olmopt.search.eval_cache)


class StudyConfig(_Strict):
    name: str
    pool: PoolConfig
    objectives: list[ObjectiveConfig] = Field(min_length=1)
    decisions: Decisions = Field(default_factory=Decisions)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    storage: str | None = None
    root: str = "."  # directory that relative paths are resolved against

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if not NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r} must be 1-64 letters, digits, '_', '.', '-'")
        base = self.decisions.base
        if base.mode == "fixed" and base.model and base.model not in self.pool.models:
            raise ValueError(f"decisions.base.model {base.model!r} is not in pool.models")
        if base.mode == "auto" and base.model:
            raise ValueError("decisions.base: 'model' cannot be set with mode 'auto'")
        if self.decisions.boundary.mode == "joint" and not has_joint_stage(self.decisions.layers):
            raise ValueError(
                "decisions.boundary: mode joint searches the boundary inside the joint layer stage, and "
                "decisions.layers has none (mode: joint, or then_joint > 0)"
            )
        if self.decisions.boundary.donors == "tied" and (
            self.decisions.boundary.mode != "joint" or base.mode != "auto"
        ):
            raise ValueError(
                "decisions.boundary: donors tied offers the joint stage the boundaries of the base "
                "candidates tied with the winner, so it needs mode: joint and decisions.base: {mode: auto}"
            )
        if self.decisions.boundary.switch == "significant" and self.decisions.boundary.mode != "joint":
            raise ValueError(
                "decisions.boundary: switch significant guards the boundary slot of the joint layer "
                "stage, so it needs mode: joint"
            )
        if self.decisions.merge.yield_to_layers and not has_joint_stage(self.decisions.layers):
            raise ValueError(
                "decisions.merge: yield_to_layers gives the challenge's trials to the joint layer stage, "
                "and decisions.layers has none (mode: joint, or then_joint > 0)"
            )
        if self.decisions.tensors.windows != [1]:
            raise ValueError("decisions.tensors.windows: blocks are layer windows; tensor units take [1]")
        if self.decisions.tensors.warm_blocks != 1:
            raise ValueError("decisions.tensors.warm_blocks: blocks are runs of layers; tensor units take 1")
        if self.decisions.base.own_union and not self.decisions.layers.warm_own:
            raise ValueError("decisions.base.own_union combines own layers: needs decisions.layers.warm_own")
        if self.decisions.tensors.warm_own:
            raise ValueError("decisions.tensors.warm_own: own layers are layers; tensor units take false")
        for i, o in enumerate(self.objectives):
            if o.kind == "dataset" and not o.dataset and o.metric != "layers_removed":
                raise ValueError(f"objectives.{i}.dataset: required for metric {o.metric!r}")
        names = [o.name or default_objective_name(o) for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: names must be unique, got {names}")
        ev, by_mean = self.evaluation, self.selection.score == "mean"
        if ev.early_stop.mode == "auto":  # resolved once: every reader sees on or off
            ev.early_stop.mode = "on" if by_mean else "off"
        rule = self.selection.improve_all
        metrics = {o.metric for o in self.objectives}
        if rule not in (None, "", "base", "all") and rule not in metrics:
            raise ValueError(
                f"selection.improve_all {rule!r} must be 'base', 'all' or an objective metric "
                f"{sorted(metrics)}"
            )
        return self

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.root) / p

    @property
    def base_model(self) -> str:
        return self.decisions.base.model or self.pool.models[0]


def default_objective_name(obj: ObjectiveConfig) -> str:
    if obj.kind == "lm_eval":
        return f"{obj.task}.{obj.metric.split(',')[0]}" if obj.metric else str(obj.task)
    return f"{Path(obj.dataset).stem}.{obj.metric}" if obj.dataset else obj.metric


def _read_yaml(path: Path) -> Any:
    text = read_text(path)  # missing, a directory, not UTF-8: one line
    try:
        return load_yaml(text)  # a duplicated key is refused, not silently dropped
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None)
        reason = f": {problem}" if problem and str(problem).startswith("duplicated key") else ""
        raise InputError(f"{path}: not valid YAML{where}{reason}") from None


def _validation_message(path: Path, exc: ValidationError) -> str:
    """The first error as ``FILE: KEY: problem``; an unknown key comes first (a missing one is often its
    typo) with the close matches among the keys allowed there, and no Python class name is shown."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(str(loc[-1]), _keys_at(StudyConfig, loc[:-1]))
    elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        msg = f"expected a mapping of keys, got {_yaml_kind(err['input'])}"
    return f"{path}: {where + ': ' if where else ''}{msg}"


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a study file may hold at ``loc`` (a path of keys and list indices from the top)."""
    annotation: Any = model
    for part in loc:
        found = _model_in(annotation)
        if found is None or not (isinstance(part, int) or part in found.model_fields):
            return []
        # an index: an item of the same list model; a key: that field's annotation
        annotation = found if isinstance(part, int) else found.model_fields[part].annotation
    found = _model_in(annotation)
    return list(found.model_fields) if found is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The study-file model an annotation holds (``X``, ``X | None``, ``list[X]``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, [k for k in allowed if k != "root"], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ""


def _yaml_kind(value: object) -> str:
    """What a YAML value is, in the user's words (never a Python class name)."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return f"{value!r} (a number)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, list):
        return "a list"
    return "nothing" if value is None else "a value of another kind"


def load_study_file(path: str | Path) -> StudyConfig:
    """Read and validate a study file (or an OLM config); every problem is one line naming the key."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    if is_olm_config(data):
        data = olm_to_study(data, path)
    data = dict(data)
    root = path.parent.resolve()
    data.setdefault("root", str(_project_root(root)))
    data.setdefault("name", path.stem)
    base = Path(data["root"])
    for key, loader in (("pool", _include_mapping), ("objectives", _include_list)):
        if isinstance(data.get(key), str):
            data[key] = loader(base / data[key], key)
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise InputError(_validation_message(path, exc)) from None


def _project_root(start: Path) -> Path:
    """Relative paths in study files resolve against the project root (the dir holding studies/)."""
    return start.parent if start.name == "studies" else start


def _include_mapping(path: Path, key: str) -> Any:
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: {key} file must be a mapping")
    return data


def _include_list(path: Path, key: str) -> Any:
    data = _read_yaml(path)
    if isinstance(data, dict) and key in data:
        data = data[key]
    if not isinstance(data, list):
        raise InputError(f"{path}: {key} file must be a list (or a mapping with key '{key}')")
    return data


# -- OLM compatibility ----------------------------------------------------------------------------
OLM_KEYS = {"models", "dataset", "base_model_name", "layer_swap", "tensor_swap"}
OLM_MODE_TO_METRIC = {
    "exact_match": "exact_match",
    "bigram_loss": "bigram_loss",
    "diversity": "diversity",
    "quality": "quality",
    "perplexity": "perplexity",
    "exact": "exact_match",
    "bigram": "bigram_loss",
}
OLM_IGNORED = {
    "models_dir", "output_dir", "metric_dir", "max_models", "load_merge_report", "selection", "markov",
}  # fmt: skip


def is_olm_config(data: dict[str, Any]) -> bool:
    return "models" in data and "dataset" in data and "pool" not in data


def olm_to_study(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Convert an olm_config.yaml mapping to a study mapping (unknown keys still fail)."""
    known = OLM_KEYS | OLM_IGNORED | {
        "direction", "dataset_dir", "base_select", "boundary_select", "skip_norm", "improve_all", "samples",
        "es_svd", "es_svd_generations", "es_svd_sigma", "es_norm", "es_norm_generations", "es_norm_sigma",
        "name",
    }  # fmt: skip
    for key in data:
        if key not in known:
            raise InputError(f"{path}: {key}: unknown key in OLM config{_did_you_mean(key, sorted(known))}")
    dataset_dir = str(data.get("dataset_dir", "."))
    objectives = []
    datasets = data.get("dataset") or {}
    if not isinstance(datasets, dict) or not datasets:
        raise InputError(f"{path}: dataset: expected a mapping of file -> {{mode: ...}}")
    for file, spec in datasets.items():
        mode = (spec or {}).get("mode") if isinstance(spec, dict) else None
        if mode not in OLM_MODE_TO_METRIC:
            raise InputError(f"{path}: dataset.{file}.mode: unknown mode {mode!r}")
        objectives.append(
            {"dataset": str(Path(dataset_dir) / file), "metric": OLM_MODE_TO_METRIC[mode], "held_out": 0.0,
             "samples": data.get("samples"), "name": Path(file).stem}
        )  # fmt: skip
    direction = data.get("direction", "forward")
    improve = data.get("improve_all")
    improve = OLM_MODE_TO_METRIC.get(improve, improve) if improve else None
    base_name = data.get("base_model_name")
    models = list(data["models"])
    if base_name and base_name not in models:
        models.insert(0, base_name)
    return {
        "name": data.get("name", path.stem.replace("_", "-")),
        "pool": {"models": models},
        "objectives": objectives,
        "decisions": {
            "base": {"mode": "auto"} if data.get("base_select") else {"mode": "fixed", "model": base_name},
            "boundary": {"mode": "greedy" if data.get("boundary_select") else "off"},
            "layers": {"mode": "greedy" if data.get("layer_swap") else "off", "direction": direction},
            "tensors": {
                "mode": "greedy" if data.get("tensor_swap", True) else "off",
                "direction": direction,
                "skip_norm": bool(data.get("skip_norm", True)),
            },
            "es": _olm_es(data),
        },
        "selection": {"improve_all": improve},
    }


def _olm_es(data: dict[str, Any]) -> dict[str, Any]:
    """OLM's es_svd*/es_norm* keys (with OLM's code defaults) and its any-improvement acceptance."""
    es: dict[str, Any] = {"acceptance": "any"}
    for kind, sigma in (("svd", 0.5), ("norm", 0.01)):
        if data.get(f"es_{kind}"):
            es[kind] = {
                "generations": data.get(f"es_{kind}_generations", 1),
                "sigma": data.get(f"es_{kind}_sigma", sigma),
            }
    return es
