"""Applying a plan to a pretrained model: the tuned module, its params and their labels.

:func:`apply_plan` turns a :class:`jaxtune.models.hf.Pretrained` and a :class:`Plan` into a
:class:`Tuned`: the body's params (paths unchanged: ``layer_0/...`` for BERT bodies, also when
loaded from ``BertForSequenceClassification``) plus adapter leaves, ``head/...`` and
``prompt_embeddings`` as the plan asks, and one label per leaf. The plan is resolved on the
logical per-layer paths (``layers_3/...``); a scanned decoder's params and labels then hold each
run of identically planned layers stacked (``layers_0-1/...``, :mod:`jaxtune.models.stacking`).

Call convention of :class:`TunedModel` (keyword arguments; ``segment_ids`` nonzero = real token):

- task ``lm``: ``apply(v, input_ids=, positions=, segment_ids=, deterministic=, method="hidden")``
  -> ``(B, T, D)`` aligned to the input tokens (virtual prompt tokens removed), then
  ``apply(v, hidden, method="logits")`` -> ``(B, T, V)``; ``apply(v, input_ids=...)`` does both.
- tasks ``classification``/``regression``: ``apply(v, input_ids=, segment_ids=, positions=,
  token_type_ids=, deterministic=)`` -> ``(B, num_outputs)`` (decoders ignore token types); packed
  rows (``segments=S``) -> ``(B, S, num_outputs)``, one output per segment.
  An image body (``cfg.modality == "image"``: ViT) takes ``pixel_values=`` float ``(B, C, H, W)``
  instead of the token fields, and its token states are the patch states.

Dropout (body, adapters, head) is active with ``deterministic=False`` and ``rngs={"dropout": key}``.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxtune.models import decoder, efficientnet, stacking, vit
from jaxtune.models.hf import FAMILIES, FamilyConfig, Pretrained
from jaxtune.models.layers import Array, PartitionRules, pool
from jaxtune.models.load import dtype_name
from jaxtune.models.moe import MoeConfig, is_expert_kernel
from jaxtune.models.quant import is_quantized
from jaxtune.tuning import labels as labels_lib
from jaxtune.tuning.heads import Head, HeadSpec, family_head, head_spec, hf_head_modules, init_head
from jaxtune.tuning.labels import HEAD_KEY, PROMPT_LEAF
from jaxtune.tuning.lora import AdapterSpec, add_adapters, quantized_magnitudes
from jaxtune.tuning.partition import cast_by_label, quantize_leaves
from jaxtune.tuning.plan import Plan, PlanError, Rule, as_plan
from jaxtune.tuning.prompt import Tokenizer, init_prompt, prepend

Params = dict[str, Any]
TASKS = ("lm", "classification", "regression")  # values of Tuned.task


class TunedModel(nn.Module):
    """A body (``Decoder`` or ``Encoder``, params at the top level of the tree) with an optional
    prompt (``prompt_embeddings`` ``(P, D)``) and head (``head/``). See the module docstring."""

    body: nn.Module
    task: str = "lm"
    prompt_tokens: int = 0
    head_spec: HeadSpec | None = None

    def setup(self) -> None:
        # The body's params sit at the root, so its paths (and HF names) stay those of the base model.
        nn.share_scope(self, self.body)
        if self.prompt_tokens:
            self.prompt_embeddings = self.param(
                PROMPT_LEAF, nn.initializers.zeros, (self.prompt_tokens, self.body.cfg.hidden_size), jnp.float32)
        if self.head_spec is not None:
            self.head = Head(self.head_spec, self.body.cfg)

    @property
    def _is_decoder(self) -> bool:
        return isinstance(self.body.cfg, decoder.DecoderConfig)

    def hidden(
        self,
        input_ids: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
        pixel_values: Array | None = None,
    ) -> Array:
        """Token states ``(B, T, D)`` of the body for ``input_ids`` ``(B, T)`` int32, or patch
        states for an image body's ``pixel_values`` ``(B, C, H, W)``."""
        if is_image(self.body.cfg):
            return self.body(pixel_values, deterministic)
        if not self._is_decoder:
            return self.body(input_ids, segment_ids, positions, token_type_ids, deterministic)
        if not self.prompt_tokens:
            return self.body.hidden(input_ids, segment_ids, positions, deterministic)
        embeds, positions, segment_ids = prepend(self.prompt_embeddings, self.body.embed(input_ids), positions,
                                                 segment_ids)
        out = self.body.hidden(positions=positions, segment_ids=segment_ids, deterministic=deterministic,
                               inputs_embeds=embeds)
        return out[:, self.prompt_tokens:]

    def logits(self, hidden: Array) -> Array:
        """LM logits ``(..., V)`` for hidden states ``(..., D)`` (task ``lm`` only)."""
        return self.body.logits(hidden)

    def __call__(
        self,
        input_ids: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
        pixel_values: Array | None = None,
        segments: int | None = None,
        pool_ids: Array | None = None,
    ) -> Array:
        """LM logits ``(B, T, V)``, or head outputs ``(B, num_outputs)`` in the compute dtype; for
        packed rows (``segments=S``: segment ids ``1..S``, positions restarting in each) one output
        per segment, ``(B, S, num_outputs)``. ``pool_ids`` ``(B, T)``: the segment ids the head pools
        over, where they differ from those attention reads (a reward model leaves out trailing pad
        tokens, as transformers does); default ``segment_ids``."""
        hidden = self.hidden(input_ids, segment_ids, positions, token_type_ids, deterministic, pixel_values)
        if self.task == "lm":
            return self.logits(hidden)
        spec = self.head_spec
        hidden = self.head.transform(hidden, positions, segment_ids, deterministic)
        real = pool_ids if pool_ids is not None else segment_ids
        if real is None:  # an image: every token, but the tokens a body's pooling leaves out (DINOv2's registers)
            pooled_tokens = getattr(self.body.cfg, "pooled_tokens", None)
            real = pooled_tokens(hidden.shape[:2]) if pooled_tokens else jnp.ones(hidden.shape[:2], jnp.int32)
        if spec.pooling == "pooler":
            features = self.body.pooled(pool(hidden, real, "cls", segments), deterministic)
        else:
            features = pool(hidden, real, spec.pooling, segments)
        return self.head(features, deterministic)


@dataclasses.dataclass
class Tuned:
    """A pretrained model with a plan applied.

    ``params``/``labels`` are same-shaped trees in the layout the module runs on (a scanned
    decoder's runs stacked; ``jaxtune.models.stacking.unstack`` gives the per-layer view, and
    ``config.layer_groups`` the runs); ``labels`` leaves are ``"freeze"`` or a group
    (``train``, ``lora``, ``dora``, ``prompt``, ``head``). ``config``/``hf_config``/``source``/
    ``architecture`` describe the base checkpoint, for export. ``head_is_new`` is True when the
    plan created the head (it is then always exported with a PEFT adapter). ``label_names``:
    the classes of a classification head, in output order (from the data). ``step``: the
    optimizer steps that produced ``params`` (0: as planned, untrained).
    """

    module: TunedModel
    params: Params
    labels: dict[str, Any]
    task: str
    num_outputs: int
    plan: Plan
    config: FamilyConfig
    hf_config: dict[str, Any]
    source: str
    architecture: str
    adapters: dict[tuple[str, ...], AdapterSpec]
    head: HeadSpec | None = None
    prompt_tokens: int = 0
    head_is_new: bool = False
    tokenizer: Tokenizer | None = None
    label_names: tuple | None = None
    step: int = 0

    @property
    def is_decoder(self) -> bool:
        return isinstance(self.config, decoder.DecoderConfig)

    @property
    def partition_rules(self) -> PartitionRules:
        """How the model family's weights split over a mesh (see ``jaxtune.models.layers.partition_rules``)."""
        return FAMILIES[self.architecture].partition_rules

    @property
    def hf_architecture(self) -> str | None:
        """The transformers class this model is exactly (for export), or None for a jaxtune-only head."""
        family = FAMILIES[self.architecture]
        if not family.transformers:
            return None  # EfficientNet: no transformers class; export the trained params (Orbax)
        if self.head is None:
            return family.base or self.architecture
        return None if hf_head_modules(self.head, self.config) is None else family.classifier


def is_image(cfg: Any) -> bool:
    """Whether a family config's model reads ``pixel_values`` rather than token ids."""
    return getattr(cfg, "modality", "text") == "image"


def _split_pretrained(pretrained: Pretrained) -> tuple[FamilyConfig, Params, HeadSpec | None, Params | None]:
    """The body config and params (a scanned run's layers as :class:`jaxtune.models.stacking.Layer` s),
    and the checkpoint's own head (``*ForSequenceClassification``)."""
    # Plans address layers one by one; the layers they keep go back into the loaded stack, not a copy of it.
    cfg, params = pretrained.config, stacking.unstack(pretrained.params, lazy=True)
    if pretrained.architecture in efficientnet.CLASSIFIERS:  # the ImageNet classifier: mean pool -> dropout -> fc
        spec = HeadSpec(task="regression" if cfg.num_labels == 1 else "classification", num_outputs=cfg.num_labels,
                        pooling="mean", dropout=cfg.hidden_dropout, bias=True)
        return (dataclasses.replace(cfg, include_top=False), {k: v for k, v in params.items() if k != "fc"}, spec,
                {"out": params["fc"]})
    if pretrained.architecture in vit.CLASSIFIERS:  # ViTClassifier = ViT + classifier on the final [CLS] state
        spec = HeadSpec(task="regression" if cfg.num_labels == 1 else "classification", num_outputs=cfg.num_labels,
                        pooling="cls", dropout=0.0, bias=True, input_dropout=cfg.classifier_layout.input_dropout)
        return cfg, dict(params["vit"]), spec, {"out": params["classifier"]}
    if FAMILIES[pretrained.architecture].body is None:
        return cfg, dict(params), None, None
    task = "regression" if cfg.num_labels == 1 else "classification"
    if isinstance(cfg, decoder.DecoderConfig):  # DecoderClassifier = body + score on the last token
        spec = HeadSpec(task=task, num_outputs=cfg.num_labels, pooling="last", dropout=0.0, bias=False)
        return cfg, {k: v for k, v in params.items() if k != "score"}, spec, {"out": params["score"]}
    # EncoderClassifier = the body under its prefix + the family's classifier, already laid out as a head.
    layout = cfg.classifier_layout
    spec = family_head(layout, task, cfg.num_labels, cfg.hidden_size, cfg.classifier_dropout)
    body_cfg = dataclasses.replace(cfg, use_pooler=layout.pooling == "pooler") if hasattr(cfg, "use_pooler") else cfg
    return body_cfg, dict(params[layout.body]), spec, dict(params[HEAD_KEY])


def has_output_layer(pretrained: Pretrained) -> bool:
    """Whether ``pretrained`` trains without a head rule: a decoder (its LM head) or a checkpoint with its
    own classifier; a bare encoder (``BertModel``, ``ViTModel``) has none."""
    return isinstance(pretrained.config, decoder.DecoderConfig) or _split_pretrained(pretrained)[2] is not None


def check_pretrained(pretrained: Any) -> None:
    """Refuse anything but a model from :func:`jaxtune.load`, naming what to pass instead (a path
    or a planned model failed on a missing attribute)."""
    if isinstance(pretrained, Pretrained):
        return
    if isinstance(pretrained, Tuned):
        raise TypeError("pretrained: this model already has a plan (apply_plan returned it); apply one plan to the "
                        "model jaxtune.load returns, its rules joined with + (e.g. jaxtune.lora() + jaxtune.head())")
    if isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained: got the path {str(pretrained)!r}; load the model first: "
                        f"jaxtune.apply_plan(jaxtune.load({str(pretrained)!r}), plan)")
    raise TypeError(f"pretrained: expected a model from jaxtune.load, got {type(pretrained).__name__}")


def _key(rng: Any) -> jax.Array:
    """``rng`` as a key: None is key 0, an int a seed (as ``TrainConfig.seed`` and ``complete(seed=)``
    are; ``jax.random.split`` failed on it)."""
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return jax.random.key(int(rng))
    if isinstance(rng, jax.Array):
        return rng
    raise TypeError(f"rng: expected a key (jax.random.key(0)) or an int seed, got {type(rng).__name__}")


def _last(plan: Plan, action: str) -> tuple[int, Rule] | tuple[None, None]:
    found = [(i, r) for i, r in enumerate(plan.rules) if r.action == action]
    return found[-1] if found else (None, None)


def apply_plan(
    pretrained: Pretrained,
    plan: Plan | Sequence[Mapping[str, Any]] | Mapping[str, Any],
    rng: jax.Array | None = None,
    *,
    frozen_dtype: Any | None = None,
    tokenizer: Tokenizer | None = None,
    data: Any = None,
) -> Tuned:
    """Apply ``plan`` to ``pretrained``: add adapters, head and prompt, label every leaf.

    Args:
      pretrained: from :func:`jaxtune.load` (its params are not modified).
      plan: a :class:`Plan` or plain rule data.
      rng: key for new leaves (LoRA A, head, prompt), or an int seed; default ``jax.random.key(0)``.
      frozen_dtype: dtype for frozen float leaves (``"bfloat16"`` or ``jnp.bfloat16``; see
        :data:`jaxtune.models.load.DTYPES`); default: the dtype the model was loaded in. Trainable
        leaves are always float32.
      tokenizer: default ``pretrained.tokenizer``; prompt init ``text`` needs one.
      data: the training source (``jaxtune.read``): a classification head without ``num_labels``
        gets one output per label of the data (at least 2), and the labels' names are kept.

    ``pretrained.adapter`` (``jaxtune.load(..., adapter=)``) is read by
    :func:`jaxtune.tuning.peft_import.apply_plan` (``jaxtune.apply_plan``), not here.
    """
    check_pretrained(pretrained)
    if pretrained.adapter is not None:
        raise PlanError(f"this model starts from the adapter {pretrained.adapter}: apply the plan with "
                        "jaxtune.apply_plan, which loads it")
    if data is not None and not hasattr(data, "label_names"):
        raise PlanError(f"data: the training source (jaxtune.read(...)[0]) sizes a head from its labels; got a "
                        f"{type(data).__name__}")
    plan = as_plan(plan)
    for action in ("head", "prompt"):  # one of each per model: a second would silently replace the first
        found = [i for i, r in enumerate(plan.rules) if r.action == action]
        if len(found) > 1:
            raise PlanError(f"{plan.describe(found[0])} and {plan.describe(found[1])} each add a {action}; a model "
                            "has one: keep one rule")
    plan = _sized_head(plan, getattr(data, "label_names", None))
    tokenizer = tokenizer if tokenizer is not None else pretrained.tokenizer
    if frozen_dtype is not None:
        frozen_dtype = dtype_name(frozen_dtype, "frozen_dtype")
    elif jnp.dtype(pretrained.config.param_dtype) != jnp.float32:
        frozen_dtype = pretrained.config.param_dtype
    k_head, k_prompt, k_adapters = jax.random.split(_key(rng), 3)
    cfg, params, head, head_params = _split_pretrained(pretrained)
    is_decoder = isinstance(cfg, decoder.DecoderConfig)

    head_index, head_rule = _last(plan, "head")
    if head_rule is not None:
        head = head_spec(head_rule, cfg, "pooler" in params, plan.describe(head_index))
        head_params = init_head(head, cfg, k_head)
    if head is None and not (is_decoder and cfg.makes_logits):
        bare = ("is a bare decoder body: it stores no lm_head, so it has no vocabulary logits to train a language "
                "model on (chat, text or preference data; load its *ForCausalLM checkpoint for that)")
        raise PlanError(f"{pretrained.architecture} {bare if is_decoder else 'has no output layer to train'}; add a "
                        "head rule, e.g. {'action': 'head', 'task': 'classification', 'num_labels': 2}")
    task = head.task if head is not None else "lm"
    if task != "lm":
        params.pop("lm_head", None)  # unused by a head: neither memory nor a label for it
        params[HEAD_KEY] = head_params

    prompt_index, prompt_rule = _last(plan, "prompt")
    prompt_tokens = 0
    if prompt_rule is not None:
        where = plan.describe(prompt_index)
        if not is_decoder:
            raise PlanError(f"{where}: prompt tuning is supported for decoder models only")
        max_length = pretrained.hf_config.get("max_position_embeddings")
        if max_length is not None and prompt_rule.n_tokens >= max_length:
            raise PlanError(f"{where}: {prompt_rule.n_tokens} virtual tokens leave no room for input in a model "
                            f"of maximum length {max_length} (max_position_embeddings); use fewer tokens")
        init = prompt_rule.init or "vocab"
        if init == "text" and tokenizer is None:
            from jaxtune.models.load import load_tokenizer

            # None where the directory holds no tokenizer files: transformers would build one of the special
            # tokens alone, and the text would initialise the prompt from unknown tokens.
            tokenizer = load_tokenizer(Path(pretrained.source))
            if tokenizer is None:
                raise PlanError(f"{where}: init: text needs a tokenizer, and {pretrained.source} holds no "
                                "tokenizer files; pass tokenizer= to apply_plan (model.tokenizer in a recipe), "
                                "or use init: vocab")
        prompt_tokens = prompt_rule.n_tokens
        # From the embeddings as the model scales them (Gemma: x sqrt(hidden)), as PEFT reads the rows
        # through the embedding module; the forward does not scale the virtual tokens.
        rows = init_prompt(params["embed_tokens"]["embedding"], prompt_tokens, init, k_prompt,
                           text=prompt_rule.text, tokenizer=tokenizer)
        params[PROMPT_LEAF] = rows * getattr(cfg, "embedding_scale", 1.0)

    # Adapters and quantized matmuls go on linear layers only: a convolution's kernel (ViT's patch
    # projection) is 4-D; a MoE layer's stacked experts (E, in, out) are linears, one adapter each.
    linear_or_other = [p for p, v in flatten_dict(params).items()
                       if p[-1] != "kernel" or v.ndim == 2 or is_expert_kernel(p)]
    adapters = labels_lib.resolve_adapters(plan, linear_or_other, cfg.num_layers)
    params = add_adapters(params, adapters, k_adapters)
    flat_labels = labels_lib.resolve_labels(plan, flatten_dict(params), cfg.num_layers)
    labels = unflatten_dict(flat_labels)
    params = cast_by_label(params, labels, frozen_dtype)
    loaded_quantized = [p for p, leaf in flatten_dict(params).items() if is_quantized(leaf)]
    formats = labels_lib.resolve_quantize(plan, flat_labels, cfg.num_layers, loaded_quantized, set(linear_or_other))
    params = quantized_magnitudes(quantize_leaves(params, formats), formats)

    body_cfg = dataclasses.replace(cfg, adapter_dropout=labels_lib.adapter_dropout(plan))
    if task != "lm" and isinstance(body_cfg, MoeConfig):  # as transformers' classifiers: no router loss, unless set
        body_cfg = body_cfg.under_head()
    if hasattr(body_cfg, "training_batch_norms"):  # the BatchNorms whose statistics this plan trains
        body_cfg = dataclasses.replace(body_cfg, training_batch_norms=tuple(sorted(
            labels_lib.path_str(p[:-1]) for p, label in flat_labels.items()
            if label == labels_lib.STATE and p[-1] == "running_mean")))
    if getattr(cfg, "scan_layers", False):
        # Runs of identically planned layers, each one scan: a frozen run gets no gradient or optimizer state.
        body_cfg = dataclasses.replace(body_cfg, layer_groups=stacking.plan_groups(cfg, labels, params))
        params, labels = stacking.to_physical(params, body_cfg), stacking.to_physical(labels, body_cfg)
    if not stacking.is_on_host(pretrained.params):  # the adapters, made by numpy and stacked so, join the model
        params = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, params)
    body = FAMILIES[pretrained.architecture].body_module(body_cfg)  # the family's own body (Decoder, Gemma...)
    return Tuned(
        module=TunedModel(body, task, prompt_tokens, head),
        params=params,
        labels=labels,
        task=task,
        num_outputs=cfg.vocab_size if task == "lm" else head.num_outputs,
        plan=plan,
        config=body_cfg,
        hf_config=pretrained.hf_config,
        source=pretrained.source,
        architecture=pretrained.architecture,
        adapters=adapters,
        head=head,
        prompt_tokens=prompt_tokens,
        head_is_new=head_rule is not None,
        tokenizer=tokenizer,
        label_names=tuple(data.label_names) if getattr(data, "label_names", None) and task == "classification"
        else None,
    )


def _sized_head(plan: Plan, label_names: Sequence | None) -> Plan:
    """The plan with a classification head as wide as the data's label vocabulary."""
    if not label_names:
        return plan
    rules = []
    for i, rule in enumerate(plan.rules):
        if rule.action == "head" and rule.task == "classification":
            if rule.num_labels is None:
                rule = dataclasses.replace(rule, num_labels=max(2, len(label_names)))
            elif rule.num_labels < len(label_names):
                raise PlanError(f"{plan.describe(i)}: the head has num_labels {rule.num_labels}, but the data has "
                                f"{len(label_names)} labels {list(label_names)[:10]}; drop num_labels to size it "
                                "from the data")
        rules.append(rule)
    return Plan(tuple(rules))
