"""Per-item results and chunked evaluation on real (small random) models; early stopping in a campaign."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from olmopt.evaluate.engine import Evaluator, Objective
from olmopt.evaluate.item_scores import metric_of_items

sys.path.insert(0, str(Path(__file__).parent))
from _models import char_tokenizer, make_family, write_addition_data  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("early_stop_family")
    close = make_family(root / "close", ["a", "b"], layers=2, noise=0.05)
    far = make_family(root / "far", ["a2", "x", "c"], layers=2, noise=3.0)  # the same base, c heavily damaged
    return {"a": close["a"], "b": close["b"], "c": far["c"], "data": write_addition_data(root / "add.json", n=120)}


def _objectives(data: Path) -> list[Objective]:
    return [
        Objective("ppl", data, "perplexity", held_out=0.0),
        Objective("acc", data, "token_accuracy", held_out=0.0),
        Objective("bigram", data, "bigram_loss", held_out=0.0),
    ]


def test_item_values_give_the_objective_values(family: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(family["b"])
    ev = Evaluator(model, char_tokenizer(), _objectives(family["data"]), batch_size=16)
    values = ev.evaluate()
    assert {n: len(v) for n, v in ev.item_scores.items()} == {"ppl": 120, "acc": 120, "bigram": 120}
    assert set(ev.item_scores["acc"].values()) <= {0.0, 1.0}
    for name in ("acc", "bigram"):
        assert metric_of_items("", ev.item_scores[name]) == pytest.approx(values[name], rel=1e-5)
    assert metric_of_items("perplexity", ev.item_scores["ppl"], ev.item_tokens["ppl"]) == pytest.approx(values["ppl"], rel=1e-5)


def test_chunks_partition_the_items_in_a_fixed_seeded_order(family: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(family["b"])
    whole = Evaluator(model, char_tokenizer(), _objectives(family["data"]), batch_size=16)
    whole.evaluate()

    def chunk_items(seed: int) -> tuple[list[set[int]], dict[int, float]]:
        ev = Evaluator(model, char_tokenizer(), _objectives(family["data"]), batch_size=16, chunks=(seed, 20))
        assert ev.looks() == 6  # 120 items in chunks of 20
        sets, bigram = [], {}
        for c in range(ev.looks()):
            ev.evaluate(chunk=c)
            sets.append(set(ev.item_scores["bigram"]))
            bigram.update(ev.item_scores["bigram"])
        return sets, bigram

    sets, bigram = chunk_items(7)
    assert [len(s) for s in sets] == [20] * 6 and set().union(*sets) == set(range(120))
    assert sets != [set(range(20 * c, 20 * c + 20)) for c in range(6)]  # shuffled, not in file order
    assert bigram == pytest.approx(whole.item_scores["bigram"], abs=1e-5)  # the same values, chunk by chunk
    assert chunk_items(7)[0] == sets  # every candidate of a campaign: the same order
    assert chunk_items(8)[0] != sets  # another campaign seed: another order
