"""Quantized frozen leaves (QLoRA): formats against their references (bitsandbytes' NF4, closed
forms, the gguf package's block decoders), forward/backward on a quantized base, plan errors,
PEFT and merged export, FSDP training with exact resume, and the SmolLM2 memory and GGUF runs."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from helpers import set_gguf_fp16_fields, tiny_hf_model, torch_logits
from test_tuning_lora import randomize_adapters

from jaxtune import tuning
from jaxtune.models import gguf_quantized, hf, quant, stacking
from jaxtune.tuning.plan import PlanError

IDS = np.random.RandomState(0).randint(1, 120, (2, 9)).astype(np.int32)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama whose widths are multiples of the NF4 block (64)."""
    root = tmp_path_factory.mktemp("qllama")
    tiny_hf_model("LlamaForCausalLM", root, intermediate_size=128)
    return root


@pytest.fixture(scope="module")
def base(llama):
    return hf.load_pretrained(llama)


# ----------------------------------------------------------------------------- formats


def bnb_nf4_reference(weight: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``quantize_4bit(quant_type="nf4")`` in plain PyTorch: the (out, in) weight
    flattened into blocks of 64, absmax per block, and bnb's decision tree (a value goes to the
    upper level only when strictly above the midpoint). Returns (codes per element, absmax)."""
    levels = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
    blocks = weight.reshape(-1, block)
    absmax = blocks.abs().max(dim=1).values
    normed = blocks / absmax[:, None]
    codes = (normed[..., None] > (levels[1:] + levels[:-1]) / 2).sum(-1)
    return codes.reshape(weight.shape), absmax.reshape(weight.shape[0], -1)


def test_nf4_codes_and_block_scales_match_bitsandbytes():
    weight = torch.randn(48, 192) * 0.05  # PyTorch (out, in)
    codes, absmax = bnb_nf4_reference(weight)
    q = quant.quantize(jnp.asarray(weight.numpy().T), "nf4")  # our kernel is (in, out)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (96, 48)  # two codes per byte
    ours = np.asarray(quant._unpack(q.codes, 64)).T
    np.testing.assert_array_equal(ours, codes.numpy())
    np.testing.assert_array_equal(np.asarray(q.scale).T, absmax.numpy())
    levels = np.asarray(quant.NF4_LEVELS)
    expected = levels[codes.numpy()] * np.repeat(absmax.numpy(), 64, axis=1)
    np.testing.assert_allclose(np.asarray(quant.dequantize(q)).T, expected, rtol=1e-6, atol=0)
    # the levels are the QLoRA paper's: 16 values in [-1, 1] with an exact zero, symmetric in range
    assert levels[0] == -1 and levels[-1] == 1 and levels[7] == 0 and np.all(np.diff(levels) > 0)


def test_int8_and_fp8_are_per_channel_absmax_closed_forms():
    w = np.random.RandomState(1).randn(64, 24).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero channel stays exactly zero
    s = np.abs(w).max(axis=0) / 127
    q = quant.quantize(jnp.asarray(w), "int8")
    safe = np.where(s == 0, 1, s)
    np.testing.assert_array_equal(np.asarray(q.codes), np.clip(np.round(w / safe), -127, 127).astype(np.int8))
    np.testing.assert_allclose(np.asarray(q.scale)[0], s, rtol=1e-7)
    err = np.abs(np.asarray(quant.dequantize(q)) - w)
    assert np.all(err <= s / 2 * (1 + 1e-5) + 1e-12)  # round to nearest: half a step at most
    f = quant.quantize(jnp.asarray(w), "fp8")
    s8 = np.abs(w).max(axis=0) / 448
    np.testing.assert_array_equal(np.asarray(f.codes).astype(np.float32),
                                  (w / np.where(s8 == 0, 1, s8)).astype(jnp.float8_e4m3fn).astype(np.float32))
    assert np.abs(np.asarray(quant.dequantize(f)) - w).max() <= 2 ** -4 * np.abs(w).max()  # e4m3: 3 mantissa bits


def test_a_non_finite_input_row_stays_its_own_row_in_a_float8_product():
    """The dequantization is tied to the matmul's first input element (``0 * x[0, 0]``); an inf there made
    every float8 code NaN, so every output row, where the dense product has only its own row non-finite."""
    w = quant.quantize(jnp.asarray(np.random.RandomState(0).randn(64, 8).astype(np.float32)), "fp8")
    x = jnp.ones((2, 64)).at[0, 0].set(jnp.inf)
    got, want = np.asarray(quant.dot(x, w, jnp.float32)), np.asarray(x @ quant.dequantize(w))
    assert np.isfinite(got).all(axis=1).tolist() == np.isfinite(want).all(axis=1).tolist() == [False, True]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_double_quantisation_keeps_scales_within_half_an_int8_step():
    w = jnp.asarray(np.random.RandomState(2).randn(2, 1024, 64).astype(np.float32))  # a stack of 2 layers
    single, double = quant.quantize(w, "nf4"), quant.quantize(w, "nf4_dq")
    assert double.scale.codes.dtype == jnp.int8 and double.scale.codes.shape == single.scale.shape == (2, 16, 64)
    exact = np.asarray(single.scale)
    got = np.asarray(quant.dequantize(double.scale))
    centred = exact - exact.mean(axis=1, keepdims=True)
    step = np.abs(centred).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(got - exact) <= step / 2 * (1 + 1e-4) + 1e-7)
    assert double.nbytes < single.nbytes
    # layers slice like an array: every component keeps the leading axis
    one = jax.tree.map(lambda a: a[1], double)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(one)), np.asarray(quant.dequantize(double))[1])


def test_an_nf4_kernel_must_fit_whole_blocks():
    with pytest.raises(ValueError, match="not a multiple of the nf4 block 64"):
        quant.quantize(jnp.ones((96, 8)), "nf4")


class _Tensor:
    def __init__(self, kind, data):
        self.tensor_type, self.data, self.name = kind, data, "blk.0.ffn_up.weight"


@pytest.mark.parametrize("kind", gguf_quantized.QUANTIZED_TYPES)
def test_gguf_blocks_decode_exactly_as_the_gguf_package(kind):
    """Random block bytes (finite fp16 scales) decode to what ``gguf.quants.dequantize`` gives,
    bit for bit, in the GGUF (out, in) layout, transposed into a kernel (in, out), and as a stack of
    experts (experts, out, in)."""
    qtype = getattr(GGMLQuantizationType, kind)
    _, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.RandomState(3)
    data = rng.randint(0, 256, (4, 2, size)).astype(np.uint8)
    data = set_gguf_fp16_fields(data, kind, lambda shape: rng.uniform(-0.05, 0.05, shape)).reshape(4, -1)
    expected = gguf_dequantize(data, qtype)
    q = jax.tree.map(jnp.asarray, gguf_quantized.quantized_tensor(_Tensor(qtype, data)))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), expected)
    kernel = quant.transpose(q)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(kernel)), expected.T)
    stack = jax.tree.map(jnp.asarray, gguf_quantized.quantized_tensor(_Tensor(qtype, data.reshape(2, 2, -1))))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(stack)), expected.reshape(2, 2, -1))


# ----------------------------------------------------------------------------- on a model


def _logits(tuned, params):
    return np.asarray(jax.jit(lambda p: tuned.module.apply({"params": p}, input_ids=IDS))(params), np.float64)


CASES = {
    "nf4+lora": tuning.freeze(quantize="nf4") + tuning.lora(4),
    "nf4_dq+dora": tuning.freeze(quantize="nf4_dq") + tuning.dora(4),
    "int8+prompt": tuning.freeze(quantize="int8") + tuning.prompt_tuning(3),
    "fp8+lora+head": tuning.freeze(quantize="fp8") + tuning.lora(4) + tuning.head("classification", 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_forward_equals_the_dequantized_weight_forward(base, case):
    tuned = tuning.apply_plan(base, CASES[case])
    params = randomize_adapters(tuned.params)
    quantized = [p for p, x in flatten_dict(stacking.unstack(params)).items() if quant.is_quantized(x)]
    assert ("embed_tokens", "embedding") in quantized and ("layers_1", "mlp", "down_proj", "kernel") in quantized
    got, want = _logits(tuned, params), _logits(tuned, quant.dequantize_tree(params))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_dora_on_a_quantized_base_starts_equal_to_that_base(base):
    """DoRA's magnitude is the quantized kernel's column norm, as PEFT's DoRA on a bitsandbytes base takes it
    from the dequantized weight: at init the model is the base it trains on. It was the float32 kernel's norm
    (computed before the plan quantized it), about 3 % off the quantized base's logits."""
    quantized = tuning.apply_plan(base, tuning.freeze(quantize="nf4") + tuning.lora(4))  # lora_b = 0: the base
    dora = tuning.apply_plan(base, tuning.freeze(quantize="nf4") + tuning.dora(4))
    want = _logits(quantized, quantized.params)
    assert np.abs(_logits(dora, dora.params) - want).max() <= 1e-5 * np.abs(want).max()
    leaves = flatten_dict(stacking.unstack(dora.params))
    module = ("layers_0", "mlp", "down_proj")
    kernel = quant.dequantize(leaves[module + ("kernel",)], jnp.float32)
    np.testing.assert_allclose(np.asarray(leaves[module + ("magnitude",)]), np.linalg.norm(np.asarray(kernel), axis=0),
                               rtol=1e-6)


def test_an_int8_encoder_body_reads_like_its_dequantized_weights(tmp_path):
    """MiniLM-style BERT: word, position and token-type embeddings and every linear in int8."""
    tiny_hf_model("BertModel", tmp_path)
    tuned = tuning.apply_plan(hf.load_pretrained(tmp_path), tuning.freeze(quantize="int8") + tuning.lora(4)
                              + tuning.head("classification", 2, pooling="mean"))
    params = randomize_adapters(tuned.params)
    assert quant.is_quantized(params["embeddings"]["position_embeddings"]["embedding"])
    ids, segments = jnp.asarray(IDS % 90 + 1), jnp.ones(IDS.shape, jnp.int32)
    apply = jax.jit(lambda p: tuned.module.apply({"params": p}, input_ids=ids, segment_ids=segments))
    got, want = (np.asarray(apply(p)) for p in (params, quant.dequantize_tree(params)))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_backward_keeps_no_float_copy_of_the_quantized_weights(tmp_path, scan_layers):
    """The LoRA gradient of a quantized base compiles to temporaries far below the dense weights:
    autodiff would otherwise keep every dequantized kernel from the forward for the backward."""
    tiny_hf_model("LlamaForCausalLM", tmp_path, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)
    base = hf.load_pretrained(tmp_path, scan_layers=scan_layers)
    tuned = tuning.apply_plan(base, tuning.freeze(quantize="nf4") + tuning.lora(2))
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    ids = jnp.asarray(IDS[:1, :8])

    def loss(t, f):
        return tuned.module.apply({"params": tuning.combine(t, f)}, input_ids=ids).astype(jnp.float32).mean()

    compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile()
    dense = sum(x.size * 4 for x in jax.tree.leaves(frozen, is_leaf=quant.is_quantized) if quant.is_quantized(x))
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < dense / 3, (temp, dense)


def test_only_frozen_leaves_may_be_quantized(base):
    plan = tuning.freeze(quantize="nf4") + tuning.train(kinds=["mlp"])
    with pytest.raises(PlanError, match=r"plan rule #0 .*quantizes layers_0/mlp/\w+_proj/kernel as nf4.*trains it"):
        tuning.apply_plan(base, plan)
    with pytest.raises(PlanError, match="quantize must be one of int8, fp8, nf4, nf4_dq, got 'nf3'"):
        tuning.Plan.from_data([{"action": "freeze", "quantize": "nf3"}])
    with pytest.raises(PlanError, match="option\\(s\\) quantize do not apply to action 'lora'"):
        tuning.Plan.from_data([{"action": "lora", "quantize": "nf4"}])
    with pytest.raises(PlanError, match="quantizes no matrix"):
        tuning.apply_plan(base, tuning.freeze("norm", quantize="int8") + tuning.lora(4))
    loaded = dataclasses.replace(base, params=tuning.quantize_leaves(base.params, {("lm_head", "kernel"): "int8"}))
    with pytest.raises(PlanError, match="lm_head/kernel is loaded quantized .* cannot train it"):
        tuning.apply_plan(loaded, tuning.full())
    assert tuning.Plan.from_data([{"action": "freeze", "quantize": "nf4"}, {"preset": "lora"}]).to_data()[0] == \
        {"action": "freeze", "quantize": "nf4"}


def test_quantized_matrices_are_sharded_as_their_float_selves(tmp_path):
    """Under FSDP a quantized embedding, lm_head and MoE expert stack were replicated on every device (their
    codes matched no rule) or split on the dense MLP's axes: the rules for these matrices lacked the
    quantized parts that the family's q/k/v/MLP rules have."""
    from jaxtune.models import moe
    from jaxtune.training.sharding import MeshConfig, make_mesh, param_specs

    tiny_hf_model("LlamaForCausalLM", tmp_path, intermediate_size=128, tie_word_embeddings=False)
    pre = hf.load_pretrained(tmp_path)
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731

    def specs(tuned):
        tree = param_specs(tuned.params, mesh, tuned.partition_rules)
        return {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)[0]}

    dense = specs(tuning.apply_plan(pre, tuning.lora(4)))
    quantized = specs(tuning.apply_plan(pre, tuning.freeze(quantize="int8") + tuning.lora(4)))
    codes = {k.removesuffix(".codes"): v for k, v in quantized.items() if k.endswith(".codes")}
    assert {"['embed_tokens']['embedding']", "['lm_head']['kernel']"} <= set(codes)
    assert codes == {k: dense[k] for k in codes}
    experts = {"experts": {"gate_proj": {"kernel": quant.quantize(jnp.ones((8, 64, 128)), "int8", -2)}}}
    expert_mesh = make_mesh(MeshConfig(data=1, expert=8))
    assert jax.tree.leaves(param_specs(experts, expert_mesh, moe.PARTITION_RULES), is_leaf=is_spec)[0] == \
        jax.sharding.PartitionSpec("expert", "fsdp", "tensor")


def test_keep_quantized_needs_a_gguf_model(llama):
    from jaxtune.models.load import LoadError, load

    with pytest.raises(LoadError, match="model.keep_quantized: .* is not a GGUF model.*quantize: nf4"):
        load(str(llama), keep_quantized=True)


def test_qlora_exports_a_peft_adapter_and_a_dequantized_merge(base, llama, tmp_path):
    """The adapter of an NF4 run loads in peft on the dequantized HF model with jaxtune's logits;
    the merged export dequantizes the base and adds the adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = tuning.apply_plan(base, tuning.freeze(quantize="nf4") + tuning.lora(4, alpha=8))
    tuned = dataclasses.replace(tuned, params=randomize_adapters(tuned.params), step=1)
    ours = _logits(tuned, tuned.params)
    assert "nf4" in tuning.summary(tuned.params, tuned.labels)
    dequantized = {k: v for k, v in flatten_dict(quant.dequantize_tree(tuned.params)).items()
                   if k[-1] not in ("lora_a", "lora_b", "lora_scale")}
    hf.save_pretrained(unflatten_dict(dequantized), base.hf_config, tmp_path / "dequantized")
    tuning.export_peft(tuned, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized"),
                                           tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(peft_model, IDS), ours, atol=1e-4, rtol=0)
    tuning.export_merged(tuned, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(torch_logits(merged, IDS), ours, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_qlora_trains_under_fsdp_and_resumes_exactly(llama, tmp_path):
    """8 simulated devices, FSDP: the quantized kernels' codes and scales are split like the
    kernel, the LoRA run learns, and 2 + 2 resumed steps equal 4 uninterrupted ones."""
    from test_trainer import _loader, write_chat

    from jaxtune.training.config import CheckpointConfig, TrainConfig
    from jaxtune.training.optim import OptimizerConfig
    from jaxtune.training.sharding import MeshConfig, make_mesh
    from jaxtune.training.trainer import Trainer

    data = write_chat(tmp_path / "train.jsonl", 32)
    base = hf.load_pretrained(llama)

    def run(run_dir, steps):
        tuned = tuning.apply_plan(base, tuning.freeze(quantize="nf4") + tuning.lora(4, alpha=8))
        trainer = Trainer(tuned, train_data=_loader(data, train=True, batch=8),
                          optimizer=OptimizerConfig(learning_rate=3e-2, schedule="constant"),  # 2 + 2 steps = 4
                          config=TrainConfig(steps=steps, progress=False, log_every=1), run_dir=run_dir,
                          checkpoint=CheckpointConfig(every=2), mesh=make_mesh(MeshConfig(data=1, fsdp=8)))
        return trainer, trainer.fit()

    trainer, whole = run(tmp_path / "whole", 4)
    run_key = next(k for k in trainer.frozen if stacking.stack_range(k) is not None)  # the scanned run
    up = trainer.frozen[run_key]["mlp"]["up_proj"]["kernel"]
    # The layer axis stays whole; each layer's codes split over fsdp like the dense kernel would.
    assert quant.is_quantized(up) and tuple(up.codes.sharding.spec)[:2] == (None, "fsdp"), up.codes.sharding.spec
    assert "fsdp" not in tuple(up.scale.sharding.spec)  # one block of 64 rows: too few to split over 8
    run(tmp_path / "resumed", 2)
    _, resumed = run(tmp_path / "resumed", 4)
    assert resumed.step == whole.step == 4
    for a, b in zip(jax.tree.leaves(whole.model.params), jax.tree.leaves(resumed.model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_nf4_body_takes_under_0_3_of_its_bf16_bytes():
    import jaxtune

    base = jaxtune.load("SmolLM2-135M-Instruct", dtype="bfloat16")
    bf16 = tuning.nbytes(base.params)
    tuned = tuning.apply_plan(base, tuning.freeze(quantize="nf4") + tuning.lora(8))
    _, frozen = tuning.partition(tuned.params, tuned.labels)
    device_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))  # the device arrays themselves
    assert device_bytes <= 0.3 * bf16, (device_bytes, bf16)
    print(f"SmolLM2-135M frozen: nf4 {device_bytes / 1e6:.1f} MB vs bf16 {bf16 / 1e6:.1f} MB "
          f"({device_bytes / bf16:.3f}x)")


@pytest.mark.slow
def test_packaged_smollm2_gguf_trains_quantized_and_its_adapter_loads_in_peft(tmp_path):
    """Q4_1 weights stay Q4_1 (codes, fp16 scales and mins: no float copy), a LoRA run trains on
    them, and its adapter on the dequantized HF model in peft gives jaxtune's logits."""
    from peft import PeftModel
    from test_trainer import write_chat
    from transformers import AutoModelForCausalLM

    import jaxtune
    from jaxtune.data import LoaderConfig, read_source
    from jaxtune.training.config import TrainConfig
    from jaxtune.training.optim import OptimizerConfig
    from jaxtune.training.sharding import MeshConfig, make_mesh
    from jaxtune.training.trainer import Trainer

    base = jaxtune.load("SmolLM2-135M-Instruct", keep_quantized=True)
    up = stacking.unstack(base.params)["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert quant.is_quantized(up) and up.name == "q4_1" and up.codes.dtype == jnp.uint8
    assert up.scale.dtype == up.offset.dtype == jnp.float16
    tuned = tuning.apply_plan(base, tuning.lora(4, alpha=8, targets=["q_proj", "v_proj"]))
    data = read_source(write_chat(tmp_path / "train.jsonl", 16), "chat")
    trainer = Trainer(tuned, train_data=data, data=LoaderConfig(batch_size=2, max_length=48),
                      optimizer=OptimizerConfig(learning_rate=1e-2), config=TrainConfig(steps=3, progress=False),
                      run_dir=tmp_path / "run", mesh=make_mesh(MeshConfig(), jax.devices()[:1]))
    model = trainer.fit().model
    assert quant.is_quantized(stacking.unstack(model.params)["layers_0"]["mlp"]["up_proj"]["kernel"])
    assert np.abs(np.asarray(stacking.unstack(model.params)["layers_0"]["self_attn"]["q_proj"]["lora_b"])).max() > 0
    ours = _logits(model, model.params)
    tuning.export_peft(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.source),
                                           tmp_path / "adapter").eval()
    # float32 drift over 30 layers: torch's own float32 logits of this base are 9.5e-5 from its float64 ones,
    # jaxtune's 1.4e-4 (logits up to ~20), so an absolute 1e-4 alone sits on the edge; 1e-5 of the logit more.
    np.testing.assert_allclose(torch_logits(peft_model, IDS), ours, atol=1e-4, rtol=1e-5)
