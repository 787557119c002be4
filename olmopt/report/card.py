"""The donor map in an exported model directory: ``donor_map.png`` and a section in its README.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from olmopt.recipe import Recipe
from olmopt.report.plots import donor_map_png

DONOR_MAP_FILE = "donor_map.png"
CARD_SECTION = (
    "\n## Donor map\n\n"
    "Which pool model supplies each layer and tensor unit (boundary units on top; `es` marks units "
    "perturbed by evolution strategies).\n\n"
    f"![donor map]({DONOR_MAP_FILE})\n"
)


def add_donor_map(model_dir: Path, recipe: Recipe, units: Sequence[str], num_layers: int) -> Path:
    """Write ``model_dir/donor_map.png`` and reference it from ``model_dir/README.md`` (once)."""
    png = donor_map_png(recipe, units, num_layers, model_dir / DONOR_MAP_FILE)
    card = model_dir / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if f"]({DONOR_MAP_FILE})" not in text:
        card.write_text(text + CARD_SECTION, encoding="utf-8")
    return png
