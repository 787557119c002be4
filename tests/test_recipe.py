"""The Recipe: JSON round trip, one-line validation errors, digest stability, renaming."""

from __future__ import annotations

import hashlib
import json

import pytest

from olmopt.errors import InputError
from olmopt.methods.dfs.path import DfsPath
from olmopt.recipe import EsStep, FusionStep, ParamMerge, Recipe

UNITS = ["model.embed_tokens", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "model.norm"]


def _full() -> Recipe:
    return Recipe(
        base="a",
        boundary="b",
        layers={0: "b", 3: "c"},
        units={"model.layers.1.self_attn.q_proj": "c"},
        es=(
            EsStep(unit="model.layers.1.self_attn.q_proj", kind="svd", sigma=0.05, seed=7),
            EsStep(unit="model.layers.0.mlp.up_proj", kind="norm", sigma=0.005, seed=0),
        ),
        param_merge=ParamMerge(
            method="della", models=("b", "c"), params={"drop": 0.3, "rescale": True}, seed=3
        ),
        fusion=(FusionStep(into=2, remove=3, alpha=0.625),),
        dfs=DfsPath(hops=(("a", 0), ("b", 1)), scales=(1.0, 0.5), input_model="a", output_model="b"),
    )


def _one_line(exc: pytest.ExceptionInfo[InputError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.startswith("recipe: ")
    assert exc.value.exit_code == 2
    return text


def test_json_round_trip_every_field() -> None:
    recipe = _full()
    back = Recipe.from_json(recipe.to_json())
    assert back == recipe
    assert back.layers == {0: "b", 3: "c"} and all(isinstance(k, int) for k in back.layers)
    assert back.es[0] == EsStep(unit="model.layers.1.self_attn.q_proj", kind="svd", sigma=0.05, seed=7)
    assert back.fusion[0].alpha == 0.625 and back.dfs is not None and back.dfs.hops[1] == ("b", 1)
    assert back.param_merge is not None and back.param_merge.params == {"drop": 0.3, "rescale": True}
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    assert back.to_json() == recipe.to_json()


def test_a_data_flow_path_in_recipe_json() -> None:
    path = DfsPath(hops=(("a", 0), ("b", 1)), scales=(1.0, 0.5), input_model="a", output_model="b")
    text = Recipe(base="a", dfs=path).to_json()
    assert text == (
        '{"base":"a","dfs":{"hops":[["a",0],["b",1]],"input_model":"a","output_model":"b",'
        '"scales":[1.0,0.5]},"version":1}'
    )
    assert Recipe.from_json(text).dfs == path
    bad = {"hops": [["a", 0]], "scales": [1.0, 2.0], "input_model": "a", "output_model": "a"}
    with pytest.raises(InputError) as exc:
        Recipe.from_dict({"base": "a", "dfs": bad})
    assert _one_line(exc).startswith("recipe: dfs:") and "1 hops but 2 scales" in str(exc.value)
    indexed = {"hops": [[0, 0]], "scales": [1.0], "input_model": 0, "output_model": 0}
    with pytest.raises(InputError, match="names pool models, not model indices"):
        Recipe.from_dict({"base": "a", "dfs": indexed})


def test_minimal_json_form() -> None:
    assert Recipe(base="a").to_json() == '{"base":"a","version":1}'
    assert Recipe(base="a", layers={1: "b"}).to_dict() == {"base": "a", "layers": {"1": "b"}, "version": 1}


def test_digest_is_sha256_of_canonical_json() -> None:
    canonical = '{"base":"a","layers":{"1":"b","2":"c"},"units":{"u":"b"},"version":1}'
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    one = Recipe(base="a", layers={1: "b", 2: "c"}, units={"u": "b"})
    other = Recipe(base="a", units={"u": "b"}, layers={2: "c", 1: "b"})  # insertion order differs
    assert one.digest() == other.digest() == expected
    assert Recipe(base="a", layers={1: "c", 2: "c"}, units={"u": "b"}).digest() != expected
    assert Recipe.from_json(one.to_json()).digest() == expected


def test_edits_return_new_recipes() -> None:
    base = Recipe(base="a")
    edited = (
        base.with_layer(2, "b").with_unit("u", "c").with_es(EsStep(unit="u", kind="norm", sigma=0.1, seed=1))
    )
    assert base == Recipe(base="a")
    assert edited.layers == {2: "b"} and edited.units == {"u": "c"} and len(edited.es) == 1
    assert edited.donors() == {"a", "b", "c"}
    assert _full().donors() == {"a", "b", "c"}


def test_renamed_maps_every_donor() -> None:
    mapping = {"a": "/m/a", "b": "/m/b", "c": "/m/c"}
    out = _full().renamed(mapping)
    assert out.base == "/m/a" and out.boundary == "/m/b"
    assert out.layers == {0: "/m/b", 3: "/m/c"}
    assert out.units == {"model.layers.1.self_attn.q_proj": "/m/c"}
    assert out.param_merge is not None and out.param_merge.models == ("/m/b", "/m/c")
    assert out.dfs is not None and out.dfs.hops == (("/m/a", 0), ("/m/b", 1))
    assert out.es == _full().es and out.fusion == _full().fusion
    assert out.renamed({v: k for k, v in mapping.items()}) == _full()


def test_renamed_donor_named_like_a_recipe_key() -> None:
    """The zoo's base model directory is called ``base``; renaming it must not touch the JSON keys."""
    recipe = Recipe(base="base", layers={1: "spec_add"}, units={"model.norm": "base"})
    out = recipe.renamed({"base": "/zoo/base", "spec_add": "/zoo/spec_add"})
    assert out == Recipe(base="/zoo/base", layers={1: "/zoo/spec_add"}, units={"model.norm": "/zoo/base"})


def test_renamed_swap() -> None:
    recipe = Recipe(base="a", layers={1: "b"})
    assert recipe.renamed({"a": "b", "b": "a"}) == Recipe(base="b", layers={1: "a"})


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (Recipe(base="a", layers={1: "zz"}), "recipe: donor 'zz' is not in the pool (a, b, c)"),
        (Recipe(base="a", boundary="q"), "recipe: donor 'q' is not in the pool (a, b, c)"),
        (Recipe(base="a", layers={4: "b"}), "recipe: layer 4 out of range (model has 4 layers)"),
        (Recipe(base="a", layers={-1: "b"}), "recipe: layer -1 out of range (model has 4 layers)"),
        (
            Recipe(base="a", units={"model.layers.9.mlp": "b"}),
            "recipe: unit 'model.layers.9.mlp' does not exist",
        ),
        (
            Recipe(base="a", es=(EsStep(unit="nope", kind="svd", sigma=0.1, seed=0),)),
            "recipe: unit 'nope' does not exist",
        ),
    ],
)
def test_validate_against_pool(recipe: Recipe, message: str) -> None:
    with pytest.raises(InputError) as exc:
        recipe.validate_against(["a", "b", "c"], 4, UNITS)
    assert _one_line(exc).startswith(message)


def test_valid_recipe_passes_validation() -> None:
    Recipe(base="a", boundary="c", layers={0: "b", 3: "c"}, units={UNITS[1]: "b"}).validate_against(
        ["a", "b", "c"], 4, UNITS
    )


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('{"base": "a",', r"^recipe: not valid JSON: "),
        ('{"base": "a", "colour": "red"}', r"^recipe: colour: Extra inputs are not permitted$"),
        ('{"layers": {"1": "b"}}', r"^recipe: base: Field required$"),
        ('{"base": "a", "layers": {"x": "b"}}', r"^recipe: layers\.x\.\[key\]: "),
        ('{"base": "a", "version": 99}', r"^recipe: version: .*newer than this olmopt understands"),
        (
            '{"base": "a", "es": [{"unit": "u", "kind": "svd", "sigma": 0, "seed": 1}]}',
            r"^recipe: es\.0\.sigma: ",
        ),
        (
            '{"base": "a", "es": [{"unit": "u", "kind": "gauss", "sigma": 1, "seed": 1}]}',
            r"^recipe: es\.0\.kind: ",
        ),
        ('{"base": "a", "fusion": [{"into": 1, "remove": 2, "alpha": 1.5}]}', r"^recipe: fusion\.0\.alpha: "),
    ],
)
def test_bad_json_is_one_line(text: str, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern) as exc:
        Recipe.from_json(text)
    _one_line(exc)


def test_recipes_are_immutable() -> None:
    recipe = Recipe(base="a")
    with pytest.raises(Exception, match="frozen"):
        recipe.base = "b"  # type: ignore[misc]
