"""Runner economies: same-weights candidates reuse an earlier decision's metrics; batched result writes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from olmopt.cli import main
from olmopt.patch import WorkingModel, model_key
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import EsStep, Recipe
from olmopt.search import trials as T
from olmopt.search.campaign import Campaign
from olmopt.search.storage import open_storage

sys.path.insert(0, str(Path(__file__).parent))
from _models import make_family, write_addition_data  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reuse_family")
    models = make_family(root, ["a", "b", "c"], layers=3)
    write_addition_data(root / "add.json")
    return {"root": root, **models, "data": root / "add.json"}


def test_model_key_is_equal_exactly_for_the_same_weights(family: dict[str, Path]) -> None:
    pool = ModelPool([str(family["a"]), str(family["b"])])
    a, b = pool.names
    names = WorkingModel(pool, a, device="cpu").param_names
    key = lambda r: model_key(r, pool.adapter, names)  # noqa: E731
    assert key(Recipe(base=a)) == key(Recipe(base=a, layers={1: a})) == key(Recipe(base=a, boundary=a))
    assert key(Recipe(base=a, layers={1: b})) == key(
        Recipe(base=a, layers={1: b}, units={"model.layers.1.mlp.up_proj": b})
    )
    assert key(Recipe(base=a)) != key(Recipe(base=a, layers={1: b}))
    s1 = EsStep(unit="model.layers.0.mlp.up_proj", kind="norm", sigma=0.1, seed=1)
    s2 = EsStep(unit="model.layers.0.mlp.up_proj", kind="norm", sigma=0.1, seed=2)
    assert key(Recipe(base=a, es=(s1, s2))) != key(Recipe(base=a, es=(s2, s1)))


def _splice(donor: Path, other: Path, layer: int, out: Path) -> Path:
    """A copy of ``donor`` whose layer ``layer`` is ``other``'s, bit for bit (a layer specialist trained in
    its own layers only)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(donor, out)
    tensors = load_file(out / "model.safetensors")
    theirs = load_file(other / "model.safetensors")
    prefix = f"model.layers.{layer}."
    tensors.update({k: v for k, v in theirs.items() if k.startswith(prefix)})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_content_keys_name_equal_layers_of_different_donors_as_one_model(
    family: dict[str, Path], tmp_path: Path
) -> None:
    spec = _splice(family["b"], family["a"], 0, tmp_path / "spec")  # b, with a's layer 0
    pool = ModelPool([str(family["a"]), str(family["b"]), str(spec)])
    a, b, s = pool.names
    names = WorkingModel(pool, a, device="cpu").param_names
    by_name = lambda r: model_key(r, pool.adapter, names)  # noqa: E731
    by_content = lambda r: model_key(r, pool.adapter, names, pool)  # noqa: E731
    layer0 = [n for n in names if n.startswith("model.layers.0.")]
    assert layer0 and all(pool.digest(s, n) == pool.digest(a, n) for n in layer0)
    up = "model.layers.{}.mlp.up_proj.weight"  # the noise of make_family leaves the norms' ones alike
    assert pool.digest(s, up.format(0)) != pool.digest(b, up.format(0))
    assert pool.digest(s, up.format(1)) == pool.digest(b, up.format(1)) != pool.digest(a, up.format(1))
    same = [
        (Recipe(base=a, layers={0: s}), Recipe(base=a)),  # s's layer 0 is a's
        (Recipe(base=s), Recipe(base=b, layers={0: a})),
        (Recipe(base=a, layers={1: s, 2: b}), Recipe(base=a, layers={1: b, 2: s})),
    ]
    for one, other in same:
        assert by_content(one) == by_content(other)
        assert by_name(one) != by_name(other)
    assert by_content(Recipe(base=a, layers={1: s})) != by_content(Recipe(base=a))
    step = EsStep(unit="model.layers.0.mlp.up_proj", kind="norm", sigma=0.1, seed=1)
    assert by_content(Recipe(base=s, es=(step,))) == by_content(Recipe(base=b, layers={0: a}, es=(step,)))
    assert by_content(Recipe(base=s, es=(step,))) != by_content(Recipe(base=s))


def _greedy_campaign(models: list[Path], data: Path, tmp_path: Path, held_out: str = "") -> tuple[Any, ...]:
    """Run a greedy layer campaign over ``models``: (campaign, its decisions, the pool, parameter names)."""
    study = tmp_path / "reuse.yaml"
    study.write_text(
        f"name: reuse\npool: {{models: [{', '.join(map(str, models))}]}}\n"
        f"objectives:\n  - {{dataset: {data}, metric: perplexity, name: ppl{held_out}}}\n"
        "decisions: {layers: {mode: greedy}, boundary: {mode: off}}\n"
        "evaluation: {batch_size: 8}\n"
    )
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(study), "--storage", url]) == 0
    assert main(["study", "run", "reuse", "--storage", url, "--quiet"]) == 0
    campaign = Campaign.load("reuse", url)
    pool = ModelPool([str(m) for m in models])
    return campaign, campaign.decisions(), pool, WorkingModel(pool, pool.names[0], device="cpu").param_names


def test_kept_candidate_reuses_the_incumbents_metrics(family: dict[str, Path], tmp_path: Path) -> None:
    models = [family[n] for n in "abc"]
    campaign, decisions, pool, names = _greedy_campaign(models, family["data"], tmp_path, ", held_out: 0.25")
    previous = decisions["000-base"]
    reused = 0
    for stage in campaign.plan[1:]:
        study_ = campaign.existing_stage_study(stage)
        assert study_ is not None
        incumbent_key = model_key(previous.recipe, pool.adapter, names)
        for t in study_.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            same = (
                model_key(Recipe.from_json(t.user_attrs[T.RECIPE_ATTR]), pool.adapter, names) == incumbent_key
            )
            # exactly the candidate with the incumbent's weights is not evaluated again, and its
            # metrics are the incumbent's
            assert ("reused" in t.user_attrs) == same
            if same:
                reused += 1
                assert t.user_attrs["reused"] == previous.stage
                assert t.values == [previous.metrics["ppl"]]
        d = decisions[stage.key]
        if d.recipe == previous.recipe or d.winner == "incumbent":
            assert d.held_out == previous.held_out
        previous = d
    assert reused == len(campaign.plan) - 1  # one per layer stage


def test_a_donor_with_the_incumbents_weights_in_a_layer_costs_no_evaluation(
    family: dict[str, Path], tmp_path: Path
) -> None:
    spec = _splice(family["b"], family["a"], 0, tmp_path / "spec")  # b, with a's layer 0
    models = [family["a"], family["b"], spec]
    campaign, decisions, pool, names = _greedy_campaign(models, family["data"], tmp_path)
    previous = decisions["000-base"]
    other_names = 0  # reused candidates that name other donors than the incumbent's
    for stage in campaign.plan[1:]:
        study_ = campaign.existing_stage_study(stage)
        assert study_ is not None
        for t in study_.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            recipe = Recipe.from_json(t.user_attrs[T.RECIPE_ATTR])
            same = model_key(recipe, pool.adapter, names, pool) == model_key(
                previous.recipe, pool.adapter, names, pool
            )
            assert ("reused" in t.user_attrs) == same
            if same:
                assert t.values == [previous.metrics["ppl"]]
                other_names += model_key(recipe, pool.adapter, names) != model_key(
                    previous.recipe, pool.adapter, names
                )
        previous = decisions[stage.key]
    assert other_names >= 1  # whichever base wins, one layer of another donor holds its weights


def test_result_attrs_and_constraints_land_in_one_write(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(storage=storage, study_name="w", directions=["maximize", "minimize"])
    trial = study.ask()
    T.record_result(
        trial, {"acc": 0.5, "ppl": float("inf")}, {"acc.vs_base": -0.1, "ppl.vs_base": 0.2}, False, "{}"
    )
    assert trial.user_attrs["feasible"] == 0  # the live handle sees its attrs
    study.tell(trial, [0.5, 3.0])
    frozen = study.get_trials()[0]
    assert frozen.user_attrs == {
        T.RECIPE_ATTR: "{}", "m.acc": 0.5, "m.ppl": None, "c.acc.vs_base": -0.1, "c.ppl.vs_base": 0.2,
        "feasible": 0,
    }  # fmt: skip
    assert frozen.constraints == {"acc.vs_base": -0.1, "ppl.vs_base": 0.2}  # Optuna reads them back
    with pytest.raises(ValueError, match="NaN"):
        T.record_result(study.ask(), {"acc": 0.5}, {"acc.vs_base": float("nan")}, False, "{}")


def _contexts(family: dict[str, Path], tmp_path: Path, metrics: dict[str, str]) -> tuple[Any, Any]:
    """Two EvalContexts over family a, b, c (objectives name -> metric on the addition data): one
    whose prefix cache is under test, one scoring by full forwards."""
    from olmopt.config import load_study_file
    from olmopt.search.context import EvalContext

    objectives = "".join(
        f"  - {{dataset: {family['data']}, metric: {metric}, name: {name}, held_out: 0}}\n"
        for name, metric in metrics.items()
    )
    study = tmp_path / "ctx.yaml"
    study.write_text(
        f"name: ctx\npool: {{models: [{family['a']}, {family['b']}, {family['c']}]}}\n"
        f"objectives:\n{objectives}evaluation: {{batch_size: 4}}\n"
    )
    config = load_study_file(study)
    return EvalContext(config), EvalContext(config)


def _spy_captures(monkeypatch: pytest.MonkeyPatch, cache: Any) -> list[tuple[int, int]]:
    """Record every capture pass as (layer, deepest stored input it may start from; -1: the embedding)."""
    captures: list[tuple[int, int]] = []
    real_capture = cache.capture

    def spy(layer: int, split: str = "search", start: Any = None) -> None:
        depths = [max((k for k in entry if k <= layer), default=-1) for entry in (start or {}).values()]
        captures.append((layer, min(depths, default=-1)))
        real_capture(layer, split, start)

    monkeypatch.setattr(cache, "capture", spy)
    return captures


def _score_stages(cached: Any, plain: Any, stages: list[tuple[Recipe, int, list[Recipe]]]) -> None:
    """Score every (incumbent, prefix layer, candidates) stage with the cache; values equal full forwards."""
    for incumbent, layer, candidates in stages:
        for recipe in candidates:
            got = cached.score(recipe, "search", incumbent, layer)
            want = plain.score(recipe, "search")
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (recipe, got, want)


def test_prefix_cache_follows_the_incumbent_without_new_captures(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy traversal: the winner's kept inputs become
    the next stage's prefix; values equal full forwards."""
    cached, plain = _contexts(family, tmp_path, {"ppl": "perplexity", "acc": "token_accuracy"})
    a, b, c = cached.pool.names
    captures = _spy_captures(monkeypatch, cached.prefix)
    unit = "model.layers.2.mlp.up_proj"
    stages = [  # (incumbent, prefix layer, candidates)
        (Recipe(base=a), 0, [Recipe(base=a, layers={0: b}), Recipe(base=a, layers={0: c})]),
        (
            Recipe(base=a, layers={0: c}),
            1,
            [Recipe(base=a, layers={0: c, 1: b}), Recipe(base=a, layers={0: c, 1: c})],
        ),
        (Recipe(base=a, layers={0: c, 1: b}), 2, [Recipe(base=a, layers={0: c, 1: b, 2: c})]),
        (
            Recipe(base=a, layers={0: c, 1: b, 2: c}),
            2,
            [Recipe(base=a, layers={0: c, 1: b, 2: c}, units={unit: a})],
        ),
        (
            Recipe(base=a, layers={0: c, 1: b, 2: c}, units={unit: a}),
            2,
            [Recipe(base=a, layers={0: c, 1: b, 2: c}, units={unit: b})],
        ),
        (
            Recipe(base=a, layers={0: b}),
            1,
            [Recipe(base=a, layers={0: b, 1: b})],
        ),  # never evaluated: captured
        # the winner was scored elsewhere (another worker):
        # layer 1 changed, the input of layer 1 is still valid
        (Recipe(base=a, layers={0: b, 1: c}), 2, [Recipe(base=a, layers={0: b, 1: c, 2: b})]),
    ]
    _score_stages(cached, plain, stages)
    # stages 1 and 2 use the inputs their incumbent's evaluation kept in the stage before, stages 3 and
    # 4 the captures below layer 2, which a unit change in layer 2 leaves valid; only the last
    # incumbent (evaluated earlier, but not in the stage just before) needs a full capture pass, and
    # the last one (a winner this process never evaluated) a pass from the input of layer 1 only
    assert captures == [(1, -1), (2, 1)]


def test_a_layer_0_stage_frees_the_inputs_of_losers_for_the_next_candidates(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stages without prefix (layer 0) keep only the new
    incumbent's inputs, so room stays for later candidates."""
    cached, plain = _contexts(family, tmp_path, {"acc": "token_accuracy"})
    cached.prefix.max_bytes = 6 * cached.prefix.bytes_per_layer("search")  # two full carries, then one layer
    a, b, c = cached.pool.names
    captures = _spy_captures(monkeypatch, cached.prefix)
    unit = "model.layers.0.mlp.up_proj"
    x1, x2 = Recipe(base=a, layers={0: c}, units={unit: a}), Recipe(base=a, layers={0: c}, units={unit: b})
    stages = [
        (Recipe(base=a), 0, [Recipe(base=a, layers={0: b}), Recipe(base=a, layers={0: c})]),
        (Recipe(base=a, layers={0: c}), 0, [x1, x2]),  # a unit stage in layer 0 under the new incumbent
        (
            x2,
            1,
            [Recipe(base=a, layers={0: c, 1: b}, units={unit: b})],
        ),  # x2 won: its kept inputs serve layer 1
    ]
    _score_stages(cached, plain, stages)
    assert captures == []


def test_one_worker_records_a_decision_the_others_wait_for_it(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    from olmopt.config import load_study_file
    from olmopt.search.campaign import record_decision
    from olmopt.search.coordination import StageLock
    from olmopt.search.decision import Decision
    from olmopt.search.runner import CampaignRunner, make_sampler
    from olmopt.search.workers import Evaluators

    study_file = tmp_path / "decide.yaml"
    study_file.write_text(
        f"name: decide\npool: {{models: [{family['a']}, {family['b']}]}}\n"
        f"objectives:\n  - {{dataset: {family['data']}, metric: perplexity, name: ppl, held_out: 0}}\n"
        "decisions: {layers: {mode: greedy}, boundary: {mode: off}}\n"
    )
    url = (
        f"journal:{tmp_path}/d.log"  # a storage several processes share (on SQLite one process decides alone)
    )
    assert main(["study", "create", str(study_file), "--storage", url]) == 0
    campaign = Campaign.load("decide", url)
    runner = CampaignRunner(campaign, Evaluators(load_study_file(study_file)), progress=False)
    recorded: list[str] = []
    monkeypatch.setattr(
        runner, "_record_decision", lambda study, stage, *_: (recorded.append(stage.key), {"mine": True})[1]
    )
    stage = campaign.plan[1]
    study = campaign.stage_study(stage, make_sampler(campaign, stage))

    held = StageLock(campaign.storage, f"{campaign.stage_study_name(stage)}#decide")
    assert held.acquire()  # another worker is deciding this stage
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(runner._decide(study, stage, None, None)))  # type: ignore[arg-type]
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not recorded  # waiting, not deciding itself
    theirs = Decision(stage.key, "theirs", None, Recipe(base=str(family["a"])), {"ppl": 1.5})
    record_decision(study, theirs)
    held.release()
    waiter.join(timeout=10)
    assert got == [theirs] and not recorded

    other = campaign.plan[2]
    other_study = campaign.stage_study(other, make_sampler(campaign, other))
    assert runner._decide(other_study, other, None, None) == {"mine": True}  # type: ignore[arg-type]
    assert recorded == [other.key]
    assert StageLock(campaign.storage, f"{campaign.stage_study_name(other)}#decide").acquire()  # released
