"""Natural-language captions derived from Fashion-MNIST labels.

Training captions are `template.format(phrase)` for a template from `TEMPLATES` and a noun phrase
from `SYNONYMS[label]`, drawn with a seeded RNG, so the same seed gives the same captions.
`HELD_OUT` holds paraphrases per class that are never produced by `caption_for`: evaluation uses
them to ask whether a model learned the meaning of a prompt rather than its exact words.
"""

from __future__ import annotations

import random

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

# The prompt that stands for each class in the "10 class prompts" evaluation (a training caption).
CLASS_PROMPTS = tuple(f"a photo of {phrases[0]}" for phrases in SYNONYMS)

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
    """Label index from an int or a class name (case-insensitive, e.g. 'ankle boot', 'Sneaker')."""
    if isinstance(cls, bool) or not isinstance(cls, (int, str)):
        raise TypeError(f"A class is an int in 0..9 or a class name, got {type(cls).__name__}.")
    if isinstance(cls, int):
        if not 0 <= cls < len(CLASSES):
            raise ValueError(f"Unknown class {cls}; labels are 0..{len(CLASSES) - 1}.")
        return cls
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


def prompt_set(kind: str = "class") -> tuple[list[str], list[int]]:
    """(prompts, labels) for evaluation: 'class' (one per class) or 'held_out' (paraphrases)."""
    if kind == "class":
        return list(CLASS_PROMPTS), list(range(len(CLASSES)))
    if kind == "held_out":
        pairs = [(p, i) for i, ps in enumerate(HELD_OUT) for p in ps]
        return [p for p, _ in pairs], [i for _, i in pairs]
    raise ValueError(f"Unknown prompt set {kind!r}; choose 'class' or 'held_out'.")
