"""Prompt tuning: ``P`` trainable virtual-token embeddings prepended to every input sequence.

The prompt is one param leaf ``prompt_embeddings`` ``(P, D)`` float32 (PEFT's key name). The
decoder sees ``[prompt; tokens]``: virtual tokens take positions ``0..P-1`` and real tokens
are shifted by ``P`` (as in PEFT, which runs the base model on the concatenated sequence), and
virtual tokens belong to the segment of the row's first real token, so every real token attends
to them and padding rows stay padding. Packed rows holding several documents are not
supported: only the first document would see the prompt (PEFT has no packing either).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models import quant

Array = jax.Array
Tokenizer = Callable[[str], Any]


def init_prompt(
    embedding: Array,
    n_tokens: int,
    init: str,
    rng: jax.Array,
    *,
    text: str | None = None,
    tokenizer: Tokenizer | None = None,
) -> Array:
    """Initial ``(n_tokens, D)`` float32 prompt from the ``(V, D)`` token embedding table.

    ``vocab``: rows of uniformly sampled token ids (PEFT's ``SAMPLE_VOCAB``). ``text``: the rows
    of ``tokenizer(text)``'s ids (an HF tokenizer, or any callable returning ids), repeated and
    cut to ``n_tokens`` exactly as PEFT's ``TEXT`` init does.
    """
    if init == "vocab":
        ids = jax.random.randint(rng, (n_tokens,), 0, embedding.shape[0])
    elif init == "text":
        if tokenizer is None:
            raise ValueError("prompt init 'text' needs a tokenizer")
        out = tokenizer(text)
        ids = [int(i) for i in np.asarray(out["input_ids"] if hasattr(out, "keys") else out).reshape(-1)]
        if not ids:
            raise ValueError(f"prompt init text {text!r} tokenizes to no tokens")
        ids = jnp.asarray((ids * math.ceil(n_tokens / len(ids)))[:n_tokens], jnp.int32)
    else:
        raise ValueError(f"unknown prompt init {init!r}; choose vocab or text")
    return quant.take(embedding, jnp.asarray(ids), jnp.float32)  # a quantized table: only these rows dequantized


def prepend(
    prompt: Array, embeds: Array, positions: Array | None, segment_ids: Array | None
) -> tuple[Array, Array, Array | None]:
    """Put the prompt before each row.

    Shapes: ``prompt`` ``(P, D)``, ``embeds`` ``(B, T, D)``, ``positions``/``segment_ids``
    ``(B, T)`` int or None -> ``(B, P+T, D)`` in ``embeds.dtype``, positions ``(B, P+T)`` and
    segment ids ``(B, P+T)`` (None stays None: then no padding and plain causal attention).
    """
    b, t, _ = embeds.shape
    p = prompt.shape[0]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    virtual_pos = jnp.broadcast_to(jnp.arange(p, dtype=positions.dtype), (b, p))
    positions = jnp.concatenate([virtual_pos, positions + p], axis=1)
    embeds = jnp.concatenate([jnp.broadcast_to(prompt.astype(embeds.dtype), (b,) + prompt.shape), embeds], axis=1)
    if segment_ids is not None:
        first = jnp.take_along_axis(segment_ids, jnp.argmax(segment_ids != 0, axis=1)[:, None], axis=1)
        segment_ids = jnp.concatenate([jnp.broadcast_to(first, (b, p)), segment_ids], axis=1)
    return embeds, positions, segment_ids

