"""Zoo kernels: the same float results on every CPU of one vendor, whatever its vector units.

PyTorch picks its CPU kernels by the widest vector unit it finds (AVX-512 on recent AMD and Intel
parts, AVX2 on older ones), and MKL does the same for matrix products. The two give slightly different
rounding, and the zoo's skills are learned by sudden jumps, so a family trained with AVX-512 kernels is
a different family (measured: tiny llama seed 1 fails acceptance with AVX-512 kernels and passes with
AVX2 ones). Zoo builds therefore run torch's AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``).

Matrix products are MKL's, and no MKL setting gives the same floats on AMD and Intel CPUs (measured
2026-12-05, docs/zoo.md "Portable CPU kernels"): MKL's ``COMPATIBLE`` branch exists on both but
differs between them, and on AMD MKL ignores its other reproducibility settings (``MKL_VERBOSE`` shows
``CNR:AUTO`` for ``MKL_CBWR=AVX2``). So Intel (and other) CPUs use the ``COMPATIBLE`` branch, which is
the same across Intel generations, and AMD CPUs use MKL's default path, which every AMD build since the
zoo's first version used (the families pinned on AMD reproduce score for score). The build key records
which (``portable_kernels_key``), and pinned seeds are lists whose first passing seed is the family
(``olmopt.zoo.family.PINNED_SEEDS``). Both variables are read once, when torch first dispatches a
kernel, so they must be set before torch is used; ``portable_kernels_active`` tells whether the torch
half took.

This module imports torch only inside ``cpu_capability``/``portable_kernels_active``.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

PORTABLE_CAPABILITY = "AVX2"


@functools.cache
def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="replace") if path.exists() else ""


def cpu_vendor() -> str:
    """``amd``, ``intel`` or ``other`` (read off /proc/cpuinfo; ``other`` where there is none)."""
    info = _cpuinfo()
    return "amd" if "AuthenticAMD" in info else "intel" if "GenuineIntel" in info else "other"


def _mkl_branch() -> str:
    return "AUTO" if cpu_vendor() == "amd" else "COMPATIBLE"


def portable_cpu_env() -> dict[str, str]:
    """The environment a zoo build computes with on this CPU."""
    return {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": _mkl_branch()}


def portable_kernels_key() -> str:
    """What a zoo build key records for builds with this CPU's kernels (a change rebuilds cached zoos)."""
    return "AVX2/MKL-AUTO/AMD" if _mkl_branch() == "AUTO" else "AVX2/MKL-COMPATIBLE"


def request_portable_kernels() -> None:
    """Ask for the portable kernels (effective only if torch has not dispatched a CPU kernel yet)."""
    for name, value in portable_cpu_env().items():
        os.environ.setdefault(name, value)


def cpu_has_avx2() -> bool:
    """An x86-64 CPU with AVX2 (Linux: read off /proc/cpuinfo; elsewhere: assumed for x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    info = _cpuinfo()
    return not info or " avx2" in info


def cpu_capability() -> str:
    """The kernel family torch dispatches to in this process (``AVX2``, ``AVX512``, ``DEFAULT`` ...)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def portable_kernels_active() -> bool:
    """True when this process computes with the portable kernels, or when the CPU cannot (not x86-64 AVX2)."""
    return not cpu_has_avx2() or cpu_capability() == PORTABLE_CAPABILITY
