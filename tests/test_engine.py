"""The evaluation engine against hand computations, naive decoding, the prefix cache and batching.

Models: small llama/qwen2/mistral families whose base is trained for a few dozen steps on a reversal
task (so metrics take non-trivial values: some answers right, some wrong), plus two noisy donors.
Every reference value is computed per sample, without padding or batching, in float64.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _models import _noisy, char_tokenizer, make_config
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from olmopt.errors import InputError
from olmopt.evaluate.engine import Evaluator, Objective
from olmopt.evaluate.prefix_cache import PrefixCache
from olmopt.patch import WorkingModel
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import Recipe

BOS, EOS, PAD, USER, ASSISTANT = 2, 3, 0, 4, 5
LETTERS = "abcdefghij"
FORCED = ("token_accuracy", "bigram_loss", "perplexity")
TOL = 1e-5


@dataclass
class Family:
    pool: ModelPool
    tok: PreTrainedTokenizerFast
    rev: Path  # ShareGPT: reverse a string (first 16 items trained)
    mc: Path  # multiple choice
    items: list[tuple[str, str]]
    mc_items: list[dict[str, object]]


def _items(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9)))
        out.append((s, s[::-1]))
    return out


def _ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _prompt(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """The char tokenizer's chat template, by hand: ``<s><|user|>text<|assistant|>``."""
    return [BOS, USER, *_ids(tok, text), ASSISTANT]


def _build(root: Path, arch: str) -> Family:
    tok = char_tokenizer()
    items = _items(24, 1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(arch, 4, vocab=len(tok)))
    data = [(_prompt(tok, p), [*_ids(tok, a), EOS]) for p, a in items[:16]]
    width = max(len(p) + len(a) for p, a in data)
    ids = torch.full((len(data), width), PAD)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    for b, (p, a) in enumerate(data):
        ids[b, : len(p) + len(a)] = torch.tensor(p + a)
        attention[b, : len(p) + len(a)] = 1
        labels[b, len(p) : len(p) + len(a)] = torch.tensor(a)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(50):
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    paths = []
    for k, name in enumerate(["a", "b", "c"]):
        member = model if k == 0 else _noisy(model, 0.15, 10 + k)
        member.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(str(root / name))
    rev = root / "rev.json"
    rev.write_text(
        json.dumps(
            [{"conversation": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]} for p, a in items]
        )
    )
    rng = random.Random(2)
    mc_items: list[dict[str, object]] = []
    for _ in range(12):
        k = 3
        choices = rng.sample(list(LETTERS), k)
        mc_items.append({"question": "first?", "choices": choices, "answer": rng.randrange(k)})
    mc = root / "mc.json"
    mc.write_text(json.dumps(mc_items))
    pool = ModelPool(paths)
    pool.check_homology()
    return Family(pool, tok, rev, mc, items, mc_items)


_FAMILIES: dict[str, Family] = {}


def _family(arch: str, factory: pytest.TempPathFactory) -> Family:
    if arch not in _FAMILIES:
        _FAMILIES[arch] = _build(factory.mktemp(f"engine-{arch}"), arch)
    return _FAMILIES[arch]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return _family("llama", tmp_path_factory)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    return _family(request.param, tmp_path_factory)


def _objectives(fam: Family, *metrics: str, mc: bool = True) -> list[Objective]:
    objs = [Objective(m, fam.rev, m, held_out=0.0) for m in metrics]
    if mc:
        objs.append(Objective("mc", fam.mc, "mc_accuracy", held_out=0.0))
    return objs


# -- references ---------------------------------------------------------------------------------------


@torch.no_grad()
def _forced_reference(
    model: torch.nn.Module, tok: PreTrainedTokenizerFast, items: list[tuple[str, str]]
) -> dict[str, float]:
    """token_accuracy, bigram_loss, perplexity by hand: one unpadded forward per sample, float64."""
    acc, bigram, ce_sum, n_tok = [], [], 0.0, 0
    for p_text, a_text in items:
        prompt, answer = _prompt(tok, p_text), [*_ids(tok, a_text), EOS]
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double()
        probs = torch.softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(answer)], dim=-1)
        target = torch.tensor(answer)
        pmax, best = probs.max(dim=-1)
        right = best == target
        s = torch.where(right, 1 - pmax, torch.ones_like(pmax))
        acc.append(float(right.all()))
        bigram.append(float((s[:-1] + s[1:]).mean()) if len(answer) > 1 else float(2 * s[0]))
        ce_sum += float(-torch.log(probs[torch.arange(len(answer)), target]).sum())
        n_tok += len(answer)
    return {
        "token_accuracy": sum(acc) / len(acc),
        "bigram_loss": sum(bigram) / len(bigram),
        "perplexity": math.exp(ce_sum / n_tok),
    }


@torch.no_grad()
def _mc_reference(
    model: torch.nn.Module, tok: PreTrainedTokenizerFast, mc_items: list[dict[str, object]]
) -> float:
    right = 0
    for item in mc_items:
        choices = list(item["choices"])  # type: ignore[call-overload]
        text = "first? " + " ".join(f"{'ABCD'[i]}) {c}" for i, c in enumerate(choices))
        logits = model(input_ids=torch.tensor([_prompt(tok, text)])).logits[0, -1]
        letter_ids = [_ids(tok, L)[0] for L in "ABCD"[: len(choices)]]
        right += int(int(logits[letter_ids].argmax()) == item["answer"])
    return right / len(mc_items)


@torch.no_grad()
def _naive_greedy(
    model: torch.nn.Module, prompt: list[int], max_new: int, target: list[int] | None = None
) -> tuple[list[int], list[float]]:
    """The seed's loop: a full forward per generated token, no KV cache, one sample."""
    ids, toks, probs = list(prompt), [], []
    for t in range(max_new):
        p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), dim=-1)
        pmax, tok = p.max(dim=-1)
        toks.append(int(tok))
        probs.append(float(pmax))
        if int(tok) == EOS or (target is not None and t < len(target) and int(tok) != target[t]):
            break
        ids.append(int(tok))
    return toks, probs


def _exact_match_reference(
    model: torch.nn.Module, tok: PreTrainedTokenizerFast, items: list[tuple[str, str]], stop: bool
) -> float:
    scores = []
    for p_text, a_text in items:
        answer = [*_ids(tok, a_text), EOS]
        n = len(answer)
        toks, probs = _naive_greedy(model, _prompt(tok, p_text), n, answer if stop else None)
        toks += [PAD] * (n - len(toks))  # rows that stopped (EOS) hold padding with p_max 0
        probs += [0.0] * (n - len(probs))
        if stop:
            wrong = [k for k in range(n) if toks[k] != answer[k]]
            if wrong:
                k = wrong[0]
                scores.append(1 + (n - k - 1 + probs[k]) / n)
            else:
                scores.append(sum(1 - q for q in probs) / n)
        else:
            scores.append(
                sum((1 - q) if t == a else (1 + q) for t, q, a in zip(toks, probs, answer, strict=True)) / n
            )
    return sum(scores) / len(scores)


# -- tests ------------------------------------------------------------------------------------------------


def test_encoding_follows_the_chat_template(llama: Family) -> None:
    ev = Evaluator(
        AutoModelForCausalLM.from_pretrained(llama.pool.names[0]), llama.tok, _objectives(llama, "perplexity")
    )
    ev.prepare()
    enc = ev.encoded(ev.objectives[0], "search")
    assert enc.prompts == [_prompt(llama.tok, p) for p, _ in llama.items]
    assert enc.answers == [[*_ids(llama.tok, a), EOS] for _, a in llama.items]
    mc = ev.encoded(ev.objectives[1], "search")
    assert mc.choice_ids[0] == [_ids(llama.tok, L)[0] for L in "ABCD"[: len(llama.mc_items[0]["choices"])]]  # type: ignore[arg-type]
    assert mc.answer_index == [item["answer"] for item in llama.mc_items]


def test_teacher_forced_metrics_match_hand_computation(family: Family) -> None:
    wm = WorkingModel(family.pool, family.pool.names[0], device="cpu")
    ev = Evaluator(wm.model, family.tok, _objectives(family, *FORCED), batch_size=8)
    got = ev.evaluate()
    want = _forced_reference(wm.model, family.tok, family.items)
    want["mc"] = _mc_reference(wm.model, family.tok, family.mc_items)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=TOL, rel=TOL), name
    assert 0 < got["token_accuracy"] < 1 and 0 < got["bigram_loss"] < 2  # non-trivial model


def test_token_accuracy_equals_greedy_rollout(llama: Family) -> None:
    wm = WorkingModel(llama.pool, llama.pool.names[0], device="cpu")
    ev = Evaluator(
        wm.model, llama.tok, _objectives(llama, "token_accuracy", "accuracy", mc=False), batch_size=8
    )
    got = ev.evaluate()
    right = 0
    for p_text, a_text in llama.items:
        answer = [*_ids(llama.tok, a_text), EOS]
        toks, _ = _naive_greedy(wm.model, _prompt(llama.tok, p_text), len(answer))
        right += int(toks == answer)
    assert 0 < right < len(llama.items)
    assert got["token_accuracy"] == got["accuracy"] == pytest.approx(right / len(llama.items), abs=1e-7)


@pytest.mark.parametrize("stop", [True, False])
def test_exact_match_matches_hand_computation(llama: Family, stop: bool) -> None:
    wm = WorkingModel(llama.pool, llama.pool.names[0], device="cpu")
    ev = Evaluator(
        wm.model,
        llama.tok,
        _objectives(llama, "exact_match", mc=False),
        batch_size=8,
        stop_at_first_mismatch=stop,
    )
    got = ev.evaluate()["exact_match"]
    assert got == pytest.approx(_exact_match_reference(wm.model, llama.tok, llama.items, stop), abs=TOL)
    other = _exact_match_reference(wm.model, llama.tok, llama.items, not stop)
    assert abs(got - other) > 1e-3  # the knob changes the value on this data


def test_kv_cached_greedy_equals_naive_loop(family: Family) -> None:
    wm = WorkingModel(family.pool, family.pool.names[0], device="cpu")
    ev = Evaluator(wm.model, family.tok, _objectives(family, "exact_match", mc=False))
    trained = [p for p, _ in family.items[:4]]  # learnt: the model stops with EOS
    texts = ["ab", *trained, "j", "abcdefghijabc", "iiiiiiiiiiiiiiiiiii"]
    prompts = [_prompt(family.tok, t) for t in texts]  # lengths 5..22: left padding in one batch
    max_new = 14
    pred, pmax = ev.greedy(prompts, max_new)
    assert pred.shape == pmax.shape == (len(prompts), max_new)
    stopped = 0
    for b, prompt in enumerate(prompts):
        toks, probs = _naive_greedy(wm.model, prompt, max_new)
        stopped += len(toks) < max_new
        assert pred[b, : len(toks)].tolist() == toks, texts[b]
        assert pred[b, len(toks) :].eq(PAD).all() and pmax[b, len(toks) :].eq(0).all()
        assert torch.allclose(
            pmax[b, : len(toks)].double(), torch.tensor(probs, dtype=torch.float64), atol=TOL
        )
    assert stopped >= 1  # some row hit EOS early, the others kept decoding
    # stopping at the first mismatch against a target
    target = torch.tensor([[*_ids(family.tok, t[::-1]), EOS, *[PAD] * max_new][:max_new] for t in texts])
    pred_t, _ = ev.greedy(prompts, max_new, target)
    for b, prompt in enumerate(prompts):
        toks, _ = _naive_greedy(wm.model, prompt, max_new, target[b].tolist())
        assert pred_t[b, : len(toks)].tolist() == toks and pred_t[b, len(toks) :].eq(PAD).all()


def test_prefix_cache_gives_the_same_values(family: Family) -> None:
    a, b, c = family.pool.names
    wm = WorkingModel(family.pool, a, device="cpu")
    ev = Evaluator(wm.model, family.tok, _objectives(family, *FORCED), batch_size=8)
    cache = PrefixCache(ev, wm.adapter, wm.param_names)
    seen: set[tuple[float, ...]] = set()
    for layer in (1, 2, 3):
        cache.capture(layer)
        assert cache.layer == layer
        candidates = [
            Recipe(base=a, layers={layer: b}),
            Recipe(base=a, layers={layer: c, 3: b}),
            Recipe(base=a, units={f"model.layers.{layer}.mlp.up_proj": c, "model.norm": b}),
        ]
        if not family.pool.adapter.tied_embeddings:  # an untied head is after the prefix; a tied one is not
            candidates.append(Recipe(base=a, units={"lm_head": c}))
        for recipe in candidates:
            with wm.patched(recipe):
                full = ev.evaluate()
                cached = ev.evaluate(prefix=cache)
            for name in full:
                assert cached[name] == pytest.approx(full[name], abs=TOL, rel=TOL), (layer, recipe, name)
            seen.add(tuple(full.values()))
        # control: a change BELOW the prefix layer is invisible to the cached run, so values differ
        with wm.patched(Recipe(base=a, layers={layer - 1: c})):
            full = ev.evaluate()
            cached = ev.evaluate(prefix=cache)
        assert cached["perplexity"] != pytest.approx(full["perplexity"], rel=1e-4)
    assert len(seen) > 3  # the candidates really scored differently
    cache.clear()
    assert cache.layer is None and ev.evaluate(prefix=cache) == ev.evaluate()


def test_capture_pass_starts_from_a_valid_stored_input(family: Family) -> None:
    a, b, _c = family.pool.names
    wm = WorkingModel(family.pool, a, device="cpu")
    ev = Evaluator(wm.model, family.tok, _objectives(family, *FORCED), batch_size=8)
    cache = PrefixCache(ev, wm.adapter, wm.param_names)
    cache.capture(1)
    earlier = {key: {1: entry[1]} for key, entry in cache.store.items()}  # the input of layer 1 under a
    with wm.patched(Recipe(base=a, layers={1: b})):  # layer 1 changes; its own input stays valid
        cache.capture(2)
        full = {key: dict(entry) for key, entry in cache.store.items()}
        calls: list[int] = []
        handle = wm.model.base_model.layers[0].register_forward_pre_hook(lambda *_: calls.append(0))
        try:
            cache.capture(2, start=earlier)
        finally:
            handle.remove()
        assert not calls  # layer 0 did not run
        assert set(cache.store) == set(full) and cache.layer == 2
        for key, entry in full.items():
            assert set(cache.store[key]) == set(entry)
            for k, tensor in entry.items():
                assert torch.allclose(cache.store[key][k], tensor, atol=1e-6), (key, k)
        values = ev.evaluate(prefix=cache)
    with wm.patched(Recipe(base=a, layers={1: b})):
        assert values == pytest.approx(ev.evaluate(), abs=TOL, rel=TOL)


def test_batch_size_does_not_change_results(llama: Family) -> None:
    wm = WorkingModel(llama.pool, llama.pool.names[0], device="cpu")
    objs = _objectives(llama, *FORCED, "exact_match", "accuracy")
    results = [Evaluator(wm.model, llama.tok, objs, batch_size=bs).evaluate() for bs in (1, 5, 8)]
    for name in results[0]:
        for other in results[1:]:
            assert other[name] == pytest.approx(results[0][name], abs=TOL, rel=TOL), name


def test_held_out_split_is_scored_separately(llama: Family) -> None:
    wm = WorkingModel(llama.pool, llama.pool.names[0], device="cpu")
    obj = Objective("acc", llama.rev, "token_accuracy", held_out=0.25)
    ev = Evaluator(wm.model, llama.tok, [obj])
    assert len(ev.encoded(obj, "search")) == 18 and len(ev.encoded(obj, "held_out")) == 6
    search, held = ev.evaluate("search")["acc"], ev.evaluate("held_out")["acc"]
    assert search == pytest.approx(_forced_reference(wm.model, llama.tok, llama.items[:18])["token_accuracy"])
    assert held == pytest.approx(_forced_reference(wm.model, llama.tok, llama.items[18:])["token_accuracy"])


def test_objective_checks(llama: Family) -> None:
    model = torch.nn.Linear(1, 1)
    with pytest.raises(InputError, match="objective names must be unique"):
        Evaluator(
            model,
            llama.tok,
            [Objective("x", llama.rev, "perplexity"), Objective("x", llama.mc, "perplexity")],
        )
    with pytest.raises(InputError, match="unknown metric 'bleu'"):
        Evaluator(model, llama.tok, [Objective("x", llama.rev, "bleu")])
    ev = Evaluator(model, llama.tok, [Objective("x", llama.rev, "mc_accuracy")])
    with pytest.raises(InputError, match=r"rev\.json: metric mc_accuracy needs multiple-choice items"):
        ev.prepare()
    assert Objective("x", llama.rev, "exact_match").direction == "minimize"
    assert Objective("x", llama.rev, "token_accuracy").direction == "maximize"


def test_mc_items_with_different_numbers_of_choices(llama: Family, tmp_path: Path) -> None:
    """The dataset format allows 2..26 choices per item; one batch may mix them."""
    items: list[dict[str, object]] = [
        {"question": "first?", "choices": list("hgfe"[:k]), "answer": k - 1} for k in (2, 3, 4, 2, 3, 4)
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(items))
    wm = WorkingModel(llama.pool, llama.pool.names[0], device="cpu")
    ev = Evaluator(wm.model, llama.tok, [Objective("mc", path, "mc_accuracy", held_out=0.0)], batch_size=8)
    assert ev.evaluate()["mc"] == pytest.approx(_mc_reference(wm.model, llama.tok, items), abs=1e-7)
