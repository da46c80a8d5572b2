"""Sources: validation at the door (errors name file:line), skipping with counts, splits."""

from __future__ import annotations

import json
import pickle
import threading

import numpy as np
import pytest

from jaxtune.data import DataError, read_labeled, read_source, read_splits, read_text, split_source
from jaxtune.data.sources import split_indices
from jaxtune.data.testing import write_jsonl

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def chat_file(tmp_path, bad_row, name="chat.jsonl"):
    """A chat file whose third line is ``bad_row`` (a raw string or a JSON value)."""
    path = tmp_path / name
    bad = bad_row if isinstance(bad_row, str) else json.dumps(bad_row)
    path.write_text("\n".join([json.dumps(GOOD_CHAT), json.dumps(GOOD_CHAT), bad, json.dumps(GOOD_CHAT)]) + "\n")
    return path


BAD_CHAT_ROWS = {
    "malformed JSON": ('{"messages": [', "malformed JSON"),
    "missing messages": ({"conversation": []}, "missing 'messages'"),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    "empty assistant": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
                        "'content' is empty"),
    "weight not 0/1": ({"messages": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "a", "weight": 0.5}]}, "not 0 or 1"),
    "weight on user": ({"messages": [{"role": "user", "content": "q", "weight": 1},
                                     {"role": "assistant", "content": "a"}]}, "only allowed on assistant"),
    "nothing to learn": ({"messages": [{"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "a", "weight": 0}]}, "nothing to learn"),
    "content not a string": ({"messages": [{"role": "user", "content": 3},
                                           {"role": "assistant", "content": "a"}]}, "not a string"),
    "turn not an object": ({"messages": [["user", "q"], {"role": "assistant", "content": "a"}]},
                           "messages[0] is a JSON list, not an object"),
    "name not a string": ({"messages": [{"role": "user", "content": "q", "name": 5},
                                        {"role": "assistant", "content": "a"}]},
                          "messages[0] (user): 'name' is int, not a string"),
    "tool calls": ({"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a", "tool_calls": []}]}, "unsupported keys"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHAT_ROWS))
def test_bad_chat_row_names_file_and_line(tmp_path, case):
    row, message = BAD_CHAT_ROWS[case]
    path = chat_file(tmp_path, row)
    with pytest.raises(DataError) as err:
        read_source(path, "chat")
    assert err.value.where == f"{path}:3"
    assert message in str(err.value) and "skip_bad_rows" in str(err.value)


@pytest.mark.parametrize("case", ["malformed JSON", "unknown role", "empty assistant"])
def test_skip_bad_rows_counts_them(tmp_path, case, caplog):
    path = chat_file(tmp_path, BAD_CHAT_ROWS[case][0])
    source = read_source(path, "chat", skip_bad_rows=True)
    assert len(source) == 3 and source.report.rows == 3
    assert [where for where, _ in source.report.skipped] == [f"{path}:3"]
    assert "1 bad rows skipped" in source.report.summary()
    assert "skipped 1 bad rows" in caplog.text
    assert [source[i]["where"] for i in range(3)] == [f"{path}:{n}" for n in (1, 2, 4)]


def test_chat_record_weights_and_blank_lines(tmp_path):
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "a1", "weight": 0}, {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2", "weight": 1}]}
    path = tmp_path / "c.jsonl"
    path.write_text("\n" + json.dumps(row) + "\n\n   \n")
    source = read_source(path, "chat")
    assert len(source) == 1 and source.report.skipped == []
    record = source[0]
    assert record["weights"] == [0, 0, 0, 0, 1]
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert all(set(m) == {"role", "content"} for m in record["messages"])
    assert record["where"] == f"{path}:2"


@pytest.mark.parametrize("kind", ["chat", "prompt_completion", "classification", "regression"])
def test_empty_file_is_an_error(tmp_path, kind):
    path = tmp_path / ("empty.csv" if kind == "regression" else "empty.jsonl")
    path.write_text("" if kind != "chat" else "\n\n")
    with pytest.raises(DataError, match="empty"):
        read_source(path, kind)


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n[1, 2]\n")
    with pytest.raises(DataError, match="no usable rows"):
        read_source(path, "chat", skip_bad_rows=True)


def test_prompt_completion(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}, {"prompt": "", "completion": "x"},
                                               {"prompt": "q", "completion": ""}, {"prompt": "q"}])
    with pytest.raises(DataError, match=r"pc.jsonl:3: 'completion' is empty"):
        read_source(path, "prompt_completion")
    source = read_source(path, "prompt_completion", skip_bad_rows=True)
    assert [source[i]["completion"] for i in range(len(source))] == ["4", "x"]
    assert [w for w, _ in source.report.skipped] == [f"{path}:3", f"{path}:4"]


def test_labeled_jsonl_string_and_integer_labels(tmp_path):
    strings = write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
                                                 {"text": "c", "label": "pos"}])
    source = read_labeled(strings)
    assert source.label_names == ("neg", "pos")
    assert [source[i]["label"] for i in range(3)] == [1, 0, 1]
    ints = write_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 10}, {"text": "b", "label": 2},
                                              {"text": "c", "label": 0}])
    source = read_labeled(ints)
    assert source.label_names == (0, 2, 10)  # numeric order, not "10" < "2"
    assert [source[i]["label"] for i in range(3)] == [2, 1, 0]
    # Integers not written as Python writes them stay strings, each its own label, as written.
    padded = write_jsonl(tmp_path / "p.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "01"},
                                                {"text": "c", "label": "-0"}, {"text": "d", "label": " 2 "}])
    source = read_labeled(padded)
    assert source.label_names == ("-0", "01", "1", "2")
    assert [source[i]["label"] for i in range(4)] == [2, 1, 0, 3]


def test_csv_oddities_are_read_or_refused_naming_the_line(tmp_path):
    """A document longer than csv's 128 KiB field limit is read; an upper-case suffix is still CSV; a
    header naming a column twice, a blank label and a stray quote that swallows TSV rows are refused
    at the line where the row starts."""
    long = "w " * 70_000
    (tmp_path / "long.CSV").write_text(f"text,label\n{long},pos\nb,neg\n")
    source = read_labeled(tmp_path / "long.CSV")
    assert source[0]["text"] == long and source.label_names == ("neg", "pos")
    cases = {"twice.csv": ("text,label,label\na,pos,neg\n", 1, "names column 'label' more than once"),
             "blank.csv": ('text,label\na,pos\nb,"  "\n', 3, "missing 'label'"),
             "multiline.csv": ('text,label\na,pos\n"b\nc",\n', 3, "missing 'label'"),
             "quote.tsv": ('text\tlabel\na\tpos\n"oops\tpos\nnext\tneg\nend"\tneg\nlast\tpos\n', 3,
                           "a quote opens a field that runs over lines 3-5")}
    for name, (text, line, problem) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as err:
            read_labeled(tmp_path / name)
        assert err.value.where == f"{tmp_path / name}:{line}" and problem in str(err.value), str(err.value)


def test_labeled_csv_with_pairs_and_fixed_vocabulary(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('text,other,label\n"a, with comma",x,yes\nb,y,no\nc,z,maybe\n')
    with pytest.raises(DataError) as err:
        read_labeled(path, labels=["no", "yes"], pair_field="other")
    assert err.value.where == f"{path}:4" and "not in the label vocabulary" in str(err.value)
    source = read_labeled(path, labels=["no", "yes"], pair_field="other", skip_bad_rows=True)
    assert len(source) == 2 and source.label_names == ("no", "yes")
    assert source[0] == {"text": "a, with comma", "text_pair": "x", "label": 1, "where": f"{path}:2"}


def test_csv_missing_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("sentence,label\nhello,1\n")
    with pytest.raises(DataError, match=r"rows.csv:1: header has no column 'text'"):
        read_labeled(path)


def test_a_missing_key_suggests_a_key_no_other_option_reads(tmp_path):
    rows = write_jsonl(tmp_path / "r.jsonl", [{"text": "x", "score": 1.5}])
    with pytest.raises(DataError, match="has \\['text', 'score'\\]: to read another of them, pass label_field='score'"):
        read_labeled(rows, "regression")
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "answer": "y"}])
    with pytest.raises(DataError, match="pass completion_field='answer'"):
        read_source(pairs, "prompt_completion")
    only = write_jsonl(tmp_path / "o.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="has only \\['text'\\], which other options read"):
        read_labeled(only)


def test_regression_targets(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,target\ngood,3.5\nbad,-2\nodd,high\nnan,nan\n")
    with pytest.raises(DataError) as err:
        read_labeled(path, "regression")
    assert err.value.where == f"{path}:4" and "'high' is not a number" in str(err.value)
    source = read_labeled(path, "regression", skip_bad_rows=True)
    assert [source[i]["label"] for i in range(len(source))] == [3.5, -2.0]
    assert len(source.report.skipped) == 2 and source.label_names is None
    jsonl = write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "target": True}])
    with pytest.raises(DataError, match="not a number"):
        read_labeled(jsonl, "regression")
    (tmp_path / "big.jsonl").write_text('{"text": "a", "target": 1%s}\n' % ("0" * 400))
    with pytest.raises(DataError, match="big.jsonl:1: regression target 'target' is a number too large"):
        read_labeled(tmp_path / "big.jsonl", "regression")
    # finite as a Python float but inf as float32, which training uses: the run failed at a non-finite step
    (tmp_path / "f32.jsonl").write_text('{"text": "a", "target": 1}\n{"text": "b", "target": -1e39}\n')
    with pytest.raises(DataError, match=r"f32.jsonl:2: regression target target=-1e\+39 is beyond float32's range"):
        read_labeled(tmp_path / "f32.jsonl", "regression")


def test_text_units_and_folders(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first para\nline two\n\n\nsecond para\n")
    (tmp_path / "docs" / "sub" / "b.md").write_text("only one\n")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00\x01")
    folder = tmp_path / "docs"
    assert [r["text"] for r in read_text(folder)] == ["first para\nline two\n\n\nsecond para\n", "only one\n"]
    paragraphs = read_text(folder, unit="paragraph")
    assert [r["text"] for r in paragraphs] == ["first para\nline two\n", "second para\n", "only one\n"]
    assert [r["where"].rsplit("/", 1)[1] for r in paragraphs] == ["a.txt:1", "a.txt:5", "b.md:1"]
    assert [r["text"] for r in read_text(folder / "a.txt", unit="line")] == ["first para", "line two", "second para"]
    # A BOM and Windows line ends are not text: every unit reads as the same file with "\n" would.
    (tmp_path / "win.txt").write_bytes("\ufeffone\r\ntwo\r\n\r\nthree\r\n".encode())
    (tmp_path / "unix.txt").write_bytes(b"one\ntwo\n\nthree\n")
    for unit in ("file", "paragraph", "line"):
        win, unix = read_text(tmp_path / "win.txt", unit=unit), read_text(tmp_path / "unix.txt", unit=unit)
        assert [r["text"] for r in win] == [r["text"] for r in unix], unit
    # A BOM on a line of its own is not a document (it was one, empty): units start after it.
    (tmp_path / "bom_line.txt").write_bytes("\ufeff\none\n\ntwo\n".encode())
    assert [r["text"] for r in read_text(tmp_path / "bom_line.txt", unit="paragraph")] == ["one\n", "two\n"]
    assert [r["text"] for r in read_text(tmp_path / "bom_line.txt", unit="line")] == ["one", "two"]


def test_text_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"empty.txt:1: file is empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "bom.txt").write_bytes("\ufeff\n".encode())  # an editor's "empty" UTF-8 file
    with pytest.raises(DataError, match=r"bom.txt:1: file is empty"):
        read_text(tmp_path / "bom.txt")
    (tmp_path / "latin.txt").write_bytes(b"ok line\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin.txt:2: not UTF-8"):
        read_text(tmp_path / "latin.txt", unit="line")
    (tmp_path / "no_text").mkdir()
    with pytest.raises(DataError, match="no .txt/.md files"):
        read_text(tmp_path / "no_text")
    with pytest.raises(DataError, match="no such file"):
        read_text(tmp_path / "missing.txt")


def test_sources_are_picklable_and_thread_safe(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}" * (i % 7 + 1)} for i in range(300)]
    source = read_source(write_jsonl(tmp_path / "pc.jsonl", rows), "prompt_completion")
    copy = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 20_000  # offsets, not rows
    results = [None] * 8

    def read(k):
        results[k] = [copy[i]["completion"] for i in np.random.default_rng(k).permutation(300)]

    threads = [threading.Thread(target=read, args=(k,)) for k in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for k in range(8):
        assert results[k] == [rows[i]["completion"] for i in np.random.default_rng(k).permutation(300)]


def test_changed_file_is_detected(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    source = read_source(path, "prompt_completion")
    write_jsonl(path, [{"prompt": "a", "completion": "bbbb"}])
    with pytest.raises(DataError, match="changed after it was validated"):
        source[0]


def test_split_indices_stratified_and_seeded():
    labels = [0] * 70 + [1] * 30
    train, val = split_indices(100, 0.2, seed=3, labels=labels)
    assert len(val) == 20 and sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert sum(labels[i] for i in val) == 6
    again = split_indices(100, 0.2, seed=3, labels=labels)
    assert np.array_equal(val, again[1])
    assert not np.array_equal(val, split_indices(100, 0.2, seed=4, labels=labels)[1])
    assert len(split_indices(7, 3, seed=0, labels=[0, 0, 0, 1, 1, 2, 2])[1]) == 3
    # The rounding's extra rows never take a label's only training row: ten single-row labels and
    # 90 of one label, 10 % held out: all ten from the large label (the largest remainders were the
    # single rows, and the first of them went to validation).
    labels = ["common"] * 90 + [f"rare{i}" for i in range(10)]
    train, val = split_indices(100, 0.1, seed=0, labels=labels)
    assert len(val) == 10 and {labels[i] for i in val} == {"common"} and len({labels[i] for i in train}) == 11
    with pytest.raises(ValueError, match="leaves a part empty"):
        split_indices(3, 0.01)


def test_read_splits_by_fraction_and_by_file(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    train, val = read_splits(path, "classification", validation_fraction=0.25)
    assert len(train) == 30 and len(val) == 10
    assert {train[i]["text"] for i in range(30)}.isdisjoint({val[i]["text"] for i in range(10)})
    assert sum(val[i]["label"] for i in range(10)) == 5
    val_path = write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "b"}, {"text": "y", "label": "c"}])
    with pytest.raises(DataError, match=r"val.jsonl:2: label 'c' is not in the label vocabulary"):
        read_splits(path, "classification", validation=val_path)
    train, val = read_splits(path, "classification", validation=val_path, skip_bad_rows=True)
    assert val.label_names == train.label_names == ("a", "b") and val[0]["label"] == 1
    chat = write_jsonl(tmp_path / "chat.jsonl", [GOOD_CHAT] * 10)
    train, val = split_source(read_source(chat, "chat"), 0.3, seed=1)
    assert (len(train), len(val)) == (7, 3) and train.select([0])[0]["messages"] == GOOD_CHAT["messages"]
    import jaxtune as jt

    with pytest.raises(ValueError, match="^validation=10: give a fraction of the rows to hold out"):
        jt.read(path, kind="classification", validation=10)  # not a file named "10"
    # validation_size with no validation data capped nothing, without a word
    with pytest.raises(ValueError, match=r"^validation_size=5: there is no validation data to cap; pass "
                                         r"validation=0.1 \(a fraction of the rows to hold out\) or validation=FILE$"):
        jt.read(chat, kind="chat", validation_size=5)
    assert len(jt.read(chat, kind="chat", validation=0.5, validation_size=2)[1]) == 2
