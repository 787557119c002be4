"""Evaluation datasets: bad input is one InputError line naming the file; splits and sample caps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import char_tokenizer

from olmopt.errors import InputError
from olmopt.evaluate.datasets import Example, encode, file_digest, load_examples, split_examples
from olmopt.evaluate.engine import Evaluator, Objective
from olmopt.evaluate.metrics import METRICS, get_metric


def _conv(q: str, a: str) -> dict[str, Any]:
    return {"conversation": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def _write(tmp_path: Path, data: Any, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _fails(path: Path, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern) as exc:
        load_examples(path)
    text = str(exc.value)
    assert "\n" not in text and text.startswith(f"dataset {path}: ")
    assert exc.value.exit_code == 2


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ('[{"conversation": [', r"not valid JSON \(Expecting value: line 1 column 20"),
        ("[]", r": is empty$"),
        ('{"conversation": []}', r"expected a JSON list of items$"),
        ([{"text": "hello"}], r"item 0: neither ShareGPT \('conversation'\) nor multiple-choice"),
        ([_conv("a", "b"), {"question": "q", "choices": ["x", "y"]}], r"item 1: neither ShareGPT"),
        (
            [{"conversation": [{"from": "human", "value": "only one turn"}]}],
            r"item 0: 'conversation' must list >= 2",
        ),
        (
            [{"conversation": [{"from": "human"}, {"from": "gpt", "value": "x"}]}],
            r"item 0: 'conversation' must list",
        ),
        (
            [{"question": "q", "choices": ["x", "y", "z"], "answer": 3}],
            r"item 0: 'answer' must be the index of a choice",
        ),
        ([{"question": "q", "choices": ["x", "y"], "answer": -1}], r"item 0: 'answer' must be the index"),
        ([{"question": "q", "choices": ["x", "y"], "answer": "x"}], r"item 0: 'answer' must be the index"),
        ([{"question": "q", "choices": ["x"], "answer": 0}], r"item 0: 'choices' must list 2\.\.26 options"),
    ],
)
def test_bad_files_are_one_line_input_errors(tmp_path: Path, data: Any, pattern: str) -> None:
    _fails(_write(tmp_path, data), pattern)


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    _fails(tmp_path / "absent.json", r"file not found$")
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"conversation": "\xff"}]')
    _fails(path, r"not valid JSON")


def test_answer_that_tokenizes_to_nothing(tmp_path: Path) -> None:
    path = _write(tmp_path, [_conv("1+1=", "2"), _conv("2+2=", "")])
    examples = load_examples(path)
    with pytest.raises(InputError) as exc:
        encode(char_tokenizer(), examples, path)
    assert str(exc.value) == f"dataset {path}: item 1: the answer '' tokenizes to nothing"
    ev = Evaluator(
        torch.nn.Linear(1, 1), char_tokenizer(), [Objective("x", path, "perplexity", held_out=0.0)]
    )
    with pytest.raises(InputError, match="tokenizes to nothing"):
        ev.prepare()  # fails before any model work


def test_parsing_sharegpt_and_mc(tmp_path: Path) -> None:
    sharegpt = [
        {
            "conversation": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "2+2="},
                {"from": "gpt", "value": "4"},
            ]
        }
    ]
    (ex,) = load_examples(_write(tmp_path, sharegpt, "s.json"))
    assert ex == Example((("system", "Be brief."), ("user", "2+2=")), "4")
    (mc,) = load_examples(
        _write(tmp_path, [{"question": "Pick", "choices": ["x", 7], "answer": 1}], "m.json")
    )
    assert mc == Example((("user", "Pick A) x B) 7"),), "B", ("x", "7"), 1)


def test_encode_mc_letter_ids(tmp_path: Path) -> None:
    tok = char_tokenizer()
    path = _write(tmp_path, [{"question": "q", "choices": ["x", "y", "z"], "answer": 2}])
    enc = encode(tok, load_examples(path), path)
    letters = [tok.convert_tokens_to_ids(c) for c in "ABC"]
    assert enc.choice_ids == [letters] and enc.answer_index == [2]
    assert enc.answers == [[tok.convert_tokens_to_ids("C"), tok.eos_token_id]] and enc.answer_texts == ["C"]
    assert enc.prompts[0][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")]


def test_unknown_metric() -> None:
    with pytest.raises(InputError) as exc:
        get_metric("bleu")
    assert str(exc.value) == f"unknown metric 'bleu' (choose from {', '.join(sorted(METRICS))})"
    assert exc.value.exit_code == 2
    assert get_metric("bigram_loss").direction == "minimize"


@pytest.mark.parametrize(
    ("n", "held_out", "n_held"),
    [
        (10, 0.25, 3),
        (8, 0.25, 2),
        (10, 0.1, 1),
        (3, 0.01, 1),
        (10, 0.0, 0),
        (10, 0.3, 3),
        (10, 0.7, 7),
        (4, 1.0, 4),
        (100, 0.07, 7),
        (50, 0.14, 7),
    ],
)
def test_held_out_is_the_last_ceil_fraction(n: int, held_out: float, n_held: int) -> None:
    examples = [Example((("user", str(i)),), str(i)) for i in range(n)]
    held = split_examples(examples, held_out, "held_out", None)
    search = split_examples(examples, held_out, "search", None)
    assert held == examples[n - n_held :] and search == examples[: n - n_held]


def test_samples_caps_each_part() -> None:
    examples = [Example((("user", str(i)),), str(i)) for i in range(20)]
    assert split_examples(examples, 0.25, "search", 4) == examples[:4]
    assert split_examples(examples, 0.25, "held_out", 4) == examples[15:19]
    assert split_examples(examples, 0.25, "held_out", 100) == examples[15:]


def test_empty_split_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, [_conv("a", "b"), _conv("c", "d")])
    ev = Evaluator(
        torch.nn.Linear(1, 1), char_tokenizer(), [Objective("x", path, "perplexity", held_out=0.0)]
    )
    with pytest.raises(InputError, match=r"the held_out part is empty$"):
        ev.prepare("held_out")
    ev = Evaluator(
        torch.nn.Linear(1, 1), char_tokenizer(), [Objective("x", path, "perplexity", held_out=1.0)]
    )
    with pytest.raises(InputError, match=r"the search part is empty$"):
        ev.prepare("search")


def test_file_digest(tmp_path: Path) -> None:
    path = _write(tmp_path, "[]")
    assert file_digest(path) == "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"
