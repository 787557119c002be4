"""A campaign: the study file, its stage plan and the decisions, all kept in one Optuna storage.

Layout in the storage: a root study named after the campaign holds the validated config and the plan
as user attrs; each stage is its own Optuna study ``{name}/{stage.key}`` with one objective per
(dataset, metric), and records its decision as the user attr ``olmopt.decision`` once selected.
Everything needed to resume lives in the storage: a decided stage is never recomputed. Decisions are
written and read only here (``record_decision``, ``decision``, ``decisions``, ``stage_decision``), as
``search.decision.Decision``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from olmopt import __version__
from olmopt.config import StudyConfig, default_objective_name
from olmopt.errors import StorageError
from olmopt.recipe import Recipe
from olmopt.search.decision import Decision
from olmopt.search.kind import Stage
from olmopt.search.storage import open_storage, redact

CAMPAIGN_ATTR = "olmopt.campaign"
DECISION_ATTR = "olmopt.decision"
RUN_ATTR = "olmopt.last_run"  # on the root study: {state, at, error?} of the last `study run` (any worker)
DIRECTIONS_KEY = "directions"  # in the campaign record: objective name -> minimize | maximize
STATES = ("not started", "running", "interrupted", "stopped", "failed", "finished")

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Campaign:
    """Handle on a campaign stored at ``url``."""

    name: str
    url: str
    storage: optuna.storages.BaseStorage
    config: StudyConfig
    plan: list[Stage]
    info: dict[str, Any]

    # -- creation and lookup ---------------------------------------------------------------------------
    @classmethod
    def create(cls, config: StudyConfig, url: str, plan: list[Stage], extra: dict[str, Any]) -> Campaign:
        from olmopt.search.context import directions_of

        extra = {DIRECTIONS_KEY: directions_of(config), **extra}
        storage = open_storage(url)
        if config.name in campaign_names(storage):
            raise StorageError(
                f"campaign {config.name!r} already exists in {redact(url)} (pick another name)"
            )
        info = {
            "olmopt_version": __version__,
            "config": config.model_dump(mode="json"),
            "plan": [s.to_dict() for s in plan],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        # the root study holds no trials; its directions and metric names are the objectives' (the dashboard
        # shows them on the campaign's page)
        names = [o.name or default_objective_name(o) for o in config.objectives]
        directions = extra[DIRECTIONS_KEY]
        root = optuna.create_study(
            storage=storage, study_name=config.name, directions=[directions[n] for n in names]
        )
        root.set_metric_names(names)
        root.set_user_attr(CAMPAIGN_ATTR, info)
        return cls(config.name, url, storage, config, plan, info)

    @classmethod
    def load(cls, name: str, url: str) -> Campaign:
        storage = open_storage(url, create=False)
        try:
            root = optuna.load_study(storage=storage, study_name=name)
        except KeyError:
            names = campaign_names(storage)
            there = f"campaigns there: {', '.join(names)}" if names else "it holds no campaign"
            raise StorageError(
                f"no campaign named {name!r} in {redact(url)} ({there}; pass --storage URL or set "
                "OLMOPT_STORAGE)"
            ) from None
        info = root.user_attrs.get(CAMPAIGN_ATTR)
        if not info:
            raise StorageError(f"study {name!r} in {redact(url)} is not an olmopt campaign")
        config = StudyConfig.model_validate(info["config"])
        plan = [Stage(**s) for s in info["plan"]]
        return cls(name, url, storage, config, plan, info)

    # -- stages -------------------------------------------------------------------------------------------
    def objective_names(self) -> list[str]:
        """The objectives' names (as ``search.context.objectives_of`` names them, without importing torch)."""
        return [o.name or default_objective_name(o) for o in self.config.objectives]

    def directions(self) -> dict[str, str]:
        """Objective name -> "minimize" / "maximize". Read from the campaign record (or, for campaigns
        created before it kept them, from a stage study) so that read-only commands never import torch;
        the metric registry is the last resort."""
        stored = self.info.get(DIRECTIONS_KEY)
        if stored:
            return dict(stored)
        for stage in self.plan:
            study = self.existing_stage_study(stage)
            if study is not None and study.metric_names:
                return {n: d.name.lower() for n, d in zip(study.metric_names, study.directions, strict=True)}
        from olmopt.search.context import directions_of

        return directions_of(self.config)

    def stage_study_name(self, stage: Stage) -> str:
        return f"{self.name}/{stage.key}"

    def stage_study(self, stage: Stage, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
        names = self.objective_names()
        directions = self.directions()
        study = optuna.create_study(
            storage=self.storage,
            study_name=self.stage_study_name(stage),
            directions=[optuna.study.StudyDirection[directions[n].upper()] for n in names],
            sampler=sampler,
            load_if_exists=True,
        )
        if study.metric_names is None:
            study.set_metric_names(names)
        return study

    def existing_stage_study(self, stage: Stage) -> optuna.Study | None:
        try:
            return optuna.load_study(storage=self.storage, study_name=self.stage_study_name(stage))
        except KeyError:
            return None

    def decision(self, stage: Stage) -> Decision | None:
        study = self.existing_stage_study(stage)
        return None if study is None else stage_decision(study)

    def decisions(self) -> dict[str, Decision]:
        """stage key -> decision, for decided stages (one storage round trip per stage study)."""
        return {
            key: Decision.from_dict(stored)
            for key, stored in _stored_decisions(self.name, all_studies(self.storage)).items()
        }

    def incumbent_before(self, stage: Stage, decisions: dict[str, Decision] | None = None) -> Recipe | None:
        """The Recipe decided by the last decided stage before ``stage``."""
        decisions = decisions if decisions is not None else self.decisions()
        for previous in reversed(self.plan[: stage.index]):
            if previous.key in decisions:
                return decisions[previous.key].recipe
        return None

    def final_recipe(self) -> Recipe | None:
        decisions = self.decisions()
        for stage in reversed(self.plan):
            if stage.key in decisions:
                return decisions[stage.key].recipe
        return None

    def is_finished(self) -> bool:
        decisions = self.decisions()
        return all(s.key in decisions for s in self.plan)

    def record_run(self, state: str, error: str | None = None) -> None:
        """Note on the root study how the last `study run` ended (best effort: never fails a run)."""
        record: dict[str, Any] = {"state": state, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if error:
            record["error"] = error[:300]
        try:
            self.storage.set_study_user_attr(self.storage.get_study_id_from_name(self.name), RUN_ATTR, record)
        except Exception:  # noqa: BLE001 - a status note must not mask the run's own outcome
            pass

    def state(self, decisions: Mapping[str, Any] | None = None) -> tuple[str, str | None]:
        """(one of STATES, detail): finished when every stage is decided; running while a worker runs it
        (SQLite: a `study run` of this campaign holds the file; shared storages: `live_work`); else how the
        last run ended (interrupted, also when killed without a word; stopped by --timeout; failed, with its
        error); not started when no run and no stage has begun."""
        from olmopt.search.storage import is_sqlite, sqlite_busy, stale_after

        decisions = self.decisions() if decisions is None else decisions
        if all(s.key in decisions for s in self.plan):
            return "finished", None
        root = self.storage.get_study_user_attrs(self.storage.get_study_id_from_name(self.name))
        last = root.get(RUN_ATTR) or {}
        if is_sqlite(self.url):
            if last.get("state") == "running" and sqlite_busy(self.url):
                return "running", None
        elif live_work(self, stale_after()) or (
            last.get("state") == "running" and _age(last) < stale_after()
        ):
            return "running", None  # a worker's trial beats, or a worker started lately (loading models)
        if last.get("state") in ("failed", "stopped", "interrupted"):
            return last["state"], last.get("error")
        if last.get("state") == "running":  # its process is gone without a word (killed)
            return "interrupted", None
        prefix = self.name + "/"
        if not decisions and not any(s.study_name.startswith(prefix) for s in all_studies(self.storage)):
            return "not started", None
        return "interrupted", None

    def extend_plan(
        self, specs: list[tuple[str, str]], info_update: dict[str, Any] | None = None
    ) -> list[Stage]:
        """Append stages ``(kind, target)`` to the stored plan (e.g. ``export best --refine es``)."""
        added = [Stage(len(self.plan) + i, kind, target) for i, (kind, target) in enumerate(specs)]
        self.plan = [*self.plan, *added]
        self.info = {**self.info, **(info_update or {}), "plan": [s.to_dict() for s in self.plan]}
        optuna.load_study(storage=self.storage, study_name=self.name).set_user_attr(CAMPAIGN_ATTR, self.info)
        return added


def record_decision(study: optuna.Study, decision: Decision) -> None:
    """Store ``decision`` on its stage study (what every reader of the campaign sees)."""
    study.set_user_attr(DECISION_ATTR, decision.to_dict())


def stage_decision(study: optuna.Study) -> Decision | None:
    """The decision recorded on a stage study, None while undecided."""
    return decision_in(study.user_attrs)


def decision_in(user_attrs: Mapping[str, Any]) -> Decision | None:
    """The decision among a stage study's user attrs (None: undecided)."""
    stored = user_attrs.get(DECISION_ATTR)
    return Decision.from_dict(stored) if stored else None


def _stored_decisions(name: str, summaries: list[Any]) -> dict[str, dict[str, Any]]:
    """stage key -> stored decision of campaign ``name``, from study summaries (not parsed)."""
    prefix = name + "/"
    return {
        s.study_name[len(prefix) :]: s.user_attrs[DECISION_ATTR]
        for s in summaries
        if s.study_name.startswith(prefix) and DECISION_ATTR in s.user_attrs
    }


def all_studies(storage: optuna.storages.BaseStorage, attempts: int = 5) -> list[Any]:
    """Every study with its user attrs (no trials read). Retries when a concurrent worker deletes a
    transient lock study in the middle of the listing."""
    for attempt in range(attempts):
        try:
            return storage.get_all_studies()
        except KeyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)
    return []


def delete_campaign(storage: optuna.storages.BaseStorage, name: str) -> int:
    """Delete campaign ``name``: its record study and every study under ``name/`` (stages, locks).
    Returns how many studies were deleted."""
    doomed = [
        s.study_name
        for s in all_studies(storage)
        if s.study_name == name or s.study_name.startswith(name + "/")
    ]
    for study_name in doomed:
        try:
            optuna.delete_study(study_name=study_name, storage=storage)
        except KeyError:  # a transient lock study released meanwhile
            pass
    return len(doomed)


def _age(record: dict[str, Any]) -> float:
    """Seconds since a last-run note was written (infinite when it has no readable time)."""
    import calendar

    try:
        return time.time() - calendar.timegm(time.strptime(str(record.get("at")), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return float("inf")


def live_work(campaign: Campaign, stale_after: float) -> list[str]:
    """What shows a worker running ``campaign`` on a shared storage (empty: none does): a stage lock taken
    less than ``stale_after`` s ago, or a RUNNING trial that still beats (RDB storages), that started less
    than 3 heartbeat intervals ago and has not beaten yet, or (no heartbeats: journal storages) that
    started less than ``stale_after`` s ago. SQLite needs
    none of this: its single-writer file lock says it."""
    from olmopt.search.coordination import LOCK_ATTR, heartbeat_enabled, trials_with_heartbeat

    storage = campaign.storage
    now = time.time()
    found: list[str] = []
    for s in all_studies(storage):
        if not s.study_name.startswith(campaign.name + "/"):
            continue
        stage = s.study_name[len(campaign.name) + 1 :]
        if "#" in stage:
            acquired = s.user_attrs.get(LOCK_ATTR)
            if acquired is None or now - float(acquired) < stale_after:
                found.append(f"stage {stage.split('#')[0]} is locked by a worker")
            continue
        running = storage.get_all_trials(
            s._study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
        )
        if not running:
            continue
        if heartbeat_enabled(storage):
            stale = set(storage._get_stale_trial_ids(s._study_id))
            beaten = trials_with_heartbeat(storage, [t._trial_id for t in running])
            limit = now - 3 * (storage.get_heartbeat_interval() or 30)
            alive = [
                t
                for t in running
                if (t._trial_id in beaten and t._trial_id not in stale)
                or (
                    t._trial_id not in beaten
                    and t.datetime_start is not None
                    and t.datetime_start.timestamp() > limit
                )
            ]
        else:
            alive = [
                t
                for t in running
                if t.datetime_start is not None and t.datetime_start.timestamp() > now - stale_after
            ]
        if alive:
            found.append(f"stage {stage} has {len(alive)} running trial(s)")
    return found


def campaign_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in all_studies(storage) if CAMPAIGN_ATTR in s.user_attrs]


def list_campaigns(url: str) -> list[dict[str, Any]]:
    storage = open_storage(url, create=False)
    summaries = all_studies(storage)
    out = []
    for s in summaries:
        info = s.user_attrs.get(CAMPAIGN_ATTR)
        if not info:
            continue
        decisions = _stored_decisions(s.study_name, summaries)
        decided = len(decisions)
        campaign = Campaign(
            s.study_name, url, storage, StudyConfig.model_validate(info["config"]),
            [Stage(**d) for d in info["plan"]], info,
        )  # fmt: skip
        state, _detail = campaign.state(decisions)
        out.append(
            {
                "name": s.study_name,
                "stages": len(info["plan"]),
                "decided": decided,
                "finished": decided == len(info["plan"]),
                "state": state,
                "created": info.get("created"),
            }
        )
    return out
