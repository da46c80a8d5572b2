"""DeBERTa-v2/v3 against transformers, fp32, within 1e-5: token states and classifier logits on padded
inputs (with and without absolute positions, shared and separate position projections, log-bucketed and
plain relative positions, an embedding projection, token types), gradients against torch's, packed
documents equal to each alone, its classifier exported to ``DebertaV2ForSequenceClassification`` and back,
LoRA loaded by peft, refusals of what is not supported, and a two-step recipe run.

The tiny random models get weights far from HF's init (LayerNorm gains around 1 +- 0.5, every other
tensor of std 0.1), so that every norm, bias and head layer moves the outputs.
"""

from __future__ import annotations

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.torch
import torch
import transformers
from flax.traverse_util import flatten_dict
from helpers import tiny_random_model, torch_logits
from test_modernbert import _padded
from test_reward import (
    ENCODER_LENGTH,
    _assert_trls_loss,
    _batch,
    _encoder_pairs,
    _plain_rows,
    _trl_reward,
    _trl_tokenized,
)
from test_tuning_lora import forward
from test_tuning_peft import trained
from transformers.models.deberta_v2 import modeling_deberta_v2

import jaxtune
from jaxtune import config, tuning
from jaxtune.data.pipeline import Loader, LoaderConfig
from jaxtune.data.sources import read_source
from jaxtune.data.testing import write_jsonl
from jaxtune.data.tokenize import Tokenize
from jaxtune.models import hf
from jaxtune.models.deberta import DebertaConfig, relative_positions
from jaxtune.models.hf_files import CheckpointError
from jaxtune.recipe import finetune
from jaxtune.training.preference import make_preference_loss_fn
from jaxtune.training.preflight import check_rows_fit
from jaxtune.training.reward_model import reward_pad_id

TOL = 1e-5
# DeBERTa-v3's shape in miniature: relative attention with both terms, shared keys, no absolute positions,
# log buckets (position_buckets 4: distances beyond 2 are bucketed at the test length), normed position table.
V3 = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True,
          position_biased_input=False, position_buckets=4, max_relative_positions=16, norm_rel_ebd="layer_norm",
          type_vocab_size=0, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CASES = {  # name: (architecture, config overrides of V3)
    "v3-classifier": ("DebertaV2ForSequenceClassification", dict(num_labels=3)),
    # DeBERTa-v2 style: absolute positions too, separate pos_key_proj/pos_query_proj, "p2c|c2p" as a string,
    # no buckets (clipped distances), an embedding projection, token types, another activation
    "v2-model-absolute": ("DebertaV2Model",
                          dict(position_biased_input=True, share_att_key=False, pos_att_type="p2c|c2p",
                               position_buckets=-1, max_relative_positions=6, norm_rel_ebd="none",
                               embedding_size=24, type_vocab_size=2, hidden_act="gelu_new")),
    # c2p only, shared keys, positions from max_position_embeddings (max_relative_positions -1)
    "c2p-classifier": ("DebertaV2ForSequenceClassification",
                       dict(pos_att_type=["c2p"], position_buckets=-1, max_relative_positions=-1, num_labels=1,
                            pooler_hidden_act="tanh")),
}


def tiny_deberta(architecture: str, out_dir, seed: int = 0, **overrides):
    """A random transformers DeBERTa-v2 saved to ``out_dir``, weights moved off HF's init (see module doc)."""
    return tiny_random_model(architecture, out_dir, {**V3, **overrides}, seed, config_class="DebertaV2Config")


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_deberta(arch, path, **overrides)
    return ref, hf.load_pretrained(path), path


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, ids, segment_ids, positions, token_type_ids):
    return module.apply({"params": params}, ids, segment_ids, positions, token_type_ids)


def _ours(model: hf.Pretrained, ids, segment_ids=None, positions=None, token_type_ids=None) -> np.ndarray:
    return np.asarray(_apply(model.module, model.params, ids, segment_ids, positions, token_type_ids))


def test_outputs_match_transformers_with_padding(pair):
    """Token states (bare model, left-padded, with token types) or logits (classifiers, right-padded: the
    pooler reads the first token)."""
    ref, model, _ = pair
    bare = hf.FAMILIES[model.architecture].body is None
    ids, mask = _padded(left=bare)
    types = (np.arange(10)[None, :] >= 5).astype(np.int32).repeat(2, 0) if model.config.type_vocab_size else None
    extra = {"token_type_ids": types} if types is not None else {}
    ours = _ours(model, ids, mask, None, types)
    theirs = torch_logits(ref, ids, attention_mask=mask, **extra)
    real = mask.astype(bool) if bare else slice(None)
    np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)


def test_rows_longer_than_max_position_embeddings_without_a_position_table(pair):
    """DeBERTa-v3 has no absolute position table: a row past config.json's max_position_embeddings (64 here)
    is read as transformers reads it, with log-bucketed distances."""
    ref, model, _ = pair
    if model.config.position_biased_input:
        assert model.config.max_position_embeddings == ref.config.max_position_embeddings
        pytest.skip("a position table bounds the rows")
    assert model.config.max_position_embeddings is None
    ids = np.random.RandomState(3).randint(4, 128, (1, 90)).astype(np.int32)
    np.testing.assert_allclose(_ours(model, ids), torch_logits(ref, ids), atol=TOL, rtol=0)


def test_without_relative_attention_the_scale_still_counts_pos_att_type(tmp_path):
    """``relative_attention: false`` (DeBERTa-v2's config default) keeps absolute positions only, yet
    transformers still divides the scores by ``sqrt(head_dim * (1 + len(pos_att_type)))``."""
    ref = tiny_deberta("DebertaV2Model", tmp_path, relative_attention=False, position_biased_input=True,
                       norm_rel_ebd="none")
    model = hf.load_pretrained(tmp_path)
    assert model.config.scale == np.sqrt(8 * 3)
    ids, mask = _padded()
    real = mask.astype(bool)
    np.testing.assert_allclose(_ours(model, ids, mask)[real], torch_logits(ref, ids, attention_mask=mask)[real],
                               atol=TOL, rtol=0)


def test_relative_positions_are_transformers_buckets():
    """The bucket table of DeBERTa-v3's settings (256 buckets up to 512) and of small ones, at every length
    up to 512, equals transformers' own."""
    for buckets, max_position, length in ((256, 512, 512), (4, 16, 40), (8, 12, 30), (-1, 16, 20)):
        theirs = modeling_deberta_v2.build_relative_position(torch.zeros(length, 1), torch.zeros(length, 1),
                                                             bucket_size=buckets, max_position=max_position)
        np.testing.assert_array_equal(relative_positions(length, buckets, max_position), theirs[0].numpy())


def test_gradients_match_torch(pair):
    """d(sum of squared outputs over real tokens)/d(a few params) equals torch's autograd."""
    ref, model, _ = pair
    ids, mask = _padded()
    real = mask.astype(bool)
    bare = hf.FAMILIES[model.architecture].body is None
    prefix = () if bare else ("deberta",)
    first = "query_proj" if model.config.share_att_key else "pos_key_proj"
    paths = [prefix + ("layer_0", "attention", "self", first, "kernel"),
             prefix + ("layer_1", "output", "LayerNorm", "scale"),
             prefix + ("embeddings", "word_embeddings", "embedding"),
             prefix + ("encoder", "rel_embeddings", "embedding")]
    if not bare:
        paths.append(("head", "dense_0", "kernel"))

    def loss(params):
        out = model.module.apply({"params": params}, ids, mask)
        return jnp.sum(jnp.square(out[real] if bare else out))

    grads = flatten_dict(jax.jit(jax.grad(loss))(model.params))
    ref.zero_grad()
    out = ref(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    value = out.last_hidden_state[torch.as_tensor(real)] if bare else out.logits
    value.square().sum().backward()
    named = dict(ref.named_parameters())
    for path in paths:
        name = hf.hf_name(hf.FAMILIES[model.architecture], path)
        theirs = named[name].grad.numpy()
        theirs = theirs.T if path[-1] == "kernel" else theirs
        np.testing.assert_allclose(np.asarray(grads[path]), theirs, atol=1e-4, rtol=1e-4, err_msg=name)


def tiny_deberta_tokenizer():
    """DeBERTa-v3's kind of tokenizer (SentencePiece Unigram, ``[CLS] text [SEP]``, EOS ``[SEP]``) over single
    characters, each also with the word-start marker: ids below 200."""
    import string

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = ([(t, 0.0) for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")] + [("▁", -2.0)]
             + [("▁" + c, -1.0) for c in chars] + [(c, -1.5) for c in chars])
    return transformers.DebertaV2Tokenizer(vocab=vocab, unk_id=3)


def _documents() -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray, np.ndarray]:
    """One row of 15 ids holding three documents and a padding slot: ids, bounds, segment ids, positions."""
    ids = np.random.RandomState(2).randint(4, 128, (1, 15)).astype(np.int32)
    bounds = [(0, 7), (7, 12), (12, 14)]
    segments, positions = np.zeros((1, 15), np.int32), np.zeros((1, 15), np.int32)
    for doc, (lo, hi) in enumerate(bounds, 1):
        segments[0, lo:hi], positions[0, lo:hi] = doc, np.arange(hi - lo)
    return ids, bounds, segments, positions


def test_packed_documents_match_each_document_alone(pair):
    """Three documents in one row, each equal to the document run alone by transformers: relative positions
    stay inside a document (they are index differences) and no document attends to another. Without
    per-document positions too where there are no absolute positions (DeBERTa-v3)."""
    ref, model, path = pair
    ids, bounds, segments, positions = _documents()
    classifier = hf.FAMILIES[model.architecture].body is not None
    with pytest.warns(UserWarning, match="not used by DebertaV2Model") if classifier else contextlib.nullcontext():
        body = hf.load_pretrained(path, architecture="DebertaV2Model")  # a classifier's body, its head unused
    for given in (positions,) if model.config.position_biased_input else (positions, None):
        ours = _ours(body, ids, segments, given)
        for lo, hi in bounds:
            np.testing.assert_allclose(ours[0, lo:hi], torch_logits(ref.base_model, ids[:, lo:hi])[0], atol=TOL,
                                       rtol=0)
    if classifier:  # the classifier's head on each packed segment's first token: each document's logits
        tuned = tuning.apply_plan(model, tuning.full())
        packed = tuned.module.apply({"params": tuned.params}, input_ids=ids, segment_ids=segments,
                                    positions=positions, segments=len(bounds))
        alone = np.concatenate([torch_logits(ref, ids[:, lo:hi]) for lo, hi in bounds])
        np.testing.assert_allclose(np.asarray(packed)[0], alone, atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def adapted(pair):
    """LoRA on every linear plus the family's own classification head (its defaults: the first token through
    pooler.dense into classifier), trained norms."""
    _, model, path = pair
    plan = tuning.lora(rank=4, alpha=8) + tuning.train(kinds=["norms"])
    if hf.FAMILIES[model.architecture].body is None:
        plan = plan + tuning.head("classification", num_labels=3)
    tuned, params = trained(path.parent, path.name, plan)
    ids, mask = _padded()
    return tuned, params, np.asarray(forward(tuned.module, params, ids, mask)), (ids, mask)


def test_family_head_exports_to_transformers_and_back(pair, adapted, tmp_path):
    tuned, params, ours, (ids, mask) = adapted
    assert tuned.hf_architecture == "DebertaV2ForSequenceClassification"
    out = tuning.export_merged(tuned, tmp_path, params=params)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DebertaV2ForSequenceClassification"]
    reloaded = transformers.DebertaV2ForSequenceClassification.from_pretrained(out).eval()
    np.testing.assert_allclose(ours, torch_logits(reloaded, ids, attention_mask=mask), atol=TOL, rtol=0)
    again = hf.load_pretrained(out)  # and back into jaxtune, tensor by tensor
    np.testing.assert_allclose(_ours(again, ids, mask), ours, atol=TOL, rtol=0)


def test_lora_adapter_with_head_loads_in_peft(pair, adapted, tmp_path):
    _, model, path = pair
    tuned, params, ours, (ids, mask) = adapted
    tuning.export_peft(tuned, tmp_path, params=params)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    targets = {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]}
    assert {"query_proj", "key_proj", "value_proj", "dense"} <= targets
    assert {"pooler", "classifier"} <= set(adapter["modules_to_save"])
    base = transformers.DebertaV2ForSequenceClassification.from_pretrained(path, num_labels=tuned.num_outputs).eval()
    assert not np.allclose(ours, torch_logits(base, ids, attention_mask=mask), atol=1e-3)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    np.testing.assert_allclose(ours, torch_logits(theirs, ids, attention_mask=mask), atol=TOL, rtol=0)
    back = tuning.load_peft(model, tmp_path)  # and back into jaxtune, ready to train on
    np.testing.assert_allclose(np.asarray(forward(back.module, back.params, ids, mask)), ours, atol=TOL, rtol=0)


def test_adapter_made_by_peft_on_its_target_names_imports_exactly(pair, tmp_path):
    """PEFT's own SEQ_CLS adapter on the names peft users give DeBERTa (``query_proj``, ``key_proj``,
    ``value_proj``, ``dense``) with DoRA and the pooler saved whole (as peft users keep it: otherwise peft adapts
    the pooler's fresh ``dense`` and saves only the adapter), onto the bare checkpoint, gives peft's logits."""
    _, model, path = pair
    if hf.FAMILIES[model.architecture].body is not None:
        pytest.skip("a classifier checkpoint brings its own head; the bare checkpoint covers the import")
    base = transformers.DebertaV2ForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    torch.manual_seed(0)
    made = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, use_dora=True,
                                                     target_modules=["query_proj", "key_proj", "value_proj", "dense"],
                                                     modules_to_save=["pooler"], init_lora_weights=False))
    made.save_pretrained(tmp_path)
    ids, mask = _padded()
    tuned = tuning.load_peft(model, tmp_path)
    assert tuned.hf_architecture == "DebertaV2ForSequenceClassification"
    assert {m[-1] for m in tuned.adapters} >= {"query_proj", "key_proj", "value_proj", "dense"}
    np.testing.assert_allclose(np.asarray(forward(tuned.module, tuned.params, ids, mask)),
                               torch_logits(made.eval(), ids, attention_mask=mask), atol=TOL, rtol=0)


@pytest.mark.parametrize("targets", [["query_proj", "value_proj", "dense"], ["query_proj", "value_proj"]])
def test_adapter_without_the_pooler_it_trained_on_is_refused(pair, tmp_path, targets):
    """PEFT's SEQ_CLS saves ``classifier`` only: the classifier's fresh ``pooler.dense`` (LoRA'd when a target is
    ``dense``) is in no file, so the import ran on jaxtune's own fresh pooler with other logits than peft's."""
    _, model, path = pair
    if hf.FAMILIES[model.architecture].body is not None:
        pytest.skip("a classifier checkpoint brings its own head; the bare checkpoint covers the import")
    base = transformers.DebertaV2ForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    torch.manual_seed(0)
    made = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=False))
    made.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert not any("pooler.dense.weight" in k for k in saved)
    adapted = r"; it also puts LoRA on \['pooler.dense'\]" if "dense" in targets else ", so"
    with pytest.raises(tuning.ExportError, match=rf"the adapter saves the classifier but not \['pooler.dense'\] .*"
                                                 rf"initialises fresh{adapted}.*modules_to_save=\['classifier', "
                                                 r"'pooler'\]"):
        tuning.load_peft(model, tmp_path)


def test_rows_past_the_trained_context_are_warned_of_without_rope_advice(tmp_path, caplog):
    """DeBERTa-v3 has no position table (transformers runs it past max_position_embeddings, 64 here), so long
    rows are only warned of; the warning told to set rope_scaling, which a relative-position model has not."""
    tiny_deberta("DebertaV2Model", tmp_path / "model", vocab_size=200)
    tuned = tuning.apply_plan(hf.load_pretrained(tmp_path / "model"), tuning.head("classification", 2))
    rows = write_jsonl(tmp_path / "train.jsonl", [{"text": "good plot", "label": "positive"},
                                                      {"text": "bad", "label": "negative"}])
    loader = Loader(read_source(rows, "classification"), tiny_deberta_tokenizer(), LoaderConfig(max_length=80))
    with caplog.at_level("WARNING", logger="jaxtune"):
        check_rows_fit(tuned, [loader])
    assert [r.getMessage() for r in caplog.records] == [
        "data.max_length: rows of 80 positions are longer than the 64 the model was trained for (max_position_"
        "embeddings in its config.json): its relative positions go past it, but it has seen no rows this long; set "
        "data.max_length to 64 or less"]


def test_a_partial_plan_trains_the_last_blocks_and_the_head(pair):
    """Nothing follows the last block (post-norm, no BERT pooler): as on DistilBERT, the preset's output rule
    is skipped and the plan trains the last block and the head."""
    _, model, _ = pair
    if hf.FAMILIES[model.architecture].body is not None:
        pytest.skip("one body is enough")
    for plan in (tuning.freeze_all_but(1) + tuning.head("regression"),
                 tuning.freeze_all_but(1, train_output=False) + tuning.head("regression")):
        labels = flatten_dict(tuning.apply_plan(model, plan).labels)
        assert {p[0] for p, label in labels.items() if label != tuning.FROZEN} == {"layer_1", "head"}


def test_extra_blocks_are_refused_with_the_fix(pair):
    _, model, _ = pair
    with pytest.raises(tuning.PlanError, match="extra_blocks is not supported on DeBERTa"):
        tuning.apply_plan(model, tuning.head("classification", extra_blocks=1))


def test_masked_lm_checkpoint_loads_as_the_body(tmp_path):
    ref = tiny_deberta("DebertaV2ForMaskedLM", tmp_path)
    with pytest.warns(UserWarning, match=r"not used by DebertaV2Model: .*cls\.predictions"):
        model = hf.load_pretrained(tmp_path)
    assert model.architecture == "DebertaV2Model"
    ids, mask = _padded()
    real = mask.astype(bool)
    np.testing.assert_allclose(_ours(model, ids, mask)[real],
                               torch_logits(ref.deberta, ids, attention_mask=mask)[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("field, value, message", [
    ("conv_kernel_size", 3, "conv_kernel_size 3 .* is not supported"),
    ("pos_att_type", ["p2c", "p2p"], r"pos_att_type .* has \['p2p'\], which is not supported"),
    ("pooler_hidden_size", 16, "pooler_hidden_size 16 differs from hidden_size 32"),
    ("norm_rel_ebd", "batch_norm", "norm_rel_ebd 'batch_norm' is not supported"),
    ("hidden_act", "swish", "hidden_act 'swish' is not supported"),
    ("model_type", "deberta", "model_type 'deberta' is not supported"),
])
def test_unsupported_config_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        DebertaConfig.from_hf({**V3, "model_type": "deberta-v2", "architectures": ["DebertaV2Model"], field: value})


def test_deberta_v1_checkpoints_are_refused_at_load(tmp_path):
    """DeBERTa v1 (``model_type: deberta``, ``DebertaModel``) computes differently: refused, not read as v2."""
    (tmp_path / "config.json").write_text(json.dumps({**V3, "model_type": "deberta",
                                                      "architectures": ["DebertaForSequenceClassification"]}))
    with pytest.raises(CheckpointError, match="config.json: architecture \\['DebertaForSequenceClassification'\\] "
                                              "is not supported"):
        hf.load_pretrained(tmp_path)


def test_exports_carry_the_sentencepiece_model(tmp_path):
    """DeBERTa-v3 on the hub ships its tokenizer as ``spm.model`` + ``tokenizer_config.json`` (no
    ``tokenizer.json``): an export copies every vocabulary file transformers' DebertaV2Tokenizer reads, or the
    exported directory's tokenizer would have no vocabulary (a merged export is a whole model; an adapter
    carries no tokenizer)."""
    tiny_deberta("DebertaV2ForSequenceClassification", tmp_path / "model")
    (tmp_path / "model" / "spm.model").write_bytes(b"a SentencePiece model")
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DebertaV2Tokenizer"}))
    tuned = tuning.apply_plan(hf.load_pretrained(tmp_path / "model"), tuning.lora(rank=2))
    out = tuning.export_merged(tuned, tmp_path / "merged")
    for name in transformers.DebertaV2Tokenizer.vocab_files_names.values():
        source = tmp_path / "model" / name
        assert not source.exists() or (out / name).read_bytes() == source.read_bytes(), name
    assert (out / "spm.model").exists()


def test_labeled_rows_are_tokenized_as_the_deberta_tokenizer_does(tmp_path):
    """DeBERTa-v3's SentencePiece tokenizer, saved and loaded as a hub checkpoint's: jaxtune's classification rows
    (a text, or a text and its pair) are ``[CLS] a [SEP]`` / ``[CLS] a [SEP] b [SEP]`` with transformers' token
    types, also when truncated."""
    tiny_deberta_tokenizer().save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(tokenizer).__name__.startswith("DebertaV2Tokenizer")
    encode = Tokenize(tokenizer, "classification", 12)
    for text, pair in (("Good plot.", None), ("A scene", "the actor"), ("an awfully long story here", "and more")):
        ours = encode({"text": text, "text_pair": pair, "label": 0})[0]
        theirs = tokenizer(text, pair, truncation=True, max_length=12)
        assert ours["input_ids"].tolist() == theirs["input_ids"], (text, pair)
        assert ours["token_type_ids"].tolist() == theirs["token_type_ids"], (text, pair)
        assert ours["input_ids"][0] == tokenizer.cls_token_id and ours["input_ids"][-1] == tokenizer.sep_token_id


def test_reward_loss_and_gradients_equal_trls_reward_trainer(tmp_path):
    """A DeBERTa-v3 reward model (``DebertaV2ForSequenceClassification`` with one output, as OpenAssistant's):
    jaxtune's tokens of each answer are TRL's (``[CLS] prompt answer [SEP] [SEP]``: TRL appends the EOS
    ``[SEP]``), and its loss of packed pairs, its gradients and its metrics equal TRL's RewardTrainer on them."""
    model = tiny_deberta("DebertaV2ForSequenceClassification", tmp_path, vocab_size=200, num_labels=1,
                         max_position_embeddings=128)
    tokenizer = tiny_deberta_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    rows = _plain_rows(6, seed=5)
    trl_ids = _trl_tokenized(tokenizer, rows)
    pairs = _encoder_pairs(tokenizer, rows)
    assert [tuple(p[side]["input_ids"].tolist() for side in ("chosen", "rejected")) for p in pairs] == trl_ids
    assert all(ids[0] == tokenizer.cls_token_id and ids[-2:] == [tokenizer.sep_token_id] * 2
               for pair in trl_ids for ids in pair)
    model.train()  # TRL's training mode (no dropout in this one)
    trl_pairs = [{"chosen": {"input_ids": np.asarray(c)}, "rejected": {"input_ids": np.asarray(r)},
                  "margin": row.get("margin", 0.0)} for (c, r), row in zip(trl_ids, rows, strict=True)]
    trl = _trl_reward(model, trl_pairs, True, 0.05, pad_id=tokenizer.pad_token_id,
                      weights={"head": "classifier.weight", "embed": "deberta.embeddings.word_embeddings.weight"})
    tuned = jaxtune.apply_plan(jaxtune.load(str(tmp_path)), jaxtune.full())
    loss_fn = make_preference_loss_fn(tuned.module, jaxtune.PreferenceConfig(method="reward",
                                                                            center_rewards_coefficient=0.05),
                                      pad_id=reward_pad_id(tuned))
    batch = _batch(pairs, length=2 * ENCODER_LENGTH, margins=True)
    assert batch["segment_ids"].max() > 1  # packed: several pairs a row
    _assert_trls_loss(loss_fn, tuned.params, batch, trl, {"head": ("head", "out", "kernel"),
                                                          "embed": ("embeddings", "word_embeddings", "embedding")},
                      len(pairs), jit=True)


def test_packed_recipe_trains_and_exports_an_adapter_peft_scores_alike(tmp_path):
    """The user's path: a recipe with LoRA on peft's DeBERTa names and a classification head on a bare
    DeBERTa-v3 directory with its SentencePiece tokenizer, packed rows longer than its max_position_embeddings
    (it has no position table, so transformers takes them too), two steps, exported as a PEFT adapter for
    DebertaV2ForSequenceClassification that scores the texts as the trained model does."""
    tiny_deberta("DebertaV2Model", tmp_path / "model", vocab_size=200)
    tiny_deberta_tokenizer().save_pretrained(tmp_path / "model")
    words = "good bad great awful plot actor scene story".split()
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("valid", 8)):
        texts = [" ".join(rng.choice(words, 3)) for _ in range(n)]
        write_jsonl(tmp_path / f"{split}.jsonl",
                    [{"text": t, "label": "positive" if "good" in t else "negative"} for t in texts])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{path: {tmp_path / 'model'}}}
plan:
  - {{preset: lora, rank: 4, alpha: 8, targets: [query_proj, key_proj, value_proj, dense]}}
  - {{action: head, task: classification}}
data: {{kind: classification, train: {tmp_path / 'train.jsonl'}, validation: {tmp_path / 'valid.jsonl'},
        max_length: 80, batch_size: 8, packing: true}}
train: {{steps: 2, progress: false}}
optimizer: {{learning_rate: 0.01}}
eval: {{baselines: false}}
output: {{dir: {tmp_path / 'run'}}}
""")
    result = finetune(config.load(recipe))
    assert result.state == "finished" and result.step == 2 and np.isfinite(result.after["loss"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    texts = [json.loads(line)["text"] for line in (tmp_path / "valid.jsonl").read_text().splitlines()]
    inputs = tokenizer(texts, padding=True, return_tensors="np")
    ours = np.asarray(forward(result.model.module, result.model.params, inputs["input_ids"].astype(np.int32),
                              inputs["attention_mask"].astype(np.int32)))
    base = transformers.DebertaV2ForSequenceClassification.from_pretrained(tmp_path / "model", num_labels=2).eval()
    theirs = peft.PeftModel.from_pretrained(base, result.export).eval()
    np.testing.assert_allclose(ours, torch_logits(theirs, inputs["input_ids"], attention_mask=inputs["attention_mask"]),
                               atol=TOL, rtol=0)
