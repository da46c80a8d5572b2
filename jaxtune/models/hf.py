"""Hugging Face checkpoints in and out: a model directory <-> (config, module, param pytree).

Loading reads ``config.json``, picks the model family from ``architectures``, and fills the
family's parameter tree tensor by tensor from memory-mapped ``*.safetensors`` files (one file or
many with an index). Each tensor is cast and placed on its sharding on its own, so the host
never holds a second full copy of the model; with a sharding, each device reads only its slice.

Saving writes ``config.json`` and ``*.safetensors`` shards (+ index) that ``transformers`` loads.
Pickle checkpoints (``*.bin``, ``*.pt``) are refused: unpickling runs arbitrary code.
Finding the directory and reading its files, tensor by tensor, is :mod:`jaxtune.models.hf_files`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

from jaxtune.host_memory import filled_in_place
from jaxtune.models import (
    efficientnet,
    encoder,
    stacking,
    vit,
)
from jaxtune.models.families import (
    FAMILIES,
    Family,
    FamilyConfig,
    bare_architecture,
    family_for,
)
from jaxtune.models.hf_files import CheckpointError, SafetensorsReader, read_config, resolve, weight_files
from jaxtune.models.quant import dequantize_tree, is_quantized
from jaxtune.models.quant import transpose as transpose_quantized

Params = dict[str, Any]

BASE_LEAVES = ("kernel", "embedding", "scale", "bias", vit.TENSOR_LEAF, *efficientnet.STATE_LEAVES)
# Buffers that checkpoints carry but that are not parameters.
_IGNORED_SUFFIXES = (".position_ids", "rotary_emb.inv_freq", ".masked_bias", ".attn.bias",
                     ".attention.bias")  # GPT-NeoX's causal-mask buffer in older checkpoints
# A body's tensors may carry its task wrapper's prefix (bert.*, model.*) or not (MiniLM has none).
_BODY_PREFIXES = ("bert.", "model.", "roberta.", "distilbert.", "transformer.", "vit.", "deberta.", "dinov2.",
                  "dinov2_with_registers.", "gpt_neox.")
# A tokenizer shipped as a SentencePiece model alone (no tokenizer.json): Llama 2/Mistral/Gemma's
# tokenizer.model, DeBERTa-v3's spm.model, XLM-RoBERTa's sentencepiece.bpe.model.
SENTENCEPIECE_FILES = ("tokenizer.model", "spm.model", "sentencepiece.bpe.model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json", *SENTENCEPIECE_FILES)


@dataclasses.dataclass
class Pretrained:
    """A loaded model: its config, its (stateless) linen module, its params and where it came from.

    ``module.apply({"params": params}, ...)`` runs it; ``hf_config`` is the source ``config.json``
    (kept so that saving writes back everything transformers expects).
    """

    config: FamilyConfig
    module: nn.Module
    params: Params
    hf_config: dict[str, Any]
    source: str
    architecture: str
    tokenizer: Any = None  # a transformers tokenizer, when loaded with jaxtune.load
    adapter: Path | None = None  # a PEFT adapter to start from (ModelConfig.adapter); jaxtune.apply_plan loads it


# ----------------------------------------------------------------------------- loading


def build(hf_config: dict[str, Any], architecture: str | None = None,
          **overrides: Any) -> tuple[str, FamilyConfig, nn.Module]:
    """Config and module for a ``config.json`` dict, without any weights."""
    arch, family = family_for(hf_config, architecture)
    if family.lm is not None:  # a bare body: its causal LM's switches, without the LM's own output layer
        overrides = {"lm_head": False, **overrides}
    try:
        cfg = family.config_from_hf({**hf_config, "architectures": [family.lm or arch]}, **overrides)
    except KeyError as err:
        raise CheckpointError(f"config.json: missing field {err.args[0]!r} needed by {arch}") from None
    return arch, cfg, family.module(cfg)


def abstract_params(module: nn.Module, cfg: FamilyConfig) -> Params:
    """The param tree's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), computed without memory."""
    # A family whose inputs are not token ids (images) says what its inputs look like.
    inputs = cfg.init_inputs() if hasattr(cfg, "init_inputs") else (jnp.zeros((1, 2), jnp.int32),)
    method = None if getattr(cfg, "makes_logits", True) else "hidden"  # a bare decoder body has no logits
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, method=method))["params"]


def hf_name(family: Family, path: tuple[str, ...]) -> str:
    """HF tensor name of a base param leaf path."""
    leaf = path[-1]
    if stacking.stack_range(path[0]) is not None:
        raise CheckpointError(f"param {'/'.join(path)} holds a scanned run of layers, one HF tensor per layer; "
                              "name the layers' paths (jaxtune.models.stacking.unstack)")
    if leaf not in BASE_LEAVES:
        raise CheckpointError(
            f"param {'/'.join(path)} is an adapter leaf with no Hugging Face tensor; merge adapters first "
            "(jaxtune.tuning) or export them as a PEFT adapter"
        )
    if leaf == vit.TENSOR_LEAF:
        return family.hf_module(path[:-1])  # a bare tensor is named by its module path alone
    if leaf in efficientnet.STATE_LEAVES:
        return f"{family.hf_module(path[:-1])}.{leaf}"
    return family.hf_module(path[:-1]) + (".bias" if leaf == "bias" else ".weight")


def stored_transposed(family: Family, path: tuple[str, ...]) -> bool:
    """Whether the checkpoint tensor of param leaf ``path`` is the transpose of jaxtune's leaf: a
    ``kernel`` of a torch ``Linear`` (stored ``(out, in)``), but not of GPT-2's ``Conv1D``."""
    return path[-1] == "kernel" and family.kernel_out_in(path[:-1])


def _stored(reader: SafetensorsReader, family: Family, name: str) -> str | None:
    """The checkpoint tensor of module-derived name ``name``: by that name, else by the family's stored one."""
    found = _find(reader, name)
    return found if found is not None or family.checkpoint_name is None else _find(reader, family.checkpoint_name(name))


def _find(reader: SafetensorsReader, name: str) -> str | None:
    if name in reader:
        return name
    for prefix in _BODY_PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in reader:
            return name[len(prefix):]
        if prefix + name in reader:
            return prefix + name
    return None


def load_pretrained(
    path_or_id: str | os.PathLike[str],
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any | None = None,
    shardings: Any = None,
    on_host: bool = False,
    architecture: str | None = None,
    **config_overrides: Any,
) -> Pretrained:
    """Load a Hugging Face model directory (or hub id) into a jaxtune model.

    Args:
      path_or_id: a directory with ``config.json`` and ``*.safetensors`` (single file or sharded
        with ``model.safetensors.index.json``), or a hub id when a hub is reachable.
      dtype: dtype of the loaded params (e.g. ``jnp.bfloat16`` for a frozen base).
      compute_dtype: activation dtype; defaults to ``dtype``.
      shardings: None (default device), one ``jax.sharding.Sharding`` for every leaf, or a pytree
        of shardings matching the param tree; each device then reads only its own slice.
      on_host: keep the params as host numpy arrays, on no device (not with ``shardings``). What a
        Trainer is given next: ``apply_plan`` plans them on the host (a scanned run's layers as views,
        restacked without a copy where the plan keeps the run) and the Trainer puts each leaf on
        its sharding once, so the device never holds the base model beside its planned copy.
      architecture: force an architecture (e.g. ``"BertModel"`` to load only the body of a
        ``BertForSequenceClassification`` checkpoint). A BERT checkpoint without pooler tensors
        (``BertForMaskedLM``) loads as a body without a pooler, with a warning.
      config_overrides: fields of the family's config, e.g. ``remat="block"``.
    """
    if on_host and shardings is not None:
        raise ValueError("load_pretrained: on_host keeps the params off every device, and shardings places them; "
                         "pass one of the two")
    model_dir = resolve(path_or_id)
    hf_config = read_config(model_dir)
    dtype = jnp.dtype(dtype)
    arch, cfg, module = build(hf_config, architecture, dtype=str(jnp.dtype(compute_dtype or dtype)),
                              param_dtype=str(dtype), **config_overrides)
    reader = SafetensorsReader(weight_files(model_dir))
    if getattr(cfg, "use_pooler", False) and arch in (*encoder.BASES, "ViTModel") \
            and _find(reader, "pooler.dense.weight") is None:
        warnings.warn(f"{model_dir}: no pooler tensors ({', '.join(hf_config.get('architectures') or ['?'])}); "
                      "loaded the body without a pooler, so a head on it pools with 'cls' (the default) or "
                      "'mean', not 'pooler'", stacklevel=2)
        arch, cfg, module = build(hf_config, arch, dtype=str(jnp.dtype(compute_dtype or dtype)),
                                  param_dtype=str(dtype), **{**config_overrides, "use_pooler": False})
    if getattr(cfg, "lm_head", False) and not cfg.tie_word_embeddings and FAMILIES[arch].body is None \
            and _stored(reader, FAMILIES[arch], hf_name(FAMILIES[arch], ("lm_head", "kernel"))) is None:
        bare = bare_architecture(arch)
        warnings.warn(f"{model_dir}: config.json says {arch}, but the checkpoint stores no lm_head (it was saved "
                      f"from the bare body, as some embedding models are); loaded as {bare}: a head plan trains it, "
                      "and it has no vocabulary logits to generate with", stacklevel=2)
        arch, cfg, module = build(hf_config, bare, dtype=str(jnp.dtype(compute_dtype or dtype)),
                                  param_dtype=str(dtype), **config_overrides)
    family = FAMILIES[arch]
    abstract = flatten_dict(abstract_params(module, cfg))
    leaf_shardings = _leaf_shardings(shardings, abstract)
    params, used = {}, set()
    for path, spec in abstract.items():
        layers = stacking.stack_range(path[0])  # a scanned run: one tensor per layer, stacked
        views, read = [], []
        for logical, shape in ([(stacking.logical_path(path, i), spec.shape[1:]) for i in layers] if layers
                               else [(path, spec.shape)]):
            split = family.expert_tensor and family.expert_tensor(logical, 0)
            parts = []
            for want, part_shape in ([(family.expert_tensor(logical, e), shape[1:]) for e in range(shape[0])]
                                     if split else [(hf_name(family, logical), shape)]):
                found = _stored(reader, family, want)
                chunk = family.checkpoint_chunk(want) if found is None and family.checkpoint_chunk else None
                if chunk is not None:
                    found = _find(reader, chunk[0])
                if found is None:
                    raise CheckpointError(f"{model_dir}: missing tensor {want!r} (param {'/'.join(logical)}) "
                                          f"for {arch}")
                view = reader[found]
                if chunk is not None:  # part i of n along the stored first axis
                    rows = view.shape[0] // chunk[2]
                    view = view[chunk[1] * rows:(chunk[1] + 1) * rows]
                transposed = stored_transposed(family, logical)
                if transposed:
                    view = view.T
                if view.shape != part_shape:
                    raise CheckpointError(
                        f"{model_dir}: tensor {found!r} has shape {tuple(reader.shape(found))}, but {arch} with "
                        f"this config.json expects {part_shape[::-1] if transposed else part_shape}"
                    )
                parts.append(view)
                read.append(found)
            views.append(_Stacked(parts) if split else parts[0])
        view = _Stacked(views) if layers else views[0]
        used.update(read)
        # on the host, a copy: a view would map the file, which an export may later overwrite
        params[path] = _host_copy(view, dtype) if on_host else _place(view, dtype, leaf_shardings.get(path))
        for name in read:  # copied: the file's pages need not stay mapped beside the copy
            reader.release(name)
    unused = [n for n in reader.names() if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
    if getattr(cfg, "tie_word_embeddings", False) and unused == ["lm_head.weight"]:
        # Some writers store the tied output matrix twice; another matrix there is not the tied one, and
        # transformers then uses the stored one: refuse rather than silently use the embedding.
        embedding = params[("embed_tokens", "embedding")]
        if not np.array_equal(np.asarray(jnp.asarray(reader["lm_head.weight"], embedding.dtype)), embedding):
            raise CheckpointError(f"{model_dir}: config.json says tie_word_embeddings: true, but the checkpoint stores "
                                  "an lm_head.weight other than the embedding; set tie_word_embeddings: false in "
                                  "config.json to use the stored output layer (as transformers does)")
        unused = []
    if unused:
        warnings.warn(f"{model_dir}: {len(unused)} tensor(s) not used by {arch}: {', '.join(unused[:8])}"
                      + (" ..." if len(unused) > 8 else ""), stacklevel=2)
    return Pretrained(cfg, module, unflatten_dict(params), hf_config, str(model_dir), arch)


def untie_embeddings(pretrained: Pretrained, *, trained_head: bool = False) -> Pretrained:
    """``pretrained`` with its tied output layer made a separate ``lm_head`` whose kernel is the
    embedding's transpose (a quantized embedding's stays quantized unless ``trained_head``: a trained
    leaf is float); a model that is not tied comes back unchanged.

    Why: PEFT adapts or trains ``embed_tokens`` and ``lm_head`` of a tied model apart (unless
    ``ensure_weight_tying`` is set), so the two stop being one matrix. ``hf_config`` still says
    tied, because it describes the base checkpoint that such an adapter applies to.
    """
    cfg = pretrained.config
    if FAMILIES[pretrained.architecture].body is not None or not getattr(cfg, "tie_word_embeddings", False):
        return pretrained  # a sequence classifier has no lm_head to untie
    cfg = dataclasses.replace(cfg, tie_word_embeddings=False, lm_head=True)  # a tied bare body (GemmaModel) too
    embedding = pretrained.params["embed_tokens"]["embedding"]  # quantized: a GGUF base with keep_quantized
    kernel = (transpose_quantized(embedding) if is_quantized(embedding) and not trained_head
              else dequantize_tree(embedding).T)
    params = {**pretrained.params, "lm_head": {"kernel": kernel}}
    return dataclasses.replace(pretrained, config=cfg, module=FAMILIES[pretrained.architecture].module(cfg),
                               params=params)


def _leaf_shardings(shardings: Any, abstract: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
    if shardings is None:
        return {}
    if isinstance(shardings, jax.sharding.Sharding):
        return {path: shardings for path in abstract}
    flat = flatten_dict(shardings)
    missing = [p for p in abstract if p not in flat]
    if missing:
        raise CheckpointError(f"shardings: no sharding for param {'/'.join(missing[0])} (and {len(missing) - 1} more)")
    return flat


class _Stacked:
    """Per-layer tensor views read as one ``(L, ...)`` array; a slice stays a ``_Stacked`` of the sliced
    views, so a device's shard reads only the layers and rows it needs."""

    def __init__(self, views: list[Any]):
        self.views = views
        self.shape = (len(views), *views[0].shape)

    def __getitem__(self, index: tuple[slice, ...]) -> _Stacked:
        """The views of a device's shard: ``index`` is one slice per axis (``make_array_from_callback``'s)."""
        return _Stacked([v[index[1:]] for v in self.views[index[0]]])


def _copy_into(out: np.ndarray, view: Any) -> None:
    """Write ``view`` (a tensor view of the file, or a ``_Stacked`` of them) into ``out``, cast to its dtype."""
    if isinstance(view, _Stacked):
        for i, part in enumerate(view.views):
            _copy_into(out[i], part)
    elif view.ndim == 2 and not view.flags.c_contiguous and view.T.flags.c_contiguous:
        # A stored (out, in) kernel read as (in, out): numpy copies a transposed view element by element
        # down the destination's columns, touching a new cache line (and page) for each; a few stored rows
        # at a time write 64 contiguous bytes of every destination row instead, 5x faster on 1024x4096.
        stored, step = view.T, max(1, 64 // out.itemsize)
        for start in range(0, stored.shape[0], step):
            out[:, start:start + step] = stored[start:start + step].T
    else:
        out[...] = view


def _host_copy(view: Any, dtype: Any) -> np.ndarray:
    """A host array holding ``view`` (a tensor view of the file, or a ``_Stacked`` of them) in ``dtype``,
    written once into memory mapped at allocation (:func:`jaxtune.host_memory.filled_in_place`)."""
    out = filled_in_place(view.shape, np.dtype(dtype))
    _copy_into(out, view)
    return out


def _place(view: Any, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Cast one tensor and put it on device; with a sharding, each device converts only its slice."""
    if sharding is None:
        return jax.device_put(_host_copy(view, dtype))
    return jax.make_array_from_callback(view.shape, sharding, lambda idx: _host_copy(view[idx], dtype))


# ----------------------------------------------------------------------------- saving


def _shards(tensors: Iterator[tuple[str, np.ndarray]], max_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    shard, size = {}, 0
    for name, array in tensors:
        if shard and size + array.nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = array
        size += array.nbytes
    if shard:
        yield shard


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of an HF checkpoint, declared before it is read: its name, shape and dtype as stored, and
    ``read()``, which makes it (a host copy of one param leaf, or a checkpoint file's tensor)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]


def hf_tensors(params: Params, hf_config: dict[str, Any], *, architecture: str | None = None,
               dtype: Any | None = None) -> list[HFTensor]:
    """The tensors :func:`save_pretrained` writes for ``params``, in its order: HF's names and layouts (one
    tensor per layer and per expert, torch ``Linear`` kernels ``(out, in)``), in ``dtype`` (default: each
    leaf's own; a quantized leaf is dequantized). Nothing is sliced, dequantized or copied to the host until
    a tensor's ``read()``: a consumer holds one at a time."""
    _, family = family_for(hf_config, architecture)
    out = []
    for path, leaf in flatten_dict(stacking.unstack(params, lazy=True)).items():
        stored = np.dtype(jnp.dtype(dtype if dtype is not None else leaf.dtype))
        transpose = stored_transposed(family, path)
        if family.expert_tensor and family.expert_tensor(path, 0):  # one tensor per expert
            named = [(family.expert_tensor(path, e), tuple(leaf.shape[1:]), e) for e in range(leaf.shape[0])]
        else:
            name = hf_name(family, path)
            named = [(family.saved_name(name) if family.saved_name else name, tuple(leaf.shape), None)]
        for name, shape, expert in named:
            out.append(HFTensor(name, shape[::-1] if transpose else shape, stored,
                                functools.partial(_host_tensor, leaf, expert, stored, transpose)))
    return out


def _host_tensor(leaf: Any, expert: int | None, dtype: np.dtype, transpose: bool) -> np.ndarray:
    """One param leaf (or one expert of it) on the host, in ``dtype``, transposed to the checkpoint's layout."""
    leaf = dequantize_tree(stacking.materialize(leaf))  # a deferred slice or merge, a quantized weight
    array = np.asarray(jax.device_get(leaf if expert is None else leaf[expert])).astype(dtype)
    return np.ascontiguousarray(array.T if transpose else array)


def save_pretrained(
    params: Params,
    hf_config: dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    architecture: str | None = None,
    dtype: Any | None = None,
    max_shard_bytes: int = 4 * 2**30,
    tokenizer_from: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``params`` as a Hugging Face directory that ``transformers`` loads.

    Args:
      params: the model's base param tree (adapters merged: adapter leaves are refused).
      hf_config: the ``config.json`` dict to write (``Pretrained.hf_config``).
      architecture: the architecture to declare; defaults to the config's.
      dtype: dtype of the stored tensors (default: each leaf's own dtype).
      max_shard_bytes: above this size the weights are split into shards plus an index.
      tokenizer_from: a directory whose tokenizer files are copied alongside.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch, _ = family_for(hf_config, architecture)
    declared = hf_tensors(params, hf_config, architecture=architecture, dtype=dtype)
    tensors = ((tensor.name, tensor.read()) for tensor in declared)
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        old.unlink()
    # Shards are written as they fill (one shard in memory at a time) and named once counted.
    written, weight_map, total = [], {}, 0
    for i, shard in enumerate(_shards(tensors, max_shard_bytes)):
        tmp = out / f"shard-{i}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        total += sum(a.nbytes for a in shard.values())
    for i, (tmp, names) in enumerate(written, 1):
        final = "model.safetensors" if len(written) == 1 else f"model-{i:05d}-of-{len(written):05d}.safetensors"
        tmp.rename(out / final)
        weight_map.update({n: final for n in names})
    if len(written) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {**hf_config, "architectures": [arch]}
    stored = {tensor.dtype for tensor in declared}
    if len(stored) == 1:
        config["dtype"] = str(next(iter(stored)))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer_from is not None:
        copy_tokenizer_files(Path(tokenizer_from), out)
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer/generation files of ``src`` that exist into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists() and src.resolve() != dst.resolve():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
