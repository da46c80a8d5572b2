"""The image recipes (configs/images_*.yaml) run through ``jaxtune train``'s code path: tiny, with
a tiny random ViT and tiny image files of each task (2 steps); the real model and data are the
benchmark's (benchmarks/quality_images.py) and, one step as written, tests/test_recipes.py's slow test."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTModel

from jaxtune import config
from jaxtune.recipe import finetune

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("images_*.yaml"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_recipes")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32)).save_pretrained(root / "vit")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("valid", 8)):
        images = rng.integers(0, 255, (n, 20, 20)).astype(np.uint8)
        np.savez(root / f"{split}.classification.npz", images=images, labels=np.arange(n) % 3)
        np.savez(root / f"{split}.regression.npz", images=images, labels=(np.arange(n) % 4).astype(np.float32))
    return root


def test_both_image_recipes_are_here():
    assert RECIPES == ["images_count.yaml", "images_fashion_mnist.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_image_recipe_runs_tiny(recipe, tiny, tmp_path):
    kind = config.load(CONFIGS / recipe).data.source_kind
    cfg = config.load(CONFIGS / recipe, [
        f"model.path={tiny / 'vit'}", "plan=[{preset: freeze_all_but, last_n_blocks: 1}, "
        f"{{action: head, task: {kind}}}]", "data.dataset=null", f"data.kind={kind}", "data.images=true",
        f"data.train={tiny / f'train.{kind}.npz'}", f"data.validation={tiny / f'valid.{kind}.npz'}",
        "data.train_size=null", "data.validation_size=null", "data.batch_size=8", "train.epochs=null",
        "train.steps=2", "train.progress=false", "eval.every=2", f"output.dir={tmp_path / 'run'}"])
    result = finetune(cfg)
    assert result.state == "finished" and result.step == 2 and np.isfinite(result.after["loss"])
    metric = "accuracy" if kind == "classification" else "mae"
    assert metric in result.after and metric in result.report
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    # the work of an image step is counted in examples: 2 steps of 8 images, none padded
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train and all("tokens_per_s" not in r for r in train)
    assert all(r["examples_per_s"] / r["steps_per_s"] == pytest.approx(8) for r in train)



def test_a_truncated_image_file_stops_the_run_before_its_first_step(tiny, tmp_path):
    """Reading checks each file's header only; the Trainer decodes every file once as it starts, so
    a file cut short after its header fails naming it before training, not when its batch comes up."""
    from PIL import Image

    import jaxtune as jt
    from jaxtune.data import DataError, LoaderConfig
    from jaxtune.data.images import read_images

    folder = tmp_path / "images"
    for i in range(8):
        (folder / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), 30 * i, np.uint8)).save(folder / "ab"[i % 2] / f"{i}.png")
    broken = folder / "b" / "5.png"
    broken.write_bytes(broken.read_bytes()[:60])  # the header (size, mode) intact, the pixels cut off
    source = read_images(folder, "classification")  # passes: the header is whole
    model = jt.apply_plan(jt.load(str(tiny / "vit")), jt.head("classification"), data=source)
    with pytest.raises(DataError, match=rf"^{broken}: not a readable image"):
        jt.Trainer(model, source, run_dir=tmp_path / "run", data=LoaderConfig(batch_size=8))
    # data.verify_images: false skips the pass (a huge folder): the file fails when its batch is read
    trainer = jt.Trainer(model, source, run_dir=tmp_path / "unverified",
                         data=jt.DataConfig(batch_size=8, images=True, verify_images=False))
    with pytest.raises(DataError, match=rf"^{broken}: not a readable image"):
        trainer.fit()
    with pytest.raises(ValueError, match="^data.verify_images: applies to images; set data.images: true"):
        jt.DataConfig(verify_images=False)


def test_an_adafactor_run_another_version_laid_out_is_refused_as_such_and_its_params_still_export(tiny, tmp_path,
                                                                                                  monkeypatch):
    """A ViT trained whole with adafactor (biases too: their unfactored moments once made every save fail),
    saved while a conv kernel's moment was factored over its channels (before it was over its height and
    width): resuming it names a jaxtune version as a cause, not only another optimizer, and says how to go
    on; ``jaxtune export`` of its latest step still reads its params (not its optimizer state), the same
    weights the run exported when it finished."""
    from safetensors.numpy import load_file

    from jaxtune.cli import main
    from jaxtune.training import optim
    from jaxtune.training.rundir import RunMismatchError

    run = tmp_path / "run"

    def recipe(steps: int) -> config.Config:
        return config.load(CONFIGS / "images_fashion_mnist.yaml", [
            f"model.path={tiny / 'vit'}", "plan=[{preset: full}, {action: head, task: classification}]",
            "data.dataset=null", "data.kind=classification", "data.images=true",
            f"data.train={tiny / 'train.classification.npz'}", "data.validation=null", "data.train_size=null",
            "data.validation_size=null", "data.batch_size=8", "train.epochs=null", f"train.steps={steps}",
            "train.progress=false", "eval.every=null", "eval.best_metric=null", "optimizer.name=adafactor",
            f"output.dir={run}"])

    with monkeypatch.context() as m:
        m.setattr(optim, "_factored_axes",
                  lambda path, ndim: None if ndim - optim._stacked(path) < 2 else (ndim - 2, ndim - 1))
        assert finetune(recipe(2)).state == "finished"
    with pytest.raises(RunMismatchError, match=r"optimizer state: .*another jaxtune version .*jaxtune export"):
        finetune(recipe(4))
    assert main(["export", str(run), "--to", str(tmp_path / "again")]) == 0
    finished = load_file(run / "export" / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert finished.keys() == again.keys() and any("patch_embeddings" in k for k in again)
    for name, value in finished.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
