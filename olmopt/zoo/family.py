"""What a zoo family is: the base mixture, the specialists (skill, LR, steps, trainable layers) and pinned seeds."""

from __future__ import annotations

from dataclasses import dataclass, replace

from olmopt.errors import InputError
from olmopt.zoo.train import ARCHS, SIZES, TrainPlan

ZOO_VERSION = 1
MIXTURE = {"add": 2.0, "rev": 1.5, "fact": 1.0, "mc": 0.5}

# Default seed per (size, arch). llama seeds are verified to pass the acceptance criteria (generation is
# bit-deterministic); no qwen2/mistral seed has passed yet (seeds 1-4 tried on tiny: rev never takes off
# in their bases), so those builds are written but exit 1 unless --no-check. See docs/zoo.md.
PINNED_SEEDS: dict[tuple[str, str], int] = {
    ("tiny", "llama"): 1,
    ("small", "llama"): 0,
    ("tiny", "qwen2"): 1,
    ("tiny", "mistral"): 3,
    ("small", "qwen2"): 0,
    ("small", "mistral"): 0,
}


@dataclass(frozen=True)
class SpecialistPlan:
    """One specialist: fine-tuned from the base on ``skill`` only, in ``layers`` ("all", "lower" or "upper")."""

    name: str
    skill: str
    layers: str
    plan: TrainPlan


@dataclass(frozen=True)
class FamilySpec:
    """Everything that determines a zoo family besides the seed."""

    size: str
    arch: str
    base: TrainPlan
    specialists: tuple[SpecialistPlan, ...]

    @property
    def num_layers(self) -> int:
        return SIZES[self.size]["num_hidden_layers"]

    def layer_indices(self, layers: str) -> tuple[int, ...] | None:
        """Layer indices of "lower" / "upper" halves; None for "all"."""
        half = self.num_layers // 2
        return {"all": None, "lower": tuple(range(half)), "upper": tuple(range(half, self.num_layers))}[
            layers
        ]

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


def family_spec(size: str, arch: str) -> FamilySpec:
    """The zoo recipe for ``size``/``arch`` (see docs/zoo.md for why these numbers)."""
    validate(size, arch)
    tiny = size == "tiny"
    base_steps, spec_steps, base_lr = (1000, 200, 3e-3) if tiny else (1000, 250, 2e-3)

    def spec(skill: str, layers: str, lr: float) -> SpecialistPlan:
        return SpecialistPlan(f"spec_{skill}", skill, layers, TrainPlan({skill: 1.0}, spec_steps, lr))

    if tiny:  # fact memorisation lives in the lower MLPs; mc is read out by the upper layers
        specialists = (spec("add", "all", 5e-4), spec("rev", "all", 5e-4))
        specialists += (spec("fact", "lower", 2e-3), spec("mc", "upper", 1e-3))
    else:  # the small base already answers mc (~0.9): addition is the upper-layer skill there
        specialists = (spec("rev", "all", 5e-4), spec("mc", "all", 5e-4))
        specialists += (spec("fact", "lower", 5e-4), spec("add", "upper", 1e-3))
    return FamilySpec(size, arch, TrainPlan(dict(MIXTURE), base_steps, base_lr), specialists)
