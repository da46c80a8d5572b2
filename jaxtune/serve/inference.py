"""Chat completions for ``/v1/chat/completions``: a small cache of loaded models and one
generation at a time through :func:`jaxtune.complete` (the same KV-cache generation as
``jaxtune generate``).

Generation runs one request at a time: on a CPU or a single accelerator, concurrent XLA programs
only compete for the same cores, and one lock keeps model loading and compilation from racing.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxtune.serve.jobs import RequestError
from jaxtune.serve.runner import set_for_server
from jaxtune.training.rundir import RunDir, RunDirError

ROLES = ("system", "user", "assistant", "developer")
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


def share_accelerator() -> None:
    """Let the server's JAX allocate accelerator memory as it needs it: chat completions run in
    the server's process, beside the jobs' processes on the same devices, and JAX's default
    preallocation (75% of each GPU's memory at its start) would leave a job a quarter of it.
    Sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless the user set it; the jobs do not inherit
    it (they keep JAX's default). Takes effect only before this process's JAX starts its backend."""
    set_for_server(PREALLOCATE, "false")


class Models:
    """Loaded models by key, least recently used evicted beyond ``capacity``."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._models: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()  # held for loading and generating: one XLA program at a time

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        """The model under ``key``, loading it with ``load()`` on first use (call with ``lock`` held)."""
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        from jaxtune.training import compile_cache

        compile_cache.enable()  # generation programs load from disk after a restart, as train steps do
        model = load()
        self._models[key] = model
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)
        return model


def load_final(run_dir: Path) -> Any:
    """A finished run's model, the one it ended with and exported: its best checkpoint's where
    ``eval.use_best`` made that its model (its latest checkpoint holds the last step's params),
    else its latest checkpoint's; the latest too where no best checkpoint is left, as the run
    itself then ended with its latest params. Exactly that step, read as :func:`load_checkpoint`
    reads one: a best or latest checkpoint that does not verify is :class:`CheckpointDamaged`,
    never another step's model answering as the fine-tuned one."""
    import jaxtune as jt

    if ((RunDir(run_dir).config() or {}).get("eval") or {}).get("use_best"):
        kept = RunDir(run_dir).best_steps()
        try:
            trainer = jt.open_run(run_dir, evaluation=False, best=True)
        except RunDirError as err:  # no best checkpoint: none kept, or the run set it aside as damaged
            if kept:  # or one there that does not verify (a reader skips it, moving nothing)
                raise CheckpointDamaged(kept[-1], str(err), best=True) from None
        else:
            trainer.close()
            return trainer.model
    steps = RunDir(run_dir).checkpoint_steps()
    if steps:
        return load_checkpoint(run_dir, max(steps))
    trainer = jt.open_run(run_dir, evaluation=False)
    trainer.close()
    return trainer.model


class CheckpointGone(LookupError):
    """The checkpoint asked for is no longer in its run directory (the run's rotation removed it)."""


class CheckpointDamaged(RuntimeError):
    """The checkpoint at ``step`` (the run's best one, under ``best/``, where ``best``) does not
    verify (its files no longer match their checksums)."""

    def __init__(self, step: int, reason: str, best: bool = False):
        super().__init__(reason)
        self.step, self.best = step, best


def load_checkpoint(run_dir: Path, step: int) -> Any:
    """The model of ``run_dir``'s checkpoint at ``step``, read in place: a reader opens a run
    read-only, so a job training there meanwhile keeps its save in flight, and exactly ``step`` is
    restored, not the newest. Raises :class:`CheckpointGone` when the job's rotation
    (``checkpoint.keep``) removed it before or while it was read, :class:`CheckpointDamaged`
    (the reason its message) when it does not verify."""
    import jaxtune as jt
    from jaxtune.training.checkpoint import CheckpointDamagedError, CheckpointGoneError

    trainer = jt.open_run(run_dir, evaluation=False, restore=False)
    try:
        trainer.restore(step=step)
    except CheckpointGoneError:
        raise CheckpointGone(step) from None
    except CheckpointDamagedError as err:
        raise CheckpointDamaged(step, str(err)) from None
    finally:
        trainer.close()
    return trainer.model


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages as the chat template takes them (text content only; ``developer`` is
    a system turn)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: expected a non-empty list of {role, content}", "messages")
    out = []
    for n, msg in enumerate(messages):
        at = f"messages[{n}]"
        if not isinstance(msg, Mapping) or msg.get("role") not in ROLES:
            raise RequestError(f"{at}: expected {{role: system|user|assistant|developer, content}}", at)
        content = msg.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = [p.get("text") if isinstance(p, Mapping) and p.get("type") == "text" else None for p in content]
            if any(not isinstance(p, str) for p in parts):
                raise RequestError(f"{at}.content: only text parts ({{type: text, text}}) are supported", at)
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"{at}.content: expected a string", f"{at}.content")
        out.append({"role": "system" if msg["role"] == "developer" else msg["role"], "content": content})
    return out


def _number(body: Mapping[str, Any], name: str, default: Any, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not low <= value <= high:
        raise RequestError(f"{name}: expected {'an integer' if integer else 'a number'} in [{low}, {high}], "
                           f"got {value!r}", name)
    return value


# Request fields this server does not implement: refused when they ask for anything but their default,
# since answering without them would silently be another answer than the one asked for.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None,), "frequency_penalty": (None, 0, 0.0),
               "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
               "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
               "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
               "prediction": (None,)}


def options(body: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling options of a chat completion request, checked."""
    for name, defaults in UNSUPPORTED.items():
        if name in body and body[name] not in defaults:
            raise RequestError(f"{name}: not supported by this server; remove it", name)
    if body.get("n") not in (None, 1):  # null is the default, as OpenAI reads it
        raise RequestError("n: only n=1 is supported", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop: expected a string or up to 4 non-empty strings", "stop")
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    return {
        "max_new_tokens": _number({"max_tokens": max_tokens}, "max_tokens", 256, 1, 32768, integer=True),
        "temperature": _number(body, "temperature", 1.0, 0, 2),
        "top_p": _number(body, "top_p", 1.0, 0, 1),
        # No seed: a fresh one each request (as OpenAI samples), not the same reply every time.
        "seed": _number(body, "seed", None, 0, 2**31 - 1, integer=True),
        "stop": stop,
    }


def complete(model: Any, messages: list[dict[str, str]], opts: Mapping[str, Any]) -> dict[str, Any]:
    """One chat completion: ``{"text", "finish_reason", "prompt_tokens", "completion_tokens", "ids"}``."""
    import jaxtune as jt
    from jaxtune.models.generate import encode_prompts
    from jaxtune.models.load import tokenizer_of

    # top_p 0 keeps only the most likely token: greedy, as OpenAI reads it.
    top_p = opts["top_p"] if 0 < opts["top_p"] < 1.0 else None
    temperature = 0.0 if opts["top_p"] == 0 else opts["temperature"]
    seed = secrets.randbelow(2**31) if opts["seed"] is None else opts["seed"]
    try:
        [prompt] = encode_prompts(tokenizer_of(model), [messages], chat=True)  # no chat template: a ValueError
        [item] = jt.complete(model, [messages], chat=True, max_new_tokens=opts["max_new_tokens"],
                             temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as err:  # prompt too long for the model, and the like: the request's fault
        raise RequestError(str(err), "messages") from None
    text, ids = item["text"], item["ids"]
    finish = "length" if len(ids) >= opts["max_new_tokens"] else "stop"
    cut = min((text.find(s) for s in opts["stop"] if s in text), default=-1)
    if cut >= 0:
        text, finish = text[:cut], "stop"
        # Usage counts the tokens that make the text returned, not those generated past the stop string.
        ids = ids[:next((n for n in range(len(ids) + 1)
                         if len(model.tokenizer.decode(ids[:n], skip_special_tokens=True)) >= len(text)), len(ids))]
    return {"text": text, "finish_reason": finish, "prompt_tokens": len(prompt), "completion_tokens": len(ids),
            "ids": ids}


def pieces(tokenizer: Any, ids: Sequence[int], text: str) -> list[str]:
    """``text`` cut into one piece per generated token (for streaming), concatenating to ``text``."""
    out, done = [], ""
    for n in range(1, len(ids) + 1):
        upto = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if not text.startswith(upto) or len(upto) <= len(done):
            continue
        out.append(upto[len(done):])
        done = upto
    if not text.startswith(done):  # a stop string cut inside a token's text
        return [text] if text else []
    if done != text:
        out.append(text[len(done):])
    return out
