"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), stop tokens,
batches of prompts of different lengths, and chat templates.

::

    model = jaxtune.load(path)
    new_ids = generate(model.module, model.params, [[1, 2, 3], [4, 5]], max_new_tokens=20)
    [reply] = complete(model, ["Hi"], chat=True, max_new_tokens=64, temperature=0.7, top_p=0.9)

How a batch runs: the prompts are left-padded to one length ``T``, so every row's next token
goes to the same cache slot and no row's tokens move. One jitted prefill writes the prompts into
a :class:`~jaxtune.models.kv_cache.KVCache` of ``max_length`` slots and gives the first logits;
one jitted ``lax.while_loop`` then adds a token per step until ``max_new_tokens`` or until every
row has met a stop token. Padding is masked, so a prompt gives the same tokens alone or in a batch
(greedy; a sampled row's draws depend on the seed, its row index and the step only), except under a
RoPE scaling that depends on the length (Phi-3's ``longrope``, ``dynamic``): the batch's longest
row chooses it for every row, as in transformers' batched ``generate``.

Compilation: ``T`` and the default ``max_length`` (``T + max_new_tokens``) are rounded up to a
length bucket (:func:`_bucket`: 32, 64, 96, 128, 192, 256, 384, ..., two per doubling, so a length
is padded to under twice itself, and above 64 to under 1.5 times), and the rows are padded with
filler rows (copies of the first prompt, dropped) to a power of two (:func:`_batch_rows`): a mix of
lengths compiles a number of programs that grows with the logarithm of the longest length, not with
the length. The prefill fills a cache of ``T`` slots and compiles once per (module, padded batch,
``T``); a small copy (:func:`_grow`) widens that cache to ``max_length``; the loop compiles once per
(module, padded batch, ``max_length``, greedy or sampled, filtered or not). Temperature, top-k,
top-p, stop tokens (up to :data:`STOPS_BUCKET` of them), ``max_new_tokens`` and the seed are traced
values, so changing them does not recompile. A row's tokens do not depend on the fillers or on the
buckets: greedy rows are computed independently, a sampled row's draws are keyed by its own index,
and the padding slots are masked out of attention.

Params sharded over a mesh (a run trained with FSDP or tensor parallelism, as ``jaxtune.open_run``
restores it) stay where they are, and the batch runs data-parallel on that mesh: the rows are split
over its batch axes (filler rows make their number a multiple; they are dropped), each layer's
activations stay split as in training (the programs are traced under the mesh), and XLA gathers
each layer's weights where its rows are. A model too large for one device generates, with the
tokens it gives on one device (tested).

The module is a :class:`~jaxtune.models.decoder.Decoder`, or a wrapper that holds one as
``.body`` with the body's params at the root of ``params`` and ``task == "lm"`` (e.g.
``jaxtune.tuning.TunedModel``, which this layer must not import). Adapter leaves (LoRA/DoRA) are
evaluated in place, so an adapted tree generates without merging; a prompt-tuned wrapper's
virtual tokens (``prompt_embeddings`` ``(P, D)``) are put before each prompt, at positions
``0..P-1``, as in training.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.models.attention import batch_axes, data_parallel_size
from jaxtune.models.decoder import Decoder, check_makes_logits
from jaxtune.models.kv_cache import KVCache, init_cache
from jaxtune.models.layers import Array
from jaxtune.models.load import model_of, tokenizer_of

Params = dict[str, Any]
Chat = Sequence[Mapping[str, Any]]  # [{"role": "user", "content": "..."}, ...]

MIN_BUCKET = 32  # the shortest prompt width and cache length (see _bucket)
ROWS_BUCKET = 64  # batches run as a power of two rows up to this, a multiple of it above (see _batch_rows)
STOPS_BUCKET = 8  # the stop ids are padded to a multiple of this
PROMPT_LEAF = "prompt_embeddings"  # jaxtune.tuning.labels.PROMPT_LEAF (models may not import tuning)


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits: Array, top_k: Array, top_p: Array) -> Array:
    """Keep each row's ``top_k`` most likely tokens, then the fewest of those whose probability
    reaches ``top_p``; the rest become ``-inf``. The order and the tie rule (a token is kept
    while the tokens above it have less than ``top_p``) are those of transformers' warpers.

    Shapes: ``logits`` ``(B, V)`` float32, ``top_k`` ``()`` int32 in ``1..V``, ``top_p`` ``()``
    float32 in ``(0, 1]`` -> ``(B, V)`` float32. Tokens tied with the last kept one are kept too.
    """
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    rank = jnp.arange(logits.shape[-1])
    in_top_k = rank < top_k
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    keep = in_top_k & ((above < top_p) | (rank == 0))
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def _pick(logits: Array, key: Array, step: Array, temperature: Array, top_k: Array, top_p: Array,
          greedy: bool, filtered: bool) -> Array:
    """The next token ``(B,)`` int32 for logits ``(B, V)``: argmax, or a draw keyed by (key, step, row)."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if filtered:
        logits = filter_logits(logits, top_k, top_p)
    step_key = jax.random.fold_in(key, step)
    # One key per row, so that a row's draws do not depend on what else is in the batch.
    keys = jax.vmap(lambda row: jax.random.fold_in(step_key, row))(jnp.arange(logits.shape[0]))
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ----------------------------------------------------------------------------- compiled parts


@functools.partial(jax.jit, static_argnames=("model",))
def _prefill(model: Decoder, params: Params, ids: Array, virtual: Array, start: Array, prompt: Array | None
             ) -> tuple[Array, KVCache]:
    """Run the left-padded prompts ``ids`` ``(B, T)`` int32 into a fresh cache of ``T`` slots (its
    program does not depend on the cache length the loop needs: :func:`_grow` widens it).

    ``virtual`` ``(B, T)`` int32 is the prompt-tuning token at each slot (-1: a token from
    ``ids``); ``prompt`` ``(P, D)`` or None. Returns the last slot's logits ``(B, V)`` float32
    and the cache.
    """
    variables = {"params": params}
    embeds = model.apply(variables, ids, method="embed")
    if prompt is not None:
        virtual_embeds = jnp.take(prompt.astype(embeds.dtype), jnp.maximum(virtual, 0), axis=0)
        embeds = jnp.where((virtual >= 0)[..., None], virtual_embeds, embeds)
    positions = jnp.maximum(jnp.arange(ids.shape[1], dtype=jnp.int32)[None] - start[:, None], 0)
    cache = init_cache(model.cfg, ids.shape[0], ids.shape[1], start)
    hidden, cache = model.apply(variables, None, positions, cache, embeds, method="decode")
    return model.apply(variables, hidden[:, -1], method="logits").astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("max_length",))
def _grow(cache: KVCache, *, max_length: int) -> KVCache:
    """``cache`` with empty slots added after its last to make ``max_length`` (a copy: a small program,
    quick to compile for each pair of lengths, where the prefill and the loop compile for one each)."""
    def wider(x: Array) -> Array:  # (L, B, S, K, H)
        return jnp.pad(x, ((0, 0), (0, 0), (0, max_length - x.shape[2]), (0, 0), (0, 0)))

    return cache._replace(k=tuple(map(wider, cache.k)), v=tuple(map(wider, cache.v)))


@functools.partial(jax.jit, static_argnames=("model", "greedy", "filtered"), donate_argnames=("cache",))
def _decode_loop(model: Decoder, params: Params, cache: KVCache, logits: Array, key: Array, max_new_tokens: Array,
                 real_rows: Array, stop_ids: Array, temperature: Array, top_k: Array, top_p: Array, *, greedy: bool,
                 filtered: bool) -> tuple[Array, KVCache]:
    """Generate up to ``max_new_tokens`` tokens after the prefill's ``logits`` ``(B, V)``.

    Returns ``(B, S)`` int32 (``S`` = cache length): the new tokens in ``[:, :max_new_tokens]``;
    after a row's first stop token (``stop_ids`` ``(n,)``, -1 for none) its tokens are meaningless.
    Rows from ``real_rows`` on are fillers: done from the start, so that their draws never keep
    the loop running after the real rows have stopped. Also
    returns the final cache: an output the donated cache can alias, so the loop updates it in
    place instead of copying it first.
    """
    variables = {"params": params}
    pick = functools.partial(_pick, key=key, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                             filtered=filtered)
    first = pick(logits, step=0)
    out = jnp.zeros((logits.shape[0], cache.max_length), jnp.int32).at[:, 0].set(first)

    def running(state: tuple) -> Array:
        step, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def advance(state: tuple) -> tuple:
        step, token, done, out, cache = state
        positions = (cache.index - cache.start)[:, None]
        hidden, cache = model.apply(variables, token[:, None], positions, cache, method="decode")
        token = pick(model.apply(variables, hidden[:, 0], method="logits"), step=step)
        return step + 1, token, done | jnp.isin(token, stop_ids), out.at[:, step].set(token), cache

    fillers = jnp.arange(logits.shape[0]) >= real_rows
    state = (jnp.int32(1), first, jnp.isin(first, stop_ids) | fillers, out, cache)
    _, _, _, out, cache = jax.lax.while_loop(running, advance, state)
    return out, cache


# ----------------------------------------------------------------------------- public API


def _decoder_and_prompt(module: Any, params: Params) -> tuple[Decoder, Array | None]:
    """The decoder that generates, and the prompt-tuning embeddings ``(P, D)`` if the module has any."""
    if isinstance(module, Decoder):
        check_makes_logits(module.cfg)  # a bare body (LlamaModel) has no logits: refused before compiling
        return module, None
    body = getattr(module, "body", None)
    if not isinstance(body, Decoder):
        raise TypeError(f"generate needs a decoder language model (a jaxtune Decoder, or a tuned one); "
                        f"got {type(module).__name__}")
    task = getattr(module, "task", "lm")
    if task != "lm":
        raise ValueError(f"generate needs a language model; this tuned model has a {task!r} head")
    if not getattr(module, "prompt_tokens", 0):
        return body, None
    if PROMPT_LEAF not in params:
        raise ValueError(f"the module is prompt-tuned but params have no {PROMPT_LEAF!r} leaf")
    return body, params[PROMPT_LEAF]


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


def _bucket(n: int) -> int:
    """The least of 32, 64, 96, 128, 192, 256, 384, ... (above 64: ``2**k`` and ``3 * 2**k``, two
    per doubling) that holds ``n``: lengths up to ``L`` compile about ``2 * log2(L / 32)`` shapes;
    ``n`` is padded to under twice itself, and above 64 to under ``1.5 * n`` (the padding costs
    compute, masked out). Below 128 these are the multiples of 32, as fine as buckets go here."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    power = 1 << (n - 1).bit_length()  # the least power of two >= n
    return power * 3 // 4 if power * 3 // 4 >= n and power > 2 * MIN_BUCKET else power


def _widths(longest: int, max_new_tokens: int, max_length: int | None) -> tuple[int, int]:
    """The prompt width ``T`` and the cache length of a batch whose longest prompt has ``longest``
    tokens: each a :func:`_bucket`, unless the caller's ``max_length`` leaves no room for ``T``'s
    bucket; ``T`` is then ``longest`` rounded up to a multiple of 8 where that fits, else
    ``longest``: three widths at most for a prompt length, whatever ``max_new_tokens`` (not
    ``max_length - max_new_tokens``: a new shape, hence a compilation of the prefill, for almost
    every ``max_new_tokens``)."""
    if max_length is None:
        width = _bucket(longest)
        return width, _bucket(width + max_new_tokens)
    room = max_length - max_new_tokens
    return next(w for w in (_bucket(longest), _round_up(longest, 8), longest) if w <= room), max_length


def _batch_rows(prompts: int, split: int) -> int:
    """How many rows a batch of ``prompts`` runs as: a power of two up to :data:`ROWS_BUCKET`, a
    multiple of it above (so that batch sizes share compiled code, wasting under half the rows),
    and a multiple of ``split`` (the mesh's data-parallel size, so that the rows split evenly)."""
    bucket = min(1 << (prompts - 1).bit_length(), ROWS_BUCKET)
    return _round_up(_round_up(prompts, bucket), split)


def _stop_ids(stop_token_ids: Sequence[int]) -> Array:
    """The stop ids padded with -1 (no token) to a multiple of :data:`STOPS_BUCKET`: their number
    is a shape, and each new one would compile the loop again."""
    ids = np.full(_round_up(max(len(stop_token_ids), 1), STOPS_BUCKET), -1, np.int32)
    ids[:len(stop_token_ids)] = stop_token_ids
    return jnp.asarray(ids)


def generate(
    module: Any,
    params: Params,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Sequence[int] = (),
    seed: int = 0,
    max_length: int | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
      module: a :class:`~jaxtune.models.decoder.Decoder` (``Pretrained.module``) or a tuned
        language model (``Tuned.module``, task ``lm``); see the module docstring.
      params: its param tree (adapter leaves allowed; any dtype).
      prompt_ids: one list of token ids per prompt, of any lengths (ids already include BOS and
        chat markup as the model expects).
      max_new_tokens: the most tokens to add to each prompt.
      temperature: 0 picks the most likely token (greedy); above 0 samples from
        ``softmax(logits / temperature)``.
      top_k: when sampling, draw only from the ``top_k`` most likely tokens.
      top_p: when sampling, draw only from the fewest most likely tokens whose probability
        reaches ``top_p`` (nucleus sampling; applied after ``top_k``, as transformers does).
      stop_token_ids: a row ends at the first of these it generates; the stop token is **not**
        included in the result.
      seed: the sampling seed (same seed, same prompts, same settings: same tokens).
      max_length: cache slots per row (prompt + new tokens, virtual prompt-tuning tokens
        included); fix it to compile the loop once for many calls. Default: the longest prompt
        rounded up to a length bucket (:func:`_bucket`), plus ``max_new_tokens``, rounded up again.

    Returns:
      The new tokens of each prompt, in order, without the stop token.

    With ``params`` sharded over a mesh (a run's), the prompts' rows are split over its batch axes
    and the params stay where they are. On a mesh over several processes every process calls this
    with the same request and gets every row back (a different request is a ValueError on each).
    """
    decoder, prompt = _decoder_and_prompt(module, params)
    virtual_tokens = 0 if prompt is None else prompt.shape[0]
    vocab = decoder.cfg.vocab_size
    prompts = [[int(t) for t in p] for p in prompt_ids]
    _check_request(prompts, virtual_tokens, vocab, max_new_tokens, temperature, top_k, top_p, stop_token_ids)
    if max_new_tokens == 0:
        return [[] for _ in prompts]

    longest = max(len(p) for p in prompts) + virtual_tokens
    positions = getattr(decoder.cfg, "max_position_embeddings", None)  # learned positions (GPT-2): a table's rows
    if positions is not None and longest + max_new_tokens > positions:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} passes the model's "
                         f"{positions} positions (learned position embeddings have no more); shorten the prompt or "
                         "ask for fewer tokens")
    if max_length is not None and longest + max_new_tokens > max_length:
        raise ValueError(f"max_length {max_length} is too short for a prompt of {longest} tokens"
                         f"{' (with virtual tokens)' if virtual_tokens else ''} plus max_new_tokens {max_new_tokens}")
    width, max_length = _widths(longest, max_new_tokens, max_length)
    mesh = _mesh_of(params)
    # On a mesh over several processes' devices every process runs this call (its rows are split over
    # all of them); one process generating on its own devices has nothing to compare.
    if mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1:
        _check_every_process_asks_the_same([prompts, max_new_tokens, temperature, top_k, top_p,
                                            list(stop_token_ids), seed, max_length])
    split = 1 if mesh is None else data_parallel_size(mesh)
    rows = prompts + [prompts[0]] * (_batch_rows(len(prompts), split) - len(prompts))  # fillers, dropped at the end
    ids, virtual, start = _left_pad(rows, virtual_tokens, width)
    if mesh is not None:
        rows_split = NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))
        ids, virtual, start = jax.device_put((ids, virtual, start), rows_split)

    sampled = temperature > 0
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext():
        logits, cache = _prefill(decoder, params, ids, virtual, start, prompt)
        cache = _grow(cache, max_length=max_length)
        out, _ = _decode_loop(
            decoder, params, cache, logits, jax.random.key(seed), jnp.int32(max_new_tokens), jnp.int32(len(prompts)),
            _stop_ids(stop_token_ids), jnp.float32(temperature if sampled else 1.0),
            jnp.int32(top_k or vocab), jnp.float32(top_p or 1.0),
            greedy=not sampled, filtered=sampled and (top_k is not None or top_p is not None),
        )
    if not out.is_fully_addressable:  # rows on other processes' devices: every process gets every row
        out = multihost_utils.process_allgather(out, tiled=True)
    return [_until_stop(row[:max_new_tokens], stop_token_ids) for row in np.asarray(out)[:len(prompts)].tolist()]


def _check_every_process_asks_the_same(request: list[Any]) -> None:
    """The rows of one generation are split over every process's devices, so every process must pass
    the same prompts and settings (as :func:`complete` does); a ValueError on every process when
    they differ (compared by digest: one small all-gather)."""
    digest = np.frombuffer(hashlib.sha256(json.dumps(request).encode()).digest(), np.uint32)
    try:
        multihost_utils.assert_equal(digest)
    except AssertionError:
        raise ValueError(f"generate: process {jax.process_index()} of {jax.process_count()} passed other prompts or "
                         "settings than the rest; on a mesh over several processes every process passes the same "
                         "request (the rows are split over all their devices), or generate on one process's devices"
                         ) from None


def _mesh_of(params: Params) -> Mesh | None:
    """The mesh ``params`` are sharded over (a run's, restored), or None on one device."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def _check_request(prompts: list[list[int]], virtual_tokens: int, vocab: int, max_new_tokens: int,
                   temperature: float, top_k: int | None, top_p: float | None, stop_token_ids: Sequence[int]) -> None:
    """Fail before compiling, naming the bad argument."""
    if not prompts:
        raise ValueError("prompt_ids is empty: give one list of token ids per prompt")
    for i, p in enumerate(prompts):
        if not p and not virtual_tokens:
            raise ValueError(f"prompt {i} has no tokens; a model needs at least one (e.g. BOS) to continue from")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary 0..{vocab - 1}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if any(not 0 <= t < vocab for t in stop_token_ids):
        raise ValueError(f"stop_token_ids {list(stop_token_ids)} reach outside the vocabulary 0..{vocab - 1}")


def _left_pad(prompts: list[list[int]], virtual_tokens: int, width: int) -> tuple[Array, Array, Array]:
    """Each row as ``[padding, virtual tokens, prompt]`` of ``width`` slots: token ids ``(B, W)``
    (0 where padding or virtual), virtual-token index ``(B, W)`` (-1 elsewhere) and the first
    real slot ``(B,)``, all int32."""
    ids = np.zeros((len(prompts), width), np.int32)
    virtual = np.full((len(prompts), width), -1, np.int32)
    start = np.array([width - len(p) - virtual_tokens for p in prompts], np.int32)
    for row, (p, s) in enumerate(zip(prompts, start)):
        virtual[row, s:s + virtual_tokens] = np.arange(virtual_tokens)
        ids[row, s + virtual_tokens:] = p
    return jnp.asarray(ids), jnp.asarray(virtual), jnp.asarray(start)


def _until_stop(tokens: list[int], stop_token_ids: Sequence[int]) -> list[int]:
    stops = set(stop_token_ids)
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


# ----------------------------------------------------------------------------- text in, text out


def default_stop_token_ids(tokenizer: Any, model_dir: str | Path | None = None) -> tuple[int, ...]:
    """The tokenizer's EOS id and the ``eos_token_id`` (one or a list) of ``generation_config.json``
    in ``model_dir`` (default: the tokenizer's own directory), in that order, without repeats."""
    ids = [tokenizer.eos_token_id]
    directory = model_dir if model_dir is not None else getattr(tokenizer, "name_or_path", "")
    config = Path(directory) / "generation_config.json"
    if directory and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def prompt_list(prompts: Sequence[str] | Sequence[Chat], *, chat: bool) -> list[Any]:
    """``prompts`` as a list, refused before anything iterates it: a bare string would be read as
    one prompt per character, and a single chat as one prompt per message."""
    if isinstance(prompts, (str, Mapping)):
        raise TypeError("prompts: a list of prompts, not a single one: wrap it in a list")
    items = list(prompts)
    if items and isinstance(items[0], Mapping):
        raise TypeError("prompts: a list of prompts, not a single one: wrap it in a list")
    for i, p in enumerate(items):
        is_chat = isinstance(p, Sequence) and not isinstance(p, str) and all(isinstance(m, Mapping) for m in p)
        if is_chat and not chat:  # else it reaches the tokenizer as a list of dicts and fails inside transformers
            raise TypeError("prompts: these prompts are chats: pass chat=True")
        if not (is_chat or isinstance(p, str)):
            raise TypeError(f"prompts: prompt {i} is a {type(p).__name__}; give strings or chats (lists of messages)")
    return items


def encode_prompts(tokenizer: Any, prompts: Sequence[str] | Sequence[Chat], *, chat: bool) -> list[list[int]]:
    """Token ids of plain prompts (with the tokenizer's special tokens, e.g. BOS), or of chats
    rendered by the tokenizer's chat template with the assistant turn opened
    (``add_generation_prompt=True``; the template writes any BOS itself)."""
    prompts = prompt_list(prompts, chat=chat)
    if not chat:
        return [list(tokenizer(p)["input_ids"]) for p in prompts]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                         "generate from plain prompts instead (chat=False)")
    texts = [tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False) for c in prompts]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def stop_token_ids(tokenizer: Any, model_dir: str | Path | None, stop: Sequence[str | int] = ()) -> tuple[int, ...]:
    """EOS (tokenizer and ``generation_config.json``) plus ``stop``: tokens or token ids."""
    ids = list(default_stop_token_ids(tokenizer, model_dir))
    for token in stop:
        if isinstance(token, int) or str(token).lstrip("-").isdigit():
            ids.append(int(token))
            continue
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or found == tokenizer.unk_token_id:
            encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                raise ValueError(f"stop {token!r}: not a single token of this tokenizer (it encodes to {encoded}); "
                                 "give a token or a token id")
            found = encoded[0]
        ids.append(int(found))
    return tuple(dict.fromkeys(ids))


_MODEL_FIELDS = ("module", "params", "tokenizer", "source")  # what complete reads of a model


def _generator(model: Any) -> Any:
    """``model``, or a ``Trainer.fit()`` result's trained ``model`` (:func:`~jaxtune.models.load.model_of`);
    anything without the fields :func:`complete` reads is refused, naming what to pass (a path failed on a
    missing attribute)."""
    model = model_of(model)
    if not all(hasattr(model, f) for f in _MODEL_FIELDS):
        hint = f": load it first, jaxtune.load({str(model)!r})" if isinstance(model, (str, os.PathLike)) else ""
        raise TypeError(f"model: expected a model from jaxtune.load, jaxtune.apply_plan or Trainer.fit(), got "
                        f"{type(model).__name__}{hint}")
    return model


def complete(model: Any, prompts: Sequence[str] | Sequence[Chat], *, chat: bool = False, system: str | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop: Sequence[str | int] = (), seed: int = 0,
             max_length: int | None = None) -> list[dict[str, Any]]:
    """Generate for each prompt with a loaded or tuned model (``jaxtune.load`` /
    ``Trainer.fit().model``: anything with ``module``, ``params``, ``tokenizer``, ``source``).

    ``prompts`` are strings (with ``chat=True`` each is a user turn, after an optional
    ``system`` message) or chats (lists of messages). Greedy unless ``temperature > 0``.
    Returns ``[{"prompt", "text", "ids"}]``: the new text and token ids, without the stop token.
    A ``Trainer.fit()`` result generates with its trained ``model``.
    """
    model = _generator(model)
    tokenizer_of(model)
    prompts = prompt_list(prompts, chat=chat)
    if system is not None and not chat:
        raise ValueError("system: system= applies with chat=True (it is the chat's first message)")
    items: list[Any] = prompts
    if chat:
        prefix = [{"role": "system", "content": system}] if system else []
        items = [prefix + [{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    directory = Path(model.source) if Path(model.source).is_dir() else None
    ids = encode_prompts(model.tokenizer, items, chat=chat)
    new = generate(model.module, model.params, ids, stop_token_ids=stop_token_ids(model.tokenizer, directory, stop),
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   max_length=max_length)
    return [{"prompt": p, "text": model.tokenizer.decode(n, skip_special_tokens=True), "ids": list(n)}
            for p, n in zip(prompts, new)]
