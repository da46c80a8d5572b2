"""A user's first day (issue 20): baselines beside the fine-tuned score, the user's own field
names, predictions with the data's label names, exports that keep them, and chat examples that
never vanish without a word. One tiny random BERT (with a character tokenizer) serves every test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_hf_model

import jaxtune as jt
from jaxtune.data.testing import tiny_tokenizer

WORDS = {"spam": ["win", "cash", "prize", "free", "offer", "now"],
         "ham": ["lunch", "meeting", "notes", "see", "you", "today"]}
SHARED = ["the", "a", "for", "and", "hi"]


def _rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Short texts whose words mostly (not always) come from their class's list."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ("spam", "ham")[i % 2]
        other = "ham" if label == "spam" else "spam"
        words = [rng.choice(WORDS[label] if rng.random() < 0.9 else WORDS[other]) for _ in range(3)]
        rows.append((" ".join([*words, rng.choice(SHARED)]), label))
    return rows


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    """A tiny random BertModel with its (character-level) tokenizer, as a user's HF directory."""
    root = tmp_path_factory.mktemp("bert")
    tiny_hf_model("BertModel", root, vocab_size=112, max_position_embeddings=64)
    tiny_tokenizer(bos=True).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same rows as a JSONL with ``body,category`` and as a CSV with ``statement,party``."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for split, n, seed in (("train", 48, 0), ("test", 24, 1)):
        rows = _rows(n, seed)
        out[f"{split}.jsonl"] = root / f"{split}.jsonl"
        out[f"{split}.jsonl"].write_text("".join(json.dumps({"body": t, "category": c}) + "\n" for t, c in rows))
        out[f"{split}.csv"] = root / f"{split}.csv"
        out[f"{split}.csv"].write_text("statement,party\n" + "".join(f"{t},{c}\n" for t, c in rows))
    return out


def _torch_mean_features(model_dir: Path, texts: list[str]) -> np.ndarray:
    """Mean-pooled last hidden states of the transformers BertModel (the independent reference)."""
    import torch
    import transformers

    model = transformers.BertModel.from_pretrained(model_dir).eval()
    tok = tiny_tokenizer(bos=True)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            out.append(model(ids).last_hidden_state[0].mean(0).numpy())
    return np.stack(out)


def test_report_shows_baselines_that_match_scikit_learn(bert, files, tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = jt.read(files["train.jsonl"], kind="classification", validation=files["test.jsonl"],
                          text_field="body", label_field="category")
    model = jt.apply_plan(jt.load(str(bert)), jt.lora(rank=2, alpha=4) + jt.head("classification", pooling="pooler"),
                          data=train)
    result = jt.Trainer(model, train, test, run_dir=tmp_path / "run", config=jt.TrainConfig(steps=1, progress=False),
                        data=jt.DataConfig(batch_size=8, max_length=48)).fit()
    before = result.before

    # The same split, computed independently: transformers features, scikit-learn models, raw texts.
    train_rows, test_rows = _rows(48, 0), _rows(24, 1)
    y_train = np.array([c == "spam" for _, c in train_rows], int)  # names sort as (ham, spam)
    y_test = np.array([c == "spam" for _, c in test_rows], int)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    probe.fit(_torch_mean_features(bert, [t for t, _ in train_rows]), y_train)
    probe_acc = probe.score(_torch_mean_features(bert, [t for t, _ in test_rows]), y_test)
    tfidf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=2000))
    tfidf_acc = tfidf.fit([t for t, _ in train_rows], y_train).score([t for t, _ in test_rows], y_test)
    assert before["probe/accuracy"] == pytest.approx(probe_acc, abs=0.01)
    assert before["tfidf/accuracy"] == pytest.approx(tfidf_acc, abs=0.01)
    assert tfidf_acc > 0.75  # the words carry the label: a baseline worth beating

    header, _, *rows = result.report.splitlines()
    assert header == "| metric | base | linear probe | TF-IDF | fine-tuned | change | vs best baseline |"
    accuracy = next(r for r in rows if r.startswith("| accuracy |")).split(" | ")
    assert float(accuracy[2]) == pytest.approx(before["probe/accuracy"], abs=1e-4)
    assert float(accuracy[3]) == pytest.approx(before["tfidf/accuracy"], abs=1e-4)
    assert "TF-IDF (word 1-2-gram TF-IDF" in result.report
