"""Preference tuning: losses against TRL's own code, sequence log-probs against transformers, the
adapters-off reference model (values and memory), and preference data validation."""

from __future__ import annotations

import gc
import os
import pickle
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxtune import tuning
from jaxtune.data import packing
from jaxtune.data.preference import KIND, TokenizePairs, pair_rows, read_preference
from jaxtune.data.sources import DataError
from jaxtune.data.testing import tiny_tokenizer, write_jsonl
from jaxtune.models import hf
from jaxtune.training import preference_losses as pref_losses
from jaxtune.training.preference import make_preference_loss_fn, preference_objective
from jaxtune.training.preference_config import PreferenceConfig
from jaxtune.training.preference_logprobs import (
    paired_rows,
    policy_token_logprobs,
    segment_sums,
    sequence_logprobs,
    token_logprobs,
)
from jaxtune.training.preference_reference import (
    REFERENCE_KEY,
    reference_logprobs,
    reference_params,
    starting_weights,
    with_reference_start,
)
from jaxtune.training.step import make_train_step
from tests.helpers import tiny_hf_model

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO and ORPO live in trl.experimental in TRL 1.x

# ----------------------------------------------------------------------------- shared inputs

B, T = 3, 10  # pairs, tokens per row


def _pairs_layout(seed: int = 0):
    """Random per-token log-probs and answer masks for B pairs, in TRL's layout and jaxtune's.

    TRL: rows ``[chosen_0..B-1, rejected_0..B-1]``, ``(2B, T-1)`` shifted log-probs, completion
    masks ``(2B, T)``. jaxtune: rows interleaved ``(chosen_b, rejected_b)`` as the paired batch
    ``(B, 2, T)`` reshapes to, token log-probs ``(2B, T)`` (last column predicts nothing).
    """
    rng = np.random.RandomState(seed)
    prompt = rng.randint(1, 4, size=B)
    answer = rng.randint(2, T - 4, size=(2, B))  # [side, pair]
    completion = np.zeros((2, B, T), np.float32)
    for side in range(2):
        for b in range(B):
            completion[side, b, prompt[b]:prompt[b] + answer[side, b]] = 1
    lp = -rng.uniform(0.05, 3.0, size=(2, B, T)).astype(np.float32)  # log-probs of the next token
    ref = -rng.uniform(0.05, 3.0, size=(2, B)).astype(np.float32) * 4
    attention = np.zeros_like(completion)
    for side in range(2):
        for b in range(B):
            attention[side, b, :prompt[b] + answer[side, b]] = 1
    return dict(lp=lp, completion=completion, attention=attention, ref=ref)


def _jax_rows(d):
    """The paired-batch rows (2B, T) in jaxtune's order, and token log-probs to match."""
    order = lambda x: np.swapaxes(x, 0, 1).reshape(2 * B, *x.shape[2:])  # noqa: E731  [side, b] -> [b, side]
    completion, attention = order(d["completion"]), order(d["attention"])
    weights = np.zeros_like(completion)
    weights[:, :-1] = completion[:, 1:]  # position t predicts token t + 1
    rows = {"loss_weights": jnp.asarray(weights), "segment_ids": jnp.asarray(attention.astype(np.int32)),
            "targets": jnp.zeros((2 * B, T), jnp.int32)}
    return rows, jnp.asarray(order(d["lp"]))


def _reference(d):
    ref = np.zeros((B, 2, T // 2), np.float32)
    ref[:, 0, 0], ref[:, 1, 0] = d["ref"][0], d["ref"][1]
    return jnp.asarray(ref)


def _jaxtune(config, d):
    """(loss, metric means, d loss / d token log-probs in TRL's (side, b, t) layout)."""
    rows, token_lp = _jax_rows(d)
    reference = _reference(d) if config.needs_reference else None

    def loss(lp):
        total, pairs, out = preference_objective(config, lp, rows, (B, T // 2), reference)
        return total / pairs, out["metrics"]

    (value, sums), grad = jax.value_and_grad(loss, has_aux=True)(token_lp)
    grad = np.swapaxes(np.asarray(grad).reshape(B, 2, T), 0, 1)
    return float(value), {k: float(v) for k, v in pref_losses.mean_metrics(sums).items()}, grad


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_dpo(d, loss_type, beta):
    """TRL's DPOTrainer._compute_loss itself, on a bare trainer whose 'model' returns the given
    per-token log-probs (what TRL's fused LM head returns: 0 outside the completion)."""
    pytest.importorskip("trl")  # in the test extra; only these comparisons need it
    from trl import DPOTrainer

    completion = torch.as_tensor(d["completion"]).reshape(2 * B, T)
    lp = torch.tensor(d["lp"][..., :-1].reshape(2 * B, T - 1), requires_grad=True)

    class Model(torch.nn.Module):
        def forward(self, **kwargs):
            zeros = torch.zeros(2 * B, T - 1)
            return SimpleNamespace(log_probs=lp * completion[:, 1:], entropy=zeros, mean_logits=zeros,
                                   is_top1=zeros.bool())

    trainer = object.__new__(DPOTrainer)
    model = Model().train()
    trainer.__dict__.update(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "completion_mask": completion.long(),
              "attention_mask": torch.as_tensor(d["attention"]).reshape(2 * B, T).long(),
              "ref_chosen_logps": torch.as_tensor(d["ref"][0]), "ref_rejected_logps": torch.as_tensor(d["ref"][1])}
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), metrics, _trl_grad(lp)


def _trl_grad(lp):
    g = np.zeros((2, B, T), np.float32)
    g[..., :-1] = lp.grad.numpy().reshape(2, B, T - 1)
    return g


def _trl_cpo(d, loss_type, beta, label_smoothing, *, gamma=0.5, reference=False):
    """TRL's CPOTrainer.cpo_loss on a bare trainer. ``reference=True`` feeds it log-ratios to the
    reference: then its sigmoid loss is conservative DPO (TRL 1.x's DPOTrainer dropped
    label smoothing from 'sigmoid'). Otherwise mean log-probs (SimPO's ``average_log_prob``)."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    lp = torch.tensor(d["lp"][..., :-1], requires_grad=True)
    mask = torch.as_tensor(d["completion"][..., 1:])
    sums = (lp * mask).sum(-1)
    if reference:
        chosen, rejected = sums[0] - torch.as_tensor(d["ref"][0]), sums[1] - torch.as_tensor(d["ref"][1])
    else:
        means = sums / mask.sum(-1)
        chosen, rejected = means[0], means[1]
    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                            simpo_gamma=gamma, accelerator=_Accelerator())
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(chosen, rejected)
    loss = losses.mean()
    loss.backward()
    g = np.zeros((2, B, T), np.float32)
    g[..., :-1] = lp.grad.numpy()
    metrics = {"rewards/chosen": float(chosen_rewards.mean()), "rewards/rejected": float(rejected_rewards.mean()),
               "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean())}
    return float(loss.detach()), metrics, g


def _close(a, b, name):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- (a) losses equal TRL's


@pytest.mark.parametrize("method", ["dpo", "ipo"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_and_ipo_equal_trl_dpo_trainer(method, seed):
    d = _pairs_layout(seed)
    beta = 0.2
    loss, metrics, grad = _jaxtune(PreferenceConfig(method, beta=beta), d)
    trl_loss, trl_metrics, trl_grad = _trl_dpo(d, "sigmoid" if method == "dpo" else "ipo", beta)
    _close(loss, trl_loss, "loss")
    _close(grad, trl_grad, "gradient")
    assert np.abs(trl_grad).max() > 1e-3  # the gradient is not trivially zero
    for ours, theirs in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies"),
                         ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")]:
        _close(metrics[ours], trl_metrics[theirs], ours)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_conservative_dpo_equals_trl(label_smoothing):
    d = _pairs_layout(2)
    loss, metrics, grad = _jaxtune(PreferenceConfig("dpo", beta=0.5, label_smoothing=label_smoothing), d)
    trl_loss, trl_metrics, trl_grad = _trl_cpo(d, "sigmoid", 0.5, label_smoothing, reference=True)
    _close(loss, trl_loss, "loss")
    _close(grad, trl_grad, "gradient")
    # TRL's CPO rewards are beta * what it was fed, here the log-ratios: DPO's rewards.
    _close(metrics["rewards/chosen"], trl_metrics["rewards/chosen"], "rewards/chosen")
    _close(metrics["rewards/accuracy"], trl_metrics["rewards/accuracies"], "accuracy")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_equals_trl_cpo_simpo(label_smoothing):
    d = _pairs_layout(3)
    loss, metrics, grad = _jaxtune(PreferenceConfig("simpo", beta=2.0, gamma=0.7,
                                                         label_smoothing=label_smoothing), d)
    trl_loss, trl_metrics, trl_grad = _trl_cpo(d, "simpo", 2.0, label_smoothing, gamma=0.7)
    _close(loss, trl_loss, "loss")
    _close(grad, trl_grad, "gradient")
    for k in ("rewards/chosen", "rewards/rejected"):
        _close(metrics[k], trl_metrics[k], k)


def _trl_orpo(logits, chosen_ids, chosen_labels, rejected_ids, rejected_labels, attention, beta):
    """TRL's ORPOTrainer.get_batch_loss_metrics on a bare trainer whose model returns ``logits``."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    logits = torch.tensor(logits, requires_grad=True)

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return SimpleNamespace(logits=logits)

    trainer = object.__new__(ORPOTrainer)
    trainer.__dict__.update(is_encoder_decoder=False, padding_value=0, accelerator=_Accelerator(),
                            aux_loss_enabled=False, beta=beta)
    t = lambda x: torch.as_tensor(x).long()  # noqa: E731
    batch = {"chosen_input_ids": t(chosen_ids), "chosen_attention_mask": t(attention[0]),
             "chosen_labels": t(chosen_labels),
             "rejected_input_ids": t(rejected_ids), "rejected_attention_mask": t(attention[1]),
             "rejected_labels": t(rejected_labels)}
    loss, metrics = trainer.get_batch_loss_metrics(Model(), batch)
    loss.backward()
    return float(loss.detach()), metrics, logits.grad.numpy()


def test_orpo_equals_trl_from_the_same_logits():
    """ORPO's NLL term needs logits (TRL averages it over every real chosen token, prompt included),
    so both sides start from the same logits ``(2B, T, V)``."""
    d, v = _pairs_layout(4), 7
    rng = np.random.RandomState(5)
    logits = rng.randn(2 * B, T, v).astype(np.float32) * 2
    ids = rng.randint(0, v, size=(2, B, T))
    attention = d["attention"].astype(np.int64)
    ids = ids * attention
    labels = np.where(d["completion"] > 0, ids, -100)
    trl_loss, trl_metrics, trl_grad = _trl_orpo(logits, ids[0], labels[0], ids[1], labels[1], attention, 0.3)

    order = lambda x: np.swapaxes(x, 0, 1).reshape(2 * B, *x.shape[2:])  # noqa: E731
    row_ids = order(ids)
    targets = np.zeros_like(row_ids)
    targets[:, :-1] = row_ids[:, 1:]
    rows, _ = _jax_rows(d)
    rows["targets"] = jnp.asarray(targets, jnp.int32)
    jax_logits = jnp.asarray(order(logits.reshape(2, B, T, v)))
    config = PreferenceConfig("orpo", beta=0.3)

    def loss(lg):
        lp = token_logprobs(lg, rows["targets"])
        total, pairs, out = preference_objective(config, lp, rows, (B, T // 2), None)
        return total / pairs, out["metrics"]

    (value, sums), grad = jax.value_and_grad(loss, has_aux=True)(jax_logits)
    _close(float(value), trl_loss, "loss")
    grad = np.swapaxes(np.asarray(grad).reshape(B, 2, T, v), 0, 1).reshape(2 * B, T, v)
    _close(grad, trl_grad, "gradient")
    means = pref_losses.mean_metrics(sums)
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        _close(float(means[k]), trl_metrics[k], k)


def test_pure_loss_functions_match_the_batch_objective():
    """The public per-pair losses give what the model-level objective computes."""
    d = _pairs_layout(6)
    sums = (d["lp"][..., :-1] * d["completion"][..., 1:]).sum(-1)
    lengths = d["completion"].sum(-1)
    means = sums / lengths
    cases = [
        ("dpo", pref_losses.dpo_loss(sums[0], sums[1], d["ref"][0], d["ref"][1], beta=0.2, label_smoothing=0.1),
         dict(beta=0.2, label_smoothing=0.1)),
        ("ipo", pref_losses.ipo_loss(sums[0], sums[1], d["ref"][0], d["ref"][1], lengths[0], lengths[1], beta=0.2),
         dict(beta=0.2)),
        ("simpo", pref_losses.simpo_loss(means[0], means[1], beta=2.0, gamma=0.5), dict(beta=2.0, gamma=0.5)),
    ]
    for method, (loss, metrics), options in cases:
        expected, expected_metrics, _ = _jaxtune(PreferenceConfig(method, **options), d)
        _close(float(loss), expected, method)
        _close(float(metrics["rewards/margin"]), expected_metrics["rewards/margin"], method)
    loss, metrics = pref_losses.orpo_loss(means[0], means[1], jnp.float32(1.5), beta=0.3)
    log_odds = (means[0] - means[1]) - (np.log1p(-np.exp(means[0])) - np.log1p(-np.exp(means[1])))
    _close(float(loss), 1.5 - 0.3 * np.mean(np.log(1 / (1 + np.exp(-log_odds)))), "orpo")
    mask = jnp.asarray([1.0, 0.0, 1.0])
    masked, _ = pref_losses.simpo_loss(means[0], means[1], mask=mask)
    full, _ = pref_losses.simpo_loss(means[0][[0, 2]], means[1][[0, 2]])
    _close(float(masked), float(full), "mask")


# ----------------------------------------------------------------------------- (b) sequence log-probs


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref-llama")
    torch_model = tiny_hf_model("LlamaForCausalLM", root)
    return torch_model, hf.load_pretrained(root)


def _examples(seed: int, lengths=(7, 9, 5)):
    rng = np.random.RandomState(seed)
    out = []
    for n in lengths:
        ids = rng.randint(3, 128, size=n).astype(np.int32)
        mask = np.zeros(n, bool)
        mask[rng.randint(1, n - 2):] = True
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


def _torch_sequence_logprobs(model, examples):
    sums = []
    with torch.no_grad():
        for e in examples:
            logits = model(torch.as_tensor(e["input_ids"][None]).long()).logits[0].double()
            targets = torch.as_tensor(e["input_ids"][1:]).long()[:, None]
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, targets)[:, 0]
            sums.append(float((lp * torch.as_tensor(e["loss_mask"][1:])).sum()))
    return np.asarray(sums)


@pytest.mark.parametrize("packed", [False, True])
def test_sequence_logprobs_match_transformers(llama, packed):
    torch_model, pre = llama
    examples = _examples(0)
    rows = [packing.lm_row(examples, 24)] if packed else packing.pad(examples, 24)
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in packing.LM_KEYS}
    variables = {"params": pre.params}
    hidden = pre.module.apply(variables, input_ids=batch["input_ids"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"], method="hidden")
    sums, counts = sequence_logprobs(hidden, batch["targets"], batch["loss_weights"], batch["segment_ids"],
                                          lambda h: pre.module.apply(variables, h, method="logits"),
                                          chunk_tokens=16)  # several chunks
    got = np.asarray(sums[0, :3]) if packed else np.asarray(sums[:, 0])
    n = np.asarray(counts[0, :3]) if packed else np.asarray(counts[:, 0])
    np.testing.assert_allclose(got, _torch_sequence_logprobs(torch_model, examples), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(n, [e["loss_mask"][1:].sum() for e in examples])
    if packed:
        assert np.all(np.asarray(sums[0, 3:]) == 0)


def test_sequence_logprobs_chunked_equals_direct_logits():
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(2, 9, 8), jnp.float32)
    head = jnp.asarray(rng.randn(8, 30), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 30, (2, 9)))
    weights = jnp.asarray(rng.rand(2, 9) > 0.4, jnp.float32)
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])

    def f(h, w, chunk):
        sums, counts = sequence_logprobs(h, targets, weights, segments, (lambda x: x @ w), chunk_tokens=chunk)
        return sums.sum() * 0.5 + (sums ** 2).sum() * 0.01, (sums, counts)

    (_, (s1, c1)), g1 = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, head, 4)
    (_, (s2, _)), g2 = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, head, 1000)
    direct, _ = sequence_logprobs(hidden @ head, targets, weights, segments)
    np.testing.assert_allclose(np.asarray(s1), np.asarray(direct), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert s1.shape == (2, 4) and float(c1[0, 2]) == 0.0


# ----------------------------------------------------------------------------- (c) the reference model


def _paired_batch(seed: int, pairs: int = 4, length: int = 32, pack: bool = True):
    examples = _examples(seed, lengths=(6, 8, 5, 7, 9, 6, 5, 8)[:2 * pairs])
    items = [{"chosen": examples[2 * i], "rejected": examples[2 * i + 1]} for i in range(pairs)]
    rows = pair_rows(items, length, pack=pack)
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in packing.LM_KEYS}, len(rows)


def _with_trained_adapters(tuned, seed: int):
    """Params whose adapters change the model (LoRA B and DoRA magnitudes moved off their start)."""
    flat = flatten_dict(tuned.params)
    rng = np.random.RandomState(seed)
    for path, leaf in flat.items():
        if path[-1] == "lora_b":
            flat[path] = jnp.asarray(rng.randn(*leaf.shape) * 0.3, leaf.dtype)
        if path[-1] == "magnitude":
            flat[path] = leaf * jnp.asarray(1 + 0.2 * rng.rand(*leaf.shape), leaf.dtype)
    return unflatten_dict(flat)


@pytest.mark.parametrize("dora", [False, True])
def test_reference_logprobs_equal_the_base_model(llama, dora):
    _, pre = llama
    tuned = tuning.apply_plan(pre, tuning.lora(rank=4, alpha=8, dora=dora))
    params = _with_trained_adapters(tuned, 1)
    batch, _ = _paired_batch(0)
    reference = reference_logprobs(tuned.module, params, batch)
    rows = paired_rows(batch)
    w = rows["loss_weights"]
    base_lp = policy_token_logprobs(pre.module, pre.params, rows)
    base = segment_sums(base_lp * w, rows["segment_ids"], 16).reshape(reference.shape)
    policy_lp = policy_token_logprobs(tuned.module, params, rows)
    policy = segment_sums(policy_lp * w, rows["segment_ids"], 16).reshape(reference.shape)
    np.testing.assert_allclose(np.asarray(reference), np.asarray(base), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(policy - base)).max() > 1e-2  # the adapters do change the policy
    # Zeroing lora_scale is not the base for DoRA (its magnitude rescaling stays on).
    zeroed = unflatten_dict({p: (jnp.zeros_like(x) if p[-1] == "lora_scale" else x)
                             for p, x in flatten_dict(params).items()})
    zeroed_lp = policy_token_logprobs(tuned.module, zeroed, rows)
    zeroed_sums = segment_sums(zeroed_lp * w, rows["segment_ids"], 16).reshape(reference.shape)
    assert (np.abs(np.asarray(zeroed_sums - base)).max() > 1e-3) == dora


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_packed_pairs_give_the_loss_of_one_pair_per_row(llama, method):
    _, pre = llama
    tuned = tuning.apply_plan(pre, tuning.lora(rank=4, alpha=8))
    params = _with_trained_adapters(tuned, 7)
    packed, n_packed = _paired_batch(8)
    padded, n_padded = _paired_batch(8, pack=False)
    assert n_packed < n_padded == 4
    loss_fn = make_preference_loss_fn(tuned.module, PreferenceConfig(method))
    total_packed, pairs_packed, out_packed = loss_fn(params, packed, jax.random.key(0), True)
    total_padded, pairs_padded, out_padded = loss_fn(params, padded, jax.random.key(0), True)
    assert float(pairs_packed) == float(pairs_padded) == 4
    _close(float(total_packed), float(total_padded), "loss sum")
    for k in ("rewards/margin", "logps/chosen"):
        _close(float(out_packed["metrics"][k]), float(out_padded["metrics"][k]), k)


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _live_bytes() -> int:
    gc.collect()  # arrays of earlier tests in this process are freed now, not between two readings
    unique = {x.unsafe_buffer_pointer(): x.nbytes for x in jax.live_arrays() if not x.is_deleted()}
    return sum(unique.values())


def test_lora_dpo_step_holds_one_copy_of_the_base_weights(tmp_path):
    # Wider than the other tests' model and a short batch, so that weights, not activations,
    # dominate the step's memory and a second copy of them could not hide.
    tiny_hf_model("LlamaForCausalLM", tmp_path, hidden_size=256, intermediate_size=1024)
    tuned = tuning.apply_plan(hf.load_pretrained(tmp_path), tuning.lora(rank=4, alpha=8))
    trainable, frozen = tuning.partition(_with_trained_adapters(tuned, 2), tuned.labels)
    base_bytes = _nbytes(reference_params(frozen))  # the base weights (frozen minus lora_scale)
    fresh, _ = tuning.partition(tuned.params, tuned.labels)
    assert starting_weights(fresh) == {}  # fresh LoRA needs nothing besides the frozen base
    assert _nbytes(starting_weights(trainable)) == _nbytes(trainable)  # trained (SFT) ones: the adapters alone

    # Building the reference params copies nothing: every base leaf is the frozen array itself.
    before = _live_bytes()
    reference = reference_params(tuning.combine(trainable, frozen))
    assert _live_bytes() == before
    frozen_ids = {id(x) for x in jax.tree.leaves(frozen)}
    assert all(id(x) in frozen_ids for x in jax.tree.leaves(reference))

    # Inside the compiled step: the base weights enter once, as the frozen argument; the temporaries
    # are a fraction of the base, and the reference pass adds nothing weight-sized to what a
    # reference-free loss (SimPO) needs.
    batch, _ = _paired_batch(3, pairs=1, length=16)
    optimizer = optax.sgd(0.1)
    args = (trainable, frozen, optimizer.init(trainable), batch, jax.random.key(0))

    def memory(method, *step_args):
        loss_fn = make_preference_loss_fn(tuned.module, PreferenceConfig(method), chunk_tokens=8)
        return jax.jit(make_train_step(loss_fn, optimizer)).lower(*step_args).compile().memory_analysis()

    dpo, simpo = memory("dpo", *args), memory("simpo", *args)
    assert dpo.argument_size_in_bytes == _nbytes(args[:4])
    # No second copy of the base: a copy would be base_bytes on its own. (The scanned layer stack keeps
    # a layer's slice of the weights per loop; on this 2-layer model that alone is half the base.)
    assert dpo.temp_size_in_bytes < base_bytes
    assert dpo.temp_size_in_bytes - simpo.temp_size_in_bytes < base_bytes / 20
    # The measurement sees a copy when there is one: a full-model starting copy (what full
    # fine-tuning's reference needs) adds the base's bytes again.
    copied = {**frozen, REFERENCE_KEY: starting_weights(frozen)}
    with_copy = memory("dpo", trainable, copied, *args[2:])
    assert with_copy.argument_size_in_bytes >= dpo.argument_size_in_bytes + base_bytes


def test_dpo_starts_at_log2_with_fresh_adapters_and_learns(llama):
    _, pre = llama
    tuned = tuning.apply_plan(pre, tuning.lora(rank=4, alpha=8))
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    batch, _ = _paired_batch(4)
    loss_fn = make_preference_loss_fn(tuned.module, PreferenceConfig("dpo", beta=0.5))
    optimizer = optax.adam(1e-2)
    step = jax.jit(make_train_step(loss_fn, optimizer))
    opt_state = optimizer.init(trainable)
    losses = []
    for i in range(8):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6)  # lora_b = 0: policy == reference
    assert losses[-1] < losses[0] - 0.05
    _, pairs, out = loss_fn(tuning.combine(trainable, frozen), batch, jax.random.key(0), True)
    assert float(pairs) == 4
    assert float(out["metrics"]["rewards/accuracy"]) / float(pairs) > 0.5


def test_the_policy_runs_without_dropout_as_trls_disable_dropout(tmp_path):
    """TRL's DPOConfig(disable_dropout=True) (its default) turns dropout off in the policy as in the reference;
    jaxtune's training step ran the policy with GPT-2's dropout, so a fresh adapter's first loss was not log 2
    and the log-ratios carried dropout noise. ``disable_dropout: false`` keeps it."""
    from helpers import tiny_random_model

    tiny_random_model("GPT2LMHeadModel", tmp_path, dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                        n_positions=128), config_class="GPT2Config")
    pre = hf.load_pretrained(tmp_path)
    assert pre.config.dropout == 0.1
    tuned = tuning.apply_plan(pre, tuning.lora(rank=4, alpha=8))
    batch, _ = _paired_batch(4)
    for disable in (True, False):
        loss_fn = make_preference_loss_fn(tuned.module, PreferenceConfig("dpo", disable_dropout=disable))
        total, pairs, _ = loss_fn(tuned.params, batch, jax.random.key(1), False)  # a training step's call
        assert (float(total / pairs) == pytest.approx(np.log(2), abs=1e-6)) == disable


def test_micro_batches_equal_one_batch(llama):
    _, pre = llama
    tuned = tuning.apply_plan(pre, tuning.lora(rank=4, alpha=8))
    trainable, frozen = tuning.partition(_with_trained_adapters(tuned, 9), tuned.labels)
    batch, rows = _paired_batch(10, pack=False)
    assert rows == 4
    loss_fn = make_preference_loss_fn(tuned.module, PreferenceConfig("dpo", label_smoothing=0.1))
    optimizer = optax.sgd(1.0)
    results = [jax.jit(make_train_step(loss_fn, optimizer, grad_accum_steps=k))(
        trainable, frozen, optimizer.init(trainable), batch, jax.random.key(0)) for k in (1, 2)]
    (one, _, m1), (two, _, m2) = results
    _close(float(m1["loss"]), float(m2["loss"]), "loss")
    assert float(m1["weight"]) == float(m2["weight"]) == 4  # the weight is the number of pairs
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        _close(np.asarray(a), np.asarray(b), "updated adapters")


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_a_full_plans_reference_is_its_starting_policy_under_bfloat16_compute(family, tmp_path):
    """Float32 weights, bfloat16 compute: the in-step reference (the starting copy of the trained
    leaves, in the compute dtype) is the starting policy, so DPO's first loss is exactly log 2. The
    copy rounded every leaf to bf16, and families whose norms read the float32 gain (GPT-2's and
    BERT's LayerNorm, Gemma's 1 + w, OLMo 2) gave another model: first logits ~1e-4 off."""
    from tests.helpers import tiny_random_model

    config = ({"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}
              if family == "gpt2" else
              {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    architecture = {"gpt2": "GPT2LMHeadModel", "gemma": "GemmaForCausalLM"}[family]
    tiny_random_model(architecture, tmp_path, config, config_class={"gpt2": "GPT2Config"}.get(family),
                      norm_offset=0.5 if family == "gpt2" else -0.5)
    pre = hf.load_pretrained(tmp_path, compute_dtype=jnp.bfloat16)
    full = tuning.apply_plan(pre, tuning.full())
    trainable, frozen = tuning.partition(full.params, full.labels)
    frozen = with_reference_start(trainable, frozen, full.config.dtype)
    batch, _ = _paired_batch(3)
    loss_fn = make_preference_loss_fn(full.module, PreferenceConfig("dpo", beta=0.5))
    loss, pairs, out = loss_fn(tuning.combine(trainable, frozen), batch, jax.random.key(0), True)
    assert float(loss) / float(pairs) == pytest.approx(np.log(2), abs=1e-7)
    assert float(out["metrics"]["rewards/chosen"]) == 0.0


def test_cached_reference_logps_give_the_same_loss(llama):
    _, pre = llama
    tuned = tuning.apply_plan(pre, tuning.lora(rank=4, alpha=8))
    params = _with_trained_adapters(tuned, 5)
    batch, _ = _paired_batch(6)
    loss_fn = make_preference_loss_fn(tuned.module, PreferenceConfig("ipo"))
    live = loss_fn(params, batch, jax.random.key(0), True)
    cached_batch = {**batch, "reference_logps": reference_logprobs(tuned.module, params, batch)}
    cached = loss_fn(params, cached_batch, jax.random.key(0), True)
    _close(float(live[0]), float(cached[0]), "loss")
    # Full fine-tuning: the reference is the starting copy, not the current params.
    full = tuning.apply_plan(pre, tuning.full())
    trainable, frozen = tuning.partition(full.params, full.labels)
    moved = jax.tree.map(lambda x: x * 1.1, trainable)
    start = {**frozen, REFERENCE_KEY: starting_weights(trainable)}
    ref_moved = reference_logprobs(full.module, tuning.combine(moved, frozen), batch,
                                        starting=starting_weights(trainable))
    ref_start = reference_logprobs(full.module, pre.params, batch)
    _close(np.asarray(ref_moved), np.asarray(ref_start), "reference of a fully fine-tuned model")
    loss_moved = loss_fn(tuning.combine(moved, start), batch, jax.random.key(0), True)
    loss_cached = loss_fn(tuning.combine(moved, frozen), {**batch, "reference_logps": ref_start}, jax.random.key(0),
                          True)
    _close(float(loss_moved[0]), float(loss_cached[0]), "full fine-tuning loss")
    loss_self = loss_fn(tuning.combine(moved, frozen), batch, jax.random.key(0), True)  # no starting copy
    assert abs(float(loss_self[0]) - float(loss_moved[0])) > 1e-3


# ----------------------------------------------------------------------------- data


GOOD_OPENAI = {"input": {"messages": [{"role": "user", "content": "Hi?"}]},
               "preferred_output": [{"role": "assistant", "content": "Hello!"}],
               "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}
GOOD_TRL = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
USER = {"role": "user", "content": "q"}


def _ans(text, role="assistant"):
    return [{"role": role, "content": text}]


BAD_ROWS = [
    ({"preferred_output": _ans("a"), "non_preferred_output": _ans("b")}, "missing 'input'"),
    ({"input": {"messages": [USER]}, "preferred_output": _ans("a")}, "missing 'non_preferred_output'"),
    ({**GOOD_OPENAI, "preferred_output": _ans("  ")}, "preferred_output[0] (assistant): 'content' is empty"),
    ({**GOOD_OPENAI, "preferred_output": []}, "'preferred_output' must be a non-empty list"),
    ({**GOOD_OPENAI, "non_preferred_output": _ans("b", role="user")}, "non_preferred_output[0] has role 'user'"),
    ({**GOOD_OPENAI, "input": {"messages": [USER, {"role": "assistant", "content": "x"}]}},
     "the prompt ends with an assistant turn"),
    ({**GOOD_OPENAI, "input": {"messages": "hi"}}, "'input.messages' must be a non-empty list"),
    ({**GOOD_OPENAI, "non_preferred_output": GOOD_OPENAI["preferred_output"]}, "are identical"),
    ({"prompt": "p", "chosen": "a"}, "missing 'rejected'"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"chosen": "a", "rejected": "b"}, "missing 'prompt'"),
    ({"prompt": "p", "chosen": _ans("a"), "rejected": "b"}, "mixed plain and conversational fields"),
    ({"prompt": [USER], "chosen": _ans("a"), "rejected": [USER]}, "rejected[0] has role 'user'"),
    ({"prompt": [USER, {"role": "assistant", "content": "x"}], "chosen": _ans("a"), "rejected": _ans("b")},
     "the prompt ends with an assistant turn"),
    ({"chosen": [USER, *_ans("a")], "rejected": [{"role": "user", "content": "other"}, *_ans("b")]},
     "share no opening turns"),
    ({"chosen": [USER, *_ans("a")], "rejected": [USER, *_ans("a")]}, "identical or one is a prefix"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' is a int"),
    ({"prompt": "a\ud800b", "chosen": "a", "rejected": "b"}, "'prompt' has a lone surrogate"),
    ({"text": "hello"}, "neither OpenAI's nor TRL's preference keys"),
    # a turn is checked as a chat file's turn is (rows.check_message): a name that is not text too
    ({"prompt": [{"role": "user", "content": "q", "name": 5}], "chosen": _ans("a"), "rejected": _ans("b")},
     "prompt[0] (user): 'name' is int, not a string"),
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": "a", "weight": 1}], "rejected": _ans("b")},
     "chosen[0] has unsupported keys ['weight']"),
    (["a", "b"], "row is a JSON list"),
]


@pytest.mark.parametrize("row,problem", BAD_ROWS, ids=[p for _, p in BAD_ROWS])
def test_malformed_preference_rows_get_one_line_errors(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_OPENAI, row, GOOD_TRL])
    with pytest.raises(DataError) as err:
        read_preference(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and problem in message
    assert "\n" not in message and " — " in message  # one line, with how to fix it
    skipped = read_preference(path, skip_bad_rows=True)
    assert len(skipped) == 2 and skipped.report.skipped[0][0] == f"{path}:2"


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: malformed JSON"):
        read_preference(path)


def test_both_formats_read_tokenize_and_share_the_prompt(tmp_path):
    rows = [GOOD_OPENAI, GOOD_TRL,
            {"prompt": [USER], "chosen": _ans("yes"), "rejected": _ans("no")},
            {"chosen": [USER, *_ans("good")], "rejected": [USER, *_ans("bad")]}]
    source = pickle.loads(pickle.dumps(read_preference(write_jsonl(tmp_path / "p.jsonl", rows))))
    assert source.kind == KIND and len(source) == 4 and source[3]["where"].endswith("p.jsonl:4")
    assert source.select([3])[0]["prompt"] == [{"role": "user", "content": "q"}]
    tokenizer = tiny_tokenizer()
    tokenize = TokenizePairs(tokenizer, 64)
    decoded = []
    for i in range(len(source)):
        (pair,), status, _ = tokenize.encode(source[i])
        assert status == "ok"
        c, r = pair["chosen"], pair["rejected"]
        n = int(np.flatnonzero(c["loss_mask"])[0])
        assert n == int(np.flatnonzero(r["loss_mask"])[0]) and np.array_equal(c["input_ids"][:n], r["input_ids"][:n])
        decoded.append(tuple(tokenizer.decode(e["input_ids"][e["loss_mask"]]) for e in (c, r)))
    assert decoded[0] == ("Hello!<|end|>", "Go away.<|end|>")  # the chat template's end-of-turn is supervised
    assert decoded[1] == ("4</s>", "5</s>")  # plain pairs end with EOS
    assert decoded[3] == ("good<|end|>", "bad<|end|>")

    pairs = [tokenize(source[i])[0] for i in range(len(source))]
    packed, padded = pair_rows(pairs, 64), pair_rows(pairs, 64, pack=False)
    assert len(packed) == 1 and len(padded) == 4
    assert packed[0]["segment_ids"].shape == (2, 64) and packed[0]["segment_ids"].max() == 4
    # every answer token is a target once, in the row of its side
    for side in range(2):
        assert sum(r["loss_weights"][side].sum() for r in packed) == sum(r["loss_weights"][side].sum() for r in padded)


def test_plain_answers_end_with_one_eos_as_trl_tokenizes_them():
    """TRL adds EOS to a plain answer only when it does not end with it already (data prepared for older
    recipes often does); jaxtune appended a second one and trained p(EOS | EOS) into both answers."""
    pytest.importorskip("trl")
    from trl.data_utils import _tokenize

    tokenizer = tiny_tokenizer(bos=True)
    for chosen, rejected in (("4", "5"), ("4</s>", "5</s>")):
        (pair,), status, _ = TokenizePairs(tokenizer, 64).encode({"prompt": "2+2=", "chosen": chosen,
                                                                   "rejected": rejected})
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            text = text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token  # TRL's add_eos
            assert pair[side]["input_ids"].tolist() == _tokenize(tokenizer, "2+2=" + text)["input_ids"], (side, text)
    # SFT's prompt/completion rows likewise (TRL's SFTTrainer adds EOS the same way)
    from jaxtune.data.tokenize import encode_prompt_completion, special_prefix

    example = encode_prompt_completion(tokenizer, "2+2=", "4</s>", prefix=special_prefix(tokenizer),
                                       eos=tokenizer.eos_token_id)
    assert example["input_ids"].tolist() == _tokenize(tokenizer, "2+2=4</s>")["input_ids"]


def test_truncation_keeps_the_prompt_shared_and_drops_cut_answers():
    tokenizer = tiny_tokenizer()
    record = {"prompt": "a long prompt", "chosen": "yes indeed", "rejected": "no", "where": "f:1"}
    (pair,), status, length = TokenizePairs(tokenizer, 16).encode(record)
    assert status == "truncated" and length == 24
    assert all(len(pair[k]["input_ids"]) == 16 for k in ("chosen", "rejected"))
    assert pair["index"] == -1  # a record without a source index (pair_ids 0)
    assert TokenizePairs(tokenizer, 13).encode(record)[:2] == ([], "dropped")  # the rejected answer is cut off
    assert TokenizePairs(tokenizer, 16, truncation="drop").encode(record)[:2] == ([], "dropped")
    with pytest.raises(DataError, match="f:1: 24 tokens is longer than max_length=16"):
        TokenizePairs(tokenizer, 16, truncation="error").encode(record)


def test_source_and_tokenizer_work_in_a_grain_pipeline(tmp_path):
    import grain

    rows = [{"prompt": f"q{i}?", "chosen": f"answer {i}", "rejected": "no"} for i in range(12)]
    source = read_preference(write_jsonl(tmp_path / "p.jsonl", rows))
    tokenize = pickle.loads(pickle.dumps(TokenizePairs(tiny_tokenizer(), 32)))  # grain workers get copies
    dataset = grain.MapDataset.source(source).shuffle(seed=0).map(tokenize)
    out = list(dataset.to_iter_dataset(grain.ReadOptions(num_threads=3)))
    assert len(out) == 12 and all(len(pairs) == 1 for pairs in out)
    assert sorted(p[0]["index"] for p in out) == list(range(12))  # each pair knows its source index
    texts = sorted(tiny_tokenizer().decode(p[0]["chosen"]["input_ids"]) for p in out)
    assert texts == sorted(f"q{i}?answer {i}</s>" for i in range(12))


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_the_answer_index_gives_the_same_loss_and_gradients_for_fewer_flops(llama, method):
    """With the loader's answer index (each row's supervised positions) the policy's and the
    reference's LM head project those alone: the same loss, metrics and gradients as over every
    position, for fewer flops; ORPO's NLL term reads every token, so it projects them all."""
    _, pre = llama
    tuned = tuning.apply_plan(pre, tuning.lora(rank=4, alpha=8))
    params = _with_trained_adapters(tuned, 3)
    batch, _ = _paired_batch(5, pack=False)
    indexed = {**batch, packing.ANSWER_INDEX: jnp.asarray(packing.answer_index(np.asarray(batch["loss_weights"])))}
    assert indexed[packing.ANSWER_INDEX].shape == (4, 2, 8)
    loss_fn = make_preference_loss_fn(tuned.module, PreferenceConfig(method))

    def loss(p, b):
        total, pairs, out = loss_fn(p, b, jax.random.key(0), True)
        return total / pairs, out["metrics"]

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ((full, full_metrics), full_grads), ((answers, answer_metrics), answer_grads) = \
        grad(params, batch), grad(params, indexed)
    _close(float(answers), float(full), "loss")
    for k in full_metrics:
        _close(float(answer_metrics[k]), float(full_metrics[k]), k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), answer_grads, full_grads)
    flops = {name: jax.jit(lambda p, b=b: loss(p, b)[0]).lower(params).compile().cost_analysis()["flops"]
             for name, b in (("full", batch), ("answers", indexed))}
    if method == "orpo":
        assert flops["answers"] == flops["full"]
    else:  # the head's forward over the 8 rows' 24 skipped positions at least (2 D V flops each)
        cfg = pre.module.cfg
        passes = 2 if method in ("dpo", "ipo") else 1  # the reference's forward too
        assert flops["full"] - flops["answers"] >= passes * 8 * 24 * 2 * cfg.hidden_size * cfg.vocab_size
