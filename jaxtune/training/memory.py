"""What the compiled train step holds per device: its memory report, at start-up and ahead of time.

XLA's ``compiled.memory_analysis()`` gives the bytes of one device's program: its arguments
(params, optimizer state, batch), its outputs (donated params and optimizer state alias their
arguments) and its temporaries (activations saved for the backward pass, gathered FSDP weights,
logits chunks...). :func:`step_memory` splits the arguments by what they are and adds up the
peak; the Trainer logs it before the first step and keeps it in the run's status.
:func:`plan_step_memory` compiles the same step for abstract shapes (``jax.ShapeDtypeStruct``:
a model's ``config.json`` is read, never its weights) on the devices of this process (simulated
CPU devices for a mesh), so capacity is planned without running anything. Compiled for the
CPU backend the figure is a prediction: XLA:CPU fuses and schedules differently from a GPU or
TPU compiler; compiled on the target device it is that device's program.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.data.packing import ANSWER_INDEX, LM_KEYS, max_segments
from jaxtune.data.preference import MARGINS
from jaxtune.data.sources import PREFERENCE
from jaxtune.models import hf
from jaxtune.models.load import ModelConfig, model_dir, refused_field
from jaxtune.training.config import TrainConfig
from jaxtune.training.optim import OptimizerConfig, build_optimizer
from jaxtune.training.preference import make_preference_loss_fn
from jaxtune.training.preference_config import REWARD, PreferenceConfig, check_language_model, check_preference
from jaxtune.training.preference_reference import REFERENCE_KEY, starting_weights
from jaxtune.training.reward_model import reward_pad_id
from jaxtune.training.sharding import MeshConfig, batch_sharding, data_parallel_size, make_mesh, param_shardings
from jaxtune.training.step import jit_train_step, make_loss_fn
from jaxtune.tuning import apply_plan
from jaxtune.tuning.partition import partition
from jaxtune.tuning.tuned import Tuned

log = logging.getLogger(__name__)
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one compiled train step.

    ``params``: trainable and frozen params (this device's shards); ``optimizer``: optimizer
    state; ``batch``: the other arguments (batch, RNG key); ``temporaries``: what the step
    allocates while it runs (saved activations, gathered weights, gradients before the update);
    ``outputs``: outputs that do not reuse a donated argument's buffer; ``host``: bytes XLA
    places in host memory (offloaded activations, ``remat: offload``; 0 where the backend does
    not report them). ``total`` is the device's peak by XLA's count.
    """

    params: int
    optimizer: int
    batch: int
    temporaries: int
    outputs: int
    host: int
    backend: str
    devices: int
    tokens: int | None = None  # the batch rows' width the step was compiled for

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.batch + self.temporaries + self.outputs

    def line(self) -> str:
        """One log line: ``memory per device: params 1.20 GiB, optimizer ... (XLA, cpu: a prediction)``."""
        parts = [("params", self.params), ("optimizer", self.optimizer), ("activations+temporaries", self.temporaries),
                 ("batch+outputs", self.batch + self.outputs)]
        if self.host:
            parts.append(("host (offloaded)", self.host))
        text = ", ".join(f"{name} {size / GiB:.3g} GiB" for name, size in parts)
        what = "a prediction of the CPU compiler" if self.backend == "cpu" else "as compiled"
        width = f", for rows of {self.tokens} tokens" if self.tokens else ""
        return (f"memory per device ({self.devices} device{'s' if self.devices > 1 else ''}): {text}; "
                f"total {self.total / GiB:.3g} GiB ({self.backend}, {what}{width})")

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``status.json``: the fields in bytes, ``total`` and ``GiB`` (the total)."""
        return {**dataclasses.asdict(self), "total": self.total, "GiB": round(self.total / GiB, 4)}


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree``: each leaf's shard (``sharding.shard_shape``; the whole
    leaf when it has no sharding). Leaves are arrays or ``jax.ShapeDtypeStruct``."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def step_memory(compiled: Any, trainable: Any, frozen: Any, opt_state: Any, *, tokens: int | None = None
                ) -> StepMemory:
    """The memory report of a compiled train step (``jax.jit(step).lower(...).compile()``) whose
    arguments were ``trainable, frozen, opt_state, batch, rng``; ``tokens``: the batch rows' width."""
    stats = compiled.memory_analysis()
    params, optimizer = device_bytes((trainable, frozen)), device_bytes(opt_state)
    device_set = jax.tree.leaves(compiled.input_shardings)[0].device_set
    host = sum(getattr(stats, f"host_{k}_size_in_bytes", 0) for k in ("argument", "output", "temp"))
    return StepMemory(params=params, optimizer=optimizer,
                      batch=max(stats.argument_size_in_bytes - params - optimizer, 0),
                      temporaries=stats.temp_size_in_bytes,
                      outputs=max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0),
                      host=host, backend=next(iter(device_set)).platform, devices=len(device_set),
                      tokens=tokens)


def offload_note(remat: str, backend: str) -> str | None:
    """What ``remat: offload`` does on ``backend``: None where it moves saved activations to host
    memory, a one-line notice on CPU, whose device memory is host memory (nothing moves, and no
    report can show a saving there)."""
    if remat != "offload" or backend != "cpu":
        return None
    return ("model.remat: offload moves saved activations to host memory on GPU and TPU; on the cpu backend device "
            "memory is host memory, so nothing is offloaded here (the step runs as with dots_no_batch)")


def abstract_model(model: ModelConfig) -> hf.Pretrained:
    """``model`` with ``jax.ShapeDtypeStruct`` params: its ``config.json`` is read (a packaged model
    is fetched), no weights. ``model.adapter`` changes values only, not shapes, and is not read."""
    if model.keep_quantized:
        raise ValueError("model.keep_quantized: the GGUF's quantized blocks are read from its weights, which "
                         "memory planning does not load; plan with a freeze rule's quantize (e.g. "
                         "{action: freeze, quantize: nf4}) instead")
    directory = model_dir(model.path)
    hf_config = hf.read_config(directory)
    try:
        arch, cfg, module = hf.build(hf_config, dtype=model.compute_dtype or model.dtype, param_dtype=model.dtype,
                                     **model.family_fields())  # as jaxtune.load builds it: the same program
    except TypeError as err:
        raise refused_field(err, model.family_fields(), directory) or err from None
    return hf.Pretrained(cfg, module, hf.abstract_params(module, cfg), hf_config, str(directory), arch)


def abstract_plan(pretrained: hf.Pretrained, plan: Any, rng: jax.Array | None = None) -> Tuned:
    """:func:`jaxtune.apply_plan` on abstract params: the tuned model with ``jax.ShapeDtypeStruct``
    params (quantized leaves included). New leaves (LoRA A, heads) are drawn concretely, since a
    plan's initialisation reads them on the host; they are small."""
    made = {}

    def planned(params: Any) -> Any:
        with jax.ensure_compile_time_eval():
            made["tuned"] = apply_plan(dataclasses.replace(pretrained, params=params), plan, rng)
        return made["tuned"].params

    params = jax.eval_shape(planned, pretrained.params)
    return dataclasses.replace(made["tuned"], params=params)


def batch_spec(task: str, batch_size: int, seq_len: int, *, packing: bool = False
               ) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one token batch of ``task`` (``lm``, ``classification``, ``regression``), as
    the data pipeline yields it (see :func:`jaxtune.training.step.make_loss_fn`): a packed
    classifier row holds up to ``max_segments(seq_len)`` labels and example weights; an LM batch's
    ``answer_index`` is ``seq_len`` wide, as for rows supervised at every position (the most the LM
    head projects: rows with prompts compile a narrower index and need less)."""
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    spec = {"input_ids": tokens, "segment_ids": tokens, "positions": tokens}
    if task == "lm":
        # The answer index as wide as the rows: every position supervised, the LM head's most work.
        return {**spec, "targets": tokens, "loss_weights": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32),
                ANSWER_INDEX: tokens}
    if task in ("classification", "regression"):
        per_row = (batch_size, max_segments(seq_len)) if packing else (batch_size,)
        labels = jax.ShapeDtypeStruct(per_row, jnp.int32 if task == "classification" else jnp.float32)
        weights = {"example_weights": jax.ShapeDtypeStruct(per_row, jnp.float32)} if packing else {}
        return {**spec, "token_type_ids": tokens, "labels": labels, **weights}
    raise ValueError(f"memory planning covers token models (lm, classification, regression), not a {task} model")


def paired_batch_spec(config: PreferenceConfig, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one paired batch as a preference step takes it (the Trainer's ``to_device``:
    the loader's batch without its host keys): the LM keys ``(B, 2, L)`` and, where the loss reads it,
    the answer index (as wide, as :func:`batch_spec`'s), a reward model's
    ``margins`` ``(B, 2, L)`` float32, and with ``reference: cached`` the ``reference_logps``
    ``(B, 2, S)`` float32 (``S``: ``max_segments`` or ``L // 2``, as the cache's lookup)."""
    shape = (batch_size, 2, seq_len)
    spec = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32)
            for k in (*LM_KEYS, *((ANSWER_INDEX,) if config.answers_only else ()))}
    if config.method == REWARD:
        spec[MARGINS] = jax.ShapeDtypeStruct(shape, jnp.float32)
    if config.needs_reference and config.reference == "cached":
        pairs = seq_len // 2 if config.max_segments is None else config.max_segments
        spec["reference_logps"] = jax.ShapeDtypeStruct((batch_size, 2, pairs), jnp.float32)
    return spec


def _preference_step_parts(model: ModelConfig, tuned: Tuned, config: PreferenceConfig, trainable: Any, frozen: Any,
                           chunk_tokens: int) -> tuple[Any, Any]:
    """The preference loss and frozen part the Trainer builds for ``config``: DPO/IPO with
    ``reference: model`` carry the starting values of the trained leaves (:func:`starting_weights`,
    abstract here) beside the frozen part; adapters count as trained when the run starts from
    ``model.adapter`` (the Trainer reads their values; a fresh adapter is the base itself)."""
    check_preference(config, {PREFERENCE}, tuned.task, tuned.num_outputs, model=tuned)
    if config.needs_reference and config.reference == "model":
        dtype = getattr(tuned.config, "dtype", None)
        copy = functools.partial(starting_weights, dtype=dtype, keep_adapters=model.adapter is not None)
        start = jax.eval_shape(copy, trainable)
        if start:
            frozen = {**frozen, REFERENCE_KEY: start}
    loss_fn = make_preference_loss_fn(tuned.module, config, chunk_tokens=chunk_tokens, pad_id=reward_pad_id(tuned))
    return loss_fn, frozen


def plan_step_memory(model: ModelConfig, plan: Any, *, batch_size: int, seq_len: int, packing: bool | None = None,
                     train: TrainConfig = TrainConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
                     mesh: MeshConfig = MeshConfig(), preference: PreferenceConfig | None = None) -> StepMemory:
    """The memory report of :func:`compile_planned_step` (same arguments)."""
    compiled, trainable, frozen, opt_state = compile_planned_step(
        model, plan, batch_size=batch_size, seq_len=seq_len, packing=packing, train=train, optimizer=optimizer,
        mesh=mesh, preference=preference)
    return step_memory(compiled, trainable, frozen, opt_state, tokens=seq_len)


def compile_planned_step(model: ModelConfig, plan: Any, *, batch_size: int, seq_len: int,
                         packing: bool | None = None, train: TrainConfig = TrainConfig(),
                         optimizer: OptimizerConfig = OptimizerConfig(), mesh: MeshConfig = MeshConfig(),
                         preference: PreferenceConfig | None = None) -> tuple[Any, Any, Any, Any]:
    """Compile the train step a recipe would run, for abstract shapes; returns the compiled step
    and its abstract ``trainable, frozen, opt_state`` arguments (``jax.ShapeDtypeStruct`` with
    their shardings).

    Args:
      model, plan, train, optimizer, mesh: the recipe's sections (``train.grad_accum_steps``,
        ``train.chunk_tokens`` and ``train.regression_loss`` shape the step).
      batch_size, seq_len: the global batch's rows and tokens per row (``data.batch_size``,
        ``data.max_length``).
      packing: ``data.packing`` (None: language models pack, classifiers do not): a packed
        classifier batch carries a label per segment.
      preference: the recipe's ``preference`` section, or None: the step of that method on paired
        batches (``batch_size`` pairs of rows, chosen and rejected), with the reference model's
        forward (DPO/IPO, ``reference: model``) or its cached log-probs in the batch (``cached``),
        or a reward model's scalar head (``reward``), as the Trainer compiles it.

    The mesh spans this process's devices (``mesh.simulate_devices`` must have taken effect
    before JAX started: the CLI sets it). Nothing is allocated and nothing runs.
    """
    pretrained = abstract_model(model)
    check_language_model(preference, pretrained)  # before the plan, whose advice for an encoder is no way out
    tuned = abstract_plan(pretrained, plan)
    if tuned.task not in ("lm", "classification", "regression"):
        raise ValueError(f"memory planning covers lm, classification and regression steps, not {tuned.task}")
    if getattr(tuned.config, "modality", "text") != "text":
        raise ValueError("memory planning covers token models; this is an image model")
    device_mesh = make_mesh(mesh)
    ways = data_parallel_size(device_mesh)
    if batch_size % ways:
        raise ValueError(f"data.batch_size: {batch_size} rows do not split over the mesh's {ways}-way data "
                         f"parallelism (mesh data x fsdp); use a multiple of {ways}")
    trainable, frozen = partition(tuned.params, tuned.labels)
    groups, _ = partition(tuned.labels, tuned.labels)
    # the schedule's length changes no shape (and its warmup is the run's to warn of)
    opt, _ = build_optimizer(optimizer, train.steps or 1000, groups, warn=False)
    rules = tuned.partition_rules
    trainable_shardings = param_shardings(trainable, device_mesh, rules)
    opt_state = jax.eval_shape(opt.init, trainable)
    opt_shardings = param_shardings(opt_state, device_mesh, rules)
    if preference is None:
        loss_fn = make_loss_fn(tuned.module, tuned.task, chunk_tokens=train.chunk_tokens,
                               regression=train.regression_loss)
        spec = batch_spec(tuned.task, batch_size, seq_len, packing=bool(packing))
    else:
        loss_fn, frozen = _preference_step_parts(model, tuned, preference, trainable, frozen, train.chunk_tokens)
        spec = paired_batch_spec(preference, batch_size, seq_len)
    step = jit_train_step(loss_fn, opt, grad_accum_steps=train.grad_accum_steps, mesh=device_mesh,
                          trainable_shardings=trainable_shardings, opt_shardings=opt_shardings)

    def placed(tree: Any, shardings: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    trainable = placed(trainable, trainable_shardings)
    frozen = placed(frozen, param_shardings(frozen, device_mesh, rules))
    opt_state = placed(opt_state, opt_shardings)
    rows = batch_sharding(device_mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in spec.items()}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    return step.lower(trainable, frozen, opt_state, batch, rng).compile(), trainable, frozen, opt_state
