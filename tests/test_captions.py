"""Captions from labels: seeded, drawn from a closed set, held-out prompts kept apart."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tutorial_lib.data.captions import (
    CLASS_PROMPTS,
    HELD_OUT,
    all_training_captions,
    caption_for,
    class_index,
    prompt_set,
)
from tutorial_lib.data.fashion_mnist import CLASSES


def test_caption_is_deterministic_for_a_seed():
    for label in range(10):
        for seed in (0, 1, 12345, (7, 2, 99)):
            assert caption_for(label, seed) == caption_for(label, seed)


def test_caption_is_the_same_in_a_fresh_interpreter():
    """Seeds must not go through Python's randomised str hash: other processes agree."""
    code = ("from tutorial_lib.data.captions import caption_for;"
            "print('|'.join(caption_for(i % 10, (5, i)) for i in range(40)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "|".join(caption_for(i % 10, (5, i)) for i in range(40))


def test_captions_differ_across_seeds():
    for label in range(10):
        assert len({caption_for(label, seed) for seed in range(50)}) > 5


def test_every_caption_is_a_training_caption_of_its_class():
    everything = set(all_training_captions())
    for label in range(10):
        own = set(all_training_captions(label))
        for seed in range(100):
            caption = caption_for(label, (seed, label))
            assert caption in own and caption in everything


def test_training_caption_counts():
    per_class = all_training_captions(0)
    assert len(per_class) == len(set(per_class)) == 40  # 8 templates x 5 phrases
    assert len(set(all_training_captions())) == 400  # no caption shared between classes


def test_class_prompts_are_training_captions():
    prompts, labels = prompt_set("class")
    assert prompts == list(CLASS_PROMPTS) and labels == list(range(10))
    for prompt, label in zip(prompts, labels):
        assert prompt in all_training_captions(label)


def test_held_out_prompts_are_disjoint_from_training_captions():
    prompts, labels = prompt_set("held_out")
    assert len(prompts) == len(labels) == sum(len(p) for p in HELD_OUT)
    assert sorted(set(labels)) == list(range(10))
    training = {c.lower().strip() for c in all_training_captions()}
    assert not {p.lower().strip() for p in prompts} & training


@pytest.mark.parametrize("name, index", [
    ("T-shirt/top", 0), ("t-shirt", 0), ("top", 0), ("Ankle boot", 9), ("  sneaker ", 7), ("BAG", 8),
])
def test_class_names_are_case_insensitive(name, index):
    assert class_index(name) == index


def test_every_class_name_maps_to_its_label():
    assert [class_index(c) for c in CLASSES] == list(range(10))
    assert caption_for("Sandal", 4) == caption_for(5, 4)


@pytest.mark.parametrize("bad", ["sock", "", "shoe", -1, 10, 99])
def test_unknown_class_is_a_value_error(bad):
    with pytest.raises(ValueError, match="Unknown class"):
        caption_for(bad)


@pytest.mark.parametrize("bad", [1.0, None, True, [3], b"Bag"])
def test_wrong_class_type_is_a_type_error(bad):
    with pytest.raises(TypeError):
        caption_for(bad)


def test_unknown_class_in_all_training_captions():
    with pytest.raises(ValueError):
        all_training_captions(10)


def test_unknown_prompt_set_is_a_value_error():
    with pytest.raises(ValueError, match="nope"):
        prompt_set("nope")
