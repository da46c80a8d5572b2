"""Every recipe in configs/ runs, so none rots: fast, with a tiny random model of the recipe's
family and synthetic data of its kind (2 steps); slow, as written with the real model and data
(1 step, small splits)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import skip_or_fail, tiny_hf_model

from jaxtune import config
from jaxtune.data.datasets import sentiment_chat
from jaxtune.data.testing import synthetic_chat_rows, synthetic_preference_rows, tiny_tokenizer, write_jsonl
from jaxtune.recipe import finetune

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Image recipes (images_*.yaml) run tiny in tests/test_image_recipes.py, with a tiny ViT and tiny images
# (their own plans need EfficientNet's blocks and BatchNorms): as written only with the real assets, here.
ALL_RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
RECIPES = [name for name in ALL_RECIPES if not name.startswith("images_")]
# Where the export of each recipe goes (auto: a PEFT adapter for adapters, merged otherwise;
# skipped when a mean-pooled head has no transformers class).
EXPORTS = {"quickstart.yaml": "adapter_config.json", "partial.yaml": None, "regression.yaml": None, "fsdp8.yaml": None,
           "full.yaml": "config.json", "domain_text.yaml": "config.json", "chat_sentiment.yaml": "adapter_config.json",
           "chat_chatterbot.yaml": "adapter_config.json", "prompt_tuning.yaml": "adapter_config.json",
           "tpu_pod.yaml": "adapter_config.json", "preference.yaml": "adapter_config.json",
           "chat_sentiment_qlora.yaml": "adapter_config.json", "reward.yaml": "adapter_config.json"}


def test_every_recipe_is_listed_here():
    assert sorted(EXPORTS) == RECIPES


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    tiny_hf_model("BertModel", root / "bert", vocab_size=128, max_position_embeddings=128)
    tiny_tokenizer(bos=True).save_pretrained(root / "bert")
    tiny_hf_model("LlamaForCausalLM", root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    rng = np.random.default_rng(0)
    words = "good bad great awful plot actor scene story".split()
    for split, n in (("train", 32), ("valid", 16)):
        texts = [" ".join(rng.choice(words, 6)) for _ in range(n)]
        write_jsonl(root / f"{split}.classification.jsonl",
                    [{"text": t, "label": "positive" if "good" in t else "negative"} for t in texts])
        write_jsonl(root / f"{split}.regression.jsonl", [{"text": t, "target": t.count("good") - t.count("bad")}
                                                         for t in texts])
        write_jsonl(root / f"{split}.chat.jsonl", synthetic_chat_rows(n, seed=len(split), max_words=6))
        write_jsonl(root / f"{split}.preference.jsonl", synthetic_preference_rows(n, seed=len(split)))
        write_jsonl(root / f"{split}.choices.jsonl",  # answers from eval.choices (chat_sentiment)
                    [sentiment_chat(t, "positive" if "good" in t else "negative") for t in texts])
        (root / f"{split}.text.txt").write_text("\n".join(texts) + "\n")
    return root


def tiny_overrides(recipe: str, root: Path, out: Path) -> list[str]:
    cfg = config.load(CONFIGS / recipe)
    kind = cfg.data.source_kind
    model = "bert" if "MiniLM" in cfg.model.path else "llama"
    ext = "txt" if kind == "text" else "jsonl"
    name, length = ("choices", 192) if cfg.eval.choices else (kind, 48)  # the sentiment question is long
    return [f"model.path={root / model}", "data.dataset=null", f"data.kind={kind}", "data.text_unit=line",
            f"data.train={root / f'train.{name}.{ext}'}", f"data.validation={root / f'valid.{name}.{ext}'}",
            "data.train_size=null", "data.validation_size=null", f"data.max_length={length}", "data.batch_size=8",
            "train.epochs=null", "train.steps=2", "train.progress=false", f"output.dir={out}",
            "eval.baselines=false"] + (  # tests/test_first_day.py checks the baselines
        # the tiny llama's 96-wide MLP is not a multiple of NF4's 64-row blocks: int8 keeps the quantized path
        ["plan.0.quantize=int8"] if recipe == "chat_sentiment_qlora.yaml" else [])


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_tiny(recipe, tiny, tmp_path):
    cfg = config.load(CONFIGS / recipe, tiny_overrides(recipe, tiny, tmp_path / "run"))
    result = finetune(cfg)
    assert result.state == "finished" and result.step == 2
    assert np.isfinite(result.after["loss"]) and result.report
    if cfg.eval.choices:
        assert 0 <= result.after["choice_accuracy"] <= 1 and "choice_accuracy" in result.report
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    expected = EXPORTS[recipe]
    if expected is None:
        assert result.export is None
    else:
        assert (Path(result.export) / expected).is_file()
    if recipe == "full.yaml":  # the pooler head is an exact BertForSequenceClassification
        import transformers

        model = transformers.AutoModelForSequenceClassification.from_pretrained(result.export)
        assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_recipe_runs_as_written_with_real_assets(recipe, tmp_path):
    """One step of the recipe with its real model and data (smaller splits), through the CLI.

    Each run is its own `jaxtune train` process: the real models stay in memory for the life of
    a process (compiled executables hold them), and ten of them in one pytest process exceeded
    the 24 GiB of these machines.
    """
    # 8 held-out rows: the before/after evaluations of the 135M-parameter chat models are most of a
    # run's time on 2 CPU cores; 8 rows run the same evaluation code.
    overrides = ["train.epochs=null", "train.steps=1", "train.progress=false", f"output.dir={tmp_path / 'run'}",
                 "data.train_size=32", "data.validation_size=8", "checkpoint.every=null"]
    proc = subprocess.run([sys.executable, "-m", "jaxtune", "train", str(CONFIGS / recipe), *overrides],
                          capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0 and "could not download" in proc.stderr:
        skip_or_fail(f"the recipe's model or data could not be fetched here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 1
    assert np.isfinite(status["train"]["loss"])
