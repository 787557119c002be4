"""``decisions.base: {mode: auto, lookahead: N}``: the base decision looks one step ahead before a joint
layer stage commits to its winner's boundary.

``base: auto`` keeps the pool model with the best search mean, and a layer search afterwards can change
every layer but not that model's boundary (embeddings, final norm, head). When the pick is inside noise
(the candidates tied with the winner, ``search/tied_boundaries.py``) the better merge may sit on a tied
candidate's boundary: on the AMD small mistral zoo the full specialist spec_mc (0.353) beats spec_add
(0.333) alone, yet spec_fact's lower half of the layers on spec_add is the zoo's recipe (0.387 on the
search items, 0.420 held out) and no layer choice on spec_mc's boundary comes near it. A greedy one-step
lookahead shows it: the stage ``base-lookahead`` evaluates, for every tied candidate whose boundary
weights differ from the winner's, each other pool model's run of adjacent layers on it (the layers cut
into N runs, as the joint stage's ``warm_blocks``), beside the winner itself (its metrics reused).
Candidates on the winner's boundary need no lookahead: the joint stage reaches every layer choice there.
With ``base.own_union`` the stage also offers, on each other boundary that two or more partial
fine-tunes share, tied or not, all their own layers together (``own_unions``): where the base decision
kept a full fine-tune, the partial fine-tunes' recipe on their base may be two steps from every model.

The stage's selection picks the best candidate, and one on another boundary stands only when it beats the
best candidate on the winner's boundary (the winner) on the search and held-out items together
(``StageSpace.significant_boundary_switch``, search/boundary_switch.py); otherwise the winner stays and
the joint stage runs as it would have. The evaluations the lookahead spent come out of the joint layer
stage's budget (``lookahead_spent``), so the campaign's evaluation count does not grow: the lookahead
takes only as many tied bases as that budget pays for beyond the joint stage's warm starts, which are
evaluated whatever its budget (``affordable``); the others are recorded as skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from olmopt.recipe import Recipe
from olmopt.search.decision import Decision, decision_of_kind
from olmopt.search.equal_donors import own_layers
from olmopt.search.identity import ModelKeys
from olmopt.search.kind import DecisionKind, SpaceEnv, Stage, StageSpace, planned
from olmopt.search.kind_registry import register_kind
from olmopt.search.kinds.swap import layer_runs, searched_layers
from olmopt.search.tied_boundaries import boundary_digest, tied_boundaries

if TYPE_CHECKING:
    from optuna.trial import Trial

    from olmopt.config import StudyConfig
    from olmopt.pool.adapter import ArchitectureAdapter

STAGE_KIND = "base-lookahead"
INCUMBENT = "incumbent"


def affordable(config: StudyConfig, pool_size: int, own: int = 0) -> int | None:
    """Evaluations the joint layer stage can give the lookahead: its budget less its warm starts (the
    incumbent, and with ``warm_start`` each pool model's whole model, each of its ``warm_blocks`` runs
    and, with ``warm_own``, the ``own`` donors' own layers), which it evaluates whatever its budget;
    None without a joint layer stage (nothing pays)."""
    layers = config.decisions.layers
    budget = layers.n_trials if layers.mode == "joint" else layers.then_joint
    if not budget:
        return None
    starts = 1 + (
        pool_size * (1 + (layers.warm_blocks if layers.warm_blocks > 1 else 0))
        + (own if layers.warm_own else 0)
        if layers.warm_start
        else 0
    )
    return max(0, budget - starts)


def own_donors(env: SpaceEnv) -> dict[str, list[int]]:
    """With ``decisions.layers.warm_own``: each partial fine-tune of the pool -> its own searched layers
    (search/equal_donors.py); else none."""
    if not env.config.decisions.layers.warm_own:
        return {}
    layers = searched_layers(env.config, env.adapter)
    owned = {donor: own_layers(donor, layers, env) for donor in env.pool_names}
    return {donor: own for donor, own in owned.items() if own}


def own_unions(incumbent: Recipe, env: SpaceEnv) -> dict[str, Recipe]:
    """With ``decisions.base.own_union`` (and ``layers.warm_own``): label -> Recipe, for each boundary
    other than the incumbent's that two or more partial fine-tunes share (their base's), all of their own
    layers together on it (``HOLDER/own-all``, the holder the first pool model with that boundary), unless
    two of them own the same layer. Ties do not matter: partial fine-tunes of one base whose trained
    layers do not overlap combine in one step, which no single-donor candidate shows when the base
    decision kept a full fine-tune's boundary (the AMD small mistral family with its upper specialist in
    layers 2-3)."""
    owned = own_donors(env) if env.config.decisions.base.own_union else {}
    if len(owned) < 2:
        return {}

    digests = {m: boundary_digest(env.pool, env.adapter, env.param_names, m) for m in env.pool_names}
    mine = digests.get(incumbent.boundary_donor)  # None for a parameter-space merge's boundary
    holders: dict[str, str] = {}
    for model, key in digests.items():
        holders.setdefault(key, model)
    unions = {}
    for key, holder in holders.items():
        partial = [donor for donor in owned if digests[donor] == key]
        layers = [layer for donor in partial for layer in owned[donor]]
        if key == mine or len(partial) < 2 or len(set(layers)) < len(layers):
            continue
        recipe = Recipe(base=holder, layers={layer: donor for donor in partial for layer in owned[donor]})
        unions[f"{holder}/own-all"] = recipe
    return unions


def paid_unions(incumbent: Recipe, env: SpaceEnv) -> tuple[dict[str, Recipe], int | None]:
    """The ``own_unions`` the joint stage's budget pays for (``affordable``: all of them or none) and the
    evaluations left for tied bases (None: no joint stage pays, nothing is limited)."""
    unions = own_unions(incumbent, env)
    limit = affordable(env.config, len(env.pool_names), len(own_donors(env)))
    if limit is None:
        return unions, None
    if len(unions) > limit:
        return {}, limit
    return unions, limit - len(unions)


def lookahead_bases(incumbent: Recipe, env: SpaceEnv) -> tuple[list[str], list[str]]:
    """(looked at, skipped): the tied candidates with a boundary of their own, best search mean first, as
    many as ``affordable`` pays for ((pool size - 1) x N evaluations each, and one per other partial
    fine-tune with ``warm_own``) once the ``own_unions`` are paid (``paid_unions``), and the rest."""
    offered = tied_boundaries(env, incumbent.base).offered[1:]
    cost = (len(env.pool_names) - 1) * env.config.decisions.base.lookahead + len(own_donors(env))
    limit = paid_unions(incumbent, env)[1]
    n = len(offered) if limit is None else min(len(offered), limit // cost)
    return offered[:n], offered[n:]


def lookahead_candidates(
    incumbent: Recipe, env: SpaceEnv, bases: list[str] | None = None
) -> dict[str, Recipe]:
    """label -> Recipe: the incumbent (the base winner), then for each looked-at base (``bases``, by default
    ``lookahead_bases``'s, which reads every pool model's boundary) each other pool model in each run of
    adjacent searched layers (``decisions.layers.only``, else every layer) on it
    (``CANDIDATE/block{i}-{DONOR}``), and with ``warm_own`` each other partial fine-tune's own layers on
    it (``CANDIDATE/own-{DONOR}``, unless a candidate has those weights already), then the ``own_unions``
    the budget pays for (on any boundary but the incumbent's, tied or not)."""
    config = env.config
    runs = layer_runs(searched_layers(config, env.adapter), config.decisions.base.lookahead)
    owned = own_donors(env)
    candidates = {INCUMBENT: incumbent}

    keys = ModelKeys(env.adapter, env.param_names, env.pool)  # own layers a run gave are no new candidate
    for base in lookahead_bases(incumbent, env)[0] if bases is None else bases:
        for i, run in enumerate(runs):
            for donor in env.pool_names:
                if donor != base:
                    candidates[f"{base}/block{i}-{donor}"] = Recipe(
                        base=base, layers=dict.fromkeys(run, donor)
                    )
        for donor, own in owned.items():
            recipe = Recipe(base=base, layers=dict.fromkeys(own, donor))
            if donor != base and not any(keys.same(recipe, r) for r in candidates.values()):
                candidates[f"{base}/own-{donor}"] = recipe
    for label, recipe in paid_unions(incumbent, env)[0].items():
        if not any(keys.same(recipe, r) for r in candidates.values()):
            candidates[label] = recipe
    return candidates


def lookahead_spent(decisions: dict[str, Decision]) -> int:
    """Evaluations the campaign's ``base-lookahead`` stage spent (its candidates, those stopped early
    included, less the incumbent, whose metrics it reused); 0 without one."""
    stage = decision_of_kind(decisions, STAGE_KIND)
    if stage is None:
        return 0
    return len((set(stage.candidates) | set(stage.pruned)) - {INCUMBENT})


def lookahead_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    """Every lookahead candidate, enqueued; the switch to another boundary needs significance."""
    assert incumbent is not None
    looked, skipped = lookahead_bases(incumbent, env)
    candidates = lookahead_candidates(incumbent, env, looked)

    def decode(trial: Trial) -> tuple[str, Recipe]:
        label = str(trial.suggest_categorical("candidate", list(candidates)))
        return label, candidates[label]

    def details(_trials: dict[str, Any]) -> dict[str, Any]:  # skipped: the joint stage could not pay
        return {"lookahead_bases": looked, "lookahead_skipped": skipped}

    return StageSpace(
        decode=decode,
        enqueue=[(label, {"candidate": label}) for label in candidates],
        details=details,
        significant_boundary_switch=True,
        switch_confidence=env.config.decisions.base.switch_confidence,
    )


class BaseLookaheadKind(DecisionKind):
    """``decisions.base.lookahead`` > 1 (with ``mode: auto``): one stage after the base decision."""

    stage_kinds = (STAGE_KIND,)
    order = 5  # after the base (0), before the boundary (20) and the layers

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        base = config.decisions.base
        return [planned(STAGE_KIND)] if base.mode == "auto" and base.lookahead > 1 else []

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return lookahead_space(stage, incumbent, env)

    def olm_report(self, stage: Stage, decision: Decision) -> dict[str, Any]:
        """After a switch, OLM's ``base_model`` names the new base (its ``metrics`` and ``lookahead`` are
        the winning lookahead candidate's); otherwise the base decision's section stands."""
        if decision.winner == INCUMBENT:
            return {}
        return {
            "base_model": {
                "name": decision.recipe.base,
                "lookahead": decision.winner,
                "metrics": decision.metrics,
            }
        }


register_kind(BaseLookaheadKind())
