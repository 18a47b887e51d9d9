"""Strict TOML recipes: typed values from a dataclass schema; unknown keys and wrong types name the key path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from lmctk.errors import ConfigError, MissingPathError
from lmctk.recipes import load_recipe, parse


@dataclass
class Item:
    path: str
    weight: float = 1.0


@dataclass
class Section:
    items: list[Item]
    mode: Literal["a", "b"] = "a"
    size: int | None = None
    tags: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    flag: bool = False

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 0:
            raise ConfigError("size: must not be negative")


@dataclass
class Recipe:
    main: Section
    note: str | None = None


def _load(tmp_path, text: str):
    file = tmp_path / "r.toml"
    file.write_text(text)
    return load_recipe(file, Recipe)


GOOD = """
note = "hello"
[main]
mode = "b"
size = 3
tags = ["x", "y"]
options = { depth = 2, name = "n" }
[[main.items]]
path = "a"
[[main.items]]
path = "b"
weight = 2      # an integer where a float is expected is fine
"""


def test_recipe_parses_into_typed_dataclasses(tmp_path):
    recipe = _load(tmp_path, GOOD)
    assert recipe == Recipe(Section([Item("a"), Item("b", 2.0)], "b", 3, ["x", "y"], {"depth": 2, "name": "n"}), "hello")
    assert isinstance(recipe.main.items[1].weight, float)


def test_unknown_key_error_names_the_key_path(tmp_path):
    with pytest.raises(ConfigError, match=r"main\.items\[1\]\.wieght: unknown key; known keys in main\.items\[1\]: path, weight"):
        _load(tmp_path, GOOD.replace("weight = 2", "wieght = 2"))
    with pytest.raises(ConfigError, match=r"r\.toml: extra: unknown key"):
        _load(tmp_path, "extra = 1\n" + GOOD)


def test_wrong_types_are_named_with_expected_and_found(tmp_path):
    with pytest.raises(ConfigError, match=r"main\.items\[0\]\.weight: expected a number, got a string"):
        _load(tmp_path, GOOD.replace('path = "a"', 'path = "a"\nweight = "heavy"'))
    with pytest.raises(ConfigError, match=r"main\.size: expected an integer, got a number"):
        _load(tmp_path, GOOD.replace("size = 3", "size = 3.5"))
    with pytest.raises(ConfigError, match=r"main\.flag: expected true or false, got an integer"):
        _load(tmp_path, GOOD.replace("size = 3", "size = 3\nflag = 1"))
    with pytest.raises(ConfigError, match=r"main\.tags\[1\]: expected a string"):
        _load(tmp_path, GOOD.replace('["x", "y"]', '["x", 2]'))
    with pytest.raises(ConfigError, match=r"main\.mode: 'c' is not allowed; choose one of 'a', 'b'"):
        _load(tmp_path, GOOD.replace('mode = "b"', 'mode = "c"'))


def test_missing_required_key_and_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"main\.items\[0\]\.path: missing required key"):
        _load(tmp_path, GOOD.replace('path = "a"', 'weight = 1.0'))
    with pytest.raises(ConfigError, match=r"main: size: must not be negative"):
        _load(tmp_path, GOOD.replace("size = 3", "size = -1"))


def test_bad_toml_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        _load(tmp_path, "[main\n")
    with pytest.raises(MissingPathError):
        load_recipe(tmp_path / "nope.toml", Recipe)


def test_section_selects_a_table_and_parse_works_on_plain_data(tmp_path):
    file = tmp_path / "r.toml"
    file.write_text(GOOD)
    assert load_recipe(file, Section, section="main").mode == "b"
    with pytest.raises(ConfigError, match=r"no \[other\] table"):
        load_recipe(file, Section, section="other")
    assert parse({"path": "p"}, Item) == Item("p")
    assert parse(None, int | None) is None


def test_soup_recipe_round_trips_through_toml(tmp_path):
    from lmctk.soup import (
        IngredientConfig,
        SoupConfig,
        SoupRecipe,
        TaskConfig,
        load_soup_recipe,
    )

    recipe = SoupRecipe(SoupConfig([IngredientConfig("a", 1.0), IngredientConfig("b", 3.0)], out="o", method="weighted",
                                 dtype="bfloat16", tolerance=0.01), TaskConfig("digits", {"seed": 1}))
    file = tmp_path / "soup.toml"
    file.write_text(recipe.to_toml())
    assert load_soup_recipe(file) == recipe


def test_soup_recipe_rejects_weights_for_uniform_soups(tmp_path):
    from lmctk.soup import load_soup_recipe

    file = tmp_path / "soup.toml"
    file.write_text('[soup]\nmethod = "uniform"\n[[soup.ingredients]]\npath = "a"\n[[soup.ingredients]]\npath = "b"\nweight = 2.0\n')
    with pytest.raises(ConfigError, match=r"ingredients\[1\]\.weight: only weighted soups take weights"):
        load_soup_recipe(file)
