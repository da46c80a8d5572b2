"""The accelerator programs, lowered here: the Trainer's own jitted train step exported for a TPU
and for a CUDA GPU from this CPU machine (``jax.export``: tracing and lowering, nothing compiled or run).

No GPU or TPU runs these tests, so the kernels a TPU or GPU user gets (splash attention, the XLA and
cuDNN choices on a GPU, host offloading) would otherwise be checked only in Pallas' interpreter or
not at all. Each test builds a tiny model with the features users run on accelerators (scanned
layers, packed rows, a LoRA plan, bfloat16, remat, fsdp over 8 simulated devices), reports the
attention backend as the target's (``attention._backend``), and exports ``Trainer.train_step``:
the program training runs, not a copy. The module text then says what a user relies on: on a TPU the
attention is the Mosaic splash kernel and no ``T x T`` mask or score tensor exists anywhere in the
step; frozen bfloat16 weights are never copied to float32; parameters keep the plan's shardings
(fsdp on the big kernels) in and out of the step.

What lowering cannot show: whether Mosaic or XLA:GPU then compiles the program (a TPU or GPU does
that), and the collectives the SPMD partitioner inserts (tests/test_memory.py reads those from a CPU
compile).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_hf_model, tiny_random_model
from jax import export
from jax.sharding import PartitionSpec as P

from jaxtune import tuning
from jaxtune.models import attention, hf
from jaxtune.training.config import EvalConfig, TrainConfig
from jaxtune.training.preference_config import PreferenceConfig
from jaxtune.training.sharding import MeshConfig, make_mesh, param_specs
from jaxtune.training.trainer import Trainer

T, B = 256, 8  # splash tiles by 128; 8 rows split over the 8 simulated devices
# No model dimension equals T, so a tensor type with two T axes is attention's T x T, nothing else.
LLAMA = dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
# A scanned run's stacked kernels (2 layers): q, o and the MLP's (128 x 128), k and v (128 x 2 heads of 32).
STACKED_KERNELS = {(2, 128, 128), (2, 128, 64)}
# Splash's kernels: the forward that keeps its residuals for a backward pass, and the backward's two.
FORWARD, FORWARD_ONLY = "splash_mha_fwd_segmented_residuals", "splash_mha_fwd_segmented_no_residuals"
SPLASH_KERNELS = {FORWARD, "splash_mha_dq_segmented_no_residuals", "splash_mha_dkv_segmented_no_residuals"}

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Tiny random checkpoints: a Llama, a Mixtral (the Llama with 4 experts), a Gemma 2 (sliding window
    and soft-capped scores), a ModernBERT classifier (global and two-sided local attention) and a ViT
    classifier (rows of 10 x 10 patches and [CLS])."""
    root = tmp_path_factory.mktemp("accelerator")
    tiny_hf_model("LlamaForCausalLM", root / "llama", **LLAMA)
    tiny_random_model("MixtralForCausalLM", root / "mixtral", {**LLAMA, "num_local_experts": 4,
                                                               "num_experts_per_tok": 2})
    tiny_random_model("Gemma2ForCausalLM", root / "gemma2", {**LLAMA, "head_dim": 32, "sliding_window": 64,
                                                             "attn_logit_softcapping": 50.0,
                                                             "final_logit_softcapping": 30.0},
                      config_class="Gemma2Config", norm_offset=-0.5)
    tiny_random_model("ModernBertForSequenceClassification", root / "modernbert",
                      dict(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_labels=3, global_attn_every_n_layers=2, local_attention=64,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           cls_token_id=1, sep_token_id=2))
    tiny_random_model("ViTForImageClassification", root / "vit",
                      dict(image_size=40, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, num_labels=3))
    return root


@pytest.fixture
def backend(monkeypatch):
    """``backend(name, gpu_capability=None)``: the attention picks its kernel as on that backend (and,
    on a GPU, that CUDA compute capability); each kernel notice is logged again."""
    monkeypatch.setattr(attention, "_NOTICED", set())

    def use(name: str, gpu_capability: tuple[int, int] | None = None) -> None:
        monkeypatch.setattr(attention, "_backend", lambda: name)
        monkeypatch.setattr(attention, "_gpu_capability", lambda: gpu_capability)

    return use


def lm_rows(*shape: int) -> dict[str, np.ndarray]:
    """Packed LM rows ``shape + (T,)``: two documents of 100 tokens each (positions restart), then padding."""
    rng = np.random.RandomState(0)
    segments, positions = np.zeros((*shape, T), np.int32), np.zeros((*shape, T), np.int32)
    for segment, start in ((1, 0), (2, 100)):
        segments[..., start:start + 100], positions[..., start:start + 100] = segment, np.arange(100)
    return {"input_ids": rng.randint(1, 128, segments.shape).astype(np.int32),
            "targets": rng.randint(1, 128, segments.shape).astype(np.int32),
            "loss_weights": (segments != 0).astype(np.float32), "segment_ids": segments, "positions": positions}


def classifier_rows() -> dict[str, np.ndarray]:
    """One example of 200 tokens per row, then padding; three labels."""
    rows = lm_rows(B)
    segments = (rows["segment_ids"] != 0).astype(np.int32)
    return {"input_ids": rows["input_ids"], "segment_ids": segments, "positions": np.where(segments, np.arange(T), 0),
            "labels": np.arange(B, dtype=np.int32) % 3}


def make_trainer(path: Path, batch: dict[str, np.ndarray], run_dir: Path, *, remat: str | None = "block",
                 mesh: jax.sharding.Mesh | None = None, plan: tuning.Plan | None = None,
                 **trainer_options) -> Trainer:
    """A Trainer of ``plan`` (default: LoRA) on the bfloat16 model at ``path``, on ``mesh`` (default:
    fsdp over 8 devices)."""
    options = {} if remat is None else {"remat": remat}
    tuned = tuning.apply_plan(hf.load_pretrained(path, dtype=jnp.bfloat16, **options),
                              plan or tuning.lora(rank=4, alpha=8))
    return Trainer(tuned, train_data=[batch], config=TrainConfig(steps=1, progress=False, compile_cache=False),
                   eval=EvalConfig(before=False, after=False), run_dir=run_dir,
                   mesh=mesh or make_mesh(MeshConfig(data=1, fsdp=8)), **trainer_options)


def step_arguments(trainer: Trainer, batch: dict[str, np.ndarray]) -> tuple:
    """The train step's arguments as the Trainer passes them, abstract (shapes, dtypes, shardings)."""
    placed = (trainer.trainable, trainer.frozen, trainer.opt_state, trainer.to_device(batch, "train"))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), placed)
    return (*abstract, jax.eval_shape(lambda: jax.random.key(0)))  # the step's key is uncommitted, as fold_in's


def export_step(trainer: Trainer, batch: dict[str, np.ndarray], platform: str, **options) -> export.Exported:
    """``trainer.train_step``, the jitted program training runs, exported for ``platform``."""
    return export.export(trainer.train_step, platforms=[platform], **options)(*step_arguments(trainer, batch))


def kernels(text: str) -> list[str]:
    """The Mosaic (TPU custom call) kernels of a module, by name, in order."""
    return re.findall(r'custom_call @tpu_custom_call\([^\n]*?kernel_name = "(\w+)"', text)


def square_tensors(text: str, length: int = T) -> set[str]:
    """Tensor types with two axes of the rows' ``length``: attention scores, probabilities or a mask."""
    return set(re.findall(rf"tensor<(?:\d+x)*{length}x{length}(?:x\d+)*x\w+>", text))


def float32_copies(text: str, shapes: set[tuple[int, ...]]) -> set[str]:
    """Conversions of a bfloat16 tensor of one of ``shapes`` to float32."""
    found = re.findall(r"stablehlo\.convert [^\n]*: \(tensor<([\dx]+)xbf16>\) -> tensor<[\dx]+xf32>", text)
    return {dims for dims in found if tuple(int(d) for d in dims.split("x")) in shapes}


def frozen_matrices(trainer: Trainer) -> set[tuple[int, ...]]:
    """Shapes of the frozen bfloat16 matrices (stacked runs and one layer's slice) that no trained
    leaf shares (a LoRA factor's bfloat16 gradient may be converted to float32)."""
    def shapes(tree: object, kept: object = lambda x: True) -> set[tuple[int, ...]]:
        stacked = {x.shape for x in jax.tree.leaves(tree) if x.ndim >= 2 and kept(x)}
        return stacked | {s[1:] for s in stacked if len(s) == 3}

    return shapes(trainer.frozen, lambda x: x.dtype == jnp.bfloat16) - shapes(trainer.trainable)


def assert_plan_shardings(exported: export.Exported, trainer: Trainer) -> None:
    """The exported step takes the trainable and frozen params on the plan's shardings and gives the
    updated params and optimizer state back on the shardings they came in on (donated buffers)."""
    mesh, rules = trainer.mesh, trainer.tuned.partition_rules
    (trainable, frozen, opt_state, _, _), _ = jax.tree.unflatten(exported.in_tree, exported.in_shardings_jax(mesh))
    new_trainable, new_opt_state, _ = jax.tree.unflatten(exported.out_tree, exported.out_shardings_jax(mesh))

    def specs(shardings: object) -> list[P]:
        return [s.spec for s in jax.tree.leaves(shardings)]

    plan = jax.tree.leaves(param_specs((trainer.trainable, trainer.frozen), mesh, rules),
                           is_leaf=lambda x: isinstance(x, P))
    assert specs((trainable, frozen)) == plan
    assert specs((new_trainable, new_opt_state)) == specs((trainable, opt_state))
    kernels = {jax.tree_util.keystr(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(frozen)
               if path[-1].key == "kernel"}
    assert kernels and all("fsdp" in tuple(spec) for spec in kernels.values()), kernels
    # Column-parallel: inputs over fsdp, outputs over tensor; a scanned run's layer axis stays whole.
    assert kernels["['layers_0-1']['mlp']['gate_proj']['kernel']"] == P(None, "fsdp", "tensor")


# ----------------------------------------------------------------------------- TPU


@pytest.mark.parametrize("remat", ["none", "block", "offload"])
def test_tpu_lm_step_runs_splash_and_keeps_the_plan(models, backend, tmp_path, remat):
    """A packed, scanned bfloat16 Llama with LoRA, fsdp over 8 devices: the step (and the evaluation
    step, forward only) exports for a TPU with
    splash's Mosaic kernels (forward, dq, dkv; the forward again under remat) and nothing T x T, frozen
    weights stay bfloat16, params keep the plan's shardings; ``offload`` puts saved activations in
    pinned host memory (a CPU has none to move them to, so only a TPU or GPU program shows it)."""
    backend("tpu")
    batch = lm_rows(B)
    trainer = make_trainer(models / "llama", batch, tmp_path, remat=remat)
    exported = export_step(trainer, batch, "tpu")
    text = exported.mlir_module()
    found = kernels(text)
    assert set(found) == SPLASH_KERNELS, found
    assert found.count(FORWARD) == (1 if remat == "none" else 2)  # one run of layers
    assert not square_tensors(text)
    assert not float32_copies(text, frozen_matrices(trainer))
    assert ("pinned_host" in text) == (remat == "offload")
    assert_plan_shardings(exported, trainer)
    trainable, frozen, _, rows, _ = step_arguments(trainer, batch)
    evaluation = export.export(trainer.eval_step, platforms=["tpu"])(trainable, frozen, rows).mlir_module()
    assert kernels(evaluation) == [FORWARD_ONLY] and not square_tensors(evaluation)


def test_tpu_step_on_a_tensor_parallel_mesh_runs_splash_per_shard_of_rows_and_heads(models, backend, tmp_path):
    """On a data 2 x fsdp 2 x tensor 2 mesh, splash (which XLA cannot partition) runs in a shard_map
    whose queries, keys and values are split by rows over data x fsdp and by heads over tensor."""
    backend("tpu")
    batch = lm_rows(B)
    trainer = make_trainer(models / "llama", batch, tmp_path, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    exported = export_step(trainer, batch, "tpu")
    text = exported.mlir_module()
    assert set(kernels(text)) == SPLASH_KERNELS and not square_tensors(text)
    per_shard = re.findall(r"sdy\.manual_computation\([^\n]*?in_shardings=\[([^\n]*?)\] out_shardings", text)
    rows_and_heads = '<@mesh, [{"data", "fsdp"}, {"tensor"}, {}, {}]>'
    assert any(shardings.count(rows_and_heads) == 3 for shardings in per_shard), per_shard
    assert_plan_shardings(exported, trainer)


@pytest.mark.parametrize("case", ["qlora", "moe"])
def test_tpu_qlora_and_moe_steps_run_splash(models, backend, tmp_path, case):
    """QLoRA (nf4 frozen kernels, 4-bit codes) and a mixture of experts (grouped matmuls, experts split
    over the mesh's expert axis) export for a TPU with splash and nothing T x T, and no float32 copy of
    a frozen weight; QLoRA holds no float tensor of a whole run of layers' kernel (it dequantizes one
    layer's weight beside its matmul)."""
    backend("tpu")
    batch = lm_rows(B)
    if case == "qlora":
        trainer = make_trainer(models / "llama", batch, tmp_path,
                               plan=tuning.freeze(quantize="nf4") + tuning.lora(rank=4, alpha=8))
    else:
        trainer = make_trainer(models / "mixtral", batch, tmp_path,
                               mesh=make_mesh(MeshConfig(data=1, fsdp=4, expert=2)))
    text = export_step(trainer, batch, "tpu").mlir_module()
    assert set(kernels(text)) == SPLASH_KERNELS
    assert not square_tensors(text)
    assert not float32_copies(text, frozen_matrices(trainer))
    if case == "qlora":  # the frozen kernels arrive as codes: no float tensor has a whole run's shape
        stacked = {f"tensor<{'x'.join(map(str, shape))}x{dtype}>" for shape in STACKED_KERNELS
                   for dtype in ("bf16", "f32")}
        assert not stacked & set(re.findall(r"tensor<[\dx]+x\w+>", text))
    assert ("ragged_dot" in text) == (case == "moe")


def test_tpu_prompt_tuning_step_runs_splash_on_its_longer_rows(models, backend, tmp_path, caplog):
    """Prompt tuning puts 20 virtual tokens before rows of 256: rows of 276, which splash runs padded
    to its tiles, not the dense-mask attention of a fallback (and no notice to pad rows already padded)."""
    backend("tpu")
    batch = lm_rows(B)
    batch["segment_ids"] = (batch["segment_ids"] != 0).astype(np.int32)  # one document a row: no packing
    with caplog.at_level(logging.WARNING, logger="jaxtune.models.attention"):
        trainer = make_trainer(models / "llama", batch, tmp_path, plan=tuning.prompt_tuning(20))
        text = export_step(trainer, batch, "tpu").mlir_module()
    assert set(kernels(text)) == SPLASH_KERNELS
    assert not square_tensors(text, T + 20) and not caplog.records


def test_tpu_dpo_step_runs_splash_for_policy_and_reference(models, backend, tmp_path):
    """DPO on paired ``(B, 2, T)`` rows: the policy's forward and backward and the reference model's
    forward (the base without adapters) all run splash, with nothing T x T."""
    backend("tpu")
    batch = lm_rows(B, 2)
    trainer = make_trainer(models / "llama", batch, tmp_path, remat="none", preference=PreferenceConfig(method="dpo"))
    text = export_step(trainer, batch, "tpu").mlir_module()
    found = kernels(text)
    assert set(found) == SPLASH_KERNELS | {FORWARD_ONLY}  # the reference's forward keeps nothing for a backward
    assert found.count(FORWARD) == 1 and found.count(FORWARD_ONLY) == 1
    assert not square_tensors(text)
    assert not float32_copies(text, frozen_matrices(trainer))


def test_tpu_gemma2_windows_and_softcap_run_inside_splash(models, backend, tmp_path):
    """Gemma 2's sliding-window and global layers (two scanned runs) both go to splash, its score
    soft-cap inside the kernel: no T x T tensor of scores exists to cap outside it."""
    backend("tpu")
    batch = lm_rows(B)
    trainer = make_trainer(models / "gemma2", batch, tmp_path, remat="none")
    text = export_step(trainer, batch, "tpu").mlir_module()
    found = kernels(text)
    assert set(found) == SPLASH_KERNELS
    assert found.count(FORWARD) == 2  # the window run and the global run
    assert not square_tensors(text)


def test_tpu_encoder_classifier_step_runs_splash(models, backend, tmp_path):
    """ModernBERT classification (a head on the pooled states; global and two-sided local attention,
    not causal): every layer's attention is splash, with nothing T x T."""
    backend("tpu")
    batch = classifier_rows()
    trainer = make_trainer(models / "modernbert", batch, tmp_path, remat=None)
    assert trainer.tuned.task == "classification"
    text = export_step(trainer, batch, "tpu").mlir_module()
    found = kernels(text)
    assert set(found) == SPLASH_KERNELS
    assert found.count(FORWARD) == 2  # one per (unscanned) layer
    assert not square_tensors(text)


def test_tpu_image_classifier_step_runs_splash_on_rows_of_patches(models, backend, tmp_path):
    """A ViT's rows are its patches and [CLS] (101 here, 197 at 224 x 224): splash runs them padded to
    its tiles, with no 101 x 101 tensor of the dense attention a fallback would compute."""
    backend("tpu")
    batch = {"pixel_values": np.random.RandomState(0).rand(B, 3, 40, 40).astype(np.float32),
             "labels": np.arange(B, dtype=np.int32) % 3, "example_weights": np.ones(B, np.float32)}
    trainer = make_trainer(models / "vit", batch, tmp_path, remat=None)
    text = export_step(trainer, batch, "tpu").mlir_module()
    assert set(kernels(text)) == SPLASH_KERNELS
    assert not square_tensors(text, 101)


# ----------------------------------------------------------------------------- GPU


def test_cuda_step_before_hopper_runs_the_xla_attention(models, backend, tmp_path, caplog):
    """On an Ampere GPU (compute capability 8.0) packed rows cannot use cuDNN's packed layout: the step
    exports for CUDA with the XLA attention and a dense mask, and the notice says why."""
    backend("gpu", gpu_capability=(8, 0))
    batch = lm_rows(B)
    with caplog.at_level(logging.WARNING, logger="jaxtune.models.attention"):
        trainer = make_trainer(models / "llama", batch, tmp_path)
        exported = export_step(trainer, batch, "cuda")
    text = exported.mlir_module()
    assert "cuDNN's packed layout (segment ids) needs a Hopper or later GPU" in caplog.text
    assert not kernels(text) and "cudnn" not in text
    assert square_tensors(text)  # the dense mask of the fallback
    assert not float32_copies(text, frozen_matrices(trainer))
    assert_plan_shardings(exported, trainer)


def test_cuda_step_on_hopper_runs_cudnn_packed_attention(models, backend, tmp_path, monkeypatch):
    """On a Hopper GPU packed rows go to cuDNN's packed layout through jax's private cuDNN entry. jax
    asks the machine for cuDNN and the GPU's compute capability while tracing, so those answers are
    given here (cuDNN 9.11, Hopper); the step then lowers for CUDA with cuDNN's forward and backward
    calls and nothing T x T. On one device: under a mesh jax wraps the call in a custom partitioning
    that export cannot serialize."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91100)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    backend("gpu", gpu_capability=(9, 0))
    batch = lm_rows(B)
    trainer = make_trainer(models / "llama", batch, tmp_path, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))
    calls = ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
    text = export_step(trainer, batch, "cuda", disabled_checks=[
        export.DisabledSafetyCheck.custom_call(name) for name in calls]).mlir_module()
    assert set(re.findall(r"custom_call @([\w$]+)", text)) == set(calls)
    assert not square_tensors(text)
