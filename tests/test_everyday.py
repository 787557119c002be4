"""Everyday use (issue 19): where a campaign's storage is and read-only commands that create nothing,
`study delete`, logs without a terminal, a light `study status` with meaningful states, a model card
ready for the Hub, a dashboard and report that tell the truth, help examples and small things."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from _models import make_family, write_addition_data

from olmopt.cli import main
from olmopt.search.storage import default_storage_url, resolve_storage

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("olmopt: error: "), err
    return err


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random 3-model family (2 layers) and a study file over it with a fixed base and greedy layers."""
    tmp = tmp_path_factory.mktemp("everyday")
    fam = make_family(tmp, ["a", "b", "c"], layers=2)
    write_addition_data(tmp / "add.json")
    study = {
        "name": "ev",
        "pool": {"models": [str(fam[m]) for m in "abc"]},
        "objectives": [
            {"dataset": str(tmp / "add.json"), "metric": "token_accuracy", "name": "acc"},
            {"dataset": str(tmp / "add.json"), "metric": "perplexity", "name": "ppl"},
        ],
        "decisions": {"base": {"mode": "fixed", "model": str(fam["a"])}, "layers": {"mode": "greedy"}},
    }
    return {"tmp": tmp, "study": study}


def write_study(directory: Path, study: dict[str, Any], **changes: Any) -> Path:
    path = directory / f"{changes.get('name', study['name'])}.yaml"
    path.write_text(yaml.safe_dump({**study, **changes}))
    return path


# -- 1, 2: the default storage is resolved once; read-only commands never create one --------------------
def test_default_storage_is_found_from_any_subdirectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OLMOPT_STORAGE", raising=False)
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    # none yet: the current directory's storage/olmopt.db, as an absolute path
    assert default_storage_url(deep) == f"sqlite:///{deep}/storage/olmopt.db"
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "olmopt.db").touch()
    assert default_storage_url(deep) == f"sqlite:///{tmp_path}/storage/olmopt.db"
    monkeypatch.chdir(deep)
    assert resolve_storage() == (f"sqlite:///{tmp_path}/storage/olmopt.db", "default")
    assert resolve_storage(None, "sqlite:///x.db") == ("sqlite:///x.db", "the study file")
    monkeypatch.setenv("OLMOPT_STORAGE", "sqlite:///env.db")
    assert resolve_storage(None, "sqlite:///x.db") == ("sqlite:///env.db", "$OLMOPT_STORAGE")
    assert resolve_storage("sqlite:///flag.db", "sqlite:///x.db") == ("sqlite:///flag.db", "--storage")


@pytest.mark.parametrize(
    "argv",
    [
        ["study", "list"],
        ["study", "status", "ev"],
        ["study", "status", "ev", "--json"],
        ["study", "run", "ev"],
        ["study", "delete", "ev", "--yes"],
        ["report", "ev", "--out", "rep"],
        ["export", "best", "ev", "--out", "model"],
        ["dashboard", "--port", "0"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
@pytest.mark.parametrize("storage", ["default", "sqlite", "journal"])
def test_commands_on_a_missing_storage_create_nothing(
    argv: list[str],
    storage: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("OLMOPT_STORAGE", raising=False)
    monkeypatch.delenv("OLMOPT_ARTIFACT_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    extra = {
        "default": [],
        "sqlite": ["--storage", f"sqlite:///{tmp_path}/sub/s.db"],
        "journal": ["--storage", f"journal:{tmp_path}/sub/j.log"],
    }[storage]
    assert main([*argv, *extra]) == 2
    line = _one_line_error(capsys)
    where = {
        "default": tmp_path / "storage" / "olmopt.db",
        "sqlite": tmp_path / "sub" / "s.db",
        "journal": tmp_path / "sub" / "j.log",
    }
    assert f"no storage at {where[storage]}" in line and "--storage URL" in line
    assert _tree(tmp_path) == []


def test_create_says_where_the_campaign_lives(
    family: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The study file's `storage:` is read by `study create` only: its `next:` hint carries it."""
    monkeypatch.delenv("OLMOPT_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/elsewhere/c.db"
    path = write_study(tmp_path, family["study"], name="where", storage=url)
    capsys.readouterr()
    assert main(["study", "create", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"next: olmopt study run where --storage {url}" in out
    assert not (tmp_path / "storage").exists()  # the default was not touched
    # the default storage: the hint needs no flag, and later commands find it from a subdirectory
    path = write_study(tmp_path, family["study"], name="here")
    assert main(["study", "create", str(path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("next: olmopt study run here")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["study", "list", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["here"]
    assert main(["study", "status", "where"]) == 2
    line = _one_line_error(capsys)
    assert f"no campaign named 'where' in sqlite:///{tmp_path}/storage/olmopt.db" in line
    assert "campaigns there: here" in line and "--storage URL" in line


# -- 3: study delete -------------------------------------------------------------------------------------
def test_study_delete_on_sqlite(
    family: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from olmopt.search.storage import single_writer

    url = f"sqlite:///{tmp_path}/s.db"
    for name in ("ev", "ev2"):
        assert (
            main(
                ["study", "create", str(write_study(tmp_path, family["study"], name=name)), "--storage", url]
            )
            == 0
        )
    assert main(["study", "run", "ev", "--storage", url, "--quiet"]) == 0
    capsys.readouterr()

    def names() -> list[str]:
        assert main(["study", "list", "--storage", url, "--json"]) == 0
        return [r["name"] for r in json.loads(capsys.readouterr().out)]

    # no terminal to confirm on: refused without --yes
    assert main(["study", "delete", "ev", "--storage", url]) == 2
    assert "add --yes" in _one_line_error(capsys) and names() == ["ev", "ev2"]
    # another olmopt process holds the SQLite file (a running `study run`): refused
    with single_writer(url):
        assert main(["study", "delete", "ev", "--storage", url, "--yes"]) == 2
        assert "another olmopt process is running" in _one_line_error(capsys)
    assert sorted(names()) == ["ev", "ev2"]
    assert main(["study", "delete", "ev", "--storage", url, "--yes"]) == 0
    assert "deleted campaign 'ev' (3 stages, 3 decided)" in capsys.readouterr().out
    assert names() == ["ev2"]
    import optuna

    assert not [
        s.study_name
        for s in optuna.storages.get_storage(url).get_all_studies()
        if s.study_name.startswith("ev/")
    ]
    assert main(["study", "delete", "ev", "--storage", url, "--yes"]) == 2
    assert "no campaign named 'ev'" in _one_line_error(capsys)
    # the name is free again
    assert main(["study", "create", str(tmp_path / "ev.yaml"), "--storage", url]) == 0
    capsys.readouterr()
    assert sorted(names()) == ["ev", "ev2"]


@pytest.mark.server
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_study_delete_on_postgresql_refuses_while_a_worker_runs(
    family: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import uuid

    import optuna

    from olmopt.search.campaign import Campaign
    from olmopt.search.coordination import LOCK_ATTR
    from tests.test_distributed import server_url

    url = server_url("postgres")
    name = f"del-{uuid.uuid4().hex[:10]}"
    assert (
        main(["study", "create", str(write_study(tmp_path, family["study"], name=name)), "--storage", url])
        == 0
    )
    campaign = Campaign.load(name, url)  # opened with heartbeats, as a worker opens it
    storage = campaign.storage
    assert isinstance(storage, optuna.storages.RDBStorage)
    stage = campaign.plan[1]
    study = campaign.stage_study(stage)
    trial = study.ask()  # a worker's trial, beating
    storage.record_heartbeat(trial._trial_id)
    capsys.readouterr()
    assert main(["study", "delete", name, "--storage", url, "--yes"]) == 2
    line = _one_line_error(capsys)
    assert f"a worker is running it (stage {stage.key} has 1 running trial(s))" in line
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    lock = optuna.create_study(storage=storage, study_name=f"{campaign.stage_study_name(stage)}#lock")
    lock.set_user_attr(LOCK_ATTR, time.time())
    assert main(["study", "delete", name, "--storage", url, "--yes"]) == 2
    assert f"stage {stage.key} is locked by a worker" in _one_line_error(capsys)
    optuna.delete_study(study_name=lock.study_name, storage=storage)
    assert main(["study", "delete", name, "--storage", url, "--yes"]) == 0
    assert not [s.study_name for s in storage.get_all_studies() if s.study_name.split("/")[0] == name]


# -- 6, 7: logs people can read -----------------------------------------------------------------------------
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"


def _run_cli(args: list[str], stderr: Any, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, OLMOPT_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "olmopt.cli", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize("quiet", [False, True], ids=["plain", "quiet"])
def test_study_run_without_a_terminal_logs_one_timestamped_line_per_stage(
    family: dict[str, Any], tmp_path: Path, quiet: bool
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(write_study(tmp_path, family["study"])), "--storage", url]) == 0
    log = tmp_path / "run.log"
    with open(log, "wb") as handle:
        proc = _run_cli(["study", "run", "ev", "--storage", url, *(["--quiet"] if quiet else [])], handle)
    assert proc.returncode == 0, log.read_text()
    raw = log.read_bytes()
    assert b"\r" not in raw and b"\x1b" not in raw  # no progress frames, no colours
    lines = raw.decode().splitlines()
    assert re.fullmatch(STAMP + r" campaign ev: 3 of 3 stages to run \(about \d+ trials\)", lines[0]), lines
    stage_lines = lines[1:]
    assert [line.split(" ")[1] for line in stage_lines] == ["000-base:", "001-layer-0:", "002-layer-1:"], (
        lines
    )
    for line in stage_lines:
        # timestamp, stage, winner (why), trials, and every objective's value
        figure = r"[\d.e+-]+( \[[\d.e+-]+\])?"  # held-out figure in brackets
        assert re.fullmatch(
            STAMP + rf" \d{{3}}-[\w-]+: winner \S+ \(.+\); \d+ trials; acc {figure} ppl {figure}", line
        ), line
    assert "campaign ev: finished" in proc.stdout.decode()
    if quiet:
        return
    # export and rebuild without a terminal: no "writing" bar frames either (issue 19 item 6, README walk)
    out = tmp_path / "model"
    with open(log, "wb") as handle:
        assert (
            _run_cli(
                ["export", "best", "ev", "--storage", url, "--out", str(out), "--no-compare"], handle
            ).returncode
            == 0
        )
        report = str(out / "merge_report.json")
        rebuilt = _run_cli(
            ["rebuild", report, "--out", str(tmp_path / "again"), "--models-dir", str(family["tmp"])], handle
        )
        assert rebuilt.returncode == 0
    raw = log.read_bytes()
    assert b"\r" not in raw and b"\x1b" not in raw and b"writing" not in raw, raw[-500:]


def test_study_run_on_a_terminal_keeps_its_bars(family: dict[str, Any], tmp_path: Path) -> None:
    import pty

    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(write_study(tmp_path, family["study"])), "--storage", url]) == 0
    primary, secondary = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(
        secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0)
    )  # tqdm draws nothing at 0 columns
    try:
        proc = _run_cli(["study", "run", "ev", "--storage", url], secondary)
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
    assert proc.returncode == 0
    out = b"".join(chunks).decode(errors="replace")
    assert "\r" in out and ("trial/s" in out or "s/trial" in out), repr(out)  # a tqdm bar counting trials
    assert re.search(STAMP + r" 002-layer-1: ", out)


# -- 8, 9: a light `study status` with states that mean something -------------------------------------------
def test_status_and_list_do_not_import_torch(family: dict[str, Any], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(write_study(tmp_path, family["study"])), "--storage", url]) == 0
    assert main(["study", "run", "ev", "--storage", url, "--quiet"]) == 0
    for argv in (["study", "status", "ev"], ["study", "status", "ev", "--json"], ["study", "list"]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "olmopt.cli", *argv, "--storage", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        imported = {
            line.split("|")[-1].strip()
            for line in proc.stderr.splitlines()
            if line.startswith("import time:")
        }
        heavy = {m for m in imported if m.split(".")[0] in ("torch", "transformers", "safetensors")}
        assert not heavy, (argv, sorted(heavy)[:5])


def test_status_states(
    family: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    from olmopt.search.api import campaign_status, run_campaign
    from olmopt.search.campaign import Campaign
    from olmopt.search.storage import single_writer

    data = tmp_path / "add.json"
    shutil.copy(family["tmp"] / "add.json", data)
    study = {
        **family["study"],
        "objectives": [{**o, "dataset": str(data)} for o in family["study"]["objectives"]],
    }
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(write_study(tmp_path, study)), "--storage", url]) == 0

    def state() -> str:
        s = campaign_status("ev", url)
        return s["state"] + (f": {s['error']}" if s["error"] else "")

    assert state() == "not started"

    # Ctrl-C (here: raised by the first log line of the run)
    def interrupt(_line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_campaign("ev", url, progress=False, log=interrupt)
    assert state() == "interrupted"
    assert main(["study", "run", "ev", "--storage", url, "--quiet", "--timeout", "0.001"]) == 3
    assert state() == "stopped"
    # a run that is killed (kill -9) leaves its "running" note and no process: interrupted; one that holds
    # the SQLite file is running
    Campaign.load("ev", url).record_run("running")
    assert state() == "interrupted"
    with single_writer(url):
        assert state() == "running"
    # a run refused before it starts (a dataset gone since create) writes nothing: the state stays
    data.unlink()
    assert main(["study", "run", "ev", "--storage", url, "--quiet"]) == 2
    assert state() == "interrupted"
    shutil.copy(family["tmp"] / "add.json", data)
    # a run that fails: its one-line error
    from olmopt.errors import OlmoptError
    from olmopt.search.runner import CampaignRunner

    def fail(self: object) -> None:
        raise OlmoptError("evaluation failed on add.json")

    with monkeypatch.context() as patch:
        patch.setattr(CampaignRunner, "run", fail)
        assert main(["study", "run", "ev", "--storage", url, "--quiet"]) == 1
    assert state().startswith("failed: ") and "add.json" in state()
    assert main(["study", "run", "ev", "--storage", url, "--quiet"]) == 0
    assert state() == "finished"
    capsys.readouterr()
    assert main(["study", "list", "--storage", url]) == 0
    assert "finished" in capsys.readouterr().out


def test_status_table_shows_whole_winners(
    family: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from olmopt.model_ids import short_names

    assert short_names(["/x/m/model", "/y/n/model", "org/other", "solo"]) == {
        "/x/m/model": "m/model",
        "/y/n/model": "n/model",
        "org/other": "other",
        "solo": "solo",
    }
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(write_study(tmp_path, family["study"])), "--storage", url]) == 0
    assert main(["study", "run", "ev", "--storage", url, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["study", "status", "ev", "--storage", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "campaign ev: finished (3 of 3 stages decided)"
    assert lines[1].split() == ["stage", "state", "trials", "winner", "acc", "ppl"]
    for line, key in zip(lines[2:], ["000-base", "001-layer-0", "002-layer-1"], strict=True):
        stage, state, _trials, winner, *_ = line.split()
        assert (stage, state) == (key, "decided") and winner in ("a", "b", "c")


# -- 5: a model card ready for the Hub -----------------------------------------------------------------------
def test_exported_card_and_report_name_models_by_id_without_local_paths(
    family: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(write_study(tmp_path, family["study"])), "--storage", url]) == 0
    assert main(["study", "run", "ev", "--storage", url, "--quiet"]) == 0
    out = tmp_path / "model"
    assert main(["export", "best", "ev", "--storage", url, "--out", str(out), "--quiet"]) == 0
    card = (out / "README.md").read_text()
    raw_report = (out / "merge_report.json").read_text()
    for text in (card, raw_report):
        assert str(family["tmp"]) not in text and str(tmp_path) not in text and "/tmp/" not in text
    report = json.loads(raw_report)
    assert report["pool"] == {m: {"source": "local"} for m in "abc"}
    assert report["recipe"]["base"] == "a" and set(report["recipe"]["layers"].values()) <= {"a", "b", "c"}
    assert report["provenance"]["storage"] == "sqlite:///s.db"
    assert {o["dataset"] for o in report["objectives"].values()} == {"add.json"}
    # front matter: no base_model for local models, a note saying so; donors with roles; the recipe in words
    front = card.split("---")[1]
    assert "base_model" not in front and "library_name: transformers" in front
    assert "are local models, named here by directory name" in card
    assert "| `a` | base: every tensor not supplied by another model" in card
    layers = report["recipe"]["layers"]
    for donor in set(layers.values()) - {"a"}:
        assert f"| `{donor}` | layer" in card
    assert "- **base model:** `a`" in card and "- **whole layers:** 0 ← `" in card
    assert "## Objectives" in card and "| acc | token_accuracy | maximize | add.json |" in card
    assert "| a (base) |" in card  # the metrics table by id
    # rebuild: local models need --models-dir, then the weights are bit-identical
    capsys.readouterr()
    assert main(["rebuild", str(out / "merge_report.json"), "--out", str(tmp_path / "r1"), "--quiet"]) == 2
    assert "was a local directory (pass --models-dir DIR" in _one_line_error(capsys)
    assert not (tmp_path / "r1").exists()
    argv = ["rebuild", str(out / "merge_report.json"), "--out", str(tmp_path / "r2"), "--quiet"]
    assert main([*argv, "--models-dir", str(family["tmp"])]) == 0
    a = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in (tmp_path / "r2").glob("*.safetensors") for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_card_front_matter_lists_hub_models(tmp_path: Path) -> None:
    from olmopt.export import model_card
    from olmopt.model_ids import public_ids
    from olmopt.recipe import Recipe

    (tmp_path / "mine").mkdir()
    ids = public_ids([str(tmp_path / "mine"), "Qwen/Qwen2.5-0.5B", "org/other"])
    assert ids == {
        str(tmp_path / "mine"): {"id": "mine", "source": "local"},
        "Qwen/Qwen2.5-0.5B": {"id": "Qwen/Qwen2.5-0.5B", "source": "hub"},
        "org/other": {"id": "org/other", "source": "hub"},
    }
    recipe = Recipe(
        base="Qwen/Qwen2.5-0.5B", boundary="mine", units={"model.layers.1.mlp.up_proj": "org/other"}
    )
    table = [{"model": "merged (olmopt)", "search": {"acc": 0.5}, "held_out": {"acc": 0.4}}]
    pool = {v["id"]: {"source": v["source"]} for v in ids.values()}
    card = model_card("t", recipe, table, ["acc"], {"acc": "maximize"}, pool=pool)
    front = card.split("---")[1]
    assert "base_model:\n- Qwen/Qwen2.5-0.5B\n- org/other\nbase_model_relation: merge" in front
    assert "`mine` is a local model" in card
    assert "| `mine` | boundary: embeddings, final norm and head |" in card
    assert "| `org/other` | 1 tensor unit: `model.layers.1.mlp.up_proj` |" in card
    assert "  - `model.layers.1.mlp.up_proj` ← `org/other`" in card


# -- 10: the dashboard tells the truth ----------------------------------------------------------------------
def test_root_study_carries_the_objectives_directions(family: dict[str, Any], tmp_path: Path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(write_study(tmp_path, family["study"])), "--storage", url]) == 0
    root = optuna.load_study(study_name="ev", storage=url)
    assert root.metric_names == ["acc", "ppl"]
    assert root.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]


# -- 12: small things ----------------------------------------------------------------------------------------
def test_export_to_an_existing_directory_fails_before_loading_anything(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "olmopt.cli", "export", "best", "ev",
         "--out", str(tmp_path / "out"), "--storage", f"sqlite:///{tmp_path}/s.db"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert lines == [f"olmopt: error: output {tmp_path / 'out'} already exists (pass --force to replace it)"]
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert not imported & {"torch", "transformers", "optuna"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_single_shard_needs_no_index_and_files_are_0644(tmp_path: Path) -> None:
    import torch

    from olmopt.outdir import INDEX_FILE, ShardedSafetensorsWriter

    umask = os.umask(0o022)
    try:
        with ShardedSafetensorsWriter(tmp_path) as writer:
            writer.add("w", torch.zeros(4))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
        assert not (tmp_path / INDEX_FILE).exists()
        assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_zoo_weights_are_written_0644(tmp_path: Path) -> None:
    from _models import char_tokenizer, make_config
    from transformers import AutoModelForCausalLM

    from olmopt.zoo.build import _save

    tokenizer = char_tokenizer()
    model = AutoModelForCausalLM.from_config(make_config("llama", 1, vocab=len(tokenizer)))
    umask = os.umask(0o022)
    try:
        _save(model, tokenizer, tmp_path / "m")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


@pytest.fixture(scope="module")
def zoo_layer0(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished campaign 'ev' on the tiny zoo: fixed base, one greedy stage over layer 0 (5 candidates,
    several of them on the Pareto front of its 4 objectives)."""
    from tests.test_study import study_file

    tmp = tmp_path_factory.mktemp("zoo_layer0")
    url = f"sqlite:///{tmp}/s.db"
    path = study_file(tmp, tiny_zoo, "ev", layers={"mode": "greedy", "only": [0]})
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", "ev", "--storage", url, "--quiet"]) == 0
    return url


def test_dashboard_marks_the_selected_trial_as_best(zoo_layer0: str, tmp_path: Path) -> None:
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard._pareto_front import get_pareto_front_trials

    from olmopt.commands.dashboard import dashboard_app
    from olmopt.search.campaign import Campaign
    from olmopt.search.storage import open_storage

    url = zoo_layer0
    campaign = Campaign.load("ev", url)
    layer_study = campaign.existing_stage_study(campaign.plan[1])
    assert layer_study is not None  # the dashboard's own front has several trials: every one was "Best Trial"
    assert len(get_pareto_front_trials(layer_study.get_trials(), layer_study.directions)) > 1
    app = dashboard_app(open_storage(url, heartbeat=False), tmp_path / "artifacts")

    def get(path: str) -> Any:
        environ: dict[str, Any] = {}
        setup_testing_defaults(environ)
        environ["PATH_INFO"] = path
        status: list[str] = []
        body = b"".join(app(environ, lambda s, _h, _e=None: status.append(s)))
        assert status[0].startswith("200"), status
        return json.loads(body)

    ids = {s["study_name"]: s["study_id"] for s in get("/api/studies")["study_summaries"]}
    root = get(f"/api/studies/{ids['ev']}")
    assert root["directions"] == ["maximize"] * 4 and root["objective_names"] == ["add", "rev", "fact", "mc"]
    for stage in campaign.plan:
        decision = campaign.decision(stage)
        assert decision is not None
        detail = get(f"/api/studies/{ids['ev/' + stage.key]}")
        assert len(detail["trials"]) >= 1
        assert [t["number"] for t in detail["best_trials"]] == [decision.trial], stage.key


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("OLMOPT_REQUIRE_CHROMIUM"),
    reason="needs Debian chromium at /usr/bin/chromium (apt-get install -y chromium)",
)
def test_screenshot_of_the_trial_list_marks_only_the_winner(zoo_layer0: str, tmp_path: Path) -> None:
    """Headless Chromium on `olmopt dashboard`: in a decided
    stage's trial list only the winner is "Best Trial"."""
    from PIL import Image

    from olmopt.search.campaign import Campaign

    campaign = Campaign.load("ev", zoo_layer0)
    decision = campaign.decision(campaign.plan[1])
    assert decision is not None
    proc = subprocess.Popen(
        [sys.executable, "-m", "olmopt.cli", "dashboard", "--storage", zoo_layer0, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        lines = [proc.stdout.readline() for _ in range(2)]  # type: ignore[union-attr]
        base = lines[1].split()[1].removesuffix("/dashboard")
        with urllib.request.urlopen(base + "/api/studies", timeout=30) as response:
            ids = {s["study_name"]: s["study_id"] for s in json.loads(response.read())["study_summaries"]}
        page = f"{base}/dashboard/studies/{ids['ev/' + campaign.plan[1].key]}/trials"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        flags += [
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=15000",
        ]
        flags += ["--window-size=1400,1000"]
        shot = tmp_path / "trials.png"
        for extra, profile in (([f"--screenshot={shot}"], "p1"), (["--dump-dom"], "p2")):
            result = subprocess.run(
                [str(CHROMIUM), *flags, f"--user-data-dir={tmp_path / profile}", *extra, page],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        dom = result.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 200 and max(c for c, _ in colours) < 0.9 * image.size[0] * image.size[1]
    # the list: "Trial N" items, each followed by its chips; exactly one "Best Trial" chip, on the winner
    # (the last item's text runs into the selected trial's detail panel, "Trial N (trial_id=M)": cut there)
    items = re.split(r">Trial (\d+)<", dom)
    chips = {
        int(items[i]): items[i + 1].split("(trial_id=")[0].count(">Best Trial<")
        for i in range(1, len(items) - 1, 2)
    }
    assert len(chips) == 5, sorted(chips)
    assert {n for n, count in chips.items() if count} == {decision.trial}, chips


def test_pareto_plot_of_four_objectives_is_parallel_coordinates(tmp_path: Path) -> None:
    """Four objectives are not squeezed onto two axes: every trial is a line over all of them, better up."""
    from matplotlib.figure import Figure

    from olmopt.report import plots

    objectives = {"a": "maximize", "b": "maximize", "c": "minimize", "d": "maximize"}
    points = [
        {"number": 0, "values": {"a": 0.9, "b": 0.9, "c": 5.0, "d": 0.1}, "feasible": True, "pareto": True},
        {"number": 1, "values": {"a": 0.5, "b": 0.5, "c": 1.0, "d": 0.9}, "feasible": True, "pareto": True},
        {"number": 2, "values": {"a": 0.4, "b": 0.4, "c": 6.0, "d": 0.0}, "feasible": False, "pareto": False},
    ]
    ax = Figure().subplots()
    plots._parallel_coordinates(ax, points, objectives, selected=1)
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    # the selected trial looks dominated by trial 0 on (a, b) but is best on c (minimized) and d: up there
    assert lines["selected (trial 1)"] == pytest.approx([0.2, 0.2, 1.0, 1.0])
    assert lines["Pareto set (all objectives)"] == pytest.approx([1.0, 1.0, 0.2, 1 / 9])
    assert lines["infeasible"] == pytest.approx([0.0, 0.0, 0.0, 0.0])
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["a ↑", "b ↑", "c ↓", "d ↑"]
    stage = {"key": "001-joint-layers", "points": points, "decision": {"trial": 1}}
    assert plots.pareto_png(stage, objectives, tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.slow
def test_ctrl_c_message_gets_its_own_line_below_the_bars(tiny_zoo: Path, tmp_path: Path) -> None:
    import fcntl
    import pty
    import select
    import struct
    import termios

    from tests.test_study import study_file

    url = f"sqlite:///{tmp_path}/s.db"
    path = study_file(tmp_path, tiny_zoo, "ev", layers={"mode": "greedy", "only": [0, 1]})
    assert main(["study", "create", str(path), "--storage", url]) == 0
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = dict(os.environ, OLMOPT_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "olmopt.cli", "study", "run", "ev", "--storage", url],
        stdout=subprocess.DEVNULL, stderr=secondary, env=env,
    )  # fmt: skip
    os.close(secondary)
    out, sent = b"", False
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if not sent and b"000-base: winner" in out:
                proc.send_signal(signal.SIGINT)  # while stage 001's bar is drawn
                sent = True
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
    assert proc.wait(timeout=60) == 130 and sent
    text = out.decode(errors="replace").replace("\r\n", "\n")
    assert re.search(r"(^|\n)olmopt: interrupted", text), text[-600:]


def test_postgres_scheme_gets_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "list", "--storage", "postgres://me:secret@db-host/olmopt"]) == 2
    line = _one_line_error(capsys)
    assert "postgresql+psycopg://me:***@db-host/olmopt" in line and "secret" not in line


@pytest.mark.server
def test_state_on_postgresql(family: dict[str, Any], tmp_path: Path) -> None:
    import uuid

    from olmopt.search.api import campaign_status
    from olmopt.search.campaign import RUN_ATTR, Campaign
    from tests.test_distributed import server_url

    url = server_url("postgres")
    name = f"state-{uuid.uuid4().hex[:10]}"
    assert (
        main(["study", "create", str(write_study(tmp_path, family["study"], name=name)), "--storage", url])
        == 0
    )
    try:
        assert campaign_status(name, url)["state"] == "not started"
        campaign = Campaign.load(name, url)
        campaign.record_run("running")  # a worker that just started (loading models, no trial yet)
        assert campaign_status(name, url)["state"] == "running"
        root_id = campaign.storage.get_study_id_from_name(name)
        campaign.storage.set_study_user_attr(
            root_id, RUN_ATTR, {"state": "running", "at": "2020-01-01T00:00:00Z"}
        )
        assert campaign_status(name, url)["state"] == "interrupted"  # a worker killed long ago
    finally:
        assert main(["study", "delete", name, "--storage", url, "--yes"]) == 0


# -- 11: help with examples ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [["study", "create"], ["study", "run"], ["study", "status"], ["study", "list"], ["study", "delete"],
     ["export", "best"], ["rebuild"], ["report"], ["dashboard"]],
    ids=" ".join,
)  # fmt: skip
def test_help_ends_with_examples(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    tail = out[out.index("\nexamples:\n") :].strip().splitlines()[1:]
    assert tail and all(line.startswith(f"  olmopt {' '.join(argv)}") for line in tail), tail


# -- 11: study-file messages: close matches for unknown keys, the file's name on every key error,
# no class names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sampler": {"nme": "tpe"}}, "sampler.nme: unknown key (did you mean 'name'?)"),
        (
            {"decisions": {"layer": {"mode": "greedy"}}},
            "decisions.layer: unknown key (did you mean 'layers'?)",
        ),
        (
            {"pool": {"modles": ["a", "b"]}},
            "pool.modles: unknown key (did you mean 'models'?)",
        ),  # not "models: required"
        (
            {"decisions": {"es": {"svd": {"generation": 2}}}},
            "decisions.es.svd.generation: unknown key (did you mean 'generations'?)",
        ),
        ({"colour": "blue"}, "colour: unknown key"),  # nothing close: no guess
        ({"decisions": {"layers": 3}}, "decisions.layers: expected a mapping of keys, got 3 (a number)"),
        ({"pool": ["a", "b"]}, "pool: expected a mapping of keys, got a list"),
    ],
    ids=["sampler", "decisions", "pool", "nested", "no-match", "number", "list"],
)
def test_study_file_key_errors_suggest_keys_and_name_no_class(
    family: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    expected: str,
) -> None:
    path = write_study(tmp_path, family["study"], **change)
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    assert _one_line_error(capsys) == f"olmopt: error: {path}: {expected}\n"
    assert _tree(tmp_path) == [path.name]


def test_an_unknown_key_in_an_objective_gets_a_suggestion(
    family: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    objectives = [{**family["study"]["objectives"][0], "held_outt": 0.1}]
    path = write_study(tmp_path, family["study"], objectives=objectives)
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    assert (
        _one_line_error(capsys)
        == f"olmopt: error: {path}: objectives.0.held_outt: unknown key (did you mean 'held_out'?)\n"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"layers": {"mode": "greedy", "only": [0, 2]}},
         "decisions.layers.only: layer 2 is outside the model (layers 0..1)"),
        ({"layers": {"mode": "off"}, "es": {"svd": {"units": ["model.layers.0.nope"]}}},
         "decisions.es.svd.units: unit 'model.layers.0.nope' does not exist in this architecture (units: "
         "lm_head, model.embed_tokens, model.norm, model.layers.N.{input_layernorm, mlp.down_proj, "
         "mlp.gate_proj, mlp.up_proj, post_attention_layernorm, self_attn.k_proj, self_attn.o_proj, "
         "self_attn.q_proj, self_attn.v_proj} with N in 0..1)\n"),
    ],
    ids=["layers.only", "es.units"],
)  # fmt: skip
def test_key_errors_found_against_the_pool_name_the_file(
    family: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    expected: str,
) -> None:
    """Cross-field checks that need the opened pool start with the file's name, as schema errors do."""
    decisions = {**family["study"]["decisions"], **change}
    path = write_study(tmp_path, family["study"], decisions=decisions)
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"olmopt: error: {path}: {expected}") and line.endswith("\n")
    assert _tree(tmp_path) == [path.name]
