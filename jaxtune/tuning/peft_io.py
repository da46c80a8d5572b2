"""Export at the edges: a tuned model written as a merged Hugging Face directory, a PEFT adapter or a GGUF file.

- :func:`export`: the one export call; :func:`export_format` resolves ``auto`` and says why a
  format is impossible, :func:`check_peft` does so from the plan alone, before training.
- :func:`export_merged`: adapters folded into the weights, written as an HF directory that
  ``transformers`` loads (``*ForCausalLM``, or ``*ForSequenceClassification`` for the HF-shaped
  heads).
- :func:`export_peft`: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key
  names (``base_model.model.<hf module>.lora_A.weight`` ``(r, in)``, ``lora_B.weight``
  ``(out, r)``, ``lora_magnitude_vector`` ``(out,)``, ``prompt_embeddings`` ``(P, D)``); trained
  non-adapter modules (and a new head) are saved whole as ``modules_to_save``.
- ``format="gguf"``: the merged weights, as the merged directory would hold them, written from memory
  into one ``.gguf`` file for llama.cpp / Ollama by :func:`jaxtune.models.gguf_export.write_gguf`.

The jaxtune path -> HF module name mapping (:func:`hf_module_name`), the PEFT key names and
:class:`ExportError` live here too; :mod:`jaxtune.tuning.peft_import` reads adapters back with them.
On a tied model (SmolLM2, Qwen2.5) PEFT keeps ``embed_tokens`` and ``lm_head`` one matrix only with
``ensure_weight_tying``, so export sets it when a tied ``embed_tokens`` is trained.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

from jaxtune import processes
from jaxtune.models import gguf_export, gguf_export_families, gguf_export_vocabulary, hf, stacking, vit
from jaxtune.models.layers import ADAPTER_LEAVES, LORA_A, LORA_B, MAGNITUDE
from jaxtune.models.load import ADAPTER_CONFIG, base_model_name, dtype_name, model_of
from jaxtune.tuning.heads import hf_head_modules
from jaxtune.tuning.labels import FROZEN, HEAD_KEY, PROMPT_LEAF, path_str
from jaxtune.tuning.lora import merge
from jaxtune.tuning.tuned import Tuned, is_image

Params = dict[str, Any]
Module = tuple[str, ...]
# Key prefixes of an adapter's base-model tensors: PEFT's PeftModel wraps a LoRA model in a LoraModel
# ("base_model.model.<module>"), a prompt-learning one directly ("base_model.<module>").
PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Adapter leaf -> (PEFT key suffix, transpose to PyTorch layout)
PEFT_LEAVES = {LORA_A: ("lora_A.weight", True), LORA_B: ("lora_B.weight", True),
                MAGNITUDE: ("lora_magnitude_vector", False)}


log = logging.getLogger(__name__)


class ExportError(ValueError):
    """A tuned model cannot be written (or an adapter read) in the requested format."""


# ----------------------------------------------------------------------------- names


def unexportable_head(tuned: Tuned) -> str:
    """Why ``tuned``'s head has no transformers class, which heads do, and what to do instead."""
    head = tuned.head
    extras = "".join(f", {k} {v}" for k, v in (("hidden", list(head.hidden)), ("extra_blocks", head.extra_blocks))
                     if v)
    if tuned.is_decoder:
        exports = ("pooling last into a bias-free layer, no hidden layers or extra blocks "
                   "(*ForSequenceClassification): {action: head, pooling: last, bias: false}")
    elif tuned.config.classifier_layout.pooling != "pooler":  # RoBERTa, DistilBERT, ModernBERT, ViT, DINOv2
        layout, classifier = tuned.config.classifier_layout, family_of(tuned).classifier
        pooled = {"cls": "the first token", "cls_mean": "the first token ++ the mean of the others"}.get(
            layout.pooling, f"the {layout.pooling} of the tokens")
        between = layout.dense + ((layout.norm,) if layout.norm else ())
        exports = (f"the family's classifier ({classifier}: {pooled}"
                   f"{' through ' + ', '.join(between) if between else ''} into {layout.out}): "
                   "{action: head} with its defaults")
    elif "pooler" in tuned.params:
        exports = ("BERT's pooler into a layer with bias, no hidden layers or extra blocks "
                   "(BertForSequenceClassification): {action: head, pooling: pooler}")
    else:
        exports = "none on this model: it has no BERT pooler, which BertForSequenceClassification reads"
    return (f"the {head.task} head (pooling {head.pooling}{extras}) has no transformers class, so it cannot be "
            f"exported; the head that exports is {exports}. Change the plan's head rule and train again, or keep "
            "this run: its checkpoints predict (jaxtune predict RUN_DIR FILE, or jaxtune.predict(RUN_DIR, FILE))")


def hf_module_name(tuned: Tuned, module: Module) -> str:
    """The transformers module name of a jaxtune module path in ``tuned``'s tree, e.g.
    ``("layers_0", "self_attn", "q_proj")`` -> ``"model.layers.0.self_attn.q_proj"``,
    ``("head", "out")`` -> ``"score"`` / ``"classifier"`` / ``"classifier.out_proj"``."""
    if module[0] == HEAD_KEY:
        names = hf_head_modules(tuned.head, tuned.config)
        if names is None or len(module) != 2 or module[1] not in names:
            raise ExportError(f"{path_str(module)}: {unexportable_head(tuned)}")
        return names[module[1]]
    if not tuned.is_decoder and tuned.head is not None and tuned.hf_architecture is not None:
        module = (tuned.config.classifier_layout.body,) + module
    return family_of(tuned).hf_module(module)


def family_of(tuned: Tuned) -> hf.Family:
    """The HF family (:data:`jaxtune.models.families.FAMILIES` row) of ``tuned``'s architecture."""
    return hf.FAMILIES[tuned.architecture]


def hf_module_names(tuned: Tuned, modules: Sequence[Module]) -> dict[str, Module]:
    """HF module name -> module, for the modules of ``tuned`` that have one (a jaxtune-only head has none)."""
    names = hf_head_modules(tuned.head, tuned.config) if tuned.head is not None else {}
    return {hf_module_name(tuned, m): m for m in modules
            if m[0] != HEAD_KEY or (names and len(m) == 2 and m[1] in names)}


def modules_of(params: Params) -> dict[Module, dict[str, Any]]:
    """Module path -> its leaves (name -> array) of a nested param tree (a prompt's virtual tokens aside)."""
    modules: dict[Module, dict[str, Any]] = {}
    for path, leaf in flatten_dict(params).items():
        if path != (PROMPT_LEAF,):
            modules.setdefault(path[:-1], {})[path[-1]] = leaf
    return modules


def _torch_name(leaf: str) -> str:
    return "bias" if leaf == "bias" else "weight"


def _to_torch(value: Any, transpose: bool) -> np.ndarray:
    array = np.asarray(jax.device_get(value), dtype=np.float32)
    return np.ascontiguousarray(array.T if transpose else array)


# ----------------------------------------------------------------------------- merged HF directory


def _label_fields(hf_config: dict[str, Any], task: str, num_outputs: int,
                  names: Sequence[Any] | None = None) -> dict[str, Any]:
    """``config.json`` fields that make transformers build a head of ``num_outputs`` for ``task``;
    the classes are named by ``names`` (the training data's labels) where given."""
    config = {k: v for k, v in hf_config.items() if k not in ("num_labels", "id2label", "label2id")}
    old = {str(i): str(n) for i, n in enumerate(names or ())} or hf_config.get("id2label") or {}
    id2label = {str(i): old.get(str(i), f"LABEL_{i}") for i in range(num_outputs)}
    return {**config, "id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()},
            "problem_type": "regression" if task == "regression" else "single_label_classification"}


def _export_config(tuned: Tuned, tokenizer_from: str | Path | None) -> dict[str, Any]:
    """The base's ``config.json`` with what the tuned model changed: an output layer untied by a PEFT
    import (jaxtune then holds two matrices), and for decoder heads a ``pad_token_id``, without which
    transformers' ``*ForSequenceClassification`` cannot find the last token of a padded batch."""
    config = dict(tuned.hf_config)
    if tuned.is_decoder and bool(config.get("tie_word_embeddings")) and not tuned.config.tie_word_embeddings:
        config["tie_word_embeddings"] = False
    if tuned.is_decoder and tuned.head is not None:
        config["pad_token_id"] = pad_token_id(config, tokenizer_from)
    return config


def pad_token_id(hf_config: dict[str, Any], tokenizer_from: str | Path | None) -> int | None:
    """The ``pad_token_id`` a decoder head's export writes: the config's, else the tokenizer's pad
    token id, else the config's (first) eos id (what tokenizers without a pad token are usually padded
    with). transformers pools the last token that is not this id, jaxtune the last real one: the two
    agree unless an input itself ends with that id (a reward model's plain answers end with EOS, so
    its loss pools as transformers does, :func:`jaxtune.training.reward_model.reward_pad_id`)."""
    if hf_config.get("pad_token_id") is not None:
        return hf_config["pad_token_id"]
    if tokenizer_from is not None and (Path(tokenizer_from) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        try:
            pad = AutoTokenizer.from_pretrained(tokenizer_from).pad_token_id
        except (OSError, ValueError, KeyError):
            pad = None
        if pad is not None:
            return int(pad)
    eos = hf_config.get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos


def _merged_params(tuned: Tuned, params: Params | None, dtype: Any | None) -> Params:
    """The params with the adapters folded in, in HF's per-layer layout; each merged kernel rounded once, to
    ``dtype``. Nothing is computed yet (merged kernels deferred, layers unsliced, quantized leaves kept):
    :func:`jaxtune.models.hf.hf_tensors` computes each tensor as it is written, one at a time."""
    return merge(stacking.unstack(tuned.params if params is None else params, lazy=True), dtype, deferred=True)[0]


def export_merged(
    tuned: Tuned,
    out_dir: str | Path,
    *,
    params: Params | None = None,
    dtype: Any | None = None,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Fold adapters into the weights and write an HF directory that transformers loads.

    ``params`` default to ``tuned.params`` (pass the trained ones); ``dtype`` of the stored
    tensors defaults to each leaf's own; tokenizer files are copied from ``tokenizer_from``
    (default: the base checkpoint's directory).
    """
    if tuned.prompt_tokens:
        raise ExportError("prompt tuning has no merged form (virtual tokens are not weights); use export_peft")
    arch = tuned.hf_architecture
    if arch is None:
        hf_module_name(tuned, (HEAD_KEY, "out"))  # raises the explanation
    merged = _merged_params(tuned, params, dtype)
    body = {k: v for k, v in merged.items() if k != HEAD_KEY}
    source = Path(tuned.source)
    tokenizer_from = tokenizer_from if tokenizer_from is not None else (source if source.is_dir() else None)
    hf_config = _export_config(tuned, tokenizer_from)
    if tuned.head is None:
        return hf.save_pretrained(body, hf_config, out_dir, architecture=arch, dtype=dtype,
                                  tokenizer_from=tokenizer_from)
    config = _label_fields(hf_config, tuned.task, tuned.num_outputs, tuned.label_names)
    if not tuned.is_decoder:
        layout = tuned.config.classifier_layout
        if layout.pooling != "pooler":
            body.pop("pooler", None)  # RoBERTa's classifier reads the first token; its checkpoint has no pooler
        return hf.save_pretrained({layout.body: body, HEAD_KEY: merged[HEAD_KEY]}, config, out_dir,
                                  architecture=arch, dtype=dtype, tokenizer_from=tokenizer_from)
    # jaxtune loads only the causal-LM classes, so the decoder family writes the tensors ("score"
    # sits beside "model" as lm_head does) and the config then names the classification class.
    out = hf.save_pretrained({**body, "score": merged[HEAD_KEY]["out"]}, config, out_dir,
                             architecture=tuned.architecture, dtype=dtype, tokenizer_from=tokenizer_from)
    written = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**written, "architectures": [arch]}, indent=2, sort_keys=True))
    return out


# ----------------------------------------------------------------------------- PEFT export


def _trained_base_modules(tuned: Tuned) -> set[Module]:
    """Modules whose base leaves (not adapter leaves) train."""
    flat_labels = flatten_dict(stacking.unstack(tuned.labels))
    return {path[:-1] for path, label in flat_labels.items()
            if label != FROZEN and path[-1] not in ADAPTER_LEAVES and path != (PROMPT_LEAF,)}


def _modules_to_save(tuned: Tuned, params: Params) -> list[Module]:
    """Modules holding trained base leaves, plus the head (PEFT saves modules whole). A head is saved even
    when frozen: PEFT's SEQ_CLS adapters always wrap the classifier and expect its weights in the file.
    (:func:`check_peft` has refused modules that are both saved whole and adapted.)"""
    chosen = _trained_base_modules(tuned)
    if tuned.head is not None:
        chosen |= {p[:-1] for p in flatten_dict(params) if p[0] == HEAD_KEY and p[:-1] not in tuned.adapters}
    return sorted(chosen)


def check_peft(tuned: Tuned) -> None:
    """Raise :class:`ExportError` (saying why) when ``tuned``'s plan has no PEFT adapter form: what
    :func:`export_peft` would refuse, decided from the plan alone, so before any training."""
    if not (tuned.adapters or tuned.prompt_tokens):
        raise ExportError("the plan has no LoRA, DoRA or prompt adapter, so there is no PEFT adapter to write; "
                          "export format merged")
    if tuned.adapters and tuned.prompt_tokens:
        raise ExportError("a PEFT adapter is either LoRA/DoRA or prompt tuning; this plan has both, and a merged "
                          "export cannot hold prompt tuning: train LoRA first, export it merged, then prompt-tune that")
    # transformers keeps ViT's cls_token and position_embeddings as parameters of no module of their own,
    # and PEFT's modules_to_save saves whole modules: an adapter would name them and PEFT would drop them.
    bare = sorted(path_str(path[:-1]) for path, label in flatten_dict(stacking.unstack(tuned.labels)).items()
                  if label != FROZEN and path[-1] == vit.TENSOR_LEAF)
    if bare:
        raise ExportError(f"{bare[0]} (and {len(bare) - 1} more) trains as a bare tensor, which transformers keeps as "
                          "a parameter of no module of its own, so a PEFT adapter cannot carry it (PEFT loads it "
                          "without a word and drops it): export format merged, or freeze it")
    if tuned.adapters:
        _refuse_moe_adapters(tuned)
        both = sorted(path_str(m) for m in _trained_base_modules(tuned) if m in tuned.adapters)
        if both:
            raise ExportError(f"module(s) {both[:5]} are trained directly and carry an adapter; PEFT cannot express "
                              "both for one module. Freeze their base weights, or export merged")
        _lora_config(tuned)  # one use_dora / use_rslora setting per adapter


def _lora_config(tuned: Tuned) -> dict[str, Any]:
    specs = tuned.adapters
    kinds = {s.kind for s in specs.values()}
    rslora = {s.rslora for s in specs.values()}
    if len(kinds) > 1 or len(rslora) > 1:
        raise ExportError("one PEFT adapter has one use_dora and one use_rslora setting; this plan mixes "
                          f"{sorted(kinds)} adapters with rslora {sorted(rslora)}")
    rank = Counter(s.rank for s in specs.values()).most_common(1)[0][0]
    alpha = Counter(s.alpha for s in specs.values()).most_common(1)[0][0]
    names = {m: hf_module_name(tuned, m) for m in specs}
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", name): escaped full names are exact.
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": tuned.config.adapter_dropout,
        "target_modules": sorted(names.values()),
        "rank_pattern": {re.escape(names[m]): s.rank for m, s in specs.items() if s.rank != rank},
        "alpha_pattern": {re.escape(names[m]): s.alpha for m, s in specs.items() if s.alpha != alpha},
        "use_dora": kinds == {"dora"},
        "use_rslora": rslora == {True},
        "bias": "none",
        # GPT-2's Conv1D stores (in, out); PEFT applies this per layer (and resets it on nn.Linear layers).
        "fan_in_fan_out": any(not family_of(tuned).kernel_out_in(m) for m in specs),
        "init_lora_weights": True,
    }


def not_a_peft_linear(family: hf.Family, module: Module) -> bool:
    """Whether transformers holds ``module`` (a jaxtune linear) as no ``nn.Linear`` that PEFT's LoRA can
    target: a MoE layer's experts (fused 3-D parameters) or its router."""
    return family.expert_tensor is not None and (bool(family.expert_tensor(module + ("kernel",), 0))
                                                 or module[-2:] == ("mlp", "gate"))


def _refuse_moe_adapters(tuned: Tuned) -> None:
    """transformers 5 keeps a MoE layer's experts as fused 3-D parameters (``experts.gate_up_proj``) and its
    router as a bare parameter, not ``nn.Linear`` modules, so PEFT's ``target_modules`` cannot name them
    (its ``target_parameters`` adapters share one A per fused gate/up pair): refuse rather than write an
    adapter that loads wrong."""
    bad = [m for m in tuned.adapters if not_a_peft_linear(family_of(tuned), m)]
    if bad:
        raise ExportError(f"{path_str(bad[0])} (and {len(bad) - 1} more) carries LoRA on a MoE layer's experts or "
                          "router, which a PEFT adapter for transformers' fused expert parameters cannot express; "
                          "use export_merged, or LoRA only the attention (and train the router whole)")


def _on_host_only(params: Params, adapters: set[Module], saved: set[Module]) -> Params:
    """The leaves of ``params`` (physical layout) a PEFT adapter holds, as numpy arrays in one transfer: the
    adapter leaves of the ``adapters`` modules, every leaf of the ``saved`` modules (logical paths), the prompt.
    That is a small part of the model: unstacked on the device, each frozen layer's slice was an op of its own
    (seconds for a 135M decoder), then unused."""
    def wanted(path: tuple[str, ...]) -> bool:
        if path == (PROMPT_LEAF,):
            return True
        layers = stacking.stack_range(path[0])
        modules = [path[:-1]] if layers is None else [(f"{stacking.PREFIX}_{i}", *path[1:-1]) for i in layers]
        return any(m in saved or (m in adapters and path[-1] in PEFT_LEAVES) for m in modules)

    kept = {path: leaf for path, leaf in flatten_dict(params).items() if wanted(path)}
    return unflatten_dict(jax.device_get(kept))


def export_peft(tuned: Tuned, out_dir: str | Path, *, params: Params | None = None) -> Path:
    """Write ``tuned``'s adapter (LoRA, DoRA or prompt tuning) as a PEFT adapter directory.

    ``peft.PeftModel.from_pretrained(<transformers base model>, out_dir)`` then computes the same
    outputs. The base is ``*ForCausalLM`` for task ``lm`` and ``*ForSequenceClassification``
    (with the right ``num_labels``, and ``pad_token_id`` when the base config has none: transformers'
    decoder classifiers need it for batches > 1) for heads. Tensors are written float32.
    """
    params = tuned.params if params is None else params
    if tuned.head is not None and tuned.hf_architecture is None:
        hf_module_name(tuned, (HEAD_KEY, "out"))  # raises the explanation
    check_peft(tuned)
    to_save = _modules_to_save(tuned, params)  # the head is never stacked: its paths are the same in either layout
    params = stacking.unstack(_on_host_only(params, set(tuned.adapters), set(to_save)))  # PEFT names layers 1 by 1
    modules = modules_of(params)
    tensors: dict[str, np.ndarray] = {}
    prefix = PREFIX if tuned.adapters else PROMPT_PREFIX
    for module in tuned.adapters:
        name = prefix + hf_module_name(tuned, module)
        for leaf, (suffix, transpose) in PEFT_LEAVES.items():
            if leaf in modules[module]:
                tensors[f"{name}.{suffix}"] = _to_torch(modules[module][leaf], transpose)
    for module in to_save:
        name = prefix + hf_module_name(tuned, module)
        for leaf, value in modules[module].items():
            tensors[f"{name}.{_torch_name(leaf)}"] = _to_torch(value, hf.stored_transposed(family_of(tuned),
                                                                                           module + (leaf,)))
    if tuned.adapters:
        config = _lora_config(tuned)
        if tuned.is_decoder and tuned.config.tie_word_embeddings and ("embed_tokens",) in to_save:
            # Without ensure_weight_tying PEFT trains a tied embed_tokens alone and keeps the old output
            # matrix; with it, lm_head's copy is tied to the embedding's (PEFT writes that copy too).
            embedding = prefix + hf_module_name(tuned, ("embed_tokens",)) + ".weight"
            tensors[prefix + hf_module_name(tuned, ("lm_head",)) + ".weight"] = tensors[embedding]
            config["ensure_weight_tying"] = True
    else:  # prompt tuning (check_peft refused a plan with neither)
        cfg = tuned.config
        tensors["prompt_embeddings"] = _to_torch(params[PROMPT_LEAF], False)
        # RANDOM init: PEFT then builds the embedding without a tokenizer and loads our weights.
        config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": tuned.prompt_tokens,
                  "token_dim": cfg.hidden_size, "num_transformer_submodules": 1, "num_attention_heads": cfg.num_heads,
                  "num_layers": cfg.num_layers, "prompt_tuning_init": "RANDOM"}
    config.update({
        # PEFT's SEQ_CLS wrapper feeds input_ids; an image model is wrapped as a plain PeftModel.
        "task_type": "CAUSAL_LM" if tuned.task == "lm" else None if is_image(tuned.config) else "SEQ_CLS",
        "base_model_name_or_path": base_model_name(tuned.source),
        # A head is saved as its top module (RoBERTa's whole "classifier"), as PEFT's SEQ_CLS does.
        "modules_to_save": list(dict.fromkeys(hf_module_name(tuned, m).split(".")[0] if m[0] == HEAD_KEY
                                              else hf_module_name(tuned, m) for m in to_save)) or None,
        "inference_mode": True,
    })
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


# ----------------------------------------------------------------------------- the one export call

EXPORT_FORMATS = ("auto", "peft", "merged", "gguf")
GGUF_FILE = "model.gguf"  # the file a GGUF export writes in a directory it is given


def export_format(tuned: Tuned, format: str = "auto") -> str:  # noqa: A002 - the user-facing name
    """The format ``format`` resolves to for ``tuned`` (``peft``, ``merged`` or ``gguf``); raises
    :class:`ExportError` saying why when the model has no such form.

    ``auto`` is a PEFT adapter when the plan has adapters (LoRA, DoRA, prompt) that PEFT can
    express (:func:`check_peft`), else a merged HF directory. ``gguf`` is never chosen by ``auto``.
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"export format {format!r} is unknown; choose one of {', '.join(EXPORT_FORMATS)}")
    if format == "gguf":
        _check_gguf(tuned)
        return format
    fmt = format if format != "auto" else ("peft" if (tuned.adapters or tuned.prompt_tokens) else "merged")
    if tuned.head is not None and tuned.hf_architecture is None:
        raise ExportError(unexportable_head(tuned))
    if fmt == "peft":
        try:
            check_peft(tuned)
        except ExportError as err:
            if format != "auto" or tuned.prompt_tokens:
                raise
            log.info("export: %s; auto writes a merged HF directory instead", err)
            fmt = "merged"
    if fmt == "merged" and tuned.prompt_tokens:
        raise ExportError("prompt tuning has no merged form (virtual tokens are not weights); export format peft")
    return fmt


def _check_gguf(tuned: Tuned) -> None:
    """Why ``tuned`` has no GGUF form, if it has none: llama.cpp runs plain causal language models of
    the families :mod:`jaxtune.models.gguf_export` writes, with a tokenizer it writes."""
    if tuned.prompt_tokens:
        raise ExportError("prompt tuning has no GGUF form (virtual tokens are not weights); export format peft")
    if tuned.head is not None:
        raise ExportError("a classifier head has no GGUF form (llama.cpp runs causal language models); export "
                          "format merged")
    config = {**tuned.hf_config, "architectures": [tuned.hf_architecture]}
    try:
        gguf_export_families.check_architecture(config, "model")
        gguf_export_vocabulary.check_tokenizer(tuned.source, config.get("vocab_size", 0))
    except ValueError as err:
        raise ExportError(str(err)) from None


def export(model: Any, out_dir: str | Path, *, format: str = "auto", dtype: Any | None = None,  # noqa: A002
           overwrite: bool = False) -> Path:
    """Write a tuned model in a standard format: a PEFT adapter that ``peft`` loads onto the
    transformers base model, (``format="merged"``) an HF directory with the adapters folded
    in that ``transformers`` loads, or (``format="gguf"``) those merged weights, the tokenizer and
    the chat template as one GGUF file that llama.cpp and Ollama load (the families of
    :data:`jaxtune.models.gguf_export_families.GGUF_EXPORT_ARCHITECTURES`).
    ``dtype`` (merged and GGUF only) of the stored weights; GGUF also takes ``"q8_0"``.

    ``out_dir`` is new, empty, or an earlier export of the same format, which this one replaces;
    ``overwrite=True`` replaces an earlier export of another format too. A directory holding
    anything else is refused: files of two exports side by side would load as neither. A GGUF
    export writes ``out_dir`` itself when it ends in ``.gguf``, else ``out_dir/model.gguf``; an
    existing file is replaced only with ``overwrite=True``, which also removes an earlier PEFT or
    merged export in ``out_dir`` (a run's ``export/`` whose ``output.export`` changed on resume).

    Pass the trained model (``Trainer.fit().model``, or the ``fit()`` result itself): a model
    straight from ``apply_plan`` has its fresh, untrained adapters, and exporting it says so in a warning.
    """
    model = _trained(model)
    fmt = export_format(model, format)
    if dtype == "q8_0" and fmt != "gguf":
        raise ExportError(f"dtype q8_0: applies to GGUF exports, and this one is {fmt} (format gguf: jaxtune export "
                          "--gguf; or a float dtype)")
    if dtype != "q8_0":
        dtype = None if dtype is None else dtype_name(dtype, "dtype")
    if fmt == "peft" and dtype is not None:
        raise ExportError(f"dtype {dtype}: applies to merged exports; a PEFT adapter is written float32 (drop the "
                          "dtype, or export merged)")
    out = Path(out_dir)
    if fmt == "gguf":
        file = _gguf_file(out, overwrite)
        # Only overwrite clears the directory: without it a .gguf may sit beside other files, as it always could
        earlier = _earlier_export(out) if overwrite and file != out else None
        earlier, out = (None if earlier == "gguf" else earlier), file  # the file itself is replaced whole
    else:
        earlier = _check_export_dir(out, fmt, overwrite)
    if model.step == 0:
        log.warning("exporting %s at step 0: these are the plan's untrained weights (export the model that "
                    "Trainer.fit() returns)", out_dir)
    if processes.several():
        # Every process of a multi-host run exports: all take part in gathering the params split over
        # their devices (one collective a param: process 0, which keeps them all, may run out of memory
        # between two), and once all have looked at the directory, process 0 alone writes it.
        with processes.stop_together(lambda: f"gathering the params to export to {out}"):
            params = processes.on_host(model.params, keep=jax.process_index() == 0)
        model = dataclasses.replace(model, params=params) if params is not None else model
        processes.barrier(f"jaxtune_export_checked:{out.absolute()}")

    def write() -> Path:
        if fmt == "gguf":  # the earlier export goes once the file is whole, not before
            export_gguf(model, out, dtype=dtype)
            _clear_export_dir(out.parent, earlier)
            return out
        _clear_export_dir(out, earlier)
        return export_peft(model, out) if fmt == "peft" else export_merged(model, out, dtype=dtype)

    processes.write_once(write, f"the export to {out}")
    return out


def export_gguf(tuned: Tuned, out_file: str | Path, *, params: Params | None = None, dtype: str | None = None) -> Path:
    """Fold adapters into the weights and write them, with the tokenizer and chat template, as the
    GGUF file ``out_file`` (replaced if it exists); ``dtype``: ``float32``, ``float16``, ``bfloat16``,
    ``q8_0`` or None (each weight's own). The file is the one :func:`export_merged`'s directory converts
    to, written from the merged params in memory, one tensor at a time (no merged copy on disk), under a
    temporary name beside ``out_file``: it appears whole or not at all."""
    _check_gguf(tuned)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Q8_0 blocks are quantized from float32: the merge is not rounded twice
    merged_dtype = "float32" if dtype == "q8_0" else dtype
    body = {k: v for k, v in _merged_params(tuned, params, merged_dtype).items() if k != HEAD_KEY}
    config = {**_export_config(tuned, tuned.source), "architectures": [tuned.hf_architecture]}
    tensors = hf.hf_tensors(body, config, architecture=tuned.hf_architecture, dtype=merged_dtype)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        partial = Path(tmp) / out.name
        gguf_export.write_gguf(tensors, config, tuned.source, partial, dtype, name=Path(tuned.source).name)
        os.replace(partial, out)
    return out


def _gguf_file(out: Path, overwrite: bool) -> Path:
    """The file a GGUF export to ``out`` writes (``out`` itself when it ends in ``.gguf``, else
    ``out/model.gguf``), refused when it exists and ``overwrite`` is not given."""
    named = out.suffix.lower() == ".gguf"
    path = out if named else out / GGUF_FILE
    if not named and out.exists() and not out.is_dir():
        raise ExportError(f"{out}: a file, not a directory or a .gguf path; export to DIR or DIR/NAME.gguf")
    if path.is_dir():
        raise ExportError(f"{path}: a directory; export to a .gguf file path")
    if path.exists() and not overwrite:
        raise ExportError(f"{path}: exists; export to another path, or replace it with overwrite=True "
                          "(jaxtune export --overwrite)")
    return path


def _trained(model: Any) -> Tuned:
    """``model``, or the trained model of a ``Trainer.fit()`` result (:func:`~jaxtune.models.load.model_of`);
    anything but a tuned model is refused, naming what to pass."""
    model = model_of(model)
    if isinstance(model, Tuned):
        return model
    raise TypeError(f"model: expected a tuned model (Trainer.fit().model, or jaxtune.apply_plan(...) of a loaded "
                    f"model), got {type(model).__name__}")


def _check_export_dir(out: Path, fmt: str, overwrite: bool) -> str | None:
    """Whether ``out`` may take an export of format ``fmt``, reading only: absent or empty as it is
    (returns None); an earlier export of the same format (a run exported again), or of either format
    with ``overwrite`` (returns that format: :func:`_clear_export_dir` removes its files). Anything
    else is refused, naming what is there: files of two exports side by side load as neither."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: a file, not a directory; export into a new or empty directory")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return None
    earlier = _earlier_export(out)
    if earlier is None:
        raise ExportError(f"{out}: not empty and not an earlier export (holds {', '.join(held[:3])}"
                          f"{', ...' if len(held) > 3 else ''}); export into a new or empty directory")
    if earlier != fmt and not overwrite:
        raise ExportError(f"{out}: holds an earlier {earlier} export, and this one is {fmt}: their files side by side "
                          "would load as neither; export into a new or empty directory, or replace it with "
                          "overwrite=True (jaxtune export --overwrite)")
    return earlier


def _earlier_export(out: Path) -> str | None:
    """The format of the export in directory ``out`` (``peft``, ``merged``, ``gguf``), None when it holds none."""
    held = {p.name for p in out.iterdir()} if out.is_dir() else set()
    return ("peft" if ADAPTER_CONFIG in held else "merged" if "config.json" in held
            else "gguf" if GGUF_FILE in held else None)


def _clear_export_dir(out: Path, earlier: str | None) -> None:
    """Remove the config and weight files of the ``earlier`` export in ``out`` (see :func:`_check_export_dir`):
    a new export may have fewer shards."""
    if earlier is None:
        return
    for path in out.iterdir():
        if not path.is_file():
            continue
        if (path.name == GGUF_FILE if earlier == "gguf" else
                path.name.endswith((".safetensors", ".safetensors.index.json"))
                or path.name in ("config.json", ADAPTER_CONFIG, "generation_config.json")):
            path.unlink()
