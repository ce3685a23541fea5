"""Every benchmark under bench/ imports (the benches share helpers through bench/common.py, and `make
bench` runs them outside the suite: a broken import would otherwise surface only there)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

BENCHES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "bench").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", BENCHES)
def test_the_benchmark_imports(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert module.__doc__, f"bench/{name}.py says what it measures in its docstring"


def test_a_recipe_is_config_overrides_cast_to_their_types_and_checked_before_anything_trains() -> None:
    from bench.recipe import parse_recipe

    assert parse_recipe("flat=") == ("flat", {})
    name, overrides = parse_recipe("st=pseudo_label_ratio:1.5,epochs:6,head_refit:false,train_dtype:float32")
    assert name == "st" and overrides == {
        "pseudo_label_ratio": 1.5,
        "epochs": 6.0,
        "head_refit": False,
        "train_dtype": "float32",
    }
    assert parse_recipe("es=early_stopping:true") == ("es", {"early_stopping": True})  # no self-training in it
    for bad in ("=epochs:2", "x=no_such_field:1", "x=epochs:many", "x=warmup_ratio:0.8,decay_ratio:0.8"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_recipe(bad)
