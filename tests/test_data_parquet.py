"""Parquet sources: the same rows as JSONL give the same records and batches; files written by
``datasets`` and pandas; folders of shards; errors naming file, row and column; rows read by row
group in any order; the digest a resumed run checks; a training run from Parquet resumes exactly."""

from __future__ import annotations

import dataclasses
import itertools
import json
import pickle
import sys
import threading

import datasets
import jax
import numpy as np
import pandas as pd
import pytest
from helpers import tiny_hf_model
from PIL import Image
from test_data_images import _png
from test_data_pipeline import assert_same_batches, check_resume

from jaxtune import tuning
from jaxtune.data import DataConfig, DataError, LoaderConfig, make_loader, read_data, read_labeled, read_source
from jaxtune.data import parquet as parquet_module
from jaxtune.data import read as jt_read
from jaxtune.data.image_pixels import ImageSpec
from jaxtune.data.image_sources import read_image_folder, read_images
from jaxtune.data.images import ImageLoader, image_loader
from jaxtune.data.testing import (
    synthetic_chat_rows,
    synthetic_preference_rows,
    tiny_tokenizer,
    write_jsonl,
    write_parquet,
)
from jaxtune.models import hf
from jaxtune.training.config import CheckpointConfig, TrainConfig
from jaxtune.training.optim import OptimizerConfig
from jaxtune.training.rundir import RunMismatchError
from jaxtune.training.sharding import MeshConfig, make_mesh
from jaxtune.training.trainer import Trainer

# Turns with keys only some turns have: a Parquet struct gives every turn every key, null where absent.
CHAT = synthetic_chat_rows(22, max_words=6) + [
    {"messages": [{"role": "user", "content": "a", "name": "ann"}, {"role": "assistant", "content": "b", "weight": 0},
                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 1}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "e"},
                  {"role": "assistant", "content": "f"}]}]
ROWS = {
    "chat": CHAT,
    "prompt_completion": [{"prompt": f"question {i} " + "x" * (i % 7), "completion": f"answer {i}"} for i in range(23)],
    "preference": synthetic_preference_rows(17),
    "classification": [{"text": f"text {i} " + "y" * (i % 5), "label": ["neg", "pos", "mid"][i % 3]}
                       for i in range(21)],
    "regression": [{"text": f"text {i}", "target": i / 4 - 2} for i in range(19)],
}


def without_where(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "where"}


def records(source) -> list[dict]:
    return [without_where(source[i]) for i in range(len(source))]


def batches(source, *, shuffle: bool) -> list[dict]:
    config = LoaderConfig(batch_size=4, max_length=64, num_epochs=2, shuffle=shuffle, drop_remainder=shuffle, seed=3,
                          shard_index=0, shard_count=1)
    return list(make_loader(source, tiny_tokenizer(), config, scan_first=False))


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_the_same_rows_from_jsonl_and_parquet_give_the_same_records_and_batches(kind, tmp_path):
    rows = ROWS[kind]
    jsonl = read_source(write_jsonl(tmp_path / "rows.jsonl", rows), kind)
    path = write_parquet(tmp_path / "rows.parquet", rows, row_group_size=5)  # 5 row groups or so
    ours = read_source(path, kind)
    assert len(ours) == len(jsonl) == len(rows) and ours.label_names == jsonl.label_names
    assert records(ours) == records(jsonl)
    assert ours[7]["where"] == f"{path}[7]"  # the row's index in the file, as pandas and datasets count
    for shuffle in (True, False):
        theirs, mine = batches(jsonl, shuffle=shuffle), batches(ours, shuffle=shuffle)
        assert len(mine) == len(theirs) > 2
        for a, b in zip(mine, theirs):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_worker_processes_read_parquet_rows_and_resume_exactly(tmp_path):
    """A grain worker process gets a pickled copy of the source (file names and row indices) and
    opens the file itself; its batches are the JSONL file's, and they resume exactly."""
    config = LoaderConfig(batch_size=4, max_length=64, num_epochs=2, shuffle=True, seed=0, worker_count=1,
                          worker_buffer_size=2, shard_index=0, shard_count=1)
    data = make_loader(read_source(write_parquet(tmp_path / "c.parquet", CHAT, row_group_size=5), "chat"),
                       tiny_tokenizer(), config, scan_first=False)
    full = check_resume(data, stops=(3,))
    assert_same_batches(full, list(make_loader(read_source(write_jsonl(tmp_path / "c.jsonl", CHAT), "chat"),
                                               tiny_tokenizer(), config, scan_first=False)))


def test_files_written_by_datasets_and_pandas_read_as_their_rows(tmp_path):
    expected = records(read_source(write_jsonl(tmp_path / "chat.jsonl", CHAT), "chat"))
    datasets.Dataset.from_list(CHAT).to_parquet(tmp_path / "datasets.parquet")
    pd.DataFrame(CHAT).to_parquet(tmp_path / "pandas.parquet")
    for name in ("datasets.parquet", "pandas.parquet"):
        assert records(read_source(tmp_path / name, "chat")) == expected, name

    # pandas' own column types: a categorical label, an index column and a column no option reads
    rows = ROWS["classification"]
    frame = pd.DataFrame({"body": [r["text"] for r in rows], "category": pd.Categorical([r["label"] for r in rows]),
                          "score": np.arange(len(rows), dtype=np.float64)}, index=pd.RangeIndex(100, 100 + len(rows)))
    frame.to_parquet(tmp_path / "labeled.parquet")
    datasets.Dataset.from_pandas(frame, preserve_index=False).to_parquet(tmp_path / "labeled_ds.parquet")
    jsonl = read_source(write_jsonl(tmp_path / "l.jsonl", rows), "classification")
    for name in ("labeled.parquet", "labeled_ds.parquet"):
        source = read_source(tmp_path / name, "classification", text_field="body", label_field="category")
        assert records(source) == records(jsonl) and source.label_names == ("mid", "neg", "pos"), name


def test_a_folder_of_shards_reads_them_in_name_order(tmp_path):
    rows = ROWS["prompt_completion"]
    folder = tmp_path / "train"
    write_parquet(folder / "part-00001.parquet", rows[10:])
    write_parquet(folder / "part-00000.parquet", rows[:10], row_group_size=4)
    (folder / "_SUCCESS").write_text("")  # what Spark leaves beside its shards
    (folder / "_common_metadata.parquet").write_bytes(b"not rows")
    source = read_source(folder, "prompt_completion")
    assert records(source) == records(read_source(write_jsonl(tmp_path / "rows.jsonl", rows), "prompt_completion"))
    assert source[12]["where"] == f"{folder / 'part-00001.parquet'}[2]"
    labeled = [{"text": r["prompt"], "label": i % 2} for i, r in enumerate(rows)]
    write_parquet(tmp_path / "lab" / "0000.parquet", labeled[:5])
    write_parquet(tmp_path / "lab" / "0001.parquet", labeled[5:])
    assert [r["label"] for r in records(read_source(tmp_path / "lab", "classification"))] == [i % 2 for i in
                                                                                            range(len(rows))]


def test_a_folder_of_several_splits_is_refused_and_a_pattern_reads_one(tmp_path):
    """A hub dataset's data/ holds every split's shards; reading the folder would train on the test rows."""
    rows = ROWS["classification"]
    folder = tmp_path / "data"
    write_parquet(folder / "train-00000-of-00002.parquet", rows[:8])
    write_parquet(folder / "train-00001-of-00002.parquet", rows[8:16])
    write_parquet(folder / "test-00000-of-00001.parquet", rows[16:])
    with pytest.raises(DataError) as err:
        read_source(folder, "classification")
    assert str(err.value) == (f"{folder}: the folder holds the shards of several splits (test, train) — read one "
                              f"split's shards with a pattern, e.g. {folder}/train-*.parquet")
    train, test = jt_read(f"{folder}/train-*.parquet", kind="classification", validation=f"{folder}/test-*.parquet")
    assert [r["text"] for r in records(train)] == [r["text"] for r in rows[:16]]
    assert [r["text"] for r in records(test)] == [r["text"] for r in rows[16:]]
    assert train[9]["where"] == f"{folder / 'train-00001-of-00002.parquet'}[1]"
    with pytest.raises(DataError, match="no file matches the pattern"):
        read_source(f"{folder}/valid-*.parquet", "classification")


BAD_CHAT = {  # a bad third row: (its messages, what the error says)
    "unknown role": ([{"role": "bot", "content": "x"}], "messages[0] has unknown role 'bot'"),
    "empty assistant": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
                        "messages[1] (assistant): 'content' is empty"),
    "nothing to learn": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}],
                         "nothing to learn"),
    "null content": ([{"role": "user", "content": None}, {"role": "assistant", "content": "a"}],
                     "messages[0] (user): missing 'content' key"),
    "no messages": (None, "missing 'messages' key"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHAT))
def test_a_bad_row_names_the_file_the_row_and_the_field(case, tmp_path):
    messages, message = BAD_CHAT[case]
    rows = [CHAT[0], CHAT[1], {"messages": messages}, CHAT[2]]
    path = write_parquet(tmp_path / "chat.parquet", rows)
    with pytest.raises(DataError) as err:
        read_source(path, "chat")
    assert err.value.where == f"{path}[2]"
    assert message in str(err.value) and "skip_bad_rows=True" in str(err.value) and "\n" not in str(err.value)
    source = read_source(path, "chat", skip_bad_rows=True)
    assert len(source) == 3 and source.report.skipped == [(f"{path}[2]", err.value.problem)]
    assert [source[i]["where"] for i in range(3)] == [f"{path}[{i}]" for i in (0, 1, 3)]


def test_bad_labeled_rows_and_columns_name_the_file_row_and_field(tmp_path):
    path = write_parquet(tmp_path / "l.parquet", [{"text": "a", "label": 1.0}, {"text": "b", "label": 1.5}])
    with pytest.raises(DataError) as err:
        read_source(path, "classification")
    assert err.value.where == f"{path}[0]" and "label 1.0 is a float" in str(err.value)
    path = write_parquet(tmp_path / "r.parquet", [{"text": "a", "target": "1"}, {"text": "b", "target": "many"}])
    with pytest.raises(DataError) as err:
        read_source(path, "regression")
    assert err.value.where == f"{path}[1]" and "target='many' is not a number" in str(err.value)

    path = write_parquet(tmp_path / "cols.parquet", [{"body": "a", "category": "x"}])
    with pytest.raises(DataError) as err:
        read_source(path, "classification")
    assert str(err.value) == (f"{path}: file has no column 'text' (columns: ['body', 'category']) — rename the "
                              "column, or pass text_field='body' to read another column")
    with pytest.raises(DataError) as err:
        read_source(path, "classification", text_field="body")
    assert "no column 'label'" in str(err.value) and "pass label_field='category'" in str(err.value)


def test_a_missing_column_names_the_option_as_the_recipe_spells_it(tmp_path):
    path = write_parquet(tmp_path / "chat.parquet", [{"conversation": CHAT[0]["messages"]}])
    with pytest.raises(DataError) as err:
        read_data(DataConfig(train=str(path), kind="chat"))
    assert err.value.where == str(path)
    assert "no column 'messages' (columns: ['conversation'])" in str(err.value)
    assert "set data.messages_field=conversation" in str(err.value)
    assert records(read_source(path, "chat", messages_field="conversation")) == records(
        read_source(write_jsonl(tmp_path / "c.jsonl", [CHAT[0]]), "chat"))
    path = write_parquet(tmp_path / "pairs.parquet", [{"question": "q", "good": "a", "bad": "b"}])
    with pytest.raises(DataError) as err:
        read_source(path, "preference")
    assert "none of the columns ['input', 'preferred_output', 'non_preferred_output', 'prompt', 'chosen', " \
           "'rejected'] (columns: ['question', 'good', 'bad'])" in str(err.value)


def test_a_file_that_is_not_parquet_and_an_empty_one(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b'{"messages": []}\n')
    with pytest.raises(DataError) as err:
        read_source(path, "chat")
    assert err.value.where == str(path) and "not a readable Parquet file" in str(err.value)
    empty = write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError, match="file has no columns — write the rows"):  # pyarrow's file of no dicts
        read_source(empty, "prompt_completion")
    empty = write_parquet(tmp_path / "empty_rows.parquet", ROWS["prompt_completion"][:1])
    parquet_module.pyarrow_parquet(str(empty)).write_table(
        parquet_module.open_parquet(str(empty)).read().slice(0, 0), empty)  # the columns, no rows
    with pytest.raises(DataError) as err:
        read_source(empty, "prompt_completion")
    assert str(err.value).startswith(f"{empty}: no usable rows (empty file)")


def test_without_pyarrow_a_parquet_path_says_what_to_install(tmp_path, monkeypatch):
    chat = write_parquet(tmp_path / "chat.parquet", CHAT[:2])
    images = write_parquet(tmp_path / "images.parquet", [{"image": "a.png", "label": "x"}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    for path, read in ((chat, lambda p: read_source(p, "chat")), (chat, lambda p: read_source(p, "preference")),
                       (chat, lambda p: read_labeled(p)), (images, read_images)):
        with pytest.raises(DataError) as err:
            read(path)
        assert str(err.value) == (f"{path}: reading Parquet needs pyarrow, which is not installed — run pip install "
                                  "'jaxtune[parquet]'")


def test_rows_are_read_by_row_group_in_any_order_and_a_copy_holds_no_data(tmp_path, monkeypatch):
    rows = [{"prompt": f"p{i}", "completion": f"{i}:" + "z" * 20_000} for i in range(40)]
    path = write_parquet(tmp_path / "big.parquet", rows, row_group_size=6)
    source = read_source(path, "prompt_completion")
    assert not source._cache  # checking the rows kept none of them
    assert len(pickle.dumps(source)) < 10_000  # 800 kB of rows: a copy for a worker process holds indices only
    monkeypatch.setattr(parquet_module, "CACHE_BYTES", 1)  # one decoded group kept at a time
    order = np.random.default_rng(0).permutation(len(rows))
    assert [source[int(i)]["completion"] for i in order] == [rows[i]["completion"] for i in order]
    assert list(source._cache) == [(0, int(order[-1]) // 6)]
    copy = pickle.loads(pickle.dumps(source))
    assert not copy._cache and copy[33] == source[33]
    part = source.select([9, 2])
    assert [part[0]["where"], part[1]["where"]] == [f"{path}[9]", f"{path}[2]"]

    results: dict[int, list] = {}

    def read_all(n: int) -> None:
        results[n] = [source[int(i)]["completion"] for i in np.random.default_rng(n).permutation(len(rows))]

    threads = [threading.Thread(target=read_all, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, got in results.items():
        assert got == [rows[i]["completion"] for i in np.random.default_rng(n).permutation(len(rows))]


def test_row_groups_too_large_to_read_at_random_are_warned_of(tmp_path, monkeypatch, caplog):
    rows = [{"prompt": f"question {i} " + "x" * (i % 7), "completion": f"answer {i}"} for i in range(92)]
    monkeypatch.setattr(parquet_module, "CACHE_BYTES", 3000)  # 1-row groups: 16 kB, 46-row groups: 3.4 kB
    read_source(write_parquet(tmp_path / "small.parquet", rows, row_group_size=1), "prompt_completion")
    assert "row groups" not in caplog.text  # more data than the cache holds, in groups it holds many of
    path = write_parquet(tmp_path / "large.parquet", rows, row_group_size=46)
    read_source(path, "prompt_completion")
    assert f"{path}: row groups of up to 46 rows" in caplog.text and "row_group_size=1000" in caplog.text


def test_the_digest_follows_the_file_and_a_file_changed_after_reading_is_refused(tmp_path):
    rows = ROWS["prompt_completion"]
    path = write_parquet(tmp_path / "pc.parquet", rows)
    first = read_source(path, "prompt_completion")
    assert read_source(path, "prompt_completion").digest() == first.digest()
    assert first.select(range(5)).digest() != first.digest()
    edited = [dict(r) for r in rows]
    edited[4]["completion"] = "another answer"  # the same number of rows, one of them other
    write_parquet(path, edited)
    assert read_source(path, "prompt_completion").digest() != first.digest()
    with pytest.raises(DataError, match="file changed after it was validated"):
        first[0]


def test_image_rows_and_rows_to_predict_read_from_parquet(tmp_path):
    for name, value in (("a", 10), ("b", 90), ("c", 200)):
        _png(tmp_path / "imgs" / f"{name}.png", value)
    rows = [{"image": "imgs/a.png", "kind": "cat"}, {"image": "imgs/b.png", "kind": "dog"},
            {"image": "imgs/c.png", "kind": "cat"}]
    jsonl = read_images(write_jsonl(tmp_path / "rows.jsonl", rows), label_field="kind")
    ours = read_images(write_parquet(tmp_path / "rows.parquet", rows), label_field="kind")
    assert ours.items == jsonl.items and list(ours.labels) == list(jsonl.labels) and ours.label_names == ("cat", "dog")
    bad = write_parquet(tmp_path / "bad.parquet", [rows[0], {"image": "imgs/gone.png", "kind": "dog"}])
    with pytest.raises(DataError) as err:
        read_images(bad, label_field="kind")
    assert err.value.where == f"{bad}[1]" and "gone.png not found" in str(err.value)

    # datasets' Image feature, a {"bytes", "path"} struct: the path of an image file, or the bytes of one in memory
    files = {"image": [str(tmp_path / r["image"]) for r in rows], "kind": [r["kind"] for r in rows]}
    datasets.Dataset.from_dict(files).cast_column("image", datasets.Image()).to_parquet(tmp_path / "files.parquet")
    theirs = read_images(tmp_path / "files.parquet", label_field="kind")
    assert theirs.items == jsonl.items and list(theirs.labels) == list(jsonl.labels)

    unlabeled = [{"text": "good film"}, {"text": "dull"}]  # jaxtune predict's rows: no label column
    source = read_labeled(write_parquet(tmp_path / "predict.parquet", unlabeled), labels=("neg", "pos"),
                          require_label=False)
    assert records(source) == [{"text": "good film", "label": -1}, {"text": "dull", "label": -1}]


def assert_resumes_exactly(trainer, tmp_path) -> None:
    """``trainer(run_dir, steps)``'s 2 steps, then 2 more resumed, equal 4 uninterrupted steps."""
    whole = trainer(tmp_path / "whole", 4).fit()
    assert trainer(tmp_path / "cut", 2).fit().step == 2
    resumed = trainer(tmp_path / "cut", 4).fit()
    assert resumed.step == whole.step == 4
    for a, b in zip(jax.tree.leaves(resumed.model.params), jax.tree.leaves(whole.model.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_a_training_run_from_parquet_resumes_exactly_and_refuses_a_rewritten_file(tmp_path):
    """2 steps, then 2 more resumed, equal 4 uninterrupted steps; the resumed run's data iterator
    reads the Parquet rows where it stopped. A file rewritten with other rows is other data."""
    model_dir = tmp_path / "model"
    tiny_hf_model("LlamaForCausalLM", model_dir)
    path = write_parquet(tmp_path / "train.parquet", synthetic_chat_rows(32, max_words=5), row_group_size=8)
    base = hf.load_pretrained(model_dir)

    def trainer(run_dir, steps: int) -> Trainer:
        config = LoaderConfig(batch_size=4, max_length=64, num_epochs=None, shuffle=True, drop_remainder=True, seed=0)
        loader = make_loader(read_source(path, "chat"), tiny_tokenizer(), config, scan_first=False)
        return Trainer(tuning.apply_plan(base, tuning.lora(rank=2, alpha=2)), train_data=loader,
                       optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
                       config=TrainConfig(steps=steps, log_every=1, progress=False), run_dir=run_dir,
                       checkpoint=CheckpointConfig(every=2), mesh=make_mesh(MeshConfig(), jax.devices()[:1]))

    assert_resumes_exactly(trainer, tmp_path)
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if "loss" in r} for d in (tmp_path / "cut", tmp_path / "whole")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 4

    write_parquet(path, synthetic_chat_rows(32, seed=1, max_words=5), row_group_size=8)
    with pytest.raises(RunMismatchError, match=r"data.rows: '32 rows #\w+' -> '32 rows #\w+'"):
        trainer(tmp_path / "cut", 6).fit()


def test_raw_text_from_parquet_gives_the_text_files_packed_batches(tmp_path):
    """Hub text corpora ship a ``text`` column: its rows are the documents the same ``.txt`` files
    hold, packed into the same batches; ``data.text_field`` names another column."""
    docs = [f"document {i} " + " ".join(f"w{j}" for j in range(i % 9 + 1)) for i in range(27)]
    for i, doc in enumerate(docs):
        (tmp_path / "txt" / f"{i:03d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(doc)
    files = read_source(tmp_path / "txt", "text")
    path = write_parquet(tmp_path / "corpus.parquet", [{"body": d, "id": i} for i, d in enumerate(docs)],
                         row_group_size=5)
    ours = read_source(path, "text", text_field="body")
    assert records(ours) == records(files) and ours[3]["where"] == f"{path}[3]"
    for shuffle in (True, False):
        theirs, mine = batches(files, shuffle=shuffle), batches(ours, shuffle=shuffle)
        assert len(mine) == len(theirs) > 2
        assert_same_batches(mine, theirs)
    config = DataConfig(train=str(path), kind="text", text_field="body")
    assert records(read_data(config, validation=False)[0]) == records(files)
    assert len(pickle.dumps(ours)) < 10_000 and read_source(path, "text", text_field="body").digest() == ours.digest()


def test_raw_text_from_parquet_drops_the_bom_and_windows_line_ends_as_a_txt_file_does(tmp_path):
    """A document is the same whichever file holds it: the ``.txt`` reader (the reference) drops a
    leading byte-order mark and makes CRLF line ends ``\\n`` (a Windows editor's, not text to
    train on), so a Parquet ``text`` column holding the same characters gives the same records and
    token batches, whatever the unit of the text files."""
    docs = ["\ufeffFirst line\r\nsecond line\r\n\r\nthird,\r\nlast\r\n",
            "plain\nunix text\n", "\ufeffa BOM only", "a CR at the end\r", "inner\rCR kept\r\nend"]
    for i, doc in enumerate(docs):
        (tmp_path / "txt" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{i}.txt").write_bytes(doc.encode("utf-8"))
    files = read_source(tmp_path / "txt", "text")
    ours = read_source(write_parquet(tmp_path / "corpus.parquet", [{"text": d} for d in docs]), "text")
    assert records(ours) == records(files)
    assert records(files)[0]["text"] == "First line\nsecond line\n\nthird,\nlast\n"  # what the reference gives
    for shuffle in (True, False):
        theirs, mine = batches(files, shuffle=shuffle), batches(ours, shuffle=shuffle)
        assert len(mine) == len(theirs) > 0
        assert_same_batches(mine, theirs)


@pytest.mark.parametrize("texts, problem", [(["fine", "also fine", "  \n"], "'text' is empty"),
                                            (["fine", "also fine", "\ufeff"], "'text' holds only a byte-order mark"),
                                            ([1, 2, 7], "'text' is int, not a string"),
                                            (["fine", "also fine", None], "missing 'text' key")])
def test_a_bad_raw_text_row_names_the_file_and_row(texts, problem, tmp_path):
    path = write_parquet(tmp_path / "t.parquet", [{"text": t} for t in texts])
    if isinstance(texts[0], int):  # a column has one type: every row of it is bad, the first named
        with pytest.raises(DataError, match=rf"^{path}\[0\]: {problem}"):
            read_source(path, "text")
        return
    with pytest.raises(DataError) as err:
        read_data(DataConfig(train=str(path), kind="text"), validation=False)
    assert err.value.where == f"{path}[2]" and problem in str(err.value) and "data.skip_bad_rows=true" in str(err.value)
    source = read_source(path, "text", skip_bad_rows=True)
    assert len(source) == 2 and source.report.skipped == [(f"{path}[2]", problem)]
    with pytest.raises(DataError, match=r"data.text_unit=line: Parquet rows are one document each"):
        read_data(DataConfig(train=str(path), kind="text", text_unit="line"), validation=False)
    (tmp_path / "a.txt").write_text("words")
    with pytest.raises(DataError, match=r"data.text_field=body names a Parquet column, and text files have none"):
        read_data(DataConfig(train=str(tmp_path / "a.txt"), kind="text", text_field="body"), validation=False)


SPEC = ImageSpec(size=8, channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


def _image_folder(root, n: int = 10):
    """``root/<class>/<i>.png``: RGB images of several sizes, one grey, one with alpha (both dropped to
    RGB as transformers' ``load_image`` drops them)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, (5 + i % 3, 7 - i % 2, 4 if i == 3 else 3), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if i == 5 else pixels)
        (root / ("cat", "dog", "owl")[i % 3]).mkdir(parents=True, exist_ok=True)
        image.save(root / ("cat", "dog", "owl")[i % 3] / f"{i}.png")
    return root


def _embedded(folder, path, **write):
    """The class folder as the hub's image datasets store it: datasets' Image feature with each PNG's
    bytes in its row, and a class-name label."""
    files = sorted(folder.rglob("*.png"))
    data = {"image": [{"bytes": f.read_bytes(), "path": None} for f in files], "label": [f.parent.name for f in files]}
    datasets.Dataset.from_dict(data).cast_column("image", datasets.Image()).to_parquet(path, **write)
    return path


def test_images_held_in_parquet_rows_give_the_class_folder_batches(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    path = _embedded(folder, tmp_path / "images.parquet", batch_size=4)  # row groups of 4 rows
    ours, theirs = read_images(path), read_image_folder(folder)
    assert list(ours.labels) == list(theirs.labels) and ours.label_names == theirs.label_names
    assert ours.where(7) == f"{path}[7]" and ours[7]["where"] == f"{path}[7]"
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i]["image"], theirs[i]["image"])
    assert len(pickle.dumps(ours)) < 5_000  # a worker's copy: row indices, no image bytes
    assert not ours.items._cache or all(isinstance(k, tuple) for k in ours.items._cache)
    for train in (True, False):  # training repeats forever: 6 batches are 2 epochs and more
        config = LoaderConfig(batch_size=4, seed=3)
        mine, folders = (list(itertools.islice(image_loader(s, SPEC, config, train=train, augment=("flip", "crop")), 6))
                         for s in (ours, theirs))
        assert_same_batches(mine, folders)
    part = ours.select([8, 1])
    assert part.where(0) == f"{path}[8]" and part.digest() != ours.digest()
    np.testing.assert_array_equal(part[1]["image"], theirs[1]["image"])
    assert read_images(path).digest() == ours.digest()
    # a worker process reads its pickled copy, and the batches resume exactly
    config = LoaderConfig(batch_size=4, seed=3, num_epochs=2, shuffle=True, worker_count=1, worker_buffer_size=2)
    workers = ImageLoader(ours, SPEC, config)
    assert_same_batches(check_resume(workers, stops=(2,)), list(ImageLoader(
        theirs, SPEC, dataclasses.replace(config, worker_count=0))))

    one = tmp_path / "one.parquet"  # the datasets feature as the brief writes it: a PIL image in memory
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4), (9, 8, 7))], "label": ["x"]}).cast_column(
        "image", datasets.Image()).to_parquet(one)
    source = read_data(DataConfig(train=str(one), kind="classification", images=True), validation=False)[0]
    assert source.label_names == ("x",) and source[0]["image"].tolist() == [[[9, 8, 7]] * 4] * 4


def test_parquet_rows_that_hold_some_images_and_name_others_give_the_class_folder_batches(tmp_path):
    """datasets' ``to_parquet`` writes an Image column of images some of which were in memory (their
    bytes in the row) and some files (``bytes`` null, the path as given): each row decodes to the
    file's image, and the batches are the class folder's (the reference: the same files decoded)."""
    folder = _image_folder(tmp_path / "imgs")
    files = sorted(folder.rglob("*.png"))
    # rows 0, 3, 6, 9 name a file, relative to the Parquet file's folder; the others hold theirs
    images = [{"bytes": None, "path": str(f.relative_to(tmp_path))} if i % 3 == 0
              else {"bytes": f.read_bytes(), "path": None} for i, f in enumerate(files)]
    path = tmp_path / "mixed.parquet"
    datasets.Dataset.from_dict({"image": images, "label": [f.parent.name for f in files]}).cast_column(
        "image", datasets.Image()).to_parquet(path, batch_size=4)
    ours, theirs = read_images(path), read_image_folder(folder)
    assert list(ours.labels) == list(theirs.labels) and ours.label_names == theirs.label_names
    assert ours.where(1) == f"{path}[1]" and ours.where(3) == str(files[3])
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i]["image"], theirs[i]["image"])
    for train in (True, False):
        config = LoaderConfig(batch_size=4, seed=3)
        mine, folders = (list(itertools.islice(image_loader(s, SPEC, config, train=train, augment=("flip", "crop")), 6))
                         for s in (ours, theirs))
        assert_same_batches(mine, folders)
    part = ours.select([8, 3, 1])  # held, named, held: each keeps its own image
    assert [part.where(i) for i in range(3)] == [f"{path}[8]", str(files[3]), f"{path}[1]"]
    for i, j in enumerate((8, 3, 1)):
        np.testing.assert_array_equal(part[i]["image"], theirs[j]["image"])
    assert part.digest() != ours.digest() and read_images(path).digest() == ours.digest()
    assert image_loader(ours, SPEC, LoaderConfig(batch_size=4), train=False).scan().records == len(files)
    config = LoaderConfig(batch_size=4, seed=3, num_epochs=2, shuffle=True, worker_count=1, worker_buffer_size=2)
    assert_same_batches(check_resume(ImageLoader(ours, SPEC, config), stops=(2,)), list(ImageLoader(
        theirs, SPEC, dataclasses.replace(config, worker_count=0))))

    files[6].unlink()  # a named file that is gone is named with the row that names it
    with pytest.raises(DataError) as err:
        read_images(path)
    assert err.value.where == f"{path}[6]" and "not found" in str(err.value)


def test_corrupt_bytes_in_a_parquet_row_name_the_row(tmp_path):
    folder = _image_folder(tmp_path / "imgs", n=6)
    files = sorted(folder.rglob("*.png"))
    rows = [{"image": {"bytes": f.read_bytes(), "path": None}, "label": f.parent.name} for f in files]
    bad = [dict(r) for r in rows]
    bad[2] = {**rows[2], "image": {"bytes": b"not a png", "path": None}}
    path = write_parquet(tmp_path / "bad.parquet", bad)
    with pytest.raises(DataError) as err:
        read_images(path)
    assert str(err.value).startswith(f"{path}[2]: not a readable image (UnidentifiedImageError") and \
        "\n" not in str(err.value)
    cut = [dict(r) for r in rows]  # the header whole, the pixels cut off: passes the door, fails the scan
    cut[4] = {**rows[4], "image": {"bytes": rows[4]["image"]["bytes"][:60], "path": None}}
    path = write_parquet(tmp_path / "cut.parquet", cut, row_group_size=2)
    source = read_images(path)
    with pytest.raises(DataError, match=rf"^{path}\[4\]: not a readable image"):
        image_loader(source, SPEC, LoaderConfig(batch_size=2), train=True).scan()
    with pytest.raises(DataError, match=rf"^{path}\[4\]: not a readable image"):
        source[4]


def test_a_training_run_from_images_in_parquet_rows_resumes_exactly(tmp_path):
    """2 steps, then 2 more resumed, equal 4 uninterrupted steps of a tiny ViT classifier on images
    held in Parquet rows; the run's verify pass decodes them from the rows."""
    import torch
    from transformers import ViTConfig, ViTModel

    import jaxtune as jt

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path / "vit")
    path = _embedded(_image_folder(tmp_path / "imgs", n=12), tmp_path / "train.parquet", batch_size=5)

    def trainer(run_dir, steps: int) -> Trainer:
        source = read_images(path)
        model = jt.apply_plan(jt.load(str(tmp_path / "vit")), jt.head("classification"), data=source)
        return Trainer(model, source, run_dir=run_dir, data=DataConfig(batch_size=4, images=True, seed=0),
                       optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
                       config=TrainConfig(steps=steps, log_every=1, progress=False),
                       checkpoint=CheckpointConfig(every=2), mesh=make_mesh(MeshConfig(), jax.devices()[:1]))

    assert_resumes_exactly(trainer, tmp_path)
