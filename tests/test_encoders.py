"""RoBERTa, XLM-RoBERTa and DistilBERT against transformers, fp32, within 1e-4: token states and classifier
logits on padded and packed inputs, the family's classification head exported to transformers'
``*ForSequenceClassification`` and back, and a LoRA adapter with that head loaded by peft.

The tiny random models get weights far from HF's init (LayerNorm gains around 1 +- 0.5, every other
tensor of std 0.1, the padding row of the position table included), so that position offsets, token
types and the head's layers all move the outputs.
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers
from helpers import tiny_hf_model, torch_logits
from test_tuning_lora import forward
from test_tuning_peft import trained

import jaxtune
from jaxtune import tuning
from jaxtune.models import hf

TOL = 1e-4
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=40)
CASES = {  # name: (architecture, config overrides)
    "roberta": ("RobertaModel", dict(pad_token_id=1, type_vocab_size=1)),
    "xlm-roberta-classifier": ("XLMRobertaForSequenceClassification",
                               dict(pad_token_id=3, num_labels=3, hidden_act="gelu_new", classifier_dropout=0.2)),
    # (A DistilBertForSequenceClassification checkpoint is what the head export writes and loads back.)
    "distilbert-relu": ("DistilBertModel", dict(pad_token_id=0, activation="relu")),
}
CONFIGS = {"Roberta": "RobertaConfig", "XLMRoberta": "XLMRobertaConfig", "DistilBert": "DistilBertConfig"}


def tiny_encoder(architecture: str, out_dir, seed: int = 0, **overrides):
    """A random transformers encoder saved to ``out_dir``, weights moved off HF's init (see module doc)."""
    prefix = next(p for p in sorted(CONFIGS, key=len, reverse=True) if architecture.startswith(p))
    kwargs = {**TINY, **overrides}
    if prefix == "DistilBert":  # its own key names
        kwargs = {{"hidden_size": "dim", "intermediate_size": "hidden_dim", "num_hidden_layers": "n_layers",
                   "num_attention_heads": "n_heads"}.get(k, k): v for k, v in kwargs.items()}
    config = getattr(transformers, CONFIGS[prefix])(**kwargs)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                param.copy_(torch.rand_like(param) + 0.5 if name.endswith("weight") else 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_encoder(arch, path, **overrides)
    return ref, hf.load_pretrained(path), path


def _padded(pad: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """ids ``(2, 9)``: row 0 right-padded to 6 real tokens, row 1 with 7, padded on the left if ``left`` (a
    classifier reads the first token, so its inputs are right-padded); real ids avoid ``pad``."""
    ids = np.random.RandomState(1).randint(4, 96, (2, 9)).astype(np.int32)
    mask = np.array([[1] * 6 + [0] * 3, [0] * 2 + [1] * 7 if left else [1] * 7 + [0] * 2], np.int32)
    return np.where(mask == 1, ids, pad).astype(np.int32), mask


def _ours(model: hf.Pretrained, ids, segment_ids=None, positions=None) -> np.ndarray:
    return np.asarray(model.module.apply({"params": model.params}, ids, segment_ids, positions))


def test_loads_the_family_and_its_switches(pair):
    ref, model, _ = pair
    cfg = model.config
    assert cfg.layout == {"Roberta": "roberta", "XLMRoberta": "roberta", "DistilBert": "distilbert"}[
        next(p for p in sorted(CONFIGS, key=len, reverse=True) if cfg.architecture.startswith(p))]
    assert cfg.position_offset == (ref.config.pad_token_id + 1 if cfg.layout == "roberta" else 0)
    assert cfg.type_vocab_size == (0 if cfg.layout == "distilbert" else ref.config.type_vocab_size)
    assert cfg.use_pooler == ("pooler" in {k.split(".")[0] for k in ref.base_model.state_dict()})


def test_outputs_match_transformers_with_padding(pair):
    """Token states (bare models) or logits (classifiers) on right- and left-padded rows; RoBERTa's
    positions count real tokens from padding_idx + 1, as transformers derives them from the ids."""
    ref, model, _ = pair
    ids, mask = _padded(ref.config.pad_token_id, left=hf.FAMILIES[model.architecture].body is None)
    ours = _ours(model, ids, mask)
    theirs = torch_logits(ref, ids, attention_mask=mask)
    assert np.isfinite(ours).all()
    if ours.ndim == 3:
        real = mask.astype(bool)
        np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)
    else:
        np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_packed_documents_match_each_document_alone(pair):
    ids = np.random.RandomState(2).randint(4, 96, (1, 14)).astype(np.int32)
    bounds = [(0, 6), (6, 11), (11, 13)]  # three documents, then one padding slot
    segments, positions = np.zeros((1, 14), np.int32), np.zeros((1, 14), np.int32)
    for doc, (lo, hi) in enumerate(bounds, 1):
        segments[0, lo:hi], positions[0, lo:hi] = doc, np.arange(hi - lo)
    ref, model, path = pair
    ours = _ours(hf.load_pretrained(path, architecture=hf.FAMILIES[model.architecture].base), ids, segments, positions)
    body = ref.base_model
    for lo, hi in bounds:
        np.testing.assert_allclose(ours[0, lo:hi], torch_logits(body, ids[:, lo:hi])[0], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def adapted(pair):
    """LoRA on every linear plus the family's own classification head (its defaults), trained norms."""
    _, model, path = pair
    plan = tuning.lora(rank=4, alpha=8) + tuning.train(kinds=["norms"])
    if hf.FAMILIES[model.architecture].body is None:
        plan = plan + tuning.head("classification", num_labels=3)
    tuned, params = trained(path.parent, path.name, plan)
    ids, mask = _padded(model.hf_config["pad_token_id"])
    return tuned, params, np.asarray(forward(tuned.module, params, ids, mask)), (ids, mask)


def test_family_head_exports_to_transformers_and_back(pair, adapted, tmp_path):
    _, model, _ = pair
    tuned, params, ours, (ids, mask) = adapted
    family = hf.FAMILIES[model.architecture]
    assert tuned.hf_architecture == family.classifier
    out = tuning.export_merged(tuned, tmp_path, params=params)
    assert json.loads((out / "config.json").read_text())["architectures"] == [family.classifier]
    reloaded = getattr(transformers, family.classifier).from_pretrained(out).eval()
    np.testing.assert_allclose(ours, torch_logits(reloaded, ids, attention_mask=mask), atol=TOL, rtol=0)
    again = hf.load_pretrained(out)  # and back into jaxtune, tensor by tensor
    np.testing.assert_allclose(_ours(again, ids, mask), ours, atol=TOL, rtol=0)


def test_lora_adapter_with_head_loads_in_peft(pair, adapted, tmp_path):
    _, model, path = pair
    tuned, params, ours, (ids, mask) = adapted
    tuning.export_peft(tuned, tmp_path, params=params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    classifier = hf.FAMILIES[model.architecture].classifier
    base = getattr(transformers, classifier).from_pretrained(path, num_labels=tuned.num_outputs).eval()
    assert not np.allclose(ours, torch_logits(base, ids, attention_mask=mask), atol=1e-3)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()  # (wraps base in place)
    np.testing.assert_allclose(ours, torch_logits(theirs, ids, attention_mask=mask), atol=TOL, rtol=0)
    # and back into jaxtune: the same model, ready to train on
    back = tuning.load_peft(model, tmp_path)
    heads = {n.split(".")[0] for n in tuned.config.classifier_layout.hf_names().values()}
    assert heads <= set(config["modules_to_save"]), "a head is saved as its top module, as PEFT's SEQ_CLS does"
    np.testing.assert_allclose(np.asarray(forward(back.module, back.params, ids, mask)), ours, atol=TOL, rtol=0)


def test_adapter_made_by_peft_imports_exactly(pair, tmp_path):
    """PEFT's own SEQ_CLS adapter (on RoBERTa's query/value/dense, DistilBERT's q_lin/v_lin; the classifier saved
    whole, and DistilBERT's pre_classifier with it) onto the bare checkpoint gives peft's logits."""
    _, model, path = pair
    family = hf.FAMILIES[model.architecture]
    if family.body is not None:
        pytest.skip("a classifier checkpoint brings its own head; the bare checkpoints cover the import")
    base = getattr(transformers, family.classifier).from_pretrained(path, num_labels=2).eval()
    torch.manual_seed(0)
    # "dense" also names the bare checkpoint's pooler, which RoBERTa's classifier model has not: PEFT adapts
    # no pooler there, and the import must not look for one (it refused the file for lacking its tensors).
    targets = ["q_lin", "v_lin"] if model.config.layout == "distilbert" else ["query", "value", "dense"]
    made = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=False))
    made.save_pretrained(tmp_path)
    ids, mask = _padded(model.hf_config["pad_token_id"])
    tuned = tuning.load_peft(model, tmp_path)
    assert tuned.head is not None and tuned.hf_architecture == family.classifier
    np.testing.assert_allclose(np.asarray(forward(tuned.module, tuned.params, ids, mask)),
                               torch_logits(made.eval(), ids, attention_mask=mask), atol=TOL, rtol=0)



def test_a_pooler_classifier_adapter_onto_a_checkpoint_without_a_pooler_names_the_pooler(tmp_path):
    """PEFT's SEQ_CLS adapter of BertForSequenceClassification (its classifier reads the pooler output) imported
    onto a BertForMaskedLM checkpoint, which saves no pooler: it was refused as "modules_to_save ['classifier']
    are not modules of BertModel". Now the refusal names the missing pooler, the checkpoint and what to do; the
    same adapter onto the checkpoint it was trained on imports (peft's logits)."""
    classifier = tiny_hf_model("BertForSequenceClassification", tmp_path / "classifier", num_labels=3)
    masked_lm = tiny_hf_model("BertForMaskedLM", tmp_path / "mlm")
    assert not any(k.startswith("bert.pooler.") for k in masked_lm.state_dict())  # transformers saves no pooler
    torch.manual_seed(0)
    made = peft.get_peft_model(classifier, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                           target_modules=["query", "value"], init_lora_weights=False))
    made.save_pretrained(tmp_path / "adapter")
    ids, mask = _padded(0)
    tuned = tuning.load_peft(hf.load_pretrained(tmp_path / "classifier"), tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(forward(tuned.module, tuned.params, ids, mask)),
                               torch_logits(made.eval(), ids, attention_mask=mask), atol=TOL, rtol=0)
    with pytest.raises(tuning.ExportError, match=(
            rf"adapter: the adapter saves BertForSequenceClassification's 'classifier', which reads the pooler "
            rf"output, and the base checkpoint {tmp_path / 'mlm'} has no pooler tensors .*BertForMaskedLM.*; load "
            r"the adapter onto a BertModel or BertForSequenceClassification checkpoint")):
        tuning.load_peft(hf.load_pretrained(tmp_path / "mlm"), tmp_path / "adapter")


def test_bare_encoder_adapter_starts_a_run_with_a_new_head(pair, tmp_path):
    """PEFT's FEATURE_EXTRACTION adapter on the bare encoder (no head saved) under a plan that adds
    LoRA and a head: the adapter is laid out under the plan's head (the bare model has no output layer
    of its own), its tensors land where peft put them (the logits equal those of peft's own merge of
    it, under the same new head), and the head starts as the plan initialises it."""
    _, model, path = pair
    family = hf.FAMILIES[model.architecture]
    if family.body is not None:
        pytest.skip("a classifier checkpoint has its own head; the bare checkpoints cover this")
    targets = ["q_lin", "v_lin"] if model.config.layout == "distilbert" else ["query", "value"]
    bare = getattr(transformers, model.architecture).from_pretrained(path).eval()
    torch.manual_seed(0)
    made = peft.get_peft_model(bare, peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=4, lora_alpha=8,
                                                     target_modules=targets, init_lora_weights=False))
    made.save_pretrained(tmp_path / "adapter")
    made.merge_and_unload().save_pretrained(tmp_path / "merged")
    head = tuning.head("classification", num_labels=3)
    tuned = tuning.apply_plan(jaxtune.load(str(path), adapter=str(tmp_path / "adapter")),
                              tuning.lora(rank=4, alpha=8, targets=targets) + head)
    planned = tuning.apply_plan(model, tuning.lora(rank=4, alpha=8, targets=targets) + head)
    merged = tuning.apply_plan(hf.load_pretrained(tmp_path / "merged"), head)
    np.testing.assert_array_equal(np.asarray(tuned.params["head"]["out"]["kernel"]),
                                  np.asarray(planned.params["head"]["out"]["kernel"]))
    ids, mask = _padded(model.hf_config["pad_token_id"])
    ours = np.asarray(forward(tuned.module, tuned.params, ids, mask))
    np.testing.assert_allclose(ours, np.asarray(forward(merged.module, merged.params, ids, mask)), atol=TOL, rtol=0)
    assert not np.allclose(ours, np.asarray(forward(planned.module, planned.params, ids, mask)), atol=1e-3)


def test_classifier_checkpoint_adapter_without_a_head_starts_a_run_with_a_new_head(pair, tmp_path):
    """A LoRA adapter saved without the classifier (no task_type) on a *ForSequenceClassification
    checkpoint, under a plan with a new head: its names are the classifier model's (``roberta.``
    prefix), so it is laid out on the checkpoint's own head, not the plan's (a bare encoder's case)."""
    _, model, path = pair
    family = hf.FAMILIES[model.architecture]
    if family.body is None:
        pytest.skip("the bare checkpoints are covered by the FEATURE_EXTRACTION test above")
    torch.manual_seed(0)
    base = getattr(transformers, model.architecture).from_pretrained(path).eval()
    made = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                     init_lora_weights=False))
    made.save_pretrained(tmp_path / "adapter")
    made.merge_and_unload().save_pretrained(tmp_path / "merged")
    plan = tuning.lora(rank=4, alpha=8, targets=["query", "value"]) + tuning.head("classification", num_labels=5)
    tuned = tuning.apply_plan(jaxtune.load(str(path), adapter=str(tmp_path / "adapter")), plan)
    merged = tuning.apply_plan(hf.load_pretrained(tmp_path / "merged"), tuning.head("classification", num_labels=5))
    ids, mask = _padded(model.hf_config["pad_token_id"])
    np.testing.assert_allclose(np.asarray(forward(tuned.module, tuned.params, ids, mask)),
                               np.asarray(forward(merged.module, merged.params, ids, mask)), atol=TOL, rtol=0)


def _tokenizer_classes() -> dict[str, type]:
    """The tokenizer class transformers gives each text family jaxtune loads (by its config's model_type)."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    out = {"llama": transformers.LlamaTokenizer}  # no entry of its own: it reads tokenizer.json or tokenizer.model
    for arch, family in hf.FAMILIES.items():
        if family.modality != "text" or not family.transformers:
            continue
        model_type = getattr(transformers, arch).config_class.model_type
        names = TOKENIZER_MAPPING_NAMES.get(model_type) or ()
        for name in (names,) if isinstance(names, str) else names:
            if name and hasattr(transformers, name):
                out[model_type] = getattr(transformers, name)
    return out


def test_exports_copy_every_vocabulary_file_of_the_families_tokenizers():
    """Without tokenizer.json transformers builds the tokenizer from the class's own vocabulary file; one the
    export left behind (XLM-RoBERTa's sentencepiece.bpe.model) gave an exported directory with no vocabulary."""
    classes = _tokenizer_classes()
    assert {"xlm-roberta", "deberta-v2", "bert", "gpt2", "gpt_neox"} <= set(classes)
    for model_type, cls in classes.items():
        assert set(cls.vocab_files_names.values()) <= set(hf.TOKENIZER_FILES), (model_type, cls.vocab_files_names)


def test_a_merged_export_keeps_the_sentencepiece_vocabulary(tmp_path):
    """An XLM-RoBERTa checkpoint whose tokenizer is its slow vocabulary file alone: the merged export copies it."""
    tiny_encoder("XLMRobertaForSequenceClassification", tmp_path / "model", pad_token_id=1)
    vocabulary = tmp_path / "model" / "sentencepiece.bpe.model"
    vocabulary.write_bytes(b"a SentencePiece model")
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    tuned = tuning.apply_plan(hf.load_pretrained(tmp_path / "model"), tuning.lora(rank=2))
    out = tuning.export_merged(tuned, tmp_path / "merged")
    assert (out / "sentencepiece.bpe.model").read_bytes() == vocabulary.read_bytes()
