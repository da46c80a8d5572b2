"""LoRA/DoRA: identity at init, closed-form DoRA (incl. PEFT's dropout rule), merge/unmerge."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from helpers import tiny_hf_model

from jaxtune import tuning
from jaxtune.models import hf, stacking
from jaxtune.models.layers import Linear
from jaxtune.tuning.lora import init_adapter

IDS = np.random.RandomState(0).randint(1, 96, (2, 7)).astype(np.int32)
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2], np.int32)


def randomize_adapters(params: dict, seed: int = 1, scale: float = 0.05) -> dict:
    """Adapter B matrices (and DoRA magnitudes, prompt, head) moved off their init, so that
    adapted outputs differ from the base and parity checks mean something."""
    rng = np.random.RandomState(seed)
    flat = flatten_dict(params)
    for path, leaf in flat.items():
        noise = np.asarray(rng.randn(*leaf.shape), np.float32)
        if path[-1] == "lora_b":
            flat[path] = jnp.asarray(scale * noise)
        elif path[-1] == "magnitude":
            flat[path] = leaf * jnp.asarray(1 + 0.3 * np.tanh(noise))
        elif path[0] in ("prompt_embeddings", "head"):
            flat[path] = leaf + jnp.asarray(scale * noise, leaf.dtype)
    return unflatten_dict(flat)


@functools.partial(jax.jit, static_argnums=0)
def forward(module, params: dict, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    """Jitted ``module.apply`` (eager flax compiles every op on its own: much slower on CPU)."""
    return module.apply({"params": params}, input_ids=ids, segment_ids=mask)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_hf_model("LlamaForCausalLM", path, attention_bias=True)
    return hf.load_pretrained(path)


@pytest.fixture(scope="module")
def bert_classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("bertcls")
    tiny_hf_model("BertForSequenceClassification", path, num_labels=3)
    return hf.load_pretrained(path)


def _out(tuned: tuning.Tuned, params: dict) -> np.ndarray:
    return np.asarray(forward(tuned.module, params, IDS, MASK))


PLANS = {
    "lora": tuning.lora(rank=4, alpha=8),
    "dora": tuning.dora(rank=4, alpha=8),
    "rslora-attention": tuning.lora(rank=4, alpha=8, kinds=["attention"], rslora=True),
}
ZERO_B = [("llama", "lora"), ("llama", "dora"), ("bert_classifier", "rslora-attention"), ("bert_classifier", "dora")]


@pytest.mark.parametrize("model,name", ZERO_B)
def test_zero_b_gives_the_base_outputs(model, name, request):
    pretrained = request.getfixturevalue(model)
    tuned = tuning.apply_plan(pretrained, PLANS[name])
    assert tuned.adapters, "the plan must add adapters"
    base = jax.jit(lambda p: pretrained.module.apply({"params": p}, IDS, segment_ids=MASK))(pretrained.params)
    # Exact op by op (next test); inside one jitted forward XLA fuses the base matmul (and DoRA's
    # column norm) differently from the plain model, which moves results by ~1 ulp.
    np.testing.assert_allclose(_out(tuned, tuned.params), np.asarray(base), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_zero_b_linear_is_bitwise_the_base(kind):
    rng = np.random.RandomState(0)
    kernel, bias = jnp.asarray(rng.randn(6, 5), jnp.float32), jnp.asarray(rng.randn(5), jnp.float32)
    x = jnp.asarray(rng.randn(3, 6), jnp.float32)
    leaves = init_adapter(kernel, tuning.AdapterSpec(kind, rank=2, alpha=4.0), rng.uniform(-1, 1, (6, 2)))
    layer = Linear(5, use_bias=True)
    np.testing.assert_array_equal(np.asarray(layer.apply({"params": {"kernel": kernel, "bias": bias, **leaves}}, x)),
                                  np.asarray(layer.apply({"params": {"kernel": kernel, "bias": bias}}, x)))


def test_adapter_leaves_init_and_scale(llama):
    tuned = tuning.apply_plan(llama, tuning.lora(rank=4, alpha=8, targets=["q_proj"], rslora=True)
                              + tuning.dora(rank=2, alpha=3, targets=["up_proj"]))
    params, labels = stacking.unstack(tuned.params), stacking.unstack(tuned.labels)  # per-layer view
    q = params["layers_0"]["self_attn"]["q_proj"]
    up = params["layers_1"]["mlp"]["up_proj"]
    assert q["lora_a"].shape == (64, 4) and q["lora_b"].shape == (4, 64) and "magnitude" not in q
    assert float(q["lora_scale"]) == pytest.approx(8 / 2.0)  # rsLoRA: alpha / sqrt(r)
    assert float(up["lora_scale"]) == pytest.approx(1.5)  # alpha / r
    bound = 1 / np.sqrt(64)  # PEFT's kaiming-uniform(a=sqrt 5) bound is 1/sqrt(fan_in)
    assert np.abs(np.asarray(q["lora_a"])).max() <= bound and np.all(np.asarray(q["lora_b"]) == 0)
    base_up = stacking.unstack(llama.params)["layers_1"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_allclose(np.asarray(up["magnitude"]), np.linalg.norm(np.asarray(base_up), axis=0), rtol=1e-6)
    assert {k: labels["layers_1"]["mlp"]["up_proj"][k] for k in up} == {
        "kernel": "freeze", "lora_a": "lora", "lora_b": "lora", "lora_scale": "freeze", "magnitude": "dora"}


def _linear_params(rng: np.random.RandomState, dora: bool) -> dict:
    params = {"kernel": rng.randn(6, 5).astype(np.float32), "lora_a": rng.randn(6, 2).astype(np.float32),
              "lora_b": rng.randn(2, 5).astype(np.float32), "lora_scale": np.float32(0.75)}
    if dora:
        params["magnitude"] = rng.rand(5).astype(np.float32) + 0.5
    return params


@pytest.mark.parametrize("dora", [False, True])
def test_linear_adapter_matches_closed_form(dora):
    rng = np.random.RandomState(0)
    p = _linear_params(rng, dora)
    x = rng.randn(3, 6).astype(np.float32)
    adapted = p["kernel"] + p["lora_scale"] * p["lora_a"] @ p["lora_b"]
    if dora:  # W' = m * (W + sAB) / ||W + sAB||, norm per output feature
        adapted = adapted * (p["magnitude"] / np.linalg.norm(adapted, axis=0))
    ours = Linear(5).apply({"params": p}, x)
    np.testing.assert_allclose(np.asarray(ours), x @ adapted, atol=1e-5, rtol=1e-5)


def test_a_small_dora_magnitude_change_moves_a_bf16_output():
    """In bf16 the DoRA ratio m / ||W|| was rounded before ``- 1``: a ratio near 1 moves in steps of 0.4-0.8 %,
    so a 0.3 % larger magnitude changed nothing (PEFT keeps the ratio in float32 and rounds the output)."""
    rng = np.random.RandomState(0)
    kernel = rng.randn(16, 8).astype(np.float32)
    p = {"kernel": kernel, "lora_a": rng.randn(16, 2).astype(np.float32), "lora_b": np.zeros((2, 8), np.float32),
         "lora_scale": np.float32(1.0), "magnitude": 1.003 * np.linalg.norm(kernel, axis=0)}
    x = rng.randn(4, 16).astype(np.float32)
    base = np.asarray(Linear(8, dtype=jnp.bfloat16).apply({"params": {"kernel": kernel}}, x), np.float32)
    dora = np.asarray(Linear(8, dtype=jnp.bfloat16).apply({"params": p}, x), np.float32)
    slope = np.sum((dora - base) * base) / np.sum(base * base)  # the output's relative change
    assert slope == pytest.approx(0.003, rel=0.1)


def test_a_bf16_adapter_output_has_the_float_scale():
    """The LoRA scale multiplies in float32 and the product is rounded once, as PEFT's Python-float
    scaling under autocast: rounded to bf16 first, alpha / r = 16 / 6 became 2.672 and every adapter
    output was 0.18 % too large. Reference: the float64 closed form; the fitted gain is 1 within bf16 noise."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.normal(size=(4096, 64)), jnp.bfloat16)
    a, b = rng.normal(0, 0.1, (64, 6)).astype(np.float32), rng.normal(0, 0.1, (6, 64)).astype(np.float32)
    p = {"kernel": jnp.zeros((64, 64), jnp.bfloat16), "lora_a": a, "lora_b": b, "lora_scale": np.float32(16 / 6)}
    ours = np.asarray(Linear(64, dtype=jnp.bfloat16).apply({"params": p}, x), np.float64)
    truth = np.asarray(x, np.float64) @ a.astype(np.float64) @ b.astype(np.float64) * (16 / 6)
    assert float((ours * truth).sum() / (truth * truth).sum()) == pytest.approx(1.0, abs=2e-4)


def test_dora_dropout_rescales_the_dropped_base_output_as_peft_does():
    # PEFT (DoraLinearVariant.forward) with active dropout: y = xW + (r-1)·(d(x)W) + r·s·d(x)AB,
    # r = m/||W+sAB||. With B = 0, W = I and m = 2||W||: y - x = d(x), entries 0 or x/(1-p).
    p = {"kernel": np.eye(8, dtype=np.float32), "lora_a": np.ones((8, 2), np.float32),
         "lora_b": np.zeros((2, 8), np.float32), "lora_scale": np.float32(1.0),
         "magnitude": np.full(8, 2.0, np.float32)}
    x = np.ones((4, 8), np.float32)
    y = np.asarray(Linear(8, adapter_dropout=0.5).apply({"params": p}, x, deterministic=False,
                                                        rngs={"dropout": jax.random.key(3)}))
    extra = y - x
    assert set(np.round(np.unique(extra), 5)) == {0.0, 2.0}  # d(x) = 0 or 1/(1-0.5)
    assert np.asarray(Linear(8, adapter_dropout=0.5).apply({"params": p}, x)).tolist() == (2 * x).tolist()


def test_adapter_dropout_only_when_training(llama):
    tuned = tuning.apply_plan(llama, tuning.lora(rank=4, dropout=0.3))
    assert tuned.module.body.cfg.adapter_dropout == 0.3
    params = randomize_adapters(tuned.params)
    plain = tuning.apply_plan(llama, tuning.lora(rank=4))
    np.testing.assert_array_equal(_out(tuned, params), _out(plain, params))

    @jax.jit
    def train_step_out(key: jax.Array) -> jax.Array:
        return tuned.module.apply({"params": params}, input_ids=IDS, segment_ids=MASK, deterministic=False,
                                  rngs={"dropout": key})

    def train_out(seed: int) -> np.ndarray:
        return np.asarray(train_step_out(jax.random.key(seed)))

    assert not np.allclose(train_out(0), _out(tuned, params))
    assert not np.allclose(train_out(0), train_out(1))


@pytest.mark.parametrize("plan", ["lora", "dora"])
def test_merge_equals_adapter_and_unmerge_restores(plan, llama):
    extra = tuning.dora(rank=2, match="lm_head") if plan == "dora" else tuning.lora(rank=2, match="lm_head")
    tuned = tuning.apply_plan(llama, PLANS[plan] + extra)
    params = randomize_adapters(tuned.params)
    merged, saved = tuning.merge(params)
    assert not any(p[-1] in ("lora_a", "lora_b", "lora_scale", "magnitude") for p in flatten_dict(merged))
    # saved is keyed like the tree merged (a scanned run's modules once, for all its layers)
    assert set(saved) == {p[:-1] for p in flatten_dict(params) if p[-1] == "lora_a"}
    assert {m[1:] for m in saved} == {m[1:] for m in tuned.adapters}
    adapter_out = _out(tuned, params)
    base_tuned = tuning.apply_plan(llama, tuning.full())
    np.testing.assert_allclose(_out(base_tuned, merged), adapter_out, atol=1e-5, rtol=0)
    assert not np.allclose(adapter_out, _out(base_tuned, llama.params), atol=1e-3)
    # Stated tolerance: fp32 round trip W -> W' -> W within 1e-6 absolute (|W| ~ 0.02..0.1).
    restored = tuning.unmerge(merged, saved)
    assert flatten_dict(restored).keys() == flatten_dict(params).keys()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0),
                 restored, params)


def test_merge_keeps_kernel_dtype(llama):
    tuned = tuning.apply_plan(llama, tuning.lora(rank=2, targets=["q_proj"]), frozen_dtype=jnp.bfloat16)
    merged, _ = tuning.merge(randomize_adapters(tuned.params))
    assert merged["layers_0-1"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16

