"""Write a Hugging Face decoder directory as one GGUF file that llama.cpp, Ollama and transformers load.

The inverse of :func:`jaxtune.models.gguf.gguf_to_hf` for the families both llama.cpp and transformers'
GGUF loader read as plain decoders (:data:`jaxtune.models.gguf_export_families.GGUF_EXPORT_ARCHITECTURES`:
Llama, SmolLM2 included, Mistral, Qwen2, Qwen3, GPT-2, Gemma 2, Gemma 3 text, Phi-3), and GPT-NeoX, which
llama.cpp and jaxtune's importer read (transformers' GGUF loader has no gptneox)::

    hf_to_gguf("out/merged", "out/model.gguf", dtype="float16")

:func:`write_gguf` does the same from tensors declared by name, shape and dtype and read when written
(:func:`jaxtune.models.hf.hf_tensors` of merged params in memory: ``jt.export(format="gguf")`` writes no
merged directory).

This module is the writer: the tensors, their types and the file. Tensors get llama.cpp's names from the
``gguf`` package's own tables (:func:`gguf.get_tensor_name_map`), Llama's Q/K rows are permuted into
llama.cpp's interleaved rotary layout (its ``llama`` kernel rotates adjacent pairs; Qwen's kernels rotate
HF's halves, so theirs stay). What llama.cpp computes of each family (what is refused, the ``{arch}.*``
metadata keys, the RoPE tensors) is :mod:`jaxtune.models.gguf_export_families`; the tokenizer as
``tokenizer.ggml.*`` is :mod:`jaxtune.models.gguf_export_vocabulary`.

Norm gains and biases are stored float32 (llama.cpp keeps 1-D tensors so); the matrices in ``dtype``:
``float32``, ``float16``, ``bfloat16`` or ``q8_0`` (llama.cpp's 8-bit blocks of 32; a matrix whose rows
are not whole blocks stays float16, as llama.cpp's converter does). ``None`` keeps each tensor's own
float dtype. The tensors are declared first and then read, converted and written one at a time: memory
holds one tensor, not the model.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from jaxtune.dtypes import GGUF_DTYPE_NAMES
from jaxtune.models.gguf_architectures import ARCHITECTURES, GGUFError
from jaxtune.models.gguf_export_families import (
    add_hparams,
    check_architecture,
    complete_config,
    rope_tensors,
    standard_names,
)
from jaxtune.models.gguf_export_vocabulary import Vocabulary, add_vocabulary, read_vocabulary
from jaxtune.models.hf import HFTensor

GGUF_DTYPES = GGUF_DTYPE_NAMES
_GGML_TYPES = {"float32": GGMLQuantizationType.F32, "float16": GGMLQuantizationType.F16,
               "bfloat16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # else read as float32
_FILE_TYPES = {"float32": LlamaFileType.ALL_F32, "float16": LlamaFileType.MOSTLY_F16,
               "bfloat16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's "rotate half" rows of a Q or K projection (weight or bias) in llama.cpp's interleaved
    order; :func:`jaxtune.models.gguf.unpermute_qk` is the inverse."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def group_qkv(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """GPT-NeoX's fused ``query_key_value`` rows (weight or bias), HF's per head ``[heads, 3, head_dim]``, in
    llama.cpp's ``[3, heads, head_dim]`` (as its converter reorders them); :func:`jaxtune.models.gguf.ungroup_qkv`
    is the inverse."""
    return weight.reshape(n_heads, 3, -1, *weight.shape[1:]).swapaxes(0, 1).reshape(weight.shape)


def hf_to_gguf(hf_dir: str | os.PathLike[str], out_file: str | os.PathLike[str], dtype: str | None = None, *,
               name: str | None = None) -> Path:
    """Write the HF decoder directory ``hf_dir`` (``config.json``, safetensors weights, a fast
    tokenizer) as the GGUF file ``out_file`` (replaced if it exists); ``dtype`` of the matrices is
    one of :data:`GGUF_DTYPES` (``None``: each tensor's own); ``name`` is ``general.name`` (default:
    the directory's). Raises :class:`GGUFError` before writing when the family, RoPE or tokenizer
    has no GGUF form here."""
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    return write_gguf(_checkpoint_tensors(hf_dir), config, hf_dir, out_file, dtype, name=name or hf_dir.name,
                      where=str(hf_dir))


def write_gguf(tensors: list[HFTensor], hf_config: dict[str, Any], tokenizer_dir: str | os.PathLike[str],
               out_file: str | os.PathLike[str], dtype: str | None = None, *, name: str, where: str = "model") -> Path:
    """Write the HF decoder whose checkpoint tensors are ``tensors`` (:func:`jaxtune.models.hf.hf_tensors` of
    params in memory, or a directory's files), ``config.json`` dict ``hf_config`` and tokenizer in
    ``tokenizer_dir`` as the GGUF file ``out_file`` (see :func:`hf_to_gguf`); each tensor is read when the
    writer reaches it. ``where`` names the model in errors."""
    out_file = Path(out_file)
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise GGUFError(f"GGUF dtype {dtype!r} is not supported; use one of {', '.join(GGUF_DTYPES)}")
    config = standard_names(complete_config(hf_config))
    arch = check_architecture(config, where)
    vocabulary = read_vocabulary(Path(tokenizer_dir), config["vocab_size"])
    declared = _tensors(tensors, config, arch, dtype, where)

    writer = gguf.GGUFWriter(out_file, arch)
    try:
        _write(writer, Path(tokenizer_dir), config, declared, dtype, vocabulary, name)
    finally:
        writer.close()
    return out_file


def _checkpoint_tensors(hf_dir: Path) -> list[HFTensor]:
    """The tensors of ``hf_dir``'s safetensors files, each read from its file when asked."""
    from safetensors import safe_open

    def read(path: Path, key: str) -> np.ndarray:
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor(key)

    out = []
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_slice(key)
                dtype = np.dtype(_SAFETENSORS_DTYPES.get(tensor.get_dtype(), "float32"))
                out.append(HFTensor(key, tuple(tensor.get_shape()), dtype, functools.partial(read, path, key)))
    return out


def _write(writer: gguf.GGUFWriter, tokenizer_dir: Path, config: dict[str, Any],
           tensors: list[_Tensor], dtype: str | None, vocabulary: Vocabulary, name: str) -> None:
    """The metadata, then the tensor table, then each tensor's data (one in memory at a time)."""
    writer.add_name(name)
    add_hparams(writer, config, ARCHITECTURES[writer.arch])
    writer.add_file_type(_file_type(tensors, dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocabulary(writer, vocabulary, tokenizer_dir)
    for tensor in tensors:
        _add_tensor_info(writer, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        writer.write_tensor_data(tensor.stored())


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: its llama.cpp name and type, and where its values come from (``read``, a
    checkpoint tensor's, Q/K rows permuted for ``heads``, or transposed: GPT-2's Conv1D ``(in, out)``;
    or ``values`` computed from the config)."""

    name: str
    kind: GGMLQuantizationType
    shape: tuple[int, ...]  # as stored, llama.cpp's rows: (out, in)
    read: Callable[[], np.ndarray] | None = None
    heads: int | None = None
    values: np.ndarray | None = None
    transpose: bool = False
    shift: float = 0.0  # added (Gemma's RMSNorm gains: llama.cpp computes x * w where Gemma computes x * (1 + w))
    group_heads: int | None = None  # GPT-NeoX's fused qkv: rows regrouped for these heads (group_qkv)

    def stored(self) -> np.ndarray:
        """The bytes (as an array) llama.cpp reads: read now, one tensor at a time."""
        data = np.asarray(self.read() if self.values is None else self.values, np.float32)
        if self.heads is not None:
            data = permute_qk(data, self.heads)
        if self.group_heads is not None:
            data = group_qkv(data, self.group_heads)
        if self.transpose:
            data = data.T
        if self.shift:
            data = data + np.float32(self.shift)
        return np.ascontiguousarray(gguf.quants.quantize(data, self.kind))


def _tensors(tensors: list[HFTensor], config: dict[str, Any], arch: str, dtype: str | None,
             where: str) -> list[_Tensor]:
    """Every tensor of the file, its type decided and nothing read yet: the writer takes one at a time."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    heads = {"attn_q": config["num_attention_heads"],
             "attn_k": config.get("num_key_value_heads") or config["num_attention_heads"]}
    permute, transposed = ARCHITECTURES[arch].permute_qk, ARCHITECTURES[arch].transposed
    out = [_Tensor(gguf.TENSOR_NAMES[part] + ".weight", GGMLQuantizationType.F32, values.shape, values=values)
           for part, values in rope_tensors(config).items()]
    for tensor in tensors:
        if tensor.name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reads a missing output.weight as the embedding
        if tensor.name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers, which older checkpoints saved
        name = names.get_name(tensor.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"{where}: tensor {tensor.name!r} has no llama.cpp {arch} name; "
                            f"this is not a plain {arch} model")
        part = name.split(".")[-2]
        transpose = part in transposed and name.endswith(".weight")
        shape = tensor.shape[::-1] if transpose else tensor.shape
        kind = _kind(shape, dtype or (tensor.dtype.name if tensor.dtype.name in _GGML_TYPES else "float32"))
        shift = ARCHITECTURES[arch].norm_shift if name.endswith("norm.weight") else 0.0
        group = config["num_attention_heads"] if ARCHITECTURES[arch].regroup_qkv and part == "attn_qkv" else None
        out.append(_Tensor(name, kind, shape, tensor.read, heads[part] if permute and part in heads else None,
                           transpose=transpose, shift=shift, group_heads=group))
    return out


def _kind(shape: tuple[int, ...], dtype: str) -> GGMLQuantizationType:
    """How llama.cpp stores a tensor of ``shape`` asked in ``dtype``: 1-D tensors float32; Q8_0 falls
    back to float16 for rows that are not whole 32-value blocks."""
    kind = _GGML_TYPES[dtype]
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    if kind == GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return GGMLQuantizationType.F16
    return kind


def _add_tensor_info(writer: gguf.GGUFWriter, tensor: _Tensor) -> None:
    """Declare ``tensor`` (its stored byte layout, learned from one quantized row) before any data is written."""
    row = gguf.quants.quantize(np.zeros((1, tensor.shape[-1]), np.float32), tensor.kind)
    rows = math.prod(tensor.shape[:-1])
    writer.add_tensor_info(tensor.name, (*tensor.shape[:-1], row.shape[-1]), row.dtype, rows * row.nbytes,
                           raw_dtype=tensor.kind)


def _file_type(tensors: list[_Tensor], dtype: str | None) -> LlamaFileType:
    """``general.file_type``: the export's dtype, or the matrices' own (the most common one)."""
    if dtype is not None:
        return _FILE_TYPES[dtype]
    kinds = [t.kind for t in tensors if len(t.shape) > 1]
    by_kind = {GGMLQuantizationType.F16: "float16", GGMLQuantizationType.BF16: "bfloat16"}
    return _FILE_TYPES[by_kind.get(max(set(kinds), key=kinds.count), "float32")] if kinds else LlamaFileType.ALL_F32

