"""Bad input and damaged models (issue 20): every case is refused in one line with exit 2 and nothing
written, or, for a damaged model met during a search, made infeasible with its reason.

Damaged checkpoints are built here from copies of the tiny zoo (never shipped as binaries).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from olmopt.cli import main
from tests.test_study import ZOO_MODELS, _one_line_error, study_file

REPO = Path(__file__).resolve().parents[1]
DAMAGED_TENSOR = "model.layers.3.mlp.down_proj.weight"


# -- fixtures and helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(request: pytest.FixtureRequest) -> Path:
    """The tiny zoo's trained models. These tests only copy and damage them, so a built zoo is used as
    it is (its acceptance verdict does not matter here); otherwise the suite's fixture builds it."""
    from tests.conftest import TINY_ZOO_DIR

    if (TINY_ZOO_DIR / "zoo.json").is_file():
        return TINY_ZOO_DIR
    return request.getfixturevalue("tiny_zoo")


def copy_zoo(zoo: Path, dest: Path, models: list[str] = ZOO_MODELS) -> Path:
    """A private copy of the tiny zoo's model directories (the shared zoo is never written)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in models:
        shutil.copytree(zoo / name, dest / name)
    return dest


def write_nonfinite(model_dir: Path, tensor: str = DAMAGED_TENSOR, value: float = math.nan) -> None:
    """Overwrite a few elements of one tensor of a single-file checkpoint with NaN (or inf)."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    damaged = tensors[tensor].clone()
    damaged.view(-1)[:3] = value
    tensors[tensor] = damaged
    save_file(tensors, path, metadata={"format": "pt"})


# -- 1. non-finite models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_evaluator_scores_nonfinite_logits_as_nan(zoo: Path, tmp_path: Path, value: float) -> None:
    """Token accuracy, letter-logit multiple choice and greedy decoding of a model whose logits are not
    finite are NaN and named in ``nonfinite`` (before: 0, the first choice's share, 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olmopt.evaluate.engine import Evaluator, Objective

    model_dir = copy_zoo(zoo, tmp_path, ["base"]) / "base"
    objectives = [
        Objective("add", REPO / "objectives/add.json", "token_accuracy", samples=8),
        Objective("mc", REPO / "objectives/mc_choices.json", "mc_accuracy", samples=8),
        Objective("rev", REPO / "objectives/rev.json", "exact_match", samples=8),
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    healthy = Evaluator(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, objectives).evaluate()
    assert all(math.isfinite(v) for v in healthy.values())
    write_nonfinite(model_dir, "model.norm.weight", value)
    evaluator = Evaluator(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, objectives)
    got = evaluator.evaluate()
    assert all(math.isnan(v) for v in got.values()), got
    assert sorted(evaluator.nonfinite) == ["add", "mc", "rev"]


def test_nonfinite_candidate_is_infeasible_and_says_why(zoo: Path, tmp_path: Path, capsys) -> None:
    """A donor damaged after `study create` cannot win its stage, and `export best` refuses its trial."""
    import optuna

    models = copy_zoo(zoo, tmp_path / "zoo")
    url = f"sqlite:///{tmp_path}/s.db"
    path = study_file(tmp_path, models, "nan", layers={"mode": "greedy", "only": [3]})
    assert main(["study", "create", str(path), "--storage", url]) == 0
    write_nonfinite(models / "spec_fact")  # its layer 3 now makes every logit NaN
    assert main(["study", "run", "nan", "--storage", url, "--quiet"]) == 0

    study = optuna.load_study(study_name="nan/001-layer-3", storage=url)
    by_label = {
        t.user_attrs["candidate"]: t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    }
    damaged = [t for label, t in by_label.items() if label.endswith("spec_fact")]
    assert len(damaged) == 1, sorted(by_label)
    bad = damaged[0]
    assert bad.user_attrs["feasible"] == 0
    assert "non-finite" in bad.user_attrs["infeasible"] and "add" in bad.user_attrs["infeasible"]
    assert all(v == -math.inf for v in bad.values)  # every objective is maximized: the worst value
    assert all(bad.user_attrs[f"m.{n}"] is None for n in ("add", "rev", "fact", "mc"))
    healthy = [t for label, t in by_label.items() if t is not bad]
    assert healthy and all(t.user_attrs["feasible"] == 1 for t in healthy)
    decision = study.user_attrs["olmopt.decision"]
    assert not decision["winner"].endswith("spec_fact")

    out = tmp_path / "out"
    capsys.readouterr()
    code = main(
        [
            "export",
            "best",
            "nan",
            "--storage",
            url,
            "--stage",
            "001-layer-3",
            "--trial",
            str(bad.number),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 2
    assert "non-finite" in _one_line_error(capsys)
    assert not out.exists()


def test_preflight_refuses_a_nonfinite_checkpoint(zoo: Path, tmp_path: Path, capsys) -> None:
    models = copy_zoo(zoo, tmp_path / "zoo")
    write_nonfinite(models / "spec_rev", value=math.inf)
    path = study_file(tmp_path, models, "damaged", layers={"mode": "greedy"})
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    line = _one_line_error(capsys)
    assert "spec_rev" in line and DAMAGED_TENSOR in line and "NaN or inf" in line
    assert not (tmp_path / "s.db").exists()


def test_write_nonfinite_damages_only_the_named_tensor(tmp_path: Path) -> None:
    """Guard for the helpers above: a damaged copy differs from the zoo only in the damaged tensor."""
    src = tmp_path / "m"
    src.mkdir()
    save_file({"a": torch.ones(4), "b": torch.zeros(2)}, src / "model.safetensors")
    write_nonfinite(src, "a")
    got = load_file(src / "model.safetensors")
    assert torch.isnan(got["a"][:3]).all() and got["a"][3] == 1 and torch.equal(got["b"], torch.zeros(2))


# -- 2. an output that is one of the command's inputs ------------------------------------------------------
def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (what a refused command must leave as it was)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


DFS_RECIPE = """\
model_paths: [{a}, {b}]
layer_mask: [[[true, true, false, false], [false, false, true, true]]]
input_layer_model: 0
output_layer_model: 1
num_r: 1
"""


@pytest.fixture()
def workdir(zoo: Path, tmp_path: Path) -> Path:
    """The zoo's models, an alphas file, a DFS recipe, an OLM
    report and a study file, all under ``tmp_path/in``."""
    root = copy_zoo(zoo, tmp_path / "in")
    (root / "alphas.json").write_text("[0.5]")
    (root / "dfs.yml").write_text(DFS_RECIPE.format(a=root / "base", b=root / "spec_add"))
    (root / "report.json").write_text(json.dumps({"base_model": {"name": str(root / "base")}}))
    (root / "link").symlink_to(root / "base")
    study_file(root, root, "study", layers={"mode": "greedy"})  # root/study.yaml
    return root


# (command line with {in} for the inputs' folder, the output that is or holds an input)
OVERWRITES = [
    ("merge circuit {in}/base {in}/spec_add", "{in}/base"),
    ("merge circuit {in}/base {in}/spec_add", "{in}/spec_add"),
    ("merge circuit {in}/base {in}/spec_add", "{in}"),  # the folder holding both
    ("merge circuit {in}/base {in}/spec_add", "{in}/link"),  # a symbolic link to the base
    ("merge circuit {in}/base {in}/spec_add", "{in}/spec_add/../base"),
    ("merge circuit {in}/link {in}/spec_add", "{in}/base"),
    ("merge fuse {in}/base --alphas {in}/alphas.json", "{in}/base"),
    ("merge fuse {in}/spec_add --alphas {in}/alphas.json", "{in}"),  # holds the alphas file
    ("merge dfs {in}/dfs.yml", "{in}/spec_add"),
    ("merge dfs {in}/dfs.yml", "{in}"),
    ("rebuild {in}/report.json", "{in}/base"),
    ("rebuild {in}/report.json", "{in}"),  # holds the report
]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize(("command", "out"), OVERWRITES)
def test_no_command_writes_over_its_own_input(
    workdir: Path, capsys, command: str, out: str, force: bool
) -> None:
    before = snapshot(workdir)
    args = [*command.format(**{"in": workdir}).split(), "--out", out.format(**{"in": workdir}), "--quiet"]
    capsys.readouterr()
    assert main([*args, *(["--force"] if force else [])]) == 2
    assert "would overwrite the input" in _one_line_error(capsys)
    assert snapshot(workdir) == before
    assert not [p for p in workdir.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_export_best_does_not_write_over_its_storage(zoo: Path, tmp_path: Path, capsys) -> None:
    models = copy_zoo(zoo, tmp_path / "zoo")
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home}/s.db"
    path = study_file(tmp_path, models, "mine", layers={"mode": "greedy", "only": [3]})
    assert main(["study", "create", str(path), "--storage", url]) == 0
    capsys.readouterr()
    assert main(["export", "best", "mine", "--storage", url, "--out", str(home), "--force", "--quiet"]) == 2
    line = _one_line_error(capsys)
    assert "would overwrite the input" in line and line.endswith("s.db (write the result somewhere else)")
    # SQLite may checkpoint its WAL on open: compare what the storage holds, not its bytes
    assert {p.name for p in home.iterdir() if not p.name.endswith(("-wal", "-shm"))} == {"s.db"}
    assert main(["study", "list", "--storage", url, "--json"]) == 0
    assert '"mine"' in capsys.readouterr().out


def test_outputs_beside_the_inputs_are_still_written(workdir: Path) -> None:
    """The check refuses overlap only: a sibling output (and one inside no input) is written."""
    base, variant = workdir / "base", workdir / "spec_add"
    assert (
        main(["merge", "circuit", str(base), str(variant), "--out", str(workdir / "merged"), "--quiet"]) == 0
    )
    assert (workdir / "merged" / "config.json").is_file()
    assert main(["rebuild", str(workdir / "report.json"), "--out", str(workdir / "rebuilt"), "--quiet"]) == 0
    assert (workdir / "rebuilt" / "merge_report.json").is_file()


# -- 3 and 6. incomplete and damaged checkpoints, in every command that reads models -------------------------
SHAPED = "model.layers.1.mlp.up_proj.weight"


def _drop_tensor(model: Path) -> None:
    tensors = load_file(model / "model.safetensors")
    del tensors[SHAPED]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def _wrong_shape(model: Path) -> None:
    tensors = load_file(model / "model.safetensors")
    tensors[SHAPED] = tensors[SHAPED][1:].clone()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def _missing_shard(model: Path) -> None:
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, model / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in halves.items() for n in part}
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (model / "model-00002-of-00002.safetensors").unlink()


def _truncated(model: Path) -> None:
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _header_inconsistent(model: Path) -> None:
    """A header that claims one more row for a tensor than its data offsets hold."""
    path = model / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header[SHAPED]["shape"][0] += 1
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


DAMAGES = {
    "missing-tensor": (_drop_tensor, f"lacks tensor '{SHAPED}'"),
    "wrong-shape": (
        _wrong_shape,
        f"tensor '{SHAPED}' has shape [171, 64] in its checkpoint but [172, 64] by config.json",
    ),
    "missing-shard": (_missing_shard, "names shard model-00002-of-00002.safetensors, which is missing"),
    "truncated": (_truncated, "damaged safetensors file model.safetensors"),
    "header-inconsistent": (_header_inconsistent, "damaged safetensors file model.safetensors"),
}
READERS = {
    "study-create": "study create {in}/study.yaml --storage sqlite:///{out}.db",
    "merge-circuit": "merge circuit {in}/base {in}/spec_add --out {out} --quiet",
    "merge-fuse": "merge fuse {in}/base --alphas {in}/alphas.json --out {out} --quiet",
    "merge-dfs": "merge dfs {in}/dfs.yml --out {out} --quiet",
    "rebuild": "rebuild {in}/report.json --out {out} --quiet",
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_incomplete_or_damaged_checkpoint_is_one_line(
    workdir: Path, tmp_path: Path, capsys, reader: str, damage: str
) -> None:
    """No command reads a checkpoint that lacks a tensor, disagrees with its config or is damaged:
    one line naming the model and the tensor or file, exit 2, nothing written."""
    make, needle = DAMAGES[damage]
    make(workdir / "base")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(READERS[reader].format(**{"in": workdir, "out": out}).split()) == 2
    line = _one_line_error(capsys)
    assert f"model {workdir / 'base'}:" in line and needle in line, line
    assert not out.exists() and not Path(f"{out}.db").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_complete_sharded_checkpoint_is_read(workdir: Path) -> None:
    """A valid sharded checkpoint passes the same checks and reads back its tensors."""
    from olmopt.pool.checkpoint import Checkpoint

    model = workdir / "spec_add"
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    save_file({k: v for k, v in tensors.items() if k < SHAPED}, model / "model-00001-of-00002.safetensors")
    save_file({k: v for k, v in tensors.items() if k >= SHAPED}, model / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 if k < SHAPED else 2}-of-00002.safetensors" for k in tensors}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    checkpoint = Checkpoint(model)
    checkpoint.check_complete()
    assert sorted(checkpoint.keys()) == sorted(tensors)
    assert torch.equal(checkpoint.get(SHAPED), tensors[SHAPED])


# -- 4. the zoo's tokenizer as users load it -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_zoo_tokenizer_round_trips_every_training_prompt_through_autotokenizer(
    tmp_path: Path, arch: str
) -> None:
    """The zoo's tokenizer files next to a config.json of ``arch``, loaded with AutoTokenizer as olmopt and
    users load them (transformers 5 picks Qwen2Tokenizer for qwen2), give the ids the family was trained on
    for every training and objective prompt and answer,
    decode back to the text, and keep the chat contract."""
    from transformers import AutoTokenizer

    from olmopt.evaluate.formatting import encode_example
    from olmopt.zoo.family import PINNED_SEEDS
    from olmopt.zoo.objectives import load_objective
    from olmopt.zoo.skills import SKILLS, training_pool
    from olmopt.zoo.tokenizer import build_tokenizer
    from olmopt.zoo.train import data_rng
    from tests._models import make_config

    trained = build_tokenizer()  # the in-process tokenizer whose ids every family is trained and scored with
    build_tokenizer(arch).save_pretrained(tmp_path)
    make_config(arch, vocab=len(trained)).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts: set[str] = set()
    for seed in sorted({s for (_size, a), seeds in PINNED_SEEDS.items() if a == arch for s in seeds}):
        rng = data_rng(seed)
        for skill in SKILLS:
            texts.update(t for item in training_pool(skill, rng) for t in item)
    for skill in SKILLS:
        texts.update(t for item in load_objective(skill) for t in item)
    texts_list = sorted(texts)
    assert any(" " in t for t in texts_list)  # the case that broke: prompts with spaces
    want = trained(texts_list, add_special_tokens=False)["input_ids"]
    got = loaded(texts_list, add_special_tokens=False)["input_ids"]
    assert got == want
    assert loaded.batch_decode(got) == texts_list
    assert all(
        len(ids) == len(text) for ids, text in zip(got, texts_list, strict=True)
    )  # one id per character
    messages = [{"role": "user", "content": "larger? A) 17 B) 42"}]
    assert encode_example(loaded, messages, "B") == encode_example(trained, messages, "B")
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (2, 3, 0, 103)


# -- 5. one line instead of a traceback ----------------------------------------------------------------------
NOT_UTF8 = b"name: caf\xe9\n"  # Latin-1, as an editor might save it

TEXT_FILES = {  # command line, the text file it reads
    "study-file": ("study create {in}/study.yaml --storage sqlite:///{out}.db", "study.yaml"),
    "circuit-config": ("merge circuit --config {in}/circuit.yaml --out {out} --quiet", "circuit.yaml"),
    "dfs-recipe": ("merge dfs {in}/dfs.yml --out {out} --quiet", "dfs.yml"),
    "report": ("rebuild {in}/report.json --out {out} --quiet", "report.json"),
    "alphas": ("merge fuse {in}/base --alphas {in}/alphas.json --out {out} --quiet", "alphas.json"),
    "tokenizer": ("study create {in}/study.yaml --storage sqlite:///{out}.db", "spec_add/tokenizer.json"),
}


@pytest.mark.parametrize("case", sorted(TEXT_FILES))
def test_text_that_is_not_utf8_is_one_line(workdir: Path, tmp_path: Path, capsys, case: str) -> None:
    command, name = TEXT_FILES[case]
    (workdir / "circuit.yaml").write_text(
        f"base_model: {workdir / 'base'}\nvariant_models: [{workdir / 'spec_add'}]\n"
    )
    path = workdir / name
    path.write_bytes(path.read_bytes()[:20] + NOT_UTF8)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(command.format(**{"in": workdir, "out": out}).split()) == 2
    line = _one_line_error(capsys)
    assert str(path) in line and "not UTF-8 text" in line, line
    assert not out.exists() and not Path(f"{out}.db").exists()


def test_rebuild_given_a_directory_is_one_line(workdir: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["rebuild", str(workdir / "base"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"report {workdir / 'base'}: is a directory, not a file" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/afile/s.db",  # a folder under a regular file
        "journal:{tmp}/afile/log",
        "sqlite:////proc/olmopt-test/s.db",  # cannot be created
        "sqlite:///{tmp}",  # a directory where the database file belongs
    ],
)
def test_storage_that_cannot_be_created_is_one_line(workdir: Path, tmp_path: Path, capsys, url: str) -> None:
    (tmp_path / "afile").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["study", "create", str(workdir / "study.yaml"), "--storage", url.format(tmp=tmp_path)]) == 2
    assert "cannot open storage" in _one_line_error(capsys)
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("name", "value"), [("OLMOPT_THREADS", "two"), ("OLMOPT_THREADS", "0"), ("OLMOPT_THREADS", "-3")]
)
def test_bad_thread_count_is_one_line(
    workdir: Path, tmp_path: Path, capsys, monkeypatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    capsys.readouterr()
    out = tmp_path / "out"
    assert (
        main(
            [
                "merge",
                "fuse",
                str(workdir / "base"),
                "--alphas",
                str(workdir / "alphas.json"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert f"environment variable {name}={value!r}: expected an integer >= 1" in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OLMOPT_HEARTBEAT_INTERVAL", "20s"),
        ("OLMOPT_HEARTBEAT_GRACE", "0"),
        ("OLMOPT_STALE_AFTER", "nan"),
        ("OLMOPT_STALE_AFTER", "-1"),
    ],
)
def test_bad_heartbeat_settings_are_input_errors(monkeypatch, name: str, value: str) -> None:
    from olmopt.errors import InputError
    from olmopt.search.storage import heartbeat_settings, stale_after

    monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=f"environment variable {name}="):
        heartbeat_settings() if "HEARTBEAT" in name else stale_after()
    monkeypatch.setenv(name, "30")
    assert (
        heartbeat_settings()[0 if name.endswith("INTERVAL") else 1] if "HEARTBEAT" in name else stale_after()
    ) == 30


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--n-trials", "-1"], "--n-trials must be >= 1"),
        (["--n-trials", "0"], "--n-trials must be >= 1"),
        (["--timeout", "-5"], "--timeout must be a positive number"),
        (["--timeout", "nan"], "--timeout must be a positive number"),
        (["--workers", "0"], "--workers must be >= 1"),
    ],
)
def test_run_flags_out_of_range_are_refused_before_any_work(
    tmp_path: Path, capsys, flags: list[str], needle: str
) -> None:
    capsys.readouterr()
    assert main(["study", "run", "any", "--storage", f"sqlite:///{tmp_path}/s.db", "--quiet", *flags]) == 2
    assert needle in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []  # not even the storage


@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "task_arithmetic", "--lambda", "nan"],
        ["--method", "della", "--density", "inf"],
        ["--method", "task_arithmetic", "--weights", "1", "inf"],
        ["--temperature", "nan"],
    ],
)
def test_non_finite_merge_parameters_are_refused(
    workdir: Path, tmp_path: Path, capsys, extra: list[str]
) -> None:
    out = tmp_path / "out"
    argv = [
        "merge",
        "circuit",
        str(workdir / "base"),
        str(workdir / "spec_add"),
        str(workdir / "spec_rev"),
        "--out",
        str(out),
    ]
    capsys.readouterr()
    assert main([*argv, *extra, "--quiet"]) == 2
    assert "must be finite" in _one_line_error(capsys)
    assert not out.exists()


def test_non_finite_numbers_in_merge_and_study_files_are_refused(
    workdir: Path, tmp_path: Path, capsys
) -> None:
    config = workdir / "circuit.yaml"
    config.write_text(
        f"base_model: {workdir / 'base'}\nvariant_models: [{workdir / 'spec_add'}]\n"
        "merge_method: task_arithmetic\nparameters: {{lambda: .nan}}\n".replace("{{", "{").replace("}}", "}")
    )
    capsys.readouterr()
    assert main(["merge", "circuit", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "lambda must be finite" in _one_line_error(capsys)
    study = workdir / "study.yaml"
    data = yaml.safe_load(study.read_text())
    data["objectives"][0]["held_out"] = float("nan")
    study.write_text(yaml.safe_dump(data))
    assert main(["study", "create", str(study), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    assert "held_out" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.db").exists()


def test_a_closed_stdout_is_no_traceback(tmp_path: Path) -> None:
    """`olmopt ... | head` whose reader has gone: exit 141 (SIGPIPE's), nothing on stderr."""
    import optuna

    optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db")  # an empty storage: `study list` prints []
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "olmopt.cli", "study", "list", "--storage", f"sqlite:///{tmp_path}/s.db",
             "--json"],
            stdout=write, stderr=subprocess.PIPE, cwd=REPO, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr.decode()) == (141, "")


def test_a_full_disk_is_one_line_naming_the_path(monkeypatch, capsys) -> None:
    from olmopt.commands import merge_circuit

    def full(_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/model-00001-of-00002.safetensors")

    monkeypatch.setattr(merge_circuit, "run", full)
    capsys.readouterr()
    assert main(["merge", "circuit", "a", "b", "--out", "c"]) == 1
    assert (
        "no space left on the device writing /data/out/model-00001-of-00002.safetensors"
        in _one_line_error(capsys)
    )


# -- 13 and 14. cross-field checks at `study create`, names from the command line ----------------------------
def _edit_study(workdir: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    path = workdir / "study.yaml"
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            lambda d: d["decisions"].update(fusion={"mode": "joint", "alpha_low": 0.8, "alpha_high": 0.2}),
            "alpha_low 0.8 is above alpha_high 0.2",
        ),
        (
            lambda d: d["decisions"].update(dfs={"mode": "joint", "scale_low": 2.0, "scale_high": 1.0}),
            "scale_low 2.0 is above scale_high 1.0",
        ),
        (
            lambda d: d["decisions"]["layers"].update(only=[1, 4]),
            "decisions.layers.only: layer 4 is outside the model (layers 0..3)",
        ),
        (
            lambda d: d["decisions"]["layers"].update(only=[-1]),
            "decisions.layers.only: layer -1 is outside the model",
        ),
        (lambda d: d["decisions"]["layers"].update(only=[2, 2]), "decisions.layers.only lists a layer twice"),
        (
            lambda d: d["decisions"].update(merge={"mode": "joint", "models": ["/elsewhere/m"]}),
            "decisions.merge.models: '/elsewhere/m' is not in pool.models",
        ),
        (
            lambda d: d["decisions"].update(dfs={"mode": "joint", "models": ["nope"]}),
            "decisions.dfs.models: 'nope' is not in pool.models",
        ),
        (
            lambda d: d["pool"]["models"].append(d["pool"]["models"][0] + "/"),
            "the model pool lists one model twice",
        ),
    ],
    ids=[
        "alpha-range",
        "scale-range",
        "layer-above",
        "layer-negative",
        "layer-twice",
        "merge-models",
        "dfs-models",
        "two-spellings",
    ],
)
def test_study_create_cross_field_checks(workdir: Path, tmp_path: Path, capsys, edit, needle: str) -> None:
    path = _edit_study(workdir, edit)
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    line = _one_line_error(capsys)
    assert needle in line
    if (
        "pool lists" not in needle
    ):  # a key of the file, checked with or without the pool: the file's name first
        assert line.startswith(f"olmopt: error: {path}: ")
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("text", ["name: a\nname: b\n", "pool:\n  models: [a]\n  models: [b]\n"])
def test_yaml_with_a_duplicated_key_is_refused(tmp_path: Path, capsys, text: str) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text + "objectives: []\n")
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    assert "duplicated key" in _one_line_error(capsys)
    assert not (tmp_path / "s.db").exists()
    config = tmp_path / "circuit.yaml"
    config.write_text("base_model: a\nbase_model: b\nvariant_models: [c]\n")
    assert main(["merge", "circuit", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "duplicated key" in _one_line_error(capsys)


@pytest.mark.parametrize("name", ["has space", "a/b", "-dash", "x" * 65, "café"])
def test_campaign_name_from_the_command_line_is_validated(
    workdir: Path, tmp_path: Path, capsys, name: str
) -> None:
    capsys.readouterr()
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(workdir / "study.yaml"), "--storage", url, f"--name={name}"]) == 2
    assert "must be 1-64 letters" in _one_line_error(capsys)
    assert not (tmp_path / "s.db").exists()


# -- 22. export complete or absent ---------------------------------------------------------------------------
def test_export_adds_its_last_files_before_the_directory_appears(workdir: Path, tmp_path: Path) -> None:
    """`export best` writes the donor map inside the temporary directory (a kill after the move used to
    leave a model directory without it, which the rerun then refused as existing)."""
    from olmopt.export import write_model_dir
    from olmopt.pool.model_pool import ModelPool
    from olmopt.recipe import Recipe

    out = tmp_path / "merged"
    seen: list[bool] = []

    def finish(tmp: Path) -> None:
        seen.append(out.exists())
        (tmp / "donor_map.png").write_bytes(b"png")

    pool = ModelPool([str(workdir / "base"), str(workdir / "spec_add")])
    write_model_dir(
        pool, Recipe(base=str(workdir / "base")), out, {}, "# card\n", progress=False, finish=finish
    )
    assert seen == [False] and (out / "donor_map.png").read_bytes() == b"png"


def test_stale_temporary_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    from olmopt.outdir import atomic_output_dir

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = tmp_path / f".out.tmp-{dead.stdout.strip()}-abc123"
    live = tmp_path / f".out.tmp-{os.getpid()}-def456"  # a process still writing: left alone
    foreign = tmp_path / ".out.tmp-notours"
    for path in (stale, live, foreign):
        path.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not stale.exists() and live.exists() and foreign.exists()
    assert (tmp_path / "out" / "f").read_text() == "x"


@pytest.mark.parametrize("file", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_base_tokenizer_that_cannot_be_loaded_is_one_line(
    workdir: Path, tmp_path: Path, capsys, file: str
) -> None:
    path = workdir / "base" / file
    path.write_bytes(path.read_bytes()[:10] + NOT_UTF8)
    capsys.readouterr()
    assert (
        main(["study", "create", str(workdir / "study.yaml"), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    )
    assert f"model {workdir / 'base'}: cannot load its tokenizer" in _one_line_error(capsys)
    assert not (tmp_path / "s.db").exists()


# -- 4 (issue). inputs that change or vanish after `study create` --------------------------------------------
@pytest.mark.parametrize("change", ["edited", "deleted"])
def test_a_dataset_changed_after_create_is_named_by_run_and_export(
    workdir: Path, tmp_path: Path, capsys, change: str
) -> None:
    import optuna

    data = workdir / "add.json"
    shutil.copy(REPO / "objectives/add.json", data)
    study = _edit_study(
        workdir,
        lambda d: (d["objectives"][0].update(dataset=str(data)), d["decisions"]["layers"].update(only=[3])),
    )
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(study), "--storage", url]) == 0
    if change == "edited":
        data.write_text(data.read_text().replace("=", " = ", 1))
    else:
        data.unlink()
    needle = "changed since `study create`" if change == "edited" else "is gone since `study create`"
    capsys.readouterr()
    assert main(["study", "run", "study", "--storage", url, "--quiet"]) == 2
    line = _one_line_error(capsys)
    assert f"dataset {data} (objective add)" in line and needle in line
    assert optuna.get_all_study_names(url) == ["study"]  # no stage was started
    assert main(["export", "best", "study", "--storage", url, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert needle in _one_line_error(capsys) and not (tmp_path / "out").exists()


def test_a_deleted_local_model_is_not_fetched_from_the_hub(tmp_path: Path) -> None:
    from olmopt.errors import ModelError
    from olmopt.pool.resolve import resolve_model

    (tmp_path / "zoo").mkdir()
    with pytest.raises(
        ModelError, match=r"model zoo/base: no such directory .*zoo/base \(its folder .*zoo exists"
    ):
        resolve_model("zoo/base", base_dir=tmp_path)


# -- 9, 12, 16, 17, 19 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["sqlite:///{tmp}/sub/s.db", "journal:{tmp}/sub/log"])
def test_read_only_commands_do_not_create_a_storage(tmp_path: Path, capsys, scheme: str) -> None:
    url = scheme.format(tmp=tmp_path)
    capsys.readouterr()
    for argv in (
        ["study", "list"], ["study", "status", "x"], ["study", "run", "x", "--quiet"],
        ["export", "best", "x", "--out", str(tmp_path / "o")],
    ):  # fmt: skip
        assert main([*argv, "--storage", url]) == 2
        assert "no storage at" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("device", "needle"),
    [("cuda:99", "CUDA device"), ("tpu", "is not a torch device"), ("mps", "not available")],
)
def test_a_device_this_machine_lacks_is_refused_at_create(
    workdir: Path, tmp_path: Path, capsys, device: str, needle: str
) -> None:
    if device == "mps":
        torch_mps = getattr(torch.backends, "mps", None)
        if torch_mps is not None and torch_mps.is_available():
            pytest.skip("this machine has MPS")
    path = _edit_study(workdir, lambda d: d.update(evaluation={"device": device}))
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    line = _one_line_error(capsys)
    assert "evaluation.device" in line and needle in line
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (
            [{"conversation": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "12+34="}]}],
            "the last turn must be the assistant's answer",
        ),
        (
            [{"conversation": [{"from": "human", "value": "12+34="}, {"from": "gpt", "value": "4" * 500}]}],
            "more than the model's context of",
        ),
    ],
    ids=["no-answer", "beyond-context"],
)
def test_datasets_that_cannot_be_scored_are_refused_at_create(
    workdir: Path, tmp_path: Path, capsys, items: list, needle: str
) -> None:
    data = workdir / "bad.json"
    data.write_text(json.dumps(items * 8))
    path = _edit_study(workdir, lambda d: d["objectives"][0].update(dataset=str(data)))
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    line = _one_line_error(capsys)
    assert f"dataset {data}: item 0" in line and needle in line
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize(
    ("report", "needle"),
    [
        ({"layers": {"9": {"best_model": "{in}/spec_add"}}}, "recipe: layer 9 out of range"),
        (
            {"tensors": {"model.layers.0.nope.weight": {"best_model": "{in}/spec_add"}}},
            "does not exist in this architecture",
        ),
        ({"layers": {"x": {"best_model": "{in}/spec_add"}}}, "key 'x' is not a layer index"),
        ({"layers": {"1": ["{in}/spec_add"]}}, "layers.1: expected a model name"),
        ({"layers": "all"}, "layers must be a mapping"),
    ],
    ids=["layer-beyond", "unknown-unit", "layer-key", "entry-shape", "section-shape"],
)
def test_rebuild_refuses_reports_that_do_not_fit(
    workdir: Path, tmp_path: Path, capsys, report: dict, needle: str
) -> None:
    text = json.dumps({"base_model": {"name": "{in}/base"}, **report}).replace("{in}", str(workdir))
    (workdir / "bad.json").write_text(text)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["rebuild", str(workdir / "bad.json"), "--out", str(out), "--quiet"]) == 2
    assert needle in _one_line_error(capsys)
    assert not out.exists()


def test_rebuild_accepts_olm_reports_in_other_shapes(workdir: Path, tmp_path: Path) -> None:
    """Layer entries as plain names or as a list of {layer,
    best_model}: the same model as the mapping form."""
    from safetensors.torch import load_file as load

    base, donor = str(workdir / "base"), str(workdir / "spec_add")
    shapes = {
        "mapping": {"layers": {"2": {"best_model": donor}}},
        "names": {"layers": {"2": donor}},
        "list": {"layers": [{"layer": 2, "best_model": donor}]},
    }
    built = {}
    for shape, extra in shapes.items():
        (workdir / f"{shape}.json").write_text(json.dumps({"base_model": {"name": base}, **extra}))
        assert (
            main(["rebuild", str(workdir / f"{shape}.json"), "--out", str(tmp_path / shape), "--quiet"]) == 0
        )
        built[shape] = load(next((tmp_path / shape).glob("*.safetensors")))
    key = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(built["mapping"][key], load(workdir / "spec_add" / "model.safetensors")[key])
    assert all(torch.equal(built[s][key], built["mapping"][key]) for s in ("names", "list"))


# -- 10. loosely typed config files of the merge commands ----------------------------------------------------
@pytest.mark.parametrize(
    ("parameters", "needle"),
    [
        ('{lambda: "0.5"}', "lambda must be a number, got '0.5'"),
        ("{lambda: true}", "lambda must be a number, got True"),
        ("{weights: {a: 1}}", "weights must be a number, got {'a': 1}"),
        ("{lambda: [0.5, 1]}", "lambda takes one value, got a list"),
        ("[1, 2]", "parameters must be a mapping"),
        ('"x"', "parameters must be a mapping"),
        ('{normalize: "yes"}', "normalize must be true or false"),
    ],
)
def test_loosely_typed_circuit_config_is_one_line(
    workdir: Path, tmp_path: Path, capsys, parameters: str, needle: str
) -> None:
    config = workdir / "circuit.yaml"
    config.write_text(
        f"base_model: {workdir / 'base'}\nvariant_models: [{workdir / 'spec_add'}]\n"
        f"merge_method: task_arithmetic\nparameters: {parameters}\n"
    )
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["merge", "circuit", "--config", str(config), "--out", str(out), "--quiet"]) == 2
    assert needle in _one_line_error(capsys)
    assert not out.exists()


def test_loosely_typed_variant_parameters_and_dfs_num_r_are_one_line(
    workdir: Path, tmp_path: Path, capsys
) -> None:
    config = workdir / "circuit.yaml"
    config.write_text(
        f"base_model: {workdir / 'base'}\n"
        f"variant_models: [{{model: {workdir / 'spec_add'}, parameters: [0.5]}}]\nmerge_method: della\n"
    )
    capsys.readouterr()
    assert main(["merge", "circuit", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "variant_models[0].parameters must be a mapping" in _one_line_error(capsys)
    recipe = workdir / "dfs.yml"
    recipe.write_text(recipe.read_text().replace("num_r: 1", 'num_r: "1"'))
    assert main(["merge", "dfs", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "num_r must be an integer, got '1'" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


# -- 24. tomorrow's breakage ---------------------------------------------------------------------------------
def test_greedy_decoding_uses_the_current_cache_api(zoo: Path) -> None:
    """KV-cached decoding passes ``cache=`` (``past_key_values`` warns that it goes in transformers 5.40)."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olmopt.evaluate.engine import Evaluator, Objective

    model_dir = zoo / "base"
    evaluator = Evaluator(
        AutoModelForCausalLM.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
        [Objective("rev", REPO / "objectives/rev.json", "exact_match", samples=4)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert math.isfinite(evaluator.evaluate()["rev"])


def test_a_data_flow_model_refuses_cached_generation() -> None:
    from types import SimpleNamespace

    from torch import nn

    from olmopt.errors import InputError
    from olmopt.evaluate.engine import Evaluator
    from olmopt.methods.dfs.resident import DfsEvalModel

    model = DfsEvalModel(None, nn.Linear(4, 4), None)  # type: ignore[arg-type]
    for kwargs in ({"cache": object()}, {"past_key_values": object()}, {"inputs_embeds": torch.zeros(1)}):
        with pytest.raises(InputError, match="teacher-forced and multiple-choice metrics only"):
            model.base_model(torch.zeros(1, 2, dtype=torch.long), **kwargs)
    evaluator = Evaluator(model, SimpleNamespace(pad_token_id=0, eos_token_id=3), [])
    with pytest.raises(InputError, match="teacher-forced and multiple-choice metrics only"):
        evaluator.greedy([[1, 2]], 2)  # the engine's cached decoding, as a generation metric would run it


# -- 20. worker processes die with their coordinator ---------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_kill_9_of_study_run_takes_its_evaluation_processes_with_it(
    workdir: Path, tmp_path: Path, cli
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(workdir / "study.yaml"), "--storage", url]) == 0
    proc = cli.start("study", "run", "study", "--storage", url, "--workers", "2", "--quiet")

    def spawned() -> list[int]:  # the evaluation processes (and any helper process multiprocessing started)
        return [
            p
            for p in _children(proc.pid)
            if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
        ]

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(spawned()) < 2:
        time.sleep(0.1)
    time.sleep(1.0)  # past their start-up: the signal is armed
    workers = spawned()
    assert len(workers) >= 2, "the evaluation processes did not start"
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]


def test_a_lost_storage_connection_is_one_line(monkeypatch, capsys) -> None:
    from sqlalchemy.exc import OperationalError

    from olmopt.commands import merge_circuit

    def lost(_args: object) -> int:
        raise OperationalError(
            "SELECT trials.trial_id FROM trials\nWHERE ...",
            {},
            Exception(
                "server closed the connection unexpectedly\n\tThis probably means the server terminated"
            ),
        )

    monkeypatch.setattr(merge_circuit, "run", lost)
    capsys.readouterr()
    assert main(["merge", "circuit", "a", "b", "--out", "c"]) == 1
    line = _one_line_error(capsys)
    assert (
        "storage failure (OperationalError): server closed the connection unexpectedly; rerun to resume"
        in line
    )


# -- 19. a refused command leaves no lock file; read-only commands create no Optuna tables -------------------
def test_a_refused_zoo_build_leaves_no_lock_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["zoo", "build", "--out", str(out), "--size", "tiny", "--quiet"]) == 2
    assert "pass --force" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "zoo"]


def test_the_sqlite_writer_lock_file_exists_only_while_held(tmp_path: Path) -> None:
    from olmopt.errors import StorageError
    from olmopt.search.storage import single_writer, sqlite_busy

    url = f"sqlite:///{tmp_path}/s.db"
    lock = tmp_path / "s.db.lock"
    with single_writer(url):
        assert lock.is_file() and sqlite_busy(url)
        with pytest.raises(StorageError, match="another olmopt process is running on"), single_writer(url):
            pass
        assert lock.is_file()  # the refused one removed nothing of the holder's
    assert not lock.exists() and not sqlite_busy(url)
    assert list(tmp_path.iterdir()) == []


def test_a_waiter_holds_the_lock_file_that_is_there_after_the_holder_removed_its_own(tmp_path: Path) -> None:
    """The holder removes the file on release; a process blocked on the removed file must not hold a lock that
    a third one, creating a new file, could take as well: the waiter moves to the current file."""
    import threading

    from olmopt.lockfile import held_lock

    path = tmp_path / "x.lock"
    seen: list[bool] = []
    holding = threading.Event()

    def waiter() -> None:
        holding.wait()
        with held_lock(path):
            seen.append(path.is_file())
            with pytest.raises(BlockingIOError), held_lock(path, wait=False):
                pass  # the file at `path` is the one this waiter holds

    thread = threading.Thread(target=waiter)
    thread.start()
    with held_lock(path):
        holding.set()
        time.sleep(0.3)  # the waiter has opened the file and blocks on it
    thread.join(timeout=10)
    assert seen == [True]
    assert not path.exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("grace", "low", "high"), [("0", 0.0, 1.0), ("2", 1.8, 5.0)])
def test_an_unreachable_storage_server_is_retried_for_the_grace(
    tmp_path: Path, monkeypatch, capsys, grace: str, low: float, high: float
) -> None:
    pytest.importorskip("psycopg")
    monkeypatch.setenv("OLMOPT_STORAGE_GRACE", grace)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/test"
    capsys.readouterr()
    start = time.monotonic()
    assert main(["study", "list", "--storage", url]) == 2
    took = time.monotonic() - start
    line = _one_line_error(capsys)
    assert line.startswith(f"olmopt: error: cannot open storage {url}: ") and "Connection refused" in line
    assert ("retried for 2 s; OLMOPT_STORAGE_GRACE" in line) == (grace == "2")
    assert low <= took < high, took


def test_a_bad_storage_grace_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("OLMOPT_STORAGE_GRACE", "soon")
    capsys.readouterr()
    assert main(["study", "list", "--storage", "postgresql+psycopg://postgres@127.0.0.1:1/test"]) == 2
    assert "OLMOPT_STORAGE_GRACE='soon': expected an integer >= 0" in _one_line_error(capsys)


@pytest.fixture
def empty_postgres_db() -> Iterator[str]:
    """A fresh empty PostgreSQL database (created and dropped here); skips without a server."""
    from sqlalchemy.engine import make_url

    from tests.test_distributed import server_url

    url = make_url(server_url("postgres"))
    psycopg = pytest.importorskip("psycopg")
    name = f"olmopt_empty_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # FORCE: pooled connections of this process


def _tables(url: str) -> list[str]:
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return sorted(inspect(conn).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.server
def test_read_only_commands_create_no_tables_in_an_empty_postgresql_database(
    empty_postgres_db: str, tmp_path: Path, capsys
) -> None:
    url = empty_postgres_db
    capsys.readouterr()
    for argv in (
        ["study", "list"], ["study", "status", "x"], ["study", "run", "x", "--quiet"],
        ["study", "delete", "x", "--yes"],
        ["export", "best", "x", "--out", str(tmp_path / "o")], ["report", "x", "--out", str(tmp_path / "r")],
    ):  # fmt: skip
        assert main([*argv, "--storage", url]) == 2, argv
        assert "the database holds no Optuna tables (nothing created" in _one_line_error(capsys)
    assert _tables(url) == []
    assert list(tmp_path.iterdir()) == []
    from olmopt.search.storage import open_storage

    open_storage(url)  # a writing command (study create) makes them
    assert "studies" in _tables(url)
