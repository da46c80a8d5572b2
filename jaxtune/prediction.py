"""``jaxtune.predict``: a trained classifier or regressor and a file in, one prediction per row out (a reward
model and a file of preference pairs or conversations: each answer's or conversation's reward).

The model is a run directory (its latest or best checkpoint, with the run's label names and
field mapping), a merged export (an HF ``*ForSequenceClassification`` directory, whose
``config.json`` names the labels) or a :class:`~jaxtune.tuning.Tuned` in memory. Rows are read
and checked as training reads them (the same field mapping, ``path:line`` errors), except that
a label is optional; a label outside the model's vocabulary is an error. Predictions are
written with the data's own label names::

    rows = jt.predict("runs/debates", "test.csv", out="predictions.csv")
    rows[0]  # {"statement": "...", "party": "dem", "prediction": "dem", "probabilities": {"dem": 0.91, ...}}

The module is ``prediction``, not ``predict``: a submodule named like the function would take its
place as the package's attribute once imported (``import jaxtune.predict`` then
``jaxtune.predict(...)`` would call a module).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune import processes
from jaxtune.config import ConfigError
from jaxtune.data.config import FIELD_OPTIONS
from jaxtune.data.labeled_sources import read_labeled
from jaxtune.data.pipeline import LoaderConfig, evaluation_loader
from jaxtune.data.preference import read_preference
from jaxtune.data.row_sources import read_jsonl
from jaxtune.data.rows import PYTHON, Syntax
from jaxtune.data.source_types import PREFERENCE, DataError, Source
from jaxtune.models.load import model_of, tokenizer_of
from jaxtune.training.evaluate import classification_metrics, in_lockstep, regression_metrics
from jaxtune.training.preference_config import host_keys
from jaxtune.training.reward_model import pair_rewards
from jaxtune.training.sharding import (
    MeshConfig,
    batch_sharding,
    data_parallel_size,
    global_batch,
    jit_on_mesh,
    make_mesh,
)
from jaxtune.training.step import model_inputs, packed_segments
from jaxtune.tuning import Tuned, apply_plan

log = logging.getLogger(__name__)
_LABELED = {k for k, kinds in FIELD_OPTIONS.items() if "classification" in kinds}  # text/pair/label fields
_ROW = "row_numbers"  # predict's own batch key: each output's row in the file, + 1 (0: none)
CHAT = "chat"  # the source kind of conversations, which a reward model scores whole


def load_predictor(target: str | os.PathLike[str] | Tuned, *, best: bool = False,
                   syntax: Syntax = PYTHON) -> tuple[Tuned, dict[str, Any], Mesh | None]:
    """The model to predict with, the data options its run was trained with (field names,
    ``max_length``, ``batch_size``, ``packing``; empty for an export), and the mesh its params are
    on (a run directory: the run's, its params sharded as training shards them; else None).
    ``syntax``: how errors spell ``best`` (the argument, or the command's flag). A ``fit()`` result
    predicts with its trained model, as :func:`jaxtune.export` takes it."""
    target = model_of(target)
    if isinstance(target, Tuned):
        return target, {}, None
    path = Path(target)
    if best and not (path / "config.yaml").is_file():
        raise ConfigError(f"{path}: {syntax.option('best', True)} picks a run directory's best checkpoint, and this "
                          "is not a run directory; drop it")
    if (path / "config.yaml").is_file():  # a run directory
        from jaxtune.recipe import open_run

        trainer = open_run(path, best=best, evaluation=False)
        if trainer.step == 0:
            raise ConfigError(f"{path}: no checkpoint yet, so there is nothing trained to predict with; train it "
                              "first (jaxtune train CONFIG, or jaxtune.finetune(config) in Python)")
        # the run's data section (the trainer's own data config leaves out the field mapping, which read the rows)
        data = trainer.resolved_config.get("data", {})
        options = {k: data[k] for k in (*_LABELED, "max_length", "batch_size", "packing") if data.get(k) is not None}
        return trainer.model, options, trainer.mesh
    if (path / "adapter_config.json").is_file():
        raise ConfigError(f"{path}: a PEFT adapter; predict with its run directory, or export the run merged (jaxtune "
                          "export RUN_DIR --merge --to DIR, or jaxtune.export(jaxtune.open_run(RUN_DIR).model, DIR, "
                          "format='merged') in Python) and predict with DIR")
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():  # else: "no config.json", about HF dirs
        raise ConfigError(f"{path}: a Trainer's run directory has no config.yaml to rebuild it from; predict with "
                          "result.model (jt.predict(model, file)) or a merged export")
    from jaxtune.models.load import load

    pretrained = load(str(path))
    tuned = apply_plan(pretrained, [])
    if tuned.task == "lm":
        raise ConfigError(f"{path}: a language model ({pretrained.architecture}); predict reads classifiers and "
                          "regressors (*ForSequenceClassification); generate with jaxtune generate")
    id2label = pretrained.hf_config.get("id2label") or {}
    names = tuple(id2label.get(str(i), f"LABEL_{i}") for i in range(tuned.num_outputs))
    return dataclasses.replace(tuned, label_names=names if tuned.task == "classification" else None), {}, None


def predict(model: str | os.PathLike[str] | Tuned, data: str | os.PathLike[str] | Source,
            out: str | os.PathLike[str] | None = None, *, best: bool = False, batch_size: int | None = None,
            max_length: int | None = None, packing: bool | None = None, skip_bad_rows: bool = False,
            syntax: Syntax = PYTHON, **fields: str) -> list[dict[str, Any]]:
    """Predict every row of ``data`` with ``model``; write them to ``out`` (JSONL, or CSV/TSV by suffix).

    Args:
      model: a run directory, a merged export directory, a :class:`~jaxtune.tuning.Tuned`, or a
        ``Trainer.fit()`` result (its trained model).
      data: a JSONL, CSV/TSV or Parquet file of rows (a label column is optional), or a source.
      best: a run's best checkpoint instead of its latest.
      batch_size, max_length: default the run's (else 32 and 128); longer texts are cut at the right.
      packing: several rows per ``max_length`` sequence, each its own segment (attention, pooling),
        as training packs them: the same outputs for less compute on short texts. Default: as the
        run trained (an export or a model in memory: one row per sequence).
      fields: ``text_field``, ``pair_field``, ``label_field``: default the run's field mapping.

    Returns:
      One dict per row, in file order: the text(s) and any given label under the file's own
      field names, then ``prediction`` (the label's name, or a number for regression) and, for
      classification, ``probabilities`` (``{label name: probability}``). A JSONL file of preference
      pairs (OpenAI's or TRL's keys, :mod:`jaxtune.data.preference`) with a reward model (one
      regression output, ``preference.method: reward``): one dict per pair, its ``prompt``,
      ``chosen`` and ``rejected`` as given and each answer's reward, ``chosen_reward`` and
      ``rejected_reward`` (the score of the conversation prompt + answer, pooled as the run pooled);
      a JSONL file of conversations (chat rows, closing with the assistant's answer): one dict each,
      its ``messages`` and ``reward``.
    """
    unknown = set(fields) - _LABELED
    if unknown:
        raise TypeError(f"predict() got unexpected field options {sorted(unknown)}; use {sorted(_LABELED)}")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if value is not None and value < 1:
            raise ConfigError(f"{syntax.option(name, value)}: expected an integer >= 1")
    if out is not None and not isinstance(data, Source) and Path(out).resolve() == Path(data).resolve():
        raise ConfigError(f"{out}: the file being predicted; write the predictions to another file")
    tuned, run_options, mesh = load_predictor(model, best=best, syntax=syntax)
    if tuned.task not in ("classification", "regression"):
        raise ValueError("predict needs a classification or regression head; for language models use "
                         "jaxtune.complete (jaxtune generate)")
    held = (PREFERENCE if data.kind == PREFERENCE else None) if isinstance(data, Source) else rewarded_rows(data)
    pairs = held is not None  # pairs, or conversations read as pairs of one answer
    if pairs:
        _check_reward_model(tuned, data, held, fields, syntax)
    names = {**{k: v for k, v in run_options.items() if k in _LABELED}, **fields}  # each given one replaces the run's
    text_field = names.get("text_field", "text")
    label_field = names.get("label_field") or ("label" if tuned.task == "classification" else "target")
    pair_field = names.get("pair_field")
    if isinstance(data, Source):
        source = data
    elif held == PREFERENCE:
        source = read_preference(data, skip_bad_rows=skip_bad_rows)
    elif pairs:
        source = _Conversations(read_jsonl(data, CHAT, skip_bad_rows=skip_bad_rows, syntax=syntax))
    else:
        source = read_labeled(data, tuned.task, labels=tuned.label_names, text_field=text_field,
                              pair_field=pair_field, label_field=label_field, skip_bad_rows=skip_bad_rows,
                              syntax=syntax, require_label=False)
    # Past a learned position table the model reads clamped positions without a word (the Trainer refuses
    # such rows too): the default length stays inside it, and a longer one given is refused.
    positions = getattr(tuned.config, "max_position_embeddings", None)
    if positions and max_length is not None and max_length > positions:
        raise ConfigError(f"{syntax.option('max_length', max_length)}: more than the model's {positions} position "
                          f"embeddings (max_position_embeddings in its config.json); give {positions} or less")
    length = max_length if max_length is not None else run_options.get("max_length", min(128, positions or 128))
    whose = "the run's mesh" if mesh is not None else "the mesh the model's params are on"
    params, mesh = _placed(tuned.params, mesh)
    split = data_parallel_size(mesh) if mesh is not None else 1
    config = LoaderConfig(batch_size=batch_size if batch_size is not None
                          else run_options.get("batch_size", -(-32 // split) * split),  # 32 or the next multiple
                          max_length=length,
                          truncation="right",
                          packing=bool(run_options.get("packing")) if packing is None else packing)
    if config.batch_size % split:
        raise ValueError(f"predict: batch_size {config.batch_size} does not split over {whose} "
                         f"({split}-way data parallelism: data x fsdp); give a multiple of it")
    if out is not None:
        _check_folder(Path(out))  # before the compute, on every process
    if pairs:  # a reward model: each answer's score (pair_table's pass guards the processes itself)
        rewards = _pair_rewards(dataclasses.replace(tuned, params=params), source, config, mesh)
        rows = _pair_records(source, rewards, syntax.option("max_length", length))
    else:
        with processes.stop_together(lambda: "predicting"):  # each process reads its own rows: an error is its own
            outputs = _outputs(dataclasses.replace(tuned, params=params), source, config, mesh)
        rows = _records(tuned, source, outputs, text_field, pair_field, label_field)
    if out is not None:  # every process has every row; one writes them
        processes.write_once(lambda: write(rows, out), f"the predictions {out}")
    return rows


def _placed(params: Any, mesh: Mesh | None) -> tuple[Any, Mesh | None]:
    """The params and the mesh to predict on: a run directory's (its params are on it), else on several
    processes the mesh the params span (a model trained there: ``fit().model``), else for params each
    process holds whole (each loaded them) a mesh of one device a process, the params replicated on it;
    so every process predicts its own share of the rows. One process, params of its own: no mesh."""
    if mesh is not None or not processes.several():
        return params, mesh
    spread = [x.sharding for x in jax.tree.leaves(params) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if spread:
        if not all(isinstance(s, NamedSharding) and s.mesh == spread[0].mesh for s in spread):
            raise ValueError("predict: the model's params span several processes' devices but not one mesh; "
                             "predict with its run directory, or place every param on one mesh")
        return params, spread[0].mesh
    firsts = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
              for p in range(jax.process_count())]
    mesh = make_mesh(MeshConfig(), firsts)
    mine, replicated = firsts[jax.process_index()], NamedSharding(mesh, PartitionSpec())

    def place(leaf: Any) -> jax.Array:
        local = jax.device_put(leaf, mine)  # on this process's device of the mesh (a no-op where it is)
        return jax.make_array_from_single_device_arrays(local.shape, replicated, [local])

    return jax.tree.map(place, params), mesh


def _outputs(tuned: Tuned, source: Source, config: LoaderConfig, mesh: Mesh | None = None) -> np.ndarray:
    """Head outputs ``(N, num_outputs)`` float32 of every row, in file order (packed rows hold them in
    file order, slot by slot: ``example_weights`` marks the filled slots).

    With a ``mesh`` (``tuned.params`` are on it: :func:`_placed`), each batch is split over its batch axes
    and the forward runs there as the run's evaluation does (:func:`jit_on_mesh`), so a model sharded
    for training predicts without being gathered onto one device. Each process reads, tokenizes and
    packs its own share of the rows (every ``process_count``-th, as evaluation shares them), numbers
    them by their place in the file, and every process gets each global batch's outputs back with
    those numbers: the whole file's outputs, in order, on every process."""
    tokenizer_of(tuned)

    def forward(params: Any, batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        # packing: from the shapes, static; the row numbers pass through, placed like the outputs
        return tuned.module.apply({"params": params}, **model_inputs(batch)), batch[_ROW]

    if mesh is None:
        step, index, count = jax.jit(forward), 0, 1
    else:
        step = jit_on_mesh(forward, mesh, out_shardings=NamedSharding(mesh, PartitionSpec()))
        index, count = jax.process_index(), jax.process_count()
    loader = evaluation_loader(source, tuned.tokenizer, dataclasses.replace(config, shard_index=index,
                                                                            shard_count=count))
    outputs = np.full((len(source), tuned.num_outputs), np.nan, np.float32)
    filled = np.zeros(len(source), bool)
    mine = 0  # rows of this process's share numbered so far
    for batch in in_lockstep(loader):  # a process out of rows steps on empty batches (no row numbers)
        keep = batch["example_weights"] > 0 if packed_segments(batch) else batch["segment_ids"].any(axis=-1)
        numbers = np.zeros(keep.shape, np.int32)  # the row's index in the file + 1; 0: no row
        numbers[keep] = index + count * np.arange(mine, mine + int(keep.sum())) + 1
        mine += int(keep.sum())
        batch = {**batch, _ROW: numbers}
        out, rows = jax.device_get(step(tuned.params, batch if mesh is None else global_batch(batch, mesh)))
        rows = np.asarray(rows)
        outputs[rows[rows > 0] - 1] = np.asarray(out, np.float32)[rows > 0]
        filled[rows[rows > 0] - 1] = True
    if not filled.all():  # every row tokenizes to one example (truncation right): a bug if not
        raise RuntimeError(f"predict: no output for row {int(np.argmin(filled))} of {len(source)}; this is a "
                           "jaxtune bug")
    return outputs


def rewarded_rows(path: str | os.PathLike[str]) -> str | None:
    """What a reward model scores in a JSONL file, by its first row: ``preference`` pairs (OpenAI's or
    TRL's keys: each answer), ``chat`` conversations (``messages``: each whole), or None: labeled rows."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return None  # reading it as rows reports the line
    if not isinstance(row, dict):
        return None
    if {"chosen", "rejected", "preferred_output", "non_preferred_output"} & row.keys():
        return PREFERENCE
    return CHAT if "messages" in row else None


def _check_reward_model(tuned: Tuned, data: Any, held: str, fields: dict[str, str], syntax: Syntax) -> None:
    """Pairs and conversations are scored by a reward model (one regression output), with no field mapping."""
    rows = "preference pairs (prompt, chosen, rejected)" if held == PREFERENCE else "conversations (messages)"
    if tuned.task != "regression" or tuned.num_outputs != 1:
        what = f"a {tuned.task} model" if tuned.task != "regression" else \
            f"a regression model of {tuned.num_outputs} outputs"
        raise ConfigError(f"{data}: {rows}, which a reward model (one regression output: preference.method "
                          f"reward) scores; this is {what}; give a file of labeled rows")
    if fields:
        name = sorted(fields)[0]
        raise ConfigError(f"{syntax.option(name, fields[name])}: names a field of labeled rows, but {data} holds "
                          f"{rows}; drop it")


class _Conversations:
    """A chat source's conversations as the pair source a reward model's pass reads: each one a pair
    whose two answers are its closing assistant turns, so each is scored whole (the template's
    rendering of every turn, as a pair's answer is), in file order."""

    kind = PREFERENCE

    def __init__(self, chats: Source):
        self.chats, self.report = chats, chats.report

    def __len__(self) -> int:
        return len(self.chats)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.chats[index]
        messages = record["messages"]
        start = len(messages)
        while start and messages[start - 1]["role"] == "assistant":
            start -= 1
        if start in (0, len(messages)):
            problem = "the conversation ends with a {} turn".format(messages[-1]["role"]) if start else \
                "the conversation has no turn before its assistant turns"
            raise DataError(record["where"], f"{problem}, but a reward model scores the answer that closes it",
                            "end each conversation with the assistant's answer, after the turns it answers")
        answer = messages[start:]
        return {"prompt": messages[:start], "chosen": answer, "rejected": answer, "margin": 0.0,
                "where": record["where"], "index": int(index), "messages": messages}


def _pair_rewards(tuned: Tuned, source: Source | _Conversations, config: LoaderConfig, mesh: Mesh | None) -> np.ndarray:
    """float32 ``(N, 2)``: each pair's (chosen, rejected) reward, in file order (NaN: a pair cut off by
    ``max_length``). Each process reads its own share of the pairs, as :func:`_outputs` does."""
    index, count = (jax.process_index(), jax.process_count()) if mesh is not None else (0, 1)
    loader = evaluation_loader(source, tokenizer_of(tuned), dataclasses.replace(config, shard_index=index,
                                                                            shard_count=count))
    host = host_keys(None)  # pair_ids and margins stay on the host

    def to_device(batch: dict[str, Any]) -> dict[str, Any]:
        batch = {k: v for k, v in batch.items() if k not in host}
        return batch if mesh is None else global_batch(batch, mesh)

    return pair_rewards(tuned, tuned.params, loader, len(source), to_device,
                        sharding=batch_sharding(mesh) if mesh is not None else None)


def _pair_records(source: Source | _Conversations, rewards: np.ndarray, length_option: str) -> list[dict[str, Any]]:
    """One row per pair: its prompt and answers as the file gave them, and each answer's reward; or per
    conversation: its messages and its ``reward``."""
    rows = []
    for i in range(len(source)):
        record = source[i]
        if np.isnan(rewards[i]).any():
            raise ValueError(f"{record['where']}: an answer lies past {length_option} tokens, so it has no "
                             "score; give a larger max_length")
        if isinstance(source, _Conversations):
            rows.append({"messages": record["messages"], "reward": float(rewards[i, 0])})
            continue
        rows.append({"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"],
                     "chosen_reward": float(rewards[i, 0]), "rejected_reward": float(rewards[i, 1])})
    if rows and not isinstance(source, _Conversations):
        log.info("predict: %d pairs; rewards/accuracy %.4f, rewards/margin %.4f", len(rows),
                 float(np.mean(rewards[:, 0] > rewards[:, 1])), float(np.mean(rewards[:, 0] - rewards[:, 1])))
    return rows


def _records(tuned: Tuned, source: Source, outputs: np.ndarray, text_field: str, pair_field: str | None,
             label_field: str) -> list[dict[str, Any]]:
    rows, given, kept = [], [], []
    names = tuned.label_names
    if tuned.task == "classification":
        shifted = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
        probs = shifted / shifted.sum(axis=-1, keepdims=True)
    for i in range(len(source)):
        record = source[i]
        row: dict[str, Any] = {text_field: record["text"]}
        if pair_field is not None:
            row[pair_field] = record["text_pair"]
        label = record["label"]
        labeled = label != -1 if names is not None else not np.isnan(label)  # read_labeled's "no label"
        if labeled:
            row[label_field] = names[label] if names is not None else label
            given.append(label)
            kept.append(i)
        if tuned.task == "classification":
            row["prediction"] = names[int(np.argmax(outputs[i]))]
            row["probabilities"] = {str(n): round(float(p), 6) for n, p in zip(names, probs[i])}
        else:
            row["prediction"] = float(outputs[i, 0])
        rows.append(row)
    if given:
        scores = (classification_metrics(outputs[kept], np.asarray(given), len(names)) if names is not None
                  else regression_metrics(outputs[kept, 0], np.asarray(given)))
        log.info("predict: %d rows; on the %d with a label: %s", len(rows), len(given),
                 ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return rows


def _check_folder(path: Path) -> None:
    if path.parent and not path.parent.is_dir():
        raise ConfigError(f"{path}: the folder {path.parent} does not exist; create it or choose another path")


def write(rows: list[dict[str, Any]], out: str | os.PathLike[str]) -> Path:
    """Write prediction rows as JSONL, or as CSV/TSV (by suffix; probabilities become ``p(<label>)`` columns)."""
    path = Path(out)
    _check_folder(path)
    if path.suffix not in (".csv", ".tsv"):
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        return path
    flat = [{**{k: v for k, v in row.items() if k != "probabilities"},
             **{f"p({name})": p for name, p in row.get("probabilities", {}).items()}} for row in rows]
    with path.open("w", newline="", encoding="utf-8") as f:
        # every row's columns, in order of first appearance: a label may be missing from the first rows only
        columns = list(dict.fromkeys(key for row in flat for key in row))
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(flat)
    return path
