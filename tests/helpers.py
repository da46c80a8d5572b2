"""Tiny random Hugging Face models for tests, built offline with transformers."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

TINY_DECODER = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
TINY_ENCODER = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64)


def tiny_hf_model(architecture: str, out_dir: Path | None = None, seed: int = 0, randomize: bool = False,
                  **overrides: Any):
    """A random transformers model of ``architecture`` (eval mode), optionally saved to ``out_dir``.

    transformers' init leaves every norm gain at 1 and every bias at 0, so a parity test against it
    cannot see a dropped gain or bias: ``randomize=True`` draws every weight afresh
    (:func:`randomize_weights`, norm gains by :func:`is_norm_gain`) before saving."""
    import torch
    import transformers

    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "BertModel": transformers.BertConfig,
        "BertForSequenceClassification": transformers.BertConfig,
        "BertForMaskedLM": transformers.BertConfig,
        "LlamaForSequenceClassification": transformers.LlamaConfig,
        "Qwen2ForSequenceClassification": transformers.Qwen2Config,
    }[architecture]
    base = TINY_ENCODER if architecture.startswith("Bert") else TINY_DECODER
    kwargs = {**base, **overrides}
    if architecture.startswith("Bert"):
        kwargs.pop("num_key_value_heads", None)
    config = config_cls(**kwargs)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    if randomize:
        randomize_weights(model, is_norm=is_norm_gain)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def is_norm_gain(name: str) -> bool:
    """A norm's gain by its parameter name, in every naming here: Llama's ``input_layernorm.weight``,
    Qwen3's ``q_norm.weight``, BERT's ``LayerNorm.weight``, ViT's ``layernorm_before.weight`` (a
    LayerNorm's bias is not a gain: it is drawn as any other weight)."""
    return "norm" in name.lower() and name.endswith(".weight")


def randomize_weights(model, norm_offset: float = 0.5, is_norm=lambda name: "norm" in name) -> None:
    """Draw every weight of a torch ``model`` afresh, in place: norm gains uniform in
    ``[norm_offset, norm_offset + 1)`` (Gemma's ``1 + w`` gains take -0.5), everything else N(0, 0.1).
    transformers' init leaves gains at 1 and some weights at 0; a parity test must exercise them all."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_norm(name):
                param.copy_(torch.rand_like(param) + norm_offset)
            else:
                param.normal_(0.0, 0.1)


def tiny_random_model(architecture: str, out_dir: Path, config: dict[str, Any], seed: int = 0,
                      config_class: str | None = None, norm_offset: float = 0.5):
    """A transformers ``architecture`` of ``config`` (class ``config_class``, by default the
    architecture's ``...Config``), its weights drawn by :func:`randomize_weights` from ``seed``,
    saved to ``out_dir``; returned in eval mode."""
    import torch
    import transformers

    config_class = config_class or re.sub(r"For\w+$", "Config", architecture)
    hf_config = getattr(transformers, config_class)(**config)
    hf_config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(hf_config).eval()
    randomize_weights(model, norm_offset=norm_offset)
    model.save_pretrained(out_dir)
    return model


def torch_logits(model, input_ids: np.ndarray, **kwargs: np.ndarray) -> np.ndarray:
    """float32 numpy logits (or last hidden state for a bare encoder) of a transformers model."""
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_ids)),
                    **{k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()})
    value = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return value.float().numpy()


def tiny_llama_and_bert(root: Path) -> dict[str, Any]:
    """``{"llama": Pretrained, "bert": Pretrained}``: tiny random models saved under ``root``, loaded back."""
    from jaxtune.models import hf

    tiny_hf_model("LlamaForCausalLM", root / "llama")
    tiny_hf_model("BertModel", root / "bert")
    return {name: hf.load_pretrained(root / name) for name in ("llama", "bert")}


def skip_or_fail(reason: str) -> None:
    """Skip a test whose real asset (a PyPI package) could not be fetched here; under CI
    (``CI=true``) fail instead, so an offline CI run cannot pass while testing nothing."""
    import pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp `convert_hf_to_gguf.py` `LlamaModel.permute` (HF rotate-half -> interleaved)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: Any) -> Any:
    """jaxtune's GGUF reader of ``path`` (``gguf.GGUFReader``'s parse over an ndarray view: 3-4x faster on
    a real vocabulary; tests/test_gguf.py checks it reads what ``gguf.GGUFReader`` reads)."""
    from jaxtune.models.gguf import open_gguf

    return open_gguf(Path(path))


# Byte offsets of the fp16 scales (and Q4_1/Q5_1/K-quant mins) inside one GGML block of each type; a
# negative offset counts from the block's end (Q6_K keeps its super-block scale last). Any other block
# bytes decode to finite weights, so random bytes with these fields set to small fp16 values are a valid
# quantized matrix.
GGUF_FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
                    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,)}


def set_gguf_fp16_fields(blocks: np.ndarray, kind: str, values) -> np.ndarray:
    """Write ``values`` (a callable ``shape -> float array``) as fp16 into every :data:`GGUF_FP16_FIELDS`
    field of ``blocks`` (uint8 ``(..., block bytes)``), in place; returns ``blocks``."""
    size = blocks.shape[-1]
    for at in GGUF_FP16_FIELDS[kind]:
        at %= size
        blocks[..., at:at + 2] = np.asarray(values((*blocks.shape[:-1], 1))).astype(np.float16).view(np.uint8)
    return blocks


def tfrecords(path: Path) -> list[bytes]:
    """The data of every TFRecord in ``path`` (a little-endian uint64 length and its CRC, the data and its
    CRC), each frame's two CRCs checked with tensorboardX's masked CRC-32C."""
    import struct

    from tensorboardX.record_writer import masked_crc32c

    data, at, out = Path(path).read_bytes(), 0, []
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack_from("<I", data, at + 8)
        payload = data[at + 12:at + 12 + length]
        (payload_crc,) = struct.unpack_from("<I", data, at + 12 + length)
        assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload), (path, at)
        out.append(payload)
        at += 12 + length + 4
    assert at == len(data), f"{path}: a truncated record at byte {at}"
    return out


def tensorboard_scalars(folder: Path) -> list[tuple[str, int, float]]:
    """``(tag, step, value)`` of every scalar in ``folder``'s TensorBoard events files, in order, each
    record parsed with tensorboardX's ``Event`` proto."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = []
    for path in sorted(Path(folder).iterdir()):
        for record in tfrecords(path):
            event = Event.FromString(record)
            scalars += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
    return scalars


def trl_template(name: str) -> str:
    """One of the chat templates TRL ships (the families' own, and their training variants with
    transformers' {% generation %} marks)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def qwen3_tokenizer() -> Any:
    """A character-level tokenizer with Qwen3's chat template and its chat tokens as single tokens
    (``<|im_start|>``/``<|im_end|>`` special, ``<think>``/``</think>`` added, as in Qwen3's vocabulary)."""
    from jaxtune.data.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(trl_template("qwen3"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


# Qwen2's pre-tokenizer split (its tokenizer.json), and the ChatML template its chat models use.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_bpe_tokenizer(pre: str = "qwen2", vocab_size: int = 300) -> Any:
    """A byte-level BPE tokenizer shaped as a real family's (``pre``: ``qwen2``, Qwen's regex split; ``smollm``,
    SmolLM2's digits then GPT-2's split; ``gpt2``, GPT-2's split alone), trained on a few sentences to
    ``vocab_size`` ids, with ChatML's special tokens, an added non-special ``<think>`` and the ChatML chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    if pre == "qwen2":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog 1234", "hello world, how are you?"] * 10,
                                trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens(["<think>"])
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def fit_steps(tuned, batch: dict, steps: int = 3, lr: float = 1e-2):
    """A few Adam steps of a planned model on one ``batch`` (the trainer's jitted step, no loader):
    the trained full params and each step's metrics."""
    import jax
    import optax

    from jaxtune import tuning
    from jaxtune.training.step import make_loss_fn, make_train_step

    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(trainable)
    step = jax.jit(make_train_step(make_loss_fn(tuned.module, tuned.task), optimizer))
    history = []
    for i in range(steps):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
        history.append(jax.device_get(metrics))
    return tuning.combine(trainable, frozen), history
