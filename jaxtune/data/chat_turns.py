"""Where a conversation's assistant turns are in the text of its chat template: the pieces that
become a chat example's ids and loss mask (:func:`jaxtune.data.tokenize.encode_chat`).

The turns are found with the tokenizer's own chat template, rendered incrementally: for each
weighted assistant turn ``i`` we render the conversation up to turn ``i - 1`` with the
generation prompt and up to turn ``i`` without it; the difference is exactly what the model
generates for that turn (its content and end-of-turn marker, not the newline a template may
write after that marker). No ``{% generation %}`` tag is needed. For a template whose
renderings of a conversation's prefixes are prefixes of each other, the pieces join into its
rendering of the whole conversation.

Some templates rewrite a turn once later turns follow it: Qwen3's writes the ``<think>`` block
only into the turns after the last user query, so a trained earlier turn would lose its
reasoning. There each weighted turn is kept as the template renders it when it is the last one
(as the model generates it), the text between weighted turns is the template's rendering of
the next one's prompt (weight-0 turns as the template writes them in a later prompt), and a
note is logged once per tokenizer. For Qwen3 with every assistant turn weighted this is TRL's
Qwen3 training template. Qwen3's also rewrites the turns *before* a weighted turn: an assistant
turn right before another keeps its think block only while it is the last. Such a turn is found
after as many generation prompts as its own prompt holds, where the whole conversation opens it
the same way; so consecutive assistant turns train as TRL's Qwen3 training template renders them.
The turns must still be locatable: a template that renders the turns before a weighted turn
otherwise with no generation prompt to count by, or rewrites an earlier weighted turn's content
with no end-of-turn marker to find it by, is refused naming the row and turn.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any

from jaxtune.data.source_types import DataError
from jaxtune.data.tokenizer_backend import backend

log = logging.getLogger("jaxtune.data")


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, where: str) -> str:
    from jinja2 import TemplateSyntaxError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateSyntaxError as err:  # the template, not this row: no row renders
        raise ValueError(f"the tokenizer's chat template is not valid Jinja (line {err.lineno} of the template: "
                         f"{err.message}); fix chat_template in its tokenizer_config.json or chat_template.jinja, "
                         "or give another tokenizer as model.tokenizer") from None
    except Exception as err:  # jinja raises TemplateError and template-authored exceptions
        raise DataError(where, f"the chat template failed on this conversation: {err}",
                        "check the roles and order of the turns against the model's chat template") from err


def chat_pieces(tokenizer: Any, messages: list[dict], weights: Sequence[int], where: str = "<chat>"
                ) -> list[tuple[str, bool]]:
    """Split the conversation's training text into ``(text, supervised)`` pieces.

    A piece is supervised when it is an assistant turn with weight 1: the text the template
    adds after the generation prompt when that turn is the conversation's last, without
    trailing whitespace (the newline a template writes after an end-of-turn token is never
    generated). The text between two such turns is the template's rendering of the prompt to
    the later one, so for a template whose prefix renderings are prefixes of each other the
    pieces join into its rendering of the whole conversation.
    """
    full = _render(tokenizer, messages, False, where)
    pieces: list[tuple[str, bool]] = []
    last: _Reply | None = None
    for i, (message, weight) in enumerate(zip(messages, weights)):
        if message["role"] != "assistant" or not weight:
            continue
        reply = _reply(tokenizer, messages, i, full, where)
        between = reply.prompt[_turn_end(tokenizer, messages, reply.prompt, last, f"turn {i}", where):]
        pieces += [(between, False), (reply.text, True)]
        last = reply
    pieces.append((full[_turn_end(tokenizer, messages, full, last, "the rest of the conversation", where):], False))
    if "".join(text for text, _ in pieces) != full:
        _note_rewriting_template(tokenizer)
    return [(text, supervised) for text, supervised in pieces if text]


@dataclasses.dataclass(frozen=True)
class _Reply:
    """Assistant turn ``index`` as generated: ``prompt`` (the conversation before it, with the
    generation prompt) and ``text`` (what the template writes after it when the turn is last)."""

    index: int
    prompt: str
    text: str
    content: str  # the turn's content as the template writes it (stripped)


def _reply(tokenizer: Any, messages: list[dict], i: int, full: str, where: str) -> _Reply:
    """Assistant turn ``i`` as the template renders it when the conversation ends there, which is
    how the model generates it (Qwen3 writes a think block only there)."""
    upto = _before_closing(tokenizer, _render(tokenizer, messages[: i + 1], False, where), full)
    prompt = (_render(tokenizer, messages[:i], True, where) if i
              else _opening_prompt(tokenizer, messages[0], upto, where))
    opened = len(prompt) if upto.startswith(prompt) else _reopened(tokenizer, messages, i, prompt, upto, full, where)
    if opened is None:
        raise DataError(where, f"the chat template does not render turn {i} as an extension of the turns before it, "
                        "so the assistant tokens cannot be located",
                        "use a template whose output for a conversation ending in an assistant turn starts with its "
                        f"output for the turns before it and the generation prompt, or give turn {i} \"weight\": 0")
    text, content = upto[opened:].rstrip(), messages[i]["content"].strip()
    if content not in text:
        raise DataError(where, f"the chat template does not reproduce the content of assistant turn {i}",
                        "use a template that writes assistant content verbatim")
    if (messages[i].get("reasoning_content") or "").strip() not in text:  # else the reasoning would silently not train
        raise DataError(where, f"the chat template does not write the reasoning_content of assistant turn {i}",
                        "use a template that renders reasoning_content (Qwen3's does), or write the reasoning into "
                        "the content")
    return _Reply(i, prompt, text, content)


def _reopened(tokenizer: Any, messages: list[dict], i: int, prompt: str, upto: str, full: str,
               where: str) -> int | None:
    """Where assistant turn ``i`` opens in ``upto`` (the conversation rendered up to it) when the
    template renders the turn before otherwise once turn ``i`` follows (Qwen3 writes the think block
    of a conversation's last turn only, so a reply right after another drops the other's): after as
    many generation prompts as ``prompt`` holds, where the whole conversation ``full`` opens the turn
    the same way; else None."""
    if not i:
        return None
    opened = _opened(upto, _generation_prompt(tokenizer, messages, i, prompt, where), prompt)
    return opened if opened is not None and full.startswith(upto[:opened]) else None


def _generation_prompt(tokenizer: Any, messages: list[dict], i: int, prompt: str, where: str) -> str:
    """What the template writes to open assistant turn ``i`` (``i > 0``): its ``prompt`` (the turns
    before, with the generation prompt) less its rendering of them without; empty where ``prompt`` is
    no extension of that."""
    before = _render(tokenizer, messages[:i], False, where)
    return prompt[len(before):] if prompt.startswith(before) else ""


def _opened(text: str, generation_prompt: str, prompt: str) -> int | None:
    """Where ``text`` (a rendering that holds a turn whose ``prompt`` renders the turns before it
    otherwise) opens that turn: after as many ``generation_prompt`` as ``prompt`` holds; None where
    ``text`` has fewer, or the generation prompt is only whitespace (nothing to count by)."""
    if not generation_prompt.strip():
        return None
    at = -len(generation_prompt)
    for _ in range(prompt.count(generation_prompt)):
        at = text.find(generation_prompt, at + len(generation_prompt))
        if at < 0:
            return None
    return at + len(generation_prompt)


def _turn_end(tokenizer: Any, messages: list[dict], text: str, reply: _Reply | None, later: str, where: str) -> int:
    """Where ``reply``'s turn ends in ``text``, the template's rendering of the conversation with
    ``later`` (``"turn 5"``) after that turn; 0 for no reply."""
    if reply is None:
        return 0
    start = len(reply.prompt) if text.startswith(reply.prompt) else None
    if start is None and reply.index:  # the turns before it rendered otherwise once later ones follow (Qwen3)
        start = _opened(text, _generation_prompt(tokenizer, messages, reply.index, reply.prompt, where), reply.prompt)
    if start is None:
        raise DataError(where, f"the chat template renders the turns before assistant turn {reply.index} differently "
                        f"once {later} follows, so the turns cannot be joined",
                        f"give assistant turn {reply.index} \"weight\": 0 so that only the later turns train")
    if text.startswith(reply.text, start):
        return start + len(reply.text)
    # The template rewrites the turn once others follow (Qwen3 drops its think block). The turn is the
    # first thing after start, so it ends at the first of its content and end-of-turn marker, or at the
    # first marker where the content was rewritten too (a think block written inline in the content).
    closing = reply.text[reply.text.rfind(reply.content) + len(reply.content):]
    for ending in (reply.content + closing, closing.strip() and closing):
        at = text.find(ending, start) if ending else -1
        if at >= 0:
            return at + len(ending)
    raise DataError(where, f"assistant turn {reply.index} is not found in the chat template's rendering once {later} "
                    "follows, so the turns cannot be joined",
                    f"give assistant turn {reply.index} \"weight\": 0 so that only the later turns train")


_REWRITING: weakref.WeakSet = weakref.WeakSet()  # tokenizers whose template rewrites earlier turns (logged)


def _note_rewriting_template(tokenizer: Any) -> None:
    """Say once per tokenizer that its template rewrites earlier turns, and what training sees then."""
    if tokenizer in _REWRITING:
        return
    _REWRITING.add(tokenizer)
    log.info("the chat template renders an assistant turn differently once later turns follow it (Qwen3 drops the "
             "think block of earlier turns); in conversations that train such a turn it is kept as the template "
             "renders a last turn, the text the model generates, so those training sequences differ from the "
             "template's rendering of the whole conversation there (weight-0 turns and the prompts stay as rendered)")


def _before_closing(tokenizer: Any, upto: str, full: str) -> str:
    """``upto`` (a rendering of the conversation's first turns) without the closing text that the
    template writes only after a conversation's last turn (Phi-3's EOS), where what is left is a
    prefix of the whole conversation's rendering ``full`` and the closing text ends ``full`` too;
    else ``upto`` as it is. The two part where their tokens do (their characters may agree a little
    further: ``</s>`` and ``<|user|>`` both start with ``<``)."""
    if full.startswith(upto):
        return upto
    common = len(os.path.commonprefix([upto, full]))
    if not full.endswith(upto[common:]):  # no closing text ends both (Qwen3's rewritten turns): skip tokenizing
        return upto
    ours, whole = (backend(tokenizer).encode(text, add_special_tokens=False) for text in (upto, full))
    same = next((n for n, (a, b) in enumerate(zip(ours.ids, whole.ids)) if a != b), min(len(ours), len(whole)))
    if same >= len(ours):
        return upto
    kept = upto[:ours.offsets[same][0]]
    return kept if full.startswith(kept) and full.endswith(upto[len(kept):]) else upto


def _opening_prompt(tokenizer: Any, first: dict, upto: str, where: str) -> str:
    """What precedes the reply when the conversation opens with an assistant turn.

    Templates cannot render an empty conversation, so the generation prompt is taken from a
    one-turn user conversation and located in front of the reply.
    """
    probe = [{"role": "user", "content": "?"}]
    with_prompt, without = _render(tokenizer, probe, True, where), _render(tokenizer, probe, False, where)
    generation_prompt = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    reply = upto.rfind(first["content"].strip())  # the last: a default system prompt may contain the same words
    cut = upto.rfind(generation_prompt, 0, max(reply, 0)) if generation_prompt else -1
    if cut < 0:
        raise DataError(where, "cannot find the chat template's generation prompt before the opening assistant turn",
                        "start the conversation with a system or user turn")
    return upto[:cut + len(generation_prompt)]
