"""Export and import at the edges: merged Hugging Face directories and PEFT adapters.

- :func:`export_merged`: adapters folded into the weights, written as an HF directory that
  ``transformers`` loads (``*ForCausalLM``, or ``*ForSequenceClassification`` for the HF-shaped
  heads).
- :func:`export_peft`: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key
  names (``base_model.model.<hf module>.lora_A.weight`` ``(r, in)``, ``lora_B.weight``
  ``(out, r)``, ``lora_magnitude_vector`` ``(out,)``, ``prompt_embeddings`` ``(P, D)``); trained
  non-adapter modules (and a new head) are saved whole as ``modules_to_save``.
- :func:`load_peft`: an existing PEFT adapter onto a loaded base model, ready to train further.

On a tied model (SmolLM2, Qwen2.5) PEFT keeps ``embed_tokens`` and ``lm_head`` one matrix only with
``ensure_weight_tying``; otherwise a trained or adapted end leaves the other as it was, so import
unties them and export sets ``ensure_weight_tying``. Adapters whose meaning jaxtune cannot
reproduce (PiSSA/OLoRA-style inits, LoRA on an embedding, pickle files) are refused with the fix.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

from jaxtune.models import decoder, encoder, hf, stacking
from jaxtune.models.layers import ADAPTER_LEAVES, LORA_A, LORA_B, MAGNITUDE
from jaxtune.tuning.heads import hf_head_name
from jaxtune.tuning.labels import FROZEN, HEAD_KEY, PROMPT_LEAF, path_str
from jaxtune.tuning.lora import merge
from jaxtune.tuning.partition import cast_by_label
from jaxtune.tuning.plan import Plan, Rule
from jaxtune.tuning.tuned import Tuned, apply_plan

Params = dict[str, Any]
Module = tuple[str, ...]
PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Adapter leaf -> (PEFT key suffix, transpose to PyTorch layout)
_PEFT_LEAVES = {LORA_A: ("lora_A.weight", True), LORA_B: ("lora_B.weight", True),
                MAGNITUDE: ("lora_magnitude_vector", False)}
# Keys of adapter tensors (everything else in an adapter file is a modules_to_save tensor).
_ADAPTER_KEY = re.compile(r"\.(lora_A|lora_B)\.weight$|\.lora_magnitude_vector(\.weight)?$")
# Infix of the frozen base tensor that PEFT writes for an adapted lm_head/embed_tokens.
_BASE_LAYER = ".base_layer."
# init_lora_weights values that only choose the starting A/B, leaving the base weights alone: the saved
# adapter then means W + s * B @ A on the original base, as jaxtune computes it.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
# Inits that subtract the initial adapter from the base weights; PEFT converts them at save time.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga")
# LoRA options jaxtune does not implement; an adapter that sets one is refused rather than misread.
_UNSUPPORTED = ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters", "lora_bias",
                "use_qalora", "trainable_token_indices", "layer_replication", "megatron_config",
                "alora_invocation_tokens")


log = logging.getLogger(__name__)


class ExportError(ValueError):
    """A tuned model cannot be written (or an adapter read) in the requested format."""


# ----------------------------------------------------------------------------- names


def hf_module_name(tuned: Tuned, module: Module) -> str:
    """The transformers module name of a jaxtune module path in ``tuned``'s tree, e.g.
    ``("layers_0", "self_attn", "q_proj")`` -> ``"model.layers.0.self_attn.q_proj"``,
    ``("head", "out")`` -> ``"score"`` / ``"classifier"``."""
    if module[0] == HEAD_KEY:
        name = hf_head_name(tuned.head, tuned.config)
        if name is None or module != (HEAD_KEY, "out"):
            raise ExportError(f"{path_str(module)}: this head (pooling {tuned.head.pooling!r}, hidden "
                              f"{list(tuned.head.hidden)}, extra_blocks {tuned.head.extra_blocks}, bias "
                              f"{tuned.head.bias}) has no transformers equivalent; only last-token pooling into a "
                              "bias-free layer (decoders) or BERT's pooler into a layer with bias exports")
        return name
    if tuned.is_decoder:
        return decoder.hf_module(module)
    if tuned.hf_architecture == "BertForSequenceClassification":
        module = ("bert",) + module
    return encoder.hf_module(module)


def _modules(params: Params) -> dict[Module, dict[str, Any]]:
    modules: dict[Module, dict[str, Any]] = {}
    for path, leaf in flatten_dict(params).items():
        if path != (PROMPT_LEAF,):
            modules.setdefault(path[:-1], {})[path[-1]] = leaf
    return modules


def _torch_name(leaf: str) -> str:
    return "bias" if leaf == "bias" else "weight"


def _to_torch(leaf: str, value: Any) -> np.ndarray:
    array = np.asarray(jax.device_get(value), dtype=np.float32)
    return np.ascontiguousarray(array.T if leaf == "kernel" else array)


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
    if tuned.is_decoder and tuned.head is not None and config.get("pad_token_id") is None:
        config["pad_token_id"] = _pad_token_id(config, tokenizer_from)
    return config


def _pad_token_id(hf_config: dict[str, Any], tokenizer_from: str | Path | None) -> int | None:
    """The tokenizer's pad token id, else the config's (first) eos id (what tokenizers without a pad
    token are usually padded with). transformers pools the last token that is not this id, jaxtune
    the last real one: the two agree unless an input itself ends with that id."""
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
    merged, _ = merge(stacking.unstack(tuned.params if params is None else params))  # HF's per-layer layout
    body = {k: v for k, v in merged.items() if k != HEAD_KEY}
    source = Path(tuned.source)
    tokenizer_from = tokenizer_from if tokenizer_from is not None else (source if source.is_dir() else None)
    hf_config = _export_config(tuned, tokenizer_from)
    if tuned.head is None:
        return hf.save_pretrained(body, hf_config, out_dir, architecture=arch, dtype=dtype,
                                  tokenizer_from=tokenizer_from)
    config = _label_fields(hf_config, tuned.task, tuned.num_outputs, tuned.label_names)
    if not tuned.is_decoder:
        return hf.save_pretrained({"bert": body, "classifier": merged[HEAD_KEY]["out"]}, config, out_dir,
                                  architecture=arch, dtype=dtype, tokenizer_from=tokenizer_from)
    # jaxtune loads only the causal-LM classes, so the decoder family writes the tensors ("score"
    # sits beside "model" as lm_head does) and the config then names the classification class.
    out = hf.save_pretrained({**body, "score": merged[HEAD_KEY]["out"]}, config, out_dir,
                             architecture=tuned.architecture, dtype=dtype, tokenizer_from=tokenizer_from)
    written = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**written, "architectures": [arch]}, indent=2, sort_keys=True))
    return out


# ----------------------------------------------------------------------------- PEFT export


def _modules_to_save(tuned: Tuned, params: Params) -> list[Module]:
    """Modules holding trained base leaves, plus a head the plan created (PEFT saves modules whole)."""
    flat_labels = flatten_dict(stacking.unstack(tuned.labels))
    chosen = {path[:-1] for path, label in flat_labels.items()
              if label != FROZEN and path[-1] not in ADAPTER_LEAVES and path != (PROMPT_LEAF,)}
    if tuned.head_is_new:
        chosen |= {path[:-1] for path in flatten_dict(params) if path[0] == HEAD_KEY}
    both = sorted(path_str(m) for m in chosen if m in tuned.adapters)
    if both:
        raise ExportError(f"module(s) {both[:5]} are trained directly and carry an adapter; PEFT cannot express "
                          "both for one module. Freeze their base weights or use export_merged")
    return sorted(chosen)


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
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }


def export_peft(tuned: Tuned, out_dir: str | Path, *, params: Params | None = None) -> Path:
    """Write ``tuned``'s adapter (LoRA, DoRA or prompt tuning) as a PEFT adapter directory.

    ``peft.PeftModel.from_pretrained(<transformers base model>, out_dir)`` then computes the same
    outputs. The base is ``*ForCausalLM`` for task ``lm`` and ``*ForSequenceClassification``
    (with the right ``num_labels``, and ``pad_token_id`` when the base config has none: transformers'
    decoder classifiers need it for batches > 1) for heads. Tensors are written float32.
    """
    params = stacking.unstack(tuned.params if params is None else params)  # PEFT names layers one by one
    if tuned.adapters and tuned.prompt_tokens:
        raise ExportError("a PEFT adapter is either LoRA/DoRA or prompt tuning; this plan has both")
    if tuned.head is not None and tuned.hf_architecture is None:
        hf_module_name(tuned, (HEAD_KEY, "out"))  # raises the explanation
    modules = _modules(params)
    tensors: dict[str, np.ndarray] = {}
    for module in tuned.adapters:
        name = PREFIX + hf_module_name(tuned, module)
        for leaf, (suffix, transpose) in _PEFT_LEAVES.items():
            if leaf in modules[module]:
                tensors[f"{name}.{suffix}"] = _to_torch("kernel" if transpose else leaf, modules[module][leaf])
    to_save = _modules_to_save(tuned, params)
    for module in to_save:
        name = PREFIX + hf_module_name(tuned, module)
        for leaf, value in modules[module].items():
            tensors[f"{name}.{_torch_name(leaf)}"] = _to_torch(leaf, value)
    if tuned.adapters:
        config = _lora_config(tuned)
        if tuned.is_decoder and tuned.config.tie_word_embeddings and ("embed_tokens",) in to_save:
            # Without ensure_weight_tying PEFT trains a tied embed_tokens alone and keeps the old output
            # matrix; with it, lm_head's copy is tied to the embedding's (PEFT writes that copy too).
            tensors[PREFIX + "lm_head.weight"] = tensors[PREFIX + "model.embed_tokens.weight"]
            config["ensure_weight_tying"] = True
    elif tuned.prompt_tokens:
        cfg = tuned.config
        tensors["prompt_embeddings"] = _to_torch(PROMPT_LEAF, params[PROMPT_LEAF])
        # RANDOM init: PEFT then builds the embedding without a tokenizer and loads our weights.
        config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": tuned.prompt_tokens,
                  "token_dim": cfg.hidden_size, "num_transformer_submodules": 1, "num_attention_heads": cfg.num_heads,
                  "num_layers": cfg.num_layers, "prompt_tuning_init": "RANDOM"}
    else:
        raise ExportError("the plan has no LoRA, DoRA or prompt adapter, so there is no PEFT adapter to write; "
                          "use export_merged for full or partial fine-tuning")
    config.update({
        "task_type": "CAUSAL_LM" if tuned.task == "lm" else "SEQ_CLS",
        "base_model_name_or_path": tuned.source,
        "modules_to_save": [hf_module_name(tuned, m) for m in to_save] or None,
        "inference_mode": True,
    })
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


# ----------------------------------------------------------------------------- PEFT import


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _targeted(target_modules: str | list[str], name: str) -> bool:
    """PEFT's ``target_modules`` rule: a regex is full-matched, a list entry equals or ends the name."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _exact(modules: list[Module]) -> str:
    return "^(" + "|".join(re.escape(path_str(m)) for m in modules) + ")$"


def load_peft(
    pretrained: hf.Pretrained,
    adapter_dir: str | Path,
    rng: jax.Array | None = None,
    *,
    frozen_dtype: Any | None = None,
) -> Tuned:
    """Load a PEFT LoRA/DoRA or prompt-tuning adapter onto ``pretrained`` to continue training.

    The returned :class:`Tuned` has the adapter's leaves (and ``modules_to_save`` modules)
    trainable and everything else frozen; its ``plan`` spells that out as rules.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.exists():
        raise ExportError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    config = json.loads(config_path.read_text())
    kind = config.get("peft_type")
    if kind not in ("LORA", "PROMPT_TUNING"):
        raise ExportError(f"{config_path}: peft_type {kind!r} is not supported; jaxtune reads LORA and PROMPT_TUNING")
    set_options = [k for k in _UNSUPPORTED if config.get(k) not in (None, False, [], {}, "")]
    if kind == "LORA" and (set_options or config.get("bias", "none") != "none"):
        raise ExportError(f"{config_path}: option(s) {set_options or ['bias']} are not supported by jaxtune")
    if kind == "LORA":
        _check_init(config, config_path)
    reader = hf.SafetensorsReader([_weights_file(adapter_dir)])
    keys = {k.removeprefix(PREFIX): k for k in reader.names()}
    _refuse_embedding_lora(keys, adapter_dir)

    # modules_to_save tensors are the base-layout tensors: anything that is no adapter leaf (PEFT also
    # writes the frozen base of an adapted lm_head/embed_tokens as "<module>.base_layer.weight").
    saved = {k.rsplit(".", 1)[0] for k in keys
             if k != "prompt_embeddings" and not _ADAPTER_KEY.search(k) and _BASE_LAYER not in k}
    pretrained, tied_copy = _tying(pretrained, config, saved, keys)
    if tied_copy is not None:
        saved.discard(tied_copy.rsplit(".", 1)[0])
        del keys[tied_copy]
    rules: list[Rule] = []
    head_name = next((n for n in ("score", "classifier") if n in saved), None)
    if head_name is not None and not pretrained.architecture.endswith("ForSequenceClassification"):
        num = reader.shape(f"{PREFIX}{head_name}.weight")[0]
        rules.append(Rule("head", task="regression" if num == 1 else "classification", num_labels=num,
                          bias=f"{head_name}.bias" in keys))
    layout = apply_plan(pretrained, Plan(tuple(rules)))  # the tree the adapter will be laid onto
    layout_modules = _modules(stacking.unstack(layout.params))
    by_name = {hf_module_name(layout, m): m for m in layout_modules if m[0] != HEAD_KEY or m == (HEAD_KEY, "out")}
    unknown = sorted(saved - set(by_name))
    if unknown:
        raise ExportError(f"{adapter_dir}: modules_to_save {unknown[:5]} are not modules of {pretrained.architecture}")
    if kind == "LORA":
        linears = {n: m for n, m in by_name.items() if "kernel" in layout_modules[m]}
        rules += _lora_rules(config, linears, saved, pretrained)
    else:
        if config.get("num_transformer_submodules", 1) != 1:
            raise ExportError(f"{config_path}: num_transformer_submodules must be 1 for a decoder")
        rules.append(Rule("prompt", n_tokens=int(config["num_virtual_tokens"])))
    # A head the adapter brings is created (trainable) by its head rule; other saved modules train.
    trained = [by_name[n] for n in sorted(saved) if not (by_name[n][0] == HEAD_KEY and layout.head_is_new)]
    if trained:
        rules.append(Rule("train", match=_exact(trained)))
    tuned = apply_plan(pretrained, Plan(tuple(rules)), rng)
    tuned.params = cast_by_label(_fill(tuned, reader, keys, by_name, adapter_dir), tuned.labels, frozen_dtype)
    return tuned


def _weights_file(adapter_dir: Path) -> Path:
    """``adapter_model.safetensors``; a pickle ``adapter_model.bin`` is refused, as base weights are."""
    path, bin_path = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / "adapter_model.bin"
    if path.exists():
        return path
    if bin_path.exists():
        raise ExportError(
            f"{bin_path}: a pickle file; jaxtune refuses pickle on purpose because unpickling runs arbitrary code. "
            "Convert once where you trust the file: python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{bin_path}', weights_only=True), '{path}', metadata={{'format': 'pt'}})\"")
    raise ExportError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}; a PEFT adapter directory holds its weights there")


def _check_init(config: dict[str, Any], config_path: Path) -> None:
    """Refuse adapters whose meaning depends on an initialisation jaxtune does not reproduce.

    PiSSA/OLoRA/CorDA/LoRA-GA subtract the initial adapter from the base weights, so their A/B are
    wrong on the original base (silently: the shapes fit); LoftQ needs its quantized residual base.
    """
    init = config.get("init_lora_weights", True)
    if any(init is plain or (isinstance(plain, str) and init == plain) for plain in _PLAIN_INITS):
        return
    if str(init).lower().startswith(_BASE_CHANGING_INITS):
        raise ExportError(
            f"{config_path}: init_lora_weights={init!r} changed the base weights when the adapter was made, so it is "
            "wrong on the original base; have PEFT convert it to a plain LoRA adapter when saving: "
            "model.save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter saved right after "
            "get_peft_model, before training>), then load that")
    raise ExportError(
        f"{config_path}: init_lora_weights={init!r} is not reproduced by jaxtune (it changes the base weights or the "
        "LoRA forward); merge the adapter in PEFT (model.merge_and_unload().save_pretrained(dir)) and load the "
        "merged model")


def _refuse_embedding_lora(keys: dict[str, str], adapter_dir: Path) -> None:
    """PEFT's LoRA on an embedding (``lora_embedding_A/B``) adds ``s * (A^T B^T)[ids]`` to the lookup;
    jaxtune's adapters are linear-only, so such an adapter is refused rather than misread."""
    modules = sorted({k.split(".lora_embedding_")[0] for k in keys if ".lora_embedding_" in k})
    if modules:
        raise ExportError(
            f"{adapter_dir / ADAPTER_WEIGHTS}: LoRA on embedding(s) {modules} (lora_embedding_A/B) is not supported, "
            "jaxtune adapts linear layers only; merge it in PEFT (model.merge_and_unload().save_pretrained(dir)) "
            "and load that, or train the embedding whole (modules_to_save=['embed_tokens'])")


def _tying(pretrained: hf.Pretrained, config: dict[str, Any], saved: set[str],
           keys: dict[str, str]) -> tuple[hf.Pretrained, str | None]:
    """``pretrained`` as PEFT sees it under this adapter, and the key of a redundant tied copy to skip.

    On a tied model PEFT trains (``modules_to_save``) or adapts ``embed_tokens`` and ``lm_head`` apart,
    so the other end keeps the old matrix: jaxtune then unties them. Only ``ensure_weight_tying`` with
    a trained ``embed_tokens`` keeps them one matrix; PEFT then also writes lm_head's (equal) copy.
    """
    if not getattr(pretrained.config, "tie_word_embeddings", False):
        return pretrained, None
    lm_head_lora = "lm_head.lora_A.weight" in keys
    if not lm_head_lora and not saved & {"model.embed_tokens", "lm_head"}:
        return pretrained, None
    if config.get("ensure_weight_tying") and "model.embed_tokens" in saved and not lm_head_lora:
        return pretrained, "lm_head.weight" if "lm_head.weight" in keys else None
    return hf.untie_embeddings(pretrained), None


def _lora_rules(config: dict[str, Any], linears: dict[str, Module], saved: set[str],
                pretrained: hf.Pretrained) -> list[Rule]:
    """One lora/dora rule per (rank, alpha) group of the linear modules the adapter targets."""
    targets = config.get("target_modules") or []
    groups: dict[tuple[int, float], list[Module]] = {}
    for name, module in linears.items():
        if name in saved or not _targeted(targets, name):
            continue
        rank = int(_pattern_value(config.get("rank_pattern") or {}, name, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
        groups.setdefault((rank, alpha), []).append(module)
    if not groups:
        raise ExportError(f"adapter target_modules {targets!r} match no linear module of {pretrained.architecture}")
    action = "dora" if config.get("use_dora") else "lora"
    return [Rule(action, match=_exact(modules), targets=None, rank=rank, alpha=alpha,
                 dropout=float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")))
            for (rank, alpha), modules in sorted(groups.items())]


def _fill(tuned: Tuned, reader: hf.SafetensorsReader, keys: dict[str, str], by_name: dict[str, Module],
          adapter_dir: Path) -> Params:
    """``tuned.params`` with every tensor of the adapter file put in its leaf (shapes checked)."""
    flat = flatten_dict(stacking.unstack(tuned.params))
    wanted = {}  # leaf path -> (key, transpose)
    for module in tuned.adapters:
        name = hf_module_name(tuned, module)
        for leaf, (suffix, transpose) in _PEFT_LEAVES.items():
            if module + (leaf,) in flat:
                key = f"{name}.{suffix}"
                key = key if key in keys or leaf != MAGNITUDE else key + ".weight"
                wanted[module + (leaf,)] = (key, transpose)
    for name in keys:
        if name == "prompt_embeddings":
            wanted[(PROMPT_LEAF,)] = (name, False)
        elif not _ADAPTER_KEY.search(name):
            module, leaf = name.replace(_BASE_LAYER, ".").rsplit(".", 1)
            base_leaf = "bias" if leaf == "bias" else next(
                k for k in ("kernel", "embedding", "scale") if by_name[module] + (k,) in flat)
            wanted[by_name[module] + (base_leaf,)] = (name, base_leaf == "kernel")
    used = {key for key, _ in wanted.values()}
    missing, unused = sorted(used - set(keys)), sorted(set(keys) - used)
    if missing or unused:
        raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS}: " + (f"missing tensor(s) {missing[:5]}" if missing else
                          f"tensor(s) {unused[:5]} belong to no adapter jaxtune built from {ADAPTER_CONFIG}"))
    for path, (key, transpose) in wanted.items():
        value = np.asarray(reader[keys[key]], dtype=np.float32)
        need = flat[path].shape[::-1] if transpose else flat[path].shape  # in the file's (PyTorch) layout
        if value.shape != need:
            raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {key} has shape {value.shape}, but "
                              f"{path_str(path)} needs {need}")
        value = value.T if transpose else value
        flat[path] = jnp.asarray(value, dtype=flat[path].dtype)
    return stacking.to_physical(unflatten_dict(flat), tuned.config)


# ----------------------------------------------------------------------------- the one export call

EXPORT_FORMATS = ("auto", "peft", "merged")


def export_format(tuned: Tuned, format: str = "auto") -> str:  # noqa: A002 - the user-facing name
    """The format ``format`` resolves to for ``tuned`` (``peft`` or ``merged``); raises
    :class:`ExportError` saying why when the model has no such form.

    ``auto`` is a PEFT adapter when the plan has adapters (LoRA, DoRA, prompt), else a merged
    HF directory.
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"export format {format!r} is unknown; choose one of {', '.join(EXPORT_FORMATS)}")
    fmt = format if format != "auto" else ("peft" if (tuned.adapters or tuned.prompt_tokens) else "merged")
    if tuned.head is not None and tuned.hf_architecture is None:
        raise ExportError(f"the {tuned.head.task} head (pooling {tuned.head.pooling}) has no transformers "
                          f"equivalent (pooling {'last' if tuned.is_decoder else 'pooler'} has one); the trained "
                          "weights stay in the run's checkpoints")
    if fmt == "merged" and tuned.prompt_tokens:
        raise ExportError("prompt tuning has no merged form (virtual tokens are not weights); export format peft")
    if fmt == "peft" and not (tuned.adapters or tuned.prompt_tokens):
        raise ExportError("the plan has no LoRA, DoRA or prompt adapter, so there is no PEFT adapter to write; "
                          "export format merged")
    if fmt == "peft" and tuned.adapters and tuned.prompt_tokens:
        raise ExportError("a PEFT adapter holds LoRA/DoRA or prompt tuning, not both; export format merged")
    return fmt


def export(model: Tuned, out_dir: str | Path, *, format: str = "auto", dtype: Any | None = None) -> Path:  # noqa: A002
    """Write a tuned model in a standard format: a PEFT adapter that ``peft`` loads onto the
    transformers base model, or (``format="merged"``) an HF directory with the adapters folded
    in that ``transformers`` loads. ``dtype`` (merged only) of the stored weights.

    Pass the trained model (``Trainer.fit().model``): a model straight from ``apply_plan`` has
    its fresh, untrained adapters, and exporting it says so in a warning.
    """
    fmt = export_format(model, format)
    if model.step == 0:
        log.warning("exporting %s at step 0: these are the plan's untrained weights (export the model that "
                    "Trainer.fit() returns)", out_dir)
    if fmt == "peft":
        return export_peft(model, out_dir)
    return export_merged(model, out_dir, dtype=dtype)
