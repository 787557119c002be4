"""Zoo building blocks: tokenizer + chat contract, shipped
objectives, exact match, LR schedule, CLI input errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from olmopt.cli import main
from olmopt.errors import InputError
from olmopt.evaluate.formatting import encode_example, render_choices, sharegpt_to_messages
from olmopt.zoo.objectives import MC_CHOICES_FILE, OBJECTIVES_DIR, load_objective, split, write_objectives
from olmopt.zoo.score import exact_match
from olmopt.zoo.skills import SKILLS, fact_table, objective_items, training_pool
from olmopt.zoo.tokenizer import build_tokenizer
from olmopt.zoo.train import TrainPlan, collate, lr_at


def test_tokenizer_round_trip_and_chat_contract(tmp_path: Path) -> None:
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": render_choices("larger?", ["17", "42"])}]
    for t in (tok, reloaded):
        prompt, answer = encode_example(t, messages, "B")
        assert t.convert_ids_to_tokens(prompt) == ["<s>", "<|user|>", *"larger? A) 17 B) 42", "<|assistant|>"]
        assert t.convert_ids_to_tokens(answer) == ["B", "</s>"]
    assert encode_example(tok, messages, "B") == encode_example(reloaded, messages, "B")
    assert len(reloaded) == 103 and reloaded.eos_token_id == 3 and reloaded.pad_token_id == 0
    text = "code of bajel? JIH 12+34=46 rev abcd"
    assert reloaded.decode(reloaded(text, add_special_tokens=False)["input_ids"]) == text
    assert (tmp_path / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (tmp_path / "tokenizer_config.json").read_text()
    )


def test_shipped_objectives_match_generator_and_formats(tmp_path: Path) -> None:
    write_objectives(tmp_path)
    for path in tmp_path.iterdir():
        assert path.read_text() == (OBJECTIVES_DIR / path.name).read_text(), f"{path.name} is stale"
    for skill in SKILLS:
        rows = json.loads((OBJECTIVES_DIR / f"{skill}.json").read_text())
        assert len(rows) == 200
        messages, answer = sharegpt_to_messages(rows[0]["conversation"])
        assert messages[0]["role"] == "user" and answer
        assert load_objective(skill) == objective_items(skill)
        assert len(set(load_objective(skill))) == 200
    mc = json.loads((OBJECTIVES_DIR / MC_CHOICES_FILE).read_text())
    assert [(render_choices(q["question"], q["choices"]), "AB"[q["answer"]]) for q in mc] == load_objective(
        "mc"
    )
    assert all(int(q["choices"][q["answer"]]) > int(q["choices"][1 - q["answer"]]) for q in mc)
    add = load_objective("add")
    assert all(int(p[:2]) + int(p[3:5]) == int(a) for p, a in add)
    assert all(p[4:][::-1] == a for p, a in load_objective("rev"))


def test_split_is_first_75_last_25_percent() -> None:
    items = [(str(i), str(i)) for i in range(201)]
    search, held = split(items)
    assert len(held) == 51 and held[0] == ("150", "150") and search + held == items


def test_training_pools_are_disjoint_from_objectives_except_fact() -> None:
    rng = random.Random(0)
    for skill in ("add", "rev", "mc"):
        held = {p for p, _ in objective_items(skill)}
        pool = training_pool(skill, rng)
        assert len(pool) >= 4000 and not held & {p for p, _ in pool}
    assert set(objective_items("fact")) == set(fact_table())  # memorisation: the table is the skill
    assert len({p for p, _ in training_pool("add", rng)}) == 90 * 90 - 200


class _FixedLogits(torch.nn.Module):
    """A stand-in model whose argmax at position t of the i-th row it sees is ``pred[i][t]``."""

    def __init__(self, pred: list[list[int]], vocab: int = 8) -> None:
        super().__init__()
        self.pred, self.vocab, self.seen = pred, vocab, 0

    def forward(self, input_ids: torch.Tensor):  # type: ignore[no-untyped-def]
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for r in range(input_ids.shape[0]):
            for t, tok in enumerate(self.pred[self.seen + r][: input_ids.shape[1]]):
                logits[r, t, tok] = 1.0
        self.seen += input_ids.shape[0]
        return type("Out", (), {"logits": logits})()


def test_exact_match_needs_every_answer_position_including_eos() -> None:
    items = [([1, 2], [5, 3]), ([1, 2], [6, 3]), ([1, 2, 4], [7, 3])]
    # predictions at positions 0..: the answer starts being predicted at len(prompt) - 1
    pred = [[0, 5, 3, 0], [0, 6, 4, 0], [0, 0, 7, 3]]  # row 1 misses </s>
    assert exact_match(_FixedLogits(pred), items, pad_id=0) == pytest.approx(2 / 3)
    assert exact_match(_FixedLogits(pred), items, pad_id=0, batch_size=1) == pytest.approx(2 / 3)
    ids, labels = collate(items[:2], pad_id=0)
    assert ids.tolist() == [[1, 2, 5, 3], [1, 2, 6, 3]]
    assert labels.tolist() == [[-100, -100, 5, 3], [-100, -100, 6, 3]]


def test_lr_schedule_warmup_then_cosine_to_ten_percent() -> None:
    plan = TrainPlan({"add": 1.0}, steps=100, lr=1e-3)
    assert lr_at(0, plan) == pytest.approx(2e-4)  # warmup of 5 steps
    assert lr_at(4, plan) == pytest.approx(1e-3)
    assert lr_at(5, plan) == pytest.approx(1e-3)
    assert lr_at(99, plan) == pytest.approx(1e-4, rel=0.01)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--size", "huge", "zoo size 'huge' is not one of: tiny, small"), ("--arch", "gpt2", "zoo arch 'gpt2'")],
)
def test_cli_bad_size_or_arch_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    out = tmp_path / "zoo"
    assert main(["zoo", "build", "--out", str(out), flag, value, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lower-layers", "2,x"], "--lower-layers: expected layer indices separated by commas, got '2,x'"),
        (["--upper-layers", "4"], "zoo upper layers: 4 is out of range for tiny (0-3)"),
        (["--lower-layers", "1,1"], "zoo lower layers: [1, 1] repeats an index"),
        (["--lower-layers", "1,2"], "zoo lower and upper layers share [2]: each layer has one specialist"),
        (
            ["--size", "small", "--upper-layers", "2,-1"],
            "zoo upper layers: -1 is out of range for small (0-5)",
        ),
    ],
)
def test_cli_bad_layer_layout_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    out = tmp_path / "zoo"
    assert main(["zoo", "build", "--out", str(out), *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_layout_variant_moves_the_layer_specialists_and_changes_only_their_plan() -> None:
    from olmopt.zoo.build import build_key
    from olmopt.zoo.family import family_spec, with_layers

    small = family_spec("small", "llama")
    assert family_spec("small", "llama", lower=(1, 0), upper=(5, 4)) == small  # its own layers, any order
    moved = family_spec("small", "llama", lower=(3, 2))
    assert (moved.layer_indices("lower"), moved.layer_indices("upper")) == ((2, 3), (4, 5))
    assert moved.specialists == small.specialists and moved.base == small.base
    assert build_key(moved, 0)["plan"] != build_key(small, 0)["plan"]
    tiny = with_layers(family_spec("tiny", "llama"), None, (3,))
    assert (tiny.layer_indices("lower"), tiny.layer_indices("upper")) == ((0, 1), (3,))
    with pytest.raises(InputError, match="zoo lower layers: give at least one layer index"):
        with_layers(small, (), None)


def test_cli_choices_match_library() -> None:
    from olmopt.commands import zoo as zoo_command
    from olmopt.zoo.train import ARCHS, SIZES

    assert tuple(SIZES) == zoo_command.SIZES and ARCHS == zoo_command.ARCHS


# Plan digests of the pinned families whose acceptance was verified by a full build (docs/zoo.md
# "Pinned seeds"). Only tiny llama is rebuilt by the suite; a change here silently changes the others.
VERIFIED_PLANS = {
    ("tiny", "llama"): "489e2bdee3659f85",
    ("tiny", "qwen2"): "9d03f2dd5c6da24b",
    ("tiny", "mistral"): "dfa3c36fc6817309",
    ("small", "llama"): "98f225e3ed8ad089",
    ("small", "qwen2"): "ca47430e23886a94",
    ("small", "mistral"): "c4cfcaacdc004eeb",
}


def test_pinned_family_plans_are_the_verified_ones() -> None:
    from olmopt.zoo.build import build_key
    from olmopt.zoo.family import PINNED_SEEDS, family_spec

    assert set(PINNED_SEEDS) == set(VERIFIED_PLANS)
    for (size, arch), digest in VERIFIED_PLANS.items():
        plan = build_key(family_spec(size, arch), PINNED_SEEDS[size, arch][0])["plan"]
        assert plan == digest, (
            f"{size}/{arch}: plan changed; rebuild it, check acceptance, update docs/zoo.md and this digest"
        )


def test_pinned_seeds_put_the_seed_verified_on_this_vendor_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each vendor tries the seed that passes there first (docs/zoo.md "Pinned seeds"), the others after it
    in list order; a vendor without a verified seed (and a family whose seeds agree) keeps the list."""
    import olmopt.zoo.family as family
    from olmopt.zoo.family import PINNED_SEEDS, VENDOR_SEEDS, pinned_seeds

    assert pinned_seeds("small", "llama", "amd") == (0, 6)
    assert pinned_seeds("small", "llama", "intel") == (6, 0)
    assert pinned_seeds("tiny", "mistral", "intel") == (6, 3)
    assert pinned_seeds("small", "qwen2", "intel") == (2, 0)
    assert pinned_seeds("small", "llama", "other") == PINNED_SEEDS["small", "llama"]
    assert pinned_seeds("tiny", "llama", "intel") == (1,)
    for (size, arch), by_vendor in VENDOR_SEEDS.items():  # every verified seed is one of the pinned ones
        assert set(by_vendor.values()) <= set(PINNED_SEEDS[size, arch])
        for vendor in by_vendor:
            assert sorted(pinned_seeds(size, arch, vendor)) == sorted(PINNED_SEEDS[size, arch])
    monkeypatch.setattr(family, "cpu_vendor", lambda: "intel")  # no vendor given: this CPU's
    assert pinned_seeds("small", "qwen2") == (2, 0)
