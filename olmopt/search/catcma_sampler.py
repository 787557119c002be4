"""A small Optuna sampler over a fixed mixed space with the ``cmaes`` package's CatCMAwM.

Continuous parameters map to CatCMA's continuous block, integer and categorical ones to its
categorical block (one-hot). CatCMA is single-objective: a generation's multi-objective values are
scalarised by Borda (sum of per-objective ranks, lower is better) before ``tell``. Parameters that a
trial does not suggest (conditional ones, e.g. the scale of an inactive slot) are simply ignored.
Enqueued trials keep their fixed parameters and are not told to the optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from cmaes import CatCMAwM
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from olmopt.search.seeding import finished, trial_seed


class CatCmaSampler(optuna.samplers.BaseSampler):
    def __init__(
        self, space: dict[str, BaseDistribution], seed: int | None = None, population_size: int | None = None
    ) -> None:
        self.space = space
        self.continuous = [n for n, d in space.items() if isinstance(d, FloatDistribution)]
        self.discrete = [
            n for n, d in space.items() if isinstance(d, CategoricalDistribution | IntDistribution)
        ]
        self.choices = {n: _choices(space[n]) for n in self.discrete}
        self.optimizer = CatCMAwM(
            x_space=[[space[n].low, space[n].high] for n in self.continuous] or None,  # type: ignore[attr-defined]
            c_space=[len(self.choices[n]) for n in self.discrete] or None,
            seed=seed,
            population_size=population_size,
        )
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        self._seed = seed or 0
        self._pending: dict[int, Any] = {}
        self._told: list[tuple[Any, Sequence[float]]] = []
        self._replayed = False

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self.space)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if "fixed_params" in trial.system_attrs:
            return {}
        if not self._replayed:
            self._replay(study, trial.number)
        self.optimizer._rng.seed(trial_seed(self._seed, finished(study)))  # the same draw after a resume
        solution = self.optimizer.ask()
        self._pending[trial._trial_id] = solution
        params: dict[str, Any] = {}
        for i, name in enumerate(self.continuous):
            params[name] = float(solution.x[i])
        for i, name in enumerate(self.discrete):
            params[name] = self.choices[name][int(np.argmax(solution.c[i]))]
        return params

    def _replay(self, study: optuna.Study, before: int) -> None:
        """A resumed stage: tell the optimizer the sampled trials finished before ``before``, in order, so
        it continues as the uninterrupted run would (exact for categorical spaces; continuous parameters
        are replayed without CatCMA's raw Gaussian draw, which only its constraint penalty reads)."""
        self._replayed = True
        for t in sorted(
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number
        ):
            if t.number >= before or "fixed_params" in t.system_attrs or t.values is None:
                continue
            if any(n not in t.params for n in self.space):
                continue
            x = np.array([t.params[n] for n in self.continuous], dtype=float) if self.continuous else None
            c = None
            if self.discrete:
                c = np.zeros((len(self.discrete), max(len(v) for v in self.choices.values())), dtype=bool)
                for i, n in enumerate(self.discrete):
                    c[i, self.choices[n].index(t.params[n])] = True
            solution = CatCMAwM.Solution(x, None, c, x.copy() if x is not None else None)
            self._pending[t._trial_id] = solution
            self.after_trial(study, t, TrialState.COMPLETE, t.values)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        solution = self._pending.pop(trial._trial_id, None)
        if solution is None or state != TrialState.COMPLETE or values is None:
            return
        self._told.append((solution, list(values)))
        if len(self._told) >= self.optimizer.population_size:
            scores = borda_scores([v for _, v in self._told], study.directions)
            self.optimizer.tell([(sol, score) for (sol, _), score in zip(self._told, scores, strict=True)])
            self._told = []


def _choices(dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    assert isinstance(dist, IntDistribution)
    return list(range(dist.low, dist.high + 1, dist.step))


def borda_scores(values: Sequence[Sequence[float]], directions: Sequence[StudyDirection]) -> list[float]:
    """Sum over objectives of each solution's rank (1 = best); lower is better."""
    scores = [0.0] * len(values)
    for k, direction in enumerate(directions):
        sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
        column = [sign * v[k] for v in values]
        for i, x in enumerate(column):
            scores[i] += 1 + sum(other < x for other in column)
    return scores
