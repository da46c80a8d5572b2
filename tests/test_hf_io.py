"""Hugging Face checkpoint I/O: round trips, bf16 and sharded checkpoints, placement, bad input."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import tiny_hf_model, torch_logits
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.models import hf, stacking

IDS = np.random.RandomState(0).randint(0, 96, (2, 9)).astype(np.int32)


def _tensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors files in ``folder``, by name."""
    from safetensors.numpy import load_file

    return {k: v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "LlamaForCausalLM", "BertForSequenceClassification"])
def test_round_trip_through_transformers(arch, tmp_path):
    tied = arch == "LlamaForCausalLM"
    ref = tiny_hf_model(arch, tmp_path / "src", randomize=True, tie_word_embeddings=tied)
    model = hf.load_pretrained(tmp_path / "src")
    hf.save_pretrained(model.params, model.hf_config, tmp_path / "out")
    # Every tensor of the state_dict (a tied lm_head is the embedding: not stored, as transformers
    # saves it), each unchanged: from_pretrained fills a missing norm gain or bias with 1 or 0 silently.
    saved, state = _tensors(tmp_path / "out"), ref.state_dict()
    assert set(state) - set(saved) == ({"lm_head.weight"} if tied else set()) and set(saved) <= set(state)
    assert set(saved) == set(_tensors(tmp_path / "src"))  # what transformers itself writes
    for name, tensor in saved.items():
        np.testing.assert_array_equal(tensor, state[name].numpy(), err_msg=name)
    reloaded = getattr(transformers, arch).from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(torch_logits(reloaded, IDS), torch_logits(ref, IDS), atol=1e-6, rtol=0)
    ours = model.module.apply({"params": model.params}, IDS)
    np.testing.assert_allclose(np.asarray(ours), torch_logits(reloaded, IDS), atol=1e-4, rtol=0)


def test_bf16_checkpoint_loads(tmp_path):
    ref = tiny_hf_model("LlamaForCausalLM").to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    reader = hf.SafetensorsReader([tmp_path / "model.safetensors"])
    assert reader["model.norm.weight"].dtype == jnp.bfloat16
    model = hf.load_pretrained(tmp_path)  # bf16 on disk -> fp32 params
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model.params))
    ref32 = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    np.testing.assert_allclose(np.asarray(model.module.apply({"params": model.params}, IDS)),
                               torch_logits(ref32, IDS), atol=1e-4, rtol=0)
    bf16 = hf.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16.params))
    # Exact: bf16 -> fp32 -> bf16 is lossless.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b)),
                 bf16.params, model.params)


def test_save_bf16_and_sharded_checkpoints(tmp_path):
    ref = tiny_hf_model("Qwen2ForCausalLM", tmp_path / "src", randomize=True)  # biases not all 0 either
    model = hf.load_pretrained(tmp_path / "src")
    hf.save_pretrained(model.params, model.hf_config, tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again = hf.load_pretrained(tmp_path / "sharded")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again.params, model.params)
    theirs = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    np.testing.assert_allclose(torch_logits(theirs, IDS), torch_logits(ref, IDS), atol=1e-6, rtol=0)

    hf.save_pretrained(model.params, model.hf_config, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    theirs16 = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert next(theirs16.parameters()).dtype == torch.bfloat16
    # Each stored tensor is the fp32 one rounded to bfloat16 (round-to-nearest-even, as torch rounds).
    stored, fp32 = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "src")
    assert set(stored) == set(fp32)
    for name, tensor in fp32.items():
        assert stored[name].dtype == jnp.bfloat16, name
        expected = torch.from_numpy(tensor).to(torch.bfloat16).view(torch.int16).numpy()
        np.testing.assert_array_equal(stored[name].view(np.int16), expected, err_msg=name)


def test_transformers_sharded_checkpoint_loads(tmp_path):
    ref = tiny_hf_model("MistralForCausalLM")
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = hf.load_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(model.module.apply({"params": model.params}, IDS)),
                               torch_logits(ref, IDS), atol=1e-4, rtol=0)


def test_leaves_are_placed_on_the_given_sharding(tmp_path):
    tiny_hf_model("LlamaForCausalLM", tmp_path)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    replicated = hf.load_pretrained(tmp_path)

    def spec(path, leaf):  # shard every matrix's last axis over "model" (a scanned run's too), vectors replicated
        return NamedSharding(mesh, PartitionSpec(*(None,) * (leaf.ndim - 1), "model") if leaf.ndim >= 2
                             else PartitionSpec())

    shardings = jax.tree_util.tree_map_with_path(spec, replicated.params)
    sharded = hf.load_pretrained(tmp_path, shardings=shardings)
    kernel = sharded.params["layers_0-1"]["mlp"]["up_proj"]["kernel"]  # both layers, stacked
    assert kernel.sharding == shardings["layers_0-1"]["mlp"]["up_proj"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (2, 64, 96 // 4)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 sharded.params, replicated.params)


def test_a_host_load_is_contiguous_and_writes_back_the_files_tensors(tmp_path):
    """``on_host=True`` gives each leaf as one C-contiguous host array (a scanned run's layers stacked, torch's
    ``(out, in)`` kernels transposed, widths that are no multiple of the 64-byte copy block included), and
    saving those arrays writes the source's tensors back bitwise; in bf16 each is torch's rounding of it."""
    ref = tiny_hf_model("LlamaForCausalLM", tmp_path / "src", randomize=True, intermediate_size=101,
                        tie_word_embeddings=False)
    for dtype in (jnp.float32, jnp.bfloat16):
        host = hf.load_pretrained(tmp_path / "src", on_host=True, dtype=dtype)
        leaves = jax.tree.leaves(host.params)
        assert all(type(x) is np.ndarray and x.flags.c_contiguous and x.dtype == dtype for x in leaves)
        hf.save_pretrained(host.params, host.hf_config, tmp_path / str(np.dtype(dtype)))
        saved, state = _tensors(tmp_path / str(np.dtype(dtype))), ref.state_dict()
        assert set(saved) == set(state)
        for name, tensor in saved.items():
            want = state[name].to(torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32)
            np.testing.assert_array_equal(tensor.view(np.int16) if dtype == jnp.bfloat16 else tensor,
                                          want.view(torch.int16).numpy() if dtype == jnp.bfloat16 else want.numpy(),
                                          err_msg=name)


def _mapped_resident(path) -> int:
    """Bytes of ``path``'s pages this process has mapped and resident (``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: address range, ..., path
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
@pytest.mark.parametrize("on_host", [True, False])
def test_a_load_unmaps_each_tensor_once_copied(tmp_path, monkeypatch, on_host):
    """Loading copies every tensor out of the file's memory map; the pages it read stayed mapped until the
    load ended, so the process held the model twice at its peak (a 936 MiB model peaked at 2.3 GiB resident,
    transformers at 1.3). Now each leaf's tensors are unmapped once copied (they stay in the page cache):
    while a leaf is copied, the file's resident pages are at most about one leaf's."""
    tiny_hf_model("LlamaForCausalLM", tmp_path, randomize=True, hidden_size=256, intermediate_size=1024,
                  num_hidden_layers=4, vocab_size=256)
    weights = (tmp_path / "model.safetensors").resolve()
    seen, real = [], hf._host_copy

    def copy(view, dtype):  # the file's resident pages, just before each leaf is copied (a device's shard too)
        seen.append(_mapped_resident(weights))
        return real(view, dtype)

    monkeypatch.setattr(hf, "_host_copy", copy)
    loaded = hf.load_pretrained(tmp_path, on_host=on_host)
    largest = max(x.nbytes for x in jax.tree.leaves(loaded.params))
    size = weights.stat().st_size
    assert len(seen) > 10 and largest < size / 3
    # and the pages the kernel maps around each one read (up to a 2 MiB folio of the page cache)
    assert max(seen) <= largest + 2 * 2**20, (max(seen), largest, size)


def test_param_paths_map_one_to_one_to_hf_names(tmp_path):
    ref = tiny_hf_model("Qwen3ForCausalLM", tmp_path)
    model = hf.load_pretrained(tmp_path)
    family = hf.FAMILIES["Qwen3ForCausalLM"]
    logical = stacking.unstack(model.params)  # HF names one tensor per layer
    paths = [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(logical)[0]]
    names = [hf.hf_name(family, p) for p in paths]
    assert len(set(names)) == len(names)
    assert set(names) == set(ref.state_dict())  # Qwen3 here is untied: every tensor is a param


# ----------------------------------------------------------------------------- bad input


def _expect(match: str, fn, *args, **kwargs):
    with pytest.raises(hf.CheckpointError, match=match):
        fn(*args, **kwargs)


def test_unsupported_architecture_lists_supported(tmp_path):
    tiny_hf_model("LlamaForCausalLM", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"], config["model_type"] = ["FalconForCausalLM"], "falcon"
    (tmp_path / "config.json").write_text(json.dumps(config))
    _expect(r"FalconForCausalLM.*not supported; supported: .*LlamaForCausalLM.*BertModel",
            hf.load_pretrained, tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    tiny_hf_model("LlamaForCausalLM", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    _expect(r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'", hf.load_pretrained, tmp_path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    tiny_hf_model("LlamaForCausalLM", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    _expect(r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 96\).*expects \(64, 80\)",
            hf.load_pretrained, tmp_path)


def test_unreadable_files(tmp_path):
    tiny_hf_model("LlamaForCausalLM", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00garbage")
    _expect(r"model\.safetensors: unreadable safetensors file", hf.load_pretrained, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    _expect(r"config\.json: not valid JSON", hf.load_pretrained, tmp_path)
    _expect(r"no such directory", hf.load_pretrained, tmp_path / "nope")


def test_truncated_tensor_data(tmp_path):
    tiny_hf_model("LlamaForCausalLM", tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect(r"truncated or its header is corrupt", hf.load_pretrained, tmp_path)


def test_pickle_checkpoint_is_refused_with_conversion_hint(tmp_path):
    model = tiny_hf_model("LlamaForCausalLM")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _expect(r"pytorch_model\.bin.*refuses.*arbitrary code.*save_pretrained", hf.load_pretrained, tmp_path)


def test_unused_tensors_are_reported(tmp_path):
    tiny_hf_model("BertForSequenceClassification", tmp_path, num_labels=2)
    with pytest.warns(UserWarning, match=r"2 tensor\(s\) not used by BertModel: classifier\.bias, classifier\.weight"):
        body = hf.load_pretrained(tmp_path, architecture="BertModel")
    assert "classifier" not in body.params and "embeddings" in body.params


def test_adapter_leaves_cannot_be_saved_as_hf(tmp_path):
    tiny_hf_model("LlamaForCausalLM", tmp_path / "src")
    model = hf.load_pretrained(tmp_path / "src")
    params = jax.tree.map(lambda x: x, model.params)
    params["layers_0-1"]["self_attn"]["q_proj"]["lora_a"] = jnp.zeros((2, 64, 2))
    _expect(r"layers_0/self_attn/q_proj/lora_a is an adapter leaf.*merge adapters first",
            hf.save_pretrained, params, model.hf_config, tmp_path / "out")
