"""The config schema: YAML + overrides, one generic validator, clear errors, resolved config."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from jaxtune import config
from jaxtune.config import Config, ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = {"model": {"path": "m"}, "data": {"train": "t.jsonl", "kind": "chat"}, "plan": [{"preset": "lora"}]}


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error(tmp_path: Path, data: dict | str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, data), overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_overrides_and_round_trip(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL), ["optimizer.learning_rate=3e-4", "train.steps=7",
                                                  "optimizer.group_lr.lora=2", "data.max_length=1e3",
                                                  "output.dir=out/x", "mesh.fsdp=2"])
    assert cfg.optimizer.learning_rate == 3e-4 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.train.steps == 7 and cfg.data.max_length == 1000 and cfg.optimizer.group_lr == {"lora": 2.0}
    assert cfg.mesh.fsdp == 2 and cfg.output.dir == "out/x"
    assert cfg.plan == ({"preset": "lora"},)
    # The resolved config, saved with every default, loads back to the same config.
    saved = config.save(cfg, tmp_path / "resolved.yaml")
    assert config.load(saved) == cfg
    assert yaml.safe_load(saved.read_text())["optimizer"]["b2"] == 0.999


def test_output_dir_defaults_to_the_config_name(tmp_path):
    assert config.load(write(tmp_path, MINIMAL)).output.dir == "runs/run"


def test_yaml_1_1_exponents_are_numbers(tmp_path):
    cfg = config.load(write(tmp_path, "model: {path: m}\ndata: {dataset: chatterbot}\nplan: full\n"
                                      "optimizer: {learning_rate: 1e-4}\n"))
    assert cfg.optimizer.learning_rate == 1e-4


@pytest.mark.parametrize("overrides, expected", [
    (["optimizer.learning_rate=fast"], "optimizer.learning_rate: expected a number, got 'fast'"),
    (["train.steps=2.5"], "train.steps: expected an integer or null, got 2.5"),
    (["data.packing=maybe"], "data.packing: expected true or false or null, got 'maybe'"),
    (["model.dtype=bf16"], "model.dtype: expected one of float32, bfloat16, float16, got 'bf16'"),
    (["data.kind=chatt"], "did you mean 'chat'?"),
    (["optimizer.name=adamx"], "optimizer.name 'adamx' is unknown; choose one of adamw, adam, sgd, lion, adafactor"),
    (["data.batch_size=0"], "data.batch_size: expected an integer >= 1, got 0"),
    (["train.epochs=2", "train.steps=3"], "give train.steps (3) or train.epochs (2.0), not both"),
    (["model.path=null"], "model.path: expected a string, got null"),
    (["model.router_aux_loss_coef=-1e-3"], "model.router_aux_loss_coef: expected a number >= 0 (0: no router loss), "
                                          "got -0.001; give the weight, or leave it out (null) to follow the model's "
                                          "config.json"),
    (["model.router_aux_loss_coef=lots"], "model.router_aux_loss_coef: expected a number or null, got 'lots'"),
    (["eval.best_metric=loss"],
     "eval.best_metric: 'loss' is tracked at each evaluation during training; set eval.every"),
    (["data.shuffle=false"], "data.shuffle: not a config field: set by the loader's role"),
    (["data.train=null"], "data: give a packaged dataset"),
    (["eval.choices=[positive]"], "eval.choices: expected two or more different answers, got ('positive',)"),
    (["eval.choices=[yes, no]"], "eval.choices[0]: expected a string, got True (YAML reads unquoted yes/no"),
    (["plan=[{action: lora, rnak: 4}]"], "plan rule #0 {'action': 'lora', 'rnak': 4}: unknown option(s) rnak"),
    (["plan=[{preset: lora, rnak: 4}]"], "plan rule #0: preset 'lora' has no option 'rnak'"),
    (["plan=[{preset: lorra}]"], "plan rule #0.preset: expected one of full, lora"),
    (["data.dataset=rotten_tomatos"], "data.dataset: unknown dataset 'rotten_tomatos'"),
    (["plan=[{action: head, task: classification}]"], "a head rule turns the model into a classification model"),
    (["mesh.fsdp=two"], "mesh.fsdp: expected an integer, got 'two'"),
    (["trian.steps=3"], "unknown key 'trian' (allowed: model, plan, data, optimizer, train, eval, checkpoint, mesh, "
                        "preference, distributed, output); did you mean 'train'?"),
    (["preference.method=kto"], "preference.method: 'kto' is unknown; choose one of dpo, ipo, simpo, orpo"),
    (["optimizer.learnig_rate=1"], "unknown key 'learnig_rate' in optimizer (allowed: name, learning_rate"),
    (["train"], "override 'train': expected key.path=value"),
])
def test_errors_name_the_field_the_value_and_what_is_allowed(tmp_path, overrides, expected):
    assert expected in error(tmp_path, {**MINIMAL, "train": {"steps": 3}}, tuple(overrides))


def test_a_dtype_is_its_name_or_the_dtype_itself_everywhere():
    """Every dtype the API takes is read by one check (jaxtune.models.load.dtype_name): the names or
    the dtype itself, and another spelling is refused naming the field; output.export_dtype built in
    Python was not checked until the export after training."""
    import jax.numpy as jnp

    assert config.ModelConfig(path="m", dtype=jnp.bfloat16, compute_dtype="float16").dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"^model.dtype: expected one of float32, bfloat16, float16, got 'bf16'; "
                                         r"did you mean 'bfloat16'\?$"):
        config.ModelConfig(path="m", dtype="bf16")
    with pytest.raises(ValueError, match=r"^output.export_dtype: expected one of float32, bfloat16, float16, "
                                         r"q8_0, got 'bf16'; did you mean 'bfloat16'\?$"):  # as from a recipe file
        config.OutputConfig(export_dtype="bf16")
    assert config.OutputConfig(export_dtype=jnp.float16).export_dtype == "float16"


def test_file_errors(tmp_path):
    assert "not valid YAML" in error(tmp_path, "model: [unclosed\n") and "run.yaml:" in error(tmp_path, "a: [\n")
    assert "run.yaml:3: not valid YAML (duplicate key 'lr')" in error(tmp_path, "a:\n  lr: 1\n  lr: 2\n")
    assert "model: required" in error(tmp_path, {"data": {"dataset": "vader"}})
    assert "must be a mapping" in error(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "missing.yaml")
    assert "classification needs a head" in error(tmp_path, {"model": {"path": "m"}, "data": {"dataset":
                                                                                            "rotten_tomatoes"}})


def test_a_recipe_starts_from_its_base(tmp_path):
    """``base:`` lays a recipe over another (a chain, paths relative to each file): mappings merge key
    by key, lists and values replace, overrides come last, and the run directory is never inherited."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "root.yaml").write_text(yaml.safe_dump({
        **MINIMAL, "optimizer": {"learning_rate": 1e-3, "group_lr": {"head": 5.0}}, "train": {"steps": 9},
        "eval": {"choices": ["yes", "no"], "every": 3}, "output": {"dir": "runs/root", "export": "merged"}}))
    (tmp_path / "shared" / "middle.yaml").write_text(
        "base: root.yaml\noptimizer: {warmup_ratio: 0.2, group_lr: {lora: 2.0}}\neval: {choices: [a, b, c]}\n")
    variant = tmp_path / "variant.yaml"
    variant.write_text("# a variant\nbase: shared/middle.yaml\nplan: [{preset: lora, rank: 4}]\n"
                       "train: {steps: null, epochs: 2}\n")
    cfg = config.load(variant, ["eval.every=5"])
    assert cfg.model.path == "m" and cfg.data.train == "t.jsonl"            # untouched sections inherited
    assert cfg.optimizer.learning_rate == 1e-3 and cfg.optimizer.warmup_ratio == 0.2
    assert cfg.optimizer.group_lr == {"head": 5.0, "lora": 2.0}           # mappings merge at any depth
    assert cfg.eval.choices == ("a", "b", "c") and cfg.plan == ({"preset": "lora", "rank": 4},)  # lists replace
    assert cfg.train.steps is None and cfg.train.epochs == 2               # null replaces too
    assert cfg.eval.every == 5                                             # overrides last
    assert cfg.output.dir == "runs/variant" and cfg.output.export == "merged"  # its own run directory
    # The resolved config stands alone: saved and loaded again it is the same, without its bases.
    assert config.load(config.save(cfg, tmp_path / "resolved.yaml")) == cfg
    # The same as writing the whole recipe out by hand.
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump({
        **MINIMAL, "plan": [{"preset": "lora", "rank": 4}],
        "optimizer": {"learning_rate": 1e-3, "warmup_ratio": 0.2, "group_lr": {"head": 5.0, "lora": 2.0}},
        "train": {"epochs": 2}, "eval": {"choices": ["a", "b", "c"], "every": 5},
        "output": {"dir": "runs/variant", "export": "merged"}}))
    assert config.load(tmp_path / "whole.yaml") == cfg
    # A variant named as its base would run in the base's directory (runs/<file name>): refused.
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "root.yaml").write_text("base: ../shared/middle.yaml\n")  # root.yaml runs in runs/root
    with pytest.raises(config.ConfigError, match="would be runs/root, which is also that of its base .*root.yaml"):
        config.load(tmp_path / "exp" / "root.yaml")
    (tmp_path / "exp" / "middle.yaml").write_text("base: ../shared/middle.yaml\n")
    with pytest.raises(config.ConfigError, match="its run directory would be runs/middle, which is also that of its "
                                                   "base .*middle.yaml .the same file name.; set output.dir"):
        config.load(tmp_path / "exp" / "middle.yaml")
    assert config.load(tmp_path / "exp" / "middle.yaml", ["output.dir=runs/exp-middle"]).output.dir == "runs/exp-middle"


def test_base_errors_name_the_file_and_line(tmp_path):
    assert error(tmp_path, "# c\nbase: nowhere.yaml\n") == (
        f"{tmp_path / 'run.yaml'}:2: base: no recipe {tmp_path / 'nowhere.yaml'}; give a path relative to this "
        "file's directory")
    assert "run.yaml:1: base: expected the path of the recipe this one starts from" in error(tmp_path, "base: [a]\n")
    (tmp_path / "a.yaml").write_text("base: run.yaml\n")
    assert f"a.yaml:1: base: the recipes start from each other in a circle ({tmp_path / 'run.yaml'} -> " \
        f"{tmp_path / 'a.yaml'} -> {tmp_path / 'run.yaml'})" in error(tmp_path, "base: a.yaml\n")
    assert "in a circle" in error(tmp_path, "base: run.yaml\n")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    assert "broken.yaml:2: not valid YAML" in error(tmp_path, "base: broken.yaml\n")
    # A base's own mistakes are reported at the base's line that writes them, after the merge.
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**MINIMAL, "optimizr": {}}))
    assert error(tmp_path, "base: typo.yaml\n").startswith(f"{tmp_path / 'typo.yaml'}:6: unknown key 'optimizr'")


def test_a_mistake_in_a_recipe_file_names_its_file_and_line(tmp_path):
    """A misspelled key, a value of the wrong type or range and a bad plan rule are reported at the
    line that writes them: in the recipe, or in the base that wrote them (the nearest)."""
    base, recipe = tmp_path / "base.yaml", tmp_path / "run.yaml"
    base.write_text("model: {path: m}\ndata: {train: t.jsonl, kind: chat}\noptimizer:\n  learning_rate: 1e-3\n")

    def message(text: str, overrides: tuple[str, ...] = ()) -> str:
        return error(tmp_path, "# a recipe\nbase: base.yaml\n" + text, overrides)  # text starts at line 3

    assert message("train:\n  steps: 3\n  log_evry: 2\n") == (
        f"{recipe}:5: unknown key 'log_evry' in train (allowed: steps, epochs, grad_accum_steps, log_every, seed, "
        "chunk_tokens, regression_loss, progress, compile_cache, recalibrate_batch_norm); did you mean 'log_every'?")
    assert message("evl: {every: 2}\n").startswith(f"{recipe}:3: unknown key 'evl' (allowed: model, plan")
    assert message("data:\n  shuffle: false\n").startswith(f"{recipe}:4: data.shuffle: not a config field")
    assert message("eval:\n  every: 2\n  choices: [a, yes]\n") == (
        f"{recipe}:5: eval.choices[1]: expected a string, got True (YAML reads unquoted yes/no/on/off as booleans: "
        "quote the word, e.g. 'yes')")
    assert message("optimizer:\n  b2: 1.5\n").startswith(f"{recipe}:4: optimizer.b2: expected a number in [0, 1)")
    assert message("optimizer:\n  name: sgd\n  b1: 0.95\n").startswith(
        f"{recipe}:5: optimizer.b1=0.95 is not used by optimizer 'sgd' (it reads momentum)")
    assert message("plan:\n  - {preset: lora}\n  - {action: train, kinds: [norms], rnak: 2}\n").startswith(
        f"{recipe}:5: plan rule #1 {{'action': 'train', 'kinds': ['norms'], 'rnak': 2}}: unknown option(s) rnak")
    # the base's line, where the recipe does not write the key itself
    base.write_text("model: {path: m}\ndata: {train: t.jsonl, kind: chat}\noptimizer:\n  learning_rate: fast\n")
    assert message("train: {steps: 3}\n") == f"{base}:4: optimizer.learning_rate: expected a number, got 'fast'"
    # what an override wrote is named by the override's key, not by a line of the file
    assert message("", ("optimizer.learning_rate=slow",)) == "optimizer.learning_rate: expected a number, got 'slow'"
    assert message("", ("optimizer.learning_rate=1e-3", "train.log_evry=2")).startswith(
        "unknown key 'log_evry' in train")


def test_an_override_of_steps_or_epochs_replaces_the_other(tmp_path):
    """``train.steps`` and ``train.epochs`` are alternatives (a recipe may not set both): an override
    that gives one a value replaces the other, as ``jaxtune --help``'s ``train.steps=8`` on the
    quickstart (``epochs: 1``) does; so do ``data.validation`` and ``data.validation_fraction``."""
    cfg = config.load(CONFIGS / "quickstart.yaml", ["train.steps=8", "optimizer.learning_rate=3e-4"])
    assert (cfg.train.steps, cfg.train.epochs) == (8, None)
    cfg = config.load(CONFIGS / "chat_chatterbot.yaml", ["train.epochs=3"])  # its file: steps: 8
    assert (cfg.train.steps, cfg.train.epochs) == (None, 3)
    assert config.load(CONFIGS / "quickstart.yaml", ["train.steps=null"]).train.epochs == 1  # null gives nothing
    with pytest.raises(ConfigError, match=r"give train.steps \(8\) or train.epochs \(2.0\), not both"):
        config.load(CONFIGS / "quickstart.yaml", ["train.steps=8", "train.epochs=2"])
    held_out = write(tmp_path, {**MINIMAL, "data": {**MINIMAL["data"], "validation_fraction": 0.1}})
    cfg = config.load(held_out, ["data.validation=v.jsonl"])
    assert (cfg.data.validation, cfg.data.validation_fraction) == ("v.jsonl", None)
    # a run directory's config the same (jaxtune eval RUN_DIR data.validation=FILE)
    from jaxtune.recipe import run_config

    run = tmp_path / "run"
    config.save(config.load(held_out), run / "config.yaml")
    cfg = run_config(run, ["data.validation=v.jsonl"])
    assert (cfg.data.validation, cfg.data.validation_fraction, cfg.output.dir) == ("v.jsonl", None, str(run))


def test_a_variant_that_sets_steps_replaces_its_bases_epochs(tmp_path):
    """A recipe laid over a base follows the override rule: setting one of two alternatives replaces
    the base's other (it was refused until the variant wrote ``epochs: null``); setting both is
    still an error, and a base with neither keeps its own."""
    (tmp_path / "base.yaml").write_text((CONFIGS / "quickstart.yaml").read_text())  # epochs: 1
    variant = tmp_path / "variant.yaml"
    variant.write_text("base: base.yaml\ntrain: {steps: 5, seed: 3}\n")
    cfg = config.load(variant)
    assert (cfg.train.steps, cfg.train.epochs, cfg.train.seed) == (5, None, 3)
    base = config.load(tmp_path / "base.yaml")
    assert dataclasses.replace(cfg, train=base.train, output=base.output) == base  # nothing else moved
    variant.write_text("base: base.yaml\ntrain: {steps: 5, epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"give train.steps \(5\) or train.epochs \(2.0\), not both"):
        config.load(variant)
    # a recipe laid over base data (as jaxtune serve lays a job's over its operator recipe) the same
    recipe = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    variant.write_text(yaml.safe_dump({**recipe, "train": {"steps": 5}}))
    cfg = config.load(variant, base={"train": {"epochs": 2, "seed": 3}})
    assert (cfg.train.steps, cfg.train.epochs, cfg.train.seed) == (5, None, 3)


def test_the_qlora_recipe_is_the_chat_recipe_with_another_plan():
    qlora, chat = config.load(CONFIGS / "chat_sentiment_qlora.yaml"), config.load(CONFIGS / "chat_sentiment.yaml")
    assert qlora.plan[0] == {"action": "freeze", "quantize": "nf4"} and qlora.plan[1:] == chat.plan
    assert qlora.output.dir == "runs/chat_sentiment_qlora" and chat.output.dir == "runs/chat_sentiment"
    assert dataclasses.replace(qlora, plan=chat.plan, output=chat.output) == chat


def test_overrides_reach_into_plan_lists(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL), ["plan.0.rank=4", "plan.0.alpha=8"])
    assert cfg.plan == ({"preset": "lora", "rank": 4, "alpha": 8},)
    plan = config.build_plan(cfg.plan)
    assert plan.rules[0].rank == 4 and plan.rules[0].alpha == 8.0
    assert "index 0..0" in error(tmp_path, MINIMAL, ("plan.3.rank=4",))


def test_no_field_is_declared_twice():
    """Each recipe section is the API's own dataclass: the schema has no copies of its fields."""
    import dataclasses

    import jaxtune as jt
    from jaxtune.data import LoaderConfig

    assert issubclass(jt.DataConfig, LoaderConfig)  # the batching fields are inherited, not repeated
    own = {f.name for f in dataclasses.fields(jt.DataConfig)} - {f.name for f in dataclasses.fields(LoaderConfig)}
    assert not own & {f.name for f in dataclasses.fields(LoaderConfig)}
    classes = [jt.ModelConfig, jt.DataConfig, jt.OptimizerConfig, jt.TrainConfig, jt.EvalConfig, jt.CheckpointConfig,
               jt.MeshConfig, jt.PreferenceConfig]
    assert [typing_hint(Config, name) for name in ("model", "data", "optimizer", "train", "eval", "checkpoint",
                                                   "mesh", "preference")] == classes


def typing_hint(cls, name):
    import typing

    hint = typing.get_type_hints(cls)[name]
    present = [a for a in typing.get_args(hint) if a is not type(None)]  # an optional section's dataclass
    return present[0] if present else hint


def test_generic_walker_covers_every_section():
    """Every field of every section has a type the walker understands (no hand-written checks)."""
    import dataclasses
    import typing

    from jaxtune.schema import coerce

    def walk(cls):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint)
            elif f.default is not dataclasses.MISSING:
                assert coerce(config.to_data(f.default), hint, f.name) == f.default, f.name

    walk(Config)


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_is_a_valid_config(recipe):
    cfg = config.load(CONFIGS / recipe)
    assert cfg.output.dir.startswith("runs/")
    config.build_plan(cfg.plan)
    config.validate(cfg)


def test_the_data_section_built_in_python_is_checked_like_a_recipe():
    """DataConfig checked the types of its batching fields only: ``jt.read(..., train_size=2.5)``
    failed with "validation fraction must be in (0, 1), got 2.5" and ``DataConfig(train_size="64")``
    with a TypeError. A path given from Python is the string a recipe writes."""
    import jaxtune as jt

    for fields, message in (({"train_size": 2.5}, "data.train_size: expected an integer or null, got 2.5"),
                            ({"validation_size": "many"}, "data.validation_size: expected an integer or null, "
                                                          "got 'many'"),
                            ({"images": True, "augment": "flip"}, "data.augment: expected a list, got 'flip'"),
                            ({"kind": "chatt"}, "data.kind: expected one of chat, prompt_completion, text, "
                                                "classification, regression, preference, got 'chatt'; did you "
                                                "mean 'chat'?")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(message)}$"):
            jt.DataConfig(**fields)
    with pytest.raises(ConfigError, match=r"^data.train_size: expected an integer or null, got 2.5$"):
        jt.read("rotten_tomatoes", train_size=2.5)
    assert jt.DataConfig(train_size="64", images=True, augment=["flip"]) == jt.DataConfig(
        train_size=64, images=True, augment=("flip",))
    assert jt.DataConfig(train=Path("t.jsonl"), validation=Path("v.jsonl"), kind="chat") == jt.DataConfig(
        train="t.jsonl", validation="v.jsonl", kind="chat")
