"""A stage's decision from its finished trials: a pure function, the scorer injected.

``decide`` picks the winner (the kind's acceptance rule, else the feasible Pareto set ordered by
Copeland, then for joint stages the held-out guard), finds its metrics and held-out figures (reused
from an earlier decision of the same model where there is one) and returns the decision to record.
Everything it evaluates goes through ``score(recipe, split)``: the decision is the same whoever
records it, and a test can decide a stage without a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from optuna.trial import FrozenTrial

from olmopt.confidence import ItemValues, proportion_counts, selection_ties, significance_table
from olmopt.config import SelectionConfig
from olmopt.evaluate.item_scores import ItemScores, packed_items, unpack
from olmopt.recipe import Recipe
from olmopt.search import trials as T
from olmopt.search.boundary_switch import SwitchVerdict, switch_verdict
from olmopt.search.decision import CandidateResult, Decision
from olmopt.search.identity import ModelKeys
from olmopt.search.kind import Stage, StageSpace
from olmopt.select import Selection, objective_mean, select, significance

Scorer = Callable[[Recipe, str], dict[str, float]]  # (recipe, "search" | "held_out") -> objective values
ItemScorer = Callable[[Recipe, str], ItemScores]  # (recipe, split) -> objective -> item -> value


@dataclass(frozen=True)
class DecideRules:
    """What a decision depends on besides the stage's trials: the objectives and the selection settings."""

    names: list[str]  # objective names, in order
    directions: dict[str, str]
    pool_names: list[str]  # tie order
    selection: SelectionConfig
    joint: bool  # the stage's kind samples within a budget (held-out guard, baselines' held-out figures)
    has_held_out: bool  # some objective has a held-out part
    metric_of: dict[str, str] = field(default_factory=dict)  # objective -> metric (ties by confidence)
    items: dict[str, int] = field(default_factory=dict)  # objective -> search items (ties by confidence)
    tokens: dict[str, dict[int, int]] = field(default_factory=dict)  # perplexity objective -> item -> tokens


def decide(
    stage: Stage,
    trials: dict[str, FrozenTrial],
    space: StageSpace,
    incumbent: Recipe | None,
    rules: DecideRules,
    keys: ModelKeys,
    earlier: Decision | None,
    score: Scorer,
    decided_by: str,
    pruned: dict[str, str] | None = None,
    items_of: ItemScorer | None = None,
) -> Decision:
    """The decision of ``stage`` from its COMPLETE ``trials`` (by label, first result of a retried label).

    ``earlier``: the latest earlier decision of the same model as ``incumbent`` (its metrics, held-out
    figures and per-item values are reused). ``score``: evaluates a Recipe on a split (the incumbent when
    nothing was acceptable and it was not evaluated here; held-out figures). ``pruned``: the candidates
    stopped early (label -> why): recorded, never winners (they are not among ``trials``). ``items_of``:
    per-item values of a Recipe on a split, for a stage that guards its boundary switch
    (``StageSpace.significant_boundary_switch``; the held-out items, and search items no trial kept).
    """
    names = rules.names
    scores = {n: {label: float(t.values[i]) for label, t in trials.items()} for i, n in enumerate(names)}
    feasible = {label: bool(t.user_attrs.get("feasible", True)) for label, t in trials.items()}
    keep = _kept_label(trials, space, incumbent, keys)
    guarded: dict[str, dict[str, float]] = {}  # held-out figures of the guard's candidates
    ties: str = ""
    verdicts: dict[str, dict[str, str]] = {}
    intervals: dict[str, dict[str, dict[str, object]]] = {}
    runner_up = ""
    if space.decide is not None:
        winner, reason = space.decide(trials, scores, feasible, keep), "stage acceptance rule"
    else:
        order = {name: i for i, name in enumerate(rules.pool_names)}
        chosen = rules.selection
        per_item = _item_values(trials, rules, keys, earlier) if chosen.tolerance is None else None
        tolerance, rule = selection_ties(
            chosen.tolerance, chosen.confidence, rules.metric_of, rules.items, per_item, rules.tokens
        )
        tied = rule.tied if rule is not None else None

        def selected(among: dict[str, bool]) -> Selection:
            return select(
                scores, rules.directions, among, keep=keep,
                tie_key=lambda c: (c != keep, order.get(c, len(order)), c),
                tolerance=tolerance, score=chosen.score, tied=tied,
            )  # fmt: skip

        selection = selected(feasible)
        winner, reason = selection.winner, selection.reason
        ties = rule.describe() if rule is not None else f"fixed tolerance {tolerance:g}"
        guard = rules.selection.held_out_guard
        splits = "search and held-out" if rules.has_held_out else "search"  # what a pooled test reads
        if rules.joint and guard > 1 and winner is not None and rules.has_held_out:
            winner, reason, guarded = _held_out_guard(trials, selection.order[:guard], reason, rules, score)
        if space.significant_boundary_switch and winner is not None and incumbent is not None:
            own = incumbent.boundary_donor
            on_own = {
                lbl: feasible[lbl] and T.RECIPE_ATTR in t.user_attrs and _recipe(t).boundary_donor == own
                for lbl, t in trials.items()
            }
            if T.RECIPE_ATTR in trials[winner].user_attrs and not on_own[winner] and any(on_own.values()):
                rival = selected(on_own).winner
                assert rival is not None and items_of is not None
                packed = _packed_by_label(trials, keys, earlier)
                level = space.switch_confidence or rules.selection.confidence
                verdict = _pooled_verdict(winner, rival, trials, packed, rules, items_of, level)
                winner, reason = _boundary_switch(winner, rival, trials, verdict, reason, splits)
        if space.held_out_veto and winner not in (None, keep) and keep is not None and rules.has_held_out:
            assert winner is not None
            winner, reason, vetoed = _held_out_veto(trials, winner, keep, reason, rules, score, guarded)
            guarded.update(vetoed)
        challenge = space.challenge_confidence
        if challenge is not None and winner not in (None, keep) and keep is not None:
            assert winner is not None and items_of is not None
            packed = _packed_by_label(trials, keys, earlier)
            verdict = _pooled_verdict(winner, keep, trials, packed, rules, items_of, challenge)
            winner, reason = _significant_challenge(winner, keep, verdict, reason, splits, challenge)
        if winner is not None:  # against the final winner (the held-out guard's choice)
            verdicts = significance(scores, rules.directions, winner, tied, tolerance)
            runner_up = next((c for c in selection.order if c != winner), "")
            compared = [c for c in (runner_up, keep) if c]
            intervals = significance_table(verdicts, scores, winner, rule, tolerance, compared)
    if winner is None:  # nothing acceptable and the incumbent was not evaluated here
        assert incumbent is not None
        recipe, trial_number, label = incumbent, None, "incumbent"
        metrics = earlier.metrics if earlier else score(recipe, "search")
    else:
        t = trials[winner]
        recipe, trial_number, label = Recipe.from_json(t.user_attrs[T.RECIPE_ATTR]), t.number, winner
        metrics = T.metrics_of(t, names)
    items = packed_items(t.user_attrs) if winner is not None else {}
    if not items and earlier is not None and keys.same(earlier.recipe, recipe):
        items = dict(earlier.items)  # the incumbent again: its per-item values, the next stage's reference
    held_out: dict[str, float] = {}
    if winner is not None and winner in guarded:
        held_out = guarded[winner]
    elif rules.selection.held_out_check and rules.has_held_out:
        if earlier is not None and earlier.held_out and keys.same(earlier.recipe, recipe):
            held_out = dict(earlier.held_out)
        else:
            held_out = score(recipe, "held_out")
    baselines: dict[
        str, dict[str, float]
    ] = {}  # a joint stage's named starting points get held-out figures too
    if held_out and rules.joint:
        for lbl, _params in space.enqueue:
            if lbl in trials and lbl != label and lbl not in guarded:
                baselines[lbl] = score(Recipe.from_json(trials[lbl].user_attrs[T.RECIPE_ATTR]), "held_out")
    candidates = {
        lbl: CandidateResult(
            T.metrics_of(t, names), feasible[lbl], t.number, guarded.get(lbl, baselines.get(lbl))
        )
        for lbl, t in trials.items()
    }
    return Decision(
        stage=stage.key,
        winner=label,
        trial=trial_number,
        recipe=recipe,
        metrics=metrics,
        held_out=held_out,
        candidates=candidates,
        reason=reason,
        decided_by=decided_by,
        kept_incumbent=keep is not None and label == keep,
        held_out_guard=list(guarded),
        items=items,
        pruned=dict(pruned or {}),
        details=space.details(trials) if space.details is not None else {},
        ties=ties,
        significance=verdicts,
        intervals=intervals,
        runner_up=runner_up if ties else "",
        incumbent_label=(keep or "") if ties else "",
    )


def _item_values(
    trials: dict[str, FrozenTrial], rules: DecideRules, keys: ModelKeys, earlier: Decision | None
) -> ItemValues:
    """objective -> candidate -> item -> value of the objectives without a binomial interval (losses,
    generation scores), from each trial's packed per-item values; a trial whose metrics were reused has
    none: those of an evaluated trial of the same model in the stage, else of ``earlier`` (the incumbent's
    decision) when it is the same model."""
    newcombe = proportion_counts(rules.metric_of, rules.items)
    wanted = [n for n in rules.names if n not in newcombe]
    packed = _packed_by_label(trials, keys, earlier)
    out: dict[str, dict[str, dict[int, float]]] = {}
    for name in wanted:
        per = {label: unpack(p[name]) for label, p in packed.items() if name in p}
        if per:
            out[name] = per
    return out


def _packed_by_label(
    trials: dict[str, FrozenTrial], keys: ModelKeys, earlier: Decision | None
) -> dict[str, dict[str, str]]:
    """label -> objective -> packed per-item search values; a trial whose metrics were reused has none:
    those of an evaluated trial of the same model in the stage, else of ``earlier`` (the incumbent's
    decision) when it is the same model, else none ({})."""
    packed = {label: packed_items(t.user_attrs) for label, t in trials.items()}
    for label, t in trials.items():
        if packed[label] or T.RECIPE_ATTR not in t.user_attrs:
            continue
        mine = str(t.user_attrs[T.RECIPE_ATTR])
        same = [
            packed[o] for o, u in trials.items()
            if packed[o] and keys.same_json(str(u.user_attrs.get(T.RECIPE_ATTR, "")), mine)
        ]  # fmt: skip
        if same:
            packed[label] = same[0]
        elif earlier is not None and earlier.items and keys.same_json(earlier.recipe.to_json(), mine):
            packed[label] = dict(earlier.items)
    return packed


def _recipe(trial: FrozenTrial) -> Recipe:
    return Recipe.from_json(str(trial.user_attrs[T.RECIPE_ATTR]))


def _pooled_verdict(
    winner: str,
    rival: str,
    trials: dict[str, FrozenTrial],
    packed: dict[str, dict[str, str]],
    rules: DecideRules,
    items_of: ItemScorer,
    confidence: float,
) -> SwitchVerdict:
    """``winner`` against ``rival`` on the search and held-out items together (search/boundary_switch.py)
    at ``confidence``. Search items come from the trials (``items_of`` where a trial kept none), held-out
    items from ``items_of``."""

    def items(label: str) -> dict[str, ItemScores]:
        recipe = _recipe(trials[label])
        stored = packed.get(label)
        search = {n: unpack(v) for n, v in stored.items()} if stored else items_of(recipe, "search")
        splits = {"search": search}
        if rules.has_held_out:
            splits["held_out"] = items_of(recipe, "held_out")
        return splits

    return switch_verdict(items(winner), items(rival), rules.directions, rules.metric_of, confidence)


def _boundary_switch(
    winner: str, rival: str, trials: dict[str, FrozenTrial], verdict: SwitchVerdict, reason: str, splits: str
) -> tuple[str, str]:
    """``winner`` (on another boundary than the incumbent's) against ``rival`` (the best candidate on the
    incumbent's boundary): the winner stands when ``verdict`` (``_pooled_verdict``) is significant, else the
    rival wins."""
    mine, theirs = _recipe(trials[winner]).boundary_donor, _recipe(trials[rival]).boundary_donor
    lead = f"leads {rival!r} (boundary {theirs}) by {verdict.lead:+.4f} on the {splits} items"
    if verdict.significant:
        return winner, f"{reason}; boundary switch to {mine}: {winner!r} {lead}, significant"
    return rival, (
        f"{reason}; boundary switch to {mine} not significant: {winner!r} {lead}, so {rival!r} wins"
    )


def _significant_challenge(
    winner: str, keep: str, verdict: SwitchVerdict, reason: str, splits: str, confidence: float
) -> tuple[str, str]:
    """A challenger that won the stage (``winner``) against the incumbent (``keep``): it stands when
    ``verdict`` is significant at ``confidence``, else the incumbent wins
    (``StageSpace.challenge_confidence``)."""
    lead = f"{winner!r} leads {keep!r} by {verdict.lead:+.4f} on the {splits} items"
    if verdict.significant:
        return winner, f"{reason}; {lead}, significant at {confidence:g}"
    return keep, f"{reason}; {lead}, not significant at {confidence:g}, so {keep!r} wins"


def _kept_label(
    trials: dict[str, FrozenTrial], space: StageSpace, incumbent: Recipe | None, keys: ModelKeys
) -> str | None:
    """The label of the incumbent among the candidates (the enqueued parent/incumbent first), if evaluated."""
    if incumbent is None:
        return None
    mine = incumbent.to_json()
    same = [
        lbl for lbl, t in trials.items()
        if T.RECIPE_ATTR in t.user_attrs and keys.same_json(str(t.user_attrs[T.RECIPE_ATTR]), mine)
    ]  # fmt: skip
    named = [lbl for lbl, _ in space.enqueue if lbl in same]
    return named[0] if named else (same[0] if same else None)


def _held_out_means(
    trials: dict[str, FrozenTrial],
    labels: list[str],
    rules: DecideRules,
    score: Scorer,
    known: dict[str, dict[str, float]] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Held-out figures of ``labels`` (``known`` ones reused) and each one's held-out mean (maximised
    objectives; others count negated)."""
    known = known or {}
    figures = {lbl: known.get(lbl) or score(_recipe(trials[lbl]), "held_out") for lbl in labels}
    by_objective = {n: {lbl: figures[lbl][n] for lbl in labels} for n in rules.names}
    return figures, {lbl: objective_mean(by_objective, rules.directions, lbl) for lbl in labels}


def _held_out_veto(
    trials: dict[str, FrozenTrial],
    winner: str,
    keep: str,
    reason: str,
    rules: DecideRules,
    score: Scorer,
    known: dict[str, dict[str, float]],
) -> tuple[str, str, dict[str, dict[str, float]]]:
    """A challenger that won on the search split replaces the incumbent only when its held-out mean is
    higher too. ``known``: held-out figures already computed (the held-out guard's). Returns (winner,
    reason, held-out figures of both)."""
    figures, means = _held_out_means(trials, [winner, keep], rules, score, known)
    ahead, behind = means[winner], means[keep]
    if ahead > behind:
        return winner, f"{reason}; held-out check: {ahead:.4f} against {keep!r}'s {behind:.4f}", figures
    return (
        keep,
        f"{reason}; held-out veto: {winner!r} {ahead:.4f}, not above {keep!r}'s {behind:.4f}",
        figures,
    )


def _held_out_guard(
    trials: dict[str, FrozenTrial], top: list[str], reason: str, rules: DecideRules, score: Scorer
) -> tuple[str, str, dict[str, dict[str, float]]]:
    """The overfitting guard of a joint stage: among the ``top`` candidates of the search-split
    selection, the one with the best held-out mean, ties to the search order. Returns (winner, reason,
    held-out figures of every guarded candidate)."""
    figures, means = _held_out_means(trials, top, rules, score)
    best = max(top, key=lambda lbl: (means[lbl], -top.index(lbl)))
    if best != top[0]:
        reason = f"{reason}; held-out guard: {best!r} has the best held-out mean of the top {len(top)}"
    return best, reason, figures
