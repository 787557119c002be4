"""What a zoo family is: the base mixture, the specialists
(skill, LR, steps, trainable layers) and pinned seeds."""

from __future__ import annotations

from dataclasses import dataclass, replace

from olmopt.errors import InputError
from olmopt.kernels import cpu_vendor
from olmopt.zoo.train import ARCHS, SIZES, TrainPlan

ZOO_VERSION = 2
MIXTURE = {"add": 2.0, "rev": 1.5, "fact": 1.0, "mc": 0.5}

# Seeds per (size, arch), tried in order when no seed is given: the family is the first one that passes
# the acceptance criteria with this CPU's zoo kernels. Generation is bit-deterministic on one CPU vendor,
# but AMD and Intel CPUs train different families from one seed (olmopt.kernels), so a list holds a seed
# verified on each vendor measured (qwen2 and tiny mistral with their own plans in family_spec). See
# docs/zoo.md "Pinned seeds".
PINNED_SEEDS: dict[tuple[str, str], tuple[int, ...]] = {
    ("tiny", "llama"): (1,),
    ("small", "llama"): (0, 6),
    ("tiny", "qwen2"): (1,),
    ("tiny", "mistral"): (3, 6),
    ("small", "qwen2"): (0, 2),
    ("small", "mistral"): (0,),
}

# The pinned seed verified to pass on each CPU vendor (olmopt.kernels.cpu_vendor), where the vendors differ:
# ``pinned_seeds`` tries it first there, so a build on that vendor does not train a family it would reject.
VENDOR_SEEDS: dict[tuple[str, str], dict[str, int]] = {
    ("small", "llama"): {"amd": 0, "intel": 6},
    ("tiny", "mistral"): {"amd": 3, "intel": 6},
    ("small", "qwen2"): {"amd": 0, "intel": 2},
}


def pinned_seeds(size: str, arch: str, vendor: str | None = None) -> tuple[int, ...]:
    """The pinned seeds of (size, arch) in the order a build tries them on ``vendor`` (default: this
    CPU's): the seed verified on that vendor first, then the others in ``PINNED_SEEDS`` order."""
    seeds = PINNED_SEEDS[(size, arch)]
    first = VENDOR_SEEDS.get((size, arch), {}).get(vendor or cpu_vendor())
    if first not in seeds:
        return seeds
    return (first, *(s for s in seeds if s != first))


@dataclass(frozen=True)
class SpecialistPlan:
    """One specialist, fine-tuned from the base in ``layers`` ("all", "lower" or "upper").

    ``plan.weights`` is ``skill`` alone, or with ``replay`` > 0 that share of each batch drawn from the
    base mixture. With ``on_top_of`` (an earlier layer specialist) it trains with that specialist's
    trained layers swapped in, but is released as the base plus its own trained layers.
    """

    name: str
    skill: str
    layers: str
    plan: TrainPlan
    replay: float = 0.0
    on_top_of: str | None = None


@dataclass(frozen=True)
class FamilySpec:
    """Everything that determines a zoo family besides the seed."""

    size: str
    arch: str
    base: TrainPlan
    specialists: tuple[SpecialistPlan, ...]
    lower: tuple[int, ...] | None = None  # the lower-layer specialist's layers; None = the lower half
    upper: tuple[int, ...] | None = None  # the upper-layer specialist's layers; None = the upper half

    @property
    def num_layers(self) -> int:
        return SIZES[self.size]["num_hidden_layers"]

    def layer_indices(self, layers: str) -> tuple[int, ...] | None:
        """Layer indices of "lower" / "upper" (default: the two halves); None for "all"."""
        half = self.num_layers // 2
        lower = self.lower if self.lower is not None else tuple(range(half))
        upper = self.upper if self.upper is not None else tuple(range(half, self.num_layers))
        return {"all": None, "lower": lower, "upper": upper}[layers]

    def scaled(self, factor: float) -> FamilySpec:
        """The same family with every step count multiplied by ``factor`` (at least 2 steps; for tests)."""

        def shrink(p: TrainPlan) -> TrainPlan:
            return replace(p, steps=max(2, int(p.steps * factor)))

        return replace(
            self,
            base=shrink(self.base),
            specialists=tuple(replace(s, plan=shrink(s.plan)) for s in self.specialists),
        )


def validate(size: str, arch: str) -> None:
    """InputError naming the bad value and the choices."""
    if size not in SIZES:
        raise InputError(f"zoo size {size!r} is not one of: {', '.join(SIZES)}")
    if arch not in ARCHS:
        raise InputError(f"zoo arch {arch!r} is not one of: {', '.join(ARCHS)}")


def replay_weights(skill: str, replay: float) -> dict[str, float]:
    """``skill`` alone, or mixed with ``replay`` of the base
    mixture (skills in mixture order, zeros dropped)."""
    if replay <= 0:
        return {skill: 1.0}
    total = sum(MIXTURE.values())
    weights = {s: replay * w / total for s, w in MIXTURE.items()}
    weights[skill] += 1 - replay
    return {s: w for s, w in weights.items() if w > 0}


def family_spec(
    size: str, arch: str, lower: tuple[int, ...] | None = None, upper: tuple[int, ...] | None = None
) -> FamilySpec:
    """The zoo recipe for ``size``/``arch`` (see docs/zoo.md for why these numbers); ``lower`` / ``upper``
    move the layer specialists to other layers (a layout variant: ``with_layers``)."""
    return with_layers(_pinned_recipe(size, arch), lower, upper)


def with_layers(spec: FamilySpec, lower: tuple[int, ...] | None, upper: tuple[int, ...] | None) -> FamilySpec:
    """``spec`` with its lower- and upper-layer specialists trained in ``lower`` / ``upper`` (None keeps
    that specialist's layers). Layout variants test whether a search relies on where the zoo puts the
    layer skills; no seed is pinned for them. InputError for an index out of range, a repeated index, an
    empty set or layers shared by the two specialists."""
    own = (spec.layer_indices("lower") or (), spec.layer_indices("upper") or ())
    lower = own[0] if lower is None else tuple(lower)
    upper = own[1] if upper is None else tuple(upper)
    n = spec.num_layers
    for role, layers in (("lower", lower), ("upper", upper)):
        if not layers:
            raise InputError(f"zoo {role} layers: give at least one layer index (0-{n - 1})")
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise InputError(f"zoo {role} layers: {bad[0]} is out of range for {spec.size} (0-{n - 1})")
        if len(set(layers)) < len(layers):
            raise InputError(f"zoo {role} layers: {list(layers)} repeats an index")
    shared = sorted(set(lower) & set(upper))
    if shared:
        raise InputError(f"zoo lower and upper layers share {shared}: each layer has one specialist")
    lower, upper = tuple(sorted(lower)), tuple(sorted(upper))
    return spec if (lower, upper) == own else replace(spec, lower=lower, upper=upper)


def _pinned_recipe(size: str, arch: str) -> FamilySpec:
    validate(size, arch)
    tiny = size == "tiny"
    base_steps, spec_steps, base_lr = (1000, 200, 3e-3) if tiny else (1000, 250, 2e-3)

    def spec(
        skill: str,
        layers: str,
        lr: float,
        replay: float = 0.0,
        on_top_of: str | None = None,
        steps: int | None = None,
    ) -> SpecialistPlan:
        plan = TrainPlan(replay_weights(skill, replay), steps or spec_steps, lr)
        return SpecialistPlan(f"spec_{skill}", skill, layers, plan, replay, on_top_of)

    specialists: tuple[SpecialistPlan, ...]
    if tiny and arch == "qwen2":
        # tied embeddings learn more slowly: with the llama plan rev and fact never take off. A longer
        # base with rev upweighted; the fact specialist gets more steps at a higher LR with replay (it
        # otherwise wrecks mc in the lower layers), and spec_mc trains on top of it, so the layer recipe
        # is spec_mc's training setup (the base's mc is near 0.95, the recipe must beat it).
        mixture = {"add": 2.0, "rev": 3.0, "fact": 1.0, "mc": 0.5}
        specialists = (spec("add", "all", 5e-4), spec("rev", "all", 5e-4))
        specialists += (
            spec("fact", "lower", 3e-3, 0.4, steps=300),
            spec("mc", "upper", 1e-3, on_top_of="spec_fact"),
        )
        return FamilySpec(size, arch, TrainPlan(mixture, 1500, base_lr), specialists)
    if tiny and arch == "mistral":
        # with the llama plan the fact specialist's lower layers cost mc, so the layer recipe's mc stays
        # below the base's; replay 0.4 keeps mc there, and 300 steps at 3e-3 still learn fact
        specialists = (spec("add", "all", 5e-4), spec("rev", "all", 5e-4))
        specialists += (spec("fact", "lower", 3e-3, 0.4, steps=300), spec("mc", "upper", 1e-3))
        return FamilySpec(size, arch, TrainPlan(dict(MIXTURE), base_steps, base_lr), specialists)
    if tiny:  # fact memorisation lives in the lower MLPs; mc is read out by the upper layers
        specialists = (spec("add", "all", 5e-4), spec("rev", "all", 5e-4))
        specialists += (spec("fact", "lower", 2e-3), spec("mc", "upper", 1e-3))
        return FamilySpec(size, arch, TrainPlan(dict(MIXTURE), base_steps, base_lr), specialists)
    # small: the base already answers mc (~0.9), so addition is the upper-layer skill. Replay of the base
    # mixture limits forgetting (task arithmetic then keeps the specialists' shared progress); the fact
    # specialist is trained on top of spec_add's upper layers, so the layer recipe is its training setup.
    # small qwen2 (tied embeddings) is undertrained after 1000 steps: a 1250-step base with addition
    # upweighted; spec_mc at twice the LR stands clear of spec_add's mc (the base's mc is 0.95); 200-step
    # specialists (spec_fact 250) shorten the build (spec_fact needs its 250 steps to be clearly best).
    qwen2 = arch == "qwen2"
    mc_lr, steps = (1e-3, 200) if qwen2 else (5e-4, spec_steps)
    specialists = (
        spec("rev", "all", 5e-4, 0.1, steps=steps),
        spec("mc", "all", mc_lr, 0.1, steps=steps),
    )
    specialists += (
        spec("add", "upper", 1e-3, 0.1, steps=steps),
        spec("fact", "lower", 1e-3, 0.4, on_top_of="spec_add"),
    )
    mixture = {"add": 3.0, "rev": 1.5, "fact": 1.0, "mc": 0.5} if qwen2 else dict(MIXTURE)
    base = TrainPlan(mixture, 1250 if qwen2 else base_steps, base_lr)
    return FamilySpec(size, arch, base, specialists, lower=(0, 1), upper=(4, 5))
