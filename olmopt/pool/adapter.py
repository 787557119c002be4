"""Architecture adapter: where a Llama-family model keeps its embedding, layers, final norm and head.

Names come from the config (``model_type``, ``num_hidden_layers``, ``tie_word_embeddings``), not from
strings scattered around the code. Parameter *units* follow OLM: ``X.weight`` and ``X.bias`` form unit
``X`` (e.g. ``model.layers.3.self_attn.q_proj``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from olmopt.errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_UNIT_RE = re.compile(r"^(.*)\.(weight|bias)$")


def unit_of(param_name: str) -> str:
    """The OLM unit of a parameter: its name without the trailing ``.weight``/``.bias``."""
    match = _UNIT_RE.match(param_name)
    return match.group(1) if match else param_name


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Structural names of one Llama-family architecture."""

    model_type: str
    num_layers: int
    tied_embeddings: bool
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    layers_prefix: str = "model.layers"

    @classmethod
    def from_config(cls, config: Any, name: str = "model") -> ArchitectureAdapter:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"model {name}: architecture {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        return cls(
            model_type=model_type,
            num_layers=int(config.num_hidden_layers),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."

    def layer_of(self, param_name: str) -> int | None:
        """Layer index of a parameter, or None for boundary parameters."""
        prefix = self.layers_prefix + "."
        if not param_name.startswith(prefix):
            return None
        return int(param_name[len(prefix) :].split(".", 1)[0])

    def merge_layer(self, param_name: str) -> int:
        """The layer whose layer-wise merge parameters a parameter takes (mergekit's convention outside the
        layers: the embedding takes layer 0's, the final norm and the head the last layer's)."""
        layer = self.layer_of(param_name)
        if layer is not None:
            return layer
        return 0 if unit_of(param_name) == self.embed else self.num_layers - 1

    def boundary_units(self) -> tuple[str, ...]:
        """Embedding, final norm and (untied) lm_head: what a boundary donor supplies."""
        units = (self.embed, self.final_norm)
        return units if self.tied_embeddings else (*units, self.lm_head)

    def is_boundary(self, param_name: str) -> bool:
        return unit_of(param_name) in (self.embed, self.final_norm, self.lm_head)

    def layer_units(self, param_names: Iterable[str], index: int) -> list[str]:
        """Units of layer ``index`` in parameter order."""
        prefix = self.layer_prefix(index)
        return list(dict.fromkeys(unit_of(p) for p in param_names if p.startswith(prefix)))

    def all_units(self, param_names: Iterable[str]) -> list[str]:
        """Every unit in parameter order (embedding, layers, final norm, head), tied head omitted."""
        units = dict.fromkeys(unit_of(p) for p in param_names)
        if self.tied_embeddings:
            units.pop(self.lm_head, None)
        return list(units)

    def storage_name(self, param_name: str) -> str:
        """The checkpoint tensor holding ``param_name`` (a tied head lives in the embedding)."""
        if self.tied_embeddings and unit_of(param_name) == self.lm_head:
            return self.embed + ".weight"
        return param_name
