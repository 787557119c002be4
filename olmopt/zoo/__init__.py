"""The offline model zoo: a small homologous family (base + specialists) trained on synthetic skills."""

from olmopt.zoo.acceptance import AcceptanceError
from olmopt.zoo.build import build_zoo, cached_manifest
from olmopt.zoo.family import PINNED_SEEDS, ZOO_VERSION
from olmopt.zoo.manifest import load_manifest
from olmopt.zoo.skills import SKILLS
from olmopt.zoo.train import ARCHS, SIZES

__all__ = [
    "ARCHS",
    "PINNED_SEEDS",
    "SIZES",
    "SKILLS",
    "ZOO_VERSION",
    "AcceptanceError",
    "build_zoo",
    "cached_manifest",
    "load_manifest",
]
