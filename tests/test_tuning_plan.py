"""Plans: data round trip, presets, labels by path/block/kind, override order, errors, partition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax.traverse_util import flatten_dict
from helpers import tiny_hf_model, tiny_random_model

from jaxtune import tuning
from jaxtune.models import hf, stacking
from jaxtune.tuning import PlanError


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    """A 4-block Qwen3 (q/k norms inside attention) so that block ranges and kinds are visible."""
    path = tmp_path_factory.mktemp("qwen3")
    tiny_hf_model("Qwen3ForCausalLM", path, num_hidden_layers=4)
    return hf.load_pretrained(path)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    tiny_hf_model("BertModel", path)
    return hf.load_pretrained(path)


def trainable(tuned: tuning.Tuned) -> dict[str, str]:
    labels = stacking.unstack(tuned.labels)  # the per-layer view plans are written in
    return {"/".join(p): label for p, label in flatten_dict(labels).items() if label != "freeze"}


def test_plan_is_plain_data_and_round_trips_through_yaml():
    plan = (tuning.lora(rank=8, alpha=16, targets=["q_proj", "v_proj"], dropout=0.05)
            + tuning.train(kinds=["norms"]) + tuning.freeze_all_but(last_n_blocks=2)
            + tuning.prompt_tuning(4, init="text", text="Classify:") + tuning.head("regression", hidden=[32]))
    data = plan.to_data()
    again = tuning.Plan.from_data(yaml.safe_load(yaml.safe_dump(data)))
    assert again == plan and again.to_data() == data
    assert data[0] == {"action": "lora", "targets": ["q_proj", "v_proj"], "rank": 8, "alpha": 16.0,
                       "dropout": 0.05, "rslora": False}
    assert tuning.Plan.from_data({"rules": data}) == plan


@pytest.mark.parametrize(("make", "message"), [
    (lambda: tuning.lora(match=5), r"match: expected a string or null, got 5$"),
    (lambda: tuning.train(["q"]), r"match: expected a string or null, got \['q'\]$"),
    (lambda: tuning.lora(alpha="x"), r"alpha: expected a number or null, got 'x'$"),
    (lambda: tuning.prompt_tuning(4, init="text", text=5), r"text: expected a string or null, got 5$"),
    (lambda: tuning.head(hidden=["wide"]), r"hidden\[0\]: expected an integer, got 'wide'$"),
    (lambda: tuning.Plan.from_data([{"action": "lora", "rslora": "yes"}]),
     r"^plan rule #0 .*rslora: expected true or false or null, got 'yes'$"),
])
def test_a_rule_option_of_the_wrong_type_is_named(make, message):
    """Options are type-checked as a recipe's values are: a wrong type failed deep inside (``re``,
    ``float()``, a set of kinds) or, for a prompt's text, not at all."""
    with pytest.raises(PlanError, match=message):
        make()


def test_a_list_of_plans_is_their_sum():
    """A list of rules or rule dicts is a plan, but a list of plans failed with the list's repr."""
    from jaxtune.tuning.plan import as_plan

    lora, norms = tuning.lora(4), tuning.train("norm")
    assert as_plan([lora, norms]) == lora + norms
    assert as_plan([lora, *norms.rules]) == lora + norms
    assert lora + [norms] == lora + norms


def test_freeze_all_but_last_blocks_trains_the_output_end(llama4):
    tuned = tuning.apply_plan(llama4, tuning.freeze_all_but(last_n_blocks=2))
    names = set(trainable(tuned))
    every = {"/".join(p) for p in flatten_dict(stacking.unstack(llama4.params))}
    assert names == {p for p in every if p.startswith(("layers_2/", "layers_3/", "norm/", "lm_head/"))}
    assert set(trainable(tuned).values()) == {"train"}


def test_freeze_all_but_as_data_trains_the_output_end_too(llama4):
    """The YAML form is the preset: the output rule it adds still trains the final norm and LM head."""
    as_data = tuning.Plan.from_data([{"preset": "freeze_all_but", "last_n_blocks": 2}])
    assert trainable(tuning.apply_plan(llama4, as_data)) == trainable(
        tuning.apply_plan(llama4, tuning.freeze_all_but(last_n_blocks=2)))
    assert {"norm/scale", "lm_head/kernel"} <= set(trainable(tuning.apply_plan(llama4, as_data)))


ENDS_AT_LAST_BLOCK = {  # bodies with no final norm, LM head or pooler after their last block
    "DistilBertModel": dict(vocab_size=96, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=40),
    "RobertaForSequenceClassification": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=40, pad_token_id=1),
}


@pytest.mark.parametrize("architecture", sorted(ENDS_AT_LAST_BLOCK))
def test_freeze_all_but_on_a_body_that_ends_at_its_last_block(architecture, tmp_path):
    """The preset's own output rule matched nothing there and failed a plan the user never wrote it in;
    a rule the user writes that matches nothing still fails, and says how to fix it."""
    config_class = "DistilBertConfig" if architecture.startswith("DistilBert") else None
    tiny_random_model(architecture, tmp_path, ENDS_AT_LAST_BLOCK[architecture], config_class=config_class)
    model = hf.load_pretrained(tmp_path)
    as_python = tuning.freeze_all_but(1) + tuning.head("classification", 2)
    as_data = tuning.Plan.from_data([{"preset": "freeze_all_but", "last_n_blocks": 1},
                                     {"preset": "head", "task": "classification", "num_labels": 2}])
    for plan in (as_python, as_data):
        assert {p.split("/")[0] for p in trainable(tuning.apply_plan(model, plan))} == {"layer_1", "head"}
    written = tuning.Plan.from_data([{"preset": "freeze_all_but", "last_n_blocks": 1, "train_output": False},
                                     {"action": "train", "kinds": ["output"]}])
    with pytest.raises(PlanError, match=r"^plan rule #1 \{'action': 'train', 'kinds': \['output'\]\} matches no "
                                        r"parameter; this model has nothing after its last block .*: drop the rule, "
                                        r"or give it optional: true; some real paths"):
        tuning.apply_plan(model, written + tuning.head("classification", 2))


def test_optional_rules_change_no_run_identity():
    """Runs saved before ``freeze_all_but`` marked its output rule optional still open and resume."""
    from jaxtune.training.rundir import differences

    before = {"plan rules": [{"action": "train", "blocks": "last:1"}, {"action": "train", "kinds": ["output"]}]}
    now = {"plan rules": tuning.freeze_all_but(1).to_data()}
    assert now != before and differences(before, now) == []
    assert differences(before, {"plan rules": tuning.freeze_all_but(2).to_data()})


def test_kinds_select_module_families(llama4, bert):
    norms = tuning.apply_plan(llama4, tuning.train(kinds=["norms"]))
    assert set(trainable(norms)) == {"/".join(p) for p in flatten_dict(stacking.unstack(llama4.params))
                                     if p[-1] == "scale"}
    attention = tuning.apply_plan(llama4, tuning.train(kinds=["attention"]) + tuning.freeze(kinds=["norms"]))
    assert set(trainable(attention)) == {
        f"layers_{i}/self_attn/{m}/kernel" for i in range(4) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mlp = tuning.apply_plan(bert, tuning.train(kinds=["mlp"], blocks=0) + tuning.head("classification"))
    assert set(trainable(mlp)) - {p for p in trainable(mlp) if p.startswith("head/")} == {
        "layer_0/intermediate/dense/kernel", "layer_0/intermediate/dense/bias", "layer_0/output/dense/kernel",
        "layer_0/output/dense/bias", "layer_0/output/LayerNorm/scale", "layer_0/output/LayerNorm/bias"}
    embeddings = tuning.apply_plan(bert, tuning.train(kinds=["embeddings"]) + tuning.head("regression"))
    assert {p for p in trainable(embeddings) if not p.startswith("head/")} == {
        "embeddings/word_embeddings/embedding", "embeddings/position_embeddings/embedding",
        "embeddings/token_type_embeddings/embedding", "embeddings/LayerNorm/scale", "embeddings/LayerNorm/bias"}


def test_later_rules_override_earlier_ones(llama4):
    plan = tuning.full() + tuning.freeze("layers_0") + tuning.train("layers_0/mlp/") + tuning.freeze(blocks="2:4")
    names = set(trainable(tuning.apply_plan(llama4, plan)))
    every = {"/".join(p) for p in flatten_dict(stacking.unstack(llama4.params))}
    assert names == {p for p in every if not p.startswith(("layers_0/", "layers_2/", "layers_3/"))
                     or p.startswith("layers_0/mlp/")}


def test_the_documented_mixed_plan(llama4):
    """LoRA on q/v + norms trained + the last block trained + a head, everything else frozen."""
    plan = tuning.Plan.from_data([
        {"match": "layers_(\\d+)/self_attn/(q|v)_proj", "action": "lora", "rank": 4, "alpha": 8},
        {"match": "norm", "action": "train"},
        {"blocks": "last:1", "action": "train"},
        {"action": "head", "task": "classification", "num_labels": 3, "pooling": "mean"},
    ])
    tuned = tuning.apply_plan(llama4, plan, frozen_dtype=jnp.bfloat16)
    labels = trainable(tuned)
    assert tuned.task == "classification" and tuned.num_outputs == 3 and "lm_head" not in tuned.params
    assert {p for p, g in labels.items() if g == "lora"} == {
        f"layers_{i}/self_attn/{m}_proj/{leaf}" for i in range(4) for m in "qv" for leaf in ("lora_a", "lora_b")}
    assert {p for p, g in labels.items() if g == "head"} == {"head/out/kernel"}  # decoder heads: no bias, as HF
    # The last block's q/v kernels are trained directly *and* carry adapters (rule 2 overrides rule 0).
    assert labels["layers_3/self_attn/q_proj/kernel"] == "train" and "layers_2/self_attn/q_proj/kernel" not in labels
    assert labels["layers_1/self_attn/q_norm/scale"] == "train" and labels["norm/scale"] == "train"
    for path, leaf in flatten_dict(tuned.params).items():
        label = tuned.labels
        for key in path:
            label = label[key]
        want = jnp.float32 if label != "freeze" or path[-1] == "lora_scale" else jnp.bfloat16
        assert leaf.dtype == want, path
    out = jax.jit(lambda p: tuned.module.apply({"params": p}, input_ids=np.ones((2, 5), np.int32),
                                               segment_ids=np.array([[1] * 5, [1] * 3 + [0] * 2], np.int32)))(
        tuned.params)
    assert out.shape == (2, 3) and np.isfinite(np.asarray(out)).all()


def test_partition_and_combine_are_pure_inverses(llama4):
    tuned = tuning.apply_plan(llama4, tuning.lora(rank=2, targets=["q_proj"]) + tuning.train(kinds=["norms"]))
    train_part, frozen_part = tuning.partition(tuned.params, tuned.labels)
    flat_t, flat_f = flatten_dict(train_part), flatten_dict(frozen_part)
    assert set(flat_t) == {p for p, g in flatten_dict(tuned.labels).items() if g != "freeze"}
    assert not set(flat_t) & set(flat_f) and "embed_tokens" not in train_part  # pruned, not empty dicts

    def has_empty(tree: dict) -> bool:
        return any(isinstance(v, dict) and (not v or has_empty(v)) for v in tree.values())

    assert not has_empty(train_part) and not has_empty(frozen_part)
    rebuilt = jax.jit(tuning.combine)(train_part, frozen_part)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(tuned.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), rebuilt, tuned.params)
    with pytest.raises(ValueError, match="labels do not match params"):
        tuning.partition(tuned.params, {"embed_tokens": {"embedding": "train"}})


def test_summary_line(llama4):
    tuned = tuning.apply_plan(llama4, tuning.lora(rank=2, targets=["q_proj"]) + tuning.train("^norm/"),
                              frozen_dtype=jnp.bfloat16)
    assert llama4.params["layers_0-3"]["self_attn"]["q_proj"]["kernel"].shape == (4, 64, 512)  # Qwen3 head_dim 128
    lora = 4 * (64 * 2 + 2 * 512)  # 4 blocks x (A + B) of rank 2
    total_base = tuning.count(llama4.params)
    frozen_n = total_base - 64 + 4  # all base leaves but the final norm, plus 4 scalar lora_scale
    frozen_bytes = (total_base - 64) * 2 + 4 * 4
    expected = (f"trainable {(lora + 64) / 1000:.1f}K ({(lora + 64) * 4 / 1000:.1f} KB fp32) "
                f"[train 64, lora {lora / 1000:.1f}K] | frozen {frozen_n / 1000:.1f}K "
                f"({frozen_bytes / 1000:.1f} KB bf16/fp32)")
    assert tuning.summary(tuned.params, tuned.labels) == expected


ERRORS = {
    "matches nothing": ([{"action": "train", "match": "norm"}, {"action": "train", "match": "attn_qq"}],
                        r"plan rule #1 \{'action': 'train', 'match': 'attn_qq'\} matches no parameter; "
                        r"some real paths: embed_tokens/embedding, lm_head/kernel, norm/scale, layers_0/"),
    "rank 0": ([{"action": "lora", "rank": 0}], r"plan rule #0 .*rank must be a positive integer, got 0"),
    "unknown target": ([{"action": "lora", "targets": ["q_proj", "qkv"]}],
                       r"unknown target module 'qkv'; linear modules in this model: down_proj, gate_proj, "
                       r"k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    "prompt too long": ([{"action": "prompt", "n_tokens": 256}],
                        r"256 virtual tokens leave no room .* maximum length 256"),
    "unknown action": ([{"action": "adapt"}], r"plan rule #0 .*unknown action 'adapt'"),
    "unknown option": ([{"action": "train", "rnak": 3}], r"plan rule #0 .*unknown option\(s\) rnak"),
    "option of another action": ([{"action": "train", "rank": 3}],
                                 r"option\(s\) rank do not apply to action 'train'"),
    "dropout conflict": ([{"action": "lora", "targets": ["q_proj"], "dropout": 0.1},
                          {"action": "dora", "targets": ["v_proj"], "dropout": 0.2}],
                         r"plan rule #0 .* and plan rule #1 .* adapter dropout 0.1 and 0.2"),
    "blocks out of range": ([{"action": "train", "blocks": "last:5"}], r"blocks 'last:5': the model has only 4"),
    "lora on no linear": ([{"action": "lora", "match": "norm"}], r"selects no linear module"),
    "pooler on a decoder": ([{"action": "head", "task": "regression", "pooling": "pooler"}],
                            r"pooling 'pooler' needs a BERT pooler"),
    "text without text": ([{"action": "prompt", "n_tokens": 2, "init": "text"}], r"init 'text' needs the option text"),
    "bad regex": ([{"action": "freeze", "match": "layers_("}], r"not a valid regular expression"),
    "a range past the end": ([{"action": "train", "blocks": "0:100"}], r"blocks '0:100': the model has only 4 blocks"),
    "two heads": ([{"action": "head", "task": "classification", "num_labels": 3}, {"action": "head",
                   "task": "regression"}], r"plan rule #0 .* and plan rule #1 .* each add a head; a model has one"),
    "two prompts": ([{"action": "prompt", "n_tokens": 2}, {"action": "prompt", "n_tokens": 4}],
                    r"each add a prompt"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_plan_errors_are_clear(case, llama4):
    data, message = ERRORS[case]
    with pytest.raises(PlanError, match=message):
        tuning.apply_plan(llama4, data)


def test_apply_plan_takes_an_int_seed_and_names_a_bad_dtype(llama4):
    """``rng=0`` failed inside ``jax.random.split``; ``frozen_dtype="bf16"`` inside ``jnp.dtype``."""
    plan = tuning.lora(rank=2, targets=["q_proj"])
    seeded, keyed = tuning.apply_plan(llama4, plan, rng=3), tuning.apply_plan(llama4, plan, jax.random.key(3))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), seeded.params, keyed.params))
    with pytest.raises(TypeError, match=r"^rng: expected a key \(jax.random.key\(0\)\) or an int seed, got str$"):
        tuning.apply_plan(llama4, plan, rng="0")
    with pytest.raises(ValueError, match=r"^frozen_dtype: expected one of float32, bfloat16, float16, got 'bf16'"):
        tuning.apply_plan(llama4, plan, frozen_dtype="bf16")


def test_encoder_needs_a_head_and_no_prompt(bert):
    with pytest.raises(PlanError, match="BertModel has no output layer to train; add a head rule"):
        tuning.apply_plan(bert, tuning.lora(rank=2))
    with pytest.raises(PlanError, match="prompt tuning is supported for decoder models only"):
        tuning.apply_plan(bert, tuning.prompt_tuning(2) + tuning.head("regression"))


def test_a_rule_that_ends_with_no_effect_is_said_and_data_must_be_a_source(llama4, caplog):
    with caplog.at_level("WARNING", logger="jaxtune"):
        tuned = tuning.apply_plan(llama4, tuning.lora(targets=["q_proj"]) + tuning.lora(rank=4, targets=["q_proj"]))
    assert {spec.rank for spec in tuned.adapters.values()} == {4}
    assert "plan rule #0 {'action': 'lora', 'targets': ['q_proj']" in caplog.text and "has no effect" in caplog.text
    with pytest.raises(PlanError, match="data: the training source .* got a tuple"):
        tuning.apply_plan(llama4, tuning.head("classification"), data=(1, 2))
    # Strings where a list is asked: one kind, one hidden width.
    assert tuning.freeze_all_but(1, kinds="norms") == tuning.freeze_all_but(1, kinds=["norms"])
    assert tuning.head("regression", hidden=64) == tuning.head("regression", hidden=[64])
