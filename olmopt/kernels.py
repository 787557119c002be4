"""Portable CPU kernels: the same float results on every x86-64 CPU, whatever its vector units.

PyTorch picks its CPU kernels by the widest vector unit it finds (AVX-512 on recent AMD and Intel
parts, AVX2 on older ones), and MKL does the same for matrix products. The two give slightly different
rounding, and the zoo's skills are learned by sudden jumps, so a family trained with AVX-512 kernels is
a different family (measured: tiny llama seed 1 fails acceptance with AVX-512 kernels and passes with
AVX2 ones). MKL's own AVX2 paths still differ between vendors (the same seed built with
``MKL_CBWR=AVX2`` on an AMD EPYC passed and on an Intel Xeon failed acceptance), so matrix products use
MKL's ``COMPATIBLE`` branch, which is the same on every x86-64 CPU. The zoo is therefore built with
torch's AVX2 kernels and MKL's compatible ones (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``). Both are read once, when torch first dispatches a
kernel, so they must be set before torch is used; ``portable_kernels_active`` tells whether they took.

This module imports torch only inside ``portable_kernels_active``.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

PORTABLE_CPU_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
PORTABLE_CAPABILITY = "AVX2"
# what a zoo build key records for builds with these kernels (a change rebuilds cached zoos)
PORTABLE_KERNELS_KEY = "AVX2/MKL-COMPATIBLE"


def request_portable_kernels() -> None:
    """Ask for the portable kernels (effective only if torch has not dispatched a CPU kernel yet)."""
    for name, value in PORTABLE_CPU_ENV.items():
        os.environ.setdefault(name, value)


@functools.cache
def cpu_has_avx2() -> bool:
    """An x86-64 CPU with AVX2 (Linux: read off /proc/cpuinfo; elsewhere: assumed for x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return True
    return " avx2" in cpuinfo.read_text(errors="replace")


def cpu_capability() -> str:
    """The kernel family torch dispatches to in this process (``AVX2``, ``AVX512``, ``DEFAULT`` ...)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def portable_kernels_active() -> bool:
    """True when this process computes with the portable kernels, or when the CPU cannot (not x86-64 AVX2)."""
    return not cpu_has_avx2() or cpu_capability() == PORTABLE_CAPABILITY
