"""The public API as a user meets it: the README's Python example runs verbatim (on tiny stand-ins
for its packaged model and data), twice, the second time as a no-op; and a recipe is the same
run as the equivalent Python code."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from helpers import tiny_hf_model

import jaxtune as jt
from jaxtune import assets
from jaxtune.data.datasets import PreparedData
from jaxtune.data.testing import tiny_tokenizer, write_jsonl

README = Path(__file__).resolve().parents[1] / "README.md"
WORDS = "good bad great awful plot actor scene story".split()


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    [block] = [b for b in blocks if "import jaxtune as jt" in b]
    return block


@pytest.fixture
def tiny_packages(tmp_path, monkeypatch):
    """The README's packaged model and dataset, replaced by a tiny random BERT and tiny reviews."""
    bert = tmp_path / "bert"
    tiny_hf_model("BertModel", bert, vocab_size=128, max_position_embeddings=128)
    tiny_tokenizer(bos=True).save_pretrained(bert)
    monkeypatch.setattr("jaxtune.models.assets.fetch_model", lambda name, cache=None: bert)

    def prepare(*, train_size: int = 64, test_size: int = 32, seed: int = 0) -> PreparedData:
        rng = np.random.default_rng(seed)
        rows = {}
        for split, n in (("train", min(train_size, 64)), ("test", min(test_size, 32))):
            texts = [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]
            rows[split] = write_jsonl(tmp_path / f"{split}.jsonl", [
                {"text": t, "label": "positive" if t.count("good") + t.count("great") > t.count("bad") else "negative"}
                for t in texts])
        return PreparedData(rows["train"], rows["test"], "classification", {})

    monkeypatch.setitem(assets.ASSETS, "rotten_tomatoes", dataclasses.replace(assets.ASSETS["rotten_tomatoes"],
                                                                               build=prepare))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_example_has_at_most_three_imports():
    imports = [line for line in readme_example().splitlines() if re.match(r"\s*(import|from)\s", line)]
    assert 1 <= len(imports) <= 3, imports



def test_no_submodule_is_named_like_a_function_of_the_api():
    """A submodule ``jaxtune.X`` would replace the API's ``jaxtune.X`` as the package attribute once
    anything imports it (``import jaxtune.predict`` then ``jaxtune.predict(...)`` called a module)."""
    import importlib.util
    import subprocess
    import sys

    clashes = [name for name in jt.__all__ if importlib.util.find_spec(f"jaxtune.{name}") is not None]
    assert not clashes, f"submodules named like API functions: {clashes}"
    # Importing the module that holds jt.predict leaves jt.predict the function (a fresh interpreter:
    # this one has resolved it already).
    code = f"import {jt.predict.__module__}, jaxtune; assert callable(jaxtune.predict), jaxtune.predict"
    subprocess.run([sys.executable, "-c", code], check=True)

def test_readme_example_runs_verbatim_and_again_as_a_no_op(tiny_packages, caplog):
    code = readme_example()
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    first = namespace["result"]
    assert first.state == "finished" and first.step == first.steps >= 1 and first.report
    assert first.model.step == first.step and first.after["loss"] < first.before["loss"]
    exported = next(p for p in tiny_packages.rglob("adapter_config.json"))
    config = json.loads(exported.read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"]
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    second = namespace["result"]
    assert second.step == first.step and second.after == first.after  # resumed, nothing trained again
    assert "already trained to step" in caplog.text


def test_a_recipe_is_the_same_run_as_the_python_code(tiny_packages):
    """The README's example as a recipe: the same steps and metrics as the Python code."""
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)  # noqa: S102
    python = namespace["result"]
    recipe = {
        "model": {"path": "all-MiniLM-L6-v2"},
        "plan": [{"preset": "lora", "rank": 8, "alpha": 16}, {"preset": "head", "task": "classification"}],
        "data": {"dataset": "rotten_tomatoes", "train_size": 1024, "validation_size": 500, "batch_size": 32,
                 "max_length": 64},
        "optimizer": {"learning_rate": 1e-3, "warmup_ratio": 0.1, "group_lr": {"head": 5.0}},
        "train": {"epochs": 1},
        "output": {"dir": str(tiny_packages / "runs" / "recipe"), "export": "none"},
    }
    (tiny_packages / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    from_yaml = jt.finetune(jt.load_config(tiny_packages / "recipe.yaml"))
    def scores(before: dict) -> dict:  # the baselines' seconds are timings, not scores
        return {k: v for k, v in before.items() if not k.endswith("/seconds")}

    assert from_yaml.steps == python.steps and scores(from_yaml.before) == scores(python.before)
    assert from_yaml.after == pytest.approx(python.after, rel=1e-6, abs=1e-7)
    for a, b in zip(jax.tree.leaves(from_yaml.model.params), jax.tree.leaves(python.model.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_a_wrong_object_is_named_with_what_to_pass(tmp_path):
    """A path or an already planned model where a loaded one goes, a string where a tuned one goes:
    each failed on a missing attribute deep inside."""
    with pytest.raises(TypeError, match=r"^pretrained: got the path 'models/bert'; load the model first: "
                                        r"jaxtune.apply_plan\(jaxtune.load\('models/bert'\), plan\)$"):
        jt.apply_plan("models/bert", jt.full())
    with pytest.raises(TypeError, match=r"^pretrained: this model already has a plan .*joined with \+"):
        jt.apply_plan(object.__new__(jt.Tuned), jt.full())
    with pytest.raises(TypeError, match=r"^model: expected a tuned model \(Trainer.fit\(\).model, .*got str$"):
        jt.export("runs/x", tmp_path / "out")
    with pytest.raises(TypeError, match=r"^model: expected a model from jaxtune.load, .*got str: load it first, "
                                        r"jaxtune.load\('models/x'\)$"):
        jt.complete("models/x", ["hi"])
    with pytest.raises(TypeError, match=r"^config: expected a jaxtune.Config .*got int$"):
        jt.finetune(5)


def fit_result(model) -> jt.FitResult:
    return jt.FitResult(model=model, step=1, steps=1, state="finished", train_metrics={}, eval_metrics={}, best=None)


def test_one_rule_takes_a_fit_results_model_for_export_and_complete(tmp_path):
    """export and complete each unwrapped a FitResult with a rule of their own (one by type, one by
    fields); models.load.model_of is the one rule both use: a result gives its model, a model is itself,
    and anything else is left for the caller's check to name (a result holding a path is no model)."""
    from jaxtune.models.load import model_of

    model = type("Model", (), {"module": None, "params": None, "tokenizer": None, "source": "x"})()
    assert model_of(fit_result(model)) is model and model_of(model) is model
    holder = fit_result("runs/x")
    assert model_of(holder) is holder and model_of("runs/x") == "runs/x"
    with pytest.raises(TypeError, match=r"^model: expected a tuned model .*got FitResult$"):
        jt.export(holder, tmp_path / "out")
    with pytest.raises(TypeError, match=r"^model: expected a model from jaxtune.load, .*got FitResult$"):
        jt.complete(holder, ["hi"])


def test_a_fit_result_exports_and_generates_with_its_model(tmp_path):
    bert = tmp_path / "bert"
    tiny_hf_model("BertModel", bert)
    tuned = jt.apply_plan(jt.load(str(bert)), jt.lora(rank=2) + jt.head("regression"))
    out = jt.export(fit_result(dataclasses.replace(tuned, step=1)), tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match=r"^dtype: expected one of float32, bfloat16, float16, got 'bf16'"):
        jt.export(tuned, tmp_path / "merged", format="merged", dtype="bf16")
    # complete reads the result's model: here one without a tokenizer, which it names
    untokenized = type("Model", (), {"module": None, "params": None, "tokenizer": None, "source": str(bert)})()
    with pytest.raises(ValueError, match="the model has no tokenizer"):
        jt.complete(fit_result(untokenized), ["hi"])


def test_a_recipe_given_as_data_must_name_its_run_directory(tmp_path, monkeypatch):
    """A recipe file runs in runs/<its name>; a dict (or Config) has no name, and ran in runs/run:
    two dicts for different tasks shared, and resumed, one directory. It must set output.dir."""
    monkeypatch.chdir(tmp_path)
    recipe = {"model": {"path": "models/x"}, "data": {"train": "train.jsonl", "kind": "chat"}}
    for config in (recipe, jt.load_config(None, base=recipe)):
        with pytest.raises(jt.ConfigError, match=r"^output.dir: not set, and a recipe given as a dict or Config has no "
                                                 r"file name .*; set it, e.g. \{'output': \{'dir': 'runs/my-run'\}\}$"):
            jt.finetune(config)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(recipe))
    assert jt.load_config(tmp_path / "chat.yaml").output.dir == "runs/chat"  # a file still names its own
    assert jt.load_config(tmp_path / "chat.yaml", ["output.dir=null"]).output.dir == "runs/chat"  # null: the default


def test_finetune_reads_a_recipe_file_or_its_sections(tmp_path):
    """``finetune`` took only a Config: a dict failed on ``config.data``."""
    recipe = {"model": {"path": "models/x"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for config in (recipe, tmp_path / "recipe.yaml", str(tmp_path / "recipe.yaml")):
        with pytest.raises(jt.ConfigError, match=r"^data: give a packaged dataset"):
            jt.finetune(config)
