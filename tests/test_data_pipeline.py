"""The grain pipeline: batch contract, epochs without loss or duplicates, seeded shuffling,
exact resume (threads and worker processes), disjoint process shards, global arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtune.data import LoaderConfig, make_loader, packing, read_source, to_global
from jaxtune.data.pipeline import evaluation_loader
from jaxtune.data.testing import synthetic_chat_rows, synthetic_preference_rows, tiny_tokenizer, write_jsonl

N_DOCS = 60


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Raw-text source: one line per document, ``dNN:`` then filler of varied length."""
    rng = np.random.default_rng(0)
    lines = [f"d{i:02d}:" + "ab c" * int(rng.integers(1, 14)) for i in range(N_DOCS)]
    path = tmp_path_factory.mktemp("docs") / "docs.txt"
    path.write_text("\n".join(lines) + "\n")
    return read_source(path, "text", unit="line"), lines


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", synthetic_chat_rows(40, max_words=6))
    return read_source(path, "chat")


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    rows = [{"text": f"t{i} " + "x" * (i % 9), "label": ["neg", "pos", "mid"][i % 3]} for i in range(30)]
    return read_source(write_jsonl(tmp_path_factory.mktemp("lab") / "l.jsonl", rows), "classification")


def loader(source, tokenizer, **overrides):
    options = dict(batch_size=4, max_length=64, shard_index=0, shard_count=1, pack_window=8)
    return make_loader(source, tokenizer, LoaderConfig(**{**options, **overrides}), scan_first=False)


def collect(it, limit=None):
    out = []
    for batch in it:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def segment_texts(tokenizer, batches) -> list[str]:
    """Decoded text of every packed segment, checking each row's layout on the way."""
    texts = []
    for batch in batches:
        for row in range(len(batch["input_ids"])):
            seg, pos, ids = batch["segment_ids"][row], batch["positions"][row], batch["input_ids"][row]
            count = seg.max()
            assert set(np.unique(seg)) <= set(range(count + 1))
            for s in range(1, count + 1):
                at = np.flatnonzero(seg == s)
                assert at.tolist() == list(range(at[0], at[-1] + 1))  # contiguous
                assert pos[at].tolist() == list(range(len(at)))
                assert batch["targets"][row][at[:-1]].tolist() == ids[at[1:]].tolist()
                assert batch["loss_weights"][row][at[-1]] == 0
                texts.append(tokenizer.decode(ids[at], skip_special_tokens=False))
            pad = seg == 0
            assert not batch["loss_weights"][row][pad].any() and not pos[pad].any()
    return texts


def test_batches_follow_the_contract(docs, labeled, tokenizer):
    for source in (docs[0], labeled):
        data = loader(source, tokenizer)
        batch = next(iter(data))
        spec = data.batch_spec()
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
    assert spec["labels"] == ((4,), np.int32)


def test_one_epoch_packs_every_document_exactly_once(docs, tokenizer):
    source, lines = docs
    batches = collect(iter(loader(source, tokenizer, drop_remainder=False)))
    texts = segment_texts(tokenizer, batches)
    assert sorted(texts) == sorted(line + "</s>" for line in lines)
    rows = sum(len(b["input_ids"]) for b in batches)
    real_rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches)
    assert real_rows < 0.8 * N_DOCS  # rows hold several documents
    assert rows % 4 == 0 and rows - real_rows < 4  # last batch filled with empty rows


def test_pad_mode_one_document_per_row(docs, tokenizer):
    source, lines = docs
    batches = collect(iter(loader(source, tokenizer, packing=False, batch_size=6)))
    assert all(b["segment_ids"].max(axis=1).tolist() == [1] * 6 for b in batches)
    assert sorted(segment_texts(tokenizer, batches)) == sorted(line + "</s>" for line in lines)


@pytest.mark.parametrize("kind", ["labeled", "chat"])
def test_dynamic_padding_cuts_batches_to_their_longest_row(kind, chat, labeled, tokenizer):
    """pad_to_multiple_of: each batch is the full-width batch with only padding columns cut."""
    source = labeled if kind == "labeled" else chat
    options = dict(num_epochs=1, shuffle=False, drop_remainder=False, packing=False, max_length=256)
    full = collect(loader(source, tokenizer, **options))
    cut = collect(loader(source, tokenizer, pad_to_multiple_of=8, **options))
    assert len(full) == len(cut)
    widths = set()
    for f, c in zip(full, cut):
        width = c["input_ids"].shape[1]
        longest = int(np.flatnonzero(f["segment_ids"].any(0))[-1]) + 1
        assert width % 8 == 0 and longest <= width < longest + 8
        widths.add(width)
        for key in f:
            if key == packing.ANSWER_INDEX:  # the same positions; its width follows the batch's
                assert [r[r >= 0].tolist() for r in c[key]] == [r[r >= 0].tolist() for r in f[key]]
            elif f[key].ndim == 2:
                np.testing.assert_array_equal(c[key], f[key][:, :width])
                assert not f[key][:, width:].any()  # only padding was cut
            else:
                np.testing.assert_array_equal(c[key], f[key])
    assert len(widths) > 1  # the data has rows of different lengths
    with pytest.raises(ValueError, match="pad_to_multiple_of needs one process"):
        loader(source, tokenizer, pad_to_multiple_of=8, shard_index=0, shard_count=2)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", ["chat", "preference"])
def test_on_several_processes_every_batch_lists_its_answers_at_one_width_that_bounds_every_row(
        kind, packed, chat, tokenizer, tmp_path):
    """Processes must give every batch one shape without asking each other: each sizes the answer index
    to a bound from the scan of the whole source (the same on each), which every row's supervised
    positions stay within; the index still lists them exactly."""
    source = chat if kind == "chat" else read_source(
        write_jsonl(tmp_path / "pairs.jsonl", synthetic_preference_rows(40, max_words=6)), "preference")
    options = dict(packing=packed, max_length=160, batch_size=4, num_epochs=2, drop_remainder=False)
    bounds, widths, fullest = set(), set(), 0
    for shard in range(2):
        data = loader(source, tokenizer, shard_index=shard, shard_count=2, **options)
        bounds.add(data.answer_bound())
        spec = data.batch_spec()
        for batch in collect(iter(data)):
            assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
            index, weights = batch[packing.ANSWER_INDEX], batch["loss_weights"]
            widths.add(index.shape[-1])
            for row, listed in zip(weights.reshape(-1, 160), index.reshape(-1, index.shape[-1])):
                real = np.flatnonzero(row > 0)
                assert listed.tolist() == real.tolist() + [-1] * (len(listed) - len(real))
                fullest = max(fullest, len(real))
    (bound,) = bounds
    assert widths == {packing.index_width(bound, 160)} and fullest <= bound
    if not packed:  # a row is an example (a pair's side): the bound is the fullest one
        assert fullest == bound
    if kind == "preference" and not packed:  # short answers: a quarter of the row (a pair's prompt has none)
        assert widths == {40}


def test_shuffle_is_seeded_and_changes_each_epoch(docs, tokenizer):
    source, _ = docs

    def order(seed, epochs=1):
        data = loader(source, tokenizer, seed=seed, num_epochs=epochs, packing=False, batch_size=N_DOCS)
        return [t.split(":")[0] for t in segment_texts(tokenizer, collect(iter(data)))]

    first = order(1)
    assert first == order(1) and first != order(2) and sorted(first) == sorted(f"d{i:02d}" for i in range(N_DOCS))
    two = order(1, epochs=2)
    assert two[:N_DOCS] == first and sorted(two[N_DOCS:]) == sorted(first) and two[N_DOCS:] != first
    unshuffled = loader(source, tokenizer, shuffle=False, packing=False, batch_size=N_DOCS)
    assert [t[:3] for t in segment_texts(tokenizer, collect(iter(unshuffled)))] == [f"d{i:02d}" for i in range(N_DOCS)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def check_resume(data, stops):
    """Resuming from the state after each of ``stops`` batches gives the uninterrupted rest."""
    it = iter(data)
    full, states = [], {}
    for batch in it:
        full.append(batch)
        if len(full) in stops:
            states[len(full)] = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    getattr(it, "close", lambda: None)()
    assert len(full) > max(stops)
    for k, state in states.items():
        resumed = iter(data)
        resumed.set_state(state)
        assert_same_batches(collect(resumed), full[k:])
        getattr(resumed, "close", lambda: None)()
    return full


def test_packed_classifier_batches_hold_every_example_once_with_its_label(labeled, tokenizer):
    data = loader(labeled, tokenizer, packing=True, num_epochs=1, drop_remainder=False, max_length=32)
    spec = data.batch_spec()
    assert spec["labels"] == ((4, 4), np.int32) and spec["example_weights"] == ((4, 4), np.float32)
    batches = collect(iter(data))
    seen = []
    for batch in batches:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
        for row in range(4):
            count = int(batch["example_weights"][row].sum())
            assert batch["segment_ids"][row].max() == count and not batch["example_weights"][row][count:].any()
            for s in range(count):
                text = tokenizer.decode(batch["input_ids"][row][batch["segment_ids"][row] == s + 1],
                                        skip_special_tokens=True)
                seen.append((int(text.split()[0][1:]), labeled.label_names[batch["labels"][row][s]]))
    assert sorted(seen) == [(i, ["neg", "pos", "mid"][i % 3]) for i in range(30)]
    assert sum(len(b["input_ids"]) for b in batches) < 30 / 2  # rows hold several examples
    # Dynamic padding cuts the token columns only.
    cut = next(iter(loader(labeled, tokenizer, packing=True, max_length=64, pad_to_multiple_of=8)))
    assert cut["labels"].shape == (4, 8) and cut["input_ids"].shape[1] % 8 == 0
    # Evaluation packs in file order: its segments, row by row, are the file's rows.
    in_order = []
    for batch in collect(iter(evaluation_loader(labeled, tokenizer, data.config))):
        for row in range(4):
            for s in range(int(batch["example_weights"][row].sum())):
                ids = batch["input_ids"][row][batch["segment_ids"][row] == s + 1]
                in_order.append(int(tokenizer.decode(ids, skip_special_tokens=True).split()[0][1:]))
    assert in_order == list(range(30))


def test_evaluation_reads_on_threads_whatever_the_worker_count(docs, tokenizer):
    """Each evaluation iterates its loader afresh: worker processes would start anew every time."""
    import multiprocessing

    config = LoaderConfig(batch_size=4, max_length=64, shard_index=0, shard_count=1, pack_window=8)
    on_threads = collect(iter(evaluation_loader(docs[0], tokenizer, config)))
    with_workers = evaluation_loader(docs[0], tokenizer, LoaderConfig(**{**vars(config), "worker_count": 2}))
    assert with_workers.config.worker_count == 0
    batches = []
    for batch in with_workers:
        assert not multiprocessing.active_children()
        batches.append(batch)
    assert len(batches) == len(on_threads)
    for ours, theirs in zip(batches, on_threads):
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("mode", ["packed", "padded", "classifier", "classifier-packed"])
def test_resume_is_exact_with_threads(mode, docs, chat, labeled, tokenizer):
    if mode.startswith("classifier"):
        packed = mode == "classifier-packed"  # short rows: two examples each, so that there are 6 batches
        data = loader(labeled, tokenizer, num_epochs=2, packing=packed, **({"max_length": 16} if packed else {}))
    else:
        data = loader(chat, tokenizer, num_epochs=2, packing=mode == "packed", max_length=128, read_threads=2)
    full = check_resume(data, stops=(1, 3, 5))
    assert_same_batches(collect(iter(data)), full)  # and a fresh pass repeats itself


@pytest.mark.slow
def test_resume_is_exact_with_worker_processes(docs, tokenizer):
    source, lines = docs
    data = loader(source, tokenizer, num_epochs=2, worker_count=2, worker_buffer_size=2, drop_remainder=False)
    full = check_resume(data, stops=(3,))
    assert sorted(segment_texts(tokenizer, full)) == sorted(line + "</s>" for line in lines * 2)


def test_resume_is_exact_with_one_worker_process(docs, tokenizer):
    data = loader(docs[0], tokenizer, num_epochs=2, worker_count=1, worker_buffer_size=2)
    full = check_resume(data, stops=(3,))
    no_workers = collect(iter(loader(docs[0], tokenizer, num_epochs=2)))
    assert_same_batches(full, no_workers)  # one worker packs exactly what the main process would


def test_two_processes_get_disjoint_shards_that_cover_the_data(docs, tokenizer):
    source, lines = docs
    seen = []
    for index in range(2):
        data = loader(source, tokenizer, batch_size=8, shard_index=index, shard_count=2, drop_remainder=False)
        assert data.batch_size == 4
        seen.append(segment_texts(tokenizer, collect(iter(data))))
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(line + "</s>" for line in lines)
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_default_sharding_is_by_jax_process(docs, tokenizer):
    data = make_loader(docs[0], tokenizer, LoaderConfig(batch_size=4, max_length=64), scan_first=False)
    assert (data.shard_index, data.shard_count) == (0, 1)
    with pytest.raises(ValueError, match="not divisible"):
        loader(docs[0], tokenizer, batch_size=3, shard_index=0, shard_count=2)


def test_scan_reports_counts(chat, tokenizer):
    stats = make_loader(chat, tokenizer, LoaderConfig(batch_size=4, max_length=48, shard_index=0, shard_count=1)).scan()
    assert stats.records == 40 and stats.truncated + stats.dropped > 0
    assert stats.examples == 40 - stats.dropped


def test_to_global_shards_the_batch_over_devices(docs, tokenizer):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    batch = next(iter(loader(docs[0], tokenizer, batch_size=8)))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    arrays = to_global(batch, NamedSharding(mesh, PartitionSpec("data")))
    assert arrays["input_ids"].shape == (8, 64) and len(arrays["input_ids"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(arrays["targets"]), batch["targets"])


def test_iterator_state_round_trips_through_orbax(tmp_path, chat, tokenizer):
    import grain
    import orbax.checkpoint as ocp

    data = loader(chat, tokenizer, num_epochs=2, max_length=128)
    it = iter(data)
    collect(it, limit=3)
    with ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = collect(it)
        resumed = iter(data)
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same_batches(collect(resumed), expected)


@pytest.mark.parametrize("kind", ["text", "chat", "classification", "in-order", "two-shards"])
def test_rows_per_epoch_are_the_rows_one_pass_fills(kind, docs, chat, labeled, tokenizer):
    """An epoch's step count reads rows_per_epoch: the rows the loader's packer really fills in one
    shuffled pass (ceil(tokens / max_length) fell ~8% short on the quickstart: "1 epoch" saw 92% of
    the reviews), counted against one uninterrupted pass of the loader itself, every shard's."""
    source = {"text": docs[0], "chat": chat}.get(kind, labeled)
    options = dict(packing=True, num_epochs=1, drop_remainder=False, max_length=32, seed=3,
                   pack_in_order=kind == "in-order")
    shards = 2 if kind == "two-shards" else 1
    real = 0
    for shard in range(shards):
        for batch in collect(iter(loader(source, tokenizer, **options, shard_index=shard, shard_count=shards))):
            real += int((batch["segment_ids"].max(axis=1) > 0).sum())
    counted, how = loader(source, tokenizer, **options, shard_index=0, shard_count=shards).rows_per_epoch()
    assert counted == real and how == f"{real} packed rows"
