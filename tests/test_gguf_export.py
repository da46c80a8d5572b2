"""The GGUF export: a LoRA-tuned tiny Llama / Mistral / Qwen2 / Qwen3 / GPT-2 / Gemma 2 / Gemma 3 / Phi-3 written as
one .gguf file, which
transformers' GGUF loader (the reference reader of llama.cpp's format) and jaxtune's own importer load with the merged
model's logits and the original tokenizer's token ids, chat template included."""

from __future__ import annotations

import dataclasses
import json

import gguf
import ml_dtypes  # noqa: F401 - np.dtype("bfloat16")
import numpy as np
import pytest
import torch
import transformers
from helpers import tiny_bpe_tokenizer, tiny_hf_model
from safetensors.numpy import load_file
from test_gemma import tiny_gemma
from test_gpt2 import tiny_gpt2
from test_phi3 import longrope, tiny_phi3
from test_tuning_lora import forward, randomize_adapters
from tokenizers import Tokenizer, models
from transformers.integrations.gguf import get_gguf_tokenizer

from jaxtune import tuning
from jaxtune.data.testing import tiny_tokenizer
from jaxtune.models import hf
from jaxtune.models.gguf import gguf_to_hf
from jaxtune.models.gguf_architectures import Metadata
from jaxtune.models.gguf_tokenizer import tokenizer_fields, transformers_tokenizer
from jaxtune.tuning import ExportError

TOL = 1e-4
VOCAB = 320  # the tokenizer's 301 ids, then ids the model has and the tokenizer does not ([PAD<id>] in GGUF)
IDS = np.random.RandomState(0).randint(0, VOCAB, (1, 11)).astype(np.int32)
TEXTS = ["the quick brown fox 12345", "  hello   world\n\nok?", "don't <think> 7 x"]
# transformers' GGUF loader reads neither Gemma's attention scalar, soft-caps and local RoPE base nor Phi-3's window,
# partial rotary and LongRoPE: these families keep its defaults here (heads 256 wide, as query_pre_attn_scalar's
# default says; Gemma 2's caps 50 and 30; Gemma 3's every 6th layer global); the rest goes through jaxtune's
# importer (test_gemma_and_phi3_settings_transformers_does_not_read_round_trip).
GEMMA = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=4)
FAMILIES = {"llama": ("LlamaForCausalLM", "smollm", {}),
            # Mistral v0.2+ (no window; v0.1's: test_a_window_llama_cpp_does_not_apply_...), llama.cpp's `llama`
            "mistral": ("MistralForCausalLM", "smollm", dict(sliding_window=None)),
            "qwen2": ("Qwen2ForCausalLM", "qwen2", dict(tie_word_embeddings=True)),
            "qwen3": ("Qwen3ForCausalLM", "qwen2", {}),  # transformers reads a Qwen3 GGUF's heads as 128 wide
            # transformers reads a GPT-2 GGUF's positions as 1024, its MLP as 4 * n_embd
            # (test_gpt2_sizes_transformers_does_not_read_round_trip)
            "gpt2": ("GPT2LMHeadModel", "gpt2", dict(n_positions=1024)),
            "gemma2": ("Gemma2ForCausalLM", "smollm", GEMMA),
            "gemma3": ("Gemma3ForCausalLM", "smollm", dict(GEMMA, num_hidden_layers=6)),
            "phi3": ("Phi3ForCausalLM", "smollm", dict(num_key_value_heads=2, tie_word_embeddings=False))}

# llama.cpp's names (`tokenizer.ggml.pre`) of the pre-tokenizers of tiny_bpe_tokenizer: llama.cpp 0.3.36 refuses to
# load a file naming another (llama-vocab.cpp: "unknown pre-tokenizer type: 'gpt2'"; GPT-2's split is "gpt-2")
LLAMA_CPP_PRE = {"smollm": "smollm", "qwen2": "qwen2", "gpt2": "gpt-2"}


def source(root, family: str):
    architecture, pre, overrides = FAMILIES[family]
    tiny_model(architecture, root, VOCAB, **overrides)
    tiny_bpe_tokenizer(pre).save_pretrained(root)
    return root


def tiny_model(architecture: str, root, vocab_size: int, **overrides):
    """A tiny random transformers ``architecture`` saved to ``root``, every weight drawn afresh (norm gains too)."""
    if architecture == "GPT2LMHeadModel":
        return tiny_gpt2(root, vocab_size=vocab_size, **overrides)
    if architecture.startswith("Gemma"):
        return tiny_gemma(architecture, root, vocab_size=vocab_size, **overrides)
    if architecture == "Phi3ForCausalLM":
        return tiny_phi3(root, vocab_size=vocab_size, **overrides)
    return tiny_hf_model(architecture, root, randomize=True, vocab_size=vocab_size, **overrides)


def assert_read_back(back, merged, gemma: bool = False) -> None:
    """jaxtune's importer gives back the merged export's tensors exactly (llama's Q/K permutation undone); Gemma's
    norm gains as llama.cpp's converter stores them, ``w + 1`` in float32, minus 1."""
    expected, found = load_file(merged / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(found) == sorted(expected)
    for name, value in expected.items():
        if gemma and name.endswith("norm.weight"):
            value = (value + np.float32(1)) - np.float32(1)
        np.testing.assert_array_equal(found[name], value, err_msg=name)


def tuned_model(root, plan=None) -> tuning.Tuned:
    """LoRA on every linear layer, its B matrices moved off zero (a trained adapter), at step 1."""
    tuned = tuning.apply_plan(hf.load_pretrained(root), plan or tuning.lora(rank=4, alpha=8))
    return dataclasses.replace(tuned, params=randomize_adapters(tuned.params), step=1)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.float().numpy()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_and_jaxtune_load_the_gguf_as_the_merged_model(family, tmp_path):
    tuned = tuned_model(source(tmp_path / "base", family))
    out = tuning.export(tuned, tmp_path / "gguf", format="gguf")
    assert out == tmp_path / "gguf" / "model.gguf" and sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
    assert gguf.GGUFReader(out).fields["general.name"].contents() == "base"  # the base model's name
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == LLAMA_CPP_PRE[FAMILIES[family][1]]

    ours = np.asarray(forward(tuned.module, tuned.params, IDS, np.ones_like(IDS)))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    np.testing.assert_allclose(torch_logits(loaded), ours, atol=TOL, rtol=0)

    original = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    chat = original.apply_chat_template([{"role": "user", "content": "hi 42 <think>"}], tokenize=False,
                                        add_generation_prompt=True)
    texts = [*TEXTS, chat]
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert gguf_tokenizer.chat_template == original.chat_template
    assert gguf_tokenizer.eos_token == original.eos_token and gguf_tokenizer.pad_token == original.pad_token
    assert [gguf_tokenizer(t)["input_ids"] for t in texts] == [original(t)["input_ids"] for t in texts]

    back = gguf_to_hf(out, tmp_path / "back")
    merged = tuning.export_merged(tuned, tmp_path / "merged", dtype="float32")
    assert_read_back(back, merged, gemma=family.startswith("gemma"))

    # gguf_to_hf's tokenizer, built from the fields its reader parsed, is the one AutoTokenizer builds from the file
    # (transformers' private GGUF tokenizer functions it uses, checked: a transformers that moves them fails here)
    meta = Metadata(gguf.GGUFReader(out), out)
    assert tokenizer_fields(meta) == get_gguf_tokenizer(str(out))
    rebuilt = transformers_tokenizer(meta, transformers.AutoConfig.from_pretrained(back))
    assert type(rebuilt) is type(gguf_tokenizer)
    assert rebuilt.backend_tokenizer.to_str() == gguf_tokenizer.backend_tokenizer.to_str()
    for flag in ("add_bos_token", "add_eos_token"):
        assert getattr(rebuilt, flag) == getattr(gguf_tokenizer, flag)
    imported = transformers.AutoTokenizer.from_pretrained(back)
    assert imported.chat_template == original.chat_template
    assert [imported(t)["input_ids"] for t in texts] == [original(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("dtype,kind", [("float16", "F16"), ("bfloat16", "BF16"), ("q8_0", "Q8_0")])
def test_dtypes(dtype, kind, tmp_path):
    """Matrices in the dtype asked for (the float32 merge rounded once; Q8_0: llama.cpp's 8-bit blocks of
    it), norms float32, as llama.cpp stores them."""
    tuned = tuned_model(source(tmp_path / "base", "llama"))
    out = tuning.export(tuned, tmp_path / "model.gguf", format="gguf", dtype=dtype)
    reference = {t.name: t for t in gguf.GGUFReader(tuning.export(tuned, tmp_path / "f32.gguf", format="gguf",
                                                                  dtype="float32")).tensors}
    for tensor in gguf.GGUFReader(out).tensors:
        want = np.asarray(reference[tensor.name].data, np.float32)
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        rounded = want if kind == "Q8_0" else want.astype(np.dtype(dtype)).astype(np.float32)
        if want.ndim == 1:  # a norm's values in the dtype asked for, stored float32
            assert tensor.tensor_type.name == "F32"
            np.testing.assert_array_equal(got, rounded, err_msg=tensor.name)
            continue
        assert tensor.tensor_type.name == kind, tensor.name
        if kind != "Q8_0":  # the float32 merge rounded once
            np.testing.assert_array_equal(got, rounded, err_msg=tensor.name)
        else:  # llama.cpp's blocks (the gguf package's reference quantizer) of the float32 merge
            q8 = gguf.GGMLQuantizationType.Q8_0
            np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(want, q8), q8),
                                          err_msg=tensor.name)
    file_type = gguf.GGUFReader(out).fields["general.file_type"].contents()
    assert file_type == {"F16": 1, "BF16": 32, "Q8_0": 7}[kind]


# What llama.cpp's gemma2 / gemma3 / phi3 cannot compute (its converter writes such a model all the same).
FAMILY_REFUSALS = [
    ("Gemma2ForCausalLM", dict(GEMMA, attn_logit_softcapping=None),
     "Gemma 2 without attn_logit_softcapping has no GGUF export; llama.cpp's gemma2 always soft-caps"),
    ("Gemma2ForCausalLM", dict(GEMMA, tie_word_embeddings=False), "Gemma 2 with tie_word_embeddings false"),
    ("Gemma2ForCausalLM", dict(sliding_window=4, query_pre_attn_scalar=24),
     r"Gemma 2 query_pre_attn_scalar 24 has no GGUF export; llama.cpp scales attention by 32 \*\* -0.5 for 2 layers"),
    ("Gemma3ForCausalLM", dict(GEMMA, layer_types=["sliding_attention", "full_attention"]),
     r"layer_types \['sliding_attention', 'full_attention'\] has no GGUF export; llama.cpp's gemma3 slides every "
     r"layer but each 6th \(sliding_attention at layers \[0, 1\]\)"),
    # a window no shorter than the context (256) binds no layer, but Gemma 3's layer types pick each one's RoPE base
    ("Gemma3ForCausalLM", dict(GEMMA, sliding_window=256, layer_types=["full_attention", "sliding_attention"]),
     r"layer_types \['full_attention', 'sliding_attention'\] has no GGUF export"),
    ("Gemma3ForCausalLM", dict(GEMMA, rope_local_base_freq=100.0),
     "Gemma 3 sliding-window layers' RoPE .* has no GGUF export; llama.cpp's gemma3 rotates them unscaled at base "
     "10000"),
    ("Gemma3ForCausalLM", dict(GEMMA, attention_bias=True), "Gemma 3 with attention_bias has no GGUF export"),
    ("Phi3ForCausalLM", dict(sliding_window=8, rope_parameters=longrope(8)),
     r"Phi-3 with LongRoPE and a sliding_window \(8\) shorter than its max_position_embeddings has no GGUF export"),
    ("Gemma3ForCausalLM", dict(GEMMA, hidden_activation="gelu"),  # exact GELU: jaxtune trains it, llama.cpp has tanh's
     "Gemma 3 hidden_activation 'gelu' has no GGUF export; llama.cpp computes gelu_pytorch_tanh"),
    ("Gemma2ForCausalLM", dict(GEMMA, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "RoPE scaling 'linear' has no GGUF export here"),
]


def test_what_has_no_gguf_form_is_refused_before_writing(tmp_path):
    base = source(tmp_path / "base", "llama")
    cases = [
        (tuned_model(base, tuning.prompt_tuning(2)), "prompt tuning has no GGUF form"),
        (tuned_model(base, tuning.lora(rank=2) + tuning.head(num_labels=2)), "a classifier head has no GGUF form"),
    ]
    tiny_gemma("GemmaForCausalLM", tmp_path / "gemma", vocab_size=VOCAB)
    tiny_bpe_tokenizer().save_pretrained(tmp_path / "gemma")
    cases.append((tuned_model(tmp_path / "gemma"), "GemmaForCausalLM has no GGUF export; supported: "
                                                   "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                                                   "Qwen3ForCausalLM, GPT2LMHeadModel, Gemma2ForCausalLM, "
                                                   "Gemma3ForCausalLM, Phi3ForCausalLM"))
    for name, overrides, message in [
            ("relu", dict(activation_function="relu"), "GPT-2 activation_function 'relu' has no GGUF export"),
            ("unscaled", dict(scale_attn_weights=False), "GPT-2 attention scaled other than by 1/sqrt.head_dim.")]:
        tiny_gpt2(tmp_path / name, vocab_size=VOCAB, **overrides)
        tiny_bpe_tokenizer("gpt2").save_pretrained(tmp_path / name)
        cases.append((tuned_model(tmp_path / name), message))
    for i, (architecture, overrides, message) in enumerate(FAMILY_REFUSALS):
        tiny_model(architecture, tmp_path / f"family{i}", VOCAB, **overrides)
        tiny_bpe_tokenizer().save_pretrained(tmp_path / f"family{i}")
        cases.append((tuned_model(tmp_path / f"family{i}"), message))
    tiny_hf_model("LlamaForCausalLM", tmp_path / "chars")
    tiny_tokenizer().save_pretrained(tmp_path / "chars")
    cases.append((tuned_model(tmp_path / "chars"), "a WordLevel tokenizer; the GGUF export writes byte-level BPE"))
    # a BPE with byte fallback but no "▁" for spaces: llama.cpp's SentencePiece would prefix and replace them
    tiny_hf_model("LlamaForCausalLM", tmp_path / "spm")
    spm = Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], unk_token="<unk>", byte_fallback=True))
    transformers.PreTrainedTokenizerFast(tokenizer_object=spm).save_pretrained(tmp_path / "spm")
    cases.append((tuned_model(tmp_path / "spm"), "a SentencePiece-style BPE whose normalizer null and pre-tokenizer"))
    tiny_hf_model("LlamaForCausalLM", tmp_path / "unigram")
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0, byte_fallback=True))
    transformers.PreTrainedTokenizerFast(tokenizer_object=unigram).save_pretrained(tmp_path / "unigram")
    cases.append((tuned_model(tmp_path / "unigram"), "a Unigram tokenizer; the GGUF export writes byte-level BPE"))
    for tuned, message in cases:
        with pytest.raises(ExportError, match=message):
            tuning.export(tuned, tmp_path / "out", format="gguf")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,dtype", [("llama", None), ("gpt2", "bfloat16"), ("gemma3", "q8_0")])
def test_the_export_converts_the_merged_params_in_memory(family, dtype, tmp_path, monkeypatch):
    """The file holds what the merged export's directory converts to (Q8_0 from the float32 merge), the same
    metadata and the same tensors bit for bit (in the params' order, not the directory's), written without
    that directory: no merged copy of the model on disk beside the file."""
    from jaxtune.models import hf
    from jaxtune.models.gguf_export import hf_to_gguf

    tuned = tuned_model(source(tmp_path / "base", family))
    merged = tuning.export_merged(tuned, tmp_path / "merged", dtype="float32" if dtype == "q8_0" else dtype)
    converted = hf_to_gguf(merged, tmp_path / "converted.gguf", dtype, name="base")

    def no_directory(*args, **kwargs):
        raise AssertionError("the GGUF export wrote a merged directory")

    monkeypatch.setattr(hf, "save_pretrained", no_directory)
    out = tuning.export(tuned, tmp_path / "out", format="gguf", dtype=dtype)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
    ours, theirs = gguf.GGUFReader(out), gguf.GGUFReader(converted)
    assert {k: f.contents() for k, f in ours.fields.items()} == {k: f.contents() for k, f in theirs.fields.items()}
    expected = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(expected)
    for tensor in ours.tensors:
        assert tensor.tensor_type == expected[tensor.name].tensor_type, tensor.name
        np.testing.assert_array_equal(tensor.data, expected[tensor.name].data, err_msg=tensor.name)


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path):
    tuned = tuned_model(source(tmp_path / "base", "qwen2"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.gguf").write_bytes(b"mine")
    with pytest.raises(ExportError, match="model.gguf: exists; .* overwrite=True"):
        tuning.export(tuned, tmp_path / "out", format="gguf")
    assert (tmp_path / "out" / "model.gguf").read_bytes() == b"mine"
    out = tuning.export(tuned, tmp_path / "out", format="gguf", overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "qwen2"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.gguf"]  # no temporary folder left
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="notes.txt: a file, not a directory or a .gguf path"):
        tuning.export(tuned, tmp_path / "notes.txt", format="gguf", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_llama_attention_biases_round_trip_through_jaxtunes_importer(tmp_path):
    """transformers' GGUF loader builds a Llama without biases, llama.cpp reads them: Q/K biases get the
    rows' rotary permutation, which jaxtune's importer (llama.cpp's convention) undoes exactly."""
    tiny_hf_model("LlamaForCausalLM", tmp_path / "base", randomize=True, vocab_size=VOCAB, attention_bias=True)
    tiny_bpe_tokenizer("smollm").save_pretrained(tmp_path / "base")
    tuned = tuned_model(tmp_path / "base")
    out = tuning.export(tuned, tmp_path / "model.gguf", format="gguf")
    assert "blk.0.attn_q.bias" in {t.name for t in gguf.GGUFReader(out).tensors}
    assert_read_back(gguf_to_hf(out, tmp_path / "back"), tuning.export_merged(tuned, tmp_path / "merged",
                                                                              dtype="float32"))


def test_gpt2_sizes_transformers_does_not_read_round_trip(tmp_path):
    """transformers' GGUF loader builds a GPT-2 of 1024 positions and a 4 * n_embd MLP whatever the file
    says (it reads ``gpt2.context_length`` as ``n_ctx``, ``feed_forward_length`` as nothing); llama.cpp and
    jaxtune's importer read both: the Conv1D weights come back untransposed, the sizes as they were."""
    tiny_gpt2(tmp_path / "base", vocab_size=VOCAB, n_inner=48, tie_word_embeddings=False)
    tiny_bpe_tokenizer("gpt2").save_pretrained(tmp_path / "base")
    tuned = tuned_model(tmp_path / "base")
    out = tuning.export(tuned, tmp_path / "model.gguf", format="gguf")
    fields = gguf.GGUFReader(out).fields
    assert (fields["gpt2.context_length"].contents(), fields["gpt2.feed_forward_length"].contents()) == (64, 48)
    back = gguf_to_hf(out, tmp_path / "back")
    assert_read_back(back, tuning.export_merged(tuned, tmp_path / "merged", dtype="float32"))
    config = transformers.AutoConfig.from_pretrained(back)
    assert (config.n_positions, config.n_inner, config.tie_word_embeddings) == (64, 48, False)


def test_a_gpt2_checkpoints_causal_mask_buffers_are_not_weights(tmp_path):
    """Older GPT-2 checkpoints (the hub's ``gpt2`` among them) save each block's causal mask as
    ``attn.bias`` / ``attn.masked_bias``; llama.cpp builds its own mask, so the export leaves them out."""
    from safetensors.numpy import save_file

    from jaxtune.models.gguf_export import hf_to_gguf

    tiny_gpt2(tmp_path / "base", vocab_size=VOCAB)
    tiny_bpe_tokenizer("gpt2").save_pretrained(tmp_path / "base")
    weights = load_file(tmp_path / "base" / "model.safetensors")
    masks = {"transformer.h.0.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32)),
             "transformer.h.0.attn.masked_bias": np.full((), -1e4, np.float32)}
    save_file({**weights, **masks}, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    out = hf_to_gguf(tmp_path / "base", tmp_path / "model.gguf", dtype="float32")
    assert len(gguf.GGUFReader(out).tensors) == len(weights) - ("lm_head.weight" in weights)


@pytest.mark.parametrize("architecture,arch", [("MistralForCausalLM", "llama"), ("Phi3ForCausalLM", "phi3")])
def test_a_window_llama_cpp_does_not_apply_is_the_files_context_length(architecture, arch, tmp_path):
    """llama.cpp's ``llama`` (which a Mistral is written as) attends to every earlier token, as its ``phi3`` does
    (it reads Phi-3's window and disables it): a Mistral or Phi-3 whose sliding window is shorter than its
    positions (Mistral 7B v0.1, Phi-3-mini-4k) gets the window as its context length, over which the file is
    the model it was."""
    tiny_model(architecture, tmp_path / "base", VOCAB, sliding_window=8)
    tiny_bpe_tokenizer("smollm").save_pretrained(tmp_path / "base")
    tuned = tuned_model(tmp_path / "base")
    out = tuning.export(tuned, tmp_path / "model.gguf", format="gguf")
    assert gguf.GGUFReader(out).fields[f"{arch}.context_length"].contents() == 8
    ids = IDS[:, :8]
    ours = np.asarray(forward(tuned.module, tuned.params, ids, np.ones_like(ids)))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    with torch.no_grad():
        theirs = loaded(torch.as_tensor(ids)).logits.float().numpy()
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)


def test_llama3_rope_scaling_is_written_as_llama_cpps_frequency_factors(tmp_path):
    """Llama 3.1/3.2 scale RoPE (``llama3``); llama.cpp reads that as one divisor per frequency
    (``rope_freqs.weight``). jaxtune's importer turns those back into a config transformers runs: its
    logits are the tuned model's at every position (the scaling changes them all)."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # short, medium and long wavelengths
    tiny_hf_model("LlamaForCausalLM", tmp_path / "base", randomize=True, vocab_size=VOCAB, rope_parameters=rope)
    tiny_bpe_tokenizer("smollm").save_pretrained(tmp_path / "base")
    tuned = tuned_model(tmp_path / "base")
    out = tuning.export(tuned, tmp_path / "model.gguf", format="gguf")
    factors = next(t for t in gguf.GGUFReader(out).tensors if t.name == "rope_freqs.weight")
    assert len({float(f) for f in factors.data}) > 2  # 1, 8 and blends between
    back = gguf_to_hf(out, tmp_path / "back")
    ours = np.asarray(forward(tuned.module, tuned.params, IDS, np.ones_like(IDS)))
    np.testing.assert_allclose(torch_logits(transformers.AutoModelForCausalLM.from_pretrained(back).eval()), ours,
                               atol=TOL, rtol=0)
    unscaled = transformers.AutoModelForCausalLM.from_pretrained(
        back, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}).eval()
    assert np.abs(torch_logits(unscaled) - ours).max() > 1e-2  # the same weights without the scaling differ


def test_gemma_attention_scale_is_llama_cpps_for_the_27b_layer_counts():
    """llama.cpp infers Gemma's attention scale from the model size: (hidden / heads) ** -0.5 for the 27B models'
    layer counts (46, 62), head_dim ** -0.5 otherwise; a config asking the other one is refused."""
    from jaxtune.models.gguf_architectures import GGUFError
    from jaxtune.models.gguf_export_families import check_architecture

    for architecture, layers in (("Gemma2ForCausalLM", 46), ("Gemma3ForCausalLM", 62)):
        config = dict(architectures=[architecture], model_type="gemma2" if layers == 46 else "gemma3_text",
                      num_hidden_layers=layers, hidden_size=4608, num_attention_heads=32, head_dim=128)
        assert check_architecture({**config, "query_pre_attn_scalar": 144}) in ("gemma2", "gemma3")
        with pytest.raises(GGUFError, match=f"query_pre_attn_scalar 128 has no GGUF export; llama.cpp scales "
                                            rf"attention by 144 \*\* -0.5 for {layers} layers"):
            check_architecture({**config, "query_pre_attn_scalar": 128})


def test_a_gemma_2_window_no_shorter_than_the_context_is_full_attention(tmp_path):
    """A window as long as the context slides nothing: whichever layers Gemma 2 sets it on (here not llama.cpp's
    pattern), the file gets the context length as its window, and transformers runs it as the tuned model. (Gemma
    3's layer types also pick each layer's RoPE base: test_what_has_no_gguf_form_is_refused_before_writing.)"""
    layer_types = ["full_attention", "sliding_attention"]
    tiny_model("Gemma2ForCausalLM", tmp_path / "base", VOCAB, **{**GEMMA, "sliding_window": 300,
                                                                 "layer_types": layer_types})
    tiny_bpe_tokenizer("smollm").save_pretrained(tmp_path / "base")
    tuned = tuned_model(tmp_path / "base")
    out = tuning.export(tuned, tmp_path / "model.gguf", format="gguf")
    assert gguf.GGUFReader(out).fields["gemma2.attention.sliding_window"].contents() == 256
    ours = np.asarray(forward(tuned.module, tuned.params, IDS, np.ones_like(IDS)))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    np.testing.assert_allclose(torch_logits(loaded), ours, atol=TOL, rtol=0)


# Settings transformers' GGUF loader does not read, as llama.cpp's converter writes them (the file's own keys).
BEYOND_TRANSFORMERS = {
    "gemma2": ("Gemma2ForCausalLM", dict(sliding_window=4, attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
                                         query_pre_attn_scalar=32),
               {"gemma2.attn_logit_softcapping": 1.0, "gemma2.final_logit_softcapping": 2.0,
                "gemma2.attention.sliding_window": 4, "gemma2.attention.key_length": 32, "gemma2.context_length": 256}),
    # untied (llama.cpp's gemma3 reads an output.weight), a linear-scaled global layer (the 6th), another base
    "gemma3": ("Gemma3ForCausalLM", dict(num_hidden_layers=6, sliding_window=4, query_pre_attn_scalar=32,
                                         rope_scaling={"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5},
                                         final_logit_softcapping=2.0, attn_logit_softcapping=1.0,
                                         tie_word_embeddings=False),
               {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0, "gemma3.rope.freq_base": 5e5,
                "gemma3.final_logit_softcapping": 2.0, "gemma3.attention.sliding_window": 4}),
    # LongRoPE rotating 3/4 of each head (12 of 16 dims: 6 factors each); a window as long as the context
    "phi3": ("Phi3ForCausalLM", dict(num_key_value_heads=2, sliding_window=64,
                                     rope_parameters=longrope(6, partial=0.75)),
             {"phi3.rope.dimension_count": 12, "phi3.rope.scaling.original_context_length": 16,
              "phi3.rope.scaling.attn_factor": float(np.sqrt(1 + np.log(4) / np.log(16))),
              "phi3.attention.sliding_window": 64, "phi3.context_length": 64}),
}


@pytest.mark.parametrize("family", list(BEYOND_TRANSFORMERS))
def test_gemma_and_phi3_settings_transformers_does_not_read_round_trip(family, tmp_path):
    """Gemma 2's soft-caps and attention scalar, Gemma 3's linear-scaled global RoPE and untied output, Phi-3's
    LongRoPE (its factors as llama.cpp's rope_factors_long / _short tensors), partial rotary and window: the file
    holds llama.cpp's keys for them, and jaxtune's importer reads it back as a model whose logits are the tuned
    model's, on inputs within and (Phi-3's long factors) beyond the original context."""
    architecture, overrides, keys = BEYOND_TRANSFORMERS[family]
    tiny_model(architecture, tmp_path / "base", VOCAB, **overrides)
    tiny_bpe_tokenizer("smollm").save_pretrained(tmp_path / "base")
    tuned = tuned_model(tmp_path / "base")
    out = tuning.export(tuned, tmp_path / "model.gguf", format="gguf")
    reader = gguf.GGUFReader(out)
    assert {key: reader.fields[key].contents() for key in keys} == pytest.approx(keys, rel=1e-6)
    tensors = {t.name: t for t in reader.tensors}
    assert family != "gemma3" or ("output.weight" in tensors and "gemma3.attn_logit_softcapping" not in reader.fields)
    if family == "phi3":
        rope = overrides["rope_parameters"]
        np.testing.assert_array_equal(tensors["rope_factors_long.weight"].data, np.float32(rope["long_factor"]))
        np.testing.assert_array_equal(tensors["rope_factors_short.weight"].data, np.float32(rope["short_factor"]))
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(tensors)

    back = gguf_to_hf(out, tmp_path / "back")
    assert_read_back(back, tuning.export_merged(tuned, tmp_path / "merged", dtype="float32"), family != "phi3")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    for ids in (IDS, np.random.RandomState(1).randint(0, VOCAB, (1, 24)).astype(np.int32)):
        ours = np.asarray(forward(tuned.module, tuned.params, ids, np.ones_like(ids)))
        with torch.no_grad():
            np.testing.assert_allclose(loaded(torch.as_tensor(ids)).logits.numpy(), ours, atol=TOL, rtol=0)


def test_a_q8_0_gguf_fine_tuned_keep_quantized_exports_to_its_own_blocks(tmp_path, monkeypatch):
    """The GGUF a user already has, loaded keep_quantized (Q8_0 leaves, frozen) and exported q8_0 with an
    adapter that changes nothing: every tensor is the file's, byte for byte (Q8_0 of Q8_0 values is exact)."""
    import jaxtune
    from jaxtune.models.gguf_export import hf_to_gguf

    source(tmp_path / "base", "llama")
    original = hf_to_gguf(tmp_path / "base", tmp_path / "q8.gguf", "q8_0")
    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path / "cache"))
    tuned = tuning.apply_plan(jaxtune.load(str(original), keep_quantized=True), tuning.lora(rank=2))
    out = tuning.export(dataclasses.replace(tuned, step=1), tmp_path / "again.gguf", format="gguf", dtype="q8_0")
    theirs = {t.name: t for t in gguf.GGUFReader(original).tensors}
    ours = gguf.GGUFReader(out).tensors
    assert sorted(t.name for t in ours) == sorted(theirs) and "Q8_0" in {t.tensor_type.name for t in ours}
    for tensor in ours:
        assert tensor.tensor_type == theirs[tensor.name].tensor_type, tensor.name
        np.testing.assert_array_equal(tensor.data, theirs[tensor.name].data, err_msg=tensor.name)


def test_jaxtune_export_gguf_of_a_trained_run(tmp_path):
    """`jaxtune train` a few LoRA steps, `jaxtune export RUN --gguf`: transformers runs the file as the
    run's trained model (which the training moved away from the base)."""
    import yaml
    from test_cli import chat_rows, cli

    from jaxtune.data.testing import write_jsonl
    from jaxtune.recipe import open_run

    tiny_hf_model("Qwen2ForCausalLM", tmp_path / "qwen2", vocab_size=VOCAB)
    tiny_bpe_tokenizer().save_pretrained(tmp_path / "qwen2")
    write_jsonl(tmp_path / "train.jsonl", chat_rows(16, 0))
    config = {"model": {"path": str(tmp_path / "qwen2")}, "plan": [{"preset": "lora", "rank": 4, "alpha": 8}],
              "data": {"train": str(tmp_path / "train.jsonl"), "kind": "chat", "max_length": 64, "batch_size": 8},
              "optimizer": {"learning_rate": 3e-2}, "train": {"steps": 3, "progress": False},
              "eval": {"after": False, "baselines": False}, "output": {"dir": str(tmp_path / "run"), "export": "none"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    code, _, err = cli("train", tmp_path / "run.yaml")
    assert code == 0, err
    code, _, err = cli("export", tmp_path / "run", "--gguf", "--to", tmp_path / "gguf")
    assert code == 0 and "exported step 3" in err, err

    model = open_run(tmp_path / "run", evaluation=False).model
    ours = np.asarray(forward(model.module, model.params, IDS, np.ones_like(IDS)))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf").eval()
    np.testing.assert_allclose(torch_logits(loaded), ours, atol=TOL, rtol=0)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2").eval()
    assert np.abs(torch_logits(base) - ours).max() > 1e-2


def _llama_recipe(tmp_path, plan, packing=True, **output) -> dict:
    """A 2-step chat recipe on the tiny Llama of :func:`source` whose run exports per ``output``."""
    from test_cli import chat_rows

    from jaxtune.data.testing import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", chat_rows(16, 0))
    return {"model": {"path": str(source(tmp_path / "llama", "llama"))}, "plan": plan,
            "data": {"train": str(tmp_path / "train.jsonl"), "kind": "chat", "max_length": 64, "batch_size": 8,
                     "packing": packing},
            "optimizer": {"learning_rate": 3e-2}, "train": {"steps": 2, "progress": False},
            "eval": {"after": False, "baselines": False}, "output": {"dir": str(tmp_path / "run"), **output}}


def test_a_recipe_with_output_export_gguf_ends_with_a_gguf_of_the_trained_model(tmp_path):
    """``output.export: gguf`` (with ``export_dtype``): the run's ``export/`` is one .gguf file that
    transformers runs as the run's trained model, not its base."""
    import jaxtune as jt

    config = _llama_recipe(tmp_path, [{"preset": "lora", "rank": 4, "alpha": 8}], export="gguf",
                           export_dtype="float32")
    result = jt.finetune(config)
    assert result.state == "finished" and result.model.step == 2
    assert result.export == tmp_path / "run" / "export" / "model.gguf"
    assert sorted(p.name for p in (tmp_path / "run" / "export").iterdir()) == ["model.gguf"]
    ours = np.asarray(forward(result.model.module, result.model.params, IDS, np.ones_like(IDS)))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export",
                                                               gguf_file="model.gguf").eval()
    np.testing.assert_allclose(torch_logits(loaded), ours, atol=TOL, rtol=0)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert np.abs(torch_logits(base) - ours).max() > 1e-2


def test_a_recipe_whose_model_has_no_gguf_form_is_refused_before_training(tmp_path):
    """Prompt tuning has no GGUF form: ``output.export: gguf`` is refused naming the field before any
    step runs (no checkpoint, no status), as an explicit ``peft`` that cannot be written is."""
    import jaxtune as jt
    from jaxtune.schema import ConfigError

    config = _llama_recipe(tmp_path, [{"preset": "prompt_tuning", "n_tokens": 4}], packing=False,
                           export="gguf")
    with pytest.raises(ConfigError, match=r"^output.export: cannot export gguf: prompt tuning has no GGUF form") as err:
        jt.finetune(config)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "status.json").exists()
    assert not (tmp_path / "run" / "export").exists()

    tiny_gemma("GemmaForCausalLM", tmp_path / "gemma", vocab_size=VOCAB)
    tiny_bpe_tokenizer("smollm").save_pretrained(tmp_path / "gemma")
    config = _llama_recipe(tmp_path, [{"preset": "lora", "rank": 4}], export="gguf")
    config["model"]["path"] = str(tmp_path / "gemma")
    with pytest.raises(ConfigError, match=r"^output.export: cannot export gguf: model: GemmaForCausalLM has no GGUF "
                                          r"export; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                                          r"Qwen3ForCausalLM, GPT2LMHeadModel, Gemma2ForCausalLM, Gemma3ForCausalLM, "
                                          r"Phi3ForCausalLM, GPTNeoXForCausalLM "):
        jt.finetune(config)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "status.json").exists()


def test_export_dtype_q8_0_is_for_gguf_exports_only(tmp_path):
    """q8_0 is llama.cpp's own block format: ``output.export_dtype: q8_0`` with another export is a
    config error (naming the field) before anything loads; with ``gguf`` it is taken."""
    from jaxtune.config import OutputConfig, load
    from jaxtune.schema import ConfigError

    assert OutputConfig(export="gguf", export_dtype="q8_0").export_dtype == "q8_0"
    for export in ("auto", "peft", "merged", "none"):
        with pytest.raises(ValueError, match=rf"^output.export_dtype: q8_0 .* applies to output.export: gguf, and "
                                             rf"this run exports {export}; "):
            OutputConfig(export=export, export_dtype="q8_0")
    recipe = {"model": {"path": "m"}, "data": {"dataset": "chatterbot"},
              "output": {"dir": str(tmp_path / "run"), "export": "merged", "export_dtype": "q8_0"}}
    with pytest.raises(ConfigError, match=r"output.export_dtype: q8_0"):
        load(None, base=recipe)
    assert load(None, base={**recipe, "output": {**recipe["output"], "export": "gguf"}}).output.export == "gguf"


def test_overwrite_replaces_an_export_of_another_format_in_the_directory_gguf_included(tmp_path):
    """``overwrite=True`` replaces an earlier export of another format, GGUF included both ways, so a
    directory never holds an older adapter or merged model beside a newer model.gguf (which
    ``model.adapter: RUN`` or ``from_pretrained(DIR)`` would read); without it a .gguf still goes beside."""
    tuned = tuned_model(source(tmp_path / "base", "llama"))
    out = tmp_path / "out"
    tuning.export(tuned, out, format="peft")
    tuning.export(tuned, out, format="gguf", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf"]
    with pytest.raises(ExportError, match=r"out: holds an earlier gguf export, and this one is merged"):
        tuning.export(tuned, out, format="merged")
    tuning.export(tuned, out, format="merged", overwrite=True)
    held = {p.name for p in out.iterdir()}
    assert "config.json" in held and "model.gguf" not in held
    tuning.export(tuned, out, format="gguf")  # beside, as before: only overwrite clears
    assert {"config.json", "model.gguf"} <= {p.name for p in out.iterdir()}


def test_a_run_resumed_with_another_output_export_replaces_its_export(tmp_path):
    """``output.export`` may change on resume: a run that exported a PEFT adapter and then gguf holds
    only the .gguf (not the older adapter beside it), and one that exported gguf and then merged
    writes its merged directory instead of failing after training."""
    import jaxtune as jt
    from jaxtune.models.load import LoadError, adapter_dir

    config = _llama_recipe(tmp_path, [{"preset": "lora", "rank": 4, "alpha": 8}], export="peft")
    jt.finetune(config)
    export = tmp_path / "run" / "export"
    for steps, fmt, held in ((3, "gguf", ["model.gguf"]), (4, "merged", ["config.json"])):
        config["train"]["steps"], config["output"]["export"] = steps, fmt
        result = jt.finetune(config)
        assert result.state == "finished" and result.model.step == steps
        names = {p.name for p in export.iterdir()}
        assert set(held) <= names and not names & {"adapter_config.json", "model.gguf"} - set(held), names
        if fmt == "gguf":  # model.adapter: RUN (SFT before DPO) must not find the older adapter
            with pytest.raises(LoadError, match=r"without a PEFT adapter .* exported merged/gguf/none\); "):
                adapter_dir(tmp_path / "run")


def sentencepiece_style_tokenizer(style: str = "metaspace") -> transformers.PreTrainedTokenizerFast:
    """Mistral's tokenizer.json in little: a BPE with byte fallback (<unk>, <s>, </s>, the 256 <0xNN> bytes,
    then characters and merges learned on a few sentences as SentencePiece learns them: within words),
    spaces as "▁" with one before the text (``legacy``: Llama 2's and Phi-3's normalizer, ``metaspace``: a Metaspace
    pre-tokenizer), BOS added, a chat template. ``gemma``: Gemma's instead: no "▁" before the text (a Replace
    normalizer, a Split pre-tokenizer at spaces it leaves none of), its special tokens (<pad>, <eos>, <bos>, <unk>,
    <start_of_turn>, <end_of_turn>) and its ids in merge order, as its tokenizer.model has them (which transformers'
    GGUF reader of a Gemma relies on)."""
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors, trainers

    gemma = style == "gemma"
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "numbers 12345 and 678",
              "user assistant: the answer is 42"] * 3
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never" if gemma else "first", split=True)
    learner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    specials = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] if gemma
                else ["<unk>", "<s>", "</s>"])
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    # Gemma's learned tokens in merge order (the trainer's ids); the others by id backwards: ids out of merge order,
    # so that only the scores give llama.cpp the order
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1] if gemma else -item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    unk, bos, eos = ("<unk>", "<bos>", "<eos>") if gemma else ("<unk>", "<s>", "</s>")
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    if style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif gemma:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps if gemma else [*steps, decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                                pad_token="<pad>" if gemma else None)
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}" if gemma else
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
        " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    return fast


def llama_cpp_spm(tokens: list[str], scores: list[float], text: str, space_prefix: bool = True) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm) on text with no special tokens in it: a "▁" before
    it (``space_prefix``) and for each space, then, from its characters, merge the adjacent pair whose joined token
    scores highest (the leftmost of equals) while any pair is a token; a character that is no token becomes its
    <0xNN> bytes."""
    ids = {token: i for i, token in enumerate(tokens)}
    pieces = list(("▁" * space_prefix + text).replace(" ", "▁"))
    while True:
        pairs = [(-scores[ids[a + b]], i) for i, (a, b) in enumerate(zip(pieces, pieces[1:])) if a + b in ids]
        if not pairs:
            break
        _, i = min(pairs)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return [j for piece in pieces for j in ([ids[piece]] if piece in ids
                                             else [ids[f"<0x{b:02X}>"] for b in piece.encode("utf-8")])]


@pytest.mark.parametrize("architecture,style", [("LlamaForCausalLM", "legacy"), ("LlamaForCausalLM", "metaspace"),
                                                ("MistralForCausalLM", "metaspace"), ("Phi3ForCausalLM", "legacy"),
                                                ("Gemma2ForCausalLM", "gemma"), ("Gemma3ForCausalLM", "gemma")])
def test_a_sentencepiece_style_tokenizer_is_written_as_llama_cpps_llama_vocabulary(architecture, style, tmp_path):
    """A tokenizer.json BPE with byte fallback (Llama 2, Mistral, Phi-3, Gemma) becomes llama.cpp's ``llama``
    vocabulary: scores by merge rank (llama.cpp merges by score, with no merges in the file), <0xNN> as BYTE, the
    specials as CONTROL and <unk> UNKNOWN, a "▁" before the text but for Gemma's. transformers' GGUF reader (which
    rebuilds the merges from the scores, as llama.cpp ranks them; a Gemma's from the ids) tokenizes as the original
    (a Llama's with Mistral's Metaspace), jaxtune's importer as llama.cpp, text needing byte fallback and the chat
    template's output included."""
    from jaxtune.models.gguf_export import hf_to_gguf

    original = sentencepiece_style_tokenizer(style)
    overrides = {"MistralForCausalLM": dict(sliding_window=None), "Gemma2ForCausalLM": GEMMA,
                 "Gemma3ForCausalLM": dict(GEMMA, num_hidden_layers=6)}.get(architecture, {})
    tiny_model(architecture, tmp_path / "base", len(original) + 3, **overrides)
    original.save_pretrained(tmp_path / "base")
    (tmp_path / "gguf").mkdir()
    out = hf_to_gguf(tmp_path / "base", tmp_path / "gguf" / "model.gguf", dtype="float32")

    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.pre"].contents() == "default"  # as llama.cpp's converter writes it
    types = fields["tokenizer.ggml.token_type"].contents()
    unk = original.unk_token_id
    assert types[unk] == gguf.TokenType.UNKNOWN and types[original.bos_token_id] == gguf.TokenType.CONTROL
    assert types[original.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
    assert types[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is (style != "gemma")
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True

    chat = original.apply_chat_template([{"role": "user", "content": "hello world 42"}], tokenize=False)
    texts = ["the quick brown fox", "  hello   world\n\nok?", "numbers 1234567", "there the other",
             "héllo wörld ✓ 日本", chat]
    want = [original(t)["input_ids"] for t in texts]
    assert original.convert_tokens_to_ids("<0x0A>") in want[1] and unk not in sum(want, [])  # byte fallback, no <unk>
    # llama.cpp tokenizes a `llama` vocabulary as Llama 2's normalizer does, "▁" before the text and after each
    # special token (LLAMA_CPP_SPM_PIECES); Mistral's Metaspace, of the same vocabulary and merges, differs on text
    # starting with a space and after <s>: jaxtune's importer is llama.cpp's tokenizer of the file
    legacy = sentencepiece_style_tokenizer("legacy") if style == "metaspace" else original
    assert legacy.get_vocab() == original.get_vocab()
    as_llama_cpp = [legacy(t)["input_ids"] for t in texts]
    if style == "legacy":  # llama.cpp's rules (docs/cli.md); transformers rebuilds a Metaspace: no "▁" before text
        # that starts with a space, nor after a special token (the chat's <s><s>[INST]); its Phi-3 reader does not
        if architecture != "Phi3ForCausalLM":
            want[1] = original(texts[1][1:])["input_ids"]
            assert len(want[1]) == len(original(texts[1])["input_ids"]) - 1
            assert want[-1][2] == original.convert_tokens_to_ids("▁")
            want[-1] = want[-1][:2] + want[-1][3:]
    # llama.cpp's tokenizer on the file gives the original ids (a Metaspace's: on text not starting with a space)
    tokens, scores = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()
    for text in texts[:-1]:
        if style != "metaspace" or not text.startswith(" "):
            assert (llama_cpp_spm(tokens, scores, text, space_prefix=style != "gemma")
                    == original(text, add_special_tokens=False)["input_ids"]), text
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert gguf_tokenizer.chat_template == original.chat_template
    assert [gguf_tokenizer(t)["input_ids"] for t in texts] == want

    ids = torch.as_tensor(np.asarray(want[0])[None])
    reference = getattr(transformers, architecture).from_pretrained(tmp_path / "base").eval()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    with torch.no_grad():
        np.testing.assert_allclose(loaded(ids).logits.numpy(), reference(ids).logits.numpy(), atol=TOL, rtol=0)

    imported = transformers.AutoTokenizer.from_pretrained(gguf_to_hf(out, tmp_path / "back", weights=False))
    assert [imported(t)["input_ids"] for t in texts] == as_llama_cpp
    if style != "gemma":
        for text, pieces in LLAMA_CPP_SPM_PIECES.items():
            assert imported.convert_ids_to_tokens(imported(text)["input_ids"]) == pieces, text


# llama.cpp 0.3.36's tokens of the file exported from sentencepiece_style_tokenizer("legacy" or "metaspace") (the same
# vocabulary), by llama_cpp.Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=True, special=True), as pieces
LLAMA_CPP_SPM_PIECES = {" leading": ["<s>", "▁", "▁", "l", "e", "a", "d", "i", "n", "g"],
                        "</s> x": ["<s>", "</s>", "▁", "▁", "x"], "<s>hi": ["<s>", "<s>", "▁", "h", "i"]}


def test_whitespace_runs_added_as_tokens_are_matched_whole_as_llama_cpp_does(tmp_path):
    """Gemma's runs of 2 to 31 spaces are added tokens (USER_DEFINED in its GGUF, spelled with spaces), which
    llama.cpp matches whole in the text, longest first, before its SentencePiece sees it: the original tokenizer
    does the same (as llama.cpp 0.3.36 tokenized this file: LLAMA_CPP_RUN_PIECES), and so must jaxtune's importer,
    not re-spell them "▁▁" tokens that BPE merges pair by pair (transformers' GGUF reader of a Gemma does)."""
    from tokenizers import AddedToken

    from jaxtune.models.gguf_export import hf_to_gguf

    original = sentencepiece_style_tokenizer("gemma")
    original.add_tokens([AddedToken(" " * n, normalized=False) for n in (2, 3, 4)])
    tiny_model("Gemma3ForCausalLM", tmp_path / "base", len(original), **dict(GEMMA, num_hidden_layers=6))
    original.save_pretrained(tmp_path / "base")
    out = hf_to_gguf(tmp_path / "base", tmp_path / "model.gguf", dtype="float32")
    fields = gguf.GGUFReader(out).fields
    runs = [original.convert_tokens_to_ids(" " * n) for n in (2, 3, 4)]
    assert [fields["tokenizer.ggml.tokens"].contents(i) for i in runs] == ["  ", "   ", "    "]
    assert [fields["tokenizer.ggml.token_type"].contents(i) for i in runs] == [gguf.TokenType.USER_DEFINED] * 3

    imported = transformers.AutoTokenizer.from_pretrained(gguf_to_hf(out, tmp_path / "back", weights=False))
    texts = ["a  b", "the   quick    brown     fox", " " * 9 + "z", "hello  world  ", "x\n  y"]
    assert [imported(t)["input_ids"] for t in texts] == [original(t)["input_ids"] for t in texts]
    for text, pieces in LLAMA_CPP_RUN_PIECES.items():
        assert original.convert_ids_to_tokens(imported(text)["input_ids"]) == pieces
    assert imported.decode(imported(texts[1])["input_ids"], skip_special_tokens=True) == texts[1]


# llama.cpp 0.3.36's tokens of that file (as LLAMA_CPP_SPM_PIECES), as pieces
LLAMA_CPP_RUN_PIECES = {
    "the   quick    brown     fox": ["<bos>", "the", "   ", "qu", "ick", "    ", "br", "own", "    ", "▁fox"],
    " " * 9 + "z": ["<bos>", "    ", "    ", "▁", "z"]}
