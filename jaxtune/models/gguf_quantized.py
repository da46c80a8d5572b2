"""GGUF's quantized tensors read as they are: :class:`jaxtune.models.quant.QuantizedArray` leaves.

:func:`load_quantized` reads a GGUF's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K tensors straight into quantized
leaves (integer unpacking of the blocks only, no float copy of a weight), so a model is fine-tuned
on the quantization it was shared in; every other tensor is dequantized as :mod:`jaxtune.models.gguf`
does, and that module's tensor mapping, with :mod:`jaxtune.models.gguf_architectures`' table, says which
HF tensor each GGUF tensor is.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, ReaderTensor
from gguf.quants import Q4_K

from jaxtune.models.gguf import dequantized, open_gguf, tensor_entries
from jaxtune.models.gguf_architectures import GGUFError, Metadata, architecture_of

# read into QuantizedArray leaves as they are (others: dequantized)
QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def quantized_tensor(tensor: ReaderTensor) -> Any:
    """A GGUF tensor of a :data:`QUANTIZED_TYPES` type as a :class:`QuantizedArray` of numpy
    arrays in GGUF's own layout: ``(rows, features)`` (PyTorch's ``(out, in)``; a stack of experts
    ``(experts, rows, features)``), blocks along the last axis (``axis=-1``). Its
    :func:`jaxtune.models.quant.dequantize` equals
    ``gguf.quants.dequantize`` bit for bit: the scales are llama.cpp's fp16 ``d`` (and 6/8-bit
    sub-block scales under it for the K-quants), the codes its integers, unpacked without floats.
    """
    from jaxtune.models.quant import QuantizedArray

    kind = tensor.tensor_type.name
    if kind not in QUANTIZED_TYPES:
        raise GGUFError(f"tensor {tensor.name!r} has type {kind}; quantized leaves are read from "
                        f"{', '.join(QUANTIZED_TYPES)}")
    block, size = GGML_QUANT_SIZES[tensor.tensor_type]
    data = np.asarray(tensor.data)
    lead = data.shape[:-1] if data.ndim > 1 else (1,)  # (rows,) or (experts, rows)
    blocks = data.reshape(*lead, -1, size)

    def f16(b: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(b).view(np.float16)[..., 0]

    def flat(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x).reshape(*lead, -1)

    if kind == "Q8_0":  # d, 32 x int8
        return QuantizedArray(flat(blocks[..., 2:].view(np.int8)), f16(blocks[..., :2]), block=32, axis=-1,
                              name="q8_0")
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):  # d, [m,] [4 bytes of fifth bits,] 16 bytes of nibbles
        start = 2 if kind.endswith("_0") else 4
        scale, offset = f16(blocks[..., :2]), None if kind.endswith("_0") else f16(blocks[..., 2:4])
        if kind.startswith("Q4"):  # element j in the low nibble of byte j, j + 16 in its high one
            return QuantizedArray(flat(blocks[..., start:]), scale, offset, block=32, pack=32,
                                  zero=8 if kind == "Q4_0" else 0, axis=-1, name=kind.lower())
        bits = np.ascontiguousarray(blocks[..., start:start + 4]).view(np.uint32)
        high = (bits >> np.arange(32, dtype=np.uint32)) & 1  # bit j: element j's fifth bit
        qs = blocks[..., start + 4:]
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1) | (high.astype(np.uint8) << 4)  # one 5-bit code a byte
        return QuantizedArray(flat(codes), scale, offset, block=32, zero=16 if kind == "Q5_0" else 0, axis=-1,
                              name=kind.lower())
    if kind in ("Q4_K", "Q5_K"):  # d, dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, [qh,] qs
        sc, mins = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
        name = kind.lower()
        scale = QuantizedArray(flat(sc), f16(blocks[..., :2]), block=8, axis=-1, name=f"{name} scales")
        offset = QuantizedArray(flat(mins), -f16(blocks[..., 2:4]), block=8, axis=-1, name=f"{name} mins")
        if kind == "Q4_K":  # 128 bytes, packed in groups of 64
            return QuantizedArray(flat(blocks[..., 16:]), scale, offset, block=32, pack=64, axis=-1, name=name)
        # Q5_K: 32 bytes of fifth bits (bit i of byte j: element j of sub-block i), then Q4_K's 128 bytes
        qs = blocks[..., 48:].reshape(*blocks.shape[:-1], 4, 1, 32)
        low = np.concatenate([qs & 0xF, qs >> 4], axis=-2).reshape(*blocks.shape[:-1], 8, 32)
        high = (blocks[..., 16:48].reshape(*blocks.shape[:-1], 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1
        return QuantizedArray(flat(low | (high << 4)), scale, offset, block=32, axis=-1, name=name)
    # Q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d; per 128 elements
    # byte j of ql holds element j (low) and j + 64 (high); byte j of qh holds the top bits of
    # elements j, j + 32, j + 64, j + 96.
    ql = blocks[..., :128].reshape(*lead, -1, 2, 1, 64)
    qh = blocks[..., 128:192].reshape(*lead, -1, 2, 1, 32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=-2).reshape(*lead, -1, 2, 128)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
    codes = (low | (high.reshape(*lead, -1, 2, 128) << 4)).astype(np.int8) - np.int8(32)
    scale = QuantizedArray(flat(blocks[..., 192:208].view(np.int8)), f16(blocks[..., 208:210]), block=16, axis=-1,
                           name="q6_k scales")
    return QuantizedArray(flat(codes), scale, block=16, axis=-1, name="q6_k")


def load_quantized(gguf_path: str | Path, hf_dir: str | Path, *, dtype: Any = "float32",
                   compute_dtype: Any | None = None, reader: GGUFReader | None = None, on_host: bool = False,
                   **config_overrides: Any) -> Any:
    """A :class:`jaxtune.models.hf.Pretrained` whose linear kernels and embeddings stay in the GGUF
    file's quantization where it is one of :data:`QUANTIZED_TYPES` (other tensors: ``dtype``).

    ``hf_dir``: the file's converted directory (:func:`jaxtune.models.gguf.gguf_to_hf`), for ``config.json``
    and the tokenizer. A mixture-of-experts layer's experts stay one quantized stack ``(experts, in, out)``.
    Quantized leaves must stay frozen (a plan that trains one fails, naming it). ``reader``: the file's
    :func:`jaxtune.models.gguf.open_gguf` reader where the caller has one (the one that converted ``hf_dir``), so
    the file is not parsed again. ``on_host``: numpy arrays on no device, as
    :func:`jaxtune.models.hf.load_pretrained`'s.
    """
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    from jaxtune.models import hf, stacking
    from jaxtune.models.quant import transpose

    gguf_path = Path(gguf_path)
    reader = open_gguf(gguf_path) if reader is None else reader
    hf_config = hf.read_config(Path(hf_dir))
    dtype = jnp.dtype(dtype)
    put = np.asarray if on_host else jnp.asarray
    arch, cfg, module = hf.build(hf_config, None, dtype=str(jnp.dtype(compute_dtype or dtype)),
                                 param_dtype=str(dtype), **config_overrides)
    family = hf.FAMILIES[arch]
    heads = types.SimpleNamespace(num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads)
    gguf_arch = architecture_of(Metadata(reader, gguf_path))
    by_name = {e.hf_name: e for tensor in reader.tensors for e in tensor_entries(tensor, gguf_arch, heads)}
    params = {}
    # Per layer (the logical tree, one GGUF tensor each), stacked at the end as the model scans them.
    for path, spec in flatten_dict(stacking.unstack(hf.abstract_params(module, cfg))).items():
        # an expert stack is found by its first expert's name, and read whole
        first_expert = family.expert_tensor(path, 0) if family.expert_tensor else None
        want = first_expert or hf.hf_name(family, path)
        entry = by_name.get(want)
        if entry is None and family.checkpoint_name is not None:  # Mixtral's router: block_sparse_moe.gate
            entry = by_name.get(family.checkpoint_name(want))
        if entry is None:
            raise GGUFError(f"{gguf_path}: no tensor for {want!r} (param {'/'.join(path)})")
        tensor = entry.tensor
        if tensor.tensor_type.name in QUANTIZED_TYPES and path[-1] in ("kernel", "embedding"):
            q = quantized_tensor(tensor)
            if entry.unpermute_heads is not None or entry.ungroup_heads is not None:
                q = jax.tree.map(lambda a, e=entry: np.ascontiguousarray(e.rows_in_hf_order(a)), q)
            # GGUF rows are (out, in) for every linear (GPT-2's too, transposed by llama.cpp); kernels are (in, out).
            q = transpose(q) if path[-1] == "kernel" else q
            leaf = jax.tree.map(put, dataclasses.replace(q, dtype=dtype))
        elif first_expert:  # (experts, out, in) -> (experts, in, out)
            whole = dataclasses.replace(entry, expert=None, shape=(spec.shape[0], *entry.shape))
            leaf = put(dequantized(whole, np.dtype(np.float32), gguf_path).swapaxes(-1, -2), dtype)
        else:
            array = dequantized(entry, np.dtype(np.float32), gguf_path)  # the HF tensor
            leaf = put(array.T if hf.stored_transposed(family, path) else array, dtype)
        if tuple(leaf.shape) != tuple(spec.shape):
            raise GGUFError(f"{gguf_path}: tensor {tensor.name!r} gives {'/'.join(path)} shape {tuple(leaf.shape)}, "
                            f"expected {tuple(spec.shape)}")
        params[path] = leaf
    return hf.Pretrained(cfg, module, stacking.to_physical(unflatten_dict(params), cfg), hf_config, str(hf_dir), arch)
