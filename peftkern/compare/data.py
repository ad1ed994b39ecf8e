"""The labelled data `peftkern compare` trains on: the built-in review-sentiment set, or a
JSONL file of text/label (classification) or prompt/completion (causal LM) records.

The built-in set ("reviews") is generated, not downloaded, so the comparison runs offline and
is the same on every machine. Each example is a one-sentence English review of one of 24
things (a film, a hotel room, a laptop, ...), labelled positive (1) or negative (0). The
sentences come from 12 templates filled with 40 positive and 40 negative opinion words,
intensity adverbs and unrelated side remarks; five of the templates turn on syntax, not on a
single word: a negated opposite ("was not dull at all" is positive) or a contrast whose
second clause decides ("the parking was awful, but the film was superb" is positive). With
tens of thousands of distinct sentences, almost every validation and test sentence is
unseen in training, so a model has to know what the words mean (which pretraining gives) and
read the sentence structure (which the frozen encoder alone does less well).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from peftkern.errors import UsageError

TaskKind = Literal["classification", "causal-lm"]
SPLITS = ("train", "validation", "test")

_THINGS = [
    "the film",
    "this restaurant",
    "the hotel room",
    "my new phone",
    "the concert",
    "this novel",
    "the customer service",
    "the laptop",
    "the coffee",
    "the museum tour",
    "the flight",
    "this album",
    "the video game",
    "the hiking trail",
    "the cooking class",
    "this podcast",
    "the rental car",
    "the theatre show",
    "the spa",
    "the bakery",
    "the headset",
    "the guided tour",
    "the sofa",
    "this app",
]
_POSITIVE = [
    "wonderful",
    "excellent",
    "delightful",
    "superb",
    "fantastic",
    "brilliant",
    "charming",
    "lovely",
    "impressive",
    "outstanding",
    "enjoyable",
    "terrific",
    "marvelous",
    "pleasant",
    "stunning",
    "flawless",
    "great",
    "amazing",
    "heartwarming",
    "memorable",
    "gorgeous",
    "splendid",
    "refreshing",
    "satisfying",
    "fabulous",
    "exceptional",
    "magnificent",
    "perfect",
    "inspiring",
    "excellent value",
    "a joy",
    "a treat",
    "top notch",
    "worth every penny",
    "a pleasure",
    "first rate",
    "beautiful",
    "elegant",
    "thrilling",
    "comfortable",
]
_NEGATIVE = [
    "terrible",
    "awful",
    "dreadful",
    "disappointing",
    "boring",
    "mediocre",
    "horrible",
    "dull",
    "tedious",
    "unpleasant",
    "poor",
    "lousy",
    "frustrating",
    "bland",
    "sloppy",
    "forgettable",
    "miserable",
    "annoying",
    "painful",
    "awkward",
    "ugly",
    "shoddy",
    "overpriced",
    "depressing",
    "clumsy",
    "messy",
    "a waste of money",
    "a letdown",
    "a mess",
    "second rate",
    "a chore",
    "unbearable",
    "noisy",
    "rude",
    "cramped",
    "stale",
    "broken",
    "pathetic",
    "exhausting",
    "uncomfortable",
]
_ADVERBS = [
    "",
    "",
    "really ",
    "truly ",
    "quite ",
    "absolutely ",
    "rather ",
    "genuinely ",
    "simply ",
    "pretty ",
]
_ASIDES = [
    "the parking",
    "the weather",
    "the queue",
    "the price",
    "the music",
    "the lighting",
    "the trip there",
]

# {thing} is the subject, {adj} an opinion word of the example's label, {opp} one of the other
# label, {adv} an intensity adverb, {aside} an unrelated subject whose opinion ({opp}) must be
# ignored. The last five state the label through negation or contrast.
_TEMPLATES: list[str] = [
    "{thing} was {adv}{adj}.",
    "honestly, {thing} felt {adv}{adj} from start to finish.",
    "i thought {thing} was {adv}{adj}.",
    "my friends said {thing} was {adj}, and they were right.",
    "after two visits i can say {thing} is {adv}{adj}.",
    "{thing}? {adv}{adj}, in one word.",
    "in short, {thing} was {adj}.",
    "i expected it to be {opp}, but {thing} was {adv}{adj}.",
    "{aside} was {opp}, but {thing} itself was {adv}{adj}.",
    "{thing} was not {opp} at all.",
    "nobody could call {thing} {opp}.",
    "{thing} was never {opp}, not even once.",
]


@dataclass
class Task:
    """Records split three ways. Classification records are {"text", "label": int};
    causal-LM records are {"prompt", "completion"}. `labels` names the classes."""

    kind: TaskKind
    name: str
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    labels: list[str]

    def split(self, name: str) -> list[dict]:
        return getattr(self, name)


def _review(rng: random.Random, label: int) -> str:
    same, other = (_POSITIVE, _NEGATIVE) if label == 1 else (_NEGATIVE, _POSITIVE)
    template = rng.choice(_TEMPLATES)
    return template.format(
        thing=rng.choice(_THINGS),
        adj=rng.choice(same),
        opp=rng.choice(other),
        adv=rng.choice(_ADVERBS),
        aside=rng.choice(_ASIDES),
    )


def reviews(train: int = 384, validation: int = 128, test: int = 256, seed: int = 0) -> Task:
    """The built-in sentiment task: balanced labels, the same sentences for the same sizes
    and seed on every machine; no sentence appears in two splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in zip(SPLITS, (train, validation, test)):
        records: list[dict] = []
        while len(records) < size:
            label = len(records) % 2
            text = _review(rng, label)
            if text not in seen:
                seen.add(text)
                records.append({"text": text, "label": label})
        rng.shuffle(records)
        splits[split] = records
    return Task("classification", "reviews (built-in sentiment)", labels=["negative", "positive"], **splits)


def _record_kind(record: object, where: str) -> TaskKind:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get("text"), str) and "label" in record and isinstance(record["label"], (int, str)):
        return "classification"
    # An empty completion would leave nothing to learn (and a loss over no tokens).
    if (
        isinstance(record.get("prompt"), str)
        and isinstance(record.get("completion"), str)
        and record["completion"]
    ):
        return "causal-lm"
    raise UsageError(
        f'{where}: expected {{"text": str, "label": int|str}} or {{"prompt": str, "completion": str}}'
    )


def load_jsonl(path: str | Path, seed: int = 0) -> Task:
    """Reads a JSONL file. Records may carry "split" ("train"/"validation"/"test"); without
    it the file is shuffled with `seed` and split 80/10/10. Every split must be non-empty."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist")
    records: list[dict] = []
    kind: TaskKind | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{where}: not valid JSON ({error.msg})") from None
        record_kind = _record_kind(record, where)
        if kind is not None and record_kind != kind:
            raise UsageError(f"{where}: a {record_kind} record in a file of {kind} records")
        kind = record_kind
        records.append(record)
    if kind is None:
        raise UsageError(f"data file {path} is empty")

    if any("split" in r for r in records):
        bad = next((r["split"] for r in records if r.get("split") not in SPLITS), None)
        if bad is not None or not all("split" in r for r in records):
            raise UsageError(
                f'{path}: "split" must be one of {", ".join(SPLITS)} on every record, got {bad!r}'
            )
        splits = {s: [r for r in records if r["split"] == s] for s in SPLITS}
    else:
        if len(records) < len(SPLITS):
            raise UsageError(
                f'{path}: {len(records)} record(s); a file without "split" fields needs at least {len(SPLITS)}'
            )
        random.Random(seed).shuffle(records)
        n_val = n_test = max(1, len(records) // 10)
        n_train = len(records) - n_val - n_test
        splits = {
            "train": records[:n_train],
            "validation": records[n_train : n_train + n_val],
            "test": records[n_train + n_val :],
        }
    empty = [s for s in SPLITS if not splits[s]]
    if empty:
        raise UsageError(f"{path}: no records in the {'/'.join(empty)} split")

    labels: list[str] = []
    if kind == "classification":
        labels, index = _label_names([r["label"] for r in records], path)
        for split in splits.values():
            split[:] = [{"text": r["text"], "label": index[r["label"]]} for r in split]
    return Task(kind, path.name, labels=labels, **splits)


def _label_names(raw: list[int | str], path: Path) -> tuple[list[str], dict[int | str, int]]:
    """Integer labels are class ids as they are; string labels are numbered in sorted order."""
    if all(isinstance(label, int) for label in raw):
        if min(raw) < 0:
            raise UsageError(f"{path}: integer labels must be >= 0, got {min(raw)}")
        count = max(raw) + 1
        if count < 2:
            raise UsageError(f"{path}: a classification file needs at least 2 distinct labels, got only 0")
        return [str(i) for i in range(count)], {i: i for i in range(count)}
    if any(isinstance(label, int) for label in raw):
        raise UsageError(f"{path}: labels mix integers and strings")
    names = sorted(set(raw))
    if len(names) < 2:
        raise UsageError(f"{path}: a classification file needs at least 2 distinct labels, got {names}")
    return names, {name: i for i, name in enumerate(names)}
