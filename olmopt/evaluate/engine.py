"""The batched evaluation engine: one objective value per (dataset, metric) for the live model.

Teacher-forced metrics run one forward per batch and project only the answer positions through the
head. Generation metrics use KV-cached greedy decoding over left-padded batches with early stop.
An evaluation may start from a prefix activation cache (``olmopt.evaluate.prefix_cache``: the hidden
states entering layer i under the incumbent) so candidates that differ only in layers >= i run just
layers i..N.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache

from olmopt.errors import InputError
from olmopt.evaluate import metrics as M
from olmopt.evaluate.datasets import Encoded, Split, encode, load_examples, split_examples
from olmopt.evaluate.lmeval import LmEvalSpec
from olmopt.runtime import cache_kwarg

if TYPE_CHECKING:
    from olmopt.evaluate.prefix_cache import PrefixCache

# (dataset, split, held-out share, test share, samples, batch number)
BatchKey = tuple[Path, str, float, float, "int | None", int]
PrefixStore = dict[BatchKey, dict[int, torch.Tensor]]  # batch key -> layer -> input hidden states


@dataclass(frozen=True)
class Objective:
    """A dataset scored with one metric; ``name`` is the Optuna metric name."""

    name: str
    path: Path
    metric: str
    held_out: float = 0.25
    samples: int | None = None
    test: float = 0.0  # the sealed test part (datasets.split_examples), scored only at export
    lm_eval: LmEvalSpec | None = None  # an lm-evaluation-harness task (olmopt.evaluate.lmeval), not a dataset

    @property
    def direction(self) -> str:
        if self.lm_eval is not None:
            from olmopt.evaluate.lmeval import task_direction

            return task_direction(self.lm_eval)
        return M.get_metric(self.metric).direction

    def has_part(self, split: str) -> bool:
        """Whether the objective has items in ``split`` (a sealed test part only when ``test`` > 0)."""
        return split != "test" or self.test > 0

    @property
    def kind(self) -> str:
        return "lm_eval" if self.lm_eval is not None else M.get_metric(self.metric).kind


class _Passthrough(nn.Module):
    """Stands in for a decoder layer whose output is already known (prefix cache)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@dataclass
class _Batch:
    ids: torch.Tensor
    attention: torch.Tensor
    gather: torch.Tensor  # [B, R] positions whose hidden state predicts each answer token
    target: torch.Tensor  # [B, R]
    mask: torch.Tensor  # [B, R]
    last_prompt: torch.Tensor  # [B] position of the last prompt token
    rows: list[int]
    chunk: int = 0  # the early-stopping chunk its items belong to (0 without chunks)


class Evaluator:
    """Scores a resident causal LM on a list of objectives."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        objectives: Sequence[Objective],
        batch_size: int = 32,
        max_new_tokens: int = 256,
        stop_at_first_mismatch: bool = True,
        chunks: tuple[int, int] | None = None,
    ) -> None:
        """``chunks``: (seed, items per chunk) to batch every dataset part chunk by chunk, its items in a
        fixed random order from ``seed`` (early stopping,
        ``evaluate(chunk=c)``); None: one sorted batching."""
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise InputError(f"objective names must be unique: {names}")
        for obj in objectives:
            M.get_metric(obj.metric)
        self.model: Any = model  # a transformers causal LM: submodules are read by name (base_model, layers)
        self.tokenizer = tokenizer
        self.objectives = list(objectives)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.stop_at_first_mismatch = stop_at_first_mismatch
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._encoded: dict[tuple[Path, Split, float, float, int | None], Encoded] = {}
        self.carried: PrefixStore = {}  # inputs of later layers kept by the last evaluation (its ``carry``)
        self._carry: list[int] = []
        self._batch_cache: dict[int, list[_Batch]] = {}
        self.nonfinite: list[str] = []  # objectives whose logits held NaN/inf in the last ``evaluate``
        self._saw_nonfinite = False
        self.chunks = chunks
        # per-item results of the last ``evaluate``: objective -> item index -> value (perplexity: the
        # item's summed token cross-entropy, its token count in ``item_tokens``)
        self.item_scores: dict[str, dict[int, float]] = {}
        self.item_tokens: dict[str, dict[int, int]] = {}

    # -- data --------------------------------------------------------------------------------------
    def encoded(self, obj: Objective, split: Split) -> Encoded:
        key = (obj.path, split, obj.held_out, obj.test, obj.samples)
        if key not in self._encoded:
            examples = split_examples(load_examples(obj.path), obj.held_out, split, obj.samples, obj.test)
            if not examples:
                raise InputError(f"dataset {obj.path}: the {split} part is empty")
            self._encoded[key] = encode(self.tokenizer, examples, obj.path)
        return self._encoded[key]

    def answer_tokens(self, obj: Objective, split: Split = "search") -> dict[int, int]:
        """Item index -> answer tokens of a dataset part: each item's token count in ``item_tokens``."""
        return {i: len(answer) for i, answer in enumerate(self.encoded(obj, split).answers)}

    def prepare(self, split: Split = "search") -> None:
        """Load and tokenize every objective's data now (so bad files fail before heavy work)."""
        for obj in self.objectives:
            if obj.kind == "recipe":
                continue
            enc = self.encoded(obj, split)
            if obj.kind == "choice" and not enc.choice_ids:
                raise InputError(f"dataset {obj.path}: metric {obj.metric} needs multiple-choice items")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batches(self, enc: Encoded) -> list[_Batch]:
        """The padded batches of a dataset part, built once (shortest first; deterministic); with
        ``chunks``, chunk by chunk (``item_chunks``), shortest first within each chunk."""
        cached = self._batch_cache.get(id(enc))
        if cached is None:
            groups = (
                item_chunks(len(enc), self.chunks, self.looks(), enc.prompts)
                if self.chunks
                else [list(range(len(enc)))]
            )
            cached = []
            for number, items in enumerate(groups):
                order = sorted(items, key=lambda i: (len(enc.prompts[i]) + len(enc.answers[i]), i))
                rows = [
                    order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)
                ]
                cached += [self._make_batch(enc, r, number) for r in rows]
            self._batch_cache[id(enc)] = cached
        return cached

    def looks(self, split: Split = "search") -> int:
        """Chunks of an early-stopped evaluation: the largest dataset part's items / chunk size, rounded up
        (every part is cut into this many chunks of about equal size); 1 without ``chunks``."""
        if self.chunks is None:
            return 1
        sizes = [len(self.encoded(o, split)) for o in self.objectives if o.kind != "recipe"]
        return max([1] + [-(-n // self.chunks[1]) for n in sizes])

    def chunk_items(self, chunk: int, split: Split = "search") -> dict[str, list[int]]:
        """Objective -> the item indices of chunk ``chunk`` of ``split`` (an Evaluator built with
        ``chunks``; objectives read off the Recipe have none)."""
        assert self.chunks is not None, "an Evaluator built without chunks"
        looks = self.looks(split)
        out: dict[str, list[int]] = {}
        for obj in self.objectives:
            if obj.kind != "recipe" and obj.has_part(split):
                enc = self.encoded(obj, split)
                out[obj.name] = item_chunks(len(enc), self.chunks, looks, enc.prompts)[chunk]
        return out

    def _make_batch(self, enc: Encoded, rows: list[int], chunk: int = 0) -> _Batch:
        seqs = [enc.prompts[i] + enc.answers[i] for i in rows]
        width = max(len(s) for s in seqs)
        r_max = max(len(enc.answers[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        gather = torch.zeros((len(rows), r_max), dtype=torch.long)
        target = torch.full((len(rows), r_max), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), r_max), dtype=torch.bool)
        last_prompt = torch.zeros(len(rows), dtype=torch.long)
        for b, i in enumerate(rows):
            p, a = len(enc.prompts[i]), len(enc.answers[i])
            ids[b, : p + a] = torch.tensor(seqs[b])
            attention[b, : p + a] = 1
            gather[b, :a] = torch.arange(p - 1, p - 1 + a)
            target[b, :a] = torch.tensor(enc.answers[i])
            mask[b, :a] = True
            last_prompt[b] = p - 1
        dev = self.device
        return _Batch(
            ids.to(dev),
            attention.to(dev),
            gather.to(dev),
            target.to(dev),
            mask.to(dev),
            last_prompt.to(dev),
            rows,
            chunk,
        )

    # -- forward passes ------------------------------------------------------------------------------
    def _hidden(
        self, batch: _Batch, prefix: torch.Tensor | None, start: int, keep: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Final hidden states and the inputs of layers ``keep``;
        with ``prefix`` only layers ``start..N`` run."""
        base = self.model.base_model
        with self._capturing(keep) as captured:
            if prefix is None:
                return base(
                    input_ids=batch.ids, attention_mask=batch.attention, use_cache=False
                ).last_hidden_state, captured
            layers = base.layers
            base.layers = nn.ModuleList([_Passthrough() for _ in range(start)] + list(layers[start:]))
            try:
                out = base(inputs_embeds=prefix, attention_mask=batch.attention, use_cache=False)
                return out.last_hidden_state, captured
            finally:
                base.layers = layers

    @contextmanager
    def _capturing(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Within the block, forward passes store a copy of the hidden states entering each of ``layers``."""
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for layer in layers:

            def hook(
                _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layer: int = layer
            ) -> None:
                captured[layer] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

            handles.append(
                self.model.base_model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
            )
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden).float()

    # -- what the prefix cache needs ----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.model.base_model.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[1])

    def forced_batches(self, split: Split) -> Iterator[tuple[BatchKey, _Batch]]:
        """Every teacher-forced batch of ``split`` with its key in a prefix store."""
        for obj in self.objectives:
            if obj.kind not in ("generate", "recipe"):
                for n, batch in enumerate(self._batches(self.encoded(obj, split))):
                    yield (obj.path, split, obj.held_out, obj.test, obj.samples, n), batch

    def capture_inputs(
        self, batch: _Batch, layers: list[int], earlier: dict[int, torch.Tensor] | None = None
    ) -> dict[int, torch.Tensor]:
        """Hidden states entering each of ``layers``, from one forward pass.

        ``earlier``: valid inputs of some layers; the pass starts at the deepest one not after ``layers[0]``.
        """
        below = [k for k in (earlier or {}) if k <= layers[0]]
        if not below or earlier is None:
            return self._hidden(batch, None, 0, layers)[1]
        start = max(below)
        return self._hidden(batch, earlier[start], start, layers)[1]

    # -- public API -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self,
        split: Split = "search",
        prefix: PrefixCache | None = None,
        carry: Sequence[int] = (),
        chunk: int | None = None,
    ) -> dict[str, float]:
        """Objective name -> value for the model as it is now; per-item values in ``item_scores``.

        ``chunk``: only that chunk's items (an Evaluator built with ``chunks``); the values are then
        over those items, and ``carried`` keeps growing from chunk 1 on (chunk 0 starts it afresh).

        With ``prefix`` teacher-forced batches start from its stored inputs of its layer: the caller
        guarantees that the weights below that layer (and the embedding) equal those at capture time.
        ``carry``: layers whose inputs under the evaluated weights are kept in ``carried`` (a prefix
        store for when this candidate becomes the incumbent).

        An objective whose scored logits hold NaN or inf has the value NaN (whatever its metric would
        make of them) and is listed in ``nonfinite``: a damaged model never gets a finite score.
        """
        self.model.eval()
        self.nonfinite = []
        if not chunk:
            self.carried = {}
        self.item_scores, self.item_tokens = {}, {}
        self._carry = list(carry)
        results: dict[str, float] = {}
        groups: dict[tuple[Path, float, float, int | None], list[Objective]] = {}
        # recipe objectives: read off the Recipe by the caller; the test split only where it has items
        scored = [o for o in self.objectives if o.kind != "recipe" and o.has_part(split)]
        for obj in scored:
            groups.setdefault((obj.path, obj.held_out, obj.test, obj.samples), []).append(obj)
        for objs in groups.values():
            forced = [o for o in objs if o.kind in ("teacher_forced", "choice")]
            generated = [o for o in objs if o.kind == "generate"]
            if forced:
                results.update(self._score_forced(forced, split, prefix, chunk))
            for obj in generated:
                self._saw_nonfinite = False
                results[obj.name] = self._score_generated(obj, split, chunk)
                if self._saw_nonfinite:
                    self.nonfinite.append(obj.name)
                    results[obj.name] = float("nan")
        return {o.name: results[o.name] for o in scored}

    def _score_forced(
        self, objs: list[Objective], split: Split, cache: PrefixCache | None, chunk: int | None
    ) -> dict[str, float]:
        first = objs[0]
        enc = self.encoded(first, split)
        sums: dict[str, list[torch.Tensor]] = {o.name: [] for o in objs}
        rows: list[int] = []
        ce_sum, ce_n = 0.0, 0
        bad: set[str] = set()
        for n, batch in enumerate(self._batches(enc)):
            if chunk is not None and batch.chunk != chunk:
                continue
            rows += batch.rows
            key = (first.path, split, first.held_out, first.test, first.samples, n)
            prefix, start = (cache.inputs(key), cache.layer or 0) if cache is not None else (None, 0)
            hidden, kept = self._hidden(batch, prefix, start, self._carry)
            if kept:
                self.carried[key] = kept
            idx = batch.gather.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            logits = self._head(torch.gather(hidden, 1, idx))
            answer_finite = bool(torch.isfinite(logits[batch.mask]).all())
            first_finite = bool(torch.isfinite(logits[:, 0, :]).all())
            for obj in objs:
                if not (first_finite if obj.kind == "choice" else answer_finite):
                    bad.add(obj.name)
                if obj.metric == "perplexity":
                    s, c = M.cross_entropy_sums(logits, batch.target, batch.mask)
                    ce_sum += float(s.sum())
                    ce_n += int(c.sum())
                    sums[obj.name].append(s)
                    self.item_tokens.setdefault(obj.name, {}).update(zip(batch.rows, c.tolist(), strict=True))
                elif obj.metric == "bigram_loss":
                    sums[obj.name].append(M.bigram_loss_scores(logits, batch.target, batch.mask))
                elif obj.metric == "token_accuracy":
                    sums[obj.name].append(M.token_accuracy_scores(logits, batch.target, batch.mask))
                elif obj.kind == "choice":
                    sums[obj.name].append(self._choice_correct(enc, batch, logits[:, 0, :]))
                else:  # pragma: no cover - registry and dispatch disagree
                    raise InputError(f"metric {obj.metric} has no teacher-forced implementation")
        out: dict[str, float] = {}
        for obj in objs:
            self.item_scores[obj.name] = dict(
                zip(rows, torch.cat(sums[obj.name]).float().tolist(), strict=True)
            )
            if obj.metric == "perplexity":
                out[obj.name] = M.perplexity_from_sums(ce_sum, ce_n)
            else:
                out[obj.name] = float(torch.cat(sums[obj.name]).float().mean())
            if obj.name in bad:
                out[obj.name] = float("nan")
                self.nonfinite.append(obj.name)
        return out

    @staticmethod
    def _choice_correct(enc: Encoded, batch: _Batch, first: torch.Tensor) -> torch.Tensor:
        """Letter-logit multiple choice; items with fewer choices are padded with -inf scores."""
        k = max(len(enc.choice_ids[i]) for i in batch.rows)
        ids = [enc.choice_ids[i] + [enc.choice_ids[i][0]] * (k - len(enc.choice_ids[i])) for i in batch.rows]
        valid = torch.tensor(
            [[j < len(enc.choice_ids[i]) for j in range(k)] for i in batch.rows], device=first.device
        )
        scores = torch.gather(first, 1, torch.tensor(ids, device=first.device)).masked_fill(
            ~valid, float("-inf")
        )
        answers = torch.tensor([enc.answer_index[i] for i in batch.rows], device=first.device)
        return M.mc_correct(scores, answers)

    def _score_generated(self, obj: Objective, split: Split, chunk: int | None) -> float:
        enc = self.encoded(obj, split)
        values: list[torch.Tensor] = []
        rows: list[int] = []
        for batch in self._batches(enc):
            if chunk is not None and batch.chunk != chunk:
                continue
            rows += batch.rows
            prompts = [enc.prompts[i] for i in batch.rows]
            if obj.metric in ("exact_match", "accuracy"):
                stop = self.stop_at_first_mismatch
                pred, pmax = self.greedy(prompts, batch.target.shape[1], batch.target if stop else None)
                if obj.metric == "exact_match":
                    values.append(M.exact_match_scores(pred, pmax, batch.target, batch.mask, stop))
                else:
                    values.append(M.exact_accuracy(pred, batch.target, batch.mask))
            else:
                pred, _ = self.greedy(prompts, self.max_new_tokens, None)
                score = M.diversity_score if obj.metric == "diversity" else M.quality_score
                texts = [self._decode(row) for row in pred.tolist()]
                values.append(torch.tensor([score(t) for t in texts]))
        self.item_scores[obj.name] = dict(zip(rows, torch.cat(values).float().tolist(), strict=True))
        return float(torch.cat(values).float().mean())

    def _decode(self, ids: list[int]) -> str:
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def greedy(
        self, prompts: list[list[int]], max_new: int, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """KV-cached batched greedy decoding. Returns (token ids [B, max_new], p_max [B, max_new]).

        A row stops at EOS, or at its first token that differs from ``target`` when given; positions
        after a row stopped hold padding and p_max 0. Decoding ends when every row has stopped.
        """
        dev = self.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, width - len(p) :] = torch.tensor(p)
            attention[b, width - len(p) :] = 1
        ids, attention = ids.to(dev), attention.to(dev)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        base = self.model.base_model
        cache = {cache_kwarg(getattr(base, "forward", base)): DynamicCache(config=self.model.config)}
        out = base(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **cache)
        hidden = out.last_hidden_state[:, -1]
        preds = torch.full((len(prompts), max_new), self.pad_id, dtype=torch.long, device=dev)
        pmax = torch.zeros((len(prompts), max_new), device=dev)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
        eos = self.tokenizer.eos_token_id
        for t in range(max_new):
            logits = self._head(hidden)
            if not bool(torch.isfinite(logits[~done]).all()):
                self._saw_nonfinite = True
            probs = torch.softmax(logits, dim=-1)
            best, tok = probs.max(dim=-1)
            preds[:, t] = torch.where(done, preds[:, t], tok)
            pmax[:, t] = torch.where(done, pmax[:, t], best)
            done = done | (tok == eos)
            if target is not None and t < target.shape[1]:
                done = done | (tok != target[:, t])
            if bool(done.all()) or t == max_new - 1:
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = base(
                input_ids=tok[:, None],
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                **cache,
            )
            hidden = out.last_hidden_state[:, -1]
        return preds, pmax


def item_chunks(
    n_items: int, chunks: tuple[int, int], looks: int, salt: Sequence[Sequence[int]]
) -> list[list[int]]:
    """``looks`` chunks of about equal size of a part's item indices, in a random order fixed by the seed
    and the part's content (``salt``: its prompts), so every candidate of a campaign sees the same order."""
    import hashlib
    import random

    digest = hashlib.sha256(repr((chunks[0], n_items, [list(p) for p in salt])).encode()).hexdigest()
    order = list(range(n_items))
    random.Random(digest).shuffle(order)
    return [order[round(c * n_items / looks) : round((c + 1) * n_items / looks)] for c in range(looks)]
