"""gguf_to_hf on a tiny random Llama written as GGUF the way llama.cpp's converter writes it.

The GGUF side uses llama.cpp's own conventions, taken from the `gguf` package rather than from
the code under test: tensor names from `gguf.get_tensor_name_map`, and the forward Q/K rotary
permutation of `convert_hf_to_gguf.py`. A round trip that reproduces the original HF tensors
bit for bit therefore checks the names, layouts and un-permutation independently.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import llama_cpp_permute
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from jaxtune.models.gguf import GGUFError, gguf_to_hf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = [bytes_to_unicode()[b] for b in range(256)]
MERGES = ["\u0120 t", "\u0120 \u0120"]  # "Ġt" and "ĠĠ", so BPE merging is exercised
TOKENS = SPECIALS + BYTES + [m.replace(" ", "") for m in MERGES]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1; make them distinguishable
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def write_gguf(model: LlamaForCausalLM, path: Path, *, architecture: str = "llama",
               override: dict[str, np.ndarray] | None = None) -> Path:
    """Write `model` as an F32 GGUF with llama.cpp's metadata keys, tensor names and Q/K layout."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    normal = len(TOKENS) - len(SPECIALS)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * normal)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for tied embeddings
        stem, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        data = tensor.numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        writer.add_tensor(name, (override or {}).get(name, data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def converted(request, tmp_path_factory):
    """(original model, GGUF path, converted HF dir) for an untied and a tied tiny Llama."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(tie=request.param)
    path = write_gguf(model, root / "tiny.gguf")
    return model, path, gguf_to_hf(path, root / "hf")


def test_tensors_equal_the_original(converted):
    model, _, out = converted
    original = model.state_dict()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        expected = set(original) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
        assert names == expected
        for name in names:
            assert torch.equal(f.get_tensor(name), original[name]), name


def test_the_fast_reader_reads_what_the_gguf_package_reads(converted, tmp_path, monkeypatch):
    """``open_gguf``'s reader (the package's parse over an ndarray view of the mapping, for speed) gives
    the package reader's fields (types, raw parts, contents: strings, arrays, the vocabulary) and tensors
    (name, type, shape, bytes) on a tiny Llama file with a vocabulary, merges and a chat template; where
    ``_get`` is not the method it was written against, the package's own reader is used."""
    from jaxtune.models import gguf as jgguf

    _, path, _ = converted
    ours, theirs = jgguf.open_gguf(path), gguf.GGUFReader(path)
    assert type(ours) is not gguf.GGUFReader and isinstance(ours, gguf.GGUFReader)
    assert list(ours.fields) == list(theirs.fields) and len(ours.fields) > 20
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.types, mine.data, mine.offset) == (field.types, field.data, field.offset), name
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(mine.parts, field.parts)), name
        assert mine.contents() == field.contents(), name
    assert len(ours.tensors) == len(theirs.tensors) > 0
    for mine, tensor in zip(ours.tensors, theirs.tensors):
        assert (mine.name, mine.tensor_type, list(mine.shape), mine.n_elements, mine.data_offset) == (
            tensor.name, tensor.tensor_type, list(tensor.shape), tensor.n_elements, tensor.data_offset)
        assert mine.data.dtype == tensor.data.dtype and np.array_equal(mine.data, tensor.data)
    monkeypatch.setattr(jgguf, "_FAST_READER", False)
    assert type(jgguf.open_gguf(path)) is gguf.GGUFReader


def test_config(converted):
    model, _, out = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(model.config, key), key
    assert config["rope_parameters"]["rope_theta"] == 50000.0
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_transformers_loads_it_with_the_same_logits(converted):
    model, _, out = converted
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_bfloat16_output(converted, tmp_path):
    model, path, _ = converted
    out = gguf_to_hf(path, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        weight = f.get_tensor("model.layers.1.self_attn.k_proj.weight")
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, model.state_dict()["model.layers.1.self_attn.k_proj.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer(converted):
    _, path, out = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    chat = [{"role": "user", "content": "the test"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nthe test<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == 1 and TOKENS.index("\u0120t") in ids  # special token whole, merge applied
    assert tokenizer.decode(ids) == text
    # the same ids as transformers' own GGUF tokenizer ...
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert reference(text).input_ids == ids
    # ... except where llama.cpp's "smollm" pre-tokenizer isolates digits before the GPT-2 split
    assert tokenizer.tokenize("a  2") == ["a", "\u0120\u0120", "2"]
    assert reference.tokenize("a  2") == ["a", "\u0120", "\u0120", "2"]


def test_keep_quantized_file_writes_no_weights_and_its_adapter_loads_on_the_file(tmp_path, monkeypatch):
    """A .gguf file loaded keep_quantized converts only its configs and tokenizer (an 8B file's float32
    weights would be 32 GB on disk, read by nothing), and the PEFT adapter names the file as its base:
    peft on transformers' own GGUF load of it gives jaxtune's logits."""
    from peft import PeftModel
    from test_tuning_lora import forward, randomize_adapters
    from transformers import AutoModelForCausalLM

    import jaxtune
    from jaxtune import tuning

    model = tiny_llama(tie=True)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path / "cache"))
    base = jaxtune.load(str(path), keep_quantized=True)
    (folder,) = (tmp_path / "cache" / "gguf").iterdir()
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")) == []
    assert base.source == str(folder) and base.tokenizer is not None
    tuned = jaxtune.apply_plan(base, jaxtune.lora(4, alpha=8, targets=["q_proj", "v_proj"]))
    params = randomize_adapters(tuned.params)
    adapter = tuning.export_peft(tuned, tmp_path / "adapter", params=params)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path.resolve())
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    peft_model = PeftModel.from_pretrained(reference, adapter).eval()
    ids = np.random.RandomState(1).randint(0, model.config.vocab_size, (2, 12)).astype(np.int32)
    ours = np.asarray(forward(tuned.module, params, ids, np.ones_like(ids)))
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert jaxtune.load(str(path), keep_quantized=True).source == str(folder)  # converted once


def test_a_conversion_cached_by_an_older_importer_is_made_again(tmp_path, monkeypatch):
    """jaxtune.load converts a GGUF file once and caches the directory, keyed by the file: an importer
    fixed since (its tokenizer, a soft-cap) must not go on training on what an older one converted."""
    import jaxtune
    from jaxtune.models import gguf as gguf_module

    path = write_gguf(tiny_llama(tie=True), tmp_path / "tiny.gguf")
    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path / "cache"))
    first = jaxtune.load(str(path)).source
    assert jaxtune.load(str(path)).source == first  # converted once
    monkeypatch.setattr(gguf_module, "CONVERSION", gguf_module.CONVERSION + 1)
    again = jaxtune.load(str(path)).source
    assert again != first and (Path(again) / "tokenizer.json").is_file()


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"architecture 'falcon' is not supported.*supported: llama, qwen2"):
        gguf_to_hf(tmp_path / "f.gguf", tmp_path / "out")


def test_unsupported_tensor_type(tmp_path):
    model = tiny_llama(tie=True)
    bad = np.zeros((64, 64), dtype=np.int32)  # an I32 tensor: nothing a weight can be dequantized from
    path = write_gguf(model, tmp_path / "bad.gguf", override={"blk.0.attn_q.weight": bad})
    with pytest.raises(GGUFError, match=r"'blk.0.attn_q.weight' has .*I32"):
        gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_unreadable_and_missing_file(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="junk.gguf is not a readable GGUF file"):
        gguf_to_hf(tmp_path / "junk.gguf", tmp_path / "out")
    with pytest.raises(GGUFError, match="does not exist"):
        gguf_to_hf(tmp_path / "absent.gguf", tmp_path / "out")
