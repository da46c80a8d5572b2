"""A corpus of bad inputs and damaged run directories, each driven through ``jaxtune`` itself.

Every case must end with one line on stderr, ``jaxtune: error: ...``, that names where the
problem is (the config field, ``file:line`` or the directory) and says how to fix it, with the
right exit code and no traceback. The inputs are config values, YAML files, data files of each
kind, model directories and run directories (including resuming a run with another model, plan
or shapes, which must be refused without changing anything in the directory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import tiny_hf_model

from jaxtune.cli import main
from jaxtune.data.testing import tiny_tokenizer, write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]


def cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def chat_rows(n: int, seed: int = 0, words: int = 3, min_words: int = 1) -> list[dict]:
    rng = np.random.RandomState(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS, rng.randint(min_words, words + 1)))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": q.upper()}]})
    return rows


def chat_config(root: Path, **sections: dict) -> dict:
    config = {
        "model": {"path": str(root / "llama")},
        "plan": [{"preset": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}],
        "data": {"train": str(root / "train.jsonl"), "kind": "chat", "max_length": 32, "batch_size": 8},
        "optimizer": {"learning_rate": 1e-2},
        "train": {"steps": 2, "log_every": 1, "progress": False, "compile_cache": False},
        "eval": {"before": False, "after": False},
        "checkpoint": {"every": 1},
        "output": {"dir": str(root / "run"), "export": "none"},
    }
    for name, fields in sections.items():
        config[name] = {**config.get(name, {}), **fields}
    return config


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    tiny_hf_model("LlamaForCausalLM", root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    tiny_hf_model("LlamaForCausalLM", root / "llama2", seed=1)
    tiny_tokenizer().save_pretrained(root / "llama2")
    tiny_hf_model("LlamaForCausalLM", root / "no_tokenizer")
    tiny_hf_model("BertModel", root / "bert", vocab_size=128, max_position_embeddings=64)
    tiny_tokenizer(bos=True).save_pretrained(root / "bert")
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text((root / "llama" / "config.json").read_text())
    tiny_tokenizer().save_pretrained(root / "no_weights")
    (root / "bad_config").mkdir()
    (root / "bad_config" / "config.json").write_text("{not json")
    write_jsonl(root / "train.jsonl", chat_rows(32))
    (root / "labels.csv").write_text("text,label\n" + "".join(f"{w} film,{'pos' if i % 2 else 'neg'}\n"
                                                             for i, w in enumerate(WORDS * 3)))
    (root / "a_file").write_text("not a directory")
    (root / "chat.yaml").write_text(yaml.safe_dump(chat_config(root)))
    return root


@pytest.fixture(scope="module")
def trained(root: Path) -> Path:
    """A finished two-step run to resume with changes."""
    code, _, err = cli("train", root / "chat.yaml", f"output.dir={root / 'trained'}")
    assert code == 0, err
    return root / "trained"


# ----------------------------------------------------------------------------- the corpus


@dataclasses.dataclass(frozen=True)
class Case:
    """``argv(root)`` run through the CLI must fail with ``code`` and a last stderr line holding
    ``where`` (the location) and ``fix`` (how to fix it); ``setup(root, case_dir)`` writes the
    bad input first (files in ``case_dir``)."""

    id: str
    argv: Callable[[Path, Path], list[object]]
    where: str
    fix: str
    code: int = 2
    setup: Callable[[Path, Path], None] | None = None
    needs_run: bool = False


def train(*overrides: str) -> Callable[[Path, Path], list[object]]:
    return lambda root, d: ["train", root / "chat.yaml", f"output.dir={d / 'run'}", *overrides]


def option(field: str, value: str, where: str, fix: str) -> Case:
    return Case(f"{field}={value}", train(f"{field}={value}"), where, fix)


CONFIG_VALUES = [
    option("optimizer.clip_grad_norm", "-1", "optimizer.clip_grad_norm", "null for no clipping"),
    option("optimizer.clip_grad_norm", "0", "optimizer.clip_grad_norm", "> 0"),
    option("optimizer.warmup_steps", "-1", "optimizer.warmup_steps", ">= 0"),
    option("optimizer.weight_decay", "-0.1", "optimizer.weight_decay", ">= 0"),
    option("optimizer.b1", "1.0", "optimizer.b1", "[0, 1)"),
    option("optimizer.b2", "1.5", "optimizer.b2", "e.g. 0.999"),
    option("optimizer.b2", "-0.1", "optimizer.b2", "[0, 1)"),
    option("optimizer.eps", "0", "optimizer.eps", "e.g. 1e-8"),
    option("optimizer.eps", "-1e-8", "optimizer.eps", "> 0"),
    option("optimizer.learning_rate", "0", "optimizer.learning_rate", "e.g. 1e-4"),
    option("optimizer.learning_rate", ".nan", "optimizer.learning_rate", "> 0"),
    option("optimizer.learning_rate", ".inf", "optimizer.learning_rate", "> 0"),
    option("optimizer.learning_rate", "fast", "optimizer.learning_rate", "expected a number"),
    option("optimizer.min_lr_ratio", "2", "optimizer.min_lr_ratio", "[0, 1]"),
    option("optimizer.warmup_ratio", "1", "optimizer.warmup_ratio", "[0, 1)"),
    option("optimizer.name", "adamx", "optimizer.name", "choose one of"),
    option("optimizer.schedule", "exp", "optimizer.schedule", "choose one of"),
    option("optimizer.group_lr.lora", "-1", "optimizer.group_lr.lora", "> 0"),
    option("train.steps", "0", "train.steps", ">= 1"),
    Case("train.epochs=-1", train("train.steps=null", "train.epochs=-1"), "train.epochs", "positive number"),
    Case("train.epochs=.inf", train("train.steps=null", "train.epochs=.inf"), "train.epochs", "positive number"),
    Case("train.steps+epochs", train("train.steps=3", "train.epochs=1"), "train.steps", "not both"),
    option("train.grad_accum_steps", "0", "train.grad_accum_steps", ">= 1"),
    option("train.log_every", "0", "train.log_every", ">= 1"),
    option("train.seed", "-1", "train.seed", "[0, 2**32)"),
    option("train.regression_loss", "l1", "train.regression_loss", "one of mse, huber"),
    option("data.batch_size", "0", "data.batch_size", ">= 1"),
    option("data.max_length", "1", "data.max_length", ">= 2"),
    option("data.seed", "-3", "data.seed", "[0, 2**32)"),
    option("data.truncation", "cut", "data.truncation", "one of right, left, drop"),
    option("data.worker_count", "-1", "data.worker_count", ">= 0"),
    option("data.pad_to_multiple_of", "0", "data.pad_to_multiple_of", ">= 1"),
    option("data.validation_fraction", "1.5", "data.validation_fraction", "(0, 1)"),
    option("data.kind", "images", "data.kind", "one of chat"),
    option("data.train_size", "0", "data.train_size", ">= 1"),
    option("data.shuffle", "false", "data.shuffle", "set by the loader's role"),
    option("data.batch_size", "6", "data.batch_size", "multiple of 8"),
    option("eval.every", "0", "eval.every", ">= 1"),
    option("eval.early_stopping_patience", "2", "eval.early_stopping_patience", "needs eval.best_metric"),
    option("eval.use_best", "true", "eval.use_best", "needs eval.best_metric"),
    option("eval.choices", "[positive]", "eval.choices", "two or more"),
    Case("eval.best_metric=accuracy", train("eval.best_metric=accuracy", "eval.every=1"), "eval.best_metric",
         "one of loss"),
    option("checkpoint.every", "0", "checkpoint.every", ">= 1"),
    option("checkpoint.keep", "0", "checkpoint.keep", ">= 1"),
    option("mesh.data", "0", "mesh.data", ">= 1, or -1"),
    option("mesh.tensor", "-2", "mesh.tensor", ">= 1, or -1"),
    option("mesh.simulate_devices", "0", "mesh.simulate_devices", ">= 1 or null"),
    option("distributed.num_processes", "0", "distributed.num_processes", ">= 1"),
    option("distributed.heartbeat_timeout_s", "0", "distributed.heartbeat_timeout_s", "null keeps JAX's default"),
    Case("distributed.process_id=2", train("distributed.num_processes=2", "distributed.process_id=2"),
         "distributed.process_id", "[0, num_processes)"),
    option("output.dir", "''", "output.dir", "e.g. runs/my-run"),
    option("model.path", "''", "model.path", "give a model directory"),
    option("data.eval_batch_size", "0", "data.eval_batch_size", ">= 1"),
    option("data.pack_window", "0", "data.pack_window", ">= 1"),
    Case("mesh.two -1", train("mesh.fsdp=-1"), "mesh", "only one axis"),
    option("mesh.data", "3", "mesh", "does not divide"),
    option("output.export", "zip", "output.export", "one of auto"),
    option("optimizr.name", "sgd", "unknown key 'optimizr'", "did you mean 'optimizer'"),
    option("model.dtype", "float8", "model.dtype", "one of"),
    option("model.remat", "all", "model.remat", "one of none, block, dots"),
    option("plan", "[{preset: lorra}]", "plan", "lora"),
    option("model.path", "yes", "model.path", "quote the word"),
    Case("override without =", train("train.steps"), "train.steps", "key.path=value"),
]


def yaml_file(text: str | bytes) -> Callable[[Path, Path], None]:
    def write(root: Path, d: Path) -> None:
        path = d / "config.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.replace("ROOT", str(root)).encode())
    return write


def yaml_case(id: str, text: str | bytes, where: str, fix: str) -> Case:
    return Case(id, lambda root, d: ["train", d / "config.yaml"], where, fix, setup=yaml_file(text))


YAML_FILES = [
    yaml_case("duplicate key", "model:\n  path: ROOT/llama\nplan: full\nplan: full\n", "config.yaml:4",
              "duplicate key 'plan'"),
    yaml_case("bad indentation", "model:\n  path: x\n   dtype: float32\n", "config.yaml:3", "not valid YAML"),
    yaml_case("tab indentation", "model:\n\tpath: x\n", "config.yaml:2", "not valid YAML"),
    yaml_case("a list", "- model\n- plan\n", "config.yaml", "a mapping of sections"),
    yaml_case("no model", "plan: full\n", "model", "required"),
    yaml_case("section not a mapping", "model:\n  path: ROOT/llama\noptimizer: 3\n", "optimizer",
              "expected a mapping"),
    yaml_case("not UTF-8", b"model:\n  path: caf\xe9\n", "config.yaml:2", "save the file as UTF-8"),
    yaml_case("unknown section field", "model:\n  path: ROOT/llama\ntrain:\n  step: 3\n", "unknown key 'step'",
              "did you mean 'steps'"),
    Case("missing config file", lambda root, d: ["train", d / "nope.yaml"], "nope.yaml", "no such config file"),
]


def rows_file(name: str, content: str | bytes | list) -> Callable[[Path, Path], None]:
    def write(root: Path, d: Path) -> None:
        path = d / name
        if isinstance(content, list):
            write_jsonl(path, content)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return write


def data_case(id: str, name: str, content: str | bytes | list, where: str, fix: str, *overrides: str,
              code: int = 1) -> Case:
    kind = {"csv": "classification", "txt": "text"}.get(name.rsplit(".", 1)[-1], "chat")
    extra = [f"data.kind={kind}"] if kind != "chat" else []
    if kind == "classification":
        extra += ["model.path=ROOT/bert", "plan=[{action: head, task: classification}]"]
    if kind == "text":
        extra += ["data.text_unit=line"]

    def argv(root: Path, d: Path) -> list[object]:
        given = [o.replace("ROOT", str(root)) for o in (*extra, *overrides)]
        return [*train(f"data.train={d / name}")(root, d), *given]

    return Case(id, argv, f"{name}:" if where == name else where, fix, code=code, setup=rows_file(name, content))


USER = {"role": "user", "content": "hi"}
REPLY = {"role": "assistant", "content": "HI"}
GOOD = {"messages": [USER, REPLY]}
CSV_HEAD = "text,label\n"
CSV_GOOD = "good film,pos\nbad film,neg\n"

DATA_FILES = [
    data_case("malformed JSON", "train.jsonl", '{"messages": [}\n', "train.jsonl:1", "one complete JSON object"),
    data_case("JSONL not UTF-8", "train.jsonl", json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff"}\n',
              "train.jsonl:2", "save the file as UTF-8"),
    data_case("lone surrogate", "train.jsonl", '{"messages": [{"role": "user", "content": "a\\ud800b"}, '
              '{"role": "assistant", "content": "B"}]}\n', "train.jsonl:1", "surrogate pair"),
    data_case("no messages key", "train.jsonl", [{"turns": []}], "train.jsonl:1", "data.messages_field=turns"),
    data_case("unknown role", "train.jsonl", [{"messages": [{"role": "robot", "content": "x"}, REPLY]}],
              "train.jsonl:1", "use one of"),
    data_case("no assistant turn", "train.jsonl", [{"messages": [USER]}], "train.jsonl:1",
              "add an assistant reply"),
    data_case("weight 2", "train.jsonl", [{"messages": [USER, {**REPLY, "weight": 2}]}], "train.jsonl:1",
              "use 1 to learn"),
    data_case("empty JSONL", "train.jsonl", "", "train.jsonl", "not empty"),
    data_case("row is a list", "train.jsonl", [[USER, REPLY]], "train.jsonl:1", "write each line as"),
    data_case("messages not a list", "train.jsonl", [{"messages": "hi"}], "train.jsonl:1", "list the turns"),
    data_case("empty reply", "train.jsonl", [{"messages": [USER, {**REPLY, "content": " "}]}], "train.jsonl:1",
              "give 'content' some text"),
    data_case("content a number", "train.jsonl", [{"messages": [USER, {**REPLY, "content": 3}]}],
              "train.jsonl:1", "make 'content' a JSON string"),
    data_case("tool calls", "train.jsonl", [{"messages": [USER, {**REPLY, "tool_calls": []}]}], "train.jsonl:1",
              "no tool calls"),
    data_case("bad row after good ones", "train.jsonl", [GOOD, GOOD, {"messages": []}], "train.jsonl:3",
              "skip_bad_rows"),
    data_case("all rows too long, dropped", "train.jsonl", chat_rows(16, words=12, min_words=8), "train.jsonl",
              "raise data.max_length", "data.max_length=16", "data.truncation=drop"),
    data_case("all replies truncated away", "train.jsonl", chat_rows(16, words=12, min_words=8), "train.jsonl",
              "raise data.max_length", "data.max_length=16"),
    data_case("too long with truncation=error", "train.jsonl", chat_rows(4, words=12, min_words=8), "train.jsonl:1",
              "raise data.max_length", "data.max_length=16", "data.truncation=error"),
    Case("no such data file", train("data.train=/no/such/train.jsonl"), "/no/such/train.jsonl", "check the path",
         code=1),
    data_case("text not UTF-8", "notes.txt", b"fine line\nbad \xff line\n", "notes.txt:2", "save the file as UTF-8"),
    data_case("empty text file", "notes.txt", "\n\n", "notes.txt", "remove it or add text"),
    data_case("CSV unquoted comma", "rows.csv", CSV_HEAD + CSV_GOOD + "good, funny film,pos\n", "rows.csv:4",
              'quote a field that contains a comma, e.g. "a, b"'),
    data_case("CSV missing field", "rows.csv", CSV_HEAD + CSV_GOOD + "no label\n", "rows.csv:4",
              "give every column a value"),
    data_case("CSV single label", "rows.csv", CSV_HEAD + "good film,pos\nnice film,pos\n", "rows.csv",
              "add rows of the other classes"),
    data_case("CSV not UTF-8", "rows.csv", CSV_HEAD.encode() + b"good film,pos\ncaf\xe9 film,neg\n", "rows.csv:3",
              "save the file as UTF-8"),
    data_case("CSV no label column", "rows.csv", "text,class\ngood,pos\nbad,neg\n", "rows.csv:1",
              "rename the column"),
    data_case("CSV empty", "rows.csv", "", "rows.csv:1", "write a header row"),
    data_case("CSV empty label", "rows.csv", CSV_HEAD + CSV_GOOD + "meh film,\n", "rows.csv:4",
              "give every row a 'label'"),
    data_case("CSV empty text", "rows.csv", CSV_HEAD + CSV_GOOD + ",pos\n", "rows.csv:4", "give 'text' some text"),
    data_case("max_length beyond BERT positions", "rows.csv", CSV_HEAD + CSV_GOOD * 4, "data.max_length",
              "set data.max_length to 64 or less", "data.max_length=128", code=2),
    Case("validation label not in training labels",
         lambda root, d: [*csv_argv(root, d), f"data.validation={d / 'val.csv'}"],
         "val.csv:2", "fix the label", code=1,
         setup=lambda root, d: [rows_file("rows.csv", CSV_HEAD + CSV_GOOD * 4)(root, d),
                                rows_file("val.csv", CSV_HEAD + "odd film,meh\n")(root, d)]),
]


def csv_argv(root: Path, d: Path) -> list[object]:
    return [*train(f"data.train={d / 'rows.csv'}")(root, d), "data.kind=classification",
            f"model.path={root / 'bert'}", "plan=[{action: head, task: classification}]"]


MODEL_DIRS = [
    Case("model path missing", train("model.path=/no/such/model"), "/no/such/model", "packaged model", code=1),
    Case("no tokenizer", lambda root, d: train(f"model.path={root / 'no_tokenizer'}")(root, d), "no_tokenizer",
         "give model.tokenizer", code=1),
    Case("tokenizer path missing", train("model.tokenizer=/no/such/tokenizer"), "/no/such/tokenizer",
         "give model.tokenizer", code=1),
    Case("no weights", lambda root, d: train(f"model.path={root / 'no_weights'}")(root, d), "no_weights",
         "save_pretrained", code=1),
    Case("config.json not JSON", lambda root, d: train(f"model.path={root / 'bad_config'}")(root, d),
         "config.json", "re-download", code=1),
    Case("chat data, no chat template", lambda root, d: train(f"model.path={root / 'plain'}")(root, d),
         "model.tokenizer", "prompt_completion data", code=2,
         setup=lambda root, d: _plain_model(root)),
    Case("tokenizer ids beyond the model's vocabulary", lambda root, d: train(f"model.path={d / 'small'}")(root, d),
         "train.jsonl:", "tokenizer saved with the model", code=1,
         setup=lambda root, d: _small_vocab_model(d / "small")),
]


def _small_vocab_model(path: Path) -> None:
    """A model of 64 embedding rows saved with a 105-token tokenizer: the data's ids run past them."""
    tiny_hf_model("LlamaForCausalLM", path, vocab_size=64)
    tiny_tokenizer().save_pretrained(path)


def _plain_model(root: Path) -> None:
    if not (root / "plain").is_dir():
        tiny_hf_model("LlamaForCausalLM", root / "plain")
        tiny_tokenizer(chat_template=None).save_pretrained(root / "plain")


def _corrupt(name: str, text: str) -> Callable[[Path, Path], None]:
    def write(root: Path, d: Path) -> None:
        (d / "run").mkdir(exist_ok=True)
        (d / "run" / name).write_text(text)
    return write


RUN_DIRS = [
    Case("status: corrupt status.json", lambda root, d: ["status", d / "run"], "status.json", "rewrites it",
         code=1, setup=_corrupt("status.json", '{"state": "runn')),
    Case("status: status.json not an object", lambda root, d: ["status", d / "run"], "status.json",
         "delete it", code=1, setup=_corrupt("status.json", "[1, 2]")),
    Case("status: no such directory", lambda root, d: ["status", d / "nothing"], "nothing",
         "give the output.dir", code=1),
    Case("status: not a run directory", lambda root, d: ["status", d], "not a run directory", "give the output.dir",
         code=1),
    Case("status: a file", lambda root, d: ["status", root / "a_file"], "a_file", "give the output.dir", code=1),
    Case("output.dir is a file", lambda root, d: train(f"output.dir={root / 'a_file'}")(root, d), "a_file",
         "give output.dir a directory", code=1),
    Case("output.dir under a file", lambda root, d: train(f"output.dir={root / 'a_file' / 'run'}")(root, d),
         "its parent", "give output.dir a directory", code=1),
    Case("eval: corrupt config.yaml", lambda root, d: ["eval", d / "run"], "config.yaml:", "not valid YAML",
         setup=_corrupt("config.yaml", "model: [unclosed\n")),
    Case("eval: not a run directory", lambda root, d: ["eval", d], "not a run directory",
         "give a config file or a run directory"),
    Case("export: no checkpoint", lambda root, d: ["export", d / "run", "--to", d / "out"], "no checkpoint",
         "jaxtune train", code=2, setup=lambda root, d: _copy_config(root, d)),
    Case("generate: no prompt", lambda root, d: ["generate", root / "llama"], "--prompt", "see jaxtune generate"),
    Case("unknown command", lambda root, d: ["tarin"], "invalid choice", "see jaxtune --help"),
]


def _copy_config(root: Path, d: Path) -> None:
    (d / "run").mkdir(exist_ok=True)
    config = chat_config(root)
    config["output"]["dir"] = str(d / "run")
    (d / "run" / "config.yaml").write_text(yaml.safe_dump(config))


def resume(*overrides: str) -> Callable[[Path, Path], list[object]]:
    return lambda root, d: ["train", root / "chat.yaml", f"output.dir={d / 'run'}", *overrides]


def _copy_trained(name: str = "", text: str = "") -> Callable[[Path, Path], None]:
    def copy(root: Path, d: Path) -> None:
        import shutil

        shutil.copytree(root / "trained", d / "run")
        if name:
            (d / "run" / name).write_text(text)
    return copy


def _copy_trained_renamed(root: Path, d: Path) -> None:
    """The trained run, and its training file with the messages under another key."""
    _copy_trained()(root, d)
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    (d / "renamed.jsonl").write_text("".join(json.dumps({"conversation": r["messages"]}) + "\n" for r in rows))


RESUMES = [
    Case("resume: another plan", resume("plan.0.rank=8"), "plan:", "--restart", setup=_copy_trained(),
         needs_run=True),
    Case("resume: another model", lambda root, d: resume(f"model.path={root / 'llama2'}")(root, d), "model.path:",
         "another output.dir", setup=_copy_trained(), needs_run=True),
    Case("resume: another max_length", resume("data.max_length=64"), "data.max_length: 32 -> 64", "--restart",
         setup=_copy_trained(), needs_run=True),
    Case("resume: another batch_size", resume("data.batch_size=16"), "data.batch_size: 8 -> 16", "--restart",
         setup=_copy_trained(), needs_run=True),
    Case("resume: another field mapping",
         lambda root, d: resume(f"data.train={d / 'renamed.jsonl'}", "data.messages_field=conversation")(root, d),
         "data.messages_field: null -> 'conversation'", "--restart", setup=_copy_trained_renamed, needs_run=True),
    Case("resume: another optimizer", resume("optimizer.name=sgd"), "optimizer.name", "--restart",
         setup=_copy_trained(), needs_run=True),
    Case("resume: clipping switched off", resume("optimizer.clip_grad_norm=null"), "clip_grad_norm switched",
         "--restart",
         setup=_copy_trained(), needs_run=True),
    Case("resume: corrupt run.json", resume(), "run.json", "--restart", code=1,
         setup=_copy_trained("run.json", "{oops"), needs_run=True),
    Case("resume: corrupt config.yaml", resume(), "config.yaml", "--restart", code=1,
         setup=_copy_trained("config.yaml", "data: [\n"), needs_run=True),
]

CASES = CONFIG_VALUES + YAML_FILES + DATA_FILES + MODEL_DIRS + RUN_DIRS + RESUMES


def test_the_corpus_has_at_least_60_cases(note: Callable[[str], None]) -> None:
    kinds = {"config values": CONFIG_VALUES, "YAML files": YAML_FILES, "data files": DATA_FILES,
             "model directories": MODEL_DIRS, "run directories": RUN_DIRS, "resumes": RESUMES}
    line = f"bad-input corpus: {len(CASES)} cases (" + ", ".join(f"{len(v)} {k}" for k, v in kinds.items()) + ")"
    note(line)
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its content's hash (to prove nothing changed)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_where_and_how(case: Case, root: Path, tmp_path: Path, request) -> None:
    if case.needs_run:
        request.getfixturevalue("trained")
    if case.setup is not None:
        case.setup(root, tmp_path)
    before = _tree(tmp_path / "run") if (tmp_path / "run").is_dir() else None
    code, out, err = cli(*case.argv(root, tmp_path))
    errors = [line for line in err.splitlines() if line.startswith("jaxtune: error: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    message = errors[0]
    assert err.rstrip().endswith(message), err  # the error is the last thing said
    assert case.where in message, message
    assert case.fix in message, message
    assert code == case.code, message
    if before is not None:
        assert _tree(tmp_path / "run") == before, "a refused command changed the run directory"


@pytest.mark.timeout(120)
def test_all_rows_too_long_with_drop_ends_in_seconds(root: Path, tmp_path: Path) -> None:
    """Every chat row is dropped as too long: a clear error within seconds, not a hang (the
    training stream repeats forever and looked for a row forever)."""
    write_jsonl(tmp_path / "long.jsonl", chat_rows(16, words=12, min_words=8))
    started = time.perf_counter()
    code, _, err = cli("train", root / "chat.yaml", f"output.dir={tmp_path / 'run'}",
                       f"data.train={tmp_path / 'long.jsonl'}", "data.max_length=16", "data.truncation=drop")
    assert code == 1 and "all 16 records are longer than data.max_length=16" in err, err
    assert time.perf_counter() - started < 60


@pytest.mark.timeout(120)
def test_a_loader_whose_rows_are_all_dropped_raises_instead_of_hanging(root: Path, tmp_path: Path) -> None:
    """Without the scan (a Loader iterated directly), the endless training stream gives up after
    a whole pass yields no row."""
    from jaxtune.data.pipeline import LoaderConfig, training_loader
    from jaxtune.data.sources import DataError, read_source

    write_jsonl(tmp_path / "long.jsonl", chat_rows(8, words=12, min_words=8))
    loader = training_loader(read_source(tmp_path / "long.jsonl", "chat"), tiny_tokenizer(),
                             LoaderConfig(batch_size=2, max_length=16, truncation="drop", pack_window=2))
    with pytest.raises(DataError, match="gave no example"):
        next(iter(loader))


def test_restart_moves_the_old_run_aside_and_trains_afresh(root: Path, trained: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    old = _tree(run)
    code, _, err = cli("train", root / "chat.yaml", f"output.dir={run}", "plan.0.rank=8", "--restart")
    assert code == 0, err
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and _tree(moved[0]) == old and "moved the old run to" in err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["plan"][0]["rank"] == 8 and json.loads((run / "status.json").read_text())["step"] == 2


def test_an_export_peft_cannot_write_fails_before_training(root: Path, tmp_path: Path) -> None:
    """A plan that trains a module whole and adapts it has no PEFT form: ``output.export=peft`` says so
    before any step (no checkpoint), and ``auto`` trains and writes a merged directory instead."""
    plan = ("plan=[{preset: lora, rank: 4, targets: [q_proj]}, "
            "{action: train, match: layers_0/self_attn/q_proj/kernel}]")
    code, _, err = cli("train", root / "chat.yaml", f"output.dir={tmp_path / 'peft'}", plan, "output.export=peft")
    last = err.rstrip().splitlines()[-1]
    assert code == 2 and last.startswith("jaxtune: error: config error: output.export: cannot export peft"), err
    assert "trained directly and carry an adapter" in err
    assert not list(tmp_path.glob("peft/checkpoints/*")), "the refused run trained"
    code, _, err = cli("train", root / "chat.yaml", f"output.dir={tmp_path / 'auto'}", plan, "output.export=auto")
    assert code == 0, err
    assert (tmp_path / "auto" / "export" / "config.json").is_file(), "auto did not write a merged HF directory"
    assert not (tmp_path / "auto" / "export" / "adapter_config.json").exists()


def test_free_fields_may_change_on_resume(root: Path, trained: Path, tmp_path: Path) -> None:
    """Steps, logging, evaluation, checkpoint frequency and the learning rate may change, and the log
    names each change against the run's config.yaml (which is then rewritten), a field an older
    jaxtune did not save included."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    old_steps, old_lr = saved["train"]["steps"], saved["optimizer"]["learning_rate"]
    del saved["model"]["router_aux_loss_coef"]  # as a run written before the field existed
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    code, _, err = cli("train", root / "chat.yaml", f"output.dir={run}", "train.steps=3", "train.log_every=3",
                       "checkpoint.every=3", "optimizer.learning_rate=1e-3", "checkpoint.keep=2")
    assert code == 0, err
    assert "resumed from" in err and json.loads((run / "status.json").read_text())["step"] == 3
    [line] = [x for x in err.splitlines() if "resume: this config changes the run's config.yaml" in x]
    for change in (f"train.steps: {old_steps} -> 3", f"optimizer.learning_rate: {old_lr} -> 0.001",
                   "model.router_aux_loss_coef: (not saved) -> null", "checkpoint.keep: "):
        assert change in line, line
    assert "data.max_length" not in line and "model.path" not in line, line


def test_python_trainer_without_a_config_refuses_another_plan(root: Path, tmp_path: Path) -> None:
    """A Python user without a resolved config gets the check from run.json (model, plan rules,
    trainable shapes, optimizer state, data shapes); nothing in the directory changes."""
    import jax

    import jaxtune as jt
    from jaxtune.data.pipeline import LoaderConfig
    from jaxtune.training.config import TrainConfig
    from jaxtune.tuning.plan import lora

    model = jt.load(root / "llama")
    train_data, _ = jt.read(root / "train.jsonl", kind="chat")

    def trainer(rank: int) -> jt.Trainer:
        tuned = jt.apply_plan(model, lora(rank=rank, targets=["q_proj"]), jax.random.key(0))
        return jt.Trainer(tuned, train_data, run_dir=tmp_path / "run", data=LoaderConfig(batch_size=8, max_length=32),
                          config=TrainConfig(steps=1, progress=False, compile_cache=False))

    _refused_and_untouched(tmp_path / "run", trainer, 2, 4, r"plan rules: .*\"rank\": 2.* -> .*\"rank\": 4")


def _refused_and_untouched(run: Path, trainer, first: object, second: object, match: str) -> None:
    """``trainer(first)`` trains ``run``; resuming it as ``trainer(second)`` is refused (``match``) and
    changes nothing in it."""
    from jaxtune.training.rundir import RunMismatchError

    assert trainer(first).fit().state == "finished"
    before = _tree(run)
    with pytest.raises(RunMismatchError, match=match):
        trainer(second).fit()
    assert _tree(run) == before


def test_a_resume_on_other_training_rows_is_refused(root: Path, tmp_path: Path) -> None:
    """A packaged dataset draws its training rows from what its validation rows leave, so another
    data.validation_size trains on other rows (393 of 400 differed): the resume was accepted and the data
    iterator's position pointed into another dataset. run.json now records which rows."""
    import jax

    import jaxtune as jt
    from jaxtune.data.pipeline import LoaderConfig
    from jaxtune.training.config import TrainConfig
    from jaxtune.tuning.plan import lora

    model = jt.load(root / "llama")

    def trainer(validation_size: int) -> jt.Trainer:
        train_data, _ = jt.read("rotten_tomatoes_chat", train_size=32, validation_size=validation_size)
        tuned = jt.apply_plan(model, lora(rank=2, targets=["q_proj"]), jax.random.key(0))
        return jt.Trainer(tuned, train_data, run_dir=tmp_path / "run", data=LoaderConfig(batch_size=8, max_length=48,
                                                                                           truncation="left"),
                          config=TrainConfig(steps=1, progress=False, compile_cache=False))

    _refused_and_untouched(tmp_path / "run", trainer, 50, 60,
                           r"data.rows: '32 rows #\w+' -> '32 rows #\w+' \(other training rows")
    assert trainer(50).fit().state == "finished"  # the same rows resume
