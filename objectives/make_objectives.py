"""Regenerate the shipped zoo evaluation sets (fixed seed; the output is committed).

Usage: python objectives/make_objectives.py [DIR]   (default: this directory)
"""

from __future__ import annotations

import sys
from pathlib import Path

from olmopt.zoo.objectives import write_objectives

if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for path in write_objectives(target):
        print(path)
