"""Orbax checkpoints: restore onto another mesh, fall back from a damaged latest step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtune
from jaxtune.models import decoder
from jaxtune.training.checkpoint import Checkpointer
from jaxtune.training.sharding import MeshConfig, make_mesh, param_shardings, shard


def _state(mesh, updates: int = 1):
    """Sharded params and Adam state after ``updates`` real steps (nonzero mu, nu and count): a
    restore that handed back its template, or a fresh init, differs from them."""
    rng = np.random.RandomState(0)
    trainable = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.asarray(rng.randn(16, 32), jnp.float32)}}},
                 "norm": {"scale": jnp.asarray(rng.randn(16), jnp.float32)}}
    trainable = shard(trainable, param_shardings(trainable, mesh, decoder.PARTITION_RULES))
    opt = optax.adam(1e-3)
    opt_state = jax.jit(opt.init)(trainable)

    @jax.jit
    def step(params, state, grads):
        change, state = opt.update(grads, state, params)
        return optax.apply_updates(params, change), state

    for _ in range(updates):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), x.dtype), trainable)
        trainable, opt_state = step(trainable, opt_state, grads)
    return trainable, opt_state


def _zeros_like(tree):
    """A restore template of zeros on ``tree``'s shardings: only its shapes and placement may count."""
    return jax.tree.map(lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding), tree)


def _assert_tree_equal(got, expected):
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, expected)


def test_a_one_process_save_writes_replicated_arrays_whole_and_restores_them(tmp_path, monkeypatch):
    """Replicated params on 8 devices are written by one writer: Orbax's replica-parallel split, a slice
    compiled per shape and device, only shares the writing between hosts (there is one)."""
    import orbax.checkpoint._src.serialization.replica_slices as replica_slices

    sliced = []
    real_slice = replica_slices.jax.lax.slice_in_dim
    monkeypatch.setattr(replica_slices.jax.lax, "slice_in_dim", lambda *a, **k: sliced.append(1) or real_slice(*a, **k))
    mesh = make_mesh(MeshConfig(data=8))  # every param replicated over the 8 devices
    trainable, opt_state = _state(mesh)
    assert trainable["norm"]["scale"].sharding.is_fully_replicated
    saved_trainable, saved_opt = jax.device_get((trainable, opt_state))
    with Checkpointer(tmp_path, with_data=False) as ckpt:
        ckpt.save(1, trainable, opt_state, jax.random.key(0))
    assert not sliced
    restored = Checkpointer(tmp_path, with_data=False).restore(_zeros_like(trainable), _zeros_like(opt_state))
    _assert_tree_equal(restored[1], saved_trainable)
    _assert_tree_equal(restored[2], saved_opt)


def test_restore_onto_a_different_mesh(tmp_path):
    big = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    trainable, opt_state = _state(big)
    assert (trainable["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec
            == jax.sharding.PartitionSpec("fsdp", "tensor"))
    assert int(opt_state[0].count) == 1 and np.abs(np.asarray(opt_state[0].nu["norm"]["scale"])).min() > 0
    saved_trainable, saved_opt = jax.device_get((trainable, opt_state))  # host copies, taken before saving
    ckpt = Checkpointer(tmp_path, with_data=False)
    ckpt.save(7, trainable, opt_state, jax.random.key(3), config={"model": "x"})
    ckpt.close()

    small = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    # Templates as a fresh run builds them: abstract shapes on the new mesh, nothing of the saved values.
    like_trainable, like_opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                            _state(small, updates=0))
    restored = Checkpointer(tmp_path, with_data=False).restore(like_trainable, like_opt)
    assert restored is not None
    step, new_trainable, new_opt, rng, meta = restored
    assert step == 7 and meta["config"] == {"model": "x"}
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(rng)),
                                  np.asarray(jax.random.key_data(jax.random.key(3))))
    kernel = new_trainable["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.mesh.devices.size == 1  # resharded onto the new, smaller mesh
    _assert_tree_equal(new_trainable, saved_trainable)
    _assert_tree_equal(new_opt, saved_opt)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    trainable, opt_state = _state(mesh)
    saved = jax.device_get((trainable, opt_state))  # step 1's values, copied before saving
    ckpt = Checkpointer(tmp_path, with_data=False)
    ckpt.save(1, trainable, opt_state, jax.random.key(0))
    later, later_opt = _state(mesh, updates=2)
    ckpt.save(2, later, later_opt, jax.random.key(0))
    ckpt.close()
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "trainable")  # a step whose files are gone
    with pytest.warns(UserWarning, match=r"checkpoints/2: checkpoint is incomplete or corrupt.*falling back to step 1"):
        restored = Checkpointer(tmp_path, with_data=False).restore(_zeros_like(trainable), _zeros_like(opt_state))
    step, got, got_opt, _, _ = restored
    assert step == 1
    _assert_tree_equal((got, got_opt), saved)


def test_an_intact_checkpoint_that_does_not_fit_is_an_error_and_stays(tmp_path):
    """Files that match their checksums are not damage: asked for other shapes (another plan opening
    the run), the restore raises and moves nothing, where a damaged step would be set aside."""
    from jaxtune.training.checkpoint import CheckpointMismatchError

    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    trainable, opt_state = _state(mesh)
    ckpt = Checkpointer(tmp_path, with_data=False)
    ckpt.save(1, trainable, opt_state, jax.random.key(0))
    ckpt.save_best(1, trainable, {"eval/loss": 1.0})
    ckpt.close()
    other = jax.tree.map(lambda x: jnp.zeros((*x.shape[:-1], x.shape[-1] + 1), x.dtype), trainable)
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for restore in (lambda c: c.restore(other, opt_state), lambda c: c.restore_best(other)):
        # the leaf that differs is named (Orbax's own error names only the shapes)
        with pytest.raises(CheckpointMismatchError, match=r"(checkpoints|best)/1: the checkpoint is intact .* "
                                                          r"layers_0/mlp/up_proj/kernel of its params is \(16, 32\) "
                                                          r"there and \(16, 33\) in this run; .*another model or plan"):
            restore(Checkpointer(tmp_path, with_data=False))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing


# Saves a run's step with 8 leaves, then asks for it (and its best) with one leaf of another shape,
# three ways, twice each, printing each refusal: everything else on stderr is what the failed restores
# left behind.
_MISFIT_SCRIPT = """
import sys, jax, jax.numpy as jnp, numpy as np, optax
from jaxtune.training.checkpoint import Checkpointer, CheckpointMismatchError
params = {f"l{i}": {"kernel": jnp.asarray(np.random.default_rng(i).standard_normal((2048, 32)), jnp.float32)}
          for i in range(8)}
adam = optax.adam(1e-3)
ckpt = Checkpointer(sys.argv[1], with_data=False)
ckpt.save(1, params, adam.init(params), jax.random.key(0))
ckpt.save_best(1, params, {"eval/loss": 1.0})
ckpt.close()
wider = {**params, "l3": {"kernel": jnp.zeros((2048, 33), jnp.float32)}}
for restore in [lambda c: c.restore(params, adam.init(wider)), lambda c: c.restore(wider, adam.init(params)),
                lambda c: c.restore_best(wider)] * 2:
    try:
        restore(Checkpointer(sys.argv[1], with_data=False))
    except CheckpointMismatchError as err:
        print("REFUSED:", err, file=sys.stderr)
"""


def test_a_restore_that_does_not_fit_leaves_no_orbax_tracebacks_behind(tmp_path):
    """A checkpoint whose leaf has another shape than this run's was refused in jaxtune's one line, but
    Orbax found the leaf only once its reads of every leaf were running, and its error left the others
    on an event loop it had closed: "Event loop is closed" and "Exception ignored in coroutine"
    tracebacks on stderr as they ended, around the one line (``jaxtune export``, a resumed ``train``)."""
    done = subprocess.run([sys.executable, "-c", _MISFIT_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(Path(jaxtune.__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    refused = [line for line in done.stderr.splitlines() if line.startswith("REFUSED:")]
    assert len(refused) == 6 and all("l3/kernel of its" in line and "is (2048, 32) there and (2048, 33) in this run"
                                     in line for line in refused), done.stderr
    for noise in ("Traceback", "Exception ignored", "Event loop is closed"):
        assert noise not in done.stderr, done.stderr


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    trainable, opt_state = _state(mesh)
    assert Checkpointer(tmp_path, with_data=False).restore(trainable, opt_state) is None


def test_stateless_optimizer_saves_and_restores(tmp_path):
    """Plain SGD keeps no optimizer state (no leaves); its checkpoints still save and restore."""
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    trainable, _ = _state(mesh)
    saved = jax.device_get(trainable)
    empty = optax.sgd(1e-2).init(trainable)
    assert not jax.tree.leaves(empty)
    ckpt = Checkpointer(tmp_path, with_data=False)
    ckpt.save(3, trainable, empty, jax.random.key(0))
    ckpt.close()
    step, got, opt_state, _, _ = Checkpointer(tmp_path, with_data=False).restore(_zeros_like(trainable), empty)
    assert step == 3 and jax.tree.structure(opt_state) == jax.tree.structure(empty)
    _assert_tree_equal(got, saved)


def test_a_read_only_restore_logs_none_of_orbaxs_read_only_notices(tmp_path, caplog, monkeypatch):
    """Every reader of a run (serve, eval, export, generate) logged three absl warnings from Orbax
    as it opened its read-only manager: that it set ``save_interval_steps=0`` and
    ``max_to_keep=None`` for read-only, and that the directory is read only. None is logged; another
    warning Orbax logs while the manager opens still is, and nothing is filtered after it."""
    import logging

    import orbax.checkpoint as ocp
    from absl import logging as absl_logging

    trainable = {"w": jnp.arange(4.0)}
    with Checkpointer(tmp_path, with_data=False) as writer:
        writer.save(1, trainable, {}, jax.random.key(0))
        writer.save_best(1, trainable, {"eval/loss": 1.0})
    opened = ocp.CheckpointManager.__init__

    def open_with_a_warning(self, directory, *args, **kwargs):
        absl_logging.warning("a genuine warning about %s", directory)
        opened(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "__init__", open_with_a_warning)
    absl = logging.getLogger("absl")
    filters = list(absl.filters)
    caplog.set_level(logging.WARNING)
    with Checkpointer(tmp_path, with_data=False, read_only=True) as reader:
        assert reader.restore(trainable, {})[0] == 1
        assert reader.restore_best(trainable)[1]["step"] == 1
    absl_logging.warning("Given directory is read only=%s", "elsewhere")  # after the open: not ours to hide
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == [
        f"a genuine warning about {tmp_path.absolute() / 'checkpoints'}",
        f"a genuine warning about {tmp_path.absolute() / 'best'}",
        "Given directory is read only=elsewhere"]
    assert absl.filters == filters


def test_a_reader_of_a_run_that_saved_its_data_position_logs_no_unrestored_item(tmp_path, caplog):
    """A trainer's checkpoint holds the data iterator's position; a reader (eval, export, predict,
    serve) restores the params alone. Orbax warned, twice per restore, that the "data" item "could not
    be restored" unless a handler for it was registered: a reader now registers it, unread."""
    import logging

    import grain

    trainable = {"w": jnp.arange(4.0)}
    loader = iter(grain.MapDataset.range(8).to_iter_dataset())
    next(loader)
    with Checkpointer(tmp_path, with_data=True, async_save=False) as writer:
        writer.save(1, trainable, {}, jax.random.key(0), data_iterator=loader)
    caplog.set_level(logging.WARNING)
    with Checkpointer(tmp_path, with_data=False, read_only=True) as reader:
        step, got, *_ = reader.restore(_zeros_like(trainable), {})
    assert step == 1
    _assert_tree_equal(got, trainable)
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []


def test_an_adafactor_state_with_a_vectors_moment_is_saved_and_restored(tmp_path):
    """A bias (or any vector) keeps its second moment whole and has no column factor; that factor
    was a zero-size array, which Orbax refuses to save: no adafactor run training a bias could checkpoint."""
    from jaxtune.training.optim import OptimizerConfig, build_optimizer

    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)},
              "head": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), "bias": jnp.zeros(3)}}
    opt, _ = build_optimizer(OptimizerConfig(name="adafactor", learning_rate=1e-2), 10)
    opt_state = opt.init(params)
    for _ in range(2):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    saved = jax.device_get((params, opt_state))
    ckpt = Checkpointer(tmp_path, with_data=False)
    ckpt.save(2, params, opt_state, jax.random.key(0))
    ckpt.close()
    restored = Checkpointer(tmp_path, with_data=False).restore(_zeros_like(params), _zeros_like(opt_state))
    assert restored is not None and restored[0] == 2
    _assert_tree_equal((restored[1], restored[2]), saved)


def test_an_optimizer_state_another_version_laid_out_is_refused_naming_its_leaf_and_the_way_on(tmp_path,
                                                                                                monkeypatch):
    """An adafactor state saved before a conv kernel was factored over its height and width (then: over
    its channels, the kernel's last two axes) is intact but does not fit: the error names the leaf,
    says that another optimizer or jaxtune version saved it, and how to go on from its params;
    those params still restore alone (export's read), equal to what was saved."""
    from jaxtune.training import optim
    from jaxtune.training.checkpoint import CheckpointMismatchError

    params = {"conv": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((3, 3, 2, 4)), jnp.float32)}}
    opt, _ = optim.build_optimizer(optim.OptimizerConfig(name="adafactor", learning_rate=1e-2), 10)
    with monkeypatch.context() as m:
        m.setattr(optim, "_factored_axes", lambda path, ndim: (ndim - 2, ndim - 1) if ndim >= 2 else None)
        old_state = opt.init(params)
    ckpt = Checkpointer(tmp_path, with_data=False)
    ckpt.save(3, params, old_state, jax.random.key(0))
    ckpt.close()
    new_state = opt.init(params)
    assert jax.tree.map(jnp.shape, new_state) != jax.tree.map(jnp.shape, old_state)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoints/3: the checkpoint is intact .* 1/0/col/conv/kernel "
                                                      r"of its optimizer state is \(3, 3, 4\) there and \(3, 2, 4\) "
                                                      r"in this run; .*another jaxtune version.*jaxtune export"):
        Checkpointer(tmp_path, with_data=False).restore(_zeros_like(params), _zeros_like(new_state))
    restored = Checkpointer(tmp_path, with_data=False, read_only=True).restore(_zeros_like(params), None)
    assert restored is not None and restored[0] == 3 and restored[2] is None
    _assert_tree_equal(restored[1], jax.device_get(params))
