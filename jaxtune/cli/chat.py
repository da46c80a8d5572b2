"""``jaxtune generate``'s model loading and its interactive chat loop (everything else is
:func:`jaxtune.complete`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jaxtune.training.rundir import RunDir


def load_model(target: str, *, best: bool = False) -> Any:
    """A run directory's trained language model, or a pretrained model by path or name."""
    import jaxtune as jt

    if not (Path(target) / RunDir.CONFIG).is_file():
        if best:
            raise jt.ConfigError(f"{target}: --best picks a run directory's best checkpoint, and this is not a run "
                                 "directory; drop --best")
        return jt.load(target)
    trainer = jt.open_run(target, best=best, evaluation=False)
    if trainer.tuned.task != "lm":
        raise jt.ConfigError(f"{target}: this run trained a {trainer.tuned.task} head; generate needs a language model")
    print(f"{target}: step {trainer.step}" if trainer.step else f"{target}: no checkpoint yet, using the base model",
          file=sys.stderr)
    return trainer.model


def interactive(model: Any, *, system: str | None = None, **options: Any) -> int:
    """A multi-turn chat on stdin: the whole conversation goes through the chat template each turn."""
    import jaxtune as jt

    messages = [{"role": "system", "content": system}] if system else []
    print("chat (an empty line or Ctrl-D ends)", file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        [reply] = jt.complete(model, [messages], chat=True, **options)
        messages.append({"role": "assistant", "content": reply["text"]})
        print(reply["text"], flush=True)
    return 0
