"""GenEval-style compositional prompts over the 80 COCO object names, with fixed train/test splits.

The six categories and templates of GenEval (Ghosh et al. 2023, its prompts/create_prompts.py):

| category (GenEval tag) | prompt | spec |
|---|---|---|
| single_object | "a photo of a cat" | one cat |
| two_object | "a photo of a cat and a dog" | one of each |
| counting | "a photo of three cats" | exactly n ∈ {2, 3, 4} (GenEval excludes n + 1) |
| colors | "a photo of a red cat" | one cat, red |
| position | "a photo of a cat left of a dog" | the cat left of / right of / above / below the dog |
| color_attr | "a photo of a red cat and a blue dog" | each colour bound to its object |

Object names are GenEval's (COCO's with "computer mouse", "tv remote", "computer keyboard"), colours its ten;
no colour is given to "person", as in GenEval. Plurals are English ones ("benches", "knives", "people"), where
GenEval's generator appends "s"/"es".

Splits: a prompt's split is a fixed hash of its category and meaning (SPLIT_SEED, TEST_FRACTION), so every
run of the generator, whatever its seed and sizes, puts a prompt in the same split, and the train and test
files never share a prompt. Wordings with the same meaning ("a cat and a dog" / "a dog and a cat", "a cat left
of a dog" / "a dog right of a cat") are one meaning and land in one split. The seed only picks which prompts
of a split are drawn, and which wording.

Each prompt comes with GenEval's metadata (`tag`, `include`, `exclude`, `prompt`), so a .jsonl file written here
serves as `data.train_prompts` and as the GenEval reward server's `reward.metadata_path` (docs/prompts.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

# COCO's 80 classes in COCO order, named as GenEval's evaluation/object_names.txt names them
OBJECTS: Tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS: Tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
NUMBERS: Dict[int, str] = {2: "two", 3: "three", 4: "four"}
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
MIRROR: Dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES: Tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

SPLIT_SEED = 20261201
TEST_FRACTION = 0.2

_IRREGULAR = {"person": "people", "sheep": "sheep", "skis": "skis", "scissors": "scissors", "knife": "knives",
              "computer mouse": "computer mice"}


def plural(name: str) -> str:
    if name in _IRREGULAR:
        return _IRREGULAR[name]
    if name.endswith(("s", "sh", "ch", "x")):
        return name + "es"
    return name + "s"


def with_article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _colourable() -> Tuple[str, ...]:
    return tuple(o for o in OBJECTS if o != "person")


def _meanings(category: str) -> Iterator[tuple]:
    """Every meaning of a category once, as a canonical tuple (its wordings come from `_wordings`)."""
    if category == "single_object":
        yield from ((o,) for o in OBJECTS)
    elif category == "two_object":
        yield from itertools.combinations(OBJECTS, 2)
    elif category == "counting":
        yield from ((o, n) for o in OBJECTS for n in NUMBERS)
    elif category == "colors":
        yield from ((c, o) for o in _colourable() for c in COLORS)
    elif category == "position":
        yield from ((a, rel, b) for a, b in itertools.combinations(OBJECTS, 2) for rel in RELATIONS)
    elif category == "color_attr":
        items = [(c, o) for o in _colourable() for c in COLORS]
        yield from ((x, y) for x, y in itertools.combinations(items, 2) if x[0] != y[0] and x[1] != y[1])
    else:
        raise ValueError(f"unknown GenEval category {category!r}; known: {', '.join(CATEGORIES)}")


def _wordings(category: str, meaning: tuple) -> List[dict]:
    """The prompts (with GenEval metadata) that say `meaning`: one, or two equivalent orders."""
    def record(prompt: str, include: list, exclude: Optional[list] = None) -> dict:
        out = {"prompt": prompt, "category": category, "tag": category, "include": include}
        if exclude is not None:
            out["exclude"] = exclude
        return out

    if category == "single_object":
        (o,) = meaning
        return [record(f"a photo of {with_article(o)}", [{"class": o, "count": 1}])]
    if category == "two_object":
        return [record(f"a photo of {with_article(a)} and {with_article(b)}",
                       [{"class": a, "count": 1}, {"class": b, "count": 1}]) for a, b in (meaning, meaning[::-1])]
    if category == "counting":
        o, n = meaning
        return [record(f"a photo of {NUMBERS[n]} {plural(o)}", [{"class": o, "count": n}],
                       [{"class": o, "count": n + 1}])]
    if category == "colors":
        c, o = meaning
        return [record(f"a photo of {with_article(f'{c} {o}')}", [{"class": o, "count": 1, "color": c}])]
    if category == "position":
        a, rel, b = meaning
        # GenEval: the reference object first, the placed one second with ("relation", index of the reference)
        return [record(f"a photo of {with_article(x)} {r} {with_article(y)}",
                       [{"class": y, "count": 1}, {"class": x, "count": 1, "position": [r, 0]}])
                for x, r, y in ((a, rel, b), (b, MIRROR[rel], a))]
    (ca, oa), (cb, ob) = meaning
    return [record(f"a photo of {with_article(f'{c1} {o1}')} and {with_article(f'{c2} {o2}')}",
                   [{"class": o1, "count": 1, "color": c1}, {"class": o2, "count": 1, "color": c2}])
            for (c1, o1), (c2, o2) in (((ca, oa), (cb, ob)), ((cb, ob), (ca, oa)))]


def split_of(category: str, meaning: tuple) -> str:
    """"train" or "test": a fixed hash of (category, meaning), TEST_FRACTION of meanings in test."""
    digest = hashlib.sha256(f"{SPLIT_SEED}|{category}|{json.dumps(meaning)}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2 ** 64 else "train"


def available(category: str, split: str) -> int:
    """How many meanings of `category` the split holds (the most prompts it can give)."""
    return sum(split_of(category, m) == split for m in _meanings(category))


def generate(split: str, per_category: int, seed: int = 0,
             categories: Sequence[str] = CATEGORIES) -> List[dict]:
    """Up to `per_category` prompts of each category from `split` ("train" | "test"), drawn without repeating a
    meaning (a category with fewer gives all it has), each a dict with "prompt", "category" and GenEval's
    metadata ("tag", "include", "exclude" for counting). Deterministic in (split, per_category, seed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if per_category < 0:
        raise ValueError(f"per_category must be >= 0, got {per_category}")
    out = []
    for category in categories:
        meanings = [m for m in _meanings(category) if split_of(category, m) == split]
        rng = random.Random(f"{seed}|{split}|{category}")
        for meaning in rng.sample(meanings, min(per_category, len(meanings))):
            out.append(rng.choice(_wordings(category, meaning)))
    return out


def write(records: Sequence[dict], path: Path) -> Path:
    """`path` as .txt (one prompt per line) or .jsonl (one record per line), by its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".txt":
        path.write_text("".join(r["prompt"] + "\n" for r in records))
    else:
        raise ValueError(f"{str(path)!r}: write .txt or .jsonl")
    return path
