"""optuna-dashboard on a campaign: JSON API in process, the CLI server, and a headless Chromium screenshot."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard
import pytest
import yaml
from _models import make_family, write_addition_data

from olmopt.cli import main
from olmopt.search import annotate
from olmopt.search.campaign import Campaign
from olmopt.search.storage import open_storage

CHROMIUM = Path("/usr/bin/chromium")
NAME = "dash"


def write_study(
    tmp: Path, name: str, decisions: dict[str, Any], selection: dict[str, Any] | None = None
) -> Path:
    """A study over a random 3-model family (2 layers) with two objectives on one small dataset."""
    fam = make_family(tmp, ["a", "b", "c"], layers=2)
    write_addition_data(tmp / "add.json")
    study = {
        "name": name,
        "pool": {"models": [str(fam[m]) for m in "abc"]},
        "objectives": [
            {"dataset": str(tmp / "add.json"), "metric": "token_accuracy", "name": "acc"},
            {"dataset": str(tmp / "add.json"), "metric": "perplexity", "name": "ppl"},
        ],
        "decisions": decisions,
        "selection": selection or {},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """base (auto) + joint layers (6 trials, degradation constraints against the base), run and exported."""
    tmp = tmp_path_factory.mktemp("dash")
    url = f"sqlite:///{tmp}/s.db"
    path = write_study(
        tmp,
        NAME,
        {"base": {"mode": "auto"}, "layers": {"mode": "joint", "n_trials": 6}},
        {"improve_all": "base"},
    )
    assert main(["study", "create", str(path), "--storage", url, "--json"]) == 0
    assert main(["study", "run", NAME, "--storage", url, "--quiet"]) == 0
    out = tmp / "export"
    assert (
        main(
            ["export", "best", NAME, "--storage", url, "--out", str(out), "--no-compare", "--quiet", "--json"]
        )
        == 0
    )
    annotate.annotate_export(Campaign.load(NAME, url), out)
    return {"tmp": tmp, "url": url, "out": out}


class Client:
    """Calls the dashboard's WSGI app in process (no socket)."""

    def __init__(self, url: str) -> None:
        store = annotate.artifact_store(annotate.artifact_dir_for(url))
        self.app = optuna_dashboard.wsgi(open_storage(url, heartbeat=False), artifact_store=store)

    def get(self, path: str) -> tuple[str, bytes]:
        environ: dict[str, Any] = {}
        setup_testing_defaults(environ)
        environ.update({"PATH_INFO": path, "HTTP_ACCEPT_ENCODING": "gzip"})
        status: list[str] = []
        body = b"".join(self.app(environ, lambda s, _h, _e=None: status.append(s)))
        return status[0], body

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status.startswith("200"), (path, status, body[:300])
        return json.loads(body)


def _studies(client: Client) -> dict[str, int]:
    return {s["study_name"]: s["study_id"] for s in client.json("/api/studies")["study_summaries"]}


def test_api_shows_metric_names_flat_attrs_notes_and_artifacts(campaign: dict[str, Any]) -> None:
    client = Client(campaign["url"])
    ids = _studies(client)
    assert set(ids) == {NAME, f"{NAME}/000-base", f"{NAME}/001-joint-layers"}
    stage = client.json(f"/api/studies/{ids[NAME + '/001-joint-layers']}")
    assert stage["objective_names"] == ["acc", "ppl"]
    attrs = {a["key"]: a["sortable"] for a in stage["union_user_attrs"]}
    assert attrs["m.acc"] and attrs["m.ppl"]  # numeric, so the dashboard can sort and plot them
    assert {"feasible", "recipe", "candidate"} <= set(attrs)
    assert any(k.startswith("c.acc") for k in attrs) and any(
        k.startswith("c.ppl") for k in attrs
    )  # constraints
    c = Campaign.load(NAME, campaign["url"])
    decision = c.decision(c.plan[1])  # the dashboard truncates long attrs in its JSON; read it from Optuna
    assert decision is not None
    study = optuna.load_study(study_name=f"{NAME}/001-joint-layers", storage=campaign["url"])
    assert len(stage["trials"]) == len(study.trials)  # every trial, the free (reused) ones too
    assert sum("reused" not in t.user_attrs for t in study.trials) == 6  # the budget counts evaluations
    for trial in stage["trials"]:
        (artifact,) = trial["artifacts"]
        assert artifact["filename"] == "recipe.json"
        status, body = client.get(
            f"/artifacts/{trial['study_id']}/{trial['trial_id']}/{artifact['artifact_id']}"
        )
        assert status.startswith("200")
        recipe_attr = next(a["value"] for a in trial["user_attrs"] if a["key"] == "recipe")
        assert json.loads(body) == json.loads(recipe_attr)
        selected = trial["number"] == decision.trial
        assert ("Selected: winner of stage `001-joint-layers`" in trial["note"]["body"]) is selected
    assert f"Winner: **{decision.winner}** (trial {decision.trial})" in stage["note"]["body"]
    (summary,) = stage["artifacts"]
    assert summary["filename"] == "stage-summary.json"
    status, body = client.get(f"/artifacts/{ids[NAME + '/001-joint-layers']}/{summary['artifact_id']}")
    assert json.loads(body)["winner"] == decision.winner and json.loads(body)["recipe"] == json.loads(
        decision.recipe.to_json()
    )


def test_campaign_root_has_progress_note_and_export_artifacts(campaign: dict[str, Any]) -> None:
    client = Client(campaign["url"])
    root = client.json(f"/api/studies/{_studies(client)[NAME]}")
    note = root["note"]["body"]
    assert "2 of 2 stages decided" in note and "| 001-joint-layers |" in note and "Exported to" in note
    files = {a["filename"]: a for a in root["artifacts"]}
    assert {"merge_report.json", "README.md"} <= set(files)
    status, body = client.get(
        f"/artifacts/{_studies(client)[NAME]}/{files['merge_report.json']['artifact_id']}"
    )
    assert json.loads(body) == json.loads((campaign["out"] / "merge_report.json").read_text())


def test_annotations_are_idempotent(campaign: dict[str, Any]) -> None:
    c = Campaign.load(NAME, campaign["url"])
    study = c.existing_stage_study(c.plan[1])
    assert study is not None
    annotate.annotate_decision(c, study, study.user_attrs["olmopt.decision"])  # a second worker deciding too
    stage = Client(campaign["url"]).json(f"/api/studies/{study._study_id}")
    assert [a["filename"] for a in stage["artifacts"]] == ["stage-summary.json"]


def test_artifact_dir_follows_the_storage_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(annotate.ARTIFACT_DIR_ENV, raising=False)
    assert annotate.artifact_dir_for("sqlite:///storage/olmopt.db") == Path("storage/artifacts")
    assert annotate.artifact_dir_for(f"sqlite:///{tmp_path}/x/s.db") == tmp_path / "x" / "artifacts"
    assert annotate.artifact_dir_for(f"journal:{tmp_path}/j.log") == tmp_path / "artifacts"
    assert annotate.artifact_dir_for("postgresql+psycopg://u:pw@db/optuna") == Path("storage/artifacts")
    monkeypatch.setenv(annotate.ARTIFACT_DIR_ENV, str(tmp_path / "shared"))
    assert annotate.artifact_dir_for("postgresql+psycopg://u:pw@db/optuna") == tmp_path / "shared"


def test_annotation_failure_is_logged_not_raised(
    campaign: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    c = Campaign.load(NAME, campaign["url"])
    study = c.existing_stage_study(c.plan[1])
    assert study is not None
    with caplog.at_level("WARNING"):
        assert annotate.annotate_decision(c, study, {"stage": "x"}) is None  # no winner: nothing to write
    assert "dashboard annotation annotate_decision skipped" in caplog.text


def test_dashboard_refuses_a_public_host_without_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["dashboard", "--host", "0.0.0.0", "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--i-know-there-is-no-auth" in err


def test_dashboard_needs_an_existing_sqlite_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["dashboard", "--storage", f"sqlite:///{tmp_path}/missing.db", "--port", "0"]) == 2
    assert "no storage at" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


@pytest.fixture(scope="module")
def server(campaign: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``olmopt dashboard --port 0`` as a subprocess; yields its base URL; stopped with SIGTERM."""
    cmd = [
        sys.executable,
        "-m",
        "olmopt.cli",
        "dashboard",
        "--storage",
        "sqlite:///" + campaign["url"].split("///", 1)[1],
        "--port",
        "0",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    lines = [proc.stdout.readline() for _ in range(2)]  # type: ignore[union-attr]
    assert lines[1].startswith("open http://127.0.0.1:"), lines
    base = lines[1].split()[1].removesuffix("/dashboard")
    info = {"base": base, "proc": proc, "lines": lines}
    try:
        yield info
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
    ]
    flags += ["--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=15000"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("OLMOPT_REQUIRE_CHROMIUM"),  # .ci/run requires it
    reason="needs Debian chromium at /usr/bin/chromium (apt-get install -y chromium)",
)
def test_headless_chromium_renders_the_stage_page(server: dict[str, Any], campaign: dict[str, Any]) -> None:
    """The joint stage's page renders: a non-blank screenshot,
    and a DOM that names the study and the metrics."""
    from PIL import Image

    client = Client(campaign["url"])
    study_id = _studies(client)[NAME + "/001-joint-layers"]
    page = f"{server['base']}/dashboard/studies/{study_id}"
    with tempfile.TemporaryDirectory(prefix="olmopt-chromium-") as tmp:
        shot = Path(tmp) / "shot.png"
        result = _chromium(["--window-size=1400,1000", f"--screenshot={shot}", page], Path(tmp) / "profile")
        assert shot.is_file(), result.stderr[-2000:]
        image = Image.open(shot).convert("RGB")
        assert image.size == (1400, 1000)
        colours = image.getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 200, f"screenshot looks blank: {len(colours)} colours"
        dominant = max(count for count, _ in colours)
        assert dominant < 0.9 * 1400 * 1000, "screenshot is (nearly) uniform"
        dom = _chromium(["--window-size=1400,1000", "--dump-dom", page], Path(tmp) / "profile2").stdout
        shutil.rmtree(Path(tmp) / "profile", ignore_errors=True)
    assert f"{NAME}/001-joint-layers" in dom
    assert "Pareto Front" in dom and "ppl" in dom and "acc" in dom


def test_cli_server_answers_then_stops_on_sigterm(server: dict[str, Any], campaign: dict[str, Any]) -> None:
    assert campaign["tmp"].name in server["lines"][0] and "artifacts" in server["lines"][0]
    with urllib.request.urlopen(server["base"] + "/api/studies", timeout=30) as response:
        names = {s["study_name"] for s in json.loads(response.read())["study_summaries"]}
    assert NAME in names
    request = urllib.request.Request(
        server["base"] + "/static/bundle.js", headers={"Accept-Encoding": "gzip"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and response.headers["Content-Encoding"] == "gzip"
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "dashboard stopped" in proc.stderr.read()
