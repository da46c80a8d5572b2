"""Reward models (``preference.method: reward``): the Bradley-Terry loss and its gradients against TRL's
``RewardTrainer`` on the same tiny Llama, margins from the data, training and exact resume, evaluation,
the HF and PEFT exports that transformers and peft score as jaxtune does, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import yaml
from flax.traverse_util import flatten_dict
from test_encoders import tiny_encoder
from test_modernbert import tiny_modernbert

import jaxtune as jt
from jaxtune.config import ConfigError
from jaxtune.data import LoaderConfig, training_loader
from jaxtune.data.preference import MARGINS, PAIR_IDS, TokenizePairs, pair_rows
from jaxtune.data.sources import DataError
from jaxtune.data.testing import synthetic_preference_rows, tiny_tokenizer, write_jsonl
from jaxtune.recipe import plan_memory
from jaxtune.training.preference import make_preference_loss_fn
from jaxtune.training.reward_model import reward_pad_id, reward_scores
from jaxtune.training.sharding import MeshConfig
from jaxtune.training.step import make_train_step
from jaxtune.tuning import partition
from tests.helpers import tiny_hf_model

EOS = 3  # tiny_tokenizer's </s>; the reward model's pad_token_id, as TRL sets it when a tokenizer pads with EOS


@pytest.fixture(scope="module")
def reward_llama(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A random LlamaForSequenceClassification with one output whose pad token is EOS (TRL's default
    when the tokenizer has no pad token), saved with a tokenizer."""
    root = tmp_path_factory.mktemp("reward_llama")
    model = tiny_hf_model("LlamaForSequenceClassification", root, num_labels=1, pad_token_id=EOS,
                          eos_token_id=EOS, randomize=True)
    tiny_tokenizer().save_pretrained(root)
    return root, model


def _pairs(seed: int = 0, n: int = 5) -> list[dict]:
    """Token-id pairs sharing a prompt: most answers end with EOS (the pad id: TRL's reward model then
    scores the token before it), one pair does not; ids above the specials."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        prompt = rng.integers(8, 100, rng.integers(2, 6)).tolist()
        sides = {}
        for side in ("chosen", "rejected"):
            answer = rng.integers(8, 100, rng.integers(1, 5)).tolist() + ([EOS] if i != 2 else [])
            ids = np.asarray(prompt + answer, np.int32)
            sides[side] = {"input_ids": ids, "loss_mask": np.arange(len(ids)) >= len(prompt)}
        pairs.append({**sides, "index": i, "margin": float(rng.uniform(-1, 2))})
    return pairs


def _batch(pairs: list[dict], length: int = 32, margins: bool = False) -> dict[str, jax.Array]:
    """The pairs packed into paired rows ``(B, 2, L)`` (several pairs a row), with their margins or
    without (no ``margins`` key: the loss's default, 0)."""
    rows = pair_rows(pairs, length)
    drop = {PAIR_IDS} | (set() if margins else {MARGINS})
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0] if k not in drop}


class _Accelerator:
    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


LLAMA_GRADS = {"score": "score.weight", "embed": "model.embed_tokens.weight"}


def _trl_reward(model: torch.nn.Module, pairs: list[dict], margins: bool, center: float | None, *, pad_id: int = EOS,
                weights: dict[str, str] = LLAMA_GRADS):
    """TRL's RewardTrainer.compute_loss itself, on a bare trainer, with TRL's own collator (padding with
    ``pad_id``): the loss, the metrics it logs, and the gradients of the ``weights`` (short name: HF
    parameter name; a Linear's transposed to jaxtune's kernel layout)."""
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import DataCollatorForPreference, RewardTrainer

    trainer = object.__new__(RewardTrainer)
    trainer.__dict__.update(model=model, args=SimpleNamespace(center_rewards_coefficient=center),
                            accelerator=_Accelerator(), _total_train_tokens=0, _tp_size=1,
                            _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    examples = [{"chosen_ids": p["chosen"]["input_ids"].tolist(), "rejected_ids": p["rejected"]["input_ids"].tolist(),
                 **({"margin": p["margin"]} if margins else {})} for p in pairs]
    inputs = DataCollatorForPreference(pad_token_id=pad_id)(examples)
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    embeddings = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    grads = {}
    for short, name in weights.items():
        grad = model.get_parameter(name).grad.numpy()
        grads[short] = grad if name.rsplit(".", 1)[0] in embeddings else grad.T
    return float(loss.detach()), metrics, grads


@pytest.mark.parametrize("margins,center", [(False, None), (True, None), (False, 0.05), (True, 0.05)])
def test_reward_loss_and_gradients_equal_trls_reward_trainer(reward_llama, margins, center):
    """The same weights in both: jaxtune's loss of packed pairs equals TRL's RewardTrainer loss (with
    and without the data's margins and the centring term), its gradients too, and the metrics TRL logs."""
    root, hf_model = reward_llama
    hf_model.train()  # TRL's training mode (the tiny Llama has no dropout)
    pairs = _pairs()
    trl_loss, trl_metrics, trl_grads = _trl_reward(hf_model, pairs, margins, center)

    tuned = jt.apply_plan(jt.load(str(root)), jt.full())
    config = jt.PreferenceConfig(method="reward", center_rewards_coefficient=center)
    loss_fn = make_preference_loss_fn(tuned.module, config, pad_id=reward_pad_id(tuned))
    batch = _batch(pairs, margins=margins)
    assert batch["segment_ids"].max() > 1  # packed: several pairs a row
    paths = {"score": ("head", "out", "kernel"), "embed": ("embed_tokens", "embedding")}
    _assert_trls_loss(loss_fn, tuned.params, batch, (trl_loss, trl_metrics, trl_grads), paths, len(pairs))
    if not margins and center is None:
        # Pooling the trailing EOS itself (the pad id here) would be another model than TRL's and the export's.
        plain = make_preference_loss_fn(tuned.module, config)
        total, n, _ = plain(tuned.params, batch, jax.random.key(0), False)
        assert abs(float(total / n) - trl_loss) > 1e-3


def _assert_trls_loss(loss_fn, params, batch: dict[str, jax.Array], trl: tuple, paths: dict[str, tuple],
                      pairs: int, jit: bool = False) -> None:
    """jaxtune's mean loss of ``batch`` (``pairs`` pairs), the gradients of the ``paths`` (TRL's short
    name: jaxtune's param path) and its metric sums as means equal TRL's ``(loss, metrics, grads)``: the
    loss, the accuracy, margin and reward range TRL logs, the gradients. ``jit``: one compiled program, as
    the train step runs it; for a model of many small ops (DeBERTa's hundreds, each compiled apart when run
    eagerly), where that is faster than eager ops whose compilations the other tests share."""
    trl_loss, trl_metrics, trl_grads = trl

    def mean_loss(params):
        total, n, out = loss_fn(params, batch, jax.random.key(0), False)
        return total / n, out["metrics"]

    value_and_grad = jax.value_and_grad(mean_loss, has_aux=True)
    (loss, sums), grads = (jax.jit(value_and_grad) if jit else value_and_grad)(params)
    np.testing.assert_allclose(float(loss), trl_loss, rtol=1e-5, atol=1e-6)
    grads = flatten_dict(grads)
    for short, path in paths.items():
        assert np.abs(trl_grads[short]).max() > 1e-4
        np.testing.assert_allclose(np.asarray(grads[path]), trl_grads[short], rtol=1e-4, atol=1e-6, err_msg=short)
    assert float(sums["pairs"]) == pairs
    np.testing.assert_allclose(float(sums["rewards/accuracy"]) / pairs, trl_metrics["accuracy"], atol=1e-6)
    np.testing.assert_allclose(float(sums["rewards/margin"]) / pairs, trl_metrics["margin"], rtol=1e-5, atol=1e-6)
    for ours, theirs in (("min", "min_reward"), ("mean", "mean_reward"), ("max", "max_reward")):
        np.testing.assert_allclose(float(sums[f"rewards/{ours}"]) / pairs, trl_metrics[theirs], rtol=1e-5,
                                   atol=1e-6, err_msg=ours)


def test_the_reward_range_over_micro_batches_is_trls_mean_of_their_figures(reward_llama):
    """TRL logs each micro-batch's min/mean/max reward and averages them over the log window; a jaxtune
    step of two micro-batches (two pairs each, packed in one row) reports the same."""
    root, hf_model = reward_llama
    hf_model.train()
    pairs = _pairs(seed=3, n=4)
    halves = [_batch(pairs[:2]), _batch(pairs[2:])]
    assert all(h["segment_ids"].shape[0] == 1 for h in halves)  # one row, two pairs each
    batch = {k: jnp.concatenate([h[k] for h in halves]) for k in halves[0]}
    tuned = jt.apply_plan(jt.load(str(root)), jt.full())
    config = jt.PreferenceConfig(method="reward")
    loss_fn = make_preference_loss_fn(tuned.module, config, pad_id=reward_pad_id(tuned))
    trainable, frozen = partition(tuned.params, tuned.labels)
    step = jax.jit(make_train_step(loss_fn, optax.sgd(0.0), grad_accum_steps=2))
    _, _, metrics = step(trainable, frozen, optax.sgd(0.0).init(trainable), batch, jax.random.key(0))
    sums = metrics["metric_sums"]
    theirs = [_trl_reward(hf_model, half, False, None)[1] for half in (pairs[:2], pairs[2:])]
    assert theirs[0]["min_reward"] != pytest.approx(theirs[1]["min_reward"])  # two different figures averaged
    for ours, name in (("min", "min_reward"), ("mean", "mean_reward"), ("max", "max_reward")):
        np.testing.assert_allclose(float(sums[f"rewards/{ours}"]) / float(sums["pairs"]),
                                   np.mean([m[name] for m in theirs]), rtol=1e-5, atol=1e-6, err_msg=ours)


def test_sgd_steps_of_jaxtunes_train_step_equal_torch_steps_on_trls_loss(reward_llama, tmp_path):
    """Three SGD steps of jaxtune's train step on the reward loss (packed pairs, margins, centring) end
    where three torch SGD steps on TRL's RewardTrainer loss end, from the same weights."""
    root, _ = reward_llama
    hf_model = transformers_model(root)  # a fresh copy: the TRL comparisons above leave gradients on theirs
    hf_model.train()
    tuned = jt.apply_plan(jt.load(str(root)), jt.full())
    config = jt.PreferenceConfig(method="reward", center_rewards_coefficient=0.05)
    loss_fn = make_preference_loss_fn(tuned.module, config, pad_id=reward_pad_id(tuned))
    trainable, frozen = partition(tuned.params, tuned.labels)
    optimizer, lr = optax.sgd(0.2), 0.2
    step = jax.jit(make_train_step(loss_fn, optimizer))
    state = optimizer.init(trainable)
    torch_sgd = torch.optim.SGD(hf_model.parameters(), lr=lr)
    for seed in range(3):
        pairs = _pairs(seed=10 + seed, n=4)
        trainable, state, metrics = step(trainable, frozen, state, _batch(pairs, margins=True), jax.random.key(0))
        torch_sgd.zero_grad()
        loss, _, _ = _trl_reward(hf_model, pairs, True, 0.05)
        torch_sgd.step()
        np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-4, atol=1e-6)
    trained, start = flatten_dict(trainable), flatten_dict(tuned.params)
    for key in (("head", "out", "kernel"), ("embed_tokens", "embedding")):  # moved well past the tolerance
        assert np.abs(np.asarray(trained[key]) - np.asarray(start[key])).max() > 1e-2
    np.testing.assert_allclose(np.asarray(trained[("head", "out", "kernel")]), hf_model.score.weight.detach().numpy().T,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(trained[("embed_tokens", "embedding")]),
                               hf_model.model.embed_tokens.weight.detach().numpy(), rtol=1e-4, atol=5e-5)


def transformers_model(root: Path) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForSequenceClassification.from_pretrained(root)


# ----------------------------------------------------------------------------- runs

STEPS, BATCH, LENGTH = 8, 8, 64
OPTIMIZER = dict(learning_rate=1e-2, schedule="constant")  # constant: a run cut at step 2 has the same lr
REWARD = dict(method="reward", center_rewards_coefficient=0.01)


def _plain_rows(n: int, seed: int) -> list[dict]:
    """Plain-text pairs (answers end with EOS, which this tokenizer also pads with) with a pattern a
    tiny model learns, every other one with a margin."""
    rows = []
    for i, row in enumerate(synthetic_preference_rows(n, seed=seed)):
        rows.append({"prompt": row["prompt"][0]["content"] + " ->", "chosen": " " + row["chosen"][0]["content"],
                     "rejected": " " + row["rejected"][0]["content"], **({"margin": 0.5} if i % 2 else {})})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward")
    tiny_hf_model("LlamaForCausalLM", root / "llama")
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as many chat models' tokenizers: the reward pools before it
    tokenizer.save_pretrained(root / "llama")
    return {"model": root / "llama",
            "train": write_jsonl(root / "train.jsonl", _plain_rows(32, seed=0)),
            "valid": write_jsonl(root / "valid.jsonl", _plain_rows(16, seed=1))}


def _plan() -> jt.Plan:
    return jt.lora(rank=4, alpha=8) + jt.head("regression")


def _python_run(files: dict[str, Path], run_dir: Path, steps: int = STEPS) -> jt.FitResult:
    """The Python API's reward-model run."""
    train, _ = jt.read(files["train"], kind="preference")
    valid, _ = jt.read(files["valid"], kind="preference")
    tuned = jt.apply_plan(jt.load(str(files["model"])), _plan())
    return jt.Trainer(tuned, train, valid, run_dir=run_dir, config=jt.TrainConfig(steps=steps, log_every=2),
                      data=jt.DataConfig(batch_size=BATCH, max_length=LENGTH),
                      optimizer=jt.OptimizerConfig(**OPTIMIZER), preference=jt.PreferenceConfig(**REWARD)).fit()


@pytest.fixture(scope="module")
def python_run(files, tmp_path_factory) -> tuple[jt.FitResult, Path]:
    run_dir = tmp_path_factory.mktemp("python") / "run"
    return _python_run(files, run_dir), run_dir


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_reward_run_learns_and_reports_reward_accuracy_and_margin(python_run):
    result, run_dir = python_run
    before, after = result.before, result.after
    assert set(before) >= {"loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected"}
    assert not any(k.startswith("logps/") for k in after)  # a reward model has no log-probs
    # (the base's fresh head may already order these easy pairs; the loss and the margin show the learning)
    assert after["loss"] < before["loss"] / 2 and after["rewards/accuracy"] >= 0.9
    assert after["rewards/margin"] > before["rewards/margin"] + 1
    train = [r for r in _records(run_dir) if "loss" in r and "step" in r and "grad_norm" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert all({"rewards/accuracy", "rewards/margin"} <= set(r) for r in train)
    assert "rewards/accuracy" in result.report
    assert set(after) >= {"rewards/min", "rewards/mean", "rewards/max"}  # TRL's min/mean/max_reward
    assert after["rewards/min"] <= after["rewards/mean"] <= after["rewards/max"]
    assert all({"rewards/min", "rewards/mean", "rewards/max"} <= set(r) for r in train)
    # A reward model's scores only count against each other: their level has no better or worse, the
    # margin and accuracy do.
    rows = {line.split("|")[1].strip(): line for line in result.report.splitlines() if line.startswith("| rewards/")}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/min", "rewards/mean", "rewards/max"):
        assert not rows[name].rstrip(" |").endswith(("better", "worse")), rows[name]
    assert rows["rewards/margin"].rstrip(" |").endswith("better")
    assert result.model.task == "regression" and result.model.hf_architecture == "LlamaForSequenceClassification"


def test_a_stopped_reward_run_continues_exactly(files, python_run, tmp_path):
    """Stopped at step 2, then continued: the same params and metrics as the uninterrupted run."""
    straight, straight_dir = python_run
    assert _python_run(files, tmp_path / "cut", steps=2).step == 2
    resumed = _python_run(files, tmp_path / "cut")
    assert resumed.step == straight.step == STEPS
    assert resumed.after == pytest.approx(straight.after, rel=1e-6, abs=1e-7)
    for a, b in zip(jax.tree.leaves(resumed.model.params), jax.tree.leaves(straight.model.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _validation_ids(files: dict[str, Path]) -> list[tuple[list[int], list[int]]]:
    """Each validation pair's (chosen, rejected) token ids, as the run tokenized them."""
    valid, _ = jt.read(files["valid"], kind="preference")
    encode = TokenizePairs(jt.load(str(files["model"])).tokenizer, LENGTH)
    return [tuple(p[s]["input_ids"].tolist() for s in ("chosen", "rejected")) for i in range(len(valid))
            for p in encode(valid[i])]


def _hf_scores(model: torch.nn.Module, sequences: list[list[int]], pad: int) -> np.ndarray:
    """transformers' scores of right-padded sequences (the last token that is not ``pad`` pooled)."""
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()


def test_the_merged_export_scores_as_jaxtune_evaluates(files, python_run, tmp_path):
    """The export is a LlamaForSequenceClassification with num_labels=1; transformers' scores of the
    held-out pairs give the reward accuracy and margin jaxtune's evaluation reported."""
    import transformers

    result, _ = python_run
    out = jt.export(result.model, tmp_path / "merged", format="merged")
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] == EOS  # the tokenizer pads with EOS: transformers pools the token before it
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    pairs = _validation_ids(files)
    assert all(c[-1] == EOS for c, _ in pairs)
    scores = _hf_scores(model, [s for pair in pairs for s in pair], EOS).reshape(-1, 2)
    np.testing.assert_allclose(np.mean(scores[:, 0] > scores[:, 1]), result.after["rewards/accuracy"], atol=1e-6)
    np.testing.assert_allclose(np.mean(scores[:, 0] - scores[:, 1]), result.after["rewards/margin"], atol=1e-4)
    np.testing.assert_allclose(np.mean(scores[:, 0]), result.after["rewards/chosen"], atol=1e-4)


def test_the_peft_export_keeps_the_score_head_and_scores_as_jaxtune(files, python_run, tmp_path):
    """A LoRA plan's export: a PEFT adapter with the score head in modules_to_save, which peft loads
    on the base's LlamaForSequenceClassification (num_labels=1) with jaxtune's scores."""
    import peft
    import transformers

    result, _ = python_run
    out = Path(jt.export(result.model, tmp_path / "adapter", format="peft"))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["score"] and adapter["task_type"] == "SEQ_CLS"
    base = transformers.AutoModelForSequenceClassification.from_pretrained(files["model"], num_labels=1,
                                                                           pad_token_id=EOS)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    sequences = [s for pair in _validation_ids(files) for s in pair]
    theirs = _hf_scores(model, sequences, EOS)
    rows = pair_rows([{"chosen": {"input_ids": np.asarray(s, np.int32), "loss_mask": np.ones(len(s), bool)},
                       "rejected": {"input_ids": np.asarray(s, np.int32), "loss_mask": np.ones(len(s), bool)}}
                      for s in sequences], LENGTH, EOS, pack=False)
    batch = {k: jnp.asarray(np.stack([r[k][0] for r in rows])) for k in ("input_ids", "segment_ids", "positions")}
    ours = reward_scores(result.model.module, result.model.params, batch, 1, pad_id=EOS)[:, 0]
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


# ----------------------------------------------------------------------------- data


def test_margins_ride_with_their_pairs_through_packed_batches(files):
    """Each row's margin (TRL's optional column; 0 without) reaches every token of its pair's segments,
    on both sides, in shuffled packed training batches."""
    source, _ = jt.read(files["train"], kind="preference")
    assert [source[i]["margin"] for i in range(4)] == [0.0, 0.5, 0.0, 0.5]
    loader = training_loader(source, jt.load(str(files["model"])).tokenizer,
                             LoaderConfig(batch_size=4, max_length=LENGTH, pad_to_multiple_of=16))
    batch = next(iter(loader))
    assert batch[MARGINS].shape == batch["segment_ids"].shape and batch[MARGINS].dtype == np.float32
    assert set(loader.batch_spec()) == set(batch)
    expected = np.where(batch[PAIR_IDS] > 0, np.where(batch[PAIR_IDS] % 2 == 0, 0.5, 0.0), 0.0)  # row i: id i + 1
    np.testing.assert_array_equal(batch[MARGINS], expected)
    assert batch["segment_ids"].max() > 1 and (batch[MARGINS] > 0).any()


@pytest.mark.parametrize("margin", ['"high"', "true", "NaN", "[1]"])
def test_a_bad_margin_names_its_line(tmp_path, margin):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                    f'{{"prompt": "a", "chosen": "b", "rejected": "c", "margin": {margin}}}\n')
    with pytest.raises(DataError) as err:
        jt.read(path, kind="preference")
    message = str(err.value)
    assert "\n" not in message and f"{path}:2:" in message
    assert "'margin' is" in message and "not a finite number" in message


# ----------------------------------------------------------------------------- errors


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_reward_method_without_a_scalar_head_gets_one_line_errors(files, tmp_path):
    pairs, _ = jt.read(files["train"], kind="preference")
    base = jt.load(str(files["model"]))
    reward = jt.PreferenceConfig("reward")
    cases = [(jt.lora(rank=4, alpha=8), "preference.method: reward scores each answer with a scalar head, but the "
              "plan makes a language model (no head); add {action: head, task: regression} to the plan"),
             (jt.lora(rank=4, alpha=8) + jt.head("classification", num_labels=2),
              "preference.method: reward scores each answer with a scalar head, but the plan makes a classification "
              "model"),
             (jt.lora(rank=4, alpha=8) + jt.head("regression", num_labels=2),
              "plan: the reward model's head has 2 outputs, but a reward is one number; drop num_labels")]
    for plan, expected in cases:
        with pytest.raises(ValueError) as err:
            jt.Trainer(jt.apply_plan(base, plan), pairs, run_dir=tmp_path / "run", preference=reward,
                       data=jt.DataConfig(batch_size=BATCH, max_length=LENGTH), mesh=MeshConfig())
        assert _one_line(err).startswith(expected), str(err.value)
    for kwargs, expected in ((dict(beta=0.1), "preference.beta: the reward method has no beta"),
                             (dict(center_rewards_coefficient=-1.0), "preference.center_rewards_coefficient: must be "
                              ">= 0"),
                             (dict(reference="cached"), "preference.reference: reward needs no reference model")):
        with pytest.raises(ValueError) as err:
            jt.PreferenceConfig("reward", **kwargs)
        assert _one_line(err).startswith(expected), str(err.value)
    # logps/accuracy is never reported, and a score's level (rewards/chosen) is neither better nor worse:
    # accepted, either would pick the best checkpoint by nothing, without a word
    for metric in ("logps/accuracy", "rewards/chosen"):
        with pytest.raises(ValueError) as err:
            jt.Trainer(jt.apply_plan(base, _plan()), pairs, pairs, run_dir=tmp_path / "run", preference=reward,
                       eval=jt.EvalConfig(every=2, best_metric=metric), mesh=MeshConfig(),
                       data=jt.DataConfig(batch_size=BATCH, max_length=LENGTH))
        assert _one_line(err) == ("eval.best_metric: expected one of loss, rewards/accuracy, rewards/margin for a "
                                  "reward model (its scores' level is neither better nor worse), got "
                                  f"'{metric}'")
    with pytest.raises(ValueError) as err:
        jt.PreferenceConfig("dpo", center_rewards_coefficient=0.1)
    assert _one_line(err).startswith("preference.center_rewards_coefficient: applies to method reward, not dpo")


def test_reward_recipes_without_a_scalar_head_get_one_line_errors(files, tmp_path):
    recipe = {"model": {"path": str(files["model"])},
              "plan": [{"preset": "lora", "rank": 4, "alpha": 8}, {"action": "head", "task": "regression"}],
              "data": {"train": str(files["train"]), "kind": "preference", "batch_size": BATCH,
                       "max_length": LENGTH},
              "preference": REWARD, "train": {"steps": 1}, "output": {"dir": str(tmp_path / "run")}}
    cases = [({"plan": [{"preset": "lora", "rank": 4, "alpha": 8}]},
              "plan: preference.method reward trains a scalar head; add {action: head, task: regression} to the plan"),
             ({"plan": [{"action": "head", "task": "classification"}]},
              "plan: preference.method reward trains a scalar head; add {action: head, task: regression} to the plan "
              "(its head's task is classification)"),
             ({"preference": {"method": "reward", "center_rewards_coeficient": 0.1}},
              "unknown key 'center_rewards_coeficient' in preference"),
             ({"preference": {"method": "reward", "beta": 0.1}}, "preference.beta: the reward method has no beta")]
    for change, expected in cases:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**recipe, **change}))
        with pytest.raises(ConfigError) as err:
            jt.finetune(jt.load_config(tmp_path / "bad.yaml"))
        assert expected in _one_line(err), (change, str(err.value))


# ----------------------------------------------------------------------------- predict


def _cli(*argv: object) -> tuple[int, str, str]:
    from jaxtune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_predict_scores_each_answer_as_transformers_scores_the_export(files, python_run, tmp_path):
    """``jt.predict`` of a pairs file with a reward model (in memory, or its merged export) gives each
    answer's reward: transformers' score of that conversation."""
    import transformers

    result, _ = python_run
    out = jt.export(result.model, tmp_path / "merged", format="merged")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    theirs = _hf_scores(model, [s for pair in _validation_ids(files) for s in pair], EOS).reshape(-1, 2)
    valid = [json.loads(line) for line in files["valid"].read_text().splitlines()]
    for target in (result.model, out):
        rows = jt.predict(target, files["valid"], max_length=LENGTH)
        assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
            (v["prompt"], v["chosen"], v["rejected"]) for v in valid]
        ours = np.asarray([[r["chosen_reward"], r["rejected_reward"]] for r in rows])
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    with pytest.raises(ConfigError) as err:
        jt.predict(result.model, files["valid"], text_field="text")
    assert _one_line(err).startswith("text_field='text': names a field of labeled rows, but")


def test_a_reward_recipe_trains_predicts_and_refuses_pairs_for_other_heads(files, tmp_path):
    """The recipe of the Python run: a run directory that ``jaxtune predict`` scores pairs with, as the
    run's evaluation did; a classifier's run refuses a pairs file in one line."""
    recipe = {"model": {"path": str(files["model"])},
              "plan": [{"preset": "lora", "rank": 4, "alpha": 8}, {"action": "head", "task": "regression"}],
              "data": {"train": str(files["train"]), "validation": str(files["valid"]), "kind": "preference",
                       "batch_size": BATCH, "max_length": LENGTH},
              "preference": REWARD, "optimizer": OPTIMIZER, "train": {"steps": 4, "progress": False},
              "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "reward.yaml").write_text(yaml.safe_dump(recipe))
    result = jt.finetune(jt.load_config(tmp_path / "reward.yaml"))
    assert (Path(result.export) / "adapter_config.json").is_file()
    code, out, err = _cli("predict", tmp_path / "run", files["valid"])
    assert code == 0, err
    rewards = np.asarray([[r["chosen_reward"], r["rejected_reward"]] for r in map(json.loads, out.splitlines())])
    assert rewards.shape == (16, 2)
    np.testing.assert_allclose(np.mean(rewards[:, 0] > rewards[:, 1]), result.after["rewards/accuracy"])
    np.testing.assert_allclose(np.mean(rewards[:, 0] - rewards[:, 1]), result.after["rewards/margin"], atol=1e-5)
    classifier = jt.apply_plan(jt.load(str(files["model"])), jt.lora(rank=4, alpha=8) + jt.head(num_labels=2))
    with pytest.raises(ConfigError) as err:
        jt.predict(classifier, files["valid"])
    assert _one_line(err).endswith("preference pairs (prompt, chosen, rejected), which a reward model (one regression "
                                   "output: preference.method reward) scores; this is a classification model; give a "
                                   "file of labeled rows")


def test_predict_scores_a_conversation_as_trl_tokenizes_it_and_transformers_scores_it(files, python_run, tmp_path):
    """A file of conversations (chat rows) with a reward model: each conversation's reward, the score
    transformers gives the merged export for TRL's tokenization of it (its chat template, whole), and
    the reward predict gives the same answer in a pair."""
    import transformers
    from trl.data_utils import _tokenize

    result, _ = python_run
    out = jt.export(result.model, tmp_path / "merged", format="merged")
    rows = synthetic_preference_rows(6, seed=3)
    chats = [{"messages": r["prompt"] + r["chosen"]} for r in rows]
    write_jsonl(tmp_path / "chats.jsonl", chats)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    scored = jt.predict(result.model, tmp_path / "chats.jsonl", max_length=LENGTH)
    assert [r["messages"] for r in scored] == [c["messages"] for c in chats]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    theirs = _hf_scores(model, [_tokenize(tokenizer, c["messages"])["input_ids"] for c in chats], EOS)
    np.testing.assert_allclose([r["reward"] for r in scored], theirs, atol=1e-4)
    pairs = jt.predict(result.model, tmp_path / "pairs.jsonl", max_length=LENGTH)
    np.testing.assert_allclose([r["chosen_reward"] for r in pairs], [r["reward"] for r in scored], atol=1e-6)
    write_jsonl(tmp_path / "bad.jsonl", [chats[0], {"messages": chats[1]["messages"] + rows[2]["prompt"]}])
    with pytest.raises(DataError) as err:
        jt.predict(result.model, tmp_path / "bad.jsonl")
    assert _one_line(err).startswith(f"{tmp_path / 'bad.jsonl'}:2: the conversation ends with a user turn, but a "
                                     "reward model scores the answer that closes it")


def test_a_reward_models_report_marks_only_its_margin_and_accuracy_better_or_worse():
    """A reward model's scores count only against each other: their level moving (chosen, rejected, the
    range) is neither better nor worse; a DPO policy's chosen reward rising is better."""
    from jaxtune.training.evaluate import comparison_table

    before = {"loss": 0.7, "rewards/accuracy": 0.5, "rewards/margin": 0.1, "rewards/chosen": 0.2,
              "rewards/rejected": 0.1, "rewards/min": -1.0, "rewards/mean": 0.15, "rewards/max": 1.0}
    after = {k: v + 0.5 for k, v in before.items()}
    after.update({"loss": 0.3, "rewards/accuracy": 0.9})

    def marks(table: str) -> dict[str, str]:
        cells = [line.strip(" |").split(" | ") for line in table.splitlines() if line.startswith("| ")]
        return {row[0]: row[-1].split()[-1] for row in cells[1:]}

    reward = marks(comparison_table(before, after, reward_model=True))
    assert {k: reward[k] for k in ("loss", "rewards/accuracy", "rewards/margin")} == dict.fromkeys(
        ("loss", "rewards/accuracy", "rewards/margin"), "better")
    for name in ("rewards/chosen", "rewards/rejected", "rewards/min", "rewards/mean", "rewards/max"):
        assert reward[name] == "+0.5000", name  # the change alone
    dpo = marks(comparison_table(before, after))
    assert (dpo["rewards/chosen"], dpo["rewards/rejected"]) == ("better", "worse")


# ----------------------------------------------------------------------------- encoders

ENCODER_LENGTH = 60  # inside the tiny encoders' 64 positions (RoBERTa's start after its pad id)


def _bert_tokenizer():
    """BERT's WordPiece tokenizer over single characters: lower-cased ``[CLS] text [SEP]``, pad ``[PAD]``
    and no EOS token, as bert-base-uncased's."""
    import string

    import transformers

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    return transformers.BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})


def _roberta_tokenizer():
    """The character tokenizer closing each text as RoBERTa's does: ``<s> text </s>``, EOS ``</s>``."""
    from tokenizers import processors

    tokenizer = tiny_tokenizer(None)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 2), ("</s>", EOS)])
    return tokenizer


def _no_dropout_bert(root: Path) -> torch.nn.Module:
    return tiny_hf_model("BertForSequenceClassification", root, vocab_size=141, num_labels=1, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, randomize=True)


def _no_dropout_roberta(root: Path) -> torch.nn.Module:
    return tiny_encoder("RobertaForSequenceClassification", root, vocab_size=105, pad_token_id=0, type_vocab_size=1,
                        num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=64)


def _no_dropout_distilbert(root: Path) -> torch.nn.Module:
    return tiny_encoder("DistilBertForSequenceClassification", root, vocab_size=141, num_labels=1, dropout=0.0,
                        attention_dropout=0.0, seq_classif_dropout=0.0, max_position_embeddings=64)


def _mean_pooling_modernbert(root: Path) -> torch.nn.Module:
    """ModernBERT (no dropout by default) pooling the mean of its tokens, with BERT's special ids."""
    return tiny_modernbert("ModernBertForSequenceClassification", root, vocab_size=141, num_labels=1,
                           classifier_pooling="mean", global_attn_every_n_layers=2, local_attention=4,
                           bos_token_id=2, cls_token_id=2, eos_token_id=3, sep_token_id=3)


# name: (random classifier saved to a folder, tokenizer, {short name: HF parameter of a gradient compared})
ENCODERS = {
    "bert": (_no_dropout_bert, _bert_tokenizer,
             {"head": "classifier.weight", "embed": "bert.embeddings.word_embeddings.weight"}),
    "roberta": (_no_dropout_roberta, _roberta_tokenizer,
                {"head": "classifier.out_proj.weight", "embed": "roberta.embeddings.word_embeddings.weight"}),
    "distilbert": (_no_dropout_distilbert, _bert_tokenizer,
                   {"head": "classifier.weight", "embed": "distilbert.embeddings.word_embeddings.weight"}),
    "modernbert": (_mean_pooling_modernbert, _bert_tokenizer,
                   {"head": "classifier.weight", "embed": "model.embeddings.tok_embeddings.weight"}),
}
JAXTUNE_EMBEDDINGS = {"modernbert": ("embeddings", "tok_embeddings", "embedding")}


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def reward_encoder(request, tmp_path_factory) -> SimpleNamespace:
    """A random ``*ForSequenceClassification`` encoder with one output and no dropout (so TRL's training
    mode is deterministic), saved with its family's kind of tokenizer."""
    build, make_tokenizer, weights = ENCODERS[request.param]
    root = tmp_path_factory.mktemp(f"reward_{request.param}")
    model = build(root)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(root)
    paths = {"head": ("head", "out", "kernel"),
             "embed": JAXTUNE_EMBEDDINGS.get(request.param, ("embeddings", "word_embeddings", "embedding"))}
    return SimpleNamespace(name=request.param, root=root, model=model, tokenizer=tokenizer, weights=weights,
                           paths=paths)


def _trl_tokenized(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Each plain row's (chosen, rejected) token ids as TRL's RewardTrainer prepares its dataset:
    ``tokenizer(prompt + answer + eos_token)``, the tokenizer's special tokens included. On a tokenizer
    without an EOS token (BERT's) TRL's add-EOS step fails (``str.endswith(None)``): its tokenization
    of the rest is ``tokenizer(prompt + answer)``."""
    import datasets
    from trl.data_utils import _tokenize
    from trl.trainer.reward_trainer import RewardTrainer

    if tokenizer.eos_token is None:
        return [tuple(_tokenize(tokenizer, r["prompt"] + r[side])["input_ids"] for side in ("chosen", "rejected"))
                for r in rows]
    data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    prepared = RewardTrainer._prepare_dataset(object.__new__(RewardTrainer), data, tokenizer,
                                              SimpleNamespace(dataset_num_proc=None, max_length=None), "train")
    return [(p["chosen_ids"], p["rejected_ids"]) for p in prepared]


def _encoder_pairs(tokenizer, rows: list[dict]) -> list[dict]:
    """jaxtune's tokenized pairs of plain rows (the loader's :class:`TokenizePairs`), margins included."""
    encode = TokenizePairs(tokenizer, ENCODER_LENGTH)
    return [p for i, r in enumerate(rows) for p in encode({**r, "margin": r.get("margin", 0.0), "index": i})]


def test_encoder_pairs_are_the_tokens_trls_reward_trainer_makes(reward_encoder):
    """An encoder reads each answer as its tokenizer writes the whole text: BERT's (DistilBERT's,
    ModernBERT's) ``[CLS] prompt answer [SEP]`` (no EOS token to add), RoBERTa's ``<s> prompt
    answer</s></s>`` (TRL's EOS, then the closing ``</s>``), exactly TRL's token ids."""
    tokenizer = reward_encoder.tokenizer
    rows = _plain_rows(6, seed=5)
    ours = [tuple(p[side]["input_ids"].tolist() for side in ("chosen", "rejected"))
            for p in _encoder_pairs(tokenizer, rows)]
    assert ours == _trl_tokenized(tokenizer, rows)
    opening, closing = ((tokenizer.cls_token_id, [tokenizer.sep_token_id]) if tokenizer.eos_token is None else
                        (tokenizer.bos_token_id, [EOS, EOS]))
    assert all(ids[0] == opening and ids[-len(closing):] == closing for pair in ours for ids in pair)


def test_a_truncated_encoder_pair_ends_as_the_tokenizer_truncates_it():
    """``truncation: right`` on an encoder's pair keeps ``[SEP]`` last on the cut side, as
    ``tokenizer(prompt + answer, truncation=True)`` does (the classifier's input at inference, and
    jaxtune's own for labeled rows); the other side stays whole, and a pair whose answer would be
    cut off entirely is dropped rather than kept as ``[CLS] prompt [SEP]``."""
    tokenizer = _bert_tokenizer()
    record = {"prompt": "a long prompt here", "chosen": " a much longer answer", "rejected": " no", "margin": 0.0}
    pairs, status, length = TokenizePairs(tokenizer, 20).encode(record)
    assert status == "truncated" and length > 20
    for side in ("chosen", "rejected"):
        theirs = tokenizer(record["prompt"] + record[side], truncation=True, max_length=20)["input_ids"]
        assert pairs[0][side]["input_ids"].tolist() == theirs, side
    prompt = len(tokenizer(record["prompt"])["input_ids"]) - 1  # [CLS] and the prompt's tokens
    assert TokenizePairs(tokenizer, prompt + 1).encode(record)[:2] == ([], "dropped")


def test_encoder_reward_loss_and_gradients_equal_trls_reward_trainer(reward_encoder):
    """BERT, RoBERTa, DistilBERT and ModernBERT (mean pooling) reward models: jaxtune's loss of packed
    pairs (its tokens, margins, centring), its gradients and its metrics equal TRL's
    RewardTrainer.compute_loss on TRL's own tokens."""
    hf_model = reward_encoder.model
    hf_model.train()  # TRL's training mode (no dropout in these)
    rows = _plain_rows(6, seed=5)
    trl_ids = _trl_tokenized(reward_encoder.tokenizer, rows)
    trl_pairs = [{"chosen": {"input_ids": np.asarray(c)}, "rejected": {"input_ids": np.asarray(r)},
                  "margin": row.get("margin", 0.0)} for (c, r), row in zip(trl_ids, rows, strict=True)]
    trl_loss, trl_metrics, trl_grads = _trl_reward(hf_model, trl_pairs, True, 0.05,
                                                   pad_id=reward_encoder.tokenizer.pad_token_id,
                                                   weights=reward_encoder.weights)

    tuned = jt.apply_plan(jt.load(str(reward_encoder.root)), jt.full())
    assert reward_pad_id(tuned) is None  # an encoder pools its first token, not the last
    config = jt.PreferenceConfig(method="reward", center_rewards_coefficient=0.05)
    loss_fn = make_preference_loss_fn(tuned.module, config, pad_id=reward_pad_id(tuned))
    pairs = _encoder_pairs(reward_encoder.tokenizer, rows)
    batch = _batch(pairs, length=2 * ENCODER_LENGTH, margins=True)
    assert batch["segment_ids"].max() > 1  # packed: several pairs a row
    _assert_trls_loss(loss_fn, tuned.params, batch, (trl_loss, trl_metrics, trl_grads), reward_encoder.paths,
                      len(pairs))


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory) -> dict[str, Path]:
    """A bare random BertModel with BERT's kind of tokenizer, and plain training and validation pairs."""
    root = tmp_path_factory.mktemp("reward_bert")
    tiny_hf_model("BertModel", root / "bert", vocab_size=141)
    _bert_tokenizer().save_pretrained(root / "bert")
    return {"model": root / "bert", "train": write_jsonl(root / "train.jsonl", _plain_rows(16, seed=0)),
            "valid": write_jsonl(root / "valid.jsonl", _plain_rows(8, seed=1))}


def test_an_encoder_reward_model_exports_and_predicts_as_transformers_scores(bert_files, tmp_path):
    """A reward run on a bare BERT (LoRA + a regression head): its merged export is a
    BertForSequenceClassification with one output and its PEFT adapter loads on the base's; transformers
    scores ``tokenizer(prompt + answer)`` of each held-out answer as jaxtune's evaluation and ``predict``
    (in memory and on the export) do."""
    import peft
    import transformers

    train, _ = jt.read(bert_files["train"], kind="preference")
    valid, _ = jt.read(bert_files["valid"], kind="preference")
    result = jt.Trainer(jt.apply_plan(jt.load(str(bert_files["model"])), _plan()), train, valid,
                        run_dir=tmp_path / "run", config=jt.TrainConfig(steps=4, progress=False),
                        data=jt.DataConfig(batch_size=BATCH, max_length=ENCODER_LENGTH),
                        optimizer=jt.OptimizerConfig(**OPTIMIZER), preference=jt.PreferenceConfig(**REWARD)).fit()
    merged = jt.export(result.model, tmp_path / "merged", format="merged")
    config = json.loads((Path(merged) / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 1
    rows = [json.loads(line) for line in bert_files["valid"].read_text().splitlines()]
    texts = [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    adapter = Path(jt.export(result.model, tmp_path / "adapter", format="peft"))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(bert_files["model"], num_labels=1)
    for model in (transformers.AutoModelForSequenceClassification.from_pretrained(merged),
                  peft.PeftModel.from_pretrained(base, adapter)):
        with torch.no_grad():
            theirs = model.eval()(**inputs).logits[:, 0].numpy().reshape(-1, 2)
        np.testing.assert_allclose(np.mean(theirs[:, 0] > theirs[:, 1]), result.after["rewards/accuracy"], atol=1e-6)
        np.testing.assert_allclose(np.mean(theirs[:, 0] - theirs[:, 1]), result.after["rewards/margin"], atol=1e-4)
    for target in (result.model, merged):
        predicted = jt.predict(target, bert_files["valid"], max_length=ENCODER_LENGTH)
        ours = np.asarray([[r["chosen_reward"], r["rejected_reward"]] for r in predicted])
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_language_model_methods_on_an_encoder_point_to_a_reward_model(bert_files, tmp_path):
    """DPO (or IPO, SimPO, ORPO) on an encoder, with a head rule or without, from the Trainer, a recipe
    or plan-memory: one line naming preference.method and the way out (a reward model), not the plan's
    advice to add or drop a head."""
    pairs, _ = jt.read(bert_files["train"], kind="preference")
    expected = ("preference.method: {} tunes a language model, but BertModel is an encoder, which has none; to learn "
                "from the pairs, train a reward model: preference.method: reward and {{action: head, task: "
                "regression}} in the plan")
    tuned = jt.apply_plan(jt.load(str(bert_files["model"])), _plan())
    for method in ("dpo", "orpo"):
        with pytest.raises(ValueError) as err:
            jt.Trainer(tuned, pairs, run_dir=tmp_path / "run", preference=jt.PreferenceConfig(method),
                       data=jt.DataConfig(batch_size=4, max_length=ENCODER_LENGTH), mesh=MeshConfig())
        assert _one_line(err) == expected.format(method)
    recipe = {"model": {"path": str(bert_files["model"])}, "plan": [{"preset": "lora", "rank": 4, "alpha": 8}],
              "data": {"train": str(bert_files["train"]), "kind": "preference", "batch_size": 4,
                       "max_length": ENCODER_LENGTH},
              "preference": {"method": "dpo"}, "train": {"steps": 1}, "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(recipe))
    for run in (jt.finetune, plan_memory):  # jaxtune train and jaxtune plan-memory
        with pytest.raises(ConfigError) as err:
            run(jt.load_config(tmp_path / "dpo.yaml"))
        assert _one_line(err) == expected.format("dpo"), run
