"""Merge methods of the registry: hand computations, the
conformance kit, the CLI, bad input, a toy plug-in."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from olmopt.cli import main
from olmopt.config import load_study_file
from olmopt.errors import InputError
from olmopt.methods.delta import make_params, merge_tensor, registered
from olmopt.methods.delta._kernels import TopK
from olmopt.methods.delta.seeded_uniform import stream_key, uniform01
from olmopt.methods.delta.stream import merge_directories
from olmopt.methods.registry import unregister
from olmopt.testing.methods import check_method

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def merge(method: str, base: torch.Tensor, variants: list[torch.Tensor], **params: object) -> list[float]:
    return merge_tensor(method, base, variants, params, seed=0, name="w").tolist()


# ---------------------------------------------------------------- the conformance kit, every method


@pytest.mark.parametrize("method", sorted(registered()))
def test_every_registered_method_passes_the_conformance_kit(method: str) -> None:
    check_method(method)


def test_importing_the_registry_and_the_cli_loads_no_torch() -> None:
    code = (
        "import sys, olmopt.methods.delta, olmopt.config, olmopt.cli; olmopt.cli.build_parser(); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- hand computations


def test_linear_weighted_average() -> None:
    base, v1, v2 = t(1, 2), t(3, 6), t(5, -2)
    # (1*[1,2] + 1*[3,6] + 2*[5,-2]) / 4
    assert merge("linear", base, [v1, v2], weights=[1.0, 2.0]) == pytest.approx([3.5, 1.0])
    assert merge("linear", base, [v1, v2], weights=[1.0, 2.0], normalize=False) == pytest.approx([14.0, 4.0])
    assert merge("linear", base, [v1], base_weight=3.0) == pytest.approx([1.5, 3.0])  # (3*base + v1)/4
    # weights summing to zero: no average exists; unnormalised it is base - v1
    with pytest.raises(InputError, match="sum to zero"):
        merge("linear", base, [v1, v2], weights=[-1.0, 0.0])
    assert merge("linear", base, [v1, v2], weights=[-1.0, 0.0], normalize=False) == pytest.approx(
        [-2.0, -4.0]
    )


def test_linear_bf16_rounds_once_from_float32() -> None:
    base, v1 = t(1.0, 2.0, 3.0).bfloat16(), t(1.5, 2.5, 3.5).bfloat16()
    merged = merge_tensor("linear", base, [v1], {"weights": 3.0})
    assert merged.dtype == torch.bfloat16
    assert merged.tolist() == t(1.375, 2.375, 3.375).bfloat16().tolist()


def test_slerp_by_hand() -> None:
    h = math.sqrt(0.5)
    assert merge("slerp", t(1, 0), [t(0, 1)], t=0.5) == pytest.approx([h, h])
    # unnormalised vectors: coefficients sin((1-t)θ)/sinθ and sin(tθ)/sinθ apply to the originals
    assert merge("slerp", t(2, 0), [t(0, 1)], t=0.5) == pytest.approx([2 * h, h])
    assert merge("slerp", t(1, 0), [t(0, 1)], t=1.0 / 3.0) == pytest.approx([math.cos(math.pi / 6), 0.5])
    assert merge("slerp", t(1, 0), [t(0, 1)], t=0.0) == pytest.approx([1.0, 0.0])
    assert merge("slerp", t(1, 0), [t(0, 1)], t=1.0) == pytest.approx([0.0, 1.0], abs=1e-7)
    # colinear (|cos| > 0.9995): linear interpolation
    assert merge("slerp", t(1, 2), [t(2, 4)], t=0.25) == pytest.approx([1.25, 2.5])
    with pytest.raises(InputError, match="slerp: takes exactly 1 variant"):
        merge("slerp", t(1, 0), [t(0, 1), t(1, 1)])


def _tangent_space_multislerp(deltas: torch.Tensor, weights: list[float], eps: float = 1e-8) -> torch.Tensor:
    """The tangent-space construction, step by step in float64 (the definition mergekit implements)."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    norms = deltas.norm(dim=1, keepdim=True)
    units = deltas / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units @ mean)[:, None] * mean
    step = (tangents * w[:, None]).sum(0)
    length = step.norm() + eps
    point = mean * torch.cos(length) + step * (torch.sin(length) / length)
    return point * (norms.squeeze(1) * w).sum()


def test_multislerp_matches_the_tangent_space_construction() -> None:
    h = math.sqrt(0.5)
    # unit deltas e1, e2 with equal weights: the arc midpoint, norm 1
    assert merge("multislerp", t(0, 0), [t(1, 0), t(0, 1)]) == pytest.approx([h, h])
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    deltas = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    weights = [0.2, 0.5, 0.3]
    expected = base[0] + _tangent_space_multislerp(deltas, weights)
    variants = [(base[0] + d).float() for d in deltas]
    merged = merge_tensor("multislerp", base[0].float(), variants, {"weights": weights})
    assert torch.allclose(merged.double(), expected, atol=1e-5)
    # one variant is returned as is; opposite deltas with equal weights fall back to the weighted sum
    assert merge("multislerp", t(1, 1), [t(3, 5)]) == [3.0, 5.0]
    assert merge("multislerp", t(1, 1), [t(2, 1), t(0, 1)]) == pytest.approx([1.0, 1.0])
    with pytest.raises(InputError, match="sum to zero"):
        merge("multislerp", t(0, 0), [t(1, 0), t(0, 1)], weights=[1.0, -1.0])


def test_task_arithmetic_weights_summing_to_zero_are_not_divided() -> None:
    base, v1, v2 = t(1), t(2), t(3)
    # sum w = 0: mergekit's guard skips the division -> 1 + (1*1 - 1*2)
    assert merge("task_arithmetic", base, [v1, v2], weights=[1.0, -1.0], normalize=True) == [0.0]
    assert merge("task_arithmetic", base, [v1, v2], weights=[1.0, 3.0], normalize=True) == pytest.approx(
        [2.75]
    )


def test_ties_trim_sign_election_and_disjoint_mean() -> None:
    base = torch.zeros(5)
    v1, v2 = t(3, -1, 0.5, -2, 2), t(-1, 2, 0.25, -0.5, 4)
    # density 0.6 -> k = 3: v1 keeps [3, 0, 0, -2, 2], v2 keeps [-1, 2, 0, 0, 4]; weights 1, 0.5
    # weighted sum [2.5, 1, 0, -2, 4] -> signs + + (0 counts as +) - +; zero deltas never agree
    # kept: [3 | 1 | - | -2 | 2 + 2]; divisor [1 | 0.5 | none -> 1 | 1 | 1.5]
    expected = [3.0, 2.0, 0.0, -2.0, 4.0 / 1.5]
    assert merge("ties", base, [v1, v2], density=0.6, weights=[1.0, 0.5]) == pytest.approx(expected)
    # normalize off: the sum of the agreeing weighted deltas
    got = merge("ties", base, [v1, v2], density=0.6, weights=[1.0, 0.5], normalize=False)
    assert got == pytest.approx([3.0, 1.0, 0.0, -2.0, 4.0])
    # lambda scales the merged delta
    got = merge("ties", base, [v1, v2], density=0.6, weights=[1.0, 0.5], **{"lambda": 0.5})
    assert got == pytest.approx([x / 2 for x in expected])


def test_ties_sign_election_tie_counts_as_plus() -> None:
    # weighted sum exactly 0: the majority sign is +, so only the positive delta survives
    assert merge("ties", t(0.0), [t(1.0), t(-1.0)]) == [1.0]
    assert merge("ties", t(0.0), [t(-1.0), t(1.0)]) == [1.0]


def test_ties_magnitude_ties_keep_lower_indices_and_edge_cases() -> None:
    base = torch.zeros(4)
    assert merge("ties", base, [t(1, 1, 1, 1)], density=0.5) == [1.0, 1.0, 0.0, 0.0]
    assert merge("ties", base, [t(1, -1, 1, -1)], density=0.75) == [1.0, -1.0, 1.0, 0.0]
    # a single variant: the trimmed delta itself (weight cancels in the disjoint mean)
    assert merge("ties", base, [t(0.1, -4, 2, 0.3)], density=0.5, weights=2.0) == [0.0, -4.0, 2.0, 0.0]
    # zero deltas: the base, exactly
    assert merge("ties", t(1, 2, 3, 4), [t(1, 2, 3, 4), t(1, 2, 3, 4)], density=0.5) == [1.0, 2.0, 3.0, 4.0]
    # int(density * numel) == 0: nothing kept (mergekit asserts instead)
    assert merge("ties", base, [t(1, 2, 3, 4)], density=0.2) == [0.0, 0.0, 0.0, 0.0]


def test_topk_ties_across_chunks() -> None:
    magnitudes = torch.ones(10_000)
    for chunk in (7, 1_000, 4_096, 20_000):
        selector = TopK(lambda c=chunk: iter(magnitudes.split(c)), 3_700, magnitudes.numel())
        mask = torch.cat([selector.mask(piece) for piece in magnitudes.split(chunk)])
        assert mask[:3_700].all() and not mask[3_700:].any()


def _dare_kept(
    delta: torch.Tensor, density: float, index: int, seed: int = 0, name: str = "w"
) -> torch.Tensor:
    keep = uniform01(stream_key(seed, name, index), 0, delta.numel()) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def test_dare_linear_and_ties_against_the_keyed_draws() -> None:
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(500, generator=generator)
    deltas = [torch.randn(500, generator=generator) for _ in range(2)]
    variants = [base + d for d in deltas]
    kept = [_dare_kept(variants[i] - base, 0.3, i) for i in range(2)]
    got = merge_tensor("dare_linear", base, variants, {"density": 0.3, "weights": [1.0, 2.0]}, 0, "w")
    assert torch.allclose(got, base + kept[0] + 2.0 * kept[1], atol=1e-5)
    weighted = [kept[0], 2.0 * kept[1]]
    majority = torch.where(weighted[0] + weighted[1] >= 0, 1.0, -1.0)
    agree = [torch.sign(w) == majority for w in weighted]
    expected = base + sum(
        torch.where(a, w, torch.zeros_like(w)) for a, w in zip(agree, weighted, strict=True)
    )
    got = merge_tensor("dare_ties", base, variants, {"density": 0.3, "weights": [1.0, 2.0]}, 0, "w")
    assert torch.allclose(got, expected, atol=1e-5)
    # about density of the elements survive; without rescale survivors keep their value
    single = merge_tensor("dare_linear", base, variants[:1], {"density": 0.3, "rescale": False}, 0, "w")
    changed = single != base
    assert 0.22 < float(changed.float().mean()) < 0.38
    assert torch.allclose(single[changed], variants[0][changed])


def test_breadcrumbs_drop_the_largest_and_the_smallest() -> None:
    base = torch.zeros(10)
    delta = t(0.1, -0.5, 0.9, -0.3, 0.7, 0.2, -0.8, 0.4, 0.6, -1.0)
    # density 0.5, gamma 0.1: keep 5 = drop the largest (-1.0) and the 4 smallest (0.1, 0.2, -0.3, 0.4)
    got = merge("breadcrumbs", base, [delta], density=0.5, gamma=0.1)
    assert got == pytest.approx([0, -0.5, 0.9, 0, 0.7, 0, -0.8, 0, 0.6, 0])
    # gamma 0 keeps the 5 largest (mergekit's empty slice would zero the whole delta)
    got = merge("breadcrumbs", base, [delta], density=0.5, gamma=0.0)
    assert got == pytest.approx([0, 0, 0.9, 0, 0.7, 0, -0.8, 0, 0.6, -1.0])
    # density + gamma > 1: fewer large ones are dropped so that density is reached (9 kept)
    got = merge("breadcrumbs", base, [delta], density=0.9, gamma=0.2)
    assert got == pytest.approx([0.1, -0.5, 0.9, -0.3, 0.7, 0.2, -0.8, 0.4, 0.6, 0])
    # breadcrumbs_ties: then sign election between two variants
    other = -delta
    got = merge("breadcrumbs_ties", base, [delta, other], density=0.5, gamma=0.1, weights=[2.0, 1.0])
    assert got == pytest.approx([0, -1.0, 1.8, 0, 1.4, 0, -1.6, 0, 1.2, 0])


def test_model_stock_by_hand() -> None:
    # deltas [1, 0] and [1, 1]: cos = 1/sqrt 2, t = 2c / (1 + c); result t * average + (1 - t) * base
    c = math.sqrt(0.5)
    ratio = 2 * c / (1 + c)
    got = merge("model_stock", t(1, 1), [t(2, 1), t(2, 2)])
    assert got == pytest.approx([ratio * 2 + (1 - ratio), ratio * 1.5 + (1 - ratio)])
    assert merge("model_stock", t(0, 0), [t(1, 0), t(0, 1)]) == [0.0, 0.0]  # orthogonal: t = 0
    assert merge("model_stock", t(0, 0), [t(1, 0), t(-1, 0)]) == [0.0, 0.0]  # antipodal: 1 + (N-1) cos = 0
    # filter_wise: one ratio per row
    base = torch.zeros(2, 2)
    variants = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])]
    got = merge_tensor("model_stock", base, variants, {"filter_wise": True})
    assert got.tolist() == [pytest.approx([ratio, ratio / 2]), [0.0, 0.0]]
    with pytest.raises(InputError, match="at least 2 variants"):
        merge("model_stock", t(0, 0), [t(1, 0)])


def test_bf16_inputs_give_bf16_close_to_float32() -> None:
    base, variants = torch.randn(64, 48), [torch.randn(64, 48) * 0.1 for _ in range(2)]
    variants = [base + v for v in variants]
    for method in ("linear", "ties", "model_stock", "multislerp", "breadcrumbs"):
        full = merge_tensor(method, base, variants, {"density": 0.5} if "density" in _names(method) else None)
        half = merge_tensor(
            method,
            base.bfloat16(),
            [v.bfloat16() for v in variants],
            {"density": 0.5} if "density" in _names(method) else None,
        )
        assert half.dtype == torch.bfloat16
        assert float((half.float() - full).abs().mean()) < 0.02, method


def _names(method: str) -> set[str]:
    return {p.name for p in registered()[method].params}


# ---------------------------------------------------------------- CLI and streaming


def _config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=32,
    )


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods-family")
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config())
    paths = {}
    for name in ("A", "B", "C"):
        model.to(torch.bfloat16).save_pretrained(root / name)
        paths[name] = root / name
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return paths


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp", "model_stock", "linear"])
def test_merge_method_command_matches_merge_tensor(
    family: dict[str, Path], tmp_path: Path, method: str
) -> None:
    variants = ["B"] if method == "slerp" else ["B", "C"]
    out = tmp_path / method
    flags = {
        "ties": ["--density", "0.4", "--weights", "1", "0.5"],
        "dare_ties": ["--density", "0.6", "--seed", "4"],
    }
    argv = [
        "merge",
        method,
        str(family["A"]),
        *[str(family[v]) for v in variants],
        "--out",
        str(out),
        "--quiet",
    ]
    assert main([*argv, *flags.get(method, [])]) == 0
    record = json.loads((out / "merge_config.json").read_text())
    assert record["method"] == method
    merged, base = _weights(out), _weights(family["A"])
    others = [_weights(family[v]) for v in variants]
    params = make_params(method, record["params"])
    for name, tensor in merged.items():
        expected = merge_tensor(method, base[name], [o[name] for o in others], params, record["seed"], name)
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected), name


def test_merge_circuit_takes_any_method_and_yaml_per_variant_parameters(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "base_model": str(family["A"]),
        "variant_models": [
            {"model": str(family["B"]), "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": str(family["C"]), "parameters": {"weight": 0.3, "density": 0.9}},
        ],
        "output_dir": str(tmp_path / "out"),
        "merge_method": "ties",
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", "circuit", "--config", str(path), "--quiet"]) == 0
    record = json.loads((tmp_path / "out" / "merge_config.json").read_text())
    assert record["params"]["weights"] == [0.7, 0.3] and record["params"]["density"] == [0.5, 0.9]


def _fails_cleanly(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str], fragment: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_input_is_one_line_exit_2_nothing_written(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bad"
    a, b, c = (str(family[n]) for n in "ABC")
    _fails_cleanly(
        ["merge", "circuit", a, b, "--out", str(out), "--method", "nope"],
        out,
        capsys,
        "unknown merge method 'nope'",
    )
    _fails_cleanly(
        ["merge", "ties", a, b, c, "--out", str(out), "--weights", "1", "2", "3"],
        out,
        capsys,
        "weights has 3 values for 2 variants",
    )
    _fails_cleanly(
        ["merge", "ties", a, b, "--out", str(out), "--density", "1.5"],
        out,
        capsys,
        "density must be in (0, 1]",
    )
    _fails_cleanly(
        ["merge", "dare_ties", a, b, "--out", str(out), "--density", "0"],
        out,
        capsys,
        "density must be in (0, 1]",
    )
    _fails_cleanly(
        ["merge", "slerp", a, b, c, "--out", str(out)], out, capsys, "slerp: takes exactly 1 variant"
    )
    _fails_cleanly(
        ["merge", "task_arithmetic", a, b, "--out", str(out), "--lambda", "nan"],
        out,
        capsys,
        "lambda must be finite",
    )
    _fails_cleanly(
        ["merge", "circuit", a, b, "--out", str(out), "--method", "linear", "--density", "0.5"],
        out,
        capsys,
        "--density does not apply to method linear",
    )
    _fails_cleanly(
        ["merge", "model_stock", a, b, "--out", str(out)],
        out,
        capsys,
        "model_stock: takes at least 2 variants",
    )
    with pytest.raises(InputError, match="weights has 1 values for 2 variants"):
        merge_directories(a, [b, c], out, "linear", make_params("linear", {"weights": [1.0]}), progress=False)
    assert not out.exists()


def test_study_file_names_an_unknown_method(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    data = {
        "name": "bad",
        "pool": {"models": ["a", "b"]},
        "objectives": [{"dataset": "x.json", "metric": "token_accuracy"}],
        "decisions": {"merge": {"mode": "joint", "methods": ["ties", "nope"]}},
    }
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match=r"decisions\.merge\.methods.*unknown merge method 'nope'"):
        load_study_file(path)
    data["decisions"]["merge"]["methods"] = ["ties", "circuit_merge"]
    path.write_text(yaml.safe_dump(data))
    assert load_study_file(path).decisions.merge.methods == ["ties", "circuit"]


# ---------------------------------------------------------------- a plug-in in one file

TOY = '''
"""A toy method: base + alpha * mean delta."""

from olmopt.methods.registry import Param, merge_method


@merge_method("toy_shift", params=(Param("alpha", 0.5, low=0.0, high=1.0, search=(0.0, 1.0)),))
def toy_shift(base, variants, p, *, seed, name, chunk_elems):
    """base + alpha * mean(variant - base)."""
    import torch

    total = torch.zeros_like(base, dtype=torch.float32)
    for variant in variants:
        total += variant.float() - base.float()
    return (base.float() + p["alpha"] * total / len(variants)).to(base.dtype)
'''


@pytest.fixture
def toy_method(tmp_path: Path):
    path = tmp_path / "toy_shift.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("olmopt_toy_shift", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield "toy_shift"
    unregister("toy_shift")


def test_a_toy_method_from_one_file_runs_through_merge_and_the_kit(
    toy_method: str, family: dict[str, Path], tmp_path: Path
) -> None:
    check_method(toy_method)
    out = tmp_path / "toy"
    argv = ["merge", toy_method, str(family["A"]), str(family["B"]), str(family["C"])]
    assert main([*argv, "--out", str(out), "--alpha", "0.25", "--quiet"]) == 0
    merged, base = _weights(out), _weights(family["A"])
    b, c = _weights(family["B"]), _weights(family["C"])
    name = "model.layers.0.mlp.up_proj.weight"
    expected = (
        base[name].float()
        + 0.25 * ((b[name].float() - base[name].float()) + (c[name].float() - base[name].float())) / 2
    )
    assert torch.equal(merged[name], expected.to(torch.bfloat16))


@pytest.mark.slow
def test_a_toy_method_is_searched_by_a_merge_stage(toy_method: str, tiny_zoo: Path, tmp_path: Path) -> None:
    import optuna

    from olmopt.recipe import Recipe
    from olmopt.search.api import campaign_status

    data = {
        "name": "toy",
        "pool": {"models": [str(tiny_zoo / m) for m in ("base", "spec_add", "spec_fact")]},
        "objectives": [
            {
                "name": "add",
                "dataset": str(REPO / "objectives/add.json"),
                "metric": "token_accuracy",
                "samples": 20,
            }
        ],
        "decisions": {
            "base": {"mode": "fixed", "model": str(tiny_zoo / "base")},
            "layers": {"mode": "off"},
            "merge": {"mode": "joint", "n_trials": 3, "methods": [toy_method, "ties"]},
        },
    }
    url = f"sqlite:///{tmp_path}/toy.db"
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", "toy", "--storage", url, "--quiet"]) == 0
    trials = optuna.load_study(study_name="toy/001-joint-merge", storage=url).get_trials()
    labels = {tr.user_attrs["candidate"] for tr in trials}
    assert {"toy_shift@defaults", "ties@defaults"} <= labels
    toy = next(tr for tr in trials if tr.user_attrs["candidate"] == "toy_shift@defaults")
    assert toy.params == {"method": "toy_shift", "toy_shift.alpha": 0.5}
    assert json.loads(toy.user_attrs["recipe"])["param_merge"]["method"] == "toy_shift"
    ties = next(tr for tr in trials if tr.user_attrs["candidate"] == "ties@defaults")
    assert ties.params["ties.weights.1"] == 1.0 and ties.params["ties.density.0"] == 1.0
    ties_recipe = Recipe.from_dict(json.loads(ties.user_attrs["recipe"]))  # per-variant values round-trip
    assert ties_recipe.param_merge is not None and ties_recipe.param_merge.params["weights"] == (1.0, 1.0)
    recipe = Recipe.from_dict(campaign_status("toy", url)["recipe"])
    assert recipe.param_merge is not None and recipe.param_merge.method in {"toy_shift", "ties"}


@pytest.mark.parametrize(
    ("merge", "fragment"),
    [
        (
            {"methods": ["ties", "slerp"]},
            "slerp: takes exactly 1 variant (2 models with the base), got 3 variants",
        ),
        ({"methods": ["model_stock"], "models": ["B"]}, "model_stock: takes at least 2 variants"),
    ],
)
def test_study_create_refuses_a_method_that_cannot_take_the_variants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], merge: dict, fragment: str
) -> None:
    """The variant count is known at ``study create`` (``merge.models``, else the pool but the base): SLERP
    with three variants is one line naming the key, exit 2, and no storage is written."""
    from tests._models import make_family

    paths = make_family(tmp_path / "family", ["A", "B", "C", "D"])
    merge = {**merge, "models": [str(paths[m]) for m in merge.get("models", [])] or None}
    data = {
        "name": "s3",
        "pool": {"models": [str(p) for p in paths.values()]},
        "objectives": [
            {"dataset": str(REPO / "objectives/add.json"), "metric": "token_accuracy", "samples": 10}
        ],
        "decisions": {
            "base": {"mode": "fixed", "model": str(paths["A"])},
            "layers": {"mode": "off"},
            "merge": {"mode": "joint", "n_trials": 2, **merge},
        },
    }
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()  # the family's own output
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/s3.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and f"olmopt: error: {path}: decisions.merge.methods: {fragment}" in err
    ), err
    assert not (tmp_path / "s3.db").exists()
