"""The record of a log window (training/loop.py's TrainRecords) against closed forms: the window's
means, throughput, learning rate and the MFU of a tiny Llama counted by hand."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import tiny_hf_model

import jaxtune as jt
from jaxtune.models import hf
from jaxtune.training import flops
from jaxtune.training.loop import InFlight, TrainRecords

PEAK = 1e12  # FLOP/s of the pretended device (a CPU has no known peak, so MFU is otherwise left out)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_hf_model("LlamaForCausalLM", path)  # hidden 64, 4 heads of 16, 2 kv heads, MLP 96, 2 layers, vocab 128
    return jt.apply_plan(hf.load_pretrained(path), jt.lora(rank=4, alpha=8, targets=["q_proj", "v_proj"]))


def test_a_language_models_record_has_the_windows_means_its_learning_rate_and_its_mfu(tuned, monkeypatch, caplog):
    monkeypatch.setattr(flops, "peak_flops", lambda device_kind=None, dtype="bfloat16": PEAK)
    schedule = optax.linear_schedule(1.0, 0.0, 100)
    records = TrainRecords(tuned, schedule, 100, progress=True)
    records.observe({"input_ids": jax.numpy.zeros((2, 16), jax.numpy.int32)})
    host = [{"loss": 1.0, "grad_norm": 0.5, "tokens": 32}, {"loss": 3.0, "grad_norm": 1.5, "tokens": 32}]
    with caplog.at_level(logging.INFO, logger="jaxtune.training.trainer"):
        record = records.record(host, 10, 2000.0, 2, 4.0)

    # matmul weights: per layer q 64x64, k and v 64x32, o 64x64, gate/up 64x96, down 96x64; an
    # untied lm_head 64x128 (the input embedding is a lookup); LoRA on q (64x4 + 4x64) and v (64x4 + 4x32)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96
    lora = 2 * ((64 * 4 + 4 * 64) + (64 * 4 + 4 * 32))
    n_matmul, n_trainable = 2 * per_layer + 64 * 128 + lora, lora
    attention = 2 * 2 * 16 * (4 * 16)  # 2 x layers x seq_len x attention width
    per_token = 4 * n_matmul + 2 * n_trainable + 3 * attention
    assert record == pytest.approx({"step": 10, "loss": 2.0, "grad_norm": 1.0, "tokens_per_s": 500.0,
                                    "steps_per_s": 0.5, "learning_rate": 1.0 - 9 / 100,
                                    "mfu": 500.0 * per_token / (PEAK * jax.device_count())})
    assert "step 10/100 | loss 2.0000 | lr 9.10e-01 | 500 tok/s" in caplog.text


def test_a_record_without_a_known_peak_or_schedule_says_only_what_it_knows(tuned):
    records = TrainRecords(tuned, None, 100, progress=False)  # CPU: no peak FLOP/s
    records.observe({"input_ids": jax.numpy.zeros((2, 16), jax.numpy.int32)})
    host = [{"loss": 2.0, "grad_norm": 1.0, "tokens": 8,
             "metric_sums": {"pairs": 4.0, "rewards/accuracy": 3.0}},
            {"loss": 4.0, "grad_norm": 3.0, "tokens": 8,
             "metric_sums": {"pairs": 2.0, "rewards/accuracy": 0.0}}]
    record = records.record(host, 4, 16.0, 2, 2.0)
    # a preference loss's metric sums are means over the window's pairs: 3 of 6 pairs ranked right
    assert record == pytest.approx({"step": 4, "loss": 3.0, "grad_norm": 2.0, "tokens_per_s": 8.0,
                                    "steps_per_s": 1.0, "rewards/accuracy": 0.5})


def test_in_flight_names_a_step_still_computing_once_it_finishes():
    """A watcher writing the status as another process stops after step k read step k's output without
    waiting: on a loaded host k was still computing (past its last collective) and the status named k - 1."""
    slow = jax.jit(lambda x: jax.lax.fori_loop(0, 300, lambda i, y: jnp.tanh(y @ y), x))
    x = jnp.full((400, 400), 0.01)
    slow(x).block_until_ready()  # compiled: the call below only dispatches
    in_flight = InFlight(0)
    in_flight.dispatched(1, jnp.ones(()).block_until_ready())
    in_flight.dispatched(2, slow(x))
    assert in_flight.finished(wait_s=0) == 1  # step 2 still computing
    assert in_flight.finished(wait_s=60) == 2
