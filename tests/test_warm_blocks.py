"""``layers.warm_blocks``: the joint layer stage's warm starts of contiguous blocks of layers, each donor
in each block on the incumbent (olmopt.search.kinds.joint.block_starts)."""

from __future__ import annotations

from typing import Any

import pytest

from olmopt.config import StudyConfig
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import Recipe
from olmopt.search.kinds.joint import JointChoices, block_starts, joint_space
from olmopt.search.plan import Stage
from olmopt.search.tied_boundaries import BoundaryOffer
from olmopt.testing.kinds import NamesEnv

POOL = ["base", "a", "b"]


def _config(decisions: dict[str, Any]) -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "name": "t",
            "pool": {"models": POOL},
            "objectives": [{"dataset": "x.json", "metric": "token_accuracy"}],
            "decisions": decisions,
        }
    )


def _enqueued(layers: dict[str, Any], incumbent: Recipe) -> list[tuple[str, dict[str, Any]]]:
    env = NamesEnv(_config({"layers": layers}), list(POOL), ArchitectureAdapter("llama", 5, False))
    return joint_space(Stage(1, "joint-layers", n_trials=20), incumbent, env).enqueue


def test_two_blocks_put_each_donor_in_the_lower_and_the_upper_layers_on_the_incumbent() -> None:
    """5 layers in 2 blocks: layers 0-2 and 3-4 (the lower block takes the odd one). The incumbent's own
    donor in a block is the incumbent again, so it is dropped with the other duplicates."""
    incumbent = Recipe(base="a")
    enqueued = _enqueued({"mode": "joint", "warm_blocks": 2}, incumbent)
    labels = [label for label, _ in enqueued]
    assert labels == [
        "incumbent", "all-base", "all-b", "block0-base", "block0-b", "block1-base", "block1-b",
    ]  # fmt: skip
    params = dict(enqueued)
    assert params["block0-b"] == {
        "layer.0": "b",
        "layer.1": "b",
        "layer.2": "b",
        "layer.3": "a",
        "layer.4": "a",
    }
    assert params["block1-base"] == {
        "layer.0": "a", "layer.1": "a", "layer.2": "a", "layer.3": "base", "layer.4": "base",
    }  # fmt: skip


def test_blocks_follow_only_and_keep_the_incumbents_other_slots() -> None:
    """``only: [1, 2, 4]`` in 3 blocks: one layer each; the incumbent's swapped layer 2 stays elsewhere."""
    incumbent = Recipe(base="base", layers={2: "a"})
    enqueued = dict(_enqueued({"mode": "joint", "only": [1, 2, 4], "warm_blocks": 3}, incumbent))
    assert enqueued["block0-b"] == {"layer.1": "b", "layer.2": "a", "layer.4": "base"}
    assert enqueued["block1-b"] == {"layer.1": "base", "layer.2": "b", "layer.4": "base"}
    assert enqueued["block2-a"] == {"layer.1": "base", "layer.2": "a", "layer.4": "a"}
    assert "block1-a" not in enqueued  # the incumbent itself
    assert "block1-base" not in enqueued  # all-base's weights


def test_one_block_adds_nothing_and_more_blocks_than_layers_give_one_layer_each() -> None:
    keep = {"layer.0": "a", "layer.1": "a"}
    joint = JointChoices(dict.fromkeys(keep, POOL), {}, BoundaryOffer(offered=[]))
    assert block_starts(joint, keep, POOL, 1) == []
    starts = dict(block_starts(joint, keep, POOL, 4))
    assert set(starts) == {f"block{i}-{d}" for i in (0, 1) for d in POOL}
    assert starts["block1-b"] == {"layer.0": "a", "layer.1": "b"}


@pytest.mark.parametrize(
    "decisions",
    [
        {"layers": {"mode": "joint", "warm_blocks": 0}},
        {"layers": {"mode": "joint", "warm_blocks": 9}},
        {"layers": {"mode": "joint", "warm_blocks": "two"}},
        {"layers": {"mode": "joint", "warm_start": False, "warm_blocks": 2}},
        {"layers": {"mode": "greedy", "then_joint": 10, "warm_blocks": 2}},
        {"tensors": {"mode": "joint", "warm_blocks": 2}},
    ],
)
def test_warm_blocks_out_of_range_or_without_a_warm_started_joint_layer_stage_is_a_config_error(
    decisions: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match="warm_blocks"):
        _config(decisions)
