"""What one row of a data file must hold: the checks of a chat, prompt/completion or labeled row.

Each check takes one parsed row (a JSON object or a CSV row as a dict) and returns the normalized
record, or raises :class:`RowError` with what is wrong and how to fix it. The readers
(:mod:`jaxtune.data.row_sources`, :mod:`jaxtune.data.labeled_sources`, :mod:`jaxtune.data.text_sources`,
:mod:`jaxtune.data.preference`) add the ``path:line`` and raise a
``DataError`` or, with ``skip_bad_rows``, skip and count the row. A fix names an option as the user
wrote it: a Python argument, a recipe key or a command-line flag (:class:`Syntax`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
_FLOAT32_MAX = 3.4028234663852886e38  # regression targets train as float32


class RowError(Exception):
    """One bad row; the reader adds the ``path:line`` and raises or skips."""

    def __init__(self, problem: str, fix: str = ""):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


@dataclasses.dataclass(frozen=True)
class Syntax:
    """How an error message spells a data option: as a Python argument (``jaxtune.read``) or as
    a recipe key (``data.skip_bad_rows=true``), so the fix can be pasted where the user wrote it."""

    prefix: str
    true: str
    verb: str  # "pass" an argument, "set" a key

    def option(self, name: str, value: Any) -> str:
        if self.prefix == "--":  # command-line flags (jaxtune predict)
            flag = "--" + name.replace("_", "-")
            return flag if value is True else f"{flag} {value}"
        if value is True:
            value = self.true
        elif self.prefix == "":
            value = repr(value)
        return f"{self.prefix}{name}={value}"

    def skip_hint(self) -> str:
        return f"or {self.verb} {self.option('skip_bad_rows', True)} to skip and count such rows"


PYTHON = Syntax("", "True", "pass")
RECIPE = Syntax("data.", "true", "set")


def string_field(obj: dict, key: str, *, nonempty: bool) -> str:
    """``obj[key]``, which must be a valid-Unicode string (non-blank with ``nonempty``)."""
    if obj.get(key) is None:
        raise RowError(f"missing {key!r} key", f"every row needs a {key!r} string")
    value = obj[key]
    if not isinstance(value, str):
        raise RowError(f"{key!r} is {type(value).__name__}, not a string", f"make {key!r} a JSON string")
    if nonempty and not value.strip():
        raise RowError(f"{key!r} is empty", f"give {key!r} some text or remove the row")
    check_encodable(value, repr(key))
    return value


def check_encodable(text: str, what: str) -> None:
    """Text must be valid Unicode: a lone surrogate (e.g. ``"\\ud800"`` in JSON) cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(f"{what} has a lone surrogate {text[err.start]!r} at character {err.start}",
                       "write the character as a valid surrogate pair or remove it") from None


def as_object(obj: Any, hint: str) -> dict:
    """``obj`` when it is a JSON object (a dict); ``hint`` says how to write a row otherwise."""
    if not isinstance(obj, dict):
        raise RowError(f"row is a JSON {type(obj).__name__}, not an object", hint)
    return obj


def missing_key(obj: dict, key: str, option: str, syntax: Syntax, mapped: Sequence[str | None] = ()) -> RowError:
    """The error for a row without ``key``: it lists the row's keys and names the option that maps another
    of them (not one of ``mapped``, the keys other options already read)."""
    keys = [k for k in obj if isinstance(k, str)]
    others = [k for k in keys if k not in mapped]
    fix = f"every row needs a {key!r} value"
    if others:
        fix += f"; this row has {keys[:8]}: to read another of them, {syntax.verb} {syntax.option(option, others[0])}"
    elif keys:
        fix += f"; this row has only {keys[:8]}, which other options read"
    return RowError(f"missing {key!r} key", fix)


def check_message(msg: Any, at: str, *, weighted: bool = False) -> dict:
    """One chat turn ``{"role", "content"[, "reasoning_content"][, "name"]}`` (and ``"weight"`` where
    ``weighted``, which the caller reads) checked, ``at`` naming it in errors; returned without the
    weight. ``reasoning_content`` (an assistant turn's reasoning, as Qwen3's template reads it) is
    rendered by the chat template, which must write it (see :mod:`jaxtune.data.chat_turns`)."""
    if not isinstance(msg, dict):
        raise RowError(f"{at} is a JSON {type(msg).__name__}, not an object",
                       'write each turn as {"role": ..., "content": ...}')
    unknown = set(msg) - {"role", "content", "reasoning_content", "name", *(("weight",) if weighted else ())}
    if unknown:
        keys = f"role, content, reasoning_content{', weight' if weighted else ''} and name"
        raise RowError(f"{at} has unsupported keys {sorted(unknown)}", f"only {keys} are supported (no tool calls)")
    role = msg.get("role")
    if role not in ROLES:
        raise RowError(f"{at} has unknown role {role!r}", f"use one of {', '.join(ROLES)}")
    if msg.get("reasoning_content") is not None and role != "assistant":
        raise RowError(f"{at}: 'reasoning_content' is only allowed on assistant turns", "remove it from this turn")
    try:
        content = string_field(msg, "content", nonempty=role == "assistant")
        for key in ("reasoning_content", "name"):
            if msg.get(key) is not None:
                string_field(msg, key, nonempty=False)
    except RowError as err:
        raise RowError(f"{at} ({role}): {err.problem}", err.fix) from None
    return {k: v for k, v in (("role", role), ("content", content), ("reasoning_content", msg.get("reasoning_content")),
                              ("name", msg.get("name"))) if v is not None}


def check_chat(obj: Any, messages_field: str = "messages", syntax: Syntax = PYTHON) -> dict:
    """Validate one OpenAI fine-tuning chat row (the turns under ``messages_field``); return
    ``{"messages", "weights"}``."""
    obj = as_object(obj, f'write each line as {{"{messages_field}": [{{"role": ..., "content": ...}}, ...]}}')
    if messages_field not in obj:
        raise missing_key(obj, messages_field, "messages_field", syntax)
    messages = obj[messages_field]
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{messages_field!r} must be a non-empty list", "list the turns of the conversation in order")
    out, weights = [], []
    for n, msg in enumerate(messages):
        at = f"messages[{n}]"
        out.append(turn := check_message(msg, at, weighted=True))
        weight = msg.get("weight", 1 if turn["role"] == "assistant" else 0)
        if "weight" in msg:
            if turn["role"] != "assistant":
                raise RowError(f"{at}: 'weight' is only allowed on assistant turns", "remove it from this turn")
            if isinstance(weight, bool) or weight not in (0, 1):
                raise RowError(f"{at}: weight {weight!r} is not 0 or 1", "use 1 to learn the turn, 0 to skip it")
        weights.append(int(weight))
    if not any(w and m["role"] == "assistant" for m, w in zip(out, weights)):
        raise RowError("no assistant turn with weight 1, so nothing to learn",
                       "add an assistant reply or set its weight to 1")
    return {"messages": out, "weights": weights}


def check_prompt_completion(obj: Any, prompt_field: str = "prompt", completion_field: str = "completion",
                            syntax: Syntax = PYTHON) -> dict:
    """Validate one ``{"prompt": str, "completion": str}`` row (completion non-empty; the keys are
    ``prompt_field`` and ``completion_field``)."""
    obj = as_object(obj, f'write each line as {{"{prompt_field}": ..., "{completion_field}": ...}}')
    for key, option in ((prompt_field, "prompt_field"), (completion_field, "completion_field")):
        if obj.get(key) is None:
            raise missing_key(obj, key, option, syntax, mapped=(prompt_field, completion_field))
    return {"prompt": string_field(obj, prompt_field, nonempty=False),
            "completion": string_field(obj, completion_field, nonempty=True)}


def check_labeled(obj: dict, *, task: str, text_field: str, pair_field: str | None, label_field: str,
                   syntax: Syntax = PYTHON, require_label: bool = True) -> dict:
    """Validate one labeled row: ``text`` (and ``text_pair`` with a ``pair_field``) and its label, a
    string or integer class for ``task`` classification, a finite number for regression; return the
    record (``label`` None for a row to predict when ``require_label`` is False)."""
    mapped = (text_field, pair_field, label_field)
    if text_field not in obj:
        raise missing_key(obj, text_field, "text_field", syntax, mapped)
    record = {"text": string_field(obj, text_field, nonempty=True)}
    if pair_field is not None:
        record["text_pair"] = string_field(obj, pair_field, nonempty=True)
    if label_field not in obj or obj[label_field] is None or (isinstance(obj[label_field], str)
                                                                and not obj[label_field].strip()):
        if not require_label:  # rows to predict: the label is what is asked for
            record["label"] = None
            return record
        if label_field not in obj:
            raise missing_key(obj, label_field, "label_field", syntax, mapped)
        raise RowError(f"missing {label_field!r}", f"give every row a {label_field!r}")
    value = obj[label_field]
    if task == "regression":
        try:
            if isinstance(value, bool):
                raise ValueError
            target = float(value)
        except OverflowError:
            raise RowError(f"regression target {label_field!r} is a number too large for a float",
                           "use a finite number") from None
        except (TypeError, ValueError):
            raise RowError(f"regression target {label_field}={value!r} is not a number",
                           "use a plain number such as 3.5") from None
        if not math.isfinite(target):
            raise RowError(f"regression target {label_field}={value!r} is not finite", "use a finite number")
        if abs(target) > _FLOAT32_MAX:
            raise RowError(f"regression target {label_field}={value!r} is beyond float32's range (3.4e38)",
                           "rescale the targets (e.g. to their logarithm or to units of their spread)")
        record["label"] = target
    else:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RowError(f"label {value!r} is a {type(value).__name__}", "use a string or an integer label")
        record["label"] = str(value).strip()
    return record
