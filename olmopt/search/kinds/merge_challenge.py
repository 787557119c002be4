"""``decisions.merge: {mode: challenge}``: a parameter-space merge that challenges the layer merge.

After the layer decisions (and their polish sweeps), one joint stage searches the parameter-space merge
of the pool's models on the pool's base (``config.base_model``: the first pool model, or the fixed
base), as ``decisions.merge: joint`` does before the layers, but with the incumbent, the layer merge the
campaign has found, as one more candidate (label ``incumbent``, its metrics reused: it costs nothing).
The stage's selection then decides between the layer merge and the best parameter-space merge, ties to
the incumbent, and a merge that wins must also have the higher held-out mean (``StageSpace.held_out_veto``:
a search winner leads by selection, also where it is worse). Why: the two spaces fail on different
families. A layer-donor search cannot blend two specialists inside one layer, and a base decision that
keeps a full specialist's boundary cannot reach a recipe built on the base's (the AMD small mistral zoo,
docs/strategies.md); a per-layer-group merge of task vectors on the pool's base can, and loses to the
layer search wherever a skill lives in whole layers (BENCHMARKS.md).

The candidate is a parameter ``challenger`` (``incumbent`` or ``merge``): the incumbent is enqueued
with ``challenger: incumbent``, and the stage's sampler is wrapped so that every sampled trial is a merge
(``optuna.samplers.PartialFixedSampler``); the merge's own dimensions are those of
``olmopt.search.kinds.merge``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from olmopt.recipe import Recipe
from olmopt.search.kind import EXTENDED, DecisionKind, SpaceEnv, Stage, StageSpace, planned
from olmopt.search.kind_registry import register_kind
from olmopt.search.kinds.merge import merge_sampler, merge_space

if TYPE_CHECKING:
    import optuna
    from optuna.trial import Trial

    from olmopt.config import StudyConfig
    from olmopt.pool.adapter import ArchitectureAdapter
    from olmopt.search.decision import Decision

CHALLENGER = "challenger"  # the stage's parameter: which of the two the trial is
INCUMBENT, MERGE = "incumbent", "merge"


def challenge_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    """The merge stage's space on the pool's base, with the incumbent as the candidate ``incumbent``;
    only the incumbent when the joint layer stage took this stage's trials (``yield_to_layers``)."""
    assert incumbent is not None
    merges = merge_space(stage, Recipe(base=env.config.base_model), env)

    def decode(trial: Trial) -> tuple[str, Recipe]:
        if trial.suggest_categorical(CHALLENGER, [INCUMBENT, MERGE]) == INCUMBENT:
            return INCUMBENT, incumbent
        return merges.decode(trial)

    enqueue = [(INCUMBENT, {CHALLENGER: INCUMBENT})]
    taker = layers_extended(env.decisions)
    if taker is not None:
        return StageSpace(decode=decode, enqueue=enqueue, details=lambda _trials: {"yielded_to": taker})
    enqueue += [(label, {CHALLENGER: MERGE, **params}) for label, params in merges.enqueue]
    return StageSpace(
        decode=decode,
        enqueue=enqueue,
        budget=merges.budget,
        held_out_veto=True,
        challenge_confidence=env.config.decisions.merge.switch_confidence,
    )


def layers_extended(decisions: dict[str, Decision]) -> str | None:
    """The key of the joint layer stage that was granted an extension (this stage's trials), if any."""
    return next(
        (key for key, d in decisions.items() if key.endswith("-joint-layers") and d.details.get(EXTENDED)),
        None,
    )


class MergeChallengeKind(DecisionKind):
    """``decisions.merge: challenge``: a parameter-space merge search after the layer decisions, the layer
    merge one of its candidates."""

    stage_kinds = ("joint-merge-challenge",)
    order = 47  # after joint-layers (40) and their polish sweeps (45), before the tensor units (50)
    joint = True
    plots_trials = True
    report_plot = "pareto"

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        d = config.decisions.merge
        return [planned(self.stage_kinds[0], n_trials=d.n_trials)] if d.mode == "challenge" else []

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return challenge_space(stage, incumbent, env)

    def sampler(
        self, stage: Stage, config: StudyConfig, seed: int, env: SpaceEnv | None
    ) -> optuna.samplers.BaseSampler:
        """``decisions.merge.sampler`` (default TPE), every sampled trial a merge."""
        sampler = merge_sampler(config, seed, fixed={CHALLENGER: MERGE})
        assert sampler is not None
        return sampler


register_kind(MergeChallengeKind())
