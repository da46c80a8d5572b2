"""preprocessor_config.json read as transformers' PIL-backend image processors read it: jaxtune's pixels
against the processor's own (``*ImageProcessorPil.from_pretrained`` on the same file) for every layout,
on Fashion-MNIST and synthetic non-square RGB images; a one-line refusal, naming the file and the key,
of each thing jaxtune cannot reproduce; and a size the model cannot take refused when the spec is made."""
from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from helpers import skip_or_fail
from PIL import Image

from jaxtune.assets import FetchError
from jaxtune.data import DataError
from jaxtune.data.image_pixels import ImageSpec, ToPixels
from jaxtune.models.dinov2 import Dinov2Config
from jaxtune.models.vit import ViTConfig

DEIT = {"image_processor_type": "DeiTImageProcessor"}
# (processor class, preprocessor_config.json): every layout jaxtune reproduces.
LAYOUTS = {
    "vit_square": ("ViT", {"size": {"height": 20, "width": 20}}),
    "vit_non_square_bicubic": ("ViT", {"size": {"height": 18, "width": 30}, "resample": 3}),
    "vit_int_size_is_square": ("ViT", {"size": 22, "resample": 0}),
    "vit_legacy_feature_extractor": ("ViT", {"feature_extractor_type": "ViTFeatureExtractor", "size": 16,
                                             "resample": 1}),
    "deit_class_defaults": ("DeiT", {}),  # resize 256 x 256, crop 224, bicubic: the file names only its type
    "deit_non_square": ("DeiT", {"size": {"height": 30, "width": 40}, "crop_size": {"height": 20, "width": 26},
                                 "resample": 4}),
    "deit_crop_larger_than_resize_pads": ("DeiT", {"size": {"height": 20, "width": 20}, "crop_size": 24}),
    "bit_dinov2": ("Bit", {"size": {"shortest_edge": 30}, "crop_size": {"height": 24, "width": 24}}),
    "bit_int_size_is_shortest_edge": ("Bit", {"size": 26, "crop_size": [20, 22], "resample": 5}),
    "clip": ("CLIP", {"size": {"shortest_edge": 26}, "crop_size": {"height": 20, "width": 22}}),
    "convnext_crop_pct": ("ConvNext", {"size": {"shortest_edge": 24}, "crop_pct": 0.875}),
    "convnext_from_384_squashes": ("ConvNext", {"size": {"shortest_edge": 384}}),
    "detr_style_longest_edge": ("ViT", {"size": {"shortest_edge": 20, "longest_edge": 30}, "do_center_crop": True,
                                        "crop_size": {"height": 20, "width": 20}}),
    "no_resize_crop_pads": ("ViT", {"do_resize": False, "do_center_crop": True,
                                    "crop_size": {"height": 32, "width": 24}}),
    "no_rescale_no_normalize": ("ViT", {"size": {"height": 20, "width": 20}, "do_rescale": False,
                                        "do_normalize": False}),
    "rescale_factor_and_mean": ("ViT", {"size": {"height": 20, "width": 20}, "rescale_factor": 1 / 127.5,
                                        "image_mean": [0.2, 0.3, 0.4], "image_std": 0.7}),
    "convert_rgb_flag": ("Bit", {"do_convert_rgb": False, "size": {"shortest_edge": 22},
                                 "crop_size": {"height": 22, "width": 22}}),
}


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Three Fashion-MNIST images (28 x 28 grey) and synthetic RGB ones: non-square either way, and
    smaller than the crops (padded)."""
    from jaxtune.data import read

    try:
        train, _ = read("fashion_mnist", train_size=20, validation_size=4)
    except FetchError as err:
        skip_or_fail(f"Fashion-MNIST could not be fetched here: {err}")
    rng = np.random.default_rng(0)
    synthetic = [rng.integers(0, 256, shape).astype(np.uint8) for shape in ((31, 45, 3), (40, 27, 3), (11, 15, 3))]
    return [train[i]["image"] for i in range(3)] + synthetic


def _write(tmp_path, config: dict, kind: str | None = None) -> None:
    if kind is not None and "feature_extractor_type" not in config:
        config = {"image_processor_type": f"{kind}ImageProcessor", **config}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pixels_equal_transformers_pil_image_processor(layout, images, tmp_path):
    kind, config = LAYOUTS[layout]
    _write(tmp_path, config, kind)
    theirs_processor = getattr(transformers, f"{kind}ImageProcessorPil").from_pretrained(tmp_path)
    to_pixels = ToPixels(ImageSpec.from_model_dir(7, 3, tmp_path))  # 7: a processor's own size wins
    for image in images:
        rgb = Image.fromarray(image[..., 0]).convert("RGB") if image.shape[-1] == 1 else Image.fromarray(image)
        theirs = theirs_processor(rgb, return_tensors="np")["pixel_values"][0]
        ours = to_pixels.pixels({"image": image, "label": 0})["pixel_values"]
        assert ours.shape == theirs.shape == (3, *to_pixels.spec.shape), (layout, image.shape)
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=f"{layout} {image.shape}")


def test_augmentations_keep_each_layouts_output_size(images, tmp_path):
    """A random crop is cut before the resize; whatever it cuts, the layout's crop gives the model's size."""
    for layout in ("deit_non_square", "bit_dinov2", "detr_style_longest_edge", "no_resize_crop_pads"):
        kind, config = LAYOUTS[layout]
        _write(tmp_path, config, kind)
        spec = ImageSpec.from_model_dir(7, 3, tmp_path)
        augmented = ToPixels(spec, ("flip", "crop"))
        for seed, image in enumerate(images):
            out = augmented.random_map({"image": image, "label": 0}, np.random.default_rng(seed))["pixel_values"]
            assert out.shape == (3, *spec.shape), layout


REFUSED = {
    "do_pad": ({"do_pad": True, "pad_size": {"height": 30, "width": 30}}, "do_pad"),
    "unknown_type": ({"image_processor_type": "LevitImageProcessor"}, "image_processor_type 'LevitImageProcessor'"),
    "unknown_key": ({**DEIT, "include_top": True}, "'include_top'"),
    "crop_pct_outside_convnext": ({"crop_pct": 0.9}, "'crop_pct'"),
    "longest_edge_alone": ({"size": {"longest_edge": 30}}, "size {'longest_edge': 30}"),
    "max_height": ({"size": {"max_height": 30, "max_width": 30}}, "size {'max_height'"),
    "aspect_kept_no_crop": ({"size": {"shortest_edge": 30}}, "size {'shortest_edge': 30} keeps each image's aspect"),
    "no_resize_no_crop": ({"do_resize": False}, "do_resize: false"),
    "resample": ({"resample": 7}, "resample 7"),
    "mean_length": ({"image_mean": [0.5, 0.5]}, "image_mean has 2 values"),
    "mean_text": ({"image_std": "0.5"}, "image_std '0.5' is not a number"),
    "rescale_text": ({"rescale_factor": "1/255"}, "rescale_factor '1/255' is not a number"),
    "crop_without_size": ({**DEIT, "crop_size": None}, "no crop_size"),
    "null_size": ({**DEIT, "size": None}, "size is null"),
    "null_mean": ({"image_mean": None}, "image_mean None"),
    "null_resample": ({**DEIT, "resample": None}, "resample None"),
    "crop_shortest_edge": ({"do_center_crop": True, "crop_size": {"shortest_edge": 3}}, "crop_size"),
    "negative_size": ({"size": {"height": 0, "width": 3}}, "positive integers"),
    "convnext_crops_twice": ({"image_processor_type": "ConvNextImageProcessor", "do_center_crop": True,
                              "crop_size": 20}, "do_center_crop: true after ConvNeXt"),
    "convnext_height_width": ({"image_processor_type": "ConvNextImageProcessor",
                               "size": {"height": 20, "width": 20}}, "ConvNextImageProcessor's size"),
    "not_an_object": ([1, 2], "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_jaxtune_cannot_reproduce_is_refused_naming_the_file_and_key(case, tmp_path):
    config, says = REFUSED[case]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError) as err:
        ImageSpec.from_model_dir(24, 3, tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'preprocessor_config.json'}: ") and says in message, message
    assert "\n" not in message and " — " in message, message


def test_a_grey_model_gets_one_mean_and_std(tmp_path):
    """jaxtune's files with no type (EfficientNet-Lite's) may leave the mean/std out: 0.5 per channel."""
    _write(tmp_path, {"size": {"height": 6, "width": 6}})
    spec = ImageSpec.from_model_dir(6, 1, tmp_path)
    assert (spec.mean, spec.std, spec.shape) == ((0.5,), (0.5,), (6, 6))
    image = np.arange(48, dtype=np.uint8).reshape(6, 8, 1)
    grey = Image.fromarray(image[..., 0]).resize((6, 6), Image.Resampling.BILINEAR)
    expected = (np.asarray(grey, np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(ToPixels(spec).pixels({"image": image, "label": 0})["pixel_values"][0], expected,
                               atol=1e-6)


def _vit(size: int) -> ViTConfig:
    return ViTConfig(image_size=size, patch_size=4, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2)


def test_a_size_the_model_cannot_take_is_refused_when_the_spec_is_made(tmp_path):
    """A DeiT processor (resize 32, crop 24) for a ViT of image_size 32: transformers' ViT would fail in
    its forward (no interpolate_pos_encoding); jaxtune says so before reading an image, naming the file."""
    _write(tmp_path, {"size": {"height": 32, "width": 32}, "crop_size": {"height": 24, "width": 24}}, "DeiT")
    assert ImageSpec.for_model(_vit(24), tmp_path).shape == (24, 24)
    with pytest.raises(DataError, match=r"preprocessor_config.json: the images come out 24 x 24, but this ViT takes "
                                        r"only its image_size 32 x 32 .*interpolate_pos_encoding"):
        ImageSpec.for_model(_vit(32), tmp_path)
    _write(tmp_path, {"size": {"height": 28, "width": 42}}, "ViT")  # DINOv2 interpolates: any grid
    dino = Dinov2Config.from_hf({"model_type": "dinov2", "image_size": 28, "patch_size": 14, "hidden_size": 8,
                                 "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
    assert ImageSpec.for_model(dino, tmp_path).shape == (28, 42)
    _write(tmp_path, {"size": {"height": 10, "width": 42}}, "ViT")
    with pytest.raises(DataError, match="come out 10 x 42, but this DINOv2 needs at least one patch"):
        ImageSpec.for_model(dino, tmp_path)
