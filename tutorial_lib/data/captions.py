"""Natural-language captions derived from Fashion-MNIST labels.

Training captions are `template.format(phrase)` for a template from `TEMPLATES` and a noun phrase
from `SYNONYMS[label]`, drawn with a seeded RNG, so the same seed gives the same captions.
`HELD_OUT` holds paraphrases per class that are never produced by `caption_for`: evaluation uses
them to ask whether a model learned the meaning of a prompt rather than its exact words.

Per-image captions add attribute words ("a photo of a small dark patterned coat"): `ATTRIBUTES`
names three binary attributes and their words, which `attributes.label_attributes` measures from
the pixels. `attribute_caption` states each one with probability `MENTION_PROB`, so a model also
sees a garment with an attribute left unsaid. `HELD_OUT_COMBINATIONS` are (class, attribute,
value) triples whose images never enter training (`is_held_out`): `attribute_prompt_set` asks for
them, to see whether a model composes words it has only seen apart, e.g. "dark" and "trousers".
"""

from __future__ import annotations

import itertools
import numbers
import random
import re

from .classes import CLASSES

TEMPLATES = (
    "{}",
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a grayscale photo of {}",
    "a product photo of {}",
    "{} on a plain background",
    "a small photo of {}",
)

# Noun phrases per class, article included ("a", "an", or none for plurals).
SYNONYMS = (
    ("a t-shirt", "a tee", "a top", "a short-sleeved top", "a cotton t-shirt"),
    ("trousers", "a pair of trousers", "pants", "jeans", "a pair of slacks"),
    ("a pullover", "a sweater", "a jumper", "a knit sweater", "a wool pullover"),
    ("a dress", "a summer dress", "a gown", "a long dress", "a frock"),
    ("a coat", "a jacket", "a winter coat", "an overcoat", "a long coat"),
    ("a sandal", "sandals", "a flip-flop", "an open-toed shoe", "a summer sandal"),
    ("a shirt", "a button-down shirt", "a blouse", "a collared shirt", "a long-sleeved shirt"),
    ("a sneaker", "sneakers", "a trainer", "a running shoe", "a canvas sneaker"),
    ("a bag", "a handbag", "a purse", "a tote bag", "a leather bag"),
    ("an ankle boot", "a boot", "a leather boot", "ankle boots", "a heeled boot"),
)

# The frame of every evaluation prompt, and the prompt that stands for each class in the "10 class
# prompts" evaluation (a training caption).
PROMPT_TEMPLATE = "a photo of {}"
CLASS_PROMPTS = tuple(PROMPT_TEMPLATE.format(phrases[0]) for phrases in SYNONYMS)

# Never used in training: new sentence frames and words, some keeping a class noun, some not.
HELD_OUT = (
    ("a plain tee lying flat", "a casual shirt with short sleeves", "my favourite t-shirt"),
    ("a pair of long pants", "denim trousers seen from the front", "some blue jeans"),
    ("a cosy sweater with long sleeves", "a warm knitted jumper", "a pullover for winter"),
    ("an elegant evening dress", "a sleeveless dress", "a dress for a party"),
    ("a heavy coat with buttons", "a warm jacket for the cold", "a raincoat"),
    ("a strappy summer sandal", "beach sandals", "a sandal for hot weather"),
    ("a formal shirt with a collar", "a plaid blouse", "a shirt with buttons"),
    ("a white running sneaker", "sports shoes", "a sneaker for the gym"),
    ("a shopping bag", "a purse with a strap", "a large handbag"),
    ("a black leather boot", "a boot with a heel", "winter ankle boots"),
)


def class_index(cls: int | str) -> int:
    """Label index from an int (a NumPy integer too) or a class name (case-insensitive, e.g. 'ankle
    boot', 'Sneaker')."""
    if isinstance(cls, bool) or not isinstance(cls, (numbers.Integral, str)):
        raise TypeError(f"A class is an int in 0..9 or a class name, got {type(cls).__name__}.")
    if isinstance(cls, numbers.Integral):
        if not 0 <= cls < len(CLASSES):
            raise ValueError(f"Unknown class {cls}; labels are 0..{len(CLASSES) - 1}.")
        return int(cls)
    names = {c.lower(): i for i, c in enumerate(CLASSES)} | {"t-shirt": 0, "top": 0}
    key = cls.strip().lower()
    if key not in names:
        raise ValueError(f"Unknown class {cls!r}; choose one of {', '.join(CLASSES)}.")
    return names[key]


def caption_for(label: int | str, seed=0) -> str:
    """A training caption for a class, the same for the same (label, seed).

    `seed` may be an int or a tuple of ints, e.g. (run seed, epoch, item index).
    """
    label = class_index(label)
    rng = random.Random(repr(seed))  # str/tuple seeds hash deterministically (SHA-512)
    return rng.choice(TEMPLATES).format(rng.choice(SYNONYMS[label]))


def all_training_captions(label: int | str | None = None) -> list[str]:
    """Every caption `caption_for` can produce (for one class, or for all)."""
    labels = range(len(CLASSES)) if label is None else [class_index(label)]
    return [t.format(p) for i in labels for p in SYNONYMS[i] for t in TEMPLATES]


ATTRIBUTE_PROMPT_SETS = ("attributes", "attributes_held_out")
PROMPT_SETS = ("class", "held_out", *ATTRIBUTE_PROMPT_SETS)


def prompt_set(kind: str = "class") -> tuple[list[str], list[int]]:
    """(prompts, labels) for evaluation: 'class' (one per class), 'held_out' (paraphrases), or
    'attributes' / 'attributes_held_out' (see `attribute_prompt_set`, which also gives the targets)."""
    if kind == "class":
        return list(CLASS_PROMPTS), list(range(len(CLASSES)))
    if kind == "held_out":
        pairs = [(p, i) for i, ps in enumerate(HELD_OUT) for p in ps]
        return [p for p, _ in pairs], [i for _, i in pairs]
    if kind in ATTRIBUTE_PROMPT_SETS:
        return attribute_prompt_set(kind)[:2]
    raise ValueError(f"Unknown prompt set {kind!r}; choose one of {', '.join(PROMPT_SETS)}.")


# ----------------------------------------------------------------------------- attribute captions
# Attribute name -> its two values' words, value index 0 then 1 (`attributes.py` measures them).
ATTRIBUTES = {
    "brightness": ("dark", "light"),
    "size": ("small", "large"),
    "texture": ("plain", "patterned"),
}
# The order adjectives take before a noun in English: size, then colour, then pattern.
ADJECTIVE_ORDER = ("size", "brightness", "texture")
MENTION_PROB = 0.7  # each attribute is stated with this probability, else left unsaid

# Templates that already use an attribute word about the photo ("a small photo of", "on a plain
# background") would blur what the word means, so attribute captions leave them out.
ATTRIBUTE_TEMPLATES = tuple(
    t for t in TEMPLATES if not set(re.findall(r"[a-z]+", t)) & {w for ws in ATTRIBUTES.values() for w in ws}
)

# (class, attribute, value) whose images are removed from training entirely, one class each, so
# that a prompt names at most one. Their shares of the class in the training split (attributes.py):
# 39%, 31%, 37% and 50%: common enough to be a fair test, rare enough that the class still trains.
HELD_OUT_COMBINATIONS = (
    ("Trouser", "brightness", "dark"),
    ("Ankle boot", "brightness", "dark"),
    ("Bag", "texture", "patterned"),
    ("Coat", "size", "small"),
)


def check_values(values: dict) -> dict[str, int]:
    """`values` (attribute name -> value index 0/1, or its word) checked, as name -> int."""
    if not isinstance(values, dict):
        raise TypeError(f"Attribute values are a dict of name -> 0/1, got {type(values).__name__}.")
    checked = {}
    for name, value in values.items():
        if name not in ATTRIBUTES:
            raise ValueError(f"Unknown attribute {name!r}; choose from {', '.join(ATTRIBUTES)}.")
        words = ATTRIBUTES[name]
        index = words.index(value) if value in words else value
        if isinstance(index, bool) or index not in (0, 1):
            raise ValueError(f"Attribute {name!r} takes 0 ({words[0]!r}) or 1 ({words[1]!r}), got {value!r}.")
        checked[name] = int(index)
    return checked


def is_held_out(label: int | str, values: dict) -> bool:
    """Whether a garment of this class with these attribute values is kept out of training."""
    label, values = class_index(label), check_values(values)
    return any(class_index(c) == label and values.get(name) == ATTRIBUTES[name].index(word)
               for c, name, word in HELD_OUT_COMBINATIONS)


def with_adjectives(phrase: str, adjectives: list[str]) -> str:
    """A noun phrase from `SYNONYMS` with adjectives before its noun and its article made to agree
    with the next word: 'an ankle boot' -> 'a dark ankle boot', 'a pair of slacks' -> 'a pair of
    dark slacks', 'sandals' -> 'dark sandals'. (No adjective or noun here starts with a silent
    consonant or a 'you' sound, so a vowel letter decides 'an'.)"""
    determiner, noun = re.fullmatch(r"(a pair of |an? )?(.+)", phrase).groups()
    words = " ".join([*adjectives, noun])
    if determiner in ("a ", "an "):
        determiner = "an " if words[0] in "aeiou" else "a "
    return (determiner or "") + words


def attribute_caption(label: int | str, values: dict, seed=0) -> str:
    """A training caption stating some of a garment's attribute values, the same for the same
    (label, values, seed): a template from `ATTRIBUTE_TEMPLATES`, a phrase from `SYNONYMS`, and each
    attribute of `values` said with probability `MENTION_PROB`, adjectives in `ADJECTIVE_ORDER`.

    `values` maps attribute names to value indices (0/1) or words; `seed` as in `caption_for`.
    """
    label, values = class_index(label), check_values(values)
    rng = random.Random(repr(seed))  # str/tuple seeds hash deterministically (SHA-512)
    template, phrase = rng.choice(ATTRIBUTE_TEMPLATES), rng.choice(SYNONYMS[label])
    said = [n for n in ADJECTIVE_ORDER if rng.random() < MENTION_PROB and n in values]  # a draw for each
    return template.format(with_adjectives(phrase, _adjectives(values, said)))


def _adjectives(values: dict[str, int], names) -> list[str]:
    """The words for the attributes `names` of `values`, in `ADJECTIVE_ORDER`."""
    return [ATTRIBUTES[n][values[n]] for n in ADJECTIVE_ORDER if n in names]


def _value_combinations():
    """Every full assignment of values, as dicts name -> 0/1, in a fixed order."""
    return [dict(zip(ATTRIBUTES, v)) for v in itertools.product((0, 1), repeat=len(ATTRIBUTES))]


def all_attribute_training_captions(label: int | str | None = None) -> list[str]:
    """Every caption `attribute_caption` gives a training record (one not held out) of one class or
    all: the captions that a text-embedding cache or a word vocabulary has to cover."""
    labels = range(len(CLASSES)) if label is None else [class_index(label)]
    captions = {
        t.format(with_adjectives(p, _adjectives(values, said)))
        for i in labels for values in _value_combinations() if not is_held_out(i, values)
        for k in range(len(ADJECTIVE_ORDER) + 1) for said in itertools.combinations(ADJECTIVE_ORDER, k)
        for p in SYNONYMS[i] for t in ATTRIBUTE_TEMPLATES
    }
    return sorted(captions)


def attribute_prompt(label: int | str, values: dict) -> str:
    """The evaluation prompt for a class and attribute values, e.g. 'a photo of a small dark plain coat'."""
    label, values = class_index(label), check_values(values)
    return PROMPT_TEMPLATE.format(with_adjectives(SYNONYMS[label][0], _adjectives(values, values)))


def attribute_prompt_set(kind: str = "attributes") -> tuple[list[str], list[int], dict[str, list[int]]]:
    """(prompts, labels, targets) stating all attributes; targets[name][k] is prompt k's value.

    'attributes': two seen combinations per class, every value 0 ('small dark plain') and every
    value 1 ('large light patterned'), except that a class's held-out value is replaced by the other.
    'attributes_held_out': for each of `HELD_OUT_COMBINATIONS`, its held-out value with the other
    attributes all 0, then all 1.
    """
    if kind == "attributes":
        held = {(class_index(c), name): 1 - ATTRIBUTES[name].index(w) for c, name, w in HELD_OUT_COMBINATIONS}
        cases = [(i, {n: held.get((i, n), v) for n in ATTRIBUTES}) for i in range(len(CLASSES)) for v in (0, 1)]
    elif kind == "attributes_held_out":
        cases = [(class_index(c), {**dict.fromkeys(ATTRIBUTES, v), name: ATTRIBUTES[name].index(w)})
                 for c, name, w in HELD_OUT_COMBINATIONS for v in (0, 1)]
    else:
        raise ValueError(f"Unknown attribute prompt set {kind!r}; "
                         f"choose one of {', '.join(ATTRIBUTE_PROMPT_SETS)}.")
    targets = {n: [values[n] for _, values in cases] for n in ATTRIBUTES}
    return [attribute_prompt(i, values) for i, values in cases], [i for i, _ in cases], targets
