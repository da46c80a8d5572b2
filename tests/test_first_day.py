"""A user's first day (issue 20): baselines beside the fine-tuned score, the user's own field
names, predictions with the data's label names, exports that keep them, and chat examples that
never vanish without a word. One tiny random BERT (with a character tokenizer) serves every test."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import tiny_hf_model

import jaxtune as jt
from jaxtune.cli import main
from jaxtune.data.testing import tiny_tokenizer

WORDS = {"spam": ["win", "cash", "prize", "free", "offer", "now"],
         "ham": ["lunch", "meeting", "notes", "see", "you", "today"]}
SHARED = ["the", "a", "for", "and", "hi"]
PARTY = {"spam": "rep", "ham": "dem"}  # the CSV's own label names


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
        out[f"{split}.csv"].write_text("statement,party\n" + "".join(f"{t},{PARTY[c]}\n" for t, c in rows))
    return out


def _check_baselines(before: dict[str, float], printed: str, bert: Path) -> None:
    """The report's baselines equal an independent computation on the same split: transformers'
    features, scikit-learn's models on the raw texts; the printed table shows them."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_rows, test_rows = _rows(48, 0), _rows(24, 1)
    y_train = np.array([c == "spam" for _, c in train_rows], int)  # names sort as (dem, rep) = (ham, spam)
    y_test = np.array([c == "spam" for _, c in test_rows], int)
    def logistic():  # regularisation chosen by 3-fold cross-validated log loss
        return GridSearchCV(LogisticRegression(max_iter=2000), {"C": [0.01, 0.1, 1.0, 10.0]}, cv=3,
                            scoring="neg_log_loss")

    probe = make_pipeline(StandardScaler(), logistic())
    probe.fit(_torch_mean_features(bert, [t for t, _ in train_rows]), y_train)
    probe_acc = np.mean(probe.predict(_torch_mean_features(bert, [t for t, _ in test_rows])) == y_test)
    tfidf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), logistic())
    tfidf_acc = np.mean(tfidf.fit([t for t, _ in train_rows], y_train).predict([t for t, _ in test_rows]) == y_test)
    assert before["probe/accuracy"] == pytest.approx(probe_acc, abs=0.01)
    assert before["tfidf/accuracy"] == pytest.approx(tfidf_acc, abs=0.01)
    assert tfidf_acc > 0.75  # the words carry the label: a baseline worth beating

    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert table[0] == "| metric | base | linear probe | TF-IDF | fine-tuned | change | vs best baseline |"
    accuracy = next(r for r in table if r.startswith("| accuracy |")).split(" | ")
    assert float(accuracy[2]) == pytest.approx(before["probe/accuracy"], abs=1e-4)
    assert float(accuracy[3]) == pytest.approx(before["tfidf/accuracy"], abs=1e-4)
    assert "TF-IDF (word 1-2-gram TF-IDF" in printed


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


def cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _recipe(bert: Path, train: Path, test: Path, fields: dict[str, str], out: Path, export: str,
            baselines: bool) -> Path:
    """The quickstart's plan (LoRA + a fresh head with its pooling) and packing on the user's files, by field
    mapping alone."""
    quickstart = yaml.safe_load(Path("configs/quickstart.yaml").read_text())
    config = {"model": {"path": str(bert)}, "plan": quickstart["plan"],
              "data": {"train": str(train), "validation": str(test), "kind": "classification", **fields,
                       "max_length": 48, "batch_size": 8, "packing": quickstart["data"]["packing"]},
              "train": {"steps": 3, "log_every": 3}, "optimizer": {"learning_rate": 0.05},
              "eval": {"baselines": baselines}, "output": {"dir": str(out), "export": export}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def _transformers_labels(model, texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Predicted label names (by the model's own config.id2label) and probabilities, one text at a time."""
    import torch

    tok, names, probs = tiny_tokenizer(bos=True), [], []
    with torch.no_grad():
        for text in texts:
            logits = model(torch.tensor([tok(text)["input_ids"]])).logits[0]
            names.append(model.config.id2label[int(logits.argmax())])
            probs.append(torch.softmax(logits, -1).numpy())
    return names, np.stack(probs)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_own_field_names_train_predict_and_export_with_the_data_label_names(fmt, bert, files, tmp_path):
    import peft
    import transformers

    fields = ({"text_field": "statement", "label_field": "party"} if fmt == "csv"
              else {"text_field": "body", "label_field": "category"})
    names = ["dem", "rep"] if fmt == "csv" else ["ham", "spam"]
    run = tmp_path / "run"
    export = "peft" if fmt == "csv" else "merged"
    code, out, err = cli("train", _recipe(bert, files[f"train.{fmt}"], files[f"test.{fmt}"], fields, run, export,
                                          baselines=fmt == "csv"))
    assert code == 0, err
    assert "| accuracy |" in out
    if fmt == "csv":
        _check_baselines(json.loads((run / "report.json").read_text())["before"], out, bert)

    # jaxtune predict: the run's field mapping and label names, per row, as the file's own format.
    code, _, err = cli("predict", run, files[f"test.{fmt}"], "--to", tmp_path / f"pred.{fmt}")
    assert code == 0, err
    if fmt == "csv":
        import csv

        rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
        assert list(rows[0]) == ["statement", "party", "prediction", "p(dem)", "p(rep)"]
        probs = np.array([[float(r["p(dem)"]), float(r["p(rep)"])] for r in rows])
    else:
        rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
        assert list(rows[0]) == ["body", "category", "prediction", "probabilities"]
        probs = np.array([[r["probabilities"][n] for n in names] for r in rows])
    texts = [r[fields["text_field"]] for r in rows]
    assert len(rows) == 24 and {r["prediction"] for r in rows} <= set(names)
    # The run packed its rows, so predict packs them too: the same outputs as one row per sequence.
    one_per_row = jt.predict(run, files[f"test.{fmt}"], packing=False)
    np.testing.assert_allclose([[r["probabilities"][n] for n in names] for r in one_per_row], probs, atol=1e-5)
    assert [r[fields["label_field"]] for r in rows] == [c if fmt == "jsonl" else PARTY[c] for _, c in _rows(24, 1)]
    # One field given keeps the run's others (the text field here); a size of 0 and the input as
    # the output are refused, naming the flag and the file.
    code, out, err = cli("predict", run, files[f"test.{fmt}"], "--label-field", fields["label_field"])
    assert code == 0 and [json.loads(line)["prediction"] for line in out.splitlines()] == [r["prediction"]
                                                                                          for r in rows], err
    for flags, expected in ((["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
                            (["--to", files[f"test.{fmt}"]], "the file being predicted")):
        code, _, err = cli("predict", run, files[f"test.{fmt}"], *flags)
        assert code == 2 and expected in err, err

    # The export (the quickstart's head exports) predicts the same labels in transformers / PEFT.
    if fmt == "csv":  # the quickstart's own export: a PEFT adapter on BertForSequenceClassification
        base = transformers.BertForSequenceClassification.from_pretrained(
            bert, num_labels=2, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
        model = peft.PeftModel.from_pretrained(base, run / "export").eval()
    else:
        config = json.loads((run / "export" / "config.json").read_text())
        assert config["id2label"] == {"0": "ham", "1": "spam"} and config["label2id"] == {"ham": 0, "spam": 1}
        model = transformers.AutoModelForSequenceClassification.from_pretrained(run / "export").eval()
        again = jt.predict(run / "export", files["test.jsonl"], text_field="body", label_field="category")
        assert [r["prediction"] for r in again] == [r["prediction"] for r in rows]
        np.testing.assert_allclose([[r["probabilities"][n] for n in names] for r in again], probs, atol=1e-4)
    hf_names, hf_probs = _transformers_labels(model, texts)
    assert hf_names == [r["prediction"] for r in rows]
    np.testing.assert_allclose(hf_probs, probs, atol=1e-4)



def test_predict_from_a_run_on_a_mesh_splits_each_batch_over_it_and_equals_one_device(bert, files, tmp_path,
                                                                                   monkeypatch):
    """A run trained on 8 devices (data 2 x fsdp 4) predicts on its own mesh: the params stay as training
    sharded them, each batch's rows are split over the batch axes, and the outputs equal the same
    params' on one device."""
    import dataclasses
    import sys

    import jax

    from jaxtune.recipe import open_run

    run = tmp_path / "run"
    recipe = _recipe(bert, files["train.jsonl"], files["test.jsonl"], {"text_field": "body", "label_field": "category"},
                     run, "none", baselines=False)
    config = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**config, "mesh": {"data": 2, "fsdp": 4}}))
    code, _, err = cli("train", recipe)
    assert code == 0, err
    module = sys.modules[jt.predict.__module__]
    seen = []
    on_mesh = module.jit_on_mesh

    def spy(fn, mesh, **kwargs):
        jitted = on_mesh(fn, mesh, **kwargs)

        def call(params, batch):
            kernels = [tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(params) if leaf.ndim == 2]
            seen.append((tuple(batch["input_ids"].sharding.spec), kernels))
            return jitted(params, batch)
        return call

    monkeypatch.setattr(module, "jit_on_mesh", spy)
    rows = jt.predict(run, files["test.jsonl"])
    assert seen and all({"data", "fsdp"} <= set(batch[0]) for batch, _ in seen), seen  # rows split 8 ways
    assert all(any("fsdp" in spec for spec in kernels) for _, kernels in seen), seen  # kernels split as trained

    trained = open_run(run, evaluation=False).model
    one_device = dataclasses.replace(trained, params=jax.device_get(trained.params))
    alone = jt.predict(one_device, files["test.jsonl"], text_field="body", label_field="category", packing=True,
                       batch_size=8, max_length=48)
    assert [r["prediction"] for r in alone] == [r["prediction"] for r in rows]
    names = ["ham", "spam"]
    np.testing.assert_allclose([[r["probabilities"][n] for n in names] for r in alone],
                               [[r["probabilities"][n] for n in names] for r in rows], atol=1e-5)
    with pytest.raises(ValueError, match=r"batch_size 12 does not split over the run's mesh \(8-way"):
        jt.predict(run, files["test.jsonl"], batch_size=12)

def test_a_rerun_reuses_the_base_report_and_any_change_in_the_data_scores_it_again(bert, files, tmp_path):
    """A second run of the same recipe reads the base report (evaluation and baselines) instead of
    scoring again, equal to what scoring gives (a run with eval.cache_base off); other evaluation
    rows are another key."""
    fields = {"text_field": "body", "label_field": "category"}

    def train(name: str, test: Path, **eval_fields: object) -> tuple[dict[str, float], str]:
        recipe = _recipe(bert, files["train.jsonl"], test, fields, tmp_path / name, "none", baselines=True)
        config = yaml.safe_load(recipe.read_text())
        config["eval"].update(eval_fields)
        recipe.write_text(yaml.safe_dump(config))
        code, _, err = cli("train", recipe)
        assert code == 0, err
        return json.loads((tmp_path / name / "report.json").read_text())["before"], err

    first, err = train("first", files["test.jsonl"])
    assert "evaluating the base model" in err and "probe/accuracy" in first
    again, err = train("again", files["test.jsonl"])
    assert "scored by an earlier run" in err and "evaluating the base model" not in err
    assert again == first
    fresh, err = train("fresh", files["test.jsonl"], cache_base=False)
    assert "evaluating the base model" in err
    assert fresh.keys() == first.keys()
    for name, value in fresh.items():
        if not name.endswith("/seconds"):
            assert value == pytest.approx(first[name], abs=1e-6), name
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(files["test.jsonl"].read_text().splitlines(keepends=True)[:-1]))
    _, err = train("fewer", fewer)
    assert "evaluating the base model" in err


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama")
    tiny_hf_model("LlamaForCausalLM", root)
    tiny_tokenizer().save_pretrained(root)
    return root


def _chat(tmp_path: Path) -> Path:
    """16 reviews as chat: half the "positive" ones have a long user turn, so a 32-token row cuts their answer."""
    rows = []
    for i in range(16):
        answer = ("positive", "negative")[i % 2]
        user = ("a long review that goes on and on about the film " if i % 4 == 0 else "") + f"review {i}"
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("policy", ["right", "left", "drop", "error"])
def test_chat_truncation_policies_train_and_report_drops_per_label(policy, llama, tmp_path, caplog):
    from jaxtune.data.sources import DataError
    from jaxtune.data.tokenize import Tokenize

    train, _ = jt.read(_chat(tmp_path), kind="chat")
    model = jt.apply_plan(jt.load(str(llama)), jt.lora(rank=2))
    data = jt.DataConfig(batch_size=8, max_length=32, truncation=policy)
    if policy == "error":  # refused at the door, naming the conversation
        with pytest.raises(DataError, match=r"chat.jsonl:1: 71 tokens is longer than max_length=32 — "
                                            r".*data.truncation to left"):
            jt.Trainer(model, train, run_dir=tmp_path / "run", data=data)
        return
    with caplog.at_level("INFO", logger="jaxtune"):
        result = jt.Trainer(model, train, run_dir=tmp_path / "run", data=data,
                            config=jt.TrainConfig(steps=1, progress=False)).fit()
    assert result.state == "finished"
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data: train"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "dropped" in r.getMessage()]
    if policy == "left":  # every answer kept whole: the oldest tokens of the long user turns go
        assert "4 truncated, 0 split, 0 dropped" in report and not warnings
        tokenize = Tokenize(model.tokenizer, "chat", 32, truncation="left")
        record = train[0]
        full = Tokenize(model.tokenizer, "chat", 1000).encode(record)[0][0]
        kept = tokenize.encode(record)[0][0]
        np.testing.assert_array_equal(kept["input_ids"], full["input_ids"][-32:])
        answer = model.tokenizer.decode(full["input_ids"][full["loss_mask"]])
        assert answer == "positive<|end|>" == model.tokenizer.decode(kept["input_ids"][kept["loss_mask"]])
    else:  # right cuts the four long ones' answers off, drop drops them: either way said, per label
        assert "0 split, 4 dropped (positive 4 of 8, negative 0 of 8)" in report
        assert len(warnings) == 1
        assert "(training data): 4 of 16 examples dropped" in warnings[0]
        from jaxtune.data.pipeline import evaluation_loader

        caplog.clear()  # a validation split of the same file names the same file: the pass is said
        with caplog.at_level("INFO", logger="jaxtune"):
            evaluation_loader(train, model.tokenizer, data).scan()
        assert any("(validation data): 4 of 16 examples dropped" in r.getMessage() for r in caplog.records)
        assert "dropping changes the label mix: positive 50% -> 33%, negative 50% -> 67%" in warnings[0]
        assert "data.truncation=left" in warnings[0]


def test_errors_spell_the_fix_as_the_user_wrote_the_call(files, tmp_path):
    from jaxtune.data.config import DataConfig, read_data
    from jaxtune.data.sources import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(files["train.jsonl"].read_text() + json.dumps({"text": "no body", "category": "ham"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:49: missing 'body' key — .*this row has \['text', 'category'\]: "
                                        r"to read another of them, set data.text_field=text; or set "
                                        r"data.skip_bad_rows=true to skip"):
        read_data(DataConfig(train=str(bad), kind="classification", text_field="body", label_field="category"))
    with pytest.raises(DataError, match=r"pass text_field='text'; or pass skip_bad_rows=True to skip"):
        jt.read(bad, kind="classification", text_field="body", label_field="category")
    with pytest.raises(DataError, match=r"test.csv:1: header has no column 'text' .*set data.text_field=statement"):
        read_data(DataConfig(train=str(files["test.csv"]), kind="classification"))
    with pytest.raises(ValueError, match="data.messages_field: names a field of chat data, but data.kind is "
                                         "classification"):
        DataConfig(train=str(bad), kind="classification", messages_field="turns")


def test_a_head_that_cannot_export_names_the_one_that_does(bert):
    from jaxtune.tuning import ExportError

    model = jt.apply_plan(jt.load(str(bert)), jt.lora(rank=2) + jt.head("classification", pooling="mean"))
    with pytest.raises(ExportError, match=r"pooling mean\) has no transformers class.*the head that exports is "
                                          r"BERT's pooler into a layer with bias.*\{action: head, pooling: pooler\}"):
        jt.export(model, "unused")


def test_predict_from_a_python_trainers_run_directory_says_what_to_use(tmp_path):
    """A run directory made by a Python Trainer (no config.yaml) was read as a Hugging Face model
    directory: "no config.json"."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "good"}) + "\n")
    with pytest.raises(jt.ConfigError, match=r"run: a Trainer's run directory has no config.yaml to rebuild it from; "
                                             r"predict with result.model \(jt.predict\(model, file\)\) or a merged"):
        jt.predict(run, rows)


def test_errors_a_python_call_reaches_name_the_python_way_too(tmp_path):
    """``jt.predict(best=True)`` was told to "drop --best", and a damaged run directory to use
    "--restart or another output.dir" only, which a Trainer's user has neither of."""
    from jaxtune.training.rundir import RunDir, RunDirError

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "good"}) + "\n")
    with pytest.raises(jt.ConfigError, match=r": best=True picks a run directory's best checkpoint, and this is not a "
                                             r"run directory; drop it$"):
        jt.predict(tmp_path, rows, best=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(jt.ConfigError, match=r"adapter: a PEFT adapter; .* or jaxtune.export\(jaxtune.open_run\("
                                             r"RUN_DIR\).model, DIR, format='merged'\) in Python\) and predict"):
        jt.predict(adapter, rows)
    (tmp_path / "config.yaml").write_text("model: [")
    with pytest.raises(RunDirError, match=r"config.yaml:1: not valid YAML; restore the run's config, or start afresh: "
                                          r"jaxtune train CONFIG --restart, or finetune\(config, restart=True\) in "
                                          r"Python .*, or another output.dir \(a Trainer's run_dir\)$"):
        RunDir(tmp_path).config()


def test_predictions_write_to_csv_when_only_later_rows_have_a_label(tmp_path):
    """A label is optional per row; the CSV's columns came from the first row only, so a later row's label
    failed the whole write ("dict contains fields not in fieldnames") after the predictions were made."""
    import csv

    from jaxtune.prediction import write

    rows = [{"text": "win cash now", "prediction": "a", "probabilities": {"a": 0.75, "b": 0.25}},
            {"text": "lunch meeting", "label": "b", "prediction": "b", "probabilities": {"a": 0.125, "b": 0.875}}]
    with open(write(rows, tmp_path / "out.csv"), newline="") as f:
        written = list(csv.DictReader(f))
    assert written == [{"text": "win cash now", "prediction": "a", "p(a)": "0.75", "p(b)": "0.25", "label": ""},
                       {"text": "lunch meeting", "prediction": "b", "p(a)": "0.125", "p(b)": "0.875", "label": "b"}]


def test_the_text_baseline_reads_the_rows_the_model_reads(tmp_path):
    """With data.truncation: drop, TF-IDF was fit and scored on every row of the files, the model and the
    probe on the rows that survive tokenization: the table's "vs best baseline" compared other rows."""
    from jaxtune.data import LoaderConfig, evaluation_loader, read_source
    from jaxtune.data.testing import tiny_tokenizer, write_jsonl
    from jaxtune.training.baselines import texts

    rows = [{"text": "a b" if i % 3 else "a b " * 12, "label": "xy"[i % 2]} for i in range(12)]
    source = read_source(write_jsonl(tmp_path / "rows.jsonl", rows), "classification")
    loader = evaluation_loader(source, tiny_tokenizer(), LoaderConfig(batch_size=4, max_length=16, truncation="drop"))
    kept, labels = texts(loader)
    assert len(kept) == len(labels) == loader.scan().examples == 8
    assert kept == [r["text"] for r in rows if len(r["text"]) < 10]


def test_predict_stays_inside_the_learned_position_table(bert, files):
    """The tiny BERT has 64 positions: predict's default length (128) read rows past them with clamped
    positions and no word; the default now stays inside, and a longer max_length is refused."""
    train, _ = jt.read(files["train.jsonl"], kind="classification", text_field="body", label_field="category")
    model = jt.apply_plan(jt.load(str(bert)), jt.lora(rank=2) + jt.head("classification"), data=train)
    long_row = files["test.jsonl"].with_name("long.jsonl")
    long_row.write_text(json.dumps({"body": "word " * 40}) + "\n")
    with pytest.raises(jt.ConfigError, match=r"^max_length=100: more than the model's 64 position embeddings .*"
                                             r"give 64 or less"):
        jt.predict(model, long_row, max_length=100, text_field="body", label_field="category")
    cut = jt.predict(model, long_row, text_field="body", label_field="category")
    assert cut == jt.predict(model, long_row, max_length=64, text_field="body", label_field="category")


def test_predict_takes_a_fit_result_as_export_does(bert, files):
    """``jt.export`` and ``jt.complete`` take a ``fit()`` result; ``jt.predict`` failed on it with a
    TypeError from Path (a FitResult is no path)."""
    from jaxtune.training.result import FitResult

    train, _ = jt.read(files["train.jsonl"], kind="classification", text_field="body", label_field="category")
    model = jt.apply_plan(jt.load(str(bert)), jt.lora(rank=2) + jt.head("classification"), data=train)
    result = FitResult(model=model, step=0, steps=0, state="finished", train_metrics={}, eval_metrics={}, best=None)
    fields = dict(text_field="body", label_field="category")
    assert jt.predict(result, files["test.jsonl"], **fields) == jt.predict(model, files["test.jsonl"], **fields)
