"""The model pool: homologous models by name, their configs and lazily read tensors.

Tensors are read from safetensors on demand (mmap) and kept in an LRU cache bounded in bytes.
``check_homology`` runs before any heavy work and words each mismatch in one line.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from olmopt.errors import ModelError
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.pool.checkpoint import Checkpoint, load_config
from olmopt.pool.resolve import resolve_model
from olmopt.textio import read_text

HOMOLOGY_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


@dataclass
class PoolModel:
    """One pool member: its name (as the user wrote it), directory, config and weights."""

    name: str
    path: Path
    config: Any
    checkpoint: Checkpoint


class ModelPool:
    """Homologous models addressed by name, with a byte-bounded tensor cache."""

    def __init__(
        self,
        refs: list[str],
        base_dir: Path | None = None,
        cache_bytes: int = 512 * 2**20,
        trust_remote_code: bool = False,
    ) -> None:
        if not refs:
            raise ModelError("the model pool is empty")
        if len(set(refs)) != len(refs):
            raise ModelError(f"the model pool lists a model twice: {refs}")
        self.models: dict[str, PoolModel] = {}
        seen: dict[Path, str] = {}
        for ref in refs:
            path = resolve_model(ref, base_dir)
            if path.resolve() in seen:
                raise ModelError(
                    f"the model pool lists one model twice: {seen[path.resolve()]!r} and {ref!r} are both "
                    f"{path.resolve()}"
                )
            seen[path.resolve()] = ref
            config = load_config(ref, path, trust_remote_code)
            checkpoint = Checkpoint(path, ref)
            checkpoint.check_complete(config, trust_remote_code=trust_remote_code)
            self.models[ref] = PoolModel(ref, path, config, checkpoint)
        first = next(iter(self.models.values()))
        self.adapter = ArchitectureAdapter.from_config(first.config, first.name)
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._cache_bytes = 0
        self.cache_limit = cache_bytes
        self._digests: dict[tuple[str, str], str] = {}

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def __getitem__(self, name: str) -> PoolModel:
        try:
            return self.models[name]
        except KeyError:
            raise ModelError(f"model {name!r} is not in the pool ({', '.join(self.models)})") from None

    def tensor(self, model: str, param_name: str, cache: bool = True) -> torch.Tensor:
        """A donor tensor (read-only: callers copy it into live parameters, never modify it). ``cache``
        False reads a tensor needed once (a digest) past the cache, which is kept for patched tensors."""
        key = (model, self.adapter.storage_name(param_name))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        tensor = self[model].checkpoint.get(key[1])
        size = tensor.numel() * tensor.element_size()
        if cache and size <= self.cache_limit:
            self._cache[key] = tensor
            self._cache_bytes += size
            while self._cache_bytes > self.cache_limit:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.numel() * old.element_size()
        return tensor

    def digest(self, model: str, param_name: str) -> str:
        """SHA-256 of a donor tensor as stored (dtype, shape and bytes), read once past the cache and
        remembered: two pool models with the same digest give that parameter the same weights."""
        key = (model, self.adapter.storage_name(param_name))
        if key not in self._digests:
            tensor = self.tensor(model, param_name, cache=False).detach().cpu().contiguous()
            digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # no copy: about 1 s per GiB
            self._digests[key] = digest.hexdigest()
        return self._digests[key]

    def weights_digest(self, model: str, param_names: list[str]) -> str:
        """SHA-256 over ``param_names`` (in order) and their ``digest``: two pool models with the same one
        give those parameters the same weights (a layer slot, a unit, the boundary)."""
        combined = hashlib.sha256()
        for name in param_names:
            combined.update(f"{name}|{self.digest(model, name)}|".encode())
        return combined.hexdigest()

    def check_homology(self) -> None:
        """Raise a one-line ModelError for the first structural or vocabulary mismatch."""
        models = list(self.models.values())
        ref = models[0]
        ref_vocab = tokenizer_vocab(ref.path)
        for other in models[1:]:
            for field in HOMOLOGY_FIELDS:
                a = getattr(ref.config, field, None)
                b = getattr(other.config, field, None)
                if a != b:
                    raise ModelError(
                        f"models {ref.name} and {other.name} are not homologous: {field} {a!r} != {b!r}"
                    )
            vocab = tokenizer_vocab(other.path)
            if ref_vocab is not None and vocab is not None and vocab != ref_vocab:
                diff = sorted(set(ref_vocab.items()) ^ set(vocab.items()))[:1]
                raise ModelError(
                    f"models {ref.name} and {other.name} are not homologous: tokenizer vocabularies differ "
                    f"(first difference: {diff[0][0]!r})"
                )
            missing = set(ref.checkpoint.keys()) ^ set(other.checkpoint.keys())
            if missing:
                raise ModelError(
                    f"models {ref.name} and {other.name} are not homologous: tensor {sorted(missing)[0]!r} "
                    "is in one checkpoint only"
                )

    def check_finite(self) -> None:
        """Raise a one-line ModelError naming the first model and tensor holding NaN or inf."""
        for model in self.models.values():
            bad = model.checkpoint.first_nonfinite()
            if bad is not None:
                raise ModelError(
                    f"model {model.name}: tensor {bad!r} holds NaN or inf values (a damaged checkpoint)"
                )


def load_tokenizer(model: PoolModel) -> Any:
    """The model's tokenizer through ``AutoTokenizer`` (as
    users load it); failures are one ModelError line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for unreadable tokenizer files
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise ModelError(
            f"model {model.name}: cannot load its tokenizer from {model.path}: {reason}"
        ) from None


def tokenizer_vocab(path: Path) -> dict[str, int] | None:
    """The token -> id map from tokenizer.json (None when the model ships no tokenizer.json)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(read_text(file, error=ModelError))
    except ValueError as exc:
        raise ModelError(f"{file}: not valid JSON ({exc})") from None
    vocab = dict(data.get("model", {}).get("vocab", {}) or {})
    if isinstance(data.get("model", {}).get("vocab"), list):  # unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _score) in enumerate(data["model"]["vocab"])}
    for tok in data.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
    return vocab
