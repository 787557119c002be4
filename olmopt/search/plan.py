"""The stage plan of a campaign and each stage's candidate Recipes (no Optuna here).

A greedy stage has a finite candidate set around the incumbent: every pool model's version of one slot
(base, boundary, a layer, a tensor unit). A joint stage searches several slots at once with a sampler.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from olmopt.config import StudyConfig
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import Recipe


@dataclass(frozen=True)
class Stage:
    """One decision of the campaign. ``target`` is a layer index or unit name (or '' for base/boundary)."""

    index: int
    kind: str  # base | boundary | layer | block | unit | joint-layers | joint-units | es-svd | es-norm ...
    target: str = ""  # a layer index, a block "first-last", a unit name, or ""
    n_trials: int = 0  # joint stages only
    sweep: int = 1  # greedy stages: which pass over the slots

    @property
    def key(self) -> str:
        suffix = f"-{self.target}" if self.target else ""
        again = f"-pass{self.sweep}" if self.sweep > 1 else ""
        return f"{self.index:03d}-{self.kind}{suffix}{again}"

    @property
    def is_joint(self) -> bool:
        return self.kind.startswith("joint")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def plan_stages(config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
    """Every stage in execution order."""
    stages: list[Stage] = []

    def add(kind: str, target: str = "", n_trials: int = 0, sweep: int = 1) -> None:
        stages.append(Stage(len(stages), kind, target, n_trials, sweep))

    d = config.decisions
    add("base")
    if d.merge.mode == "joint":
        add("joint-merge", n_trials=d.merge.n_trials)
    if d.boundary.mode == "greedy":
        add("boundary")
    layers = sorted(d.layers.only or range(adapter.num_layers))
    if d.layers.mode == "greedy":
        for sweep in range(1, d.layers.passes + 1):
            for width in d.layers.windows:
                for kind, target in layer_slots(layers, width, d.layers.direction):
                    add(kind, target, sweep=sweep)
        if d.layers.then_joint:
            add("joint-layers", n_trials=d.layers.then_joint)
    elif d.layers.mode == "joint":
        add("joint-layers", n_trials=d.layers.n_trials)
    units = tensor_units(config, adapter, param_names)
    if d.tensors.mode == "greedy":
        for sweep in range(1, d.tensors.passes + 1):
            for unit in units:
                add("unit", unit, sweep=sweep)
        if d.tensors.then_joint:
            add("joint-units", n_trials=d.tensors.then_joint)
    elif d.tensors.mode == "joint":
        add("joint-units", n_trials=d.tensors.n_trials)
    if d.es.svd is not None or d.es.norm is not None:
        from olmopt.search.es_space import es_stage_targets  # es_space builds on this module

        for kind, target in es_stage_targets(config, adapter, param_names):
            add(kind, target)
    if d.fusion.mode == "joint":
        add("joint-fusion", n_trials=d.fusion.n_trials)
    if d.dfs.mode == "joint":
        add("joint-dfs", n_trials=d.dfs.n_trials)
    return stages


def layer_slots(layers: list[int], width: int, direction: str) -> list[tuple[str, str]]:
    """Greedy layer slots: ``("layer", "i")`` for width 1, else ``("block", "i-j")`` for every window of
    ``width`` adjacent searched layers (stride 1), in traversal order."""
    runs: list[list[int]] = []
    for i in layers:  # windows never span a gap in ``layers.only``
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    slots: list[tuple[str, str]] = []
    for run in runs:
        for start in range(len(run) - width + 1):
            window = run[start : start + width]
            slots.append(("layer", str(window[0])) if width == 1 else ("block", f"{window[0]}-{window[-1]}"))
    return list(reversed(slots)) if direction == "backward" else slots


def block_layers(target: str) -> list[int]:
    """The layers of a block target ``"i-j"``."""
    first, _, last = target.partition("-")
    return list(range(int(first), int(last) + 1))


def tensor_units(config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[str]:
    """Units searched by tensor stages: OLM grouping, norms skipped if asked, optional layer filter."""
    t = config.decisions.tensors
    units = adapter.all_units(param_names)
    if t.skip_norm:
        units = [u for u in units if not any("norm" in part for part in u.split("."))]
    if t.only is not None:
        wanted = set(t.only)
        units = [u for u in units if adapter.layer_of(u + ".weight") in wanted]
    return list(reversed(units)) if t.direction == "backward" else units


def joint_slots(stage: Stage, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[str]:
    """Parameter names of a joint stage: ``layer.{i}`` or ``unit.{name}``."""
    if stage.kind == "joint-layers":
        return [f"layer.{i}" for i in sorted(config.decisions.layers.only or range(adapter.num_layers))]
    return [f"unit.{u}" for u in tensor_units(config, adapter, param_names)]


def apply_choice(incumbent: Recipe, slot: str, donor: str) -> Recipe:
    kind, _, target = slot.partition(".")
    return incumbent.with_layer(int(target), donor) if kind == "layer" else incumbent.with_unit(target, donor)


def current_donor(incumbent: Recipe, slot: str, adapter: ArchitectureAdapter) -> str:
    """The donor that supplies ``slot`` in the incumbent (what "keep" means)."""
    kind, _, target = slot.partition(".")
    if kind == "layer":
        return incumbent.layers.get(int(target), incumbent.base)
    if target in incumbent.units:
        return incumbent.units[target]
    layer = adapter.layer_of(target + ".weight")
    if layer is not None:
        return incumbent.layers.get(layer, incumbent.base)
    if incumbent.boundary and target in (*adapter.boundary_units(), adapter.lm_head):
        return incumbent.boundary
    return incumbent.base


def greedy_candidates(stage: Stage, incumbent: Recipe | None, pool: list[str]) -> dict[str, Recipe]:
    """Candidate label (a donor name) -> Recipe, for a greedy stage."""
    if stage.kind == "base":
        return {m: Recipe(base=m) for m in pool}
    assert incumbent is not None
    if stage.kind == "boundary":
        return {m: incumbent.model_copy(update={"boundary": m}) for m in pool}
    if stage.kind == "block":
        out: dict[str, Recipe] = {}
        for m in pool:
            recipe = incumbent
            for layer in block_layers(stage.target):
                recipe = recipe.with_layer(layer, m)
            out[m] = recipe
        if incumbent not in out.values():  # a block of mixed donors: keeping it is a candidate too
            out["incumbent"] = incumbent
        return out
    slot = f"{'layer' if stage.kind == 'layer' else 'unit'}.{stage.target}"
    return {m: apply_choice(incumbent, slot, m) for m in pool}


def prefix_layer(stage: Stage, adapter: ArchitectureAdapter) -> int | None:
    """Layer whose incoming hidden states are shared by every candidate of the stage."""
    if stage.kind == "layer":
        return int(stage.target)
    if stage.kind == "block":
        return block_layers(stage.target)[0]
    if stage.kind == "unit":
        return adapter.layer_of(stage.target + ".weight")
    return None
