"""What optuna-dashboard and ``olmopt report`` show about a campaign, beyond values and params.

Written by the runner and the finalizer, read by the dashboard over the same storage:

- per trial: the flat user attrs of ``trials.record_result`` and the trial's Recipe as ``recipe.json``;
- per stage: a Markdown note on the winning trial and on the stage study, ``stage-summary.json``;
- per campaign (root study): a progress note, and ``merge_report.json``, ``README.md`` and
  ``donor_map.png`` of each export.

Artifacts go to a file-system artifact store whose place every command derives from the storage URL
(:func:`artifact_dir_for`). Annotation is best effort: a failure is logged, never fatal to a run.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.trial import TrialState
from optuna_dashboard import save_note

from olmopt.errors import OlmoptError
from olmopt.search.campaign import Campaign
from olmopt.search.decision import Decision
from olmopt.search.kinds import get_kind
from olmopt.search.storage import redact, sqlite_path

log = logging.getLogger(__name__)

ARTIFACT_DIR_ENV = "OLMOPT_ARTIFACT_DIR"
DEFAULT_ARTIFACT_DIR = Path("storage") / "artifacts"
RECIPE_FILE = "recipe.json"
SUMMARY_FILE = "stage-summary.json"
EXPORT_FILES = ("merge_report.json", "README.md", "donor_map.png")
MAX_ARTIFACT_BYTES = 4 * 2**20
NOTE_ROWS = 20

P = ParamSpec("P")
R = TypeVar("R")


# -- where artifacts live ---------------------------------------------------------------------------
def artifact_dir_for(url: str) -> Path:
    """$OLMOPT_ARTIFACT_DIR, else ``artifacts/`` beside a SQLite or journal file, else ./storage/artifacts."""
    env = os.environ.get(ARTIFACT_DIR_ENV)
    if env:
        return Path(env).expanduser()
    path = Path(url.removeprefix("journal:")) if url.startswith("journal:") else sqlite_path(url)
    return path.parent / "artifacts" if path is not None else DEFAULT_ARTIFACT_DIR


def artifact_store(directory: Path) -> FileSystemArtifactStore:
    """A file-system artifact store at ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(directory))


def _best_effort(func: Callable[P, R]) -> Callable[P, R | None]:
    """Annotations are for people: log a failure and let the run go on."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - losing a note must never lose a trial or a stage
            log.warning(
                "dashboard annotation %s skipped: %s",
                func.__name__,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            return None

    return wrapper


def _upload(
    store: FileSystemArtifactStore, target: optuna.Study | optuna.Trial, filename: str, data: bytes
) -> str:
    with tempfile.TemporaryDirectory(prefix="olmopt-artifact-") as tmp:
        path = Path(tmp) / filename
        path.write_bytes(data)
        return upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=target)


def _has_artifact(target: optuna.Study | optuna.Trial, filename: str) -> bool:
    return any(m.filename == filename for m in get_all_artifact_meta(target))


# -- trials and stage decisions (runner) -------------------------------------------------------------
@_best_effort
def annotate_trial(campaign: Campaign, trial: optuna.Trial, recipe_json: str) -> str | None:
    """Attach the trial's Recipe as ``recipe.json``. Call
    before ``study.tell`` (finished trials are frozen)."""
    if _has_artifact(trial, RECIPE_FILE):
        return None  # attached by an earlier call
    data = json.dumps(json.loads(recipe_json), indent=2, sort_keys=True).encode()
    return _upload(artifact_store(artifact_dir_for(campaign.url)), trial, RECIPE_FILE, data)


@_best_effort
def annotate_decision(campaign: Campaign, study: optuna.Study, decision: Decision) -> None:
    """Notes on the winning trial, the stage study and the campaign; ``stage-summary.json`` on the stage.

    Idempotent: every worker of a shared stage may call it with the same decision.
    """
    directions = campaign.directions()
    names = campaign.objective_names()
    # a study with a plain sampler: building a Trial handle must not run a sampler's before_trial hook
    handle = optuna.load_study(
        storage=study._storage, study_name=study.study_name, sampler=optuna.samplers.RandomSampler()
    )
    if decision.trial is not None:
        trial_id = next(
            (t._trial_id for t in handle.get_trials(deepcopy=False) if t.number == decision.trial), None
        )
        if trial_id is not None:
            save_note(optuna.Trial(handle, trial_id), winner_note(decision, names, directions))
    save_note(handle, stage_note(decision, names, directions))
    if not _has_artifact(handle, SUMMARY_FILE):
        summary = decision.to_dict() | {"recipe": json.loads(decision.recipe.to_json())}
        data = json.dumps(summary, indent=2, sort_keys=True, default=_json_number).encode()
        _upload(artifact_store(artifact_dir_for(campaign.url)), handle, SUMMARY_FILE, data)
    root = optuna.load_study(storage=campaign.storage, study_name=campaign.name)
    save_note(root, campaign_note(campaign, campaign.decisions()))


# -- exports (finalizer) ----------------------------------------------------------------------------
@_best_effort
def annotate_export(campaign: Campaign, out: Path) -> list[str] | None:
    """Attach an exported model's ``merge_report.json``,
    ``README.md`` and ``donor_map.png`` to the campaign."""
    store = artifact_store(artifact_dir_for(campaign.url))
    root = optuna.load_study(storage=campaign.storage, study_name=campaign.name)
    ids = []
    for filename in EXPORT_FILES:
        path = out / filename
        if not path.is_file():
            continue
        if path.stat().st_size > MAX_ARTIFACT_BYTES:
            log.warning("%s is larger than %d bytes; not attached to the dashboard", path, MAX_ARTIFACT_BYTES)
            continue
        ids.append(_upload(store, root, filename, path.read_bytes()))
    save_note(root, campaign_note(campaign, campaign.decisions(), exported=out))
    return ids


# -- Markdown notes ---------------------------------------------------------------------------------
def short_name(donor: str) -> str:
    """A donor as people read it: a local path's last component, a hub id as is."""
    return Path(donor).name if donor.startswith(("/", ".", "~")) else donor


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and value is not None else "-"


def _arrow(direction: str) -> str:
    return "↓" if direction == "minimize" else "↑"


def _metrics_table(decision: Decision, names: list[str], directions: dict[str, str]) -> list[str]:
    metrics, held = decision.metrics, decision.held_out
    rows = [f"| {n} {_arrow(directions[n])} | {_fmt(metrics.get(n))} | {_fmt(held.get(n))} |" for n in names]
    return ["| objective | search | held-out |", "|---|---|---|", *rows, ""]


def winner_note(decision: Decision, names: list[str], directions: dict[str, str]) -> str:
    head = [
        f"## Selected: winner of stage `{decision.stage}`",
        "",
        f"Reason: {decision.reason or '-'}",
        "",
    ]
    return "\n".join(head + _metrics_table(decision, names, directions))


def stage_note(decision: Decision, names: list[str], directions: dict[str, str]) -> str:
    """The stage's decision and its best candidates (all of them in ``stage-summary.json``)."""
    trial = decision.trial
    lines = [
        f"## Stage `{decision.stage}`",
        "",
        f"Winner: **{short_name(decision.winner)}**"
        + (f" (trial {trial})" if trial is not None else " (incumbent kept)"),
        "",
        f"Reason: {decision.reason or '-'}",
        "",
        *_metrics_table(decision, names, directions),
    ]
    candidates = decision.candidates
    if candidates:
        signs = {n: 1.0 if directions[n] == "minimize" else -1.0 for n in names}
        ranked = sorted(
            candidates.items(),
            key=lambda kv: (not kv[1].feasible, *(_key(kv[1].metrics.get(n), signs[n]) for n in names)),
        )
        lines += [
            f"Candidates ({len(candidates)}; the first {min(NOTE_ROWS, len(candidates))}, feasible first, by "
            f"{', '.join(names)}):",
            "",
            "| candidate | trial | feasible | "
            + " | ".join(f"{n} {_arrow(directions[n])}" for n in names)
            + " |",
            "|---" * (3 + len(names)) + "|",
        ]
        for label, c in ranked[:NOTE_ROWS]:
            cells = " | ".join(_fmt(c.metrics.get(n)) for n in names)
            lines.append(f"| {short_name(label)} | {c.trial} | {'yes' if c.feasible else 'no'} | {cells} |")
    if decision.pruned:  # early stopping (docs/early_stop.md): partial metrics on their trials, never winners
        lines += ["", f"Stopped early (PRUNED, {len(decision.pruned)}):", ""]
        lines += [f"- {short_name(label)}: {why}" for label, why in sorted(decision.pruned.items())]
    return "\n".join(lines) + "\n"


def _key(value: float | None, sign: float) -> float:
    return math.inf if value is None or math.isnan(value) else sign * value


def campaign_note(campaign: Campaign, decisions: dict[str, Decision], exported: Path | None = None) -> str:
    names = campaign.objective_names()
    directions = campaign.directions()
    done = sum(1 for s in campaign.plan if s.key in decisions)
    lines = [
        f"## Campaign `{campaign.name}`",
        "",
        f"{done} of {len(campaign.plan)} stages decided. Storage: `{redact(campaign.url)}`.",
        "",
        "| stage | winner | " + " | ".join(f"{n} {_arrow(directions[n])}" for n in names) + " |",
        "|---" * (2 + len(names)) + "|",
    ]
    for stage in campaign.plan:
        d = decisions.get(stage.key)
        if d is None:
            lines.append(f"| {stage.key} | (pending) | " + " | ".join("-" for _ in names) + " |")
            continue
        lines.append(
            f"| {stage.key} | {short_name(d.winner)} | "
            + " | ".join(_fmt(d.metrics.get(n)) for n in names)
            + " |"
        )
    if exported is not None:
        lines += [
            "",
            f"Exported to `{exported}`: `merge_report.json`, `README.md` and the donor map are attached "
            "below.",
        ]
    return "\n".join(lines) + "\n"


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


# -- data for reports -------------------------------------------------------------------------------
REPORT_DECISION_KEYS = (
    "winner", "trial", "reason", "metrics", "held_out", "candidates", "ties", "intervals", "runner_up",
    "incumbent_label",
)  # fmt: skip


def campaign_report_data(name: str, url: str) -> dict[str, Any]:
    """Everything ``olmopt report`` draws, JSON-ready (no Optuna objects)."""
    campaign = Campaign.load(name, url)
    names = campaign.objective_names()
    decisions = campaign.decisions()
    stages = []
    for stage in campaign.plan:
        d = decisions.get(stage.key)
        entry: dict[str, Any] = {
            "key": stage.key,
            "kind": stage.kind,
            "target": stage.target,
            "state": "decided" if d else "pending",
            "plot": get_kind(stage.kind).report_plot,
            "decision": None
            if d is None
            else {k: v for k, v in d.to_dict().items() if k in REPORT_DECISION_KEYS},
            "points": [],
        }
        if get_kind(stage.kind).plots_trials:
            study = campaign.existing_stage_study(stage)
            if study is not None:
                entry["state"] = entry["state"] if d else "running"
                entry["points"] = list(_points(study, names))
        stages.append(entry)
    recipe = campaign.final_recipe()
    num_layers, units = _layout(campaign, decisions)
    return {
        "name": name,
        "storage": redact(url),
        "created": campaign.info.get("created"),
        "olmopt_version": campaign.info.get("olmopt_version"),
        "objectives": campaign.directions(),
        "pool": list(campaign.config.pool.models),
        "finished": all(s["state"] == "decided" for s in stages),
        "stages": stages,
        "recipe": recipe.to_dict() if recipe else None,
        "num_layers": num_layers,
        "units": units,
    }


def _points(study: optuna.Study, names: list[str]) -> Iterator[dict[str, Any]]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials} if len(names) > 1 else set()
    for t in complete:
        yield {
            "number": t.number,
            "values": dict(zip(names, t.values or [], strict=False)),
            "feasible": bool(t.user_attrs.get("feasible", True)),
            "pareto": t.number in front,
            "label": str(t.user_attrs.get("candidate", "")),
        }


def _layout(campaign: Campaign, decisions: dict[str, Decision]) -> tuple[int, list[str]]:
    """(number of layers, unit names) from the pool's files, else from the plan and the recipes."""
    try:
        from olmopt.search.context import open_pool

        pool = open_pool(campaign.config)
        adapter = pool.adapter
        return adapter.num_layers, adapter.all_units(pool[campaign.config.base_model].checkpoint.keys())
    except OlmoptError as exc:
        log.info("pool not readable (%s); donor map from the plan and recipes only", exc)
    layers: set[int] = set()
    units: dict[str, None] = {}
    for stage in campaign.plan:
        if stage.kind == "layer":
            layers.add(int(stage.target))
        elif stage.kind == "unit":
            units[stage.target] = None
    for d in decisions.values():
        layers.update(d.recipe.layers)
        units.update(dict.fromkeys(d.recipe.units))
    for unit in units:
        index = unit_layer(unit)
        if index is not None:
            layers.add(index)
    return (max(layers) + 1 if layers else 0), list(units)


def unit_layer(unit: str) -> int | None:
    """Layer index of a unit name such as ``model.layers.3.mlp.up_proj`` (None for boundary units)."""
    parts = unit.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
