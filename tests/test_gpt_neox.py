"""GPT-NeoX (Pythia) against transformers, fp32, within 1e-4: logits on padded and packed batches in both
residual modes, greedy KV-cache generation, gradients, LoRA on the fused ``query_key_value`` both ways with
peft, a merged export in transformers, the sequence classifier, prompt tuning and a DPO step.

Two tiny configurations: Pythia's shape (parallel residual, a quarter of each head rotated, exact GELU,
untied ``embed_out``); and the other switches (sequential residual, half of each head rotated with linear
RoPE scaling, tanh GELU, no attention biases, tied embeddings). Weights are drawn far from transformers'
init (LayerNorm gains 0.5..1.5, the rest N(0, 0.1)), so the fused projection's per-head layout, the
partial rotation and every bias move the logits.
"""

from __future__ import annotations

import dataclasses
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
from helpers import is_norm_gain, randomize_weights, torch_logits
from test_rope import ids_of, packed_row, padded_batch
from test_tuning_peft import IDS, MASK, assert_real_tokens_close, trained

from jaxtune import tuning
from jaxtune.models import hf, stacking
from jaxtune.models.generate import generate
from jaxtune.models.gpt_neox import GPTNeoX, GPTNeoXConfig

TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {
    "pythia": dict(),  # parallel residual, rotary_pct 0.25, gelu, biases, untied
    "sequential-tied": dict(use_parallel_residual=False, hidden_act="gelu_new", attention_bias=False,
                            tie_word_embeddings=True,
                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0,
                                             "partial_rotary_factor": 0.5}),
}


def tiny_neox(path, architecture: str = "GPTNeoXForCausalLM", **overrides) -> torch.nn.Module:
    config = transformers.GPTNeoXConfig(**{**BASE, **overrides})
    config.architectures = [architecture]
    torch.manual_seed(0)
    ref = getattr(transformers, architecture)(config).eval()
    randomize_weights(ref, is_norm=is_norm_gain)
    ref.save_pretrained(path)
    return ref


@pytest.fixture(scope="module", params=sorted(CASES))
def neox(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_neox(path, **CASES[request.param])
    return ref, hf.load_pretrained(path), path


def apply(model: hf.Pretrained, ids, segment_ids=None, positions=None, cfg=None) -> np.ndarray:
    module = model.module if cfg is None else type(model.module)(cfg)
    return np.asarray(module.apply({"params": model.params}, ids, segment_ids, positions))


def hf_logits(ref: torch.nn.Module, ids, mask=None, positions=None) -> np.ndarray:
    inputs = {} if mask is None else {"attention_mask": mask}
    if positions is not None:
        inputs["position_ids"] = positions.astype(np.int64)
    return torch_logits(ref, ids, **inputs)


def test_loads_the_fused_projection_as_stored(neox):
    """The ``(D, 3D)`` kernel is the checkpoint's weight transposed, columns in HF's per-head order; the
    switches come from config.json (v5 ``rope_parameters``, as transformers writes it)."""
    ref, model, _ = neox
    cfg = model.config
    assert isinstance(model.module, GPTNeoX) and isinstance(cfg, GPTNeoXConfig)
    layer = stacking.unstack(model.params)["layers_1"]
    qkv = ref.gpt_neox.layers[1].attention.query_key_value
    np.testing.assert_array_equal(np.asarray(layer["attention"]["query_key_value"]["kernel"]),
                                  qkv.weight.detach().numpy().T)
    assert ("bias" in layer["attention"]["query_key_value"]) == ref.config.attention_bias
    assert cfg.parallel_residual == ref.config.use_parallel_residual
    assert dict(cfg.rope_scaling)["partial_rotary_factor"] == ref.config.rope_parameters["partial_rotary_factor"]
    assert ("lm_head" in model.params) != cfg.tie_word_embeddings == ref.config.tie_word_embeddings


def test_padded_batch_matches_transformers(neox):
    ref, model, _ = neox
    ids, mask, positions = padded_batch(12)
    ours, theirs = apply(model, ids, mask, positions), hf_logits(ref, ids, mask, positions)
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=TOL, rtol=0)
    assert np.isfinite(ours).all(), "padding rows must not produce NaN"
    # The residual mode and the partial rotation each move the logits far beyond the tolerance.
    for change in (dict(parallel_residual=not model.config.parallel_residual), dict(rope_scaling=None)):
        other = apply(model, ids, mask, positions, cfg=dataclasses.replace(model.config, **change))
        assert np.abs(other[mask == 1] - theirs[mask == 1]).max() > 100 * TOL, change


def test_packed_row_matches_each_document_alone(neox):
    """Documents of 9, 5 and 3 tokens in one row, then padding: each document's logits are transformers'
    on that document alone (positions restart, no token attends across documents)."""
    ref, model, _ = neox
    lengths = (9, 5, 3)
    ids, segments, positions = packed_row(lengths, fill=2)
    ours = apply(model, ids, segments, positions)
    start = 0
    for n in lengths:
        np.testing.assert_allclose(ours[0, start:start + n], hf_logits(ref, ids[:, start:start + n])[0],
                                   atol=TOL, rtol=0)
        start += n


PROMPTS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13], [100]]


def test_greedy_generation_matches_transformers(neox):
    ref, model, _ = neox
    ours = generate(model.module, model.params, PROMPTS, max_new_tokens=6, stop_token_ids=[], max_length=32)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_gradients_match_torch(neox):
    """The mean next-token loss's gradient on the fused projection (layout and bias), a LayerNorm, the
    MLP and the output layer (or tied embedding), against torch's autograd."""
    ref, model, _ = neox
    ids = ids_of((2, 10), seed=4)
    ref.zero_grad()
    ref(input_ids=torch.as_tensor(ids).long(), labels=torch.as_tensor(ids).long()).loss.backward()

    def loss(params):
        logits = model.module.apply({"params": params}, ids)[:, :-1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))

    grads = stacking.unstack(jax.jit(jax.grad(loss))(model.params))  # one program: eagerly each op compiles apart
    layer, torch_layer = grads["layers_0"], ref.gpt_neox.layers[0]
    pairs = [(layer["attention"]["query_key_value"]["kernel"], torch_layer.attention.query_key_value.weight.grad.T),
             (layer["post_attention_layernorm"]["scale"], torch_layer.post_attention_layernorm.weight.grad),
             (layer["mlp"]["dense_4h_to_h"]["bias"], torch_layer.mlp.dense_4h_to_h.bias.grad),
             (grads["norm"]["bias"], ref.gpt_neox.final_layer_norm.bias.grad)]
    if ref.config.attention_bias:
        pairs.append((layer["attention"]["query_key_value"]["bias"], torch_layer.attention.query_key_value.bias.grad))
    if model.config.tie_word_embeddings:
        pairs.append((grads["embed_tokens"]["embedding"], ref.gpt_neox.embed_in.weight.grad))
    else:
        pairs.append((grads["lm_head"]["kernel"], ref.lm_head.weight.grad.T))
    for ours, theirs in pairs:
        assert np.abs(theirs.numpy()).max() > 1e-4  # a gradient that is there to compare
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5, rtol=1e-4)


def test_export_writes_the_checkpoint_names_transformers_writes(neox, tmp_path):
    """A plain export is the checkpoint transformers saved, tensor for tensor: ``embed_out.weight`` for
    the output layer (transformers' own name on disk), the fused projection unchanged."""
    _, model, path = neox
    out = hf.save_pretrained(model.params, model.hf_config, tmp_path)
    from safetensors.numpy import load_file

    ours, theirs = load_file(out / "model.safetensors"), load_file(path / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)


@pytest.fixture(scope="module")
def adapted(neox):
    """LoRA on every linear (the fused query_key_value included) and a trained final norm."""
    _, model, path = neox
    tuned, params = trained(path.parent, path.name, tuning.lora(rank=4, alpha=8) + tuning.train("^norm/"))
    ours = np.asarray(tuned.module.apply({"params": params}, input_ids=IDS, segment_ids=MASK))
    return tuned, params, ours


def _hf_masked_logits(model: torch.nn.Module) -> np.ndarray:
    return torch_logits(model, IDS, attention_mask=MASK)


def test_lora_adapter_loads_in_peft_with_equal_logits(neox, adapted, tmp_path):
    _, model, path = neox
    tuned, params, ours = adapted
    tuning.export_peft(tuned, tmp_path, params=params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted({t.rsplit(".", 1)[1] for t in config["target_modules"]}) == [
        "dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert len(config["target_modules"]) == 4 * model.config.num_layers
    assert config["modules_to_save"] == ["gpt_neox.final_layer_norm"]
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert not np.allclose(ours, _hf_masked_logits(base), atol=1e-2)  # the adapter changes the model
    assert_real_tokens_close(ours, _hf_masked_logits(peft.PeftModel.from_pretrained(base, tmp_path).eval()))


def test_merged_export_loads_in_transformers_with_equal_logits(adapted, tmp_path):
    tuned, params, ours = adapted
    out = tuning.export_merged(tuned, tmp_path, params=params)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]
    assert_real_tokens_close(ours, _hf_masked_logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval()))
    again = hf.load_pretrained(out)  # and back into jaxtune, tensor by tensor
    assert_real_tokens_close(apply(again, IDS, MASK), ours)


def test_peft_adapter_on_the_fused_projection_imports_exactly(neox, tmp_path):
    """PEFT's own GPT-NeoX targets (``query_key_value``, ``dense_h_to_4h``), DoRA among them, become
    jaxtune adapters on the same modules."""
    _, model, path = neox
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                                                       target_modules=["query_key_value", "dense_h_to_4h"])).eval()
    theirs.save_pretrained(tmp_path)
    tuned = tuning.load_peft(model, tmp_path)
    assert sorted({m[-1] for m in tuned.adapters}) == ["dense_h_to_4h", "query_key_value"]
    ours = np.asarray(tuned.module.apply({"params": tuned.params}, input_ids=IDS, segment_ids=MASK))
    assert_real_tokens_close(ours, _hf_masked_logits(theirs))


@pytest.mark.parametrize("how", ["modules_to_save", "lora"])
def test_peft_adapter_saved_under_transformers_4_names_imports_exactly(neox, tmp_path, how):
    """transformers 4 named GPT-NeoX's output layer ``embed_out`` (5: ``lm_head``), so an adapter saved then
    trains or adapts ``embed_out``: it was refused as no module of the model, or failed with a KeyError. The
    adapter is peft's own, its names written back as transformers 4 wrote them."""
    _, model, path = neox
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    options = (dict(modules_to_save=["lm_head"], target_modules=["query_key_value"]) if how == "modules_to_save"
               else dict(target_modules=["query_key_value", "lm_head"]))
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)).eval()
    with torch.no_grad():  # a trained output layer, not the base's copy
        for name, param in theirs.named_parameters():
            if "lm_head" in name and param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    theirs.save_pretrained(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    safetensors.torch.save_file({k.replace(".lm_head.", ".embed_out."): v for k, v in tensors.items()},
                                tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = (tmp_path / "adapter_config.json").read_text()
    (tmp_path / "adapter_config.json").write_text(config.replace('"lm_head"', '"embed_out"'))
    assert "embed_out" in (tmp_path / "adapter_config.json").read_text()
    tuned = tuning.load_peft(model, tmp_path)
    ours = np.asarray(tuned.module.apply({"params": tuned.params}, input_ids=IDS, segment_ids=MASK))
    assert_real_tokens_close(ours, _hf_masked_logits(theirs))


def test_sequence_classifier_matches_transformers(tmp_path):
    """``GPTNeoXForSequenceClassification`` loads as body + ``score`` on the last non-pad token."""
    ref = tiny_neox(tmp_path, "GPTNeoXForSequenceClassification", num_labels=3)
    model = hf.load_pretrained(tmp_path)
    ids, mask, _ = padded_batch(12)
    ids, mask = ids[:1] * mask[:1], mask[:1]  # right padding with pad_token_id, where transformers pools
    np.testing.assert_allclose(apply(model, ids, mask), torch_logits(ref, ids, attention_mask=mask),
                               atol=TOL, rtol=0)


def test_a_new_classification_head_exports_to_transformers(tmp_path):
    """A head added by a plan is transformers' ``score``: the merged export runs as
    ``GPTNeoXForSequenceClassification`` on a padded batch and loads back into jaxtune."""
    tiny_neox(tmp_path / "base")
    tuned, params = trained(tmp_path, "base", tuning.lora(rank=2, targets=["dense"])
                            + tuning.head("classification", num_labels=3))
    assert tuned.hf_architecture == "GPTNeoXForSequenceClassification"
    ours = np.asarray(tuned.module.apply({"params": params}, IDS, MASK))
    out = tuning.export_merged(tuned, tmp_path / "out", params=params)
    theirs = transformers.GPTNeoXForSequenceClassification.from_pretrained(out).eval()
    np.testing.assert_allclose(ours, torch_logits(theirs, IDS, attention_mask=MASK), atol=TOL, rtol=0)
    np.testing.assert_allclose(apply(hf.load_pretrained(out), IDS, MASK), ours, atol=TOL, rtol=0)


def test_config_layouts_and_refusals():
    """A transformers v4 config.json (Pythia's: ``rotary_pct``, ``rotary_emb_base``, ``rope_scaling``) reads
    as the v5 one transformers makes of it; what jaxtune does not implement is refused naming the field."""
    v4 = dict(BASE, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], rotary_pct=0.5,
              rotary_emb_base=500, rope_scaling={"type": "linear", "factor": 2.0}, use_parallel_residual=False)
    v5 = transformers.GPTNeoXConfig.from_dict(v4).to_dict()
    assert "rope_parameters" in v5 and "rotary_pct" not in v5
    assert GPTNeoXConfig.from_hf(v4) == GPTNeoXConfig.from_hf(v5)
    rope = dict(GPTNeoXConfig.from_hf(v4).rope_scaling)
    assert rope["partial_rotary_factor"] == 0.5 and rope["factor"] == 2.0
    bare = {k: v for k, v in v4.items() if k not in ("rotary_pct", "rotary_emb_base", "rope_scaling")}
    assert dict(GPTNeoXConfig.from_hf(bare).rope_scaling)["partial_rotary_factor"] == 0.25  # transformers' default
    with pytest.raises(ValueError, match="hidden_act 'silu' is not supported by GPT-NeoX"):
        GPTNeoXConfig.from_hf({**v5, "hidden_act": "silu"})
    with pytest.raises(ValueError, match="rope type 'mrope' is not supported"):
        GPTNeoXConfig.from_hf({**v5, "rope_parameters": {"rope_type": "mrope"}})
    with pytest.raises(ValueError, match="head_dim 32 is not hidden_size / num_attention_heads"):
        GPTNeoXConfig.from_hf({**v5, "head_dim": 32})
    # Overrides are checked as config.json's values are: 4 longrope factors fit head_dim 16 at 0.5, not 32.
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5, "short_factor": [1.0] * 4,
                "long_factor": [1.0] * 4, "original_max_position_embeddings": 16}
    assert GPTNeoXConfig.from_hf({**v5, "rope_parameters": longrope}).head_dim == 16
    with pytest.raises(ValueError, match="short_factor has 4 entries"):
        GPTNeoXConfig.from_hf({**v5, "rope_parameters": longrope}, head_dim=32)


def test_older_checkpoint_layouts_load(neox, tmp_path):
    """Pythia's hub files carry each layer's causal-mask buffers (``attention.bias``, ``masked_bias``) and
    ``rotary_emb.inv_freq``, which are not parameters; a writer that names the output layer by its
    transformers 5 module (``lm_head.weight``, not ``embed_out.weight``) loads the same."""
    import warnings

    from safetensors.numpy import load_file, save_file

    ref, model, path = neox
    tensors = load_file(path / "model.safetensors")
    for i in range(model.config.num_layers):
        prefix = f"gpt_neox.layers.{i}.attention."
        tensors[prefix + "bias"] = np.tril(np.ones((1, 1, 8, 8), bool))
        tensors[prefix + "masked_bias"] = np.array(-1e9, np.float32)
        tensors[prefix + "rotary_emb.inv_freq"] = np.ones(2, np.float32)
    if "embed_out.weight" in tensors:
        tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "tensor(s) not used" warning
        again = hf.load_pretrained(tmp_path)
    ids, mask, positions = padded_batch(12)
    np.testing.assert_array_equal(apply(again, ids, mask, positions), apply(model, ids, mask, positions))


def test_partition_rules_place_the_projections_megatron_style(neox):
    """Column-parallel ``query_key_value``/``dense_h_to_4h``, row-parallel ``attention/dense``/``dense_4h_to_h``
    (the MLP's names contain ``dense`` too: each rule must pick its own), the norms replicated."""
    from jaxtune.training.sharding import MeshConfig, make_mesh, param_specs

    _, model, _ = neox
    P = jax.sharding.PartitionSpec
    specs = param_specs(model.params, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
                        hf.FAMILIES["GPTNeoXForCausalLM"].partition_rules)["layers_0-1"]
    assert specs["attention"]["query_key_value"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["mlp"]["dense_h_to_4h"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["attention"]["dense"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["mlp"]["dense_4h_to_h"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["input_layernorm"]["scale"] == P()


def test_prompt_tuning_matches_peft(neox, tmp_path):
    """Virtual tokens go through ``emb_dropout`` and the blocks as PEFT feeds them (``inputs_embeds``)."""
    from test_tuning_peft import peft_out

    _, model, path = neox
    tuned, params = trained(path.parent, path.name, tuning.prompt_tuning(5))
    tuning.export_peft(tuned, tmp_path, params=params)
    theirs = peft_out(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), tmp_path)
    assert theirs.shape[1] == 5 + IDS.shape[1]  # PEFT returns the virtual positions too
    assert_real_tokens_close(np.asarray(tuned.module.apply({"params": params}, input_ids=IDS, segment_ids=MASK)),
                             theirs[:, 5:])


def test_a_partial_plan_trains_the_last_block_and_the_output(neox):
    """``freeze_all_but(1)`` finds GPT-NeoX's blocks, its final LayerNorm and its output layer by the
    decoder family's names, as on every decoder."""
    _, model, _ = neox
    tuned = tuning.apply_plan(model, tuning.freeze_all_but(1))
    labels = {"/".join(p): label for p, label in flatten_dict(stacking.unstack(tuned.labels)).items()}
    assert all(label == "train" for p, label in labels.items() if p.startswith(("layers_1/", "norm/")))
    assert all(label == "freeze" for p, label in labels.items() if p.startswith(("layers_0/", "embed_tokens/"))
               and not (model.config.tie_word_embeddings and p.startswith("embed_tokens/")))
    assert labels.get("lm_head/kernel", "train") == "train"


def test_lora_dpo_run_learns(tmp_path):
    """LoRA-DPO from Python on Pythia's shape (with its dropouts set): fresh adapters make the policy the
    reference, so the base scores exactly log 2; the run learns the pairs."""
    import jaxtune as jt
    from jaxtune.data.testing import synthetic_preference_rows, tiny_tokenizer, write_jsonl

    tiny_neox(tmp_path / "pythia", hidden_dropout=0.1, attention_dropout=0.1)
    tiny_tokenizer().save_pretrained(tmp_path / "pythia")
    train, _ = jt.read(write_jsonl(tmp_path / "pairs.jsonl", synthetic_preference_rows(32, seed=0)), kind="preference")
    valid, _ = jt.read(write_jsonl(tmp_path / "valid.jsonl", synthetic_preference_rows(16, seed=1)), kind="preference")
    dpo = jt.Trainer(jt.apply_plan(jt.load(str(tmp_path / "pythia")), jt.lora(rank=4, alpha=8)), train, valid,
                     run_dir=tmp_path / "dpo", config=jt.TrainConfig(steps=8, log_every=4),
                     data=jt.DataConfig(batch_size=8, max_length=48), preference=jt.PreferenceConfig(method="dpo",
                                                                                                     beta=0.5),
                     optimizer=jt.OptimizerConfig(learning_rate=1e-2, schedule="constant")).fit()
    assert dpo.before["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert dpo.after["loss"] < dpo.before["loss"] - 0.05 and dpo.after["rewards/accuracy"] > 0.5


# What llama.cpp's converter (convert_hf_to_gguf.py, GPTNeoXModel) writes for GPTNeoXForCausalLM: these keys
# (jaxtune adds the vocabulary size and rope.freq_base, which llama.cpp reads and otherwise takes as 10000) and
# these tensors per layer, with the fused attn_qkv's rows regrouped [q | k | v].
GGUF_KEYS = {"gptneox.context_length": 64, "gptneox.embedding_length": 64, "gptneox.block_count": 2,
             "gptneox.feed_forward_length": 96, "gptneox.rope.dimension_count": 4, "gptneox.attention.head_count": 4,
             "gptneox.use_parallel_residual": True, "gptneox.attention.layer_norm_epsilon": 1e-5,
             "gptneox.rope.freq_base": 10000.0}
GGUF_BLOCK = ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")


def test_gguf_export_is_llama_cpps_and_reads_back_as_the_merged_model(tmp_path):
    """A LoRA-tuned GPT-NeoX exports as llama.cpp's ``gptneox`` file (names, keys and the regrouped fused
    projection as its converter writes them), which jaxtune's importer reads back as the merged model, tensor
    for tensor. (transformers' GGUF loader has no gptneox.) The exact-GELU model is written with a warning."""
    from gguf import GGUFReader
    from helpers import tiny_bpe_tokenizer
    from safetensors.numpy import load_file
    from test_tuning_lora import randomize_adapters

    from jaxtune.models.gguf import gguf_to_hf

    tiny_neox(tmp_path / "base", vocab_size=320, hidden_act="gelu_new")
    tiny_bpe_tokenizer("gpt2").save_pretrained(tmp_path / "base")
    tuned = tuning.apply_plan(hf.load_pretrained(tmp_path / "base"), tuning.lora(rank=4, alpha=8))
    tuned = dataclasses.replace(tuned, params=randomize_adapters(tuned.params), step=1)
    out = tuning.export(tuned, tmp_path / "gguf", format="gguf")
    reader = GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "gptneox"
    assert {key: reader.fields[key].contents() for key in GGUF_KEYS} == pytest.approx(GGUF_KEYS)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight"} | {
        f"blk.{i}.{part}.{leaf}" for i in range(2) for part in GGUF_BLOCK for leaf in ("weight", "bias")}
    merged = tuning.export_merged(tuned, tmp_path / "merged", dtype="float32")
    qkv = load_file(merged / "model.safetensors")["gpt_neox.layers.1.attention.query_key_value.bias"]
    per_head = qkv.reshape(4, 3, 16)  # HF's [heads, 3, head_dim]; the file's rows: all q, then all k, then all v
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_qkv.bias"].data),
                                  np.concatenate([per_head[:, i].reshape(-1) for i in range(3)]))

    back = gguf_to_hf(out, tmp_path / "back")
    expected, found = load_file(merged / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(found) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(found[name], value, err_msg=name)
    original, read = (transformers.AutoTokenizer.from_pretrained(tmp_path / d) for d in ("base", "back"))
    texts = ["the quick brown fox 12345", "  hello   world\n\nok?", "<|im_start|>user hi<|im_end|>"]
    assert [read(t)["input_ids"] for t in texts] == [original(t)["input_ids"] for t in texts]
    again = hf.load_pretrained(back)
    assert again.config.activation == "gelu_new"
    np.testing.assert_allclose(apply(again, IDS, MASK),
                               np.asarray(tuned.module.apply({"params": tuned.params}, IDS, MASK)), atol=TOL, rtol=0)

    pythia = dataclasses.replace(tuned, hf_config={**tuned.hf_config, "hidden_act": "gelu"})
    with pytest.warns(UserWarning, match="llama.cpp's gptneox computes GELU's tanh form"):
        tuning.export(pythia, tmp_path / "exact", format="gguf")


def test_gguf_export_refuses_what_llama_cpp_cannot_run():
    """llama.cpp's gptneox needs an untied output.weight and the attention biases: a config without either
    is refused before anything is written, naming the setting (as is RoPE scaling, as for every family)."""
    from jaxtune.models.gguf import GGUFError
    from jaxtune.models.gguf_export_families import check_architecture

    config = transformers.GPTNeoXConfig(**BASE, hidden_act="gelu_new").to_dict()
    config["architectures"] = ["GPTNeoXForCausalLM"]
    assert check_architecture(config) == "gptneox"
    for change, refused in ((dict(tie_word_embeddings=True), "GPT-NeoX with tie_word_embeddings has no GGUF export"),
                            (dict(attention_bias=False), "GPT-NeoX with attention_bias false has no GGUF export"),
                            (dict(hidden_act="relu"), "GPT-NeoX hidden_act 'relu' has no GGUF export"),
                            (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4,
                                                   "partial_rotary_factor": 0.25}), "RoPE scaling 'linear'")):
        with pytest.raises(GGUFError, match=refused):
            check_architecture({**config, **change})
