"""The evaluation cache across campaigns: a re-run under a new name evaluates almost nothing, a changed
dataset file invalidates it, and two workers on PostgreSQL share it."""

from __future__ import annotations

import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from olmopt.cli import main
from olmopt.evaluate.item_scores import pack, unpack
from olmopt.search.campaign import Campaign
from olmopt.search.context import EvalContext
from olmopt.search.eval_cache import CACHE_TABLE, EvalCache
from olmopt.search.storage import open_storage

sys.path.insert(0, str(Path(__file__).parent))
from _models import make_family, write_addition_data  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache_family")
    models = make_family(root, ["a", "b", "c"], layers=3)
    write_addition_data(root / "add.json", n=16)
    return {"root": root, **models, "data": root / "add.json"}


def _study(
    family: dict[str, Path], tmp: Path, name: str, data: Path | None = None, joint: bool = True
) -> Path:
    path = tmp / f"{name}.yaml"
    merge = ", merge: {mode: joint, methods: [linear], n_trials: 4}" if joint else ""
    path.write_text(
        f"name: {name}\npool: {{models: [{family['a']}, {family['b']}, {family['c']}]}}\n"
        "objectives:\n"
        f"  - {{dataset: {data or family['data']}, metric: perplexity, name: ppl, held_out: 0.25}}\n"
        f"decisions: {{layers: {{mode: greedy}}{merge}}}\n"
        "evaluation: {batch_size: 8}\n"
    )
    return path


class Counter:
    """Counts ``EvalContext.evaluate`` calls by split (every evaluation of the campaign goes through it,
    ``score`` included)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, int] = {}
        original = EvalContext.evaluate

        def evaluate(ctx: EvalContext, recipe: Any, split: str = "search", *args: Any, **kwargs: Any) -> Any:
            self.calls[split] = self.calls.get(split, 0) + 1
            return original(ctx, recipe, split, *args, **kwargs)

        monkeypatch.setattr(EvalContext, "evaluate", evaluate)

    def take(self) -> int:
        total, self.calls = sum(self.calls.values()), {}
        return total


def _run(
    family: dict[str, Path], tmp: Path, url: str, name: str, data: Path | None = None, joint: bool = True
) -> Campaign:
    assert main(["study", "create", str(_study(family, tmp, name, data, joint)), "--storage", url]) == 0
    assert main(["study", "run", name, "--storage", url, "--quiet"]) == 0
    return Campaign.load(name, url)


def _complete(campaign: Campaign) -> list[optuna.trial.FrozenTrial]:
    out = []
    for stage in campaign.plan:
        study = campaign.existing_stage_study(stage)
        assert study is not None
        out += study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    return out


def test_rerun_under_a_new_name_evaluates_almost_nothing(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = Counter(monkeypatch)
    url = f"sqlite:///{tmp_path}/s.db"
    first = _run(family, tmp_path, url, "first")
    spent = counter.take()
    assert spent >= 10  # base, layer stages, the merge budget, held-out checks
    again = _run(family, tmp_path, url, "again")
    rerun = counter.take()
    assert rerun <= 0.05 * spent, (rerun, spent)
    # the same decisions, and every trial of the re-run took its values from the cache (or a reuse)
    assert [d.recipe for d in again.decisions().values()] == [d.recipe for d in first.decisions().values()]
    assert [d.held_out for d in again.decisions().values()] == [
        d.held_out for d in first.decisions().values()
    ]
    # the cache keeps per-item values too: selection's paired bootstrap ties decide the same way
    for field in ("significance", "intervals"):
        assert [getattr(d, field) for d in again.decisions().values()] == [
            getattr(d, field) for d in first.decisions().values()
        ]
    rules = [e["rule"] for d in again.decisions().values() for r in d.intervals.values() for e in r.values()]
    assert "bootstrap" in rules
    trials = _complete(again)
    assert trials and all(t.user_attrs.get("cached") == "first" or "reused" in t.user_attrs for t in trials)
    assert sum("cached" in t.user_attrs for t in trials) == sum(
        "reused" not in t.user_attrs for t in _complete(first)
    )
    # a cached value counts toward a joint stage's budget: the re-run took exactly the first run's trials
    assert [len(s.get_trials()) for s in map(again.existing_stage_study, again.plan) if s is not None] == [
        len(s.get_trials()) for s in map(first.existing_stage_study, first.plan) if s is not None
    ]


def test_a_changed_dataset_file_is_evaluated_again(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "add.json"
    data.write_bytes(family["data"].read_bytes())
    url = f"sqlite:///{tmp_path}/s.db"
    counter = Counter(monkeypatch)
    _run(family, tmp_path, url, "before", data)
    spent = counter.take()
    data.write_text(data.read_text().replace('"value": "2"', '"value": "3"'))  # one answer changed
    after = _run(family, tmp_path, url, "after", data)
    assert counter.take() >= spent - 1  # everything evaluated again (the budget may end one trial apart)
    assert not any("cached" in t.user_attrs for t in _complete(after))


def test_evaluation_cache_false_turns_it_off(family: dict[str, Path], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    _run(family, tmp_path, url, "one")
    study = _study(family, tmp_path, "two")
    study.write_text(study.read_text().replace("batch_size: 8}", "batch_size: 8, cache: false}"))
    assert main(["study", "create", str(study), "--storage", url]) == 0
    assert main(["study", "run", "two", "--storage", url, "--quiet"]) == 0
    assert not any("cached" in t.user_attrs for t in _complete(Campaign.load("two", url)))


def _postgres_url() -> str:
    url = os.environ.get("OLMOPT_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("OLMOPT_REQUIRE_SERVERS"):
            pytest.fail("OLMOPT_TEST_POSTGRES_URL is not set")
        pytest.skip("OLMOPT_TEST_POSTGRES_URL is not set")
    return url


@pytest.mark.server
def test_two_workers_share_the_cache_on_postgres() -> None:
    """Two workers (each its own storage connection, as on two hosts): what one puts the other gets;
    both putting one key at once stores it once, without an error."""
    url = _postgres_url()
    fingerprint = uuid.uuid4().hex  # this test's own settings: nothing from earlier runs matches
    one = EvalCache(open_storage(url).engine, fingerprint, "c1")  # type: ignore[attr-defined]
    two = EvalCache(open_storage(url).engine, fingerprint, "c2")  # type: ignore[attr-defined]
    assert two.get("sources:m1", "search") is None
    one.put("sources:m1", "search", {"ppl": 1.25, "acc": 0.5}, {"ppl": pack({0: 1.5, 1: 2.0})})
    hit = two.get("sources:m1", "search")
    assert hit is not None and hit.values == {"ppl": 1.25, "acc": 0.5} and hit.campaign == "c1"
    assert unpack(hit.items["ppl"]) == {0: 1.5, 1: 2.0}  # the per-item values travel with the values
    assert two.get("sources:m1", "held_out") is None and two.hits == 1
    other = EvalCache(one.engine, uuid.uuid4().hex, "c3")  # other data or settings: another key
    assert other.get("sources:m1", "search") is None
    barrier = threading.Barrier(2)

    def put(cache: EvalCache) -> None:
        barrier.wait()
        cache.put("sources:m2", "search", {"ppl": 2.0})

    threads = [threading.Thread(target=put, args=(c,)) for c in (one, two)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    from sqlalchemy import func, select

    with one.engine.connect() as conn:
        count = conn.execute(
            select(func.count()).where(CACHE_TABLE.c.key == one.key("sources:m2", "search"))
        ).scalar()
    hit = one.get("sources:m2", "search")
    assert count == 1 and hit is not None and hit.values == {"ppl": 2.0}
    one.put("sources:nan", "search", {"ppl": float("nan")})  # non-finite values are not cached
    assert two.get("sources:nan", "search") is None


@pytest.mark.server
def test_two_study_workers_rerun_from_the_cache_on_postgres(
    family: dict[str, Path], tmp_path: Path, cli: Any
) -> None:
    """A campaign run once on PostgreSQL, then the same study under a new name by two `study run`
    processes: every trial of the second takes the first's values from the shared cache. (Greedy stages:
    a joint stage's parallel workers sample with seeds of their own, so they suggest new models.)"""
    from olmopt.search.campaign import delete_campaign

    url = _postgres_url()
    first, again = (f"cache-{uuid.uuid4().hex[:10]}" for _ in range(2))
    try:
        _run(family, tmp_path, url, first, joint=False)
        assert (
            main(["study", "create", str(_study(family, tmp_path, again, joint=False)), "--storage", url])
            == 0
        )
        procs = [cli.start("study", "run", again, "--storage", url, "--quiet") for _ in range(2)]
        for proc in procs:
            code, err = cli.finish(proc, timeout=300)
            assert code == 0, err
        trials = _complete(Campaign.load(again, url))
        assert trials and all(t.user_attrs.get("cached") == first or "reused" in t.user_attrs for t in trials)
        assert sum("cached" in t.user_attrs for t in trials) >= 6  # 3 layers x 2 donors
        assert [d.recipe for d in Campaign.load(again, url).decisions().values()] == [
            d.recipe for d in Campaign.load(first, url).decisions().values()
        ]
    finally:
        storage = open_storage(url)
        for name in (first, again):
            delete_campaign(storage, name)


def test_partial_entries_grow_and_never_replace_a_complete_one(tmp_path: Path) -> None:
    """A stopped candidate's entry (``partial``) is replaced by one with more items or a complete one; a
    complete entry is never replaced; held-out scoring never reads a partial entry."""
    from olmopt.search.eval_cache import cached_scorer

    cache = EvalCache(open_storage(f"sqlite:///{tmp_path}/c.db").engine, uuid.uuid4().hex, "c1")  # type: ignore[attr-defined]
    cache.put("m", "search", {"acc": 0.5}, {"acc": pack({0: 1.0, 1: 0.0})}, partial=True)
    hit = cache.get("m", "search")
    assert hit is not None and hit.partial and unpack(hit.items["acc"]) == {0: 1.0, 1: 0.0}
    cache.put("m", "search", {"acc": 1.0}, {"acc": pack({0: 1.0})}, partial=True)  # fewer items: kept
    assert cache.get("m", "search").values == {"acc": 0.5}  # type: ignore[union-attr]
    cache.put("m", "search", {"acc": 2 / 3}, {"acc": pack({0: 1.0, 1: 0.0, 2: 1.0})}, partial=True)
    assert cache.get("m", "search").values == {"acc": 2 / 3}  # type: ignore[union-attr]
    cache.put("m", "search", {"acc": 0.75}, {"acc": pack({0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0})})
    hit = cache.get("m", "search")
    assert hit is not None and not hit.partial and hit.values == {"acc": 0.75}
    cache.put("m", "search", {"acc": 0.0}, {"acc": pack({i: 0.0 for i in range(9)})}, partial=True)
    assert cache.get("m", "search").values == {"acc": 0.75}  # type: ignore[union-attr]
    # held-out checks (cached_scorer) evaluate a model whose only entry is partial, and store the result
    cache.put("p", "held_out", {"acc": 0.1}, {"acc": pack({0: 0.0})}, partial=True)
    calls: list[str] = []

    def score(recipe: Any, split: str) -> dict[str, float]:
        calls.append(split)
        return {"acc": 0.9}

    scorer = cached_scorer(cache, lambda recipe: "p", score)
    assert scorer(object(), "held_out") == {"acc": 0.9} and calls == ["held_out"]  # type: ignore[arg-type]
    assert scorer(object(), "held_out") == {"acc": 0.9} and calls == ["held_out"]  # type: ignore[arg-type]
