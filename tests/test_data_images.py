"""Image sources and batches: folder / NPZ / IDX / JSONL layouts, decoding and normalisation against
a closed form, augmentations, resumable batches, and one-line errors naming the bad file."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxtune.data import DataError, LoaderConfig
from jaxtune.data.image_pixels import ImageSpec, ToPixels
from jaxtune.data.image_sources import read_image_folder, read_image_jsonl, read_images
from jaxtune.data.images import image_loader

SPEC = ImageSpec(size=8, channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


def _png(path, value, size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size[::-1], 3), value, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    for c, name in enumerate(("boot", "coat", "shirt")):
        for i in range(2):
            _png(tmp_path / "imgs" / name / f"{i}.png", (40 * c + 10 * i, 100, 200))
    return tmp_path / "imgs"


def _idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_folder_batches_are_resized_normalised_channels_first(folder):
    source = read_image_folder(folder)
    assert source.label_names == ("boot", "coat", "shirt") and list(source.labels) == [0, 0, 1, 1, 2, 2]
    batch = next(iter(image_loader(source, SPEC, LoaderConfig(batch_size=6), train=False)))
    assert batch["pixel_values"].shape == (6, 3, 8, 8) and batch["pixel_values"].dtype == np.float32
    # A constant image stays constant through the resize: (value / 255 - mean) / std per channel.
    rgb = np.array([40 * 2 + 10, 100, 200], np.float32) / 255
    expected = (rgb - np.array(SPEC.mean)) / np.array(SPEC.std)
    np.testing.assert_allclose(batch["pixel_values"][5], np.broadcast_to(expected[:, None, None], (3, 8, 8)),
                               atol=1e-6)
    np.testing.assert_array_equal(batch["labels"], [0, 0, 1, 1, 2, 2])


def test_evaluation_reads_on_threads_whatever_the_worker_count(folder):
    """Each evaluation iterates its loader afresh: worker processes would start anew every time."""
    import multiprocessing

    source = read_image_folder(folder)
    on_threads = list(image_loader(source, SPEC, LoaderConfig(batch_size=4), train=False))
    batches = []
    for batch in image_loader(source, SPEC, LoaderConfig(batch_size=4, worker_count=2), train=False):
        assert not multiprocessing.active_children()
        batches.append(batch)
    assert len(batches) == len(on_threads) == 2
    for ours, theirs in zip(batches, on_threads):
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert image_loader(source, SPEC, LoaderConfig(batch_size=4, worker_count=2), train=True).config.worker_count == 2


def test_evaluation_fills_the_last_batch_and_training_resumes_exactly(folder):
    source = read_image_folder(folder)
    batches = list(image_loader(source, SPEC, LoaderConfig(batch_size=4), train=False))
    np.testing.assert_array_equal(batches[1]["example_weights"], [1, 1, 0, 0])
    loader = image_loader(source, SPEC, LoaderConfig(batch_size=2, seed=3), train=True, augment=("flip", "crop"))
    it = iter(loader)
    next(it)
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    again = iter(loader)
    again.set_state(state)
    for a, b in zip(after, [next(again) for _ in range(3)], strict=True):
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])


def test_flip_mirrors_the_image():
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3)).astype(np.uint8)
    plain = ToPixels(SPEC).pixels({"image": image, "label": 0})["pixel_values"]
    flips = ToPixels(SPEC, ("flip",))
    seen = {flips.random_map({"image": image, "label": 0}, np.random.default_rng(s))["pixel_values"][0, 0, 0]
            for s in range(8)}
    assert seen == {plain[0, 0, 0], plain[0, 0, -1]}


def test_a_crop_keeps_the_image_aspect_so_it_is_squashed_as_evaluation_squashes_it():
    """Evaluation resizes a whole 3:1 image to the model's square, squashing it; the crop was a square
    box (unsquashed shapes in training). On linear ramps (red along x, green along y) the resized
    crop's slopes give the box's width and height: their ratio is the image's 3."""
    spec = ImageSpec(size=8, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3, resample=2)
    y, x = np.mgrid[0:20, 0:60]
    image = np.stack([x * 4, y * 12, np.zeros_like(x)], -1).astype(np.uint8)
    crops = ToPixels(spec, ("crop",))
    for seed in range(6):
        pixels = crops.random_map({"image": image, "label": 0}, np.random.default_rng(seed))["pixel_values"] * 255
        width = np.diff(pixels[0, 4, 2:6]).mean() / 4 * 8  # the ramp's rise per output pixel, back to input pixels
        height = np.diff(pixels[1, 2:6, 4]).mean() / 12 * 8
        assert 0.7 * 60 - 1 <= width <= 60 and width / height == pytest.approx(3, rel=0.05), (seed, width, height)


def test_deep_grey_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    """PIL's convert("L") clips 16-bit and float grey values at 255: a 16-bit scan decoded nearly all white
    (99.6 % of a full-range ramp), a float image in [0, 1] to {0, 1}."""
    from jaxtune.data.image_pixels import decode_image

    ramp = np.linspace(0, 65535, 64 * 4).astype(np.uint16).reshape(4, 64)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "deep.png"))[..., 0], (ramp >> 8).astype(np.uint8))
    unit = np.linspace(0, 1, 32, dtype=np.float32).reshape(4, 8)
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    expected = np.rint(unit * 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(str(tmp_path / "unit.tif"))[..., 0], expected)


def test_images_are_turned_upright_by_their_exif_orientation_as_transformers_loads_them(tmp_path):
    """A photo stored sideways with an EXIF orientation tag (as phones store portrait shots) was read
    sideways: transformers' load_image (what its pipelines and examples read) turns it upright."""
    from transformers.image_utils import load_image

    from jaxtune.data.image_pixels import decode_image

    pixels = np.random.default_rng(0).integers(0, 256, (5, 9, 3)).astype(np.uint8)
    for orientation in (3, 6, 8):  # 180 degrees, 90 clockwise, 90 counter-clockwise
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(tmp_path / f"o{orientation}.png", exif=exif)
        got = decode_image(str(tmp_path / f"o{orientation}.png"))
        np.testing.assert_array_equal(got, np.asarray(load_image(str(tmp_path / f"o{orientation}.png"))))
        assert got.shape == ((5, 9, 3) if orientation == 3 else (9, 5, 3))


def test_pixels_follow_the_image_processor_config_as_transformers_does(tmp_path):
    """The processor's resampling filter and do_normalize were ignored (always bilinear, always normalised
    with 0.5): a bicubic or unnormalised checkpoint got other pixels than transformers gives it."""
    from transformers import ViTImageProcessorPil

    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3)).astype(np.uint8)
    for config in ({"resample": 3}, {"do_normalize": False}, {"resample": 2, "image_mean": [0.2, 0.3, 0.4]}):
        processor = ViTImageProcessorPil(size={"height": 24, "width": 24}, **config)
        processor.save_pretrained(tmp_path)
        spec = ImageSpec.from_model_dir(24, 3, tmp_path)
        ours = ToPixels(spec).pixels({"image": image, "label": 0})["pixel_values"]
        theirs = processor(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=str(config))


def test_npz_idx_and_jsonl_layouts(tmp_path):
    images = np.random.default_rng(1).integers(0, 255, (5, 4, 4)).astype(np.uint8)
    labels = np.array([3, 1, 3, 0, 1], np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    for source in (read_images(tmp_path / "a.npz"), read_images(tmp_path / "train-images-idx3-ubyte.gz")):
        assert source.label_names == ("0", "1", "3") and list(source.labels) == [2, 1, 2, 0, 1]
        np.testing.assert_array_equal(source[4]["image"][..., 0], images[4])
    _png(tmp_path / "j" / "a.png", 7)
    (tmp_path / "j" / "rows.jsonl").write_text('{"image": "a.png", "label": 2.5}\n{"image": "a.png", "label": -1}\n')
    source = read_image_jsonl(tmp_path / "j" / "rows.jsonl", "regression")
    assert source.labels.dtype == np.float32 and list(source.labels) == [2.5, -1.0]


@pytest.mark.parametrize("case", ["corrupt_png", "text_in_folder", "image_beside_the_classes", "missing_image",
                                  "bad_json", "bad_label", "blank_label", "unreadable_row_image", "truncated_idx",
                                  "label_count", "npz_keys", "float_pixels"])
def test_bad_images_and_label_files_fail_in_one_line_naming_the_file(case, folder, tmp_path):
    if case == "corrupt_png":
        (folder / "coat" / "2.png").write_bytes(b"\x89PNG not really")
        where, call = folder / "coat" / "2.png", lambda: read_image_folder(folder)
    elif case == "text_in_folder":
        (folder / "coat" / "notes.txt").write_text("hi")
        where, call = folder / "coat" / "notes.txt", lambda: read_image_folder(folder)
    elif case == "image_beside_the_classes":
        _png(folder / "stray.png", 0)
        where, call = folder / "stray.png", lambda: read_image_folder(folder)
    elif case in ("missing_image", "bad_json", "bad_label", "blank_label", "unreadable_row_image"):
        (tmp_path / "notes.png").write_text("not an image")
        row = {"missing_image": '{"image": "nope.png", "label": 1}', "bad_json": '{"image": ',
               "bad_label": '{"image": "imgs/boot/0.png", "label": [1]}',
               "blank_label": '{"image": "imgs/boot/0.png", "label": "  "}',
               "unreadable_row_image": '{"image": "notes.png", "label": 1}'}[case]
        (tmp_path / "rows.jsonl").write_text('{"image": "imgs/boot/0.png", "label": 1}\n' + row + "\n")
        where, call = f"{tmp_path / 'rows.jsonl'}:2", lambda: read_image_jsonl(tmp_path / "rows.jsonl")
    elif case == "truncated_idx":
        _idx(tmp_path / "x-images-idx3-ubyte.gz", np.zeros((3, 4, 4)))
        with gzip.open(tmp_path / "x-images-idx3-ubyte.gz") as f:
            data = f.read()
        with gzip.open(tmp_path / "x-images-idx3-ubyte.gz", "wb") as f:
            f.write(data[:-5])
        where, call = tmp_path / "x-images-idx3-ubyte.gz", lambda: read_images(tmp_path / "x-images-idx3-ubyte.gz")
    elif case == "label_count":
        _idx(tmp_path / "x-images-idx3-ubyte.gz", np.zeros((3, 4, 4)))
        _idx(tmp_path / "x-labels-idx1-ubyte.gz", np.zeros(2))
        where, call = tmp_path / "x-labels-idx1-ubyte.gz", lambda: read_images(tmp_path / "x-images-idx3-ubyte.gz")
    else:
        arrays = {"npz_keys": {"pics": np.zeros((2, 4, 4), np.uint8)},
                  "float_pixels": {"images": np.zeros((2, 4, 4)), "labels": np.zeros(2)}}[case]
        np.savez(tmp_path / "a.npz", **arrays)
        where, call = tmp_path / "a.npz", lambda: read_images(tmp_path / "a.npz")
    with pytest.raises(DataError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{where}: ") and " — " in message, message


def test_an_image_broken_after_the_door_fails_naming_it_when_read(folder):
    source = read_image_folder(folder)
    (folder / "boot" / "1.png").write_bytes((folder / "boot" / "1.png").read_bytes()[:40])  # header intact
    with pytest.raises(DataError, match=rf"^{folder / 'boot' / '1.png'}: not a readable image"):
        source[1]
    with pytest.raises(ValueError, match="data.augment: unknown"):
        ToPixels(SPEC, ("rotate",))
    assert json.dumps(ImageSpec.from_model_dir(8, 3, None).mean) == "[0.5, 0.5, 0.5]"


def test_jsonl_rows_with_a_bom_a_line_separator_in_a_label_and_their_own_label_key(folder, tmp_path):
    """A BOM is no row, a label may hold U+2028 (JSON allows it raw; rows end at "\\n" alone), and
    ``label_field`` names the label's key; text options are refused for images, naming the field."""
    import jaxtune as jt

    rows = ['{"image": "imgs/boot/0.png", "kind": "a\u2028b"}', '{"image": "imgs/coat/0.png", "kind": "c"}']
    (tmp_path / "rows.jsonl").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    source = read_images(tmp_path / "rows.jsonl", label_field="kind")
    assert len(source) == 2 and source.label_names == ("a\u2028b", "c")
    train, _ = jt.read(tmp_path / "rows.jsonl", kind="classification", images=True, label_field="kind")
    assert train.label_names == ("a\u2028b", "c")
    with pytest.raises(DataError, match="a row needs \"image\" \\(a file path\\) and 'label'.*label_field"):
        read_images(tmp_path / "rows.jsonl")
    for option, value in (("text_field", "caption"), ("skip_bad_rows", True)):
        with pytest.raises(ValueError, match=f"^data.{option}: image data has no"):
            jt.read(tmp_path / "rows.jsonl", kind="classification", images=True, **{option: value})
    with pytest.raises(DataError, match="label_field 'kind' names a JSONL key.*class-folder tree"):
        read_images(folder, label_field="kind")


_SCAN_SCRIPT = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jaxtune.data import DataError, LoaderConfig
from jaxtune.data import image_sources, images
decoded, real = [], image_sources.decode_image  # what an ImageSource decodes its files with
image_sources.decode_image = lambda path, where=None: (decoded.append(path), real(path, where))[1]
spec = images.ImageSpec(size=8, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
loader = images.image_loader(image_sources.read_image_folder(sys.argv[3]), spec, LoaderConfig(batch_size=2),
                             train=True)
try:
    loader.scan()
    error = None
except DataError as err:
    error = str(err)
json.dump({"decoded": decoded, "error": error}, open(sys.argv[4], "w"))
"""


@pytest.mark.slow
def test_processes_split_the_image_check_and_all_fail_on_the_first_bad_file(tmp_path):
    """Each JAX process decodes every other file, and every process raises the error of the first bad
    one in order, also when another process's share holds it (one going on alone would hang)."""
    import os
    import socket
    import subprocess
    import sys

    for name in ("a", "b"):
        for i in range(4):
            _png(tmp_path / "imgs" / name / f"{i}.png", (30 * i, 60, 90))
    files = sorted(str(p) for p in (tmp_path / "imgs").rglob("*.png"))
    script = tmp_path / "scan.py"
    script.write_text(_SCAN_SCRIPT)

    def run(tag: str) -> list[dict]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{s.getsockname()[1]}"
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        procs = [subprocess.Popen([sys.executable, str(script), address, str(i), str(tmp_path / "imgs"),
                                   str(tmp_path / f"{tag}{i}.json")], env=env, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
        return [json.loads((tmp_path / f"{tag}{i}.json").read_text()) for i in range(2)]

    good = run("good")
    assert [r["error"] for r in good] == [None, None]
    assert [r["decoded"] for r in good] == [files[0::2], files[1::2]]
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    for position in (6, 7):  # process 0's share, then process 1's: cut in half, the header readable
        Image.fromarray(noise).save(files[position])
        Path(files[position]).write_bytes(Path(files[position]).read_bytes()[:1500])
    bad = run("bad")
    assert bad[0]["error"] == bad[1]["error"] and bad[0]["error"].startswith(files[6] + ": ")
    assert files[6] in bad[1]["decoded"]  # process 1 decodes process 0's bad file to raise its error too
