"""Objectives from lm-evaluation-harness, scored on the resident (patched) model.

An ``lm_eval`` objective names a task (lm-eval's registry or a local task directory, ``include_path``),
the metric to optimise (direction read from the task's ``higher_is_better``), few-shot and chat options,
generation kwargs, ``limit`` and a held-out fraction. The task's documents are split once with a fixed
seed: a shuffled order, the held-out part is its last ``ceil(fraction * n)`` documents, the search part
the rest (``limit`` caps each part, taken in the shuffled order); the search never builds a request from
a held-out document (few-shot examples included: a task whose few-shot examples would come from its
evaluation split is refused when it has a held-out part).

Per candidate only the model runs: lm-eval's requests (prompts rendered, few-shot contexts built,
token ids encoded) are built once per split; each evaluation calls lm-eval's ``HFLM`` request methods
on the model olmopt holds, then the task's own filters, ``process_results`` and aggregation, exactly as
``lm_eval.evaluator.evaluate`` does. The per-document results (lm-eval's logged samples) are kept in
``item_scores`` / ``samples``.

Everything is offline: ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` are set (unless already set) before
lm-eval or datasets is imported; a task whose data needs the network is a one-line error naming it.
lm-eval's console output (logging, progress bars) is hidden unless the root logger is at DEBUG
(``olmopt --verbose``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from olmopt.errors import InputError

if TYPE_CHECKING:
    from olmopt.config import ObjectiveConfig, StudyConfig
    from olmopt.evaluate.engine import Objective

EXTRA_HINT = "pip install 'olmopt[lmeval]'"
# greedy(model, tokenizer, prompts (token ids), max_new_tokens) -> generated ids [B, max_new_tokens]: olmopt's
# KV-cached decoder, passed in by the caller (``Evaluator.greedy``; this module does not import the engine)
Greedy = Callable[[Any, Any, list[list[int]], int], Any]
QUIET_LOGGERS = ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate", "evaluate", "absl")


@dataclass(frozen=True)
class LmEvalSpec:
    """What an ``lm_eval`` objective evaluates (hashable: ``gen_kwargs`` is JSON)."""

    task: str
    include_path: str | None = None
    metric: str = ""  # "acc" or "acc,FILTER"; "" = the task's first metric
    num_fewshot: int | None = None
    limit: int | None = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    gen_kwargs: str = "{}"
    seed: int = 1234
    direction: str | None = None  # resolved from the task when None

    @property
    def metric_name(self) -> str:
        return self.metric.split(",", 1)[0]

    @property
    def filter_name(self) -> str | None:
        return self.metric.split(",", 1)[1] if "," in self.metric else None


def spec_of(obj: ObjectiveConfig, root: Path) -> LmEvalSpec:
    """The spec of an ``lm_eval`` objective of a study file (include_path resolved against ``root``)."""
    include = None
    if obj.include_path:
        p = Path(obj.include_path).expanduser()
        include = str(p if p.is_absolute() else root / p)
    return LmEvalSpec(
        task=str(obj.task),
        include_path=include,
        metric=obj.metric,
        num_fewshot=obj.num_fewshot,
        limit=obj.limit,
        apply_chat_template=obj.apply_chat_template,
        fewshot_as_multiturn=obj.fewshot_as_multiturn,
        gen_kwargs=json.dumps(obj.gen_kwargs or {}, sort_keys=True),
        seed=obj.seed,
        direction=obj.direction,
    )


# -- import, offline, quiet ----------------------------------------------------------------------------
def require_lm_eval() -> Any:
    """Import lm-eval offline; its absence is a one-line InputError naming the extra."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        with quiet():
            import lm_eval
            import lm_eval.evaluator  # noqa: F401
            from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise InputError(f"lm_eval objectives need lm-eval, which is not installed: {EXTRA_HINT}") from None
    return lm_eval


def _verbose() -> bool:
    return logging.getLogger().isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def quiet(streams: bool = False, loggers_named: Sequence[str] = QUIET_LOGGERS) -> Iterator[None]:
    """Hide lm-eval's (and its libraries') logging and warnings; with ``streams`` also stdout/stderr
    prints (progress bars). Nothing is hidden at DEBUG (``--verbose``)."""
    if _verbose():
        yield
        return
    loggers = [logging.getLogger(n) for n in loggers_named]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if streams:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- tasks ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _task_manager(include_path: str | None, defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def task_manager_for(spec: LmEvalSpec) -> Any:
    """The TaskManager that knows ``spec.task``: the include_path alone first (fast), then with lm-eval's
    own registry; an unknown task or a missing include_path is a one-line InputError."""
    require_lm_eval()
    if spec.include_path is not None and not Path(spec.include_path).is_dir():
        raise InputError(f"lm_eval task {spec.task!r}: include_path {spec.include_path} is not a directory")
    with quiet(streams=True):
        if spec.include_path is not None:
            tm = _task_manager(spec.include_path, False)
            if spec.task in tm.all_tasks:
                return tm
        tm = _task_manager(spec.include_path, True)
    if spec.task not in tm.all_tasks:
        where = f" in {spec.include_path} or" if spec.include_path else ""
        raise InputError(f"lm_eval task {spec.task!r}: unknown task (not found{where} in lm-eval's registry)")
    return tm


def load_task(spec: LmEvalSpec) -> Any:
    """A fresh lm-eval Task object with the spec's overrides (num_fewshot, gen_kwargs, few-shot seed),
    applied as ``lm_eval.simple_evaluate`` applies them. Data that needs the network: one-line error."""
    tm = task_manager_for(spec)
    try:
        with quiet(streams=True):
            loaded = tm.load([spec.task])
    except Exception as exc:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ...)
        raise InputError(
            f"lm_eval task {spec.task!r} cannot be loaded offline (its data must be local files): "
            f"{_one_line(exc)}"
        ) from None
    tasks = loaded["tasks"]
    if len(tasks) != 1:
        raise InputError(f"lm_eval task {spec.task!r} is a group of {len(tasks)} tasks: name one task")
    task = next(iter(tasks.values()))
    gen_kwargs = json.loads(spec.gen_kwargs)
    if gen_kwargs:
        if task.get_config("output_type") != "generate_until":
            raise InputError(f"lm_eval task {spec.task!r}: gen_kwargs apply to generate_until tasks only")
        task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
    if spec.num_fewshot is not None:
        if task.get_config("num_fewshot") != 0:  # lm-eval never overrides a task's explicit 0
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)  # lm-eval's default fewshot_random_seed
    return task


def metric_of(task: Any, spec: LmEvalSpec) -> tuple[str, str | None, Literal["maximize", "minimize"]]:
    """(metric, filter or None, direction) of ``spec`` on ``task``; a metric the task does not produce is
    a one-line InputError listing those it does."""
    better = task.higher_is_better() or {}
    metrics = list(better)
    name = spec.metric_name or (metrics[0] if metrics else "")
    if name not in better:
        raise InputError(
            f"lm_eval task {spec.task!r} does not produce metric {name!r} (it produces {metrics})"
        )
    filters = [f.name for f in getattr(task, "_filters", [])]
    if spec.filter_name is not None and spec.filter_name not in filters:
        raise InputError(f"lm_eval task {spec.task!r} has no filter {spec.filter_name!r} (it has {filters})")
    if better[name] is None:
        raise InputError(f"lm_eval task {spec.task!r}: metric {name!r} does not declare higher_is_better")
    return name, spec.filter_name, "maximize" if better[name] else "minimize"


@lru_cache(maxsize=64)
def task_direction(spec: LmEvalSpec) -> str:
    """The metric's direction as the task declares it (cached: loading a task reads its data)."""
    if spec.direction is not None:
        return spec.direction
    return metric_of(load_task(spec), spec)[2]


def split_doc_ids(n: int, held_out: float, seed: int, split: str, limit: int | None) -> list[int]:
    """Document indices of one part, ascending: shuffle ``range(n)`` with ``seed``, the held-out part is
    the last ``ceil(held_out * n)`` of that order, ``limit`` keeps the first ones of a part's order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_held = math.ceil(round(held_out * n, 9)) if held_out > 0 else 0
    part = order[n - n_held :] if split == "held_out" else order[: n - n_held]
    return sorted(part[:limit] if limit else part)


def _fewshot_from_eval_docs(task: Any) -> bool:
    """Whether few-shot examples would be drawn from the documents being evaluated."""
    cfg, fewshot_cfg = task.config, getattr(task, "fewshot_cfg", None)  # as ConfigurableTask.fewshot_docs
    fewshot = getattr(fewshot_cfg, "split", None)
    if fewshot is not None:
        eval_split = cfg.test_split if task.has_test_docs() else cfg.validation_split
        return fewshot == eval_split
    if cfg.fewshot_config is not None and getattr(fewshot_cfg, "samples", None) is not None:
        return False
    return not (task.has_training_docs() or (task.has_validation_docs() and task.has_test_docs()))


def resolve_objectives(config: StudyConfig) -> dict[str, Any]:
    """Pre-flight of a study's ``lm_eval`` objectives: load each task, check metric, split and few-shot
    source, and fill in the resolved metric, name and direction (stored with the campaign).

    Returns provenance per objective name (task, include_path, documents in each part).
    """
    from olmopt.config import default_objective_name

    info: dict[str, Any] = {}
    for obj in config.objectives:
        if obj.kind != "lm_eval":
            continue
        spec = spec_of(obj, Path(config.root))
        task = load_task(spec)
        metric, flt, direction = metric_of(task, spec)
        obj.name = obj.name or default_objective_name(obj)
        obj.metric = metric if flt is None else f"{metric},{flt}"
        obj.direction = direction
        n = len(task.eval_docs)
        parts = {
            s: len(split_doc_ids(n, obj.held_out, obj.seed, s, obj.limit)) for s in ("search", "held_out")
        }
        if parts["search"] == 0:
            raise InputError(f"lm_eval task {spec.task!r}: the search part is empty ({n} documents)")
        shots = task.get_config("num_fewshot") or 0
        if shots > 0 and obj.held_out > 0 and _fewshot_from_eval_docs(task):
            raise InputError(
                f"lm_eval task {spec.task!r}: num_fewshot {shots} draws examples from the evaluated "
                "documents, which would show held-out documents to the search; give the task a fewshot_split "
                "or set held_out: 0"
            )
        info[obj.name] = {"task": spec.task, "include_path": spec.include_path, "documents": n, **parts}
    return info


# -- evaluation ----------------------------------------------------------------------------------------
@dataclass
class _Part:
    """One objective's requests on one split, built once."""

    task: Any
    doc_ids: list[int]  # true document indices, ascending
    docs: list[Any]
    by_doc: list[list[Any]]  # per document: its Instances in idx order
    instances: list[Any]
    encoded: dict[int, Any] = field(
        default_factory=dict
    )  # id(instance) -> pre-tokenized loglikelihood request


class LmEvalEvaluator:
    """Scores lm-eval objectives on a resident causal LM (no copy, no reload): HFLM wraps ``model``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        objectives: Sequence[Objective],
        batch_size: int = 32,
        greedy: Greedy | None = None,
    ) -> None:
        require_lm_eval()
        from lm_eval.models.huggingface import HFLM

        self.objectives = [o for o in objectives if o.lm_eval is not None]
        self.specs: dict[str, LmEvalSpec] = {o.name: o.lm_eval for o in self.objectives}  # type: ignore[misc]
        if not _verbose():  # lm-eval's own loggers stay quiet in this process (levels are costly to flip)
            for name in ("lm_eval", "lm-eval"):
                logging.getLogger(name).setLevel(logging.ERROR)
        with quiet(streams=True):
            self.lm = _resident_lm_class(HFLM, greedy)(
                pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device)
            )
        self._tasks: dict[str, Any] = {}
        self._metric: dict[str, tuple[str, str | None]] = {}
        self._parts: dict[tuple[str, str], _Part] = {}
        self.item_scores: dict[str, dict[int, float]] = {}  # objective -> document index -> metric value
        self.samples: dict[str, list[dict[str, Any]]] = {}  # objective -> lm-eval's logged samples (subset)

    def _task(self, obj: Objective) -> Any:
        if obj.name not in self._tasks:
            spec = self.specs[obj.name]
            task = load_task(spec)
            metric, flt, _ = metric_of(task, spec)
            self._tasks[obj.name], self._metric[obj.name] = task, (metric, flt)
        return self._tasks[obj.name]

    def doc_ids(self, obj: Objective, split: str) -> list[int]:
        """The document indices an evaluation of ``split`` uses."""
        spec = self.specs[obj.name]
        return split_doc_ids(len(self._task(obj).eval_docs), obj.held_out, spec.seed, split, spec.limit)

    def part(self, obj: Objective, split: str) -> _Part:
        key = (obj.name, split)
        if key not in self._parts:
            self._parts[key] = self._build(obj, split)
        return self._parts[key]

    def _build(self, obj: Objective, split: str) -> _Part:
        spec, task = self.specs[obj.name], self._task(obj)
        ids = self.doc_ids(obj, split)
        if not ids:
            raise InputError(f"lm_eval task {spec.task!r}: the {split} part is empty")
        chat = spec.apply_chat_template
        with quiet(streams=True):
            task.build_all_requests(
                samples=ids,
                rank=0,
                world_size=1,
                cache_requests=False,
                system_instruction=None,
                apply_chat_template=chat,
                fewshot_as_multiturn=spec.fewshot_as_multiturn,
                chat_template=self.lm.apply_chat_template if chat else None,
                tokenizer_name=self.lm.tokenizer_name if chat else "",
            )
        instances = list(task.instances)
        by_doc_id: dict[int, list[Any]] = defaultdict(list)
        for inst in instances:
            by_doc_id[inst.doc_id].append(inst)
        eval_docs = task.eval_docs
        docs = [eval_docs[i] for i in ids]
        by_doc = [sorted(by_doc_id[pos], key=lambda x: x.idx) for pos in range(len(ids))]
        part = _Part(task, ids, docs, by_doc, instances)
        _memoize_doc_fields(task, docs)
        for inst in instances:  # lm-eval's own tokenization (TemplateLM.loglikelihood), done once
            if inst.request_type == "loglikelihood":
                part.encoded[id(inst)] = self._encode_pair(*inst.args)
        return part

    def _encode_pair(self, context: str, continuation: str) -> tuple[tuple[str, str], list[int], list[int]]:
        lm = self.lm
        if context == "":
            cont = lm.tok_encode(continuation, add_special_tokens=False)
            ctx, cont = (
                ([lm.prefix_token_id], cont) if lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
            )
            return (context, continuation), ctx, cont
        ctx, cont = lm._encode_pair(context, continuation)
        return (context, continuation), ctx, cont

    def prepare(self, split: str = "search") -> None:
        for obj in self.objectives:
            self.part(obj, split)

    def evaluate(self, split: str = "search", model: Any = None) -> dict[str, float]:
        """Objective name -> value for the model as it is now (``model``: evaluate another resident
        model, e.g. a data-flow path, through the same requests)."""
        if not self.objectives:
            return {}
        parts = [(obj, self.part(obj, split)) for obj in self.objectives]
        held = self.lm._model
        if model is not None:
            self.lm._model = model
        generating = any(i.request_type != "loglikelihood" for _, part in parts for i in part.instances)
        try:  # transformers' generate() warns; lm-eval's own loggers are quiet already (flipping costs ~1 ms)
            with quiet(loggers_named=("transformers",)) if generating else contextlib.nullcontext():
                self._run(parts)
        finally:
            self.lm._model = held
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {obj.name: self._score(obj, part) for obj, part in parts}

    def _run(self, parts: list[tuple[Objective, _Part]]) -> None:
        """lm-eval's request loop (``evaluator.evaluate``): every request type once over all objectives."""
        requests: dict[str, list[Any]] = defaultdict(list)
        encoded: dict[int, Any] = {}
        for _, part in parts:
            for inst in part.instances:
                inst.resps = []
                inst.filtered_resps = {}
                requests[inst.request_type].append(inst)
            encoded.update(part.encoded)
        for reqtype, reqs in requests.items():
            cloned = [req for req in reqs for _ in range(req.repeats)]
            if reqtype == "loglikelihood":
                resps = self.lm._loglikelihood_tokens([encoded[id(r)] for r in cloned], disable_tqdm=True)
            else:
                resps = getattr(self.lm, reqtype)(cloned, disable_tqdm=True)
            for x, req in zip(resps, cloned, strict=True):
                req.resps.append(x)

    def _score(self, obj: Objective, part: _Part) -> float:
        task = part.task
        metric, flt = self._metric[obj.name]
        task._instances = part.instances
        task.apply_filters()
        key = flt or next(iter(part.instances[0].filtered_resps))
        values: list[Any] = []
        scores: dict[int, float] = {}
        samples: list[dict[str, Any]] = []
        for doc_id, doc, reqs in zip(part.doc_ids, part.docs, part.by_doc, strict=True):
            metrics = task.process_results(doc, [req.filtered_resps[key] for req in reqs])
            values.append(metrics[metric])
            scores[doc_id] = _as_float(metrics[metric])
            samples.append(
                {
                    "doc_id": doc_id,
                    "arguments": [req.args for req in reqs],
                    "resps": [req.resps for req in reqs],
                    "filtered_resps": [req.filtered_resps[key] for req in reqs],
                    "filter": key,
                    **metrics,
                }
            )
        self.item_scores[obj.name] = scores
        self.samples[obj.name] = samples
        return _as_float(task.aggregation()[metric](values))


# generation settings under which transformers' greedy generate() applies no logits processor
_PLAIN_GREEDY = {
    "num_beams": (None, 1), "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "sequence_bias": (None,),
    "renormalize_logits": (None, False), "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,), "stop_strings": (None,),
}  # fmt: skip


def plain_greedy(model: Any, tokenizer: Any, kwargs: dict[str, Any]) -> bool:
    """Whether ``model.generate(**kwargs)`` (lm-eval's call) is plain greedy decoding that stops at the
    tokenizer's EOS: then olmopt's KV-cached decoder produces the same tokens."""
    if set(kwargs) - {"attention_mask", "do_sample"} or kwargs.get("do_sample") is not False:
        return False
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return False
    eos = gc.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if len(eos) == 1 else "many"
    if eos not in (None, tokenizer.eos_token_id):
        return False
    return all(getattr(gc, k, None) in ok for k, ok in _PLAIN_GREEDY.items())


def _resident_lm_class(hflm: type, greedy: Greedy | None = None) -> type:
    """lm-eval's HFLM for the resident model: greedy generation runs on olmopt's KV-cached decoder
    (``greedy``, the engine's ``Evaluator.greedy``) when it is plain greedy decoding (``plain_greedy``),
    else (and without ``greedy``) on transformers' ``generate()`` as in lm-eval. lm-eval still builds the
    contexts, tokenizes, batches, cuts at the stop sequences and decodes; only the decoding loop differs
    (no per-step logits processors and stopping criteria decoding text)."""

    class ResidentHFLM(hflm):
        def _model_generate(
            self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any
        ) -> Any:
            import torch

            kwargs = dict(generation_kwargs)  # normalised as HFLM._model_generate does
            kwargs["temperature"] = kwargs.get("temperature", 0.0)
            if kwargs["temperature"] == 0.0 and kwargs.get("do_sample") is None:
                kwargs["do_sample"] = False
            if kwargs.get("do_sample") is False and kwargs["temperature"] == 0.0:
                kwargs.pop("temperature")
            if greedy is None or not plain_greedy(self.model, self.tokenizer, kwargs):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            mask = kwargs["attention_mask"].bool()
            prompts = [row[m].tolist() for row, m in zip(context, mask, strict=True)]
            preds = greedy(self.model, self.tokenizer, prompts, max_length - context.shape[1])
            return torch.cat([context, preds.to(context.device)], dim=1)

    return ResidentHFLM


def _memoize_doc_fields(task: Any, docs: list[Any]) -> None:
    """Per-document targets and choices computed once: lm-eval renders (and compiles) their Jinja
    templates on every ``process_results`` call. Pure functions of the document, so the values are the
    same; documents other than ``docs`` (kept alive by the part) fall through to lm-eval."""
    for name in ("doc_to_target", "doc_to_choice"):
        if name == "doc_to_choice" and task.config.doc_to_choice is None:
            continue
        wrapper = getattr(task, name)
        if not hasattr(wrapper, "olmopt_memo"):
            original, memo = wrapper, dict[int, Any]()

            def cached(
                doc: Any, *args: Any, _memo: dict[int, Any] = memo, _orig: Any = original, **kwargs: Any
            ) -> Any:
                if args or kwargs or id(doc) not in _memo:
                    return _orig(doc, *args, **kwargs)
                return _memo[id(doc)]

            cached.olmopt_memo = memo  # type: ignore[attr-defined]
            cached.olmopt_original = original  # type: ignore[attr-defined]
            setattr(task, name, cached)
            wrapper = cached
        for doc in docs:
            wrapper.olmopt_memo[id(doc)] = wrapper.olmopt_original(doc)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
