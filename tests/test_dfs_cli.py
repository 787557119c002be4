"""``olmopt merge dfs``: the seed's YAML recipe in, a standard model directory out; bad input exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from olmopt.cli import main
from olmopt.errors import InputError
from olmopt.methods.dfs.executor import DfsExecutor
from olmopt.methods.dfs.seed_recipe import load_dfs_recipe

torch.set_num_threads(1)


def save_tiny(directory: Path, seed: int, hidden: int = 64) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pool")
    save_tiny(root / "a", 0)
    save_tiny(root / "b", 1)
    save_tiny(root / "wide", 2, hidden=32)
    return root


# the seed's layout: python tags, a trailing comma, no bias_factors
SEED_RECIPE = """\
!!python/object/apply:collections.OrderedDict [[[model_paths,
          [
            !!python/tuple [a, null],
            !!python/tuple [{second}, null]
          ]],
          [layer_mask,
            [[
              [true, true, false, false],
              [false, false, true, false]
            ],
            [
              [false, true, false, false],
              [false, false, false, false]
            ]]],
          [input_layer_model, 0],
          [output_layer_model, 1],
          [num_r, 2],
          [scaling_factors,
            [[
              [1.0, 0.5, 1.0, 1.0],
              [1.0, 1.0, 1.5, 1.0]
            ],
            [
              [1.0, 0.75, 1.0, 1.0],
              [1.0, 1.0, 1.0, 1.0]
            ],
            ]
          ]
        ]]
"""


def write_recipe(pool: Path, text: str, name: str = "recipe.yml") -> Path:
    path = pool / name
    path.write_text(text)
    return path


def test_seed_recipe_is_merged_into_a_standard_model(pool: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    config = write_recipe(pool, SEED_RECIPE.format(second="b"))
    out = tmp_path / "merged"
    assert main(["merge", "dfs", str(config), "--out", str(out), "--json"]) == 0
    summary = capsys.readouterr().out
    # seed order + add_last_layer (output model 1's last layer, scale 1)
    assert '"hops": [[0, 0], [0, 1], [1, 2], [0, 1], [1, 3]]' in summary
    assert '"scales": [1.0, 0.5, 1.5, 0.75, 1.0]' in summary
    models = [AutoModelForCausalLM.from_pretrained(pool / n).eval() for n in ("a", "b")]
    recipe = load_dfs_recipe(config)
    path = recipe.to_path([4, 4], 64)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 5
    ids = torch.randint(1, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, DfsExecutor(models, path)(ids), rtol=1e-4, atol=1e-5
        )
    assert main(["merge", "dfs", str(config), "--out", str(out), "--quiet"]) == 2  # exists, no --force
    assert main(["merge", "dfs", str(config), "--out", str(out), "--quiet", "--force"]) == 0
    assert capsys.readouterr().out == ""


BAD_MASK = SEED_RECIPE.format(second="b").replace("[false, false, true, false]", "[false, false, true]")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (BAD_MASK, "layer_mask"),
        (
            "model_paths: [a, b]\nlayer_mask: [[[false, false, false, false], [false, false, false, "
            "false]]]\nadd_last_layer: false\n",
            "selects no layer",
        ),
        (SEED_RECIPE.format(second="b").replace("[1.0, 1.0, 1.5, 1.0]", "[0.5, 1.0, 1.5, 1.0]"), "inactive"),
        (SEED_RECIPE.format(second="wide"), "hidden size"),
        (SEED_RECIPE.format(second="missing_dir"), "missing_dir"),
        ("!!python/object/apply:os.system [echo pwned]\n", "not a valid recipe YAML"),
        ("model_paths: [a]\nlayer_mask: [[[true]]]\nscale: 1\n", "unknown key"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(
    pool: Path, tmp_path: Path, capsys, text: str, needle: str
) -> None:  # type: ignore[no-untyped-def]
    config = write_recipe(tmp_path, text)
    for name in ("a", "b", "wide"):
        (tmp_path / name).symlink_to(pool / name)
    out = tmp_path / "out" / "merged"
    assert main(["merge", "dfs", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("olmopt: error:")
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_safe_loader_refuses_other_python_tags(tmp_path: Path) -> None:
    config = write_recipe(tmp_path, "!!python/name:os.system\n")
    with pytest.raises(InputError, match="not a valid recipe YAML"):
        load_dfs_recipe(config)


def test_seed_affine_layout_decodes_matrices_and_bias_vectors() -> None:
    import numpy as np

    from olmopt.methods.dfs.seed_recipe import DfsRecipe

    hidden = 4
    mask = np.zeros((1, 2, 3), dtype=bool)
    mask[0, 0, :2] = mask[0, 1, 1] = True
    matrices = np.broadcast_to(np.eye(hidden), (1, 2, 3, hidden, hidden)).copy()
    matrices[0, 1, 1] = 2 * np.eye(hidden)
    biases = np.zeros((1, 2, 3, hidden))
    biases[0, 0, 1] = [0.1, 0.2, 0.3, 0.4]
    recipe = DfsRecipe(
        models=(("a", None), ("b", None)),
        mask=mask,
        scaling_factors=matrices,
        bias_factors=biases,
        input_model=0,
        output_model=1,
        add_last_layer=True,
        last_layer_scale=1.0,
        classification=False,
        scale_target="branch",
    )
    path = recipe.to_path([3, 3], hidden)
    assert path.hops == ((0, 0), (0, 1), (1, 1), (1, 2))
    assert path.scales == (1.0, 1.0, 1.0, 1.0)
    torch.testing.assert_close(path.affine_at(2).weight, 2 * torch.eye(hidden))
    torch.testing.assert_close(path.affine_at(1).bias, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert path.affine_at(3) is None  # appended last hop: no bias (the seed put last_layer_scale there)
    scalar_bias = DfsRecipe(
        **{**recipe.__dict__, "scaling_factors": None, "bias_factors": np.where(mask, 0.5, 0.0)}
    )
    torch.testing.assert_close(
        scalar_bias.to_path([3, 3], hidden).affine_at(0).bias, torch.full((hidden,), 0.5)
    )
    wrong = DfsRecipe(**{**recipe.__dict__, "scaling_factors": np.ones((1, 2, 3, 2, 2))})
    with pytest.raises(InputError, match="scaling_factors has shape"):
        wrong.to_path([3, 3], hidden)
