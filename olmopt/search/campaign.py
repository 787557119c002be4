"""A campaign: the study file, its stage plan and the decisions, all kept in one Optuna storage.

Layout in the storage: a root study named after the campaign holds the validated config and the plan
as user attrs; each stage is its own Optuna study ``{name}/{stage.key}`` with one objective per
(dataset, metric), and records its decision as the user attr ``olmopt.decision`` once selected.
Everything needed to resume lives in the storage: a decided stage is never recomputed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import optuna

from olmopt import __version__
from olmopt.config import StudyConfig
from olmopt.errors import StorageError
from olmopt.recipe import Recipe
from olmopt.search.plan import Stage
from olmopt.search.storage import open_storage, redact, storage_exists

CAMPAIGN_ATTR = "olmopt.campaign"
DECISION_ATTR = "olmopt.decision"

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
        storage = open_storage(url)
        if config.name in campaign_names(storage):
            raise StorageError(f"campaign {config.name!r} already exists in {redact(url)} (pick another name)")
        info = {
            "olmopt_version": __version__,
            "config": config.model_dump(mode="json"),
            "plan": [s.to_dict() for s in plan],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        root = optuna.create_study(storage=storage, study_name=config.name, direction="minimize")
        root.set_user_attr(CAMPAIGN_ATTR, info)
        return cls(config.name, url, storage, config, plan, info)

    @classmethod
    def load(cls, name: str, url: str) -> Campaign:
        if not storage_exists(url):  # never create a storage only to find it empty
            raise StorageError(f"no campaign named {name!r} in {redact(url)} (that storage does not exist)")
        storage = open_storage(url)
        try:
            root = optuna.load_study(storage=storage, study_name=name)
        except KeyError:
            raise StorageError(f"no campaign named {name!r} in {redact(url)} (see `olmopt study list`)") from None
        info = root.user_attrs.get(CAMPAIGN_ATTR)
        if not info:
            raise StorageError(f"study {name!r} in {redact(url)} is not an olmopt campaign")
        config = StudyConfig.model_validate(info["config"])
        plan = [Stage(**s) for s in info["plan"]]
        return cls(name, url, storage, config, plan, info)

    # -- stages -------------------------------------------------------------------------------------------
    def objective_names(self) -> list[str]:
        from olmopt.search.context import objectives_of

        return [o.name for o in objectives_of(self.config)]

    def directions(self) -> dict[str, str]:
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
            directions=[directions[n] for n in names],
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

    def decision(self, stage: Stage) -> dict[str, Any] | None:
        study = self.existing_stage_study(stage)
        return None if study is None else study.user_attrs.get(DECISION_ATTR)

    def decisions(self) -> dict[str, dict[str, Any]]:
        """stage key -> decision, for decided stages (one storage round trip per stage study)."""
        out = {}
        for summary in all_studies(self.storage):
            prefix = self.name + "/"
            if summary.study_name.startswith(prefix) and DECISION_ATTR in summary.user_attrs:
                out[summary.study_name[len(prefix) :]] = summary.user_attrs[DECISION_ATTR]
        return out

    def incumbent_before(self, stage: Stage, decisions: dict[str, dict[str, Any]] | None = None) -> Recipe | None:
        """The Recipe decided by the last decided stage before ``stage``."""
        decisions = decisions if decisions is not None else self.decisions()
        for previous in reversed(self.plan[: stage.index]):
            if previous.key in decisions:
                return Recipe.from_json(decisions[previous.key]["recipe"])
        return None

    def final_recipe(self) -> Recipe | None:
        decisions = self.decisions()
        for stage in reversed(self.plan):
            if stage.key in decisions:
                return Recipe.from_json(decisions[stage.key]["recipe"])
        return None

    def is_finished(self) -> bool:
        decisions = self.decisions()
        return all(s.key in decisions for s in self.plan)

    def extend_plan(self, specs: list[tuple[str, str]], info_update: dict[str, Any] | None = None) -> list[Stage]:
        """Append stages ``(kind, target)`` to the stored plan (e.g. ``export best --refine es``)."""
        added = [Stage(len(self.plan) + i, kind, target) for i, (kind, target) in enumerate(specs)]
        self.plan = [*self.plan, *added]
        self.info = {**self.info, **(info_update or {}), "plan": [s.to_dict() for s in self.plan]}
        optuna.load_study(storage=self.storage, study_name=self.name).set_user_attr(CAMPAIGN_ATTR, self.info)
        return added


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
    doomed = [s.study_name for s in all_studies(storage) if s.study_name == name or s.study_name.startswith(name + "/")]
    for study_name in doomed:
        try:
            optuna.delete_study(study_name=study_name, storage=storage)
        except KeyError:  # a transient lock study released meanwhile
            pass
    return len(doomed)


def campaign_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [
        s.study_name
        for s in all_studies(storage)
        if CAMPAIGN_ATTR in s.user_attrs
    ]


def list_campaigns(url: str) -> list[dict[str, Any]]:
    if not storage_exists(url):  # nothing to list, and nothing to create
        return []
    storage = open_storage(url)
    summaries = all_studies(storage)
    out = []
    for s in summaries:
        info = s.user_attrs.get(CAMPAIGN_ATTR)
        if not info:
            continue
        prefix = s.study_name + "/"
        decided = sum(1 for t in summaries if t.study_name.startswith(prefix) and DECISION_ATTR in t.user_attrs)
        out.append(
            {
                "name": s.study_name,
                "stages": len(info["plan"]),
                "decided": decided,
                "finished": decided == len(info["plan"]),
                "created": info.get("created"),
            }
        )
    return out


