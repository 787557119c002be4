"""``build_zoo``: train a whole family on the CPU, score it, check it, write it atomically (cached)."""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from olmopt import __version__
from olmopt.errors import InputError, OlmoptError
from olmopt.kernels import (
    cpu_capability,
    cpu_has_avx2,
    portable_cpu_env,
    portable_kernels_active,
    portable_kernels_key,
    request_portable_kernels,
)
from olmopt.lockfile import held_lock
from olmopt.runtime import configure_threads
from olmopt.zoo import acceptance
from olmopt.zoo.family import ZOO_VERSION, FamilySpec, family_spec, pinned_seeds
from olmopt.zoo.manifest import WEIGHTS, reusable, sha256_file, write_manifest
from olmopt.zoo.objectives import HELDOUT_FRACTION, load_objective, objective_file, split
from olmopt.zoo.score import exact_match
from olmopt.zoo.skills import SKILL_INFO, SKILLS, training_pool
from olmopt.zoo.tokenizer import BYTE_LEVEL_ARCHS, build_tokenizer
from olmopt.zoo.train import data_rng, encode_items, make_model, train

log = logging.getLogger(__name__)


def build_zoo(
    out: Path,
    size: str = "tiny",
    arch: str = "llama",
    seed: int | None = None,
    progress: bool = True,
    check: bool = True,
    force: bool = False,
    refresh: bool = False,
    lower: tuple[int, ...] | None = None,
    upper: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the zoo family in ``out`` and return its manifest (``zoo.json``).

    ``seed=None`` tries the pinned seeds of (size, arch) in this CPU vendor's order (``pinned_seeds``)
    and keeps the first family that passes acceptance on this machine: a directory holding a candidate
    that passed is reused, one holding a candidate that failed goes on with the next. ``force`` rebuilds
    whatever ``out`` holds; ``refresh`` replaces a zoo built with other arguments (never a directory that
    is not a zoo). With ``check``, a family that fails the acceptance criteria (every candidate, for
    ``seed=None``) is still written, then ``AcceptanceError`` names the failed criteria. ``lower`` /
    ``upper`` train the layer specialists in other layers (``family.with_layers``).
    """
    spec = family_spec(size, arch, lower, upper)
    out = Path(out)
    seeds = pinned_seeds(size, arch) if seed is None else (int(seed),)
    start, held = (0, None) if force else _held_candidate(out, spec, seeds)
    failures: list[str] = []
    if held is not None:
        failure = acceptance.first_failure(held["acceptance"]["criteria"])
        if failure is None:
            return held
        failures.append(f"seed {held['seed']}: {failure}")
    manifest = held or {}
    replace_out = force or held is not None or (refresh and (out / "zoo.json").is_file())
    for i, candidate in enumerate(seeds[start:], start):
        manifest = build_family(out, spec, candidate, progress=progress, check=False, force=replace_out)
        failure = acceptance.first_failure(manifest["acceptance"]["criteria"])
        if failure is None:
            return manifest
        failures.append(f"seed {candidate}: {failure}")
        replace_out = True  # the next candidate replaces the failed family just written
        if i + 1 < len(seeds):
            log.warning(
                "zoo %s: seed %d fails acceptance here (%s); trying seed %d",
                out,
                candidate,
                failure,
                seeds[i + 1],
            )
    if check:
        which = (
            f"seed={seeds[0]}) fails acceptance: "
            if len(seeds) == 1
            else "every pinned seed) fails acceptance: "
        )
        raise acceptance.AcceptanceError(
            f"zoo {out} (size={size} arch={arch} {which}{'; '.join(failures)} "
            "(the zoo was written; pass --no-check to accept it)"
        )
    return manifest


def _held_candidate(out: Path, spec: FamilySpec, seeds: tuple[int, ...]) -> tuple[int, dict[str, Any] | None]:
    """The manifest of the candidate seed ``out`` holds
    (built as this machine would), and the index after it."""
    for i, seed in enumerate(seeds):
        manifest = reusable(out, build_key(spec, seed))
        if manifest is not None:
            return i + 1, manifest
    return 0, None


def build_key(spec: FamilySpec, seed: int) -> dict[str, Any]:
    """What makes two builds the same: zoo version, size, arch, seed, a digest of the training plans and
    the CPU kernels (``olmopt.kernels``: the portable ones wherever the CPU runs them); for the
    byte-level-tokenizer architectures, that tokenizer (docs/zoo.md "Tokenizer and encoding")."""
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:16]
    kernels = portable_kernels_key() if cpu_has_avx2() else "native"
    key = {
        "zoo_version": ZOO_VERSION,
        "size": spec.size,
        "arch": spec.arch,
        "seed": seed,
        "plan": digest,
        "kernels": kernels,
    }
    if (
        spec.arch in BYTE_LEVEL_ARCHS
    ):  # its tokenizer files changed (same ids): a zoo with the old ones is rebuilt
        key["tokenizer"] = "byte-level"
    return key


def cached_manifest(
    out: Path,
    size: str,
    arch: str,
    seed: int | None = None,
    lower: tuple[int, ...] | None = None,
    upper: tuple[int, ...] | None = None,
) -> dict[str, Any] | None:
    """The manifest of ``out`` when a build with these arguments would be a no-op, else None."""
    spec = family_spec(size, arch, lower, upper)
    if seed is not None:
        return reusable(Path(out), build_key(spec, int(seed)))
    _, held = _held_candidate(Path(out), spec, pinned_seeds(size, arch))
    passed = held is not None and acceptance.first_failure(held["acceptance"]["criteria"]) is None
    return held if passed else None


def build_family(
    out: Path, spec: FamilySpec, seed: int, progress: bool = True, check: bool = True, force: bool = False
) -> dict[str, Any]:
    """``build_zoo`` for an explicit ``FamilySpec`` (tests use ``spec.scaled(...)`` for quick builds).

    Trains with the portable CPU kernels (``olmopt.kernels``): when this process already computes with
    other ones, the build runs in a child process that starts with them.
    """
    key = build_key(spec, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    request_portable_kernels()
    if portable_kernels_active() or os.environ.get(_CHILD_ENV):
        manifest = _build_here(out, spec, seed, key, progress, force)
    else:
        manifest = _build_in_child(out, spec, seed, progress, force)
    failure = acceptance.first_failure(manifest["acceptance"]["criteria"])
    if check and failure:
        raise acceptance.AcceptanceError(
            f"zoo {out} (size={spec.size} arch={spec.arch} seed={seed}) fails acceptance: {failure} "
            "(the zoo was written; pass --no-check to accept it)"
        )
    return manifest


_CHILD_ENV = "OLMOPT_ZOO_BUILD_CHILD"


def _build_here(
    out: Path, spec: FamilySpec, seed: int, key: dict[str, Any], progress: bool, force: bool
) -> dict[str, Any]:
    with held_lock(
        out.parent / f".{out.name}.lock"
    ):  # concurrent builds of one directory: the second one reuses
        return _build_locked(out, spec, seed, key, progress, force)


def _build_in_child(out: Path, spec: FamilySpec, seed: int, progress: bool, force: bool) -> dict[str, Any]:
    """``build_family`` (unchecked) in a fresh process whose torch starts with the portable kernels."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    log.info("zoo %s: building in a child process (this one computes with %s kernels)", out, cpu_capability())
    env = portable_cpu_env()
    saved = {name: os.environ.get(name) for name in (*env, _CHILD_ENV)}
    os.environ.update({**env, _CHILD_ENV: "1"})  # a spawned child inherits the environment
    try:
        # an executor, not a Pool: a child that dies (killed, out of memory) raises here instead of hanging
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(
                build_family, out, spec, seed, progress=progress, check=False, force=force
            ).result()
    except BrokenProcessPool:
        raise OlmoptError(
            f"zoo {out}: the build process died (killed, or out of memory); {out} is unchanged"
        ) from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _build_locked(
    out: Path, spec: FamilySpec, seed: int, key: dict[str, Any], progress: bool, force: bool
) -> dict[str, Any]:
    manifest = None if force else reusable(out, key)
    if manifest is not None:
        log.info(
            "zoo %s is up to date (size=%s arch=%s seed=%d); nothing to do", out, spec.size, spec.arch, seed
        )
    else:
        if not force and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InputError(
                f"zoo output {out} exists and is not an intact zoo built with size={spec.size} "
                f"arch={spec.arch} seed={seed}; pass --force to replace it"
            )
        for stale in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; we hold the lock
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        try:
            manifest = _train_family(staging, spec, seed, key, progress)
            _swap_in(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``staging`` directory with renames (never a half zoo at ``out``)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _save(model: PreTrainedModel, tokenizer, directory: Path) -> str:
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=16,
    )
    shards_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own bar reports progress; no per-file "Writing model shards"
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if shards_bar:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)
    umask = os.umask(0)
    os.umask(umask)
    (directory / WEIGHTS).chmod(0o666 & ~umask)  # safetensors writes 0600; the other files are 0644
    return sha256_file(directory / WEIGHTS)


def _copy_layers(
    model: PreTrainedModel, donor: PreTrainedModel, layers: tuple[int, ...] | None
) -> PreTrainedModel:
    """Overwrite ``model.layers.{i}`` (i in ``layers``) of
    ``model`` with ``donor``'s, in place; return ``model``."""
    state = model.state_dict()
    prefixes = tuple(f"model.layers.{i}." for i in layers or ())
    for name, tensor in donor.state_dict().items():
        if name.startswith(prefixes):
            state[name].copy_(tensor)
    return model


def _layer_recipe(base: PreTrainedModel, lower: PreTrainedModel, upper: PreTrainedModel, spec: FamilySpec):
    """The ground-truth layer recipe: base, lower layers from ``lower``, upper layers from ``upper``."""
    merged = copy.deepcopy(base)
    _copy_layers(merged, lower, spec.layer_indices("lower"))
    return _copy_layers(merged, upper, spec.layer_indices("upper"))


@functools.lru_cache(maxsize=2)
def _encoded_data(seed: int) -> tuple[dict[str, list], dict[str, tuple], dict[str, tuple]]:
    """Training pools, objective split and encoded objective parts (cached: encoding takes seconds)."""
    tokenizer = build_tokenizer()
    rng = data_rng(seed)
    pools = {s: encode_items(tokenizer, training_pool(s, rng)) for s in SKILLS}
    parts = {s: split(load_objective(s)) for s in SKILLS}
    evals = {s: tuple(encode_items(tokenizer, part) for part in parts[s]) for s in SKILLS}
    return pools, parts, evals


def _train_family(
    staging: Path, spec: FamilySpec, seed: int, key: dict[str, Any], progress: bool
) -> dict[str, Any]:
    start, cpu_start = time.perf_counter(), time.process_time()
    previous_threads = torch.get_num_threads()
    threads = configure_threads()
    try:
        tokenizer = build_tokenizer(spec.arch)  # the files saved with each model; the same ids for every arch
        pad = tokenizer.pad_token_id
        pools, parts, evals = _encoded_data(seed)

        def score(model: PreTrainedModel) -> dict[str, dict[str, float]]:
            return {
                s: {
                    "search": exact_match(model, evals[s][0], pad),
                    "heldout": exact_match(model, evals[s][1], pad),
                }
                for s in SKILLS
            }

        total = spec.base.steps + sum(s.plan.steps for s in spec.specialists)
        bar = tqdm(
            total=total,
            desc=f"zoo {spec.size}/{spec.arch}",
            unit="step",
            file=sys.stderr,
            disable=not progress,
        )

        current = ["base"]

        def tick(loss: float) -> None:
            bar.update(1)
            bar.set_postfix(model=current[0], loss=f"{loss:.3f}", refresh=False)

        base = make_model(spec.size, spec.arch, tokenizer, seed)
        train(base, pools, spec.base, seed, pad, tick)
        models = [
            _entry(
                "base",
                "base",
                None,
                None,
                seed,
                spec.base.lr,
                spec.base.steps,
                _save(base, tokenizer, staging / "base"),
            )
        ]
        scores = {"base": score(base)}
        trained: dict[str, PreTrainedModel] = {}  # as released: the base plus the trained layers
        contexts: dict[str, PreTrainedModel] = {}  # as trained (differs for an on_top_of specialist)
        for i, sp in enumerate(spec.specialists):
            spec_seed = seed + 1000 * (i + 1)
            current[0] = sp.name
            layers = spec.layer_indices(sp.layers)
            model = copy.deepcopy(base)
            if sp.on_top_of is not None:
                below = next(s for s in spec.specialists[:i] if s.name == sp.on_top_of)
                _copy_layers(model, contexts[below.name], spec.layer_indices(below.layers))
            plan = replace(sp.plan, layers=layers)
            train(model, {s: pools[s] for s in plan.weights}, plan, spec_seed, pad, tick)
            contexts[sp.name] = model
            if sp.on_top_of is not None:
                model = _copy_layers(copy.deepcopy(base), model, layers)
            role = "specialist" if layers is None else f"{sp.layers}_layer_specialist"
            digest = _save(model, tokenizer, staging / sp.name)
            entry = _entry(sp.name, role, sp.skill, layers, spec_seed, sp.plan.lr, sp.plan.steps, digest)
            models.append(entry | {"replay": sp.replay, "trained_on_top_of": sp.on_top_of})
            scores[sp.name] = score(model)
            trained[sp.name] = model
        bar.close()

        lower = next(s for s in spec.specialists if s.layers == "lower")
        upper = next(s for s in spec.specialists if s.layers == "upper")
        recipe_model = _layer_recipe(base, trained[lower.name], trained[upper.name], spec)
        recipe_scores = score(recipe_model)
        recipe = {
            "description": "base, with the lower layers of the lower-layer specialist and the upper layers "
            "of the upper-layer specialist (the ground truth of a layer-donor search)"
            + (
                f"; {lower.name if lower.on_top_of else upper.name} was trained in exactly this configuration"
                if lower.on_top_of or upper.on_top_of
                else ""
            ),
            "base": "base",
            "layers": {
                **{str(i): lower.name for i in spec.layer_indices("lower") or ()},
                **{str(i): upper.name for i in spec.layer_indices("upper") or ()},
            },
            "lower_model": lower.name,
            "upper_model": upper.name,
            "lower_skill": lower.skill,
            "upper_skill": upper.skill,
            "scores": recipe_scores,
        }
        search = {m: {s: v["search"] for s, v in sc.items()} for m, sc in scores.items()}
        criteria = acceptance.check(
            search,
            {s.name: s.skill for s in spec.specialists},
            {**recipe, "scores": {s: v["search"] for s, v in recipe_scores.items()}},
        )
        manifest = {
            "zoo_version": ZOO_VERSION,
            "olmopt_version": __version__,
            "build_key": key,
            "size": spec.size,
            "arch": spec.arch,
            "seed": seed,
            "model_config": base.config.to_diff_dict() | {"architectures": [type(base).__name__]},
            "skills": {
                s: {
                    "description": SKILL_INFO[s].description,
                    "example": {"prompt": SKILL_INFO[s].example[0], "answer": SKILL_INFO[s].example[1]},
                    "base_mixture_weight": spec.base.weights[s],
                    "objective_file": f"objectives/{objective_file(s)}",
                    "search_items": len(parts[s][0]),
                    "heldout_items": len(parts[s][1]),
                }
                for s in SKILLS
            },
            "metric": "teacher-forced exact match (argmax right at every answer position incl. </s>)",
            "heldout_fraction": HELDOUT_FRACTION,
            "models": models,
            "scores": scores,
            "layer_recipe": recipe,
            "acceptance": {
                "split": "search",
                "criteria": criteria,
                "passed": all(c["passed"] for c in criteria),
            },
            "threads": threads,
            "cpu_kernels": cpu_capability(),
            "build_seconds": round(time.perf_counter() - start, 2),
            "cpu_seconds": round(time.process_time() - cpu_start, 2),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_manifest(staging, manifest)
        return manifest
    finally:
        torch.set_num_threads(previous_threads)


def _entry(
    name: str,
    role: str,
    skill: str | None,
    layers: tuple[int, ...] | None,
    seed: int,
    lr: float,
    steps: int,
    sha: str,
) -> dict[str, Any]:
    return {
        "name": name,
        "path": name,
        "role": role,
        "skill": skill,
        "trained_layers": "all" if layers is None else list(layers),
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "sha256": sha,
    }
