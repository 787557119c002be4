"""End-to-end campaigns on the tiny zoo: create, run,
status, export, rebuild, resume, joint mode, bad input."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from olmopt.cli import main
from olmopt.config import load_study_file
from olmopt.evaluate.engine import Evaluator
from olmopt.search.api import campaign_status
from olmopt.search.context import objectives_of

REPO = Path(__file__).resolve().parents[1]
ZOO_MODELS = ["base", "spec_add", "spec_rev", "spec_mc", "spec_fact"]


def study_file(tmp: Path, zoo: Path, name: str, **decisions: object) -> Path:
    """A study over the tiny zoo with absolute paths (so it can live anywhere)."""
    data = {
        "name": name,
        "pool": {"models": [str(zoo / m) for m in ZOO_MODELS]},
        "objectives": [
            {
                "name": "add",
                "dataset": str(REPO / "objectives/add.json"),
                "metric": "token_accuracy",
                "samples": 60,
            },
            {
                "name": "rev",
                "dataset": str(REPO / "objectives/rev.json"),
                "metric": "token_accuracy",
                "samples": 60,
            },
            {
                "name": "fact",
                "dataset": str(REPO / "objectives/fact.json"),
                "metric": "token_accuracy",
                "samples": 60,
            },
            {
                "name": "mc",
                "dataset": str(REPO / "objectives/mc_choices.json"),
                "metric": "mc_accuracy",
                "samples": 60,
            },
        ],
        "decisions": {"base": {"mode": "fixed", "model": str(zoo / "base")}, **decisions},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_held_out(path: Path, **decisions: object) -> Path:
    """Study file ``path`` with a held-out part (30 %) on every objective, selection by the mean, and
    ``decisions`` replacing some of its decisions."""
    data = yaml.safe_load(path.read_text())
    data["decisions"].update(decisions)
    data["selection"] = {"score": "mean"}
    for objective in data["objectives"]:
        objective["held_out"] = 0.3
    path.write_text(yaml.safe_dump(data))
    return path


def run_twice(path: Path, name: str, tmp: Path) -> Iterator[str]:
    """Create and run study ``name`` of ``path`` in two fresh storages (a reproducibility check); yields
    each storage's URL once its campaign has run."""
    for run in ("a", "b"):
        url = f"sqlite:///{tmp}/{run}.db"
        assert main(["study", "create", str(path), "--storage", url]) == 0
        assert main(["study", "run", name, "--storage", url, "--quiet"]) == 0
        yield url


@pytest.fixture(scope="module")
def layer_campaign(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    tmp = tmp_path_factory.mktemp("layers")
    url = f"sqlite:///{tmp}/s.db"
    path = study_file(tmp, tiny_zoo, "layers", layers={"mode": "greedy"})
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", "layers", "--storage", url, "--quiet"]) == 0
    return tmp, url, "layers"


def test_status_and_list_json(layer_campaign, capsys) -> None:
    _tmp, url, name = layer_campaign
    capsys.readouterr()
    assert main(["study", "status", name, "--storage", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in status["stages"]] == [
        "000-base",
        "001-layer-0",
        "002-layer-1",
        "003-layer-2",
        "004-layer-3",
    ]
    assert all(s["trials"]["complete"] == len(ZOO_MODELS) for s in status["stages"][1:])
    assert main(["study", "list", "--storage", url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {
            "name": name,
            "stages": 5,
            "decided": 5,
            "finished": True,
            "state": "finished",
            "created": rows[0]["created"],
        }
    ]


def test_export_loads_and_reproduces_metrics_and_rebuild_is_bit_identical(layer_campaign, tiny_zoo) -> None:
    tmp, url, name = layer_campaign
    out = tmp / "merged"
    assert main(["export", "best", name, "--storage", url, "--out", str(out), "--quiet"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "tokenizer.json",
        "model.safetensors",  # one shard: no index file
        "generation_config.json",
        "merge_report.json",
        "README.md",
    } <= files
    report = json.loads((out / "merge_report.json").read_text())
    assert {"base_model", "layers", "tensors", "recipe", "stages", "provenance"} <= report.keys()
    assert set(report["layers"]) == {"0", "1", "2", "3"}
    assert "password" not in json.dumps(report["provenance"])
    # a plain transformers load of the export reproduces the search metrics recorded in the campaign
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    config = load_study_file(tmp / "layers.yaml")
    values = Evaluator(model, tokenizer, objectives_of(config)).evaluate("search")
    final = campaign_status(name, url)["stages"][-1]["metrics"]
    for key, value in final.items():
        assert values[key] == pytest.approx(value, abs=1e-6)
    # the model card shows donors, search and held-out figures
    card = (out / "README.md").read_text()
    assert "held-out" in card and "spec_mc" in card
    # rebuild from the report alone gives bit-identical weights
    rebuilt = tmp / "rebuilt"
    assert (
        main(
            [
                "rebuild",
                str(out / "merge_report.json"),
                "--out",
                str(rebuilt),
                "--quiet",
                "--models-dir",
                str(tiny_zoo),
            ]
        )
        == 0
    )
    a = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in rebuilt.glob("*.safetensors") for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # refusing to overwrite, and --force
    assert main(["export", "best", name, "--storage", url, "--out", str(out), "--quiet"]) == 2
    argv = [
        "rebuild",
        str(out / "merge_report.json"),
        "--out",
        str(rebuilt),
        "--quiet",
        "--force",
        "--models-dir",
        str(tiny_zoo),
    ]
    assert main(argv) == 0


def test_olm_format_report_rebuilds(tmp_path, tiny_zoo) -> None:
    report = {
        "base_model": {"name": str(tiny_zoo / "base"), "metrics": {"a.json": 0.5}},
        "layers": {"0": {"metrics": {}, "best_model": str(tiny_zoo / "spec_mc")}},
        "tensors": {
            "model.layers.3.mlp.down_proj.weight": {"metrics": {}, "best_model": str(tiny_zoo / "spec_fact")}
        },
    }
    path = tmp_path / "merge_report.json"
    path.write_text(json.dumps(report))
    assert main(["rebuild", str(path), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    got = load_file(tmp_path / "m" / "model.safetensors")
    mc = load_file(tiny_zoo / "spec_mc" / "model.safetensors")
    fact = load_file(tiny_zoo / "spec_fact" / "model.safetensors")
    base = load_file(tiny_zoo / "base" / "model.safetensors")
    assert torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], mc["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        got["model.layers.3.mlp.down_proj.weight"], fact["model.layers.3.mlp.down_proj.weight"]
    )
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], base["model.layers.3.mlp.up_proj.weight"])


def test_improve_all_constraint_rejects_degrading_candidates(tiny_zoo, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    path = study_file(tmp_path, tiny_zoo, "guarded", layers={"mode": "greedy", "only": [3]})
    data = yaml.safe_load(path.read_text())
    data["selection"] = {"improve_all": "base"}
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", "guarded", "--storage", url, "--quiet"]) == 0
    import optuna

    study = optuna.load_study(study_name="guarded/001-layer-3", storage=url)
    trials = study.get_trials()
    infeasible = [t for t in trials if not t.user_attrs["feasible"]]
    assert infeasible, "some layer-3 donor should degrade a skill below the base"
    for t in infeasible:
        constraints = t.constraints.values() if isinstance(t.constraints, dict) else t.constraints
        assert any(v > 0 for v in constraints)
    decision = study.user_attrs["olmopt.decision"]
    assert decision["winner"] not in {t.user_attrs["candidate"] for t in infeasible}


def test_joint_mode_runs_and_exports(tiny_zoo, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    path = study_file(tmp_path, tiny_zoo, "joint", layers={"mode": "joint", "n_trials": 12})
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", "joint", "--storage", url, "--quiet"]) == 0
    import optuna

    study = optuna.load_study(study_name="joint/001-joint-layers", storage=url)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sum("reused" not in t.user_attrs for t in done) == 12  # the budget counts evaluations
    assert study.metric_names == ["add", "rev", "fact", "mc"]
    assert (
        main(
            [
                "export",
                "best",
                "joint",
                "--storage",
                url,
                "--out",
                str(tmp_path / "m"),
                "--quiet",
                "--no-compare",
            ]
        )
        == 0
    )
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")


@pytest.mark.slow
def test_interrupt_and_resume_gives_the_same_recipe(layer_campaign, tiny_zoo, tmp_path, cli) -> None:
    _tmp, ref_url, ref_name = layer_campaign
    url = f"sqlite:///{tmp_path}/s.db"
    path = study_file(tmp_path, tiny_zoo, "resume", layers={"mode": "greedy"})
    assert main(["study", "create", str(path), "--storage", url]) == 0
    import optuna

    from olmopt.search.campaign import all_studies

    storage = optuna.storages.get_storage(url)
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = cli.start("study", "run", "resume", "--storage", url, "--quiet")
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # stop it in the middle of the layer stages
            names = [s.study_name for s in all_studies(storage)]
            if any("layer-1" in n for n in names):
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert not campaign_status("resume", url)["finished"]
    assert main(["study", "run", "resume", "--storage", url, "--quiet"]) == 0
    assert campaign_status("resume", url)["recipe"] == campaign_status(ref_name, ref_url)["recipe"]
    assert not [s.study_name for s in all_studies(storage) if "#" in s.study_name]  # no lock left behind
    for stage in campaign_status("resume", url)["stages"]:
        assert stage["trials"]["running"] == 0 and stage["trials"]["waiting"] == 0


# -- bad input: one line, exit 2, storage and outputs untouched -------------------------------------------
def _study_names(url: str) -> list[str]:
    import optuna

    return sorted(s.study_name for s in optuna.storages.get_storage(url).get_all_studies())


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("olmopt: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d.update(colour="blue"), "colour: unknown key"),
        (
            lambda d: d["decisions"].update(layers={"mode": "greedy", "n_trials": "many"}),
            "decisions.layers.n_trials",
        ),
        (lambda d: d["objectives"][0].update(dataset="/nonexistent/data.json"), "file not found"),
        (lambda d: d["objectives"][0].update(metric="bleu"), "unknown metric 'bleu'"),
        (lambda d: d["pool"]["models"].append("/nonexistent/model"), "/nonexistent/model"),
        (
            lambda d: (
                d["selection"].update(improve_all="nonsense")
                if "selection" in d
                else d.update(selection={"improve_all": "nonsense"})
            ),
            "improve_all",
        ),
    ],
)
def test_bad_study_files(tiny_zoo, tmp_path, capsys, edit, needle) -> None:
    path = study_file(tmp_path, tiny_zoo, "bad", layers={"mode": "greedy"})
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp_path}/s.db"
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", url]) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "s.db").exists() or main(["study", "list", "--storage", url, "--json"]) == 0


def test_mismatched_pool_is_refused_before_any_work(tiny_zoo, tmp_path, capsys) -> None:
    from tests._models import make_family

    other = make_family(tmp_path / "other", ["x"], layers=2)["x"]
    path = study_file(tmp_path, tiny_zoo, "mismatch", layers={"mode": "greedy"})
    data = yaml.safe_load(path.read_text())
    data["pool"]["models"].append(str(other))
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    line = _one_line_error(capsys)
    assert "not homologous" in line and "num_hidden_layers" in line


def test_storage_and_name_errors(layer_campaign, tiny_zoo, tmp_path, capsys) -> None:
    tmp, url, name = layer_campaign
    path = study_file(tmp_path, tiny_zoo, name, layers={"mode": "greedy"})
    # SQLite in WAL mode may checkpoint on close, so compare what the storage holds, not its bytes
    before = (json.dumps(campaign_status(name, url), sort_keys=True), _study_names(url))
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", url]) == 2
    assert "already exists" in _one_line_error(capsys)
    assert main(["study", "run", "nope", "--storage", url]) == 2
    assert "no campaign named 'nope'" in _one_line_error(capsys)
    assert main(["export", "best", "nope", "--storage", url, "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys)
    assert main(["study", "list", "--storage", "notaurl"]) == 2
    assert "malformed storage URL" in _one_line_error(capsys)
    assert main(["study", "list", "--storage", "postgresql+psycopg://nobody:secret@127.0.0.1:1/x"]) == 2
    line = _one_line_error(capsys)
    assert "cannot open storage" in line and "secret" not in line
    assert (json.dumps(campaign_status(name, url), sort_keys=True), _study_names(url)) == before
    assert not (tmp_path / "o").exists()


def test_olm_config_is_accepted(tiny_zoo, tmp_path) -> None:
    olm = {
        "models": [str(tiny_zoo / "spec_mc"), str(tiny_zoo / "spec_fact")],
        "base_model_name": str(tiny_zoo / "base"),
        "dataset": {"add.json": {"mode": "exact_match"}, "fact.json": {"mode": "bigram_loss"}},
        "dataset_dir": str(REPO / "objectives"),
        "direction": "backward",
        "layer_swap": True,
        "tensor_swap": False,
        "improve_all": "base",
        "samples": 20,
        "skip_norm": True,
        "es_svd": False,
    }
    path = tmp_path / "olm_config.yaml"
    path.write_text(yaml.safe_dump(olm))
    config = load_study_file(path)
    assert config.pool.models[0] == str(tiny_zoo / "base")
    assert [o.metric for o in config.objectives] == ["exact_match", "bigram_loss"]
    assert config.decisions.layers.direction == "backward" and config.decisions.tensors.mode == "off"
    assert config.selection.improve_all == "base"


def test_delete_campaign_drops_its_record_stages_and_locks_only(tmp_path: Path) -> None:
    import optuna

    from olmopt.search.campaign import delete_campaign

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'd.db'}")
    for name in ("c", "c/000-layer-0", "c/000-layer-0#lock", "cc/000-layer-0", "other"):
        optuna.create_study(storage=storage, study_name=name)
    assert delete_campaign(storage, "c") == 3
    assert sorted(s.study_name for s in storage.get_all_studies()) == ["cc/000-layer-0", "other"]
