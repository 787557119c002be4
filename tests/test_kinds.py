"""Decision kinds: the registry, the conformance kit over every registered kind, a plug-in kind from a
temporary module run in a campaign, and the package's import rules (no cycle, no torch where not needed)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from olmopt.cli import main
from olmopt.config import load_study_file
from olmopt.recipe import Recipe
from olmopt.search.kinds import get_kind, registered, unregister_kind
from olmopt.testing.kinds import check_all, check_kind
from tests.test_study import study_file

REPO = Path(__file__).resolve().parents[1]
BUILT_IN = {
    "base", "boundary", "layer", "block", "unit", "joint-layers", "joint-units", "joint-merge",
    "joint-fusion", "joint-dfs", "es-svd", "es-norm", "es-tune-svd", "es-tune-norm", "polish-layer",
    "polish-unit", "polish-boundary", "joint-merge-challenge",
}  # fmt: skip


def test_every_built_in_stage_kind_is_registered_once_in_plan_order() -> None:
    names = [name for kind in registered() for name in kind.stage_kinds]
    assert set(names) >= BUILT_IN and len(names) == len(set(names))
    orders = [kind.order for kind in registered()]
    assert orders == sorted(orders)
    assert get_kind("block") is get_kind("layer") and get_kind("es-norm") is get_kind("es-svd")
    assert {n for n in BUILT_IN if get_kind(n).joint} == {n for n in BUILT_IN if n.startswith("joint")}
    with pytest.raises(Exception, match="not registered"):
        get_kind("no-such-kind")


@pytest.fixture(scope="module")
def every_kind_env(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A config that plans every built-in kind on the tiny zoo, and the env a stage is built with."""
    from olmopt.search.context import EvalContext

    tmp = tmp_path_factory.mktemp("kinds")
    unit = "model.layers.1.mlp.down_proj"
    path = study_file(
        tmp, tiny_zoo, "every",
        merge={"mode": "joint", "n_trials": 4},
        boundary={"mode": "greedy"},
        layers={"mode": "greedy", "windows": [2, 1], "passes": 2, "then_joint": 3, "polish": 1},
        tensors={"mode": "greedy", "only": [1], "then_joint": 3, "polish": 1},
        es={"svd": {"units": [unit], "tune": {"trials": 2}},
            "norm": {"units": [unit], "generations": 2, "tune": {"trials": 2}}},
        fusion={"mode": "joint", "n_trials": 3, "calibration_samples": 8},
        dfs={"mode": "joint", "n_trials": 3, "repetitions": 1},
    )  # fmt: skip
    config = load_study_file(path)
    context = EvalContext(config)
    pool = context.pool
    names = pool[config.base_model].checkpoint.keys()
    return SimpleNamespace(
        config=config, pool_names=pool.names, adapter=pool.adapter, param_names=names, context=context,
        pool=pool, decisions={},
    )  # fmt: skip


def test_conformance_kit_over_every_registered_kind(every_kind_env: Any) -> None:
    from olmopt.config import BoundaryDecision

    checked = check_all(every_kind_env)
    planned = {stage.kind for stages in checked.values() for stage in stages}
    # the boundary searched inside the joint layer stage (and polished after it) excludes its greedy stage
    config = every_kind_env.config
    joint = config.decisions.model_copy(update={"boundary": BoundaryDecision(mode="joint")})
    env = SimpleNamespace(
        **{**vars(every_kind_env), "config": config.model_copy(update={"decisions": joint})}
    )
    planned |= {stage.kind for stage in check_kind(get_kind("polish-boundary"), env)}
    # the merge as a challenger after the layers instead of a donor before them, yielding its trials to
    # the joint layer stage when that stage has not moved (an extension of its budget); that stage
    # warm-started with block starts too (warm_blocks: 2, the main job's)
    merge = config.decisions.merge.model_copy(update={"mode": "challenge", "yield_to_layers": True})
    layers = config.decisions.layers.model_copy(update={"mode": "joint", "n_trials": 3, "warm_blocks": 2})
    challenge = config.decisions.model_copy(update={"merge": merge, "layers": layers})
    env = SimpleNamespace(
        **{**vars(every_kind_env), "config": config.model_copy(update={"decisions": challenge})}
    )
    planned |= {stage.kind for stage in check_kind(get_kind("joint-merge-challenge"), env)}
    extended = check_kind(get_kind("joint-layers"), env)
    assert extended and all(s.kind == "joint-layers" for s in extended)
    space = get_kind("joint-layers").build(extended[0], Recipe(base=config.base_model), env)
    assert any(label.startswith("block1-") for label, _ in space.enqueue)
    assert planned >= BUILT_IN  # the configs really exercise every built-in kind


def test_conformance_kit_names_the_broken_rule(every_kind_env: Any) -> None:
    from olmopt.search.kinds.swap import LayerKind, swap_space

    class Drifting(LayerKind):
        calls = 0

        def build(self, stage, incumbent, env):  # type: ignore[no-untyped-def]
            space = swap_space(stage, incumbent, env)
            Drifting.calls += 1
            space.enqueue = space.enqueue[: 1 + Drifting.calls % 2]  # differs from one call to the next
            return space

    with pytest.raises(AssertionError, match="enqueues different candidates"):
        check_kind(Drifting(), every_kind_env)


TOY_KIND = '''
"""A toy decision kind: the boundary donor taken from the last pool model, or kept."""

from __future__ import annotations

from olmopt.recipe import Recipe
from olmopt.search.kind import DecisionKind, StageSpace, planned
from olmopt.search.kind_registry import register_kind


class LastDonorKind(DecisionKind):
    stage_kinds = ("toy-last",)
    order = 25  # after the boundary, before the layers

    def plan(self, config, adapter, param_names):
        return [planned("toy-last")]

    def build(self, stage, incumbent, env):
        candidates = {
            "keep": incumbent,
            "last": incumbent.model_copy(update={"boundary": env.pool_names[-1]}),
        }

        def decode(trial):
            label = str(trial.suggest_categorical("choice", list(candidates)))
            return label, candidates[label]

        return StageSpace(decode=decode, enqueue=[(label, {"choice": label}) for label in candidates])


KIND = register_kind(LastDonorKind())
'''


def test_a_kind_from_a_new_module_runs_in_a_campaign(
    tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "toy_kind.py").write_text(TOY_KIND)
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_kind  # type: ignore[import-not-found]

    try:
        url = f"sqlite:///{tmp_path}/s.db"
        path = study_file(
            tmp_path, tiny_zoo, "toy", boundary={"mode": "off"}, layers={"mode": "greedy", "only": [3]}
        )
        assert main(["study", "create", str(path), "--storage", url]) == 0
        assert main(["study", "run", "toy", "--storage", url, "--quiet"]) == 0
        import optuna

        from olmopt.search.api import campaign_status

        status = campaign_status("toy", url)
        assert [s["stage"] for s in status["stages"]] == ["000-base", "001-toy-last", "002-layer-3"]
        assert status["finished"]
        study = optuna.load_study(study_name="toy/001-toy-last", storage=url)
        assert sorted(t.user_attrs["candidate"] for t in study.trials) == ["keep", "last"]
        decision = study.user_attrs["olmopt.decision"]
        assert decision["winner"] in ("keep", "last")
        config = load_study_file(path)
        env = SimpleNamespace(config=config, pool_names=list(config.pool.models), decisions={})
        from olmopt.pool.model_pool import ModelPool

        pool = ModelPool(config.pool.models)
        env.adapter, env.param_names = pool.adapter, pool[config.base_model].checkpoint.keys()
        check_kind("toy-last", env)  # the kit accepts it too
    finally:
        unregister_kind(toy_kind.KIND)
        sys.modules.pop("toy_kind", None)


# -- import rules -------------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """olmopt modules ``path`` imports, at module or function level (``if TYPE_CHECKING:`` blocks aside)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_in_the_package() -> None:
    paths = {_module_name(p): p for p in (REPO / "olmopt").rglob("*.py")}
    graph = {name: _imports(path, set(paths)) for name, path in paths.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_select_and_the_search_space_modules_do_not_import_torch() -> None:
    modules = ["olmopt.select", "olmopt.search.plan", "olmopt.search.kinds"]
    modules += [f"olmopt.search.kinds.{p.stem}" for p in (REPO / "olmopt/search/kinds").glob("*.py")]
    code = textwrap.dedent(
        f"""
        import sys
        for name in {modules!r}:
            __import__(name)
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout[:300]
