"""The family registry: which jaxtune module each Hugging Face architecture is, and what jaxtune does with it.

:data:`FAMILIES` maps every architecture jaxtune reads (``LlamaForCausalLM``, its classifier, its bare
``LlamaModel``, ``BertModel``, ``ViTForImageClassification``...) to a :class:`Family`: the config reader,
the linen module, the HF tensor names, the partition rules and the exports. ``docs/models.md`` is generated
from it (:mod:`jaxtune.models.catalog`); :mod:`jaxtune.models.hf` loads and saves checkpoints by it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from jaxtune.models import (
    deberta,
    decoder,
    dinov2,
    efficientnet,
    encoder,
    gemma,
    gpt2,
    gpt_neox,
    modernbert,
    moe,
    olmo2,
    phi3,
    vit,
)
from jaxtune.models.gguf_architectures import ARCHITECTURES as GGUF_ARCHITECTURES
from jaxtune.models.gguf_architectures import LLAMA_MOE
from jaxtune.models.hf_files import CheckpointError
from jaxtune.models.layers import PartitionRules

FamilyConfig = (decoder.DecoderConfig | encoder.EncoderConfig | modernbert.ModernBertConfig | vit.ViTConfig
                | efficientnet.EfficientNetConfig | deberta.DebertaConfig
                | dinov2.Dinov2Config)


def _linear_layout(modules: tuple[str, ...]) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF architecture maps onto a jaxtune module, and what jaxtune does with it: this table is
    the registry that ``docs/models.md`` is generated from (:mod:`jaxtune.models.catalog`)."""

    config_from_hf: Callable[..., FamilyConfig]
    module: type[nn.Module]
    hf_module: Callable[[tuple[str, ...]], str]
    partition_rules: PartitionRules
    body: type[nn.Module] | None = None  # the bare body a task head wraps (jaxtune.tuning); None: ``module``
    name: str = ""  # the model family, as docs/models.md lists it
    base: str | None = None  # the architecture of the body without a head (None: this one)
    classifier: str | None = None  # the family's *ForSequenceClassification, the export target of its HF head
    gguf: str | None = None  # llama.cpp's general.architecture whose files convert to this architecture
    # Whether the checkpoint stores a module's kernel (out, in) as torch's Linear does; GPT-2's Conv1D
    # stores (in, out), jaxtune's own layout.
    kernel_out_in: Callable[[tuple[str, ...]], bool] = _linear_layout
    # Tensor name on disk for a module-derived name, where the two differ (transformers renamed ViT's modules).
    checkpoint_name: Callable[[str], str] | None = None
    # The tensor name save_pretrained writes for a module-derived name, where transformers' own save_pretrained
    # writes another (GPT-NeoX's lm_head as embed_out); None: the module-derived name.
    saved_name: Callable[[str], str] | None = None
    modality: str = "text"  # what the model reads: token ids (text) or pixel_values (image)
    transformers: bool = True  # whether transformers has the architecture (else no HF or PEFT export)
    # A leaf stored as one checkpoint tensor per slice of its leading axis (a MoE layer's stacked experts):
    # ``(param path, index) -> tensor name``, None for every other leaf.
    expert_tensor: Callable[[tuple[str, ...], int], str | None] | None = None
    # A tensor stored as one part of a fused checkpoint tensor (DINOv2's SwiGLU gate/up in ``mlp.weights_in``):
    # ``name -> (stored name, part, parts)`` along the stored tensor's first axis, None for every other.
    checkpoint_chunk: Callable[[str], tuple[str, int, int] | None] | None = None
    # A bare decoder body (``LlamaModel``: embedding models such as e5-mistral are saved so): the causal LM
    # whose config and module it is, built without an output layer of its own (``DecoderConfig.lm_head``).
    lm: str | None = None

    @property
    def body_module(self) -> type[nn.Module]:
        """The module of the body alone: ``module`` for a causal LM or bare encoder, the body class
        for a checkpoint with a classification head (which jaxtune.tuning re-expresses as body + head)."""
        return self.body or self.module


_LLAMA_NAMES = {"LlamaForCausalLM": "Llama", "MistralForCausalLM": "Mistral", "Qwen2ForCausalLM": "Qwen2",
                "Qwen3ForCausalLM": "Qwen3", "GemmaForCausalLM": "Gemma", "Gemma2ForCausalLM": "Gemma 2",
                "Gemma3ForCausalLM": "Gemma 3 (text)", "SmolLM3ForCausalLM": "SmolLM3", "Olmo2ForCausalLM": "OLMo 2",
                "MixtralForCausalLM": "Mixtral", "Qwen2MoeForCausalLM": "Qwen2-MoE", "Qwen3MoeForCausalLM": "Qwen3-MoE"}
_ENCODER_NAMES = {"bert": "BERT", "roberta": "RoBERTa", "distilbert": "DistilBERT"}


def _encoder(arch: str) -> Family:
    base = encoder.CLASSIFIERS.get(arch, arch)
    layout = encoder.layout_of(arch)
    name = "XLM-RoBERTa" if arch.startswith("XLM") else _ENCODER_NAMES[layout]
    classifier = base.replace("Model", "ForSequenceClassification")
    return Family(encoder.EncoderConfig.from_hf, encoder.EncoderClassifier if arch == classifier else encoder.Encoder,
                  encoder.hf_module_for(layout), encoder.PARTITION_RULES,
                  body=encoder.Encoder if arch == classifier else None, name=name, base=base, classifier=classifier)


# The HF architecture each llama.cpp architecture converts to (gguf_architectures' table), for Family.gguf.
_GGUF = {row.hf_architecture: name for name, row in GGUF_ARCHITECTURES.items()} | {LLAMA_MOE.hf_architecture: "llama"}

FAMILIES: dict[str, Family] = {
    **{a: Family(decoder.DecoderConfig.from_hf, decoder.Decoder, decoder.hf_module, decoder.PARTITION_RULES,
                 name=_LLAMA_NAMES[a], classifier=a.replace("ForCausalLM", "ForSequenceClassification"),
                 gguf=_GGUF.get(a))
       for a in decoder.ARCHITECTURES},
    **{a: Family(decoder.DecoderConfig.from_hf, decoder.DecoderClassifier, decoder.hf_module, decoder.PARTITION_RULES,
                 body=decoder.Decoder, name=_LLAMA_NAMES[lm], base=lm, classifier=a)
       for a, lm in decoder.CLASSIFIERS.items()},
    # Gemma's and OLMo 2's tensor names are Llama's, so the decoder's name map serves them.
    **{a: Family(gemma.GemmaConfig.from_hf, gemma.Gemma, decoder.hf_module, gemma.PARTITION_RULES, name=_LLAMA_NAMES[a],
                 classifier=next(c for c, lm in gemma.CLASSIFIERS.items() if lm == a), gguf=_GGUF.get(a))
       for a in gemma.ARCHITECTURES},
    **{a: Family(gemma.GemmaConfig.from_hf, gemma.GemmaClassifier, decoder.hf_module, gemma.PARTITION_RULES,
                 body=gemma.Gemma, name=_LLAMA_NAMES[lm], base=lm, classifier=a)
       for a, lm in gemma.CLASSIFIERS.items()},
    "Olmo2ForCausalLM": Family(olmo2.config_from_hf, olmo2.Olmo2, decoder.hf_module, decoder.PARTITION_RULES,
                               name="OLMo 2", classifier="Olmo2ForSequenceClassification",
                               gguf=_GGUF.get("Olmo2ForCausalLM")),
    "Olmo2ForSequenceClassification": Family(olmo2.config_from_hf, olmo2.Olmo2Classifier, decoder.hf_module,
                                             decoder.PARTITION_RULES, body=olmo2.Olmo2, name="OLMo 2",
                                             base="Olmo2ForCausalLM", classifier="Olmo2ForSequenceClassification"),
    # A MoE classifier is its causal LM's body (experts named as the LM's) with the decoder family's score head.
    **{a: Family(moe.MoeConfig.from_hf, moe.MoeClassifier if a != lm else moe.MoeDecoder, decoder.hf_module,
                 moe.PARTITION_RULES, body=moe.MoeDecoder if a != lm else None, name=_LLAMA_NAMES[lm],
                 base=lm if a != lm else None, classifier=lm.replace("ForCausalLM", "ForSequenceClassification"),
                 checkpoint_name=moe.checkpoint_name, expert_tensor=moe.expert_tensor(lm),
                 gguf=_GGUF.get(a))
       for a, lm in {**{lm: lm for lm in moe.ARCHITECTURES}, **moe.CLASSIFIERS}.items()},
    **{a: Family(gpt2.GPT2Config.from_hf, gpt2.GPT2 if a == "GPT2LMHeadModel" else gpt2.GPT2Classifier,
                 gpt2.hf_module, gpt2.PARTITION_RULES, body=None if a == "GPT2LMHeadModel" else gpt2.GPT2,
                 name="GPT-2", base="GPT2LMHeadModel", classifier="GPT2ForSequenceClassification",
                 kernel_out_in=gpt2.kernel_out_in, gguf=_GGUF.get(a))
       for a in gpt2.ARCHITECTURES},
    # Phi-3's tensor names are Llama's (with fused qkv_proj / gate_up_proj), so the decoder's name map serves it.
    **{a: Family(phi3.Phi3Config.from_hf, phi3.Phi3 if a == "Phi3ForCausalLM" else phi3.Phi3Classifier,
                 decoder.hf_module, phi3.PARTITION_RULES, body=None if a == "Phi3ForCausalLM" else phi3.Phi3,
                 name="Phi-3", base="Phi3ForCausalLM", classifier="Phi3ForSequenceClassification",
                 gguf=_GGUF.get(a))
       for a in phi3.ARCHITECTURES},
    **{a: Family(gpt_neox.GPTNeoXConfig.from_hf,
                 gpt_neox.GPTNeoX if a == "GPTNeoXForCausalLM" else gpt_neox.GPTNeoXClassifier, gpt_neox.hf_module,
                 gpt_neox.PARTITION_RULES, body=None if a == "GPTNeoXForCausalLM" else gpt_neox.GPTNeoX,
                 name="GPT-NeoX (Pythia)", base="GPTNeoXForCausalLM", classifier="GPTNeoXForSequenceClassification",
                 checkpoint_name=gpt_neox.checkpoint_name, saved_name=gpt_neox.checkpoint_name, gguf=_GGUF.get(a))
       for a in gpt_neox.ARCHITECTURES},
    **{a: _encoder(a) for a in encoder.ARCHITECTURES},
    **{a: Family(modernbert.ModernBertConfig.from_hf,
                 modernbert.ModernBertClassifier if a in modernbert.CLASSIFIERS else modernbert.ModernBert,
                 modernbert.hf_module, modernbert.PARTITION_RULES,
                 body=modernbert.ModernBert if a in modernbert.CLASSIFIERS else None, name="ModernBERT",
                 base="ModernBertModel", classifier="ModernBertForSequenceClassification")
       for a in modernbert.ARCHITECTURES},
    **{a: Family(deberta.DebertaConfig.from_hf,
                 deberta.DebertaClassifier if a in deberta.CLASSIFIERS else deberta.Deberta,
                 deberta.hf_module, deberta.PARTITION_RULES,
                 body=deberta.Deberta if a in deberta.CLASSIFIERS else None, name="DeBERTa-v2/v3",
                 base="DebertaV2Model", classifier="DebertaV2ForSequenceClassification")
       for a in deberta.ARCHITECTURES},
    **{a: Family(vit.ViTConfig.from_hf, vit.ViTClassifier if a in vit.CLASSIFIERS else vit.ViT, vit.hf_module,
                 vit.PARTITION_RULES, body=vit.ViT if a in vit.CLASSIFIERS else None, name="ViT", base="ViTModel",
                 classifier="ViTForImageClassification", checkpoint_name=vit.checkpoint_name, modality="image")
       for a in vit.ARCHITECTURES},
    **{a: Family(efficientnet.EfficientNetConfig.from_hf, efficientnet.EfficientNetLite, efficientnet.hf_module,
                 efficientnet.PARTITION_RULES, body=efficientnet.EfficientNetLite if a in efficientnet.CLASSIFIERS
                 else None, name="EfficientNet-Lite", modality="image", transformers=False)
       for a in efficientnet.ARCHITECTURES},
    **{a: Family(dinov2.Dinov2Config.from_hf, dinov2.Dinov2Classifier if a in dinov2.CLASSIFIERS else dinov2.Dinov2,
                 dinov2.hf_module, dinov2.PARTITION_RULES, body=dinov2.Dinov2 if a in dinov2.CLASSIFIERS else None,
                 name="DINOv2 with registers" if "WithRegisters" in a else "DINOv2",
                 base=a.replace("ForImageClassification", "Model"),
                 classifier=a.replace("Model", "ForImageClassification"),
                 checkpoint_name=dinov2.checkpoint_name, checkpoint_chunk=dinov2.checkpoint_chunk, modality="image")
       for a in dinov2.ARCHITECTURES},
}


def bare_architecture(lm: str) -> str:
    """The transformers class of a causal LM's body alone (``LlamaForCausalLM`` -> ``LlamaModel``)."""
    return {"GPT2LMHeadModel": "GPT2Model", "Gemma3ForCausalLM": "Gemma3TextModel"}.get(
        lm, lm.replace("ForCausalLM", "Model"))


# Each causal LM's bare body: its family, loaded without lm_head; a head plan exports it as the family's classifier.
FAMILIES.update({bare_architecture(a): dataclasses.replace(family, base=None, gguf=None, lm=a)
                 for a, family in list(FAMILIES.items())
                 if family.body is None and issubclass(family.module, decoder.Decoder)})
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family_for(hf_config: dict[str, Any], architecture: str | None = None) -> tuple[str, Family]:
    """The architecture name and :class:`Family` for a ``config.json`` dict."""
    if architecture is None:
        declared = hf_config.get("architectures") or []
        architecture = next((a for a in declared if a in FAMILIES), None)
        if architecture is None:
            by_type = {**decoder.MODEL_TYPES, **encoder.MODEL_TYPES, **gemma.MODEL_TYPES, **gpt2.MODEL_TYPES,
                       **olmo2.MODEL_TYPES, **phi3.MODEL_TYPES, **vit.MODEL_TYPES, **efficientnet.MODEL_TYPES,
                       **modernbert.MODEL_TYPES, **moe.MODEL_TYPES, **gpt_neox.MODEL_TYPES,
                       **deberta.MODEL_TYPES, **dinov2.MODEL_TYPES}
            architecture = by_type.get(hf_config.get("model_type", ""))
        if architecture is None:
            raise CheckpointError(
                f"config.json: architecture {declared or hf_config.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
    if architecture not in FAMILIES:
        raise CheckpointError(f"architecture {architecture!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return architecture, FAMILIES[architecture]
