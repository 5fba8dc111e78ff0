"""The demos' own arithmetic and data plumbing (the runs themselves take tens of minutes and are recorded in
benchmarks/RESULTS.md): confidence intervals, trimming samples to whole sentences, review openings, SFT rows."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sentiment() -> ModuleType:
    return load("kto_sentiment")


def test_wilson_interval_matches_the_closed_form(sentiment: ModuleType) -> None:
    low, high = sentiment.wilson(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)  # the textbook value for 50/100 at 95%
    low, high = sentiment.wilson(0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and 0.15 < high < 0.17  # never below 0, unlike p +- z sqrt(pq/n)
    mean, low, high = sentiment.mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 1.96 * math.sqrt(5 / 3) / 2
    assert mean == 2.5 and (low, high) == pytest.approx((2.5 - half, 2.5 + half))


def test_samples_are_cut_to_whole_sentences(sentiment: ModuleType) -> None:
    assert sentiment.whole_sentences(" a great film. The cast was") == " a great film."
    assert sentiment.whole_sentences(" wonderful! Really? yes and then") == " wonderful! Really?"
    assert sentiment.whole_sentences(" no end in sight") == " no end in sight"


def test_review_openings_and_their_rest(sentiment: ModuleType) -> None:
    snippet = sentiment.Snippet("one two three four five six seven eight nine ten", 1.5)
    assert snippet.prefix == "one two three four five six" and snippet.rest == " seven eight nine ten"
    assert snippet.prefix + snippet.rest == snippet.text


def test_dialogue_rows_end_on_an_answer(tmp_path: Path) -> None:
    dialogue = load("spin_dialogue")
    row = dialogue.to_row(["Hi", "Hello!", "How are you?", "Fine."])
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
    assert row["messages"][-1]["content"] == "Fine."
