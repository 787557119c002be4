"""The decision-kind contract: what a kind of campaign decision tells the planner and the runner.

A campaign is a list of **stages**, each one decision (the base model, one layer's donor, a joint
search, one ES generation ...). A :class:`DecisionKind` knows one family of stages: which stages a study
file asks for (``plan``) and, for one stage, what to enqueue, how a trial becomes a Recipe and how
the stage is decided (``build``, returning a :class:`StageSpace`). Kinds are registered in
``olmopt.search.kind_registry``; the built-in ones live in ``olmopt.search.kinds`` (one module per
kind). The runner and the planner only ever talk to this contract.

This module imports neither torch nor Optuna (Optuna types are for annotations only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.samplers import BaseSampler
    from optuna.trial import FrozenTrial, Trial

    from olmopt.config import StudyConfig
    from olmopt.pool.adapter import ArchitectureAdapter
    from olmopt.recipe import Recipe
    from olmopt.search.decision import Decision


@dataclass(frozen=True)
class Stage:
    """One decision of the campaign. ``target`` is a layer index or unit name (or '' for base/boundary)."""

    index: int
    kind: str  # a registered stage kind: base | boundary | layer | block | unit | joint-layers | es-svd ...
    target: str = ""  # a layer index, a block "first-last", a unit name, or ""
    n_trials: int = 0  # budgeted stages only (joint searches, the ES sigma search)
    sweep: int = 1  # greedy stages: which pass over the slots

    @property
    def key(self) -> str:
        suffix = f"-{self.target}" if self.target else ""
        again = f"-pass{self.sweep}" if self.sweep > 1 else ""
        return f"{self.index:03d}-{self.kind}{suffix}{again}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class SpaceEnv(Protocol):
    """What ``build`` may look at: the config, the pool's names and the architecture, the coordinator's
    resident model (``context``) and the campaign's decisions so far."""

    config: StudyConfig
    pool_names: list[str]
    adapter: ArchitectureAdapter
    param_names: list[str]
    context: Any  # olmopt.search.context.EvalContext
    pool: Any  # olmopt.pool.model_pool.ModelPool
    decisions: dict[str, Decision]  # the campaign's decisions so far, by stage key


@dataclass(frozen=True)
class Extension:
    """More evaluations for a budgeted stage, granted once the trials that spent its first ``budget`` are
    all finished and ``due`` says so: a pure function of those trials' COMPLETE ones (in trial-number
    order), so every coordinator, and a resumed run, grants the same (``search.evaluation.stage_budget``)."""

    evaluations: int
    due: Callable[[list[FrozenTrial]], bool]


EXTENDED = "extended_by"  # decision field: the evaluations a granted extension added


# decide(trials by label, scores, feasible, keep) -> winning label or None (keep the incumbent)
Decide = Callable[
    ["dict[str, FrozenTrial]", "dict[str, dict[str, float]]", "dict[str, bool]", "str | None"], "str | None"
]


@dataclass
class StageSpace:
    """Everything the runner needs to drive one stage (what ``DecisionKind.build`` returns)."""

    decode: Callable[[Trial], tuple[str, Recipe]]
    enqueue: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (label, fixed params)
    budget: int | None = None  # evaluations the sampler may add; None: only the enqueued trials
    extension: Extension | None = None  # more evaluations once the budget's trials ask for them
    layer: int | None = None  # prefix-cache layer shared by every candidate
    decide: Decide | None = None  # custom acceptance rule (default: Copeland selection)
    # a trial that is more than one evaluation (the ES sigma search): run in this process, returns the
    # Recipe its metrics belong to and the metrics
    run: Callable[[Trial, Recipe], tuple[Recipe, dict[str, float]]] | None = None
    details: Callable[[dict[str, FrozenTrial]], dict[str, Any]] | None = None  # extra decision fields
    # the winner may leave the incumbent's boundary only when significantly better than the best candidate
    # on it, on the search and held-out items together (search/boundary_switch.py)
    significant_boundary_switch: bool = False
    switch_confidence: float | None = None  # that test's level (None: ``selection.confidence``)
    # a winner other than the incumbent (an enqueued candidate) must also have the higher held-out mean
    held_out_veto: bool = False
    # ... and, at this level, be significantly better than the incumbent on the search and held-out items
    # together (search/boundary_switch.py's test; None: the held-out mean decides alone)
    challenge_confidence: float | None = None


class DecisionKind:
    """A kind of campaign decision. Subclass it, set the class attributes, implement ``plan`` and
    ``build``, and register an instance with ``olmopt.search.kind_registry.register_kind``.

    Attributes
        ``stage_kinds``: the ``Stage.kind`` strings this kind plans and builds (unique in the registry;
        they are part of every stage key, so renaming one orphans stored campaigns).
        ``order``: where this kind's stages go in the plan (ascending; built-ins use 0 ... 100 in tens).
        ``joint``: the stage samples within a budget (``n_trials``) with the configured sampler, its
        winner passes the held-out guard (``selection.held_out_guard``), and its enqueued named starting
        points get held-out figures. Otherwise only the enqueued candidates are evaluated.
        ``plots_trials``: the dashboard plots every trial of the stage (joint stages and ES).
        ``report_plot``: the figure ``olmopt report`` draws for the stage: "pareto" (its trials on the
        objectives, the Pareto set and the selected trial), "es" (one generation of the ES progress plot)
        or None.

    Methods the exporter calls (any process, after the campaign): ``olm_report(stage, decision)``, the
    stage's part of OLM's report sections in ``merge_report.json`` (``base_model``, ``boundary_layers``,
    ``layers``, ``tensors``); default none. Readers of results never test a kind's name: they ask it.

    Lifecycle (which process calls what)

    1. ``study create`` (one process, once per campaign): ``plan_stages`` calls ``plan`` of every
       registered kind in ``order`` and numbers the stages. The plan is stored in the campaign's root
       study and never planned again (``export best --refine`` may append stages). ``plan`` is a pure
       function of the config and the architecture: no model weights, no Optuna, no evaluation; it
       raises ``InputError`` for a config it cannot plan.
    2. ``study run``, in every coordinator (one per host on a shared storage, possibly several at
       once), for each undecided stage in order:

       - ``sampler(stage, config, seed, env)`` builds the stage study's sampler (None: the default,
         the configured sampler for a joint kind, else a random sampler that only pops enqueued trials).
       - ``build(stage, incumbent, env)`` returns the stage's :class:`StageSpace`. Any coordinator may
         build it, and candidates are enqueued once by label (``enqueue``): the labels and params
         must be the same wherever and whenever it is built, a function of the stage, the incumbent,
         the config, the pool and the earlier decisions (``env.decisions``) only. ``build`` may read
         the resident model (``env.context``) to compute starting points (fusion baselines) but must
         leave it as it found it.
       - ``space.decode(trial)`` is called by whichever coordinator pops or asks the trial: a pure
         function of the trial's params (and the space) giving ``(label, Recipe)``; it suggests every
         param it reads, with the same distributions on every call. It may set user attrs on the trial.
       - ``space.run(trial, recipe)`` (optional): a trial that is several evaluations, run in the
         coordinator's process on ``env.context``; it returns the Recipe the metrics belong to and
         the metrics, and may set user attrs. Spawned evaluation workers never call a kind.
       - ``space.decide(...)`` and ``space.details(trials)`` are called by exactly one coordinator,
         the holder of the stage's decide lock, after every trial is finished; a decider that dies is
         replaced by another, and the decision must be the same whoever records it: both must be
         pure functions of the stage's COMPLETE trials (no evaluation, no clock, no randomness, no
         process state). ``details`` returns extra JSON fields merged into the stored decision.

    The runner owns everything else: storage, locks, heartbeats, the reuse of metrics of a model with
    the same weights, the budget (``budget`` counts evaluations; a stage stops after 3 x budget
    trials), selection (feasible Pareto set + Copeland unless ``decide`` is given) and recording.
    ``olmopt.testing.kinds`` checks a kind against this contract.
    """

    stage_kinds: tuple[str, ...] = ()
    order: int = 1000
    joint: bool = False
    plots_trials: bool = False
    report_plot: str | None = None

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        """This kind's stages for ``config``, in execution order (``index`` is renumbered by the planner)."""
        raise NotImplementedError

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        """The search space of one planned stage (``incumbent``: the decision so far, None at the start)."""
        raise NotImplementedError

    def sampler(
        self, stage: Stage, config: StudyConfig, seed: int, env: SpaceEnv | None
    ) -> BaseSampler | None:
        """A sampler of the kind's own (None: the default for its kind, see the lifecycle)."""
        return None

    def sampler_name(self, config: StudyConfig) -> str | None:
        """A joint kind's own ``sampler:`` setting (None: the study's ``sampler.name``)."""
        return None

    def distributions(self, stage: Stage, env: SpaceEnv) -> dict[str, BaseDistribution] | None:
        """A joint kind's whole search space up front, for samplers that need it (CatCMA); None: none."""
        return None

    def olm_report(self, stage: Stage, decision: Decision) -> dict[str, Any]:
        """This stage's part of OLM's report sections (merged by ``export.olm_report_sections``); {}: none."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.stage_kinds)})"


def planned(kind: str, target: str = "", n_trials: int = 0, sweep: int = 1) -> Stage:
    """A planned stage before numbering (what ``DecisionKind.plan`` returns)."""
    return Stage(-1, kind, target, n_trials, sweep)
