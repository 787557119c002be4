"""Patching recipes into the resident model: bit-exact undo, diff patching, materialize, save + reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _models import make_family
from transformers import AutoModelForCausalLM

from olmopt.errors import InputError
from olmopt.outdir import copy_side_files, save_state_dict
from olmopt.patch import WorkingModel, materialize, param_sources
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import EsStep, FusionStep, Recipe

ARCHS = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="module", params=ARCHS)
def pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelPool:
    fam = make_family(tmp_path_factory.mktemp(request.param), ["a", "b", "c"], request.param, layers=4)
    pool = ModelPool([str(p) for p in fam.values()])
    pool.check_homology()
    return pool


def _names(pool: ModelPool) -> tuple[str, str, str]:
    a, b, c = pool.names
    return a, b, c


def _state(wm: WorkingModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in wm.model.state_dict().items()}


def _equal(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ (bit for bit), or that one side lacks."""
    return sorted(k for k in x.keys() | y.keys() if k not in x or k not in y or not torch.equal(x[k], y[k]))


def _rich(pool: ModelPool) -> Recipe:
    a, b, c = _names(pool)
    return Recipe(
        base=a,
        boundary=c,
        layers={1: b, 3: c},
        units={"model.layers.2.self_attn.q_proj": c, "model.layers.1.mlp.down_proj": c},
        es=(EsStep(unit="model.layers.2.mlp.up_proj", kind="svd", sigma=0.05, seed=11),),
    )


def test_patched_values_come_from_their_donors(pool: ModelPool) -> None:
    a, b, c = _names(pool)
    wm = WorkingModel(pool, a, device="cpu")
    recipe = _rich(pool)
    wm.apply(recipe)
    params = dict(wm.model.named_parameters())
    assert torch.equal(params["model.embed_tokens.weight"], pool.tensor(c, "model.embed_tokens.weight"))
    assert torch.equal(params["model.norm.weight"], pool.tensor(c, "model.norm.weight"))
    assert torch.equal(
        params["model.layers.1.self_attn.k_proj.weight"],
        pool.tensor(b, "model.layers.1.self_attn.k_proj.weight"),
    )
    assert torch.equal(
        params["model.layers.1.mlp.down_proj.weight"], pool.tensor(c, "model.layers.1.mlp.down_proj.weight")
    )
    assert torch.equal(
        params["model.layers.2.self_attn.q_proj.weight"],
        pool.tensor(c, "model.layers.2.self_attn.q_proj.weight"),
    )
    assert torch.equal(
        params["model.layers.2.self_attn.k_proj.weight"],
        pool.tensor(a, "model.layers.2.self_attn.k_proj.weight"),
    )
    if pool.adapter.model_type == "qwen2":  # the bias is in the q_proj unit and moves with it
        assert torch.equal(
            params["model.layers.2.self_attn.q_proj.bias"],
            pool.tensor(c, "model.layers.2.self_attn.q_proj.bias"),
        )
        assert torch.equal(
            wm.model.get_output_embeddings().weight, pool.tensor(c, "model.embed_tokens.weight")
        )
    else:
        assert torch.equal(params["lm_head.weight"], pool.tensor(c, "lm_head.weight"))
    up = params["model.layers.2.mlp.up_proj.weight"]
    donor_up = pool.tensor(a, "model.layers.2.mlp.up_proj.weight")
    assert up.shape == donor_up.shape and not torch.equal(up, donor_up)  # the ES step moved it


def test_undo_is_bit_exact(pool: ModelPool) -> None:
    a, _, _ = _names(pool)
    wm = WorkingModel(pool, a, device="cpu")
    before = _state(wm)
    handle = wm.apply(_rich(pool))
    changed = _equal(before, _state(wm))
    assert "model.layers.1.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    wm.undo(handle)
    assert _equal(before, _state(wm)) == []
    assert wm.recipe == Recipe(base=a)
    assert all(src == (a, ()) for src in wm.sources.values())


def test_diff_patching_equals_patching_from_scratch(pool: ModelPool) -> None:
    a, b, c = _names(pool)
    wm = WorkingModel(pool, a, device="cpu")
    before = _state(wm)
    recipe_a = Recipe(base=a, layers={1: b, 2: c}, units={"model.layers.0.mlp.up_proj": b})
    recipe_b = Recipe(base=a, boundary=b, layers={1: b, 3: c}, units={"model.layers.0.mlp.up_proj": c})
    handle_a = wm.apply(recipe_a)
    handle_b = wm.apply(recipe_b)
    stacked = _state(wm)
    # only what differs between A and B was copied: layer 1 stays on b, so none of it was touched
    assert not any(k.startswith("model.layers.1.") for k in handle_b.saved)
    assert any(k.startswith("model.layers.2.") for k in handle_b.saved)
    assert any(k.startswith("model.layers.3.") for k in handle_b.saved)
    wm.undo(handle_b)
    wm.undo(handle_a)
    assert _equal(before, _state(wm)) == []
    with wm.patched(recipe_b):
        assert _equal(stacked, _state(wm)) == []
    assert _equal(before, _state(wm)) == []
    fresh = WorkingModel(pool, a, device="cpu")
    fresh.apply(recipe_b)
    assert _equal(stacked, _state(fresh)) == []


def test_failed_apply_leaves_the_model_untouched(pool: ModelPool) -> None:
    a, b, _ = _names(pool)
    wm = WorkingModel(pool, a, device="cpu")
    before = _state(wm)
    with pytest.raises(InputError, match="is not in the pool"):
        wm.apply(Recipe(base=a, layers={1: "ghost"}))
    # an ES step that cannot apply (a 1-D norm weight) fails after layer 1 was already copied
    bad = Recipe(
        base=a,
        layers={1: b},
        es=(EsStep(unit="model.layers.3.input_layernorm", kind="svd", sigma=0.1, seed=0),),
    )
    with pytest.raises(InputError, match="not applicable"):
        wm.apply(bad)
    assert _equal(before, _state(wm)) == []
    assert wm.recipe == Recipe(base=a)
    with pytest.raises(InputError, match="not patched in place"):
        wm.apply(Recipe(base=a, fusion=(FusionStep(into=2, remove=3, alpha=0.5),)))


def test_materialize_equals_patched_state(pool: ModelPool) -> None:
    a, _, _ = _names(pool)
    wm = WorkingModel(pool, a, device="cpu")
    recipe = _rich(pool)
    wm.apply(recipe)
    live = _state(wm)
    merged = dict(materialize(pool, recipe))
    expected_keys = set(live) - ({"lm_head.weight"} if pool.adapter.tied_embeddings else set())
    assert set(merged) == expected_keys
    assert _equal({k: live[k] for k in merged}, merged) == []
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert {t.dtype for _, t in materialize(pool, recipe, dtype=torch.bfloat16)} == {torch.bfloat16}


def test_saved_model_reloads_with_the_same_logits(pool: ModelPool, tmp_path: Path) -> None:
    a, _, _ = _names(pool)
    wm = WorkingModel(pool, a, device="cpu")
    recipe = _rich(pool)
    wm.apply(recipe)
    out = tmp_path / "merged"
    save_state_dict(dict(materialize(pool, recipe)), out, max_shard_bytes=60_000)  # force several shards
    copied = copy_side_files(pool[a].path, out)
    assert "config.json" in copied and "tokenizer.json" in copied
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 6, 7, 8, 9, 10, 11, 40, 41], [2, 50, 51, 52, 53, 54, 55, 56, 57]])
    with torch.no_grad():
        want = wm.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert torch.equal(got, want)
    base_model = AutoModelForCausalLM.from_pretrained(pool[a].path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(base_model(input_ids=ids).logits, want)  # the merge changed something


def test_param_sources_precedence(pool: ModelPool) -> None:
    """base < boundary < layer donor < unit donor; ES steps attach to ``unit.weight`` only."""
    a, b, c = _names(pool)
    names = [n for n, _ in WorkingModel(pool, a, device="cpu").model.named_parameters()]
    step = EsStep(unit="model.layers.0.self_attn.q_proj", kind="norm", sigma=0.01, seed=2)
    recipe = Recipe(
        base=a, boundary=b, layers={0: b}, units={"model.layers.0.self_attn.q_proj": c}, es=(step,)
    )
    src = param_sources(recipe, pool.adapter, names)
    assert src["model.layers.0.self_attn.q_proj.weight"] == (c, (step,))
    assert src["model.layers.0.self_attn.k_proj.weight"] == (b, ())
    assert src["model.layers.1.self_attn.k_proj.weight"] == (a, ())
    assert src["model.norm.weight"] == (b, ())
    if pool.adapter.model_type == "qwen2":
        assert src["model.layers.0.self_attn.q_proj.bias"] == (c, ())
