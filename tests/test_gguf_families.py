"""gguf_to_hf on every llama.cpp architecture jaxtune reads besides dense llama (test_gguf): a tiny random
transformers model written as GGUF the way llama.cpp's converter (`convert_hf_to_gguf.py`) writes
it, converted back, loads into jaxtune with the original model's logits (fp32, within 1e-4).

The GGUF side follows llama.cpp's conventions, taken from the `gguf` package and the converter
rather than from the code under test: tensor names from `gguf.get_tensor_name_map`, metadata through
`GGUFWriter`'s own keys, Gemma's norm weights stored plus one, GPT-2's Conv1D weights transposed and
its embedding copied to `output.weight`, no Q/K permutation outside llama's converter (SmolLM3 uses it),
Phi-3's LongRoPE factors as the `rope_factors_long`/`rope_factors_short` tensors and its sliding window
0 when it has none, GPT-NeoX's fused `attn_qkv` rows regrouped from per head into `[q | k | v]`.
"""

from __future__ import annotations

import builtins
import math
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.core import unfreeze
from flax.traverse_util import flatten_dict
from helpers import llama_cpp_permute, randomize_weights, set_gguf_fp16_fields, tiny_bpe_tokenizer, torch_logits

import jaxtune.models.gguf
from jaxtune import tuning
from jaxtune.data.testing import tiny_tokenizer
from jaxtune.models import gguf_tokenizer, hf, quant, stacking
from jaxtune.models.gguf import GGUFError, gguf_to_hf
from jaxtune.models.gguf_export_vocabulary import add_vocabulary, read_vocabulary
from jaxtune.models.gguf_quantized import load_quantized
from jaxtune.tuning.labels import PROMPT_LEAF

gguf = pytest.importorskip("gguf")

TOL = 1e-4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
PHI3_IDS = dict(eos_token_id=2, pad_token_id=0)  # Phi3Config's defaults (32000) lie outside the tiny vocabulary
WINDOW = 4  # shorter than the input, so sliding layers differ from global ones
# case ("arch" or "arch-variant", arch a llama.cpp architecture) -> (transformers class, config overrides).
# Gemma 2/3 use query_pre_attn_scalar = head_dim, the scale llama.cpp applies below 27B (the file does not store it).
CASES = {
    "qwen2": ("Qwen2ForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    "qwen3": ("Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=32, attention_bias=True)),
    "gemma": ("GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=32)),
    "gemma2": ("Gemma2ForCausalLM", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3ForCausalLM", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
                                         layer_types=["sliding_attention"] * 2, rope_local_base_freq=10000.0,
                                         tie_word_embeddings=False)),
    "olmo2": ("Olmo2ForCausalLM", dict()),
    # top-2 of 4 experts; Qwen2-MoE with its sigmoid-gated shared expert, without renormalised weights
    "qwen2moe": ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=64, norm_topk_prob=False)),
    "qwen3moe": ("Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             norm_topk_prob=True)),
    # Llama 3.1/3.2's rope scaling, which llama.cpp's converter writes as per-frequency divisors (rope_freqs);
    # its 8 frequencies fall below, inside and above the smoothed band
    "llama-rope3": ("LlamaForCausalLM", dict(max_position_embeddings=1024, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256})),
    # Mixtral: llama.cpp's `llama` architecture with experts (Q/K permuted as for llama)
    "llama-moe": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    # 4 layers: the 4th skips RoPE (llama.cpp's fixed NoPE interval, transformers' default one)
    "smollm3": ("SmolLM3ForCausalLM", dict(num_hidden_layers=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "gpt2": ("GPT2LMHeadModel", dict()),
    # Phi-3-mini-4k's shape (a sliding window, full rotary, untied) and Phi-4-mini's (partial rotary, tied,
    # no window) with LongRoPE whose original length (8) is below the input's, so the long factors apply.
    "phi3": ("Phi3ForCausalLM", dict(sliding_window=WINDOW, **PHI3_IDS)),
    "phi3-longrope": ("Phi3ForCausalLM", dict(**PHI3_IDS,
        tie_word_embeddings=True, original_max_position_embeddings=8,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "long_factor": [1.5, 2.0, 3.0, 5.0], "short_factor": [1.0, 1.1, 1.2, 1.4]})),
    # Pythia's shape (parallel residual, a quarter of each head rotated) and the sequential residual with half
    # rotated at another base (which llama.cpp's converter leaves out; jaxtune's export writes it). llama.cpp's
    # gptneox computes GELU's tanh form, which the import reads the file as.
    "gptneox": ("GPTNeoXForCausalLM", dict(hidden_act="gelu_new")),
    "gptneox-sequential": ("GPTNeoXForCausalLM", dict(hidden_act="gelu_new", use_parallel_residual=False,
                                                      rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                                       "partial_rotary_factor": 0.5})),
}
CONFIGS = {"Gemma3ForCausalLM": "Gemma3TextConfig", "GPT2LMHeadModel": "GPT2Config"}
NEOX = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)
GPT2 = dict(vocab_size=128, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=96)
GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def tiny_model(name: str, **sizes: int) -> torch.nn.Module:
    """A random transformers model of the case (``sizes`` override its config), with norm weights off
    their init and projections of std 0.1."""
    architecture, overrides = CASES[name]
    kwargs = GPT2 if name == "gpt2" else {**(NEOX if name.startswith("gptneox") else TINY), **overrides, **sizes}
    config = getattr(transformers, CONFIGS.get(architecture, architecture.replace("ForCausalLM", "Config")))(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config).eval()
    randomize_weights(model, norm_offset=-0.5 if name.startswith("gemma") else 0.5,
                      is_norm=lambda param: "norm" in param or ".ln_" in param)
    return model


def llama3_frequency_divisors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's converter (`LlamaModel.generate_extra_tensors`): each rotary frequency's divisor under
    `llama3` rope scaling, float32."""
    orig, low, high, factor = (rope[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                 "high_freq_factor", "factor"))
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


# llama.cpp's Q4_K_M mix: Q6_K for the output layer and the MLP's down projections, Q4_K elsewhere
Q4_K_M = {"output": "Q6_K", "ffn_down": "Q6_K"}
# where each K-quant block keeps its fp16 super-block scales (d, and dmin where it has one)
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")  # written as random blocks: gguf-py encodes only the legacy types


def random_k_blocks(rows: int, columns: int, qtype: gguf.GGMLQuantizationType, seed: int) -> np.ndarray:
    """A ``(rows, columns)`` matrix as random K-quant blocks, uint8 ``(rows, bytes per row)``: gguf-py
    encodes only the legacy types, and any block bytes are a valid K-quant matrix. Every byte is drawn,
    then the super-block scales are set to small finite fp16 values (|w| stays below ~0.1)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.RandomState(seed)
    data = rng.randint(0, 256, (rows, columns // block, size)).astype(np.uint8)
    largest = {"Q6_K": 2e-5}.get(qtype.name, 1e-4)  # d x 6-bit scale x quant: Q6_K's int8 scales reach 127 x 32
    return set_gguf_fp16_fields(data, qtype.name, lambda shape: rng.uniform(0, largest, shape)).reshape(rows, -1)


def write_gguf(model: torch.nn.Module, case: str, path, quantized: str | None = None, tokenizer_dir=None) -> None:
    """Write ``model`` as an F32 GGUF of case ``case``'s llama.cpp architecture, as its converter would;
    ``quantized`` (a GGML type name, e.g. ``Q8_0``): its matrices (and expert stacks) in that type instead;
    ``tokenizer_dir``: the vocabulary of the tokenizer saved there as ``tokenizer.ggml.*`` (as the GGUF export
    writes it, whose keys tests/test_gguf_export.py and tests/test_real_models.py check against llama.cpp's).
    The K-quants (``Q4_K``, ``Q5_K``, ``Q6_K``, and ``Q4_K_M``: :data:`Q4_K_M`'s mix) write random blocks
    (:func:`random_k_blocks`) of each matrix's shape, not the model's weights."""
    cfg = model.config
    name = case.split("-")[0]
    writer = gguf.GGUFWriter(str(path), name)
    if name == "gpt2":
        writer.add_block_count(cfg.n_layer)
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.n_inner)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    elif name == "gptneox":  # the converter's keys (GPTNeoXModel.set_gguf_parameters)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        rope = cfg.rope_parameters
        writer.add_rope_dimension_count(int(rope["partial_rotary_factor"] * cfg.hidden_size // cfg.num_attention_heads))
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_parallel_residual(cfg.use_parallel_residual)
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
        if rope["rope_theta"] != 10000.0:
            writer.add_rope_freq_base(rope["rope_theta"])
    else:
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # The converter states the head size wherever the config has head_dim (every case here but Qwen2/OLMo 2),
        # and the rotary dimensions except for Gemma.
        if getattr(cfg, "head_dim", None) is not None and "head_dim" in cfg.to_diff_dict():
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
        if not name.startswith("gemma"):
            writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if name not in ("gemma", "gemma2"):
            writer.add_rope_freq_base(rope["rope_theta"])
        if rope["rope_type"] == "llama3":
            writer.add_tensor("rope_freqs.weight", llama3_frequency_divisors(rope, head_dim))
        if name == "phi3":
            writer.add_sliding_window(cfg.sliding_window or 0)  # the converter's 0: no window (Phi-4)
            writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
            if rope["rope_type"] == "longrope":
                scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
                writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(
                    cfg.original_max_position_embeddings)))
                writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
                writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
        if name in ("gemma2", "gemma3"):
            writer.add_sliding_window(cfg.sliding_window)
        if case.endswith("moe"):
            writer.add_expert_count(getattr(cfg, "num_experts", None) or cfg.num_local_experts)
            writer.add_expert_used_count(cfg.num_experts_per_tok)
        if name.endswith("moe"):  # Mixtral's experts are feed_forward_length wide
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
            if name == "qwen2moe":
                writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        if name == "gemma2":
            writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer_dir is not None:
        add_vocabulary(writer, read_vocabulary(tokenizer_dir, model.config.vocab_size), tokenizer_dir)

    def add(tensor_name: str, data: np.ndarray) -> None:
        if quantized and data.ndim >= 2:
            # "blk.0.ffn_down.weight" -> "ffn_down", "output.weight" -> "output"
            kind = Q4_K_M.get(tensor_name.split(".")[-2], "Q4_K") if quantized == "Q4_K_M" else quantized
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            if kind in K_QUANTS:
                blocks = random_k_blocks(math.prod(data.shape[:-1]), data.shape[-1], qtype,
                                         seed=zlib.crc32(tensor_name.encode()))
                writer.add_tensor(tensor_name, blocks.reshape(*data.shape[:-1], -1), raw_dtype=qtype)
            else:
                writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor_name, data)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, name.upper()), model.config.num_hidden_layers)
    tied = model.config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and (tied or name == "gpt2"):
            continue  # no output tensor for tied embeddings (GPT-2's is the embedding's copy, below)
        if ".mlp.experts." in hf_name:  # transformers' (experts, out, in) stacks, as llama.cpp stacks them
            layer = hf_name.split(".")[2]
            data = tensor.numpy().astype(np.float32)
            ff = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
            parts = ({"gate": data[:, :ff], "up": data[:, ff:]}
                     if hf_name.endswith("gate_up_proj") else {"down": data})
            for part, stack in parts.items():
                add(f"blk.{layer}.ffn_{part}_exps.weight", np.ascontiguousarray(stack))
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(stem)
        assert gguf_name is not None, hf_name
        data = tensor.numpy().astype(np.float32)
        if name.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1  # llama.cpp stores Gemma's (1 + w) gain
        if name in ("llama", "smollm3") and hf_name.endswith(("q_proj.weight", "k_proj.weight")):  # llama's converter
            heads = cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads
            data = llama_cpp_permute(data, heads)
        if name == "gpt2" and hf_name.endswith(GPT2_CONV1D):
            data = np.ascontiguousarray(data.T)  # Conv1D (in, out) -> llama.cpp's (out, in)
        if name == "gptneox" and gguf_name.endswith("attn_qkv"):  # the converter's [q | k | v] rows, from per-head
            heads = cfg.num_attention_heads
            data = np.concatenate([data.reshape(heads, 3, -1, *data.shape[1:])[:, i].reshape(-1, *data.shape[1:])
                                   for i in range(3)])
        if gguf_name.endswith("ffn_gate_inp_shexp"):
            data = data.reshape(-1)  # llama.cpp's shape for it: (hidden,)
        add(f"{gguf_name}.{suffix}", data)
        if name == "gpt2" and gguf_name == "token_embd":
            writer.add_tensor("output.weight", data)  # the converter copies the tied embedding
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_model_has_the_original_logits(name, tmp_path):
    model = tiny_model(name)
    write_gguf(model, name, tmp_path / "tiny.gguf")
    out = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    loaded = hf.load_pretrained(out)
    assert loaded.architecture == CASES[name][0]
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids = np.random.RandomState(1).randint(0, 128, (2, 12)).astype(np.int32)
    ours = np.asarray(loaded.module.apply({"params": loaded.params}, ids))
    np.testing.assert_allclose(ours, torch_logits(model, ids), atol=TOL, rtol=0)


# (case, the type its matrices are written in): gguf-py quantizes the legacy types only (the K-quants:
# random blocks, further below)
QUANTIZED_CASES = [("phi3", "Q8_0"), ("phi3-longrope", "Q4_1"), ("qwen3", "Q5_0"), ("smollm3", "Q5_1"),
                   ("qwen2moe", "Q8_0"), ("qwen3moe", "Q4_0"), ("llama-moe", "Q5_1"), ("gptneox", "Q8_0")]


@pytest.mark.parametrize("name,qtype", QUANTIZED_CASES)
def test_quantized_load_keeps_the_blocks_and_equals_the_dequantized_model(name, qtype, tmp_path):
    """``load_quantized`` reads the quantized matrices as quantized leaves (Phi-3's fused qkv_proj and
    gate_up_proj, and every layer's stack of experts, too), and the model's logits equal the dequantized
    conversion's (fp32)."""
    write_gguf(tiny_model(name), name, tmp_path / "tiny.gguf", quantized=qtype)
    out = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    dense = hf.load_pretrained(out)
    kept = load_quantized(tmp_path / "tiny.gguf", out)
    leaves = flatten_dict(unfreeze(kept.params))
    fused = [k for k in leaves if k[-2:] in [(m, "kernel") for m in ("qkv_proj", "gate_up_proj", "q_proj",
                                                                       "query_key_value")]]
    experts = [k for k in leaves if "experts" in k and k[-1] == "kernel"]
    assert fused and all(quant.is_quantized(leaves[k]) for k in fused + experts)
    assert len(experts) == (3 if name.endswith("moe") else 0)
    ids = np.random.RandomState(1).randint(0, 128, (2, 12)).astype(np.int32)
    ours = np.asarray(kept.module.apply({"params": kept.params}, ids))
    ref = np.asarray(dense.module.apply({"params": dense.params}, ids))
    np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_one_parse_of_the_file_converts_it_and_reads_its_quantized_tensors(tmp_path, monkeypatch):
    """keep_quantized's first load: the reader that converts the file (without weights) is the one that reads its
    quantized tensors, so the file is parsed once (seconds for a large vocabulary; it was parsed twice), and the
    params are those of a load that parses it again."""
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_model("qwen3"), "qwen3", path, quantized="Q8_0")
    again = load_quantized(path, gguf_to_hf(path, tmp_path / "again", weights=False))
    parses = []
    parse = gguf.GGUFReader.__init__

    def counted(self, *args, **kwargs):  # the package's reader and jaxtune's subclass of it alike
        parses.append(args)
        parse(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counted)
    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path / "cache"))
    kept = jaxtune.load(str(path), keep_quantized=True)
    assert len(parses) == 1
    for ours, want in zip(jax.tree.leaves(kept.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(want))


# K-quant blocks hold 256 weights: matrices whose rows (hidden, MLP width, heads x head_dim) are whole blocks
K_SIZES = dict(hidden_size=256, intermediate_size=256)
K_CASES = [("qwen3", "Q4_K_M"), ("phi3", "Q4_K_M"), ("smollm3", "Q6_K"), ("olmo2", "Q5_K")]


@pytest.mark.parametrize("name,qtype", K_CASES)
def test_k_quant_files_load_as_blocks_and_equal_the_dequantized_model(name, qtype, tmp_path):
    """A file in llama.cpp's K-quants (the Q4_K_M mix: Q6_K output and down projections, Q4_K
    elsewhere) loads every matrix as a quantized leaf in its own type, through Phi-3's fused qkv and
    SmolLM3's permuted Q/K too, with the logits of the conversion the gguf package dequantizes (fp32)."""
    sizes = {**K_SIZES, "head_dim": 64} if name == "qwen3" else K_SIZES  # its case's head_dim 32 makes o_proj 128 wide
    write_gguf(tiny_model(name, **sizes), name, tmp_path / "tiny.gguf", quantized=qtype)
    out = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    dense = hf.load_pretrained(out)
    kept = load_quantized(tmp_path / "tiny.gguf", out)
    leaves = flatten_dict(unfreeze(kept.params))
    matrices = [k for k in leaves if k[-1] in ("kernel", "embedding")]
    assert matrices and all(quant.is_quantized(leaves[k]) for k in matrices)
    kinds = {k: leaves[k].name for k in matrices}
    down = [k for k in kinds if "down_proj" in k or k[0] == "lm_head"]
    expected = {"Q4_K_M": ("q4_k", "q6_k"), "Q6_K": ("q6_k",) * 2, "Q5_K": ("q5_k",) * 2}[qtype]
    assert {kinds[k] for k in kinds if k not in down} == {expected[0]}
    assert {kinds[k] for k in down} == {expected[1]}
    ids = np.random.RandomState(1).randint(0, 128, (2, 12)).astype(np.int32)
    ours = np.asarray(kept.module.apply({"params": kept.params}, ids))
    ref = np.asarray(dense.module.apply({"params": dense.params}, ids))
    assert np.isfinite(ref).all() and np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_phi3_with_one_longrope_factor_tensor_is_refused(tmp_path):
    model = tiny_model("phi3-longrope")
    write_gguf(model, "phi3-longrope", tmp_path / "full.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "full.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "one.gguf"), "phi3")
    for field in reader.fields.values():
        if field.name.startswith("phi3.") and field.types[0] != gguf.GGUFValueType.ARRAY:
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for tensor in reader.tensors:
        if tensor.name != "rope_factors_short.weight":
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="one.gguf: LongRoPE needs both 'rope_factors_long.weight' and"):
        gguf_to_hf(tmp_path / "one.gguf", tmp_path / "hf")


def test_llama3_rope_file_converts_to_a_directory_transformers_reads_with_the_original_logits(tmp_path):
    """The per-frequency divisors become transformers' longrope with equal factor lists and attention
    factor 1, which transformers itself computes as the original llama3 rope (at lengths past the
    original context as well)."""
    model = tiny_model("llama-rope3")
    write_gguf(model, "llama-rope3", tmp_path / "rope3.gguf")
    out = gguf_to_hf(tmp_path / "rope3.gguf", tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.RandomState(2).randint(0, 128, (1, 300)).astype(np.int32)  # past the original 256
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(model, ids), atol=TOL, rtol=0)


def test_plans_on_a_kept_quantized_base_prompt_requantize_and_untie(tmp_path):
    """On a GGUF base loaded with keep_quantized: prompt tuning starts from the quantized embedding's rows
    (it failed on the QuantizedArray); a quantize rule keeps the file's own format where a matrix is loaded
    quantized (it failed with an AttributeError naming nothing); and a PEFT adapter that trains the tied
    lm_head (modules_to_save) imports with peft's logits on the dequantized model (``.T`` of a QuantizedArray)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jaxtune.tuning.peft_import import load_peft

    write_gguf(tiny_model("qwen3"), "qwen3", tmp_path / "tiny.gguf", quantized="Q8_0")
    out = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    kept = load_quantized(tmp_path / "tiny.gguf", out)
    ids = np.random.RandomState(1).randint(0, 128, (2, 12)).astype(np.int32)
    base = np.asarray(kept.module.apply({"params": kept.params}, ids))

    prompted = tuning.apply_plan(kept, tuning.prompt_tuning(4, init="text", text="a b"), tokenizer=tiny_tokenizer())
    embedding = quant.dequantize(kept.params["embed_tokens"]["embedding"], jnp.float32)
    text_ids = tiny_tokenizer()("a b")["input_ids"]
    np.testing.assert_array_equal(np.asarray(prompted.params[PROMPT_LEAF]),
                                  np.asarray(embedding)[(text_ids * 4)[:4]])

    requantized = tuning.apply_plan(kept, tuning.freeze(quantize="nf4") + tuning.lora(4))
    leaves = flatten_dict(unfreeze(stacking.unstack(requantized.params)))
    assert leaves[("layers_0", "mlp", "down_proj", "kernel")].name == "q8_0"
    np.testing.assert_allclose(np.asarray(requantized.module.apply({"params": requantized.params}, ids)), base,
                               atol=1e-5 * np.abs(base).max(), rtol=0)  # lora_b = 0: the base as loaded

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                        init_lora_weights=False)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(out), config).eval()
    reference.save_pretrained(tmp_path / "adapter")
    imported = load_peft(kept, tmp_path / "adapter")
    ours = np.asarray(imported.module.apply({"params": imported.params}, ids))
    np.testing.assert_allclose(ours, torch_logits(reference, ids), atol=1e-4, rtol=0)


# case -> the tokenizer its tiny GGUF carries: a byte-level BPE split as a real family's (tiny_bpe_tokenizer's
# "qwen2" or GPT-2's), or SentencePiece-style (Mistral's vocabulary with Llama 2's normalizer, as llama.cpp tokenizes
# a `llama` vocabulary; Gemma's)
VOCABULARIES = {"olmo2": "gpt2", "qwen2moe": "qwen2", "qwen3moe": "qwen2", "smollm3": "gpt2", "llama-moe": "legacy",
                "gemma": "gemma"}
# the architectures whose files transformers' GGUF loader (5.25) refuses ("... is not supported yet"); its generic
# fast tokenizer reads their vocabulary
NOT_IN_TRANSFORMERS = ("olmo2", "smollm3", "gemma")
TEXTS = ["hello world 42", "the  quick\n\nfox 2024!", "héllo wörld ✓ 日本"]


@pytest.fixture(scope="module", params=sorted(VOCABULARIES))
def with_vocabulary(request, tmp_path_factory):
    """(case, its original tokenizer, a tiny GGUF of the case carrying that tokenizer's vocabulary, the file's
    conversion without weights)."""
    from test_gguf_export import sentencepiece_style_tokenizer

    case, root = request.param, tmp_path_factory.mktemp(request.param)
    style = VOCABULARIES[case]
    original = sentencepiece_style_tokenizer(style) if style in ("legacy", "gemma") else tiny_bpe_tokenizer(style)
    original.save_pretrained(root / "tokenizer")
    path = root / "tiny.gguf"
    write_gguf(tiny_model(case, vocab_size=len(original)), case, path, tokenizer_dir=root / "tokenizer")
    return case, original, path, gguf_to_hf(path, root / "hf", weights=False)


def test_the_converted_tokenizer_encodes_as_transformers_reads_the_file(with_vocabulary):
    """jaxtune's tokenizer of an OLMo 2 / Qwen2-MoE / Qwen3-MoE / SmolLM3 / Mixtral / Gemma GGUF gives the ids
    transformers' GGUF tokenizer gives on the file (its generic class where AutoTokenizer refuses the
    architecture), and the original tokenizer's: spaces, digits, non-ASCII text and the chat template's output."""
    case, original, path, out = with_vocabulary
    ours = transformers.AutoTokenizer.from_pretrained(out)
    assert ours.chat_template == original.chat_template
    texts = [*TEXTS, original.apply_chat_template([{"role": "user", "content": "hi 42 <think>"}], tokenize=False)]
    if case in NOT_IN_TRANSFORMERS:
        with pytest.raises(ValueError, match=f"architecture {case} is not supported"):
            transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        reference = transformers.PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    else:
        reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    want = [original(t)["input_ids"] for t in texts]
    assert [ours(t)["input_ids"] for t in texts] == want
    theirs = [reference(t)["input_ids"] for t in texts]
    if VOCABULARIES[case] == "legacy":
        # llama.cpp puts a "▁" after each special token, as Llama 2's normalizer (and jaxtune's reader) does;
        # transformers rebuilds Mistral's Metaspace, which puts none after the chat's <s><s> (docs/cli.md)
        assert want[-1][2] == original.convert_tokens_to_ids("▁")
        want[-1] = want[-1][:2] + want[-1][3:]
    assert theirs == want


def without_transformers_gguf_tokenizer(monkeypatch, replacement: types.ModuleType | None = None) -> None:
    """jaxtune's imports of transformers' private ``transformers.integrations.gguf`` fail (an ImportError), or get
    ``replacement``; transformers' own imports of it (AutoTokenizer's GGUF loading) are left alone."""
    real_import = builtins.__import__

    def fake_import(name, globals=None, *args, **kwargs):
        if name == "transformers.integrations.gguf" and (globals or {}).get("__name__") == gguf_tokenizer.__name__:
            if replacement is None:
                raise ImportError(f"cannot import name from {name} (removed by the test)")
            return replacement
        return real_import(name, globals, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_without_transformers_private_gguf_functions_the_same_tokenizer_files_are_written(with_vocabulary, tmp_path,
                                                                                          monkeypatch, caplog):
    """Where transformers' private GGUF tokenizer functions are gone, the conversion reads the tokenizer with
    AutoTokenizer (the generic class where that refuses the architecture) and writes the same bytes, saying so once."""
    _, _, path, fast = with_vocabulary
    without_transformers_gguf_tokenizer(monkeypatch)
    assert_same_tokenizer_files(gguf_to_hf(path, tmp_path / "slow", weights=False), fast, path, caplog)


def assert_same_tokenizer_files(slow, fast, path, caplog) -> None:
    """The conversions ``slow`` (the public path) and ``fast`` of ``path`` wrote the same tokenizer files, and the
    slow one said once why."""
    warnings = [r.getMessage() for r in caplog.records if r.name == gguf_tokenizer.__name__]
    assert len(warnings) == 1 and "fast path is unavailable" in warnings[0] and str(path) in warnings[0]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (slow / name).read_bytes() == (fast / name).read_bytes(), name


@pytest.mark.parametrize("change", ["signature", "mapping"])
def test_changed_transformers_gguf_functions_fall_back_to_the_public_reader(change, with_vocabulary, tmp_path,
                                                                            monkeypatch, caplog):
    """A transformers whose ``convert_gguf_tokenizer`` takes other arguments (TypeError) or whose
    ``GGUF_TOKENIZER_MAPPING`` has other groups (KeyError) gets the public path's files too."""
    import transformers.integrations.gguf as private

    _, _, path, fast = with_vocabulary
    changed = types.ModuleType("transformers.integrations.gguf")
    changed.GGUF_TOKENIZER_MAPPING = (private.GGUF_TOKENIZER_MAPPING if change == "signature"
                                      else {"tokenizer": private.GGUF_TOKENIZER_MAPPING["tokenizer"]})
    changed.convert_gguf_tokenizer = ((lambda tokenizer_dict: None) if change == "signature"
                                      else private.convert_gguf_tokenizer)
    without_transformers_gguf_tokenizer(monkeypatch, changed)
    assert_same_tokenizer_files(gguf_to_hf(path, tmp_path / "slow", weights=False), fast, path, caplog)
