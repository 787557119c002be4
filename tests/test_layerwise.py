"""Layer-wise merge parameters in the Recipe: the right layers get the right values (hand computation on
the tiny zoo's tensors), the in-place patch equals the export, and export + rebuild are bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from olmopt.errors import InputError
from olmopt.export import rebuild, write_model_dir
from olmopt.patch import WorkingModel, materialize
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import ParamMerge, Recipe

# weights per layer (4 layers in the tiny zoo), one value per variant (spec_add, spec_fact)
PER_LAYER = ((1.0, 0.0), (0.0, 1.0), (0.5, 0.25), (0.25, 0.75))


@pytest.fixture(scope="module")
def pool(tiny_zoo: Path) -> ModelPool:
    return ModelPool([str(tiny_zoo / m) for m in ("base", "spec_add", "spec_fact")])


def _recipe(
    pool: ModelPool, layer_params: dict, group_size: int = 1, method: str = "task_arithmetic", **params
) -> Recipe:
    base, add, fact = pool.names
    merge = ParamMerge(
        method=method, models=(add, fact), params=params, layer_params=layer_params, group_size=group_size
    )
    return Recipe(base=base, param_merge=merge)


def _hand_task_arithmetic(
    pool: ModelPool, name: str, w: tuple[float, float], lam: float = 1.0
) -> torch.Tensor:
    base, add, fact = (pool.tensor(m, name).double() for m in pool.names)
    return (base + lam * (w[0] * (add - base) + w[1] * (fact - base))).float()


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_per_layer_weights_reach_their_layers(pool: ModelPool) -> None:
    recipe = _recipe(pool, {"weights": PER_LAYER})
    merged = dict(materialize(pool, recipe))
    adapter = pool.adapter
    seen = set()
    for name, tensor in merged.items():
        layer = adapter.layer_of(name)
        if layer is None:  # embedding: layer 0's values; final norm and head: the last layer's
            layer = 0 if name.startswith(adapter.embed) else adapter.num_layers - 1
        seen.add(layer)
        torch.testing.assert_close(
            tensor, _hand_task_arithmetic(pool, name, PER_LAYER[layer]), rtol=0, atol=2e-6
        )
    assert seen == {0, 1, 2, 3}
    # the tolerance tells layers apart: layer 0 is far from what layer 1's weights would give
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - _hand_task_arithmetic(pool, q, PER_LAYER[1])).abs().max() > 1e-3


def test_groups_of_adjacent_layers_and_global_values(pool: ModelPool) -> None:
    # two groups of two layers; lambda global, weights per group, the second group one scalar for both
    recipe = _recipe(pool, {"weights": ((1.0, 0.5), 0.25)}, group_size=2, **{"lambda": 0.5})
    merged = dict(materialize(pool, recipe))
    want = {0: (1.0, 0.5), 1: (1.0, 0.5), 2: (0.25, 0.25), 3: (0.25, 0.25)}
    for name, tensor in merged.items():
        layer = pool.adapter.layer_of(name)
        if layer is None:
            layer = 0 if name.startswith(pool.adapter.embed) else 3
        torch.testing.assert_close(
            tensor, _hand_task_arithmetic(pool, name, want[layer], 0.5), rtol=0, atol=2e-6
        )
    # a layer-wise list equal in every group is the global setting, bit for bit
    flat = _recipe(pool, {"weights": ((0.3, 0.6),) * 4}, **{"lambda": 0.5})
    glob = _recipe(pool, {}, weights=(0.3, 0.6), **{"lambda": 0.5})
    a, b = dict(materialize(pool, flat)), dict(materialize(pool, glob))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_layerwise_density_of_ties(pool: ModelPool) -> None:
    from olmopt.methods.delta import merge_tensor

    recipe = _recipe(pool, {"density": ((0.2, 0.9), (1.0, 0.5))}, group_size=2, method="ties")
    merged = dict(materialize(pool, recipe))
    name = "model.layers.3.mlp.down_proj.weight"
    base, add, fact = (pool.tensor(m, name) for m in pool.names)
    want = merge_tensor("ties", base, [add, fact], {"density": (1.0, 0.5)})
    other = merge_tensor("ties", base, [add, fact], {"density": (0.2, 0.9)})
    assert torch.equal(merged[name], want) and not torch.equal(merged[name], other)


def test_patch_equals_export_and_undo_is_exact(pool: ModelPool) -> None:
    recipe = _recipe(pool, {"weights": PER_LAYER})
    working = WorkingModel(pool, pool.names[0], device="cpu")
    before = {k: v.detach().clone() for k, v in working.params.items()}
    exported = dict(materialize(pool, recipe))
    with working.patched(recipe):
        for name, param in working.params.items():
            assert torch.equal(param.detach(), exported[name]), name
    assert all(torch.equal(working.params[k].detach(), v) for k, v in before.items())


def test_export_and_rebuild_bit_identical(pool: ModelPool, tmp_path: Path) -> None:
    recipe = _recipe(
        pool, {"weights": PER_LAYER, "density": ((0.5, 1.0), (0.9, 0.3))}, group_size=2, method="dare_ties"
    )
    recipe = recipe.model_copy(update={"param_merge": recipe.param_merge.model_copy(update={"seed": 7})})
    out = tmp_path / "out"
    with pytest.raises(InputError, match="weights has 4 values for 2 layer groups"):
        write_model_dir(pool, recipe, out, {"recipe": recipe.to_dict()}, "card")
    assert not out.exists()
    recipe = _recipe(
        pool,
        {"weights": PER_LAYER[:2], "density": ((0.5, 1.0), (0.9, 0.3))},
        group_size=2,
        method="dare_ties",
    )
    write_model_dir(pool, recipe, out, {"recipe": recipe.to_dict()}, "card", progress=False)
    again = tmp_path / "again"
    rebuilt = rebuild(out / "merge_report.json", again, progress=False)
    assert rebuilt == recipe
    a, b = _weights(out), _weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["recipe"]["param_merge"]["layer_params"]["weights"] == [[1.0, 0.0], [0.0, 1.0]]


def test_recipe_json_round_trip_and_old_form_unchanged() -> None:
    merge = ParamMerge(
        method="ties", models=("a", "b"), layer_params={"weights": ((1.0, 0.5), 0.2)}, group_size=3
    )
    recipe = Recipe(base="base", param_merge=merge)
    assert Recipe.from_json(recipe.to_json()) == recipe
    old = Recipe(base="base", param_merge=ParamMerge(method="ties", models=("a",), params={"density": 0.5}))
    assert "layer_params" not in old.to_json() and "group_size" not in old.to_json()


@pytest.mark.parametrize(
    ("layer_params", "group_size", "message"),
    [
        ({"weights": (1.0, 1.0, 1.0)}, 1, "layer_params.weights has 3 values for 4 layer groups"),
        ({"density": (0.5, 1.5)}, 2, "layer group 1: ties: density must be in \\(0, 1\\], got 1.5"),
        ({"density": ((0.5, 0.5, 0.5), 0.5)}, 2, "layer group 0: ties: density has 3 values for 2 variants"),
        ({"nonsense": (0.5, 0.5)}, 2, "unknown parameter 'nonsense'"),
    ],
)
def test_bad_layer_lists_are_one_line(layer_params: dict, group_size: int, message: str) -> None:
    merge = ParamMerge(method="ties", models=("a", "b"), layer_params=layer_params, group_size=group_size)
    recipe = Recipe(base="base", param_merge=merge)
    with pytest.raises(InputError, match=message) as info:
        recipe.validate_against(["base", "a", "b"], 4, [])
    assert "\n" not in str(info.value)


def test_ps_merge_as_a_donor_of_later_stages(pool: ModelPool, tmp_path: Path) -> None:
    """Sakana's PS then layers: layers and tensors may name the Recipe's own PS merge (MERGE_DONOR)."""
    from olmopt.patch import model_key
    from olmopt.recipe import MERGE_DONOR

    base, add, fact = pool.names
    ps = _recipe(pool, {"weights": PER_LAYER})
    recipe = ps.model_copy(
        update={"boundary": base, "layers": {1: fact, 2: MERGE_DONOR}, "units": {"lm_head": MERGE_DONOR}}
    )
    merged, plain = dict(materialize(pool, recipe)), dict(materialize(pool, ps))
    for name, tensor in merged.items():
        layer = pool.adapter.layer_of(name)
        if layer == 1:
            assert torch.equal(tensor, pool.tensor(fact, name)), name
        elif name.startswith(("model.embed_tokens", "model.norm")):
            assert torch.equal(tensor, pool.tensor(base, name)), name
        else:  # layers 0, 2, 3 and the head: the PS merge
            assert torch.equal(tensor, plain[name]), name
    names = list(merged)
    same = ps.model_copy(update={"boundary": base, "layers": {1: fact}, "units": {"lm_head": MERGE_DONOR}})
    assert model_key(recipe, pool.adapter, names) == model_key(same, pool.adapter, names)
    working = WorkingModel(pool, base, device="cpu")
    with working.patched(recipe):
        assert all(torch.equal(p.detach(), merged[n]) for n, p in working.params.items())
    out, again = tmp_path / "out", tmp_path / "again"
    write_model_dir(pool, recipe, out, {"recipe": recipe.to_dict()}, "card", progress=False)
    rebuild(out / "merge_report.json", again, progress=False)
    a, b = _weights(out), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(
        InputError, match="'@merge' names the parameter-space merge, but param_merge is not set"
    ):
        Recipe(base=base, layers={2: MERGE_DONOR}).validate_against(pool.names, 4, [])
