"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE in one family.

Each is its dense sibling of :mod:`jaxtune.models.decoder` (Mistral, Qwen2, Qwen3: the same attention,
norms, RoPE and KV cache) with the MLP of its sparse layers replaced by a routed mixture of SwiGLU experts:

===================  ===============================  ====================  ==================  ==========
architecture         routing weights                  shared expert         dense layers        attention
===================  ===============================  ====================  ==================  ==========
MixtralForCausalLM   softmax, top-k, renormalised     no                    none                Mistral's
Qwen2MoeForCausalLM  softmax, top-k (``norm_topk_prob``  sigmoid-gated MLP  ``mlp_only_layers``, Qwen2's
                     renormalises)                                          ``decoder_sparse_step``
Qwen3MoeForCausalLM  as Qwen2-MoE                     no                    as Qwen2-MoE        Qwen3's (q/k norm)
===================  ===============================  ====================  ==================  ==========

Their ``*ForSequenceClassification`` checkpoints load as :class:`MoeClassifier`: the decoder family's
:class:`~jaxtune.models.decoder.DecoderClassifier` (a bias-free ``score`` on the last real token) over this body.

The experts run as one grouped matmul (:func:`jax.lax.ragged_dot`) over the ``tokens x top_k`` copies
sorted by expert: each expert multiplies exactly the rows routed to it, with no loop over experts and no
dense all-experts compute.

**Parameter tree.** ``layers_i/mlp/gate/kernel`` ``(D, E)`` is the router; each expert projection is
one stacked leaf ``layers_i/mlp/experts/{gate,up,down}_proj/kernel`` ``(E, in, out)``, so an
``expert`` mesh axis can split its leading axis (:data:`PARTITION_RULES`). Checkpoints store one
tensor per expert (``model.layers.i.mlp.experts.e.gate_proj.weight``; Mixtral's
``block_sparse_moe.experts.e.w1/w3/w2``): :func:`expert_tensor` names them for the checkpoint I/O.

**Router load-balancing loss.** Each sparse layer sows its routing statistics (top-k assignment counts
and router probabilities per expert, over real tokens) into the :data:`~jaxtune.models.decoder.AUX`
collection; :meth:`MoeDecoder.hidden` combines them as transformers' ``load_balancing_loss_func``
(with its attention mask) and sows :attr:`MoeConfig.router_aux_loss_coef` times it as an auxiliary loss,
which the train step adds to the task loss (:func:`jaxtune.training.losses.auxiliary_loss`). That weight
is TRL's default in fine-tuning: its SFTTrainer and DPOTrainer add the config's
``router_aux_loss_coef`` for every MoE model (whatever its ``output_router_logits``, which only transformers'
plain forward reads), and transformers' ``*ForSequenceClassification`` (TRL's RewardTrainer too) add none.
``model.router_aux_loss_coef`` (:class:`jaxtune.models.load.ModelConfig`) sets the weight for either instead
(:meth:`MoeConfig.from_hf`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from jaxtune.models import decoder, quant, stacking
from jaxtune.models.decoder import AUX, AUX_LOSS, MLP, Decoder, DecoderBlock, DecoderClassifier, DecoderConfig
from jaxtune.models.layers import (
    LORA_A,
    LORA_B,
    LORA_SCALE,
    QUANTIZED_PARTS,
    Array,
    PartitionRules,
    hf_architecture,
    remat_block,
    weight_param,
)

ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
# Sequence classifiers: the same body (its switches are its causal-LM sibling's) with a ``score`` head.
CLASSIFIERS = {a.replace("ForCausalLM", "ForSequenceClassification"): a for a in ARCHITECTURES}
MODEL_TYPES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# The dense sibling whose attention, norms and RoPE each family shares.
_DENSE = {"MixtralForCausalLM": "MistralForCausalLM", "Qwen2MoeForCausalLM": "Qwen2ForCausalLM",
          "Qwen3MoeForCausalLM": "Qwen3ForCausalLM"}
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Expert stacks split their leading (expert) axis over the ``expert`` mesh axis, then as the dense MLP's
# projections; these come before the decoder's rules, whose ``gate_proj``/``up_proj`` patterns would match too.
PARTITION_RULES: PartitionRules = (
    (rf"experts/(gate_proj|up_proj)/kernel{QUANTIZED_PARTS}$", ("expert", "fsdp", "tensor")),
    (rf"experts/down_proj/kernel{QUANTIZED_PARTS}$", ("expert", "tensor", "fsdp")),
    (r"experts/(gate_proj|up_proj|down_proj)/lora_[ab]$", ("expert", None, None)),
    (r"mlp/gate/kernel$", ("fsdp", None)),
) + decoder.PARTITION_RULES
# Router statistics each sparse layer sows into the AUX collection (summed over layers and tokens).
_COUNTS, _PROBS, _ROWS = "router_counts", "router_probs", "router_rows"


@dataclasses.dataclass(frozen=True)
class MoeConfig(DecoderConfig):
    """:class:`DecoderConfig` plus the mixture: ``intermediate_size`` sizes the dense layers' MLP."""

    num_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0: none
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss added in training; 0: none
    head_router_aux_loss_coef: float = 0.0  # that weight under a classification/regression head (under_head)
    router_jitter_noise: float = 0.0  # Mixtral: multiplicative U(1-j, 1+j) noise on the MoE input in training
    sparse_layers: tuple[bool, ...] = ()  # per layer: routed experts (True) or a dense MLP; () = all sparse

    @property
    def sparse(self) -> tuple[bool, ...]:
        """Whether each layer's MLP is the mixture (else a dense SwiGLU of ``intermediate_size``)."""
        return self.sparse_layers or (True,) * self.num_layers

    @property
    def layer_runs(self) -> tuple[tuple[int, int], ...]:
        """Runs of layers with the same window *and* the same MLP kind (a scan needs identical params)."""
        return stacking.layer_runs(self.num_layers, self.layer_groups, tuple(zip(self.windows, self.sparse)))

    def under_head(self) -> MoeConfig:
        """This config for a body under a classification or regression head: the router loss's weight
        is :attr:`head_router_aux_loss_coef` (transformers' ``*ForSequenceClassification`` add none)."""
        return dataclasses.replace(self, router_aux_loss_coef=self.head_router_aux_loss_coef)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> MoeConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers v4 or v5 layout).

        The router loss's weight is TRL's SFTTrainer/DPOTrainer default: a causal LM's is config.json's
        ``router_aux_loss_coef`` (transformers' default 0.001) whatever its ``output_router_logits``; a
        ``*ForSequenceClassification``'s, and :attr:`head_router_aux_loss_coef`, are 0 (transformers'
        classifiers add none). A ``router_aux_loss_coef`` override (the recipe's ``model.router_aux_loss_coef``)
        sets both, as TRL's own ``router_aux_loss_coef`` argument does (0: none)."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "a mixture-of-experts model jaxtune supports",
                               CLASSIFIERS)
        n = hf["num_hidden_layers"]
        experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
        if experts <= 0:
            raise ValueError(f"config.json: {arch} with num_experts {experts}; jaxtune's MoE family needs >= 1 expert")
        step, dense = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or ())
        fields: dict[str, Any] = dict(
            architecture=arch,
            num_experts=experts,
            experts_per_token=hf["num_experts_per_tok"],
            moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"],
            norm_topk_prob=arch == "MixtralForCausalLM" or bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=(hf.get("shared_expert_intermediate_size") or 0)
            if arch == "Qwen2MoeForCausalLM" else 0,
            router_aux_loss_coef=0.0 if set(hf.get("architectures") or ()) & set(CLASSIFIERS)
            else float(hf.get("router_aux_loss_coef", 0.001)),
            router_jitter_noise=float(hf.get("router_jitter_noise", 0.0)) if arch == "MixtralForCausalLM" else 0.0,
            sparse_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(n)),
        )
        if arch == "Qwen2MoeForCausalLM":  # Qwen2's q/k/v bias is a config switch in Qwen2-MoE
            fields["qkv_bias"] = bool(hf.get("qkv_bias", True))
            fields["layer_windows"] = decoder.layer_windows(hf, arch)  # its own rule, not Qwen2's
        if arch == "Qwen3MoeForCausalLM":  # every layer slides when use_sliding_window (no layer_types)
            window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
            fields["layer_windows"] = (window or None,) * n
        # Read as its dense sibling, with its own class's defaults for the fields a config.json may leave out.
        defaults = {"rms_norm_eps": decoder.DEFAULT_RMS_NORM_EPS.get(arch, 1e-6),
                    "rope_theta": decoder.DEFAULT_ROPE_THETA.get(arch, 10_000.0)}
        if "router_aux_loss_coef" in overrides:  # the user's weight, under a head too
            fields["head_router_aux_loss_coef"] = overrides["router_aux_loss_coef"]
        return super().from_hf({**defaults, **hf, "architectures": [_DENSE[arch]]}, **{**fields, **overrides})


class ExpertLinear(nn.Module):
    """``E`` linears applied to rows grouped by expert: ``kernel`` ``(E, in, out)``, rows ``(M, in)``
    sorted by expert with ``group_sizes`` ``(E,)`` rows each -> ``(M, out)``, one grouped matmul.

    Per-expert LoRA leaves, when :mod:`jaxtune.tuning` adds them: ``lora_a`` ``(E, in, r)``,
    ``lora_b`` ``(E, r, out)``, ``lora_scale`` ``()``.
    """

    num_experts: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, group_sizes: Array) -> Array:
        kernel = weight_param(self, "kernel", (self.num_experts, x.shape[-1], self.features))
        x = x.astype(self.dtype)
        y = quant.ragged_dot(x, kernel, group_sizes, self.dtype)
        if self.has_variable("params", LORA_A):
            a = self.get_variable("params", LORA_A).astype(self.dtype)
            b = self.get_variable("params", LORA_B).astype(self.dtype)
            scale = self.get_variable("params", LORA_SCALE).astype(self.dtype)
            y = y + jax.lax.ragged_dot(jax.lax.ragged_dot(x, a, group_sizes), b, group_sizes) * scale
        return y


class Experts(nn.Module):
    """The routed SwiGLU experts: ``down(act(gate(x)) * up(x))`` per expert, on rows sorted by expert
    (see :class:`ExpertLinear`)."""

    cfg: MoeConfig

    @nn.compact
    def __call__(self, x: Array, group_sizes: Array) -> Array:
        cfg = self.cfg

        def proj(name: str, features: int) -> ExpertLinear:
            return ExpertLinear(cfg.num_experts, features, cfg.compute_dtype, cfg.param_dtype, name=name)

        gate = proj("gate_proj", cfg.moe_intermediate_size)(x, group_sizes)
        up = proj("up_proj", cfg.moe_intermediate_size)(x, group_sizes)
        return proj("down_proj", cfg.hidden_size)(cfg.mlp_activation(gate) * up, group_sizes)


class SparseMoe(nn.Module):
    """Top-k routed experts (plus Qwen2-MoE's gated shared expert): ``x`` ``(B, T, D)`` -> ``(B, T, D)``.

    ``real`` ``(B, T)`` (nonzero: a real token) weights the routing statistics sown for the
    load-balancing loss, as transformers' attention mask does; None counts every token.
    """

    cfg: MoeConfig

    @nn.compact
    def __call__(self, x: Array, real: Array | None, deterministic: bool) -> Array:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        b, t, d = x.shape
        k, e = cfg.experts_per_token, cfg.num_experts
        if cfg.router_jitter_noise > 0 and not deterministic:
            noise = jax.random.uniform(self.make_rng("dropout"), x.shape, jnp.float32,
                                       1.0 - cfg.router_jitter_noise, 1.0 + cfg.router_jitter_noise)
            x = (x * noise).astype(x.dtype)
        flat = x.reshape(-1, d)
        logits = cfg.linear(e, "gate", bias=False)(flat, deterministic)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # (N, E)
        weights, chosen = jax.lax.top_k(probs, k)  # (N, k)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdims=True)
        # Dispatch: the N*k (token, slot) copies sorted by expert, one grouped matmul, then back in order.
        by_expert = jnp.argsort(chosen.reshape(-1), stable=True)
        group_sizes = jnp.bincount(chosen.reshape(-1), length=e).astype(jnp.int32)
        out = Experts(cfg, name="experts")(flat[by_expert // k], group_sizes)
        out = out[jnp.argsort(by_expert)].reshape(-1, k, d)
        out = jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))
        if cfg.shared_expert_intermediate_size:
            shared_cfg = dataclasses.replace(cfg, intermediate_size=cfg.shared_expert_intermediate_size)
            shared = MLP(shared_cfg, name="shared_expert")(flat, deterministic)
            gate = cfg.linear(1, "shared_expert_gate", bias=False)(flat, deterministic)
            out = out + jax.nn.sigmoid(gate) * shared
        mask = jnp.ones((b * t,), jnp.float32) if real is None else (real.reshape(-1) != 0).astype(jnp.float32)
        self.sow(AUX, _COUNTS, jnp.einsum("n,nke->e", mask, jax.nn.one_hot(chosen, e, dtype=jnp.float32)))
        self.sow(AUX, _PROBS, mask @ probs)
        self.sow(AUX, _ROWS, mask.sum())
        return out.reshape(b, t, d).astype(dt)


class MoeBlock(DecoderBlock):
    """:class:`~jaxtune.models.decoder.DecoderBlock` with :class:`SparseMoe` as its MLP."""

    def mlp(self, h: Array, segment_ids: Array | None, deterministic: bool) -> Array:
        return SparseMoe(self.cfg, name="mlp")(h, segment_ids, deterministic)


def load_balancing_loss(stats: dict[str, Any], num_experts: int) -> Array:
    """transformers' ``load_balancing_loss_func`` from the sown router statistics (any nesting, any
    number of layers): ``E * sum_e (assignments_e / rows) * (probability_e / rows)``, every sum over all
    sparse layers' real tokens. Returns a float32 scalar (0 without statistics)."""
    sums = {_COUNTS: jnp.zeros((num_experts,)), _PROBS: jnp.zeros((num_experts,)), _ROWS: jnp.zeros(())}
    for path, value in flatten_dict(stats).items():
        name = path[-1]
        if name in sums:
            for v in value:  # sow keeps a tuple; a scanned run's values carry a leading layer axis
                sums[name] = sums[name] + v.reshape(-1, *sums[name].shape).sum(0)
    rows = jnp.maximum(sums[_ROWS], 1.0)
    return num_experts * jnp.sum((sums[_COUNTS] / rows) * (sums[_PROBS] / rows))


class MoeDecoder(Decoder):
    """A mixture-of-experts causal LM: :class:`~jaxtune.models.decoder.Decoder` whose sparse layers are
    :class:`MoeBlock` and dense ones (``mlp_only_layers``, ``decoder_sparse_step``) the decoder's own.

    When the :data:`~jaxtune.models.decoder.AUX` collection is mutable (training), :meth:`hidden` also
    sows ``AUX/loss``: ``router_aux_loss_coef`` times :func:`load_balancing_loss`.
    """

    cfg: MoeConfig
    block_class: ClassVar[type[nn.Module]] = MoeBlock

    def _layer_modules(self) -> dict[str, nn.Module] | list[nn.Module]:
        cfg = self.cfg
        blocks = [MoeBlock if sparse else DecoderBlock for sparse in cfg.sparse]
        if cfg.scan_layers:
            return {stacking.stack_key(a, b)[len("layers_"):]: decoder.scanned_run(cfg, blocks[a], a, b)
                    for a, b in cfg.layer_runs}
        return [remat_block(block, cfg.remat)(cfg, w) for block, w in zip(blocks, cfg.windows)]

    def hidden(
        self,
        input_ids: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
        inputs_embeds: Array | None = None,
    ) -> Array:
        out = super().hidden(input_ids, segment_ids, positions, deterministic, inputs_embeds)
        if self.is_mutable_collection(AUX) and self.cfg.router_aux_loss_coef:
            stats = self.variables.get(AUX, {})
            self.sow(AUX, AUX_LOSS, self.cfg.router_aux_loss_coef * load_balancing_loss(stats, self.cfg.num_experts))
        return out


class MoeClassifier(DecoderClassifier):
    """``*ForSequenceClassification`` of a MoE family: the :class:`MoeDecoder` body and a bias-free ``score``
    on the last real token. Its config (:meth:`MoeConfig.from_hf` of the classifier) weighs the router loss
    as transformers' classifiers do: 0, unless ``model.router_aux_loss_coef`` sets it."""

    cfg: MoeConfig
    body_class: ClassVar[type[Decoder]] = MoeDecoder


def is_expert_kernel(path: tuple[str, ...]) -> bool:
    """Whether a (logical) param path is a stacked expert projection's ``kernel`` ``(E, in, out)``."""
    return len(path) >= 4 and path[-3] == "experts" and path[-2] in EXPERT_PROJECTIONS and path[-1] == "kernel"


def expert_tensor(architecture: str):
    """``(param path, expert) -> checkpoint tensor name`` for the expert stacks of ``architecture``
    (None for any other leaf), a causal LM or its sequence classifier: the checkpoint I/O reads and writes
    such a leaf one expert at a time."""
    mixtral = CLASSIFIERS.get(architecture, architecture) == "MixtralForCausalLM"
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if mixtral else {}

    def name(path: tuple[str, ...], expert: int) -> str | None:
        if not is_expert_kernel(path):
            return None
        module = decoder.hf_module(path[:-3])
        if mixtral:
            module = module.replace(".mlp", ".block_sparse_moe")
        return f"{module}.experts.{expert}.{names.get(path[-2], path[-2])}.weight"

    return name


def checkpoint_name(name: str) -> str:
    """Mixtral's router on disk: transformers 5 names the module ``mlp`` and writes ``block_sparse_moe``."""
    return name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
