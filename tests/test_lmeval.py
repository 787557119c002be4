"""lm-evaluation-harness objectives: equal to lm-eval's own run, campaign life cycle, held-out, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra: pip install -e '.[dev]'")

from olmopt.cli import main  # noqa: E402
from olmopt.config import load_study_file  # noqa: E402
from olmopt.errors import InputError  # noqa: E402
from olmopt.evaluate.lmeval import split_doc_ids  # noqa: E402
from olmopt.recipe import Recipe  # noqa: E402
from olmopt.search.api import campaign_status, preflight  # noqa: E402
from olmopt.search.context import EvalContext  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "objectives" / "lmeval"
ZOO_MODELS = ["base", "spec_add", "spec_rev", "spec_mc", "spec_fact"]


def objectives(mc_limit: int = 40, add_limit: int = 24) -> list[dict[str, Any]]:
    common = {"kind": "lm_eval", "include_path": str(TASKS), "apply_chat_template": True, "held_out": 0.25}
    return [
        {"name": "mc", "task": "zoo_mc", "metric": "acc", "limit": mc_limit, **common},
        {"name": "add", "task": "zoo_add", "limit": add_limit, **common},  # metric from the task
    ]


def study_file(tmp: Path, zoo: Path, name: str, objs: list[dict[str, Any]] | None = None) -> Path:
    data = {
        "name": name,
        "pool": {"models": [str(zoo / m) for m in ZOO_MODELS]},
        "objectives": objs if objs is not None else objectives(),
        "decisions": {
            "base": {"mode": "fixed", "model": str(zoo / "base")},
            "layers": {"mode": "greedy", "only": [2, 3]},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def lm_eval_reference(model_dir: Path, ids: dict[str, list[int]]) -> dict[str, Any]:
    """lm-eval's own evaluation of a model directory (``--model hf --model_args pretrained=DIR``)."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=list(ids),
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        samples=ids,
        apply_chat_template=True,
        device="cpu",
        batch_size=32,
        log_samples=True,
        bootstrap_iters=0,
    )


def assert_same_items(ctx: EvalContext, values: dict[str, float], ref: dict[str, Any]) -> None:
    """Per-item results (and the aggregate) of olmopt's lm-eval objectives equal lm-eval's own."""
    for name, task, metric in (("mc", "zoo_mc", "acc"), ("add", "zoo_add", "exact_match")):
        samples = ref["samples"][task]
        theirs = {s["doc_id"]: float(s[metric]) for s in samples}
        assert ctx.item_scores[name] == theirs
        assert values[name] == pytest.approx(float(ref["results"][task][f"{metric},none"]), abs=1e-12)
        ours = {s["doc_id"]: s for s in ctx.lm_eval.samples[name]}  # type: ignore[union-attr]
        for s in samples:
            assert [list(a) if isinstance(a, tuple) else a for a in ours[s["doc_id"]]["arguments"]] == [
                list(a) for a in s["arguments"]
            ]
            for mine, their in zip(ours[s["doc_id"]]["filtered_resps"], s["filtered_resps"], strict=True):
                if isinstance(their, (list, tuple)):  # (loglikelihood, is_greedy)
                    assert mine[0] == pytest.approx(their[0], abs=1e-4) and mine[1] == their[1]
                else:
                    assert mine == their


def test_per_item_results_equal_lm_evals_own_run_on_the_resident_model(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    config = load_study_file(study_file(tmp_path, tiny_zoo, "eq", objectives(mc_limit=60, add_limit=40)))
    preflight(config)
    assert [(o.name, o.metric, o.direction) for o in config.objectives] == [
        ("mc", "acc", "maximize"), ("add", "exact_match", "maximize"),
    ]  # fmt: skip
    ctx = EvalContext(config)
    model = ctx.working.model
    assert ctx.lm_eval is not None and ctx.lm_eval.lm.model is model  # HFLM wraps the resident model
    donor = tiny_zoo / "spec_mc"
    values = ctx.score(Recipe(base=str(donor)))  # spec_mc's weights patched into the resident base
    assert ctx.working.model is model
    ids = {"zoo_mc": sorted(ctx.item_scores["mc"]), "zoo_add": sorted(ctx.item_scores["add"])}
    assert len(ids["zoo_mc"]) == 60 and len(ids["zoo_add"]) == 40
    assert_same_items(ctx, values, lm_eval_reference(donor, ids))
    # undone: the base scores as the base, and differently from the donor
    base = ctx.score(Recipe(base=str(tiny_zoo / "base")))
    assert base["mc"] < values["mc"]


def test_held_out_documents_are_never_seen_by_the_search(tiny_zoo: Path, tmp_path: Path) -> None:
    n = 200
    search, held = (
        split_doc_ids(n, 0.25, 1234, "search", None),
        split_doc_ids(n, 0.25, 1234, "held_out", None),
    )
    assert len(held) == 50 and not set(search) & set(held) and sorted(search + held) == list(range(n))
    assert held != list(range(150, 200))  # shuffled with the seed, not the file's tail
    assert split_doc_ids(n, 0.25, 1234, "search", 30) == split_doc_ids(n, 0.25, 1234, "search", 30)
    assert set(split_doc_ids(n, 0.25, 1234, "search", 30)) <= set(search)

    config = load_study_file(study_file(tmp_path, tiny_zoo, "held", objectives(mc_limit=200, add_limit=200)))
    ctx = EvalContext(config)
    assert ctx.lm_eval is not None
    seen: list[str] = []
    lm = ctx.lm_eval.lm
    loglik, generate = lm._loglikelihood_tokens, lm.generate_until

    def spy_loglik(reqs: list[Any], **kw: Any) -> Any:
        seen.extend(r[0][0] for r in reqs)
        return loglik(reqs, **kw)

    def spy_generate(reqs: list[Any], **kw: Any) -> Any:
        seen.extend(r.args[0] for r in reqs)
        return generate(reqs, **kw)

    lm._loglikelihood_tokens, lm.generate_until = spy_loglik, spy_generate  # type: ignore[method-assign]
    for model in ZOO_MODELS[:2]:
        ctx.score(Recipe(base=str(tiny_zoo / model)))
    rows = {
        "mc": [json.loads(x)["question"] for x in (TASKS / "zoo_mc.jsonl").read_text().splitlines()],
        "add": [json.loads(x)["prompt"] for x in (TASKS / "zoo_add.jsonl").read_text().splitlines()],
    }
    prompts = {p for p in seen}
    for name, texts in rows.items():
        obj = next(o for o in ctx.objectives if o.name == name)
        assert sorted(ctx.item_scores[name]) == ctx.lm_eval.doc_ids(obj, "search") == search
        only_held = {texts[i] for i in held} - {texts[i] for i in search}
        assert only_held and not any(t in p for p in prompts for t in only_held)
    # few-shot examples drawn from the evaluated split would leak held-out documents: refused
    leaky = objectives()
    leaky[0]["num_fewshot"] = 2
    config = load_study_file(study_file(tmp_path, tiny_zoo, "leaky", leaky))
    with pytest.raises(InputError, match="held-out documents"):
        preflight(config)


def test_campaign_runs_resumes_and_exports(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    path = study_file(tmp_path, tiny_zoo, "lme")
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", "lme", "--storage", url, "--quiet", "--timeout", "0.01"]) in (0, 3)
    assert main(["study", "run", "lme", "--storage", url, "--quiet"]) == 0
    err = capsys.readouterr().err
    for chatter in (
        "Custom kwargs",
        "Running loglikelihood",
        "Building contexts",
        "lm_eval",
        "max_new_tokens",
    ):
        assert chatter not in err  # lm-eval's console output stays hidden without --verbose
    status = campaign_status("lme", url)
    assert status["finished"] and status["objectives"] == {"mc": "maximize", "add": "maximize"}
    for stage in status["stages"]:
        assert set(stage["metrics"]) == {"mc", "add"}
    # the same campaign in one go decides the same recipe
    url2 = f"sqlite:///{tmp_path}/t.db"
    assert main(["study", "create", str(path), "--storage", url2]) == 0
    assert main(["study", "run", "lme", "--storage", url2, "--quiet"]) == 0
    assert campaign_status("lme", url2)["recipe"] == status["recipe"]
    # export re-scores the winner on a fresh load (and fails if it does not reproduce), then lm-eval's own
    # run of the exported directory gives the same per-item results as the campaign's evaluation
    out = tmp_path / "merged"
    assert main(["export", "best", "lme", "--storage", url, "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert set(report["merged"]["search"]) == {"mc", "add"} and set(report["merged"]["held_out"]) == {
        "mc",
        "add",
    }
    assert (
        report["objectives"]["mc"]["lm_eval_task"] == "zoo_mc"
        and report["objectives"]["add"]["metric"] == "exact_match"
    )
    config = load_study_file(path)
    preflight(config)
    ctx = EvalContext(config)
    values = ctx.score(Recipe.model_validate(status["recipe"]))
    assert values == pytest.approx(report["merged"]["search"], abs=1e-12)
    ids = {"zoo_mc": sorted(ctx.item_scores["mc"]), "zoo_add": sorted(ctx.item_scores["add"])}
    assert_same_items(ctx, values, lm_eval_reference(out, ids))


# -- bad input: one line, exit 2, storage untouched ----------------------------------------------------
def _network_task(tmp: Path) -> Path:
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: some-org/some-dataset-on-the-hub\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )
    return tasks


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            lambda o, t: o[0].update(task="no_such_task", include_path=str(TASKS)),
            "lm_eval task 'no_such_task': unknown task",
        ),
        (lambda o, t: o[0].update(metric="bleu"), "does not produce metric 'bleu'"),
        (lambda o, t: o[0].update(include_path=str(t / "missing")), "is not a directory"),
        (
            lambda o, t: o[0].update(task="hub_task", include_path=str(_network_task(t))),
            "'hub_task' cannot be loaded offline",
        ),
        (lambda o, t: o[1].update(dataset="x.json"), "objectives.1: dataset: not a key of kind lm_eval"),
        (lambda o, t: o[1].pop("task"), "objectives.1: task: required for kind lm_eval"),
    ],
)
def test_bad_lm_eval_objectives(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Any, needle: str
) -> None:
    objs = objectives()
    edit(objs, tmp_path)
    path = study_file(tmp_path, tiny_zoo, "bad", objs)
    url = f"sqlite:///{tmp_path}/s.db"
    capsys.readouterr()
    assert main(["study", "create", str(path), "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("olmopt: error: ") and needle in err[0], err
    assert not (tmp_path / "s.db").exists() or main(["study", "list", "--storage", url, "--json"]) == 0
    assert "bad" not in capsys.readouterr().out


def test_missing_lm_eval_names_the_extra(tiny_zoo: Path, tmp_path: Path) -> None:
    fake = tmp_path / "site"
    (fake / "lm_eval").mkdir(parents=True)
    (fake / "lm_eval" / "__init__.py").write_text("raise ImportError('No module named lm_eval')\n")
    path = study_file(tmp_path, tiny_zoo, "nolm")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    db = tmp_path / "s.db"
    proc = subprocess.run(
        [sys.executable, "-m", "olmopt.cli", "study", "create", str(path), "--storage", f"sqlite:///{db}"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "olmopt[lmeval]" in lines[0], lines
    assert not db.exists() or "nolm" not in subprocess.run(
        [sys.executable, "-m", "olmopt.cli", "study", "list", "--storage", f"sqlite:///{db}", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip


def test_shipped_task_data_matches_its_generator() -> None:
    sys.path.insert(0, str(TASKS))
    try:
        import make_tasks  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(TASKS))
    mc = make_tasks.mc_rows(json.loads((REPO / "objectives/mc_choices.json").read_text()))
    add = make_tasks.generate_rows(json.loads((REPO / "objectives/add.json").read_text()))
    for name, rows in (("zoo_mc.jsonl", mc), ("zoo_add.jsonl", add)):
        assert (TASKS / name).read_text() == "".join(json.dumps(r) + "\n" for r in rows)
