"""A joint stage offers one donor per distinct set of a slot's weights (olmopt.search.equal_donors): equal
choices neither split the sampler's density nor repeat a model among the warm starts."""

from __future__ import annotations

from typing import Any

import optuna

from olmopt.config import StudyConfig
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import Recipe
from olmopt.search.decision import Decision
from olmopt.search.kinds.joint import joint_distributions, joint_space
from olmopt.search.plan import Stage
from olmopt.testing.kinds import NamesEnv

POOL = ["base", "a", "b"]
PARAMS = [f"model.layers.{i}.{p}.weight" for i in range(4) for p in ("mlp.up_proj", "input_layernorm")]


class Digests:
    """A pool's ``digest``: ``a`` is trained in layers 2-3 only and ``b`` in layers 0-1 only (each holds the
    base's weights elsewhere); every layernorm is the same in all three."""

    def digest(self, model: str, name: str) -> str:
        layer = int(name.split(".")[2])
        own = {"a": {2, 3}, "b": {0, 1}}.get(model, set())
        if "layernorm" in name:
            return "ones"
        return f"{model if layer in own else 'base'}:{name}"

    weights_digest = ModelPool.weights_digest  # the pool's own combination of a slot's digests


def _env(decisions: dict[str, Any], pool: Any = None, earlier: dict[str, Decision] | None = None) -> NamesEnv:
    config = StudyConfig.model_validate(
        {
            "name": "t",
            "pool": {"models": POOL},
            "objectives": [{"dataset": "x.json", "metric": "token_accuracy"}],
            "decisions": decisions,
        }
    )
    return NamesEnv(
        config, list(POOL), ArchitectureAdapter("llama", 4, False), PARAMS, pool=pool, decisions=earlier or {}
    )


JOINT = {"layers": {"mode": "joint", "warm_blocks": 2}}


def test_each_layer_offers_one_donor_per_distinct_weights_and_the_incumbents_stands_for_its_own() -> None:
    stage = Stage(1, "joint-layers", n_trials=20)
    env = _env(JOINT, Digests())
    space = joint_space(stage, Recipe(base="base"), env)
    # a's layers 0-1 are the base's, b's layers 2-3 are: four block starts and the incumbent's twins drop
    assert space.enqueue == [
        ("incumbent", {"layer.0": "base", "layer.1": "base", "layer.2": "base", "layer.3": "base"}),
        ("all-a", {"layer.0": "base", "layer.1": "base", "layer.2": "a", "layer.3": "a"}),
        ("all-b", {"layer.0": "b", "layer.1": "b", "layer.2": "base", "layer.3": "base"}),
    ]
    spread = joint_space(stage, Recipe(base="base", layers={0: "a", 3: "b"}), env)
    keep = dict(spread.enqueue)["incumbent"]
    assert keep == {"layer.0": "a", "layer.1": "base", "layer.2": "base", "layer.3": "b"}  # a stands for base
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[int, set[str]] = {i: set() for i in range(4)}
    for _ in range(60):
        trial = study.ask()
        _, recipe = spread.decode(trial)
        for i in range(4):
            seen[i].add(recipe.layers.get(i, recipe.base))
        study.tell(trial, 0.0)
    assert seen == {0: {"a", "b"}, 1: {"base", "b"}, 2: {"base", "a"}, 3: {"b", "a"}}


def test_the_sampler_space_up_front_matches_and_a_names_only_env_offers_every_donor() -> None:
    stage = Stage(1, "joint-layers", n_trials=20)
    decisions = {"000-base": Decision(stage="000-base", winner="base", trial=0, recipe=Recipe(base="base"),
                                      metrics={})}  # fmt: skip
    env = _env(JOINT, Digests(), decisions)
    spaces = {slot: list(d.choices) for slot, d in joint_distributions(stage, env).items()}
    assert spaces == {"layer.0": ["base", "b"], "layer.1": ["base", "b"], "layer.2": ["base", "a"],
                      "layer.3": ["base", "a"]}  # fmt: skip
    names_only = joint_distributions(stage, _env(JOINT, None, decisions))
    assert all(list(d.choices) == POOL for d in names_only.values())


def test_unit_slots_collapse_too() -> None:
    stage = Stage(1, "joint-units", n_trials=20)
    env = _env({"tensors": {"mode": "joint"}}, Digests())
    space = joint_space(stage, Recipe(base="base"), env)
    params = dict(space.enqueue)
    assert params["all-a"]["unit.model.layers.0.mlp.up_proj"] == "base"
    assert params["all-a"]["unit.model.layers.3.mlp.up_proj"] == "a"
    assert params["all-b"] == {
        **{f"unit.model.layers.{i}.mlp.up_proj": "b" for i in (0, 1)},
        **{f"unit.model.layers.{i}.mlp.up_proj": "base" for i in (2, 3)},
    }


class Trained:
    """A pool's ``digest`` from which layers each model trained (None: every layer, a full fine-tune);
    every other layer holds the base's weights."""

    def __init__(self, trained: dict[str, set[int] | None]) -> None:
        self.trained = trained

    def digest(self, model: str, name: str) -> str:
        layers = self.trained.get(model, set())
        mine = layers is None or int(name.split(".")[2]) in layers
        return f"{model if mine else 'base'}:{name}"

    weights_digest = ModelPool.weights_digest


SIX = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)]
STRADDLE = {"fact": {2, 3}, "add": {4, 5}, "full": None}  # fact's pair straddles the halves 0-2 / 3-5


def _env6(decisions: dict[str, Any], pool: Any) -> NamesEnv:
    names = ["base", "full", "add", "fact"]
    config = StudyConfig.model_validate(
        {
            "name": "t",
            "pool": {"models": names},
            "objectives": [{"dataset": "x.json", "metric": "token_accuracy"}],
            "decisions": decisions,
        }
    )
    return NamesEnv(config, names, ArchitectureAdapter("llama", 6, False), SIX, pool=pool)


def test_own_layers_are_where_no_other_pool_model_has_the_weights() -> None:
    from olmopt.search.equal_donors import own_layers

    env = _env6(JOINT, Trained(STRADDLE))
    every = list(range(6))
    assert own_layers("fact", every, env) == [2, 3]
    assert own_layers("add", every, env) == [4, 5]
    assert own_layers("full", every, env) == []  # a full fine-tune: its whole model is the warm start
    assert own_layers("base", every, env) == []  # each of its layers is some specialist's too
    assert own_layers("fact", [0, 1, 3], env) == [3]  # only the searched layers
    assert own_layers("fact", [2, 3], env) == []  # every searched layer: the whole-model start has it
    env.pool = Trained({**STRADDLE, "add": {3, 4, 5}})  # add trained layer 3 too, to weights of its own
    assert own_layers("fact", every, env) == [2, 3] and own_layers("add", every, env) == [3, 4, 5]
    assert own_layers("fact", every, _env6(JOINT, None)) == []  # no pool on disk: no digests


def test_own_starts_move_a_straddling_pair_whole_and_drop_duplicates() -> None:
    """Halves 0-2 / 3-5 cut fact's pair; ``own-fact`` carries both layers onto an incumbent that is the
    full fine-tune everywhere. On the base, each partial fine-tune's whole model (``all-fact``) is already
    that start, so the own starts drop as duplicates."""
    stage = Stage(1, "joint-layers", n_trials=30)
    own = {"layers": {"mode": "joint", "warm_blocks": 2, "warm_own": True}}
    env = _env6(own, Trained(STRADDLE))
    full = {f"layer.{i}": "full" for i in range(6)}
    starts = dict(joint_space(stage, Recipe(base="full"), env).enqueue)
    assert starts["own-fact"] == {**full, "layer.2": "fact", "layer.3": "fact"}
    assert starts["own-add"] == {**full, "layer.4": "add", "layer.5": "add"}
    assert starts["block1-add"] == {**full, "layer.3": "base", "layer.4": "add", "layer.5": "add"}
    assert "own-full" not in starts and "own-base" not in starts  # a full fine-tune; no own layers
    on_base = joint_space(stage, Recipe(base="base"), env).enqueue
    assert dict(on_base)["all-fact"] == {**dict.fromkeys(full, "base"), "layer.2": "fact", "layer.3": "fact"}
    assert not any(label.startswith("own-") for label, _ in on_base)
    without = joint_space(stage, Recipe(base="full"), _env6(JOINT, Trained(STRADDLE))).enqueue
    assert not any(label.startswith("own-") for label, _ in without)  # warm_own off: as before
