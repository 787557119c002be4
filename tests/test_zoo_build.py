"""Zoo builds: determinism, caching, atomic output, architectures, layer-subset ground truth, acceptance."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import olmopt.zoo.build as zoo_build
import olmopt.zoo.family as zoo_family
from olmopt.cli import main
from olmopt.zoo import AcceptanceError, build_zoo, load_manifest
from olmopt.zoo.build import build_family
from olmopt.zoo.family import family_spec

SCALE = 0.02  # tiny: 20 base steps, 4 specialist steps


def quick_build(out: Path, arch: str = "llama", seed: int = 3, **kw: Any) -> dict[str, Any]:
    return build_family(out, family_spec("tiny", arch).scaled(SCALE), seed, progress=False, check=False, **kw)


@pytest.fixture(scope="module")
def quick_zoos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoos")
    out = {}
    for arch in ("llama", "qwen2", "mistral"):
        quick_build(root / arch, arch)
        out[arch] = root / arch
    return out


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@pytest.mark.slow  # with the module fixture: five quick builds, ~30 s on a busy machine
def test_same_seed_same_bits_and_second_build_is_cached(quick_zoos: dict[str, Path], tmp_path: Path) -> None:
    first = load_manifest(quick_zoos["llama"])
    (tmp_path / ".again.partial-999999").mkdir()  # debris of a killed build: removed by the next one
    again = quick_build(tmp_path / "again")
    assert [m["sha256"] for m in again["models"]] == [m["sha256"] for m in first["models"]]
    assert len({m["sha256"] for m in first["models"]}) == 5
    other = quick_build(tmp_path / "other", seed=4)
    assert other["models"][0]["sha256"] != first["models"][0]["sha256"]
    stamp = (tmp_path / "again" / "zoo.json").stat().st_mtime_ns
    cached = quick_build(tmp_path / "again")
    assert cached == again and (tmp_path / "again" / "zoo.json").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".*old*"))


@pytest.mark.slow  # one quick build in a spawned process (~15 s)
def test_build_moves_to_a_child_process_when_this_one_uses_other_kernels(
    quick_zoos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from olmopt.kernels import cpu_has_avx2

    monkeypatch.setattr(
        zoo_build, "portable_kernels_active", lambda: False
    )  # as if torch ran AVX-512 kernels
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    child = quick_build(tmp_path / "child")
    first = load_manifest(quick_zoos["llama"])
    assert [m["sha256"] for m in child["models"]] == [m["sha256"] for m in first["models"]]
    if cpu_has_avx2():
        assert child["cpu_kernels"] == first["cpu_kernels"] == "AVX2"
    assert "OLMOPT_ZOO_BUILD_CHILD" not in os.environ  # the parent's environment is restored


def test_manifest_records_family(quick_zoos: dict[str, Path]) -> None:
    m = load_manifest(quick_zoos["llama"])
    names = [x["name"] for x in m["models"]]
    assert names == ["base", "spec_add", "spec_rev", "spec_fact", "spec_mc"]
    by_name = {x["name"]: x for x in m["models"]}
    assert by_name["spec_fact"]["trained_layers"] == [0, 1] and by_name["spec_mc"]["trained_layers"] == [2, 3]
    assert by_name["spec_add"]["trained_layers"] == "all" and by_name["base"]["steps"] == 20
    assert set(m["scores"]) == set(names) and set(m["scores"]["base"]) == {"add", "rev", "fact", "mc"}
    assert set(m["scores"]["base"]["add"]) == {"search", "heldout"}
    assert {c["name"] for c in m["acceptance"]["criteria"]} == {
        "own_skill_best",
        "forgetting",
        "base_mediocre",
        "layer_recipe_combines",
    }
    assert m["layer_recipe"]["layers"] == {"0": "spec_fact", "1": "spec_fact", "2": "spec_mc", "3": "spec_mc"}
    assert json.loads((quick_zoos["llama"] / "base" / "config.json").read_text())["dtype"] == "float32"


def test_layer_specialists_change_only_their_layers(quick_zoos: dict[str, Path]) -> None:
    zoo = quick_zoos["llama"]
    base = tensors(zoo / "base")
    for name, trained in (("spec_fact", ("0", "1")), ("spec_mc", ("2", "3")), ("spec_add", None)):
        spec = tensors(zoo / name)
        changed = {k for k in base if not torch.equal(base[k], spec[k])}
        if trained is None:
            assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed
            continue
        assert changed and all(k.split(".")[2] in trained for k in changed), sorted(changed)[:3]
        layer_weights = {k for k in base if k.startswith("model.layers.") and k.split(".")[2] in trained}
        assert {k for k in layer_weights if "norm" not in k} <= changed


@pytest.mark.parametrize("lower", [None, (3, 2)], ids=["own-layers", "straddling-layout"])
def test_small_family_stacks_the_lower_specialist_on_the_upper_one(
    tmp_path: Path, lower: tuple[int, ...] | None
) -> None:
    spec = family_spec("small", "llama", lower=lower).scaled(0.01)  # 10 base steps, 2 per specialist
    m = build_family(tmp_path / "s", spec, 0, progress=False, check=False)
    by_name = {x["name"]: x for x in m["models"]}
    low = [0, 1] if lower is None else [2, 3]
    assert by_name["spec_fact"]["trained_layers"] == low
    assert by_name["spec_add"]["trained_layers"] == [4, 5]
    assert by_name["spec_fact"]["trained_on_top_of"] == "spec_add" and by_name["spec_rev"]["replay"] > 0
    recipe = {str(low[0]): "spec_fact", str(low[1]): "spec_fact", "4": "spec_add", "5": "spec_add"}
    assert m["layer_recipe"]["layers"] == recipe
    base = tensors(tmp_path / "s" / "base")
    for name, trained in (("spec_fact", {str(i) for i in low}), ("spec_add", {"4", "5"})):
        spec_tensors = tensors(tmp_path / "s" / name)  # released as the base plus its own trained layers
        changed = {k.split(".")[2] for k in base if not torch.equal(base[k], spec_tensors[k])}
        assert changed == trained, (name, changed)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_each_arch_loads_with_expected_structure(quick_zoos: dict[str, Path], arch: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(quick_zoos[arch] / "spec_add")
    cfg = model.config
    assert (
        type(model).__name__
        == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[arch]
    )
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        64,
        4,
        4,
        172,
    )
    attn = model.model.layers[0].self_attn
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == (arch == "qwen2")
    assert (attn.q_proj.bias is not None) == (arch == "qwen2") and (attn.k_proj.bias is not None) == (
        arch == "qwen2"
    )
    kv_heads = 2 if arch == "mistral" else 4
    assert cfg.num_key_value_heads == kv_heads and attn.k_proj.out_features == kv_heads * 16
    assert (quick_zoos[arch] / "spec_add" / "generation_config.json").is_file()
    ids = torch.tensor([[2, 4, 17, 18, 5]])
    assert model(input_ids=ids).logits.shape == (1, 5, 103)


def test_failed_acceptance_is_written_and_raised(tmp_path: Path) -> None:
    spec = family_spec("tiny", "llama").scaled(SCALE)
    with pytest.raises(AcceptanceError, match="fails acceptance: own_skill_best"):
        build_family(tmp_path / "z", spec, 3, progress=False, check=True)
    manifest = load_manifest(tmp_path / "z")
    assert manifest["acceptance"]["passed"] is False


def test_cli_failed_acceptance_exits_1_one_line_and_refuses_foreign_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = zoo_build.family_spec
    monkeypatch.setattr(
        zoo_build, "family_spec", lambda size, arch, *layout: real(size, arch, *layout).scaled(SCALE)
    )
    out = tmp_path / "z"
    assert main(["zoo", "build", "--out", str(out), "--seed", "3", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "own_skill_best" in err
    assert main(["zoo", "build", "--out", str(out), "--seed", "3", "--quiet", "--no-check"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main(["zoo", "build", "--out", str(foreign), "--quiet"]) == 2
    assert "pass --force" in capsys.readouterr().err and sorted(p.name for p in foreign.iterdir()) == [
        "keep.txt"
    ]
    # --refresh replaces a zoo built with other arguments, never a directory that is not a zoo
    assert main(["zoo", "build", "--out", str(out), "--seed", "4", "--quiet", "--no-check"]) == 2
    assert "pass --force" in capsys.readouterr().err and load_manifest(out)["seed"] == 3
    assert main(["zoo", "build", "--out", str(out), "--seed", "4", "--quiet", "--no-check", "--refresh"]) == 0
    assert load_manifest(out)["seed"] == 4
    assert main(["zoo", "build", "--out", str(foreign), "--quiet", "--refresh"]) == 2
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    # a layout variant of the same seed is a zoo built with other arguments; the flags reach the build
    layout = ["--seed", "4", "--lower-layers", "1", "--upper-layers", "3", "--quiet", "--no-check"]
    assert main(["zoo", "build", "--out", str(out), *layout]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["zoo", "build", "--out", str(out), *layout, "--refresh"]) == 0
    trained = {m["name"]: m["trained_layers"] for m in load_manifest(out)["models"]}
    assert (trained["spec_fact"], trained["spec_mc"]) == ([1], [3])
    assert main(["zoo", "build", "--out", str(out), *layout]) == 0
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_zoo_skills_are_separated(tiny_zoo: Path, tiny_manifest: dict[str, Any]) -> None:
    m = tiny_manifest
    assert m["acceptance"]["passed"] and m["size"] == "tiny" and m["arch"] == "llama"
    search = {name: {k: v["search"] for k, v in sc.items()} for name, sc in m["scores"].items()}
    for model in m["models"][1:]:
        own = model["skill"]
        assert all(
            search[model["name"]][own] > search[other][own] for other in search if other != model["name"]
        )
        assert any(search[model["name"]][k] < search["base"][k] for k in search["base"] if k != own)
    recipe = m["layer_recipe"]["scores"]
    for skill in (m["layer_recipe"]["lower_skill"], m["layer_recipe"]["upper_skill"]):
        assert recipe[skill]["search"] > search["base"][skill]
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo / "base")
    assert sum(p.numel() for p in model.parameters()) == 211_392
    assert build_zoo(tiny_zoo, progress=False) == m  # cached: a no-op


def test_interrupted_build_leaves_no_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save, calls = zoo_build._save, []

    def failing_save(*args: Any) -> str:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args)

    monkeypatch.setattr(zoo_build, "_save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        quick_build(tmp_path / "z")
    assert list(tmp_path.iterdir()) == []  # no zoo, no staging directory, no lock file


@pytest.mark.slow  # three quick builds (~20 s)
def test_pinned_seeds_are_tried_in_order_and_a_held_candidate_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The family is the first pinned seed that passes; a directory holding a failed candidate goes on with
    the next one, one holding the passing candidate is reused, and when every seed fails all are named."""
    real_spec, real_build = zoo_build.family_spec, zoo_build.build_family
    monkeypatch.setattr(
        zoo_build, "family_spec", lambda size, arch, *layout: real_spec(size, arch, *layout).scaled(SCALE)
    )
    monkeypatch.setitem(zoo_family.PINNED_SEEDS, ("tiny", "llama"), (3, 4))
    building: list[int] = []

    def build(out: Path, spec: Any, seed: int, **kw: Any) -> dict[str, Any]:
        building.append(seed)
        return real_build(out, spec, seed, **kw)

    def verdict(*_args: Any) -> list[dict[str, Any]]:  # seed 3 "fails", seed 4 "passes"
        passed = building[-1] == 4
        return [
            {"name": "own_skill_best", "description": "", "passed": passed, "detail": f"seed {building[-1]}"}
        ]

    monkeypatch.setattr(zoo_build, "build_family", build)
    monkeypatch.setattr(zoo_build.acceptance, "check", verdict)
    out = tmp_path / "z"
    manifest = build_zoo(out, progress=False)
    assert building == [3, 4] and manifest["seed"] == 4 and load_manifest(out)["seed"] == 4
    assert zoo_build.cached_manifest(out, "tiny", "llama") == manifest
    assert build_zoo(out, progress=False) == manifest and building == [3, 4]  # reused: nothing built
    # a directory left holding the failed first candidate resumes with the second, without --force
    build(out, zoo_build.family_spec("tiny", "llama"), 3, progress=False, check=False, force=True)
    building.clear()
    assert build_zoo(out, progress=False)["seed"] == 4 and building == [4]
    # every candidate fails: one error naming each seed's failed criterion; the last family is kept
    monkeypatch.setitem(zoo_family.PINNED_SEEDS, ("tiny", "llama"), (3, 5))
    building.clear()
    with pytest.raises(
        AcceptanceError, match=r"every pinned seed.*seed 3: own_skill_best.*seed 5: own_skill_best"
    ):
        build_zoo(tmp_path / "none", progress=False)
    assert building == [3, 5] and load_manifest(tmp_path / "none")["seed"] == 5
