"""Scripting output: ``--json`` documents of every command
that has one, ``--quiet``, help texts, exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from _models import make_family, write_addition_data

from olmopt.cli import build_parser, main

NAME = "cj"


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished greedy campaign (fixed base, 2 layer stages) over a random 3-model family, exported."""
    tmp = tmp_path_factory.mktemp("cli_json")
    fam = make_family(tmp, ["a", "b", "c"], layers=2)
    write_addition_data(tmp / "add.json")
    study = {
        "name": NAME,
        "pool": {"models": [str(fam[m]) for m in "abc"]},
        "objectives": [
            {"dataset": str(tmp / "add.json"), "metric": "token_accuracy", "name": "acc"},
            {"dataset": str(tmp / "add.json"), "metric": "perplexity", "name": "ppl"},
        ],
        "decisions": {"layers": {"mode": "greedy"}},
    }
    (tmp / "s.yaml").write_text(yaml.safe_dump(study))
    return {"tmp": tmp, "url": f"sqlite:///{tmp}/s.db", "study": tmp / "s.yaml"}


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_json_documents_carry_the_documented_fields(
    done: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url, tmp = done["url"], done["tmp"]
    created = run_json(capsys, "study", "create", str(done["study"]), "--storage", url, "--json")
    assert set(created) == {"name", "storage", "stages"} and created["name"] == NAME
    assert [s["key"] for s in created["stages"]] == ["000-base", "001-layer-0", "002-layer-1"]

    capsys.readouterr()
    assert main(["study", "run", NAME, "--storage", url, "--quiet"]) == 0
    run_out = capsys.readouterr()
    assert "campaign cj: finished" in run_out.out
    # --quiet: no bars; the campaign line and one line per stage stay
    assert [line.split(" ")[1] for line in run_out.err.splitlines()] == [
        "campaign",
        "000-base:",
        "001-layer-0:",
        "002-layer-1:",
    ]
    assert "\r" not in run_out.err

    status = run_json(capsys, "study", "status", NAME, "--storage", url, "--json")
    assert {"name", "state", "error", "pool", "finished", "objectives", "stages", "recipe"} <= set(status)
    assert status["finished"] is True and status["objectives"] == {"acc": "maximize", "ppl": "minimize"}
    for stage in status["stages"]:
        assert {"stage", "kind", "target", "state", "trials", "winner", "metrics", "held_out"} <= set(stage)
        assert (
            set(stage["trials"]) == {"complete", "running", "waiting", "failed"}
            and stage["state"] == "decided"
        )
        assert set(stage["metrics"]) == {"acc", "ppl"}

    rows = run_json(capsys, "study", "list", "--storage", url, "--json")
    assert [set(r) for r in rows] == [{"name", "stages", "decided", "finished", "state", "created"}]
    assert rows[0]["state"] == status["state"] == "finished"
    assert rows[0]["decided"] == rows[0]["stages"] == 3

    out = tmp / "model"
    exported = run_json(
        capsys, "export", "best", NAME, "--storage", url, "--out", str(out), "--quiet", "--json"
    )
    assert {"out", "recipe", "stage", "trial", "metrics", "held_out", "comparison"} <= set(exported)
    assert exported["recipe"] == status["recipe"] and exported["stage"] == "002-layer-1"
    assert [row["model"] for row in exported["comparison"]][0] == "merged (olmopt)" and len(
        exported["comparison"]
    ) == 4
    assert all({"model", "search", "held_out"} <= set(row) for row in exported["comparison"])

    rebuilt = run_json(
        capsys, "rebuild", str(out / "merge_report.json"), "--out", str(tmp / "rebuilt"), "--quiet", "--json",
        "--models-dir", str(tmp),
    )  # fmt: skip
    assert set(rebuilt) == {"out", "recipe"} and rebuilt["recipe"] == exported["recipe"]

    report = run_json(capsys, "report", NAME, "--storage", url, "--out", str(tmp / "report"), "--json")
    assert set(report) == {"name", "finished", "index", "plots"} and Path(report["index"]).is_file()


def test_exit_codes(done: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "status", "missing", "--storage", url]) == 2  # bad input
    assert capsys.readouterr().err.startswith(f"olmopt: error: no storage at {tmp_path}/s.db")
    assert not (tmp_path / "s.db").exists()  # a read-only command creates no storage
    study = yaml.safe_load(done["study"].read_text()) | {"name": "halted"}
    (tmp_path / "h.yaml").write_text(yaml.safe_dump(study))
    assert main(["study", "create", str(tmp_path / "h.yaml"), "--storage", url]) == 0
    assert (
        main(["study", "run", "halted", "--storage", url, "--timeout", "0.001", "--quiet"]) == 3
    )  # resumable
    assert "resume" in capsys.readouterr().out
    assert main([]) == 2  # no command: help, bad input


def _subparsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subparsers(sub, (*path, name))
    return found


def test_every_command_has_help_and_scripting_flags(capsys: pytest.CaptureFixture[str]) -> None:
    parsers = dict(_subparsers(build_parser()))
    commands = {" ".join(p) for p in parsers if p}
    assert {
        "study create",
        "study run",
        "study status",
        "study list",
        "export best",
        "rebuild",
        "dashboard",
        "report",
    } <= commands
    for path, parser in parsers.items():
        with pytest.raises(SystemExit) as exc:
            main([*path, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: olmopt") and "==SUPPRESS==" not in text
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"olmopt {' '.join(path)} {action.option_strings[0]}: no help text"
    for name, parser in ((" ".join(p), sub) for p, sub in parsers.items() if p):
        flags = {s for a in parser._actions for s in a.option_strings}
        if name in (
            "study status",
            "study list",
            "study create",
            "export best",
            "rebuild",
            "report",
        ) or name.startswith("merge "):
            assert "--json" in flags, f"olmopt {name} lacks --json"
        if name in ("study run", "export best", "rebuild", "report", "dashboard") or name.startswith(
            "merge "
        ):
            assert "--quiet" in flags, f"olmopt {name} lacks --quiet"
