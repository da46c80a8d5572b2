"""Model directories whose tokenizer is a SentencePiece model alone, with no ``tokenizer.json``.

DeBERTa-v3 ships ``spm.model``, Llama 2, Mistral and Gemma ``tokenizer.model``: transformers converts
them into a fast tokenizer with the sentencepiece and protobuf packages. The reference is
``AutoTokenizer`` on the same directory; the SentencePiece models are trained here, in seconds, on
a few hundred random lines. Without the packages, and without any vocabulary file, loading is a
one-line error instead of a tokenizer that encodes every word as unknown.
"""

from __future__ import annotations

import json
import random
import shutil
import sys

import pytest
import sentencepiece
import transformers
from helpers import tiny_hf_model, tiny_random_model

import jaxtune
from jaxtune import tuning
from jaxtune.data.tokenize import encode_pieces
from jaxtune.models.load import LoadError

TEXTS = ["hello world kalomi", "  the  quick\tfox  ", "Héllo, wörld! 123 ✓", "kasa motepi  lozewa.", "[MASK] zebi"]


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory) -> dict[str, object]:
    """``{"deberta": dir, "llama": dir}``: a tiny random DeBERTa-v2 classifier with a unigram ``spm.model``
    (DeBERTa-v3's special tokens) and a tiny Llama with a byte-fallback BPE ``tokenizer.model`` (Llama 2's)."""
    root = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    syllables = "ka lo mi ne ru sa te vo pi da gu he jo wa ze bi".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
    common = dict(input=str(root / "text.txt"), minloglevel=2, num_threads=1)
    sentencepiece.SentencePieceTrainer.train(
        model_prefix=str(root / "unigram"), vocab_size=300, model_type="unigram", pad_id=0, unk_id=1, bos_id=2,
        eos_id=3, pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]",
        user_defined_symbols=["[MASK]"], **common)
    sentencepiece.SentencePieceTrainer.train(
        model_prefix=str(root / "bpe"), vocab_size=400, model_type="bpe", byte_fallback=True, **common)
    tiny_random_model("DebertaV2ForSequenceClassification", root / "deberta",
                      dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, max_position_embeddings=64, relative_attention=True,
                           pos_att_type=["p2c", "c2p"], position_buckets=4, max_relative_positions=16,
                           type_vocab_size=0, pad_token_id=0, num_labels=2), config_class="DebertaV2Config")
    shutil.copy(root / "unigram.model", root / "deberta" / "spm.model")
    tiny_hf_model("LlamaForCausalLM", root / "llama", vocab_size=400)
    shutil.copy(root / "bpe.model", root / "llama" / "tokenizer.model")
    return {"deberta": root / "deberta", "llama": root / "llama"}


@pytest.mark.parametrize("family", ["deberta", "llama"])
def test_a_sentencepiece_only_directory_tokenizes_as_autotokenizer(spm_dirs, family):
    reference = transformers.AutoTokenizer.from_pretrained(spm_dirs[family])
    assert len(reference) >= 300  # the trained vocabulary, not a tokenizer of special tokens alone
    tokenizer = jaxtune.load(str(spm_dirs[family])).tokenizer
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
        # what jaxtune.data trains on: its own copy of the Rust backend
        assert encode_pieces(tokenizer, [text])[0] == reference(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("family", ["deberta", "llama"])
def test_a_merged_export_keeps_the_sentencepiece_model_and_reloads_identically(spm_dirs, family, tmp_path):
    name = {"deberta": "spm.model", "llama": "tokenizer.model"}[family]
    tuned = tuning.apply_plan(jaxtune.load(str(spm_dirs[family])), tuning.lora(rank=2))
    out = tuning.export_merged(tuned, tmp_path / "merged")
    assert (out / name).read_bytes() == (spm_dirs[family] / name).read_bytes()
    reference = transformers.AutoTokenizer.from_pretrained(spm_dirs[family])
    again = jaxtune.load(str(out)).tokenizer
    for text in TEXTS:
        assert again(text)["input_ids"] == reference(text)["input_ids"], text


@pytest.mark.parametrize("package", ["sentencepiece", "google.protobuf"])
def test_without_the_sentencepiece_packages_loading_names_the_fix(spm_dirs, package, monkeypatch):
    """transformers' own error here is "`tiktoken` is required": it falls back to reading the file as tiktoken's."""
    monkeypatch.setitem(sys.modules, package, None)  # an import of it raises ImportError
    with pytest.raises(LoadError, match=rf"deberta: .*SentencePiece model spm.model .*pip install "
                                        rf"{package.split('.')[-1]}"):
        jaxtune.load(str(spm_dirs["deberta"]))


def test_a_tokenizer_class_without_its_vocabulary_file_is_refused(spm_dirs, tmp_path):
    """transformers builds DeBERTa-v2's tokenizer of its 7 special tokens alone when spm.model is missing."""
    model = tmp_path / "model"
    shutil.copytree(spm_dirs["deberta"], model)
    (model / "spm.model").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DebertaV2Tokenizer"}))
    assert len(transformers.AutoTokenizer.from_pretrained(model)) == 7  # what the old code returned
    with pytest.raises(LoadError, match=r"model: none of DebertaV2Tokenizer's vocabulary files \(spm.model, "
                                        r"tokenizer.json\) is there.*7-token"):
        jaxtune.load(str(model))
