"""A per-layer stage (every layer x every donor) with and without the prefix activation cache.

Usage: python benchmarks/bench_prefix_cache.py [--zoo auto|tiny|small|random] [--layers 16] [--hidden 256]
       [--repeats 3]

Teacher-forced objectives only. With the cache, the stage captures the hidden states entering layer i
once per layer (``PrefixCache.capture(i)``, timed as part of the stage) and then evaluates each
candidate with ``evaluate(prefix=cache)``; without, every candidate runs the full forward. The
values of both runs must agree within 1e-5. A stage over L layers runs at most 2L/(L+1) times faster
(layer i skips i of L layers): 1.6x for the 4-layer tiny zoo, 1.88x for 16 layers. Target >= 1.8x.
"""

from __future__ import annotations

import argparse

from bench_candidate import Setup, load_setup, machine, median, timed

from olmopt.evaluate.engine import Evaluator
from olmopt.evaluate.prefix_cache import PrefixCache
from olmopt.patch import WorkingModel
from olmopt.recipe import Recipe
from olmopt.runtime import configure_threads


def run_stage(wm: WorkingModel, ev: Evaluator, mode: str) -> dict[tuple[int, str], dict[str, float]]:
    """Evaluate every (layer, donor) swap, layers in order.

    ``mode``: "full" (no cache) or "prefix": the engine's cache as a campaign uses it, one capture
    (of every later layer's input, in one forward) while the incumbent stays the same.
    """
    base, *donors = wm.pool.names
    values: dict[tuple[int, str], dict[str, float]] = {}
    cache = PrefixCache(ev, wm.adapter, wm.param_names)
    for layer in range(wm.adapter.num_layers):
        use_prefix = mode == "prefix" and layer > 0
        if use_prefix and not cache.use_layer(layer):
            cache.capture(layer)
        for donor in donors:
            with wm.patched(Recipe(base=base, layers={layer: donor})):
                values[layer, donor] = ev.evaluate(prefix=cache if use_prefix else None)
    return values


def greedy_traversal(setup: Setup, batch_size: int, mode: str) -> dict[tuple[int, str], dict[str, float]]:
    """A greedy layer traversal as a campaign runs it: the incumbent changes at every layer.

    Stage i evaluates every donor's layer i on top of the incumbent (the kept candidate is the
    incumbent, whose metrics a campaign reuses: not evaluated); the winner is donor i mod D, so every
    stage changes the incumbent, the case a capture-per-incumbent cache handles worst. "full": full
    forwards; "prefix": ``EvalContext.score`` with the incumbent and layer, as the runner calls it
    (captures, adoption of the winner's kept inputs, all included).
    """
    from olmopt.config import StudyConfig
    from olmopt.search.context import EvalContext

    names = setup.pool.names
    config = StudyConfig.model_validate(
        {
            "name": "bench",
            "pool": {"models": names},
            "objectives": [
                {"dataset": str(o.path), "metric": o.metric, "name": o.name, "held_out": 0.25}
                for o in setup.objectives
                if o.kind != "generate"
            ],
            "evaluation": {"batch_size": batch_size, "device": "cpu"},
        }
    )
    ctx = EvalContext(config, setup.pool)
    ctx.evaluator.prepare()
    base, *donors = ctx.pool.names
    incumbent = Recipe(base=base)
    values: dict[tuple[int, str], dict[str, float]] = {}
    for layer in range(ctx.pool.adapter.num_layers):
        for donor in donors:
            recipe = incumbent.with_layer(layer, donor)
            if mode == "prefix":  # as the runner calls it: layer 0 runs in full but keeps later inputs
                values[layer, donor] = ctx.score(recipe, "search", incumbent, layer)
            else:
                values[layer, donor] = ctx.score(recipe, "search")
        incumbent = incumbent.with_layer(layer, donors[layer % len(donors)])
    return values


def bench_greedy(setup: Setup, repeats: int, batch_size: int) -> None:
    cpu: dict[str, list[float]] = {"full": [], "prefix": []}
    out: dict[str, dict[tuple[int, str], dict[str, float]]] = {}
    for _ in range(repeats):
        for mode in cpu:

            def run(m: str = mode) -> None:
                out[m] = greedy_traversal(setup, batch_size, m)

            cpu[mode].append(timed(run)[1])
    worst = max(abs(v - out["prefix"][k][n]) for k, row in out["full"].items() for n, v in row.items())
    n = len(out["full"])
    print(
        "\n| greedy traversal (incumbent changes every stage) | CPU s | CPU ms / candidate | speed-up (CPU) |"
    )
    print("|---|---:|---:|---:|")
    for mode, label in (("full", "full forward"), ("prefix", "campaign prefix cache (captures included)")):
        c = median(cpu[mode])
        print(f"| {label} | {c:.2f} | {1000 * c / n:.1f} | {median(cpu['full']) / c:.2f}x |")
    print(f"Largest value difference vs full forward {worst:.2e} (must be <= 1e-5)")


def bench(setup: Setup, repeats: int, batch_size: int) -> None:
    wm = WorkingModel(setup.pool, setup.pool.names[0], device="cpu")
    objectives = [o for o in setup.objectives if o.kind != "generate"]
    ev = Evaluator(wm.model, setup.tokenizer, objectives, batch_size=batch_size)
    ev.prepare()
    ev.evaluate()  # warm-up
    modes = ("full", "prefix")
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    worst = 0.0
    for _ in range(repeats):
        out: dict[str, dict[tuple[int, str], dict[str, float]]] = {}
        for mode in modes:

            def stage(m: str = mode, o: dict = out) -> None:  # type: ignore[type-arg]
                o[m] = run_stage(wm, ev, m)

            w, c = timed(stage)
            wall[mode].append(w)
            cpu[mode].append(c)
        for key, full in out["full"].items():
            for name, value in full.items():
                worst = max(worst, *(abs(value - out[m][key][name]) for m in modes[1:]))
    n = wm.adapter.num_layers * (len(wm.pool.names) - 1)
    print(f"Machine: {machine()}")
    print(f"Models: {setup.label}; {n} candidates per stage, {repeats} repeats (medians)")
    print(f"Objectives: {', '.join(f'{o.name}:{o.metric}' for o in objectives)}\n")
    labels = {
        "full": "full forward (no cache)",
        "prefix": "prefix cache: one capture of every later layer's input (captures included)",
    }
    print("| per-layer stage | wall s | CPU s | CPU ms / candidate | speed-up (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for m in modes:
        w, c = median(wall[m]), median(cpu[m])
        print(f"| {labels[m]} | {w:.2f} | {c:.2f} | {1000 * c / n:.1f} | {median(cpu['full']) / c:.2f}x |")
    layers = wm.adapter.num_layers
    print(
        f"\nCeiling without capture cost 2L/(L+1) = {2 * layers / (layers + 1):.2f}x; target >= 1.8x. "
        f"Largest value difference vs full forward {worst:.2e} (must be <= 1e-5)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="auto", choices=["auto", "tiny", "small", "random"])
    parser.add_argument("--layers", type=int, default=16, help="depth of the random family (when used)")
    parser.add_argument("--hidden", type=int, default=256, help="width of the random family (when used)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    configure_threads()
    setup = load_setup(args.zoo, args.layers, args.hidden)
    bench(setup, args.repeats, args.batch_size)
    bench_greedy(setup, args.repeats, args.batch_size)


if __name__ == "__main__":
    main()
