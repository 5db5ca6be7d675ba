"""Preprocessing, the built-in digits, the pixel reader and the resumable batch order (no VAE involved)."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_speedup.data.batching import index_batches, steps_per_epoch
from diffusers_speedup.data.builtin import load_builtin_dataset
from diffusers_speedup.data.pixels import load_pixel_dataset
from diffusers_speedup.data.preprocessing import ImageRejectedError, center_crop_arr, preprocess_image, to_rgb


def test_center_crop_halves_with_box_then_crops_the_middle():
    # 72x136 at resolution 16: halved twice with BOX (72 -> 36 -> 18 < 32 stops), bicubic to 16x30 (round(34*16/18)
    # = 30), then columns 7..22 of that.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (72, 136, 3), dtype=np.uint8))
    expected = image.resize((68, 36), Image.BOX).resize((34, 18), Image.BOX).resize((30, 16), Image.BICUBIC)
    expected = np.asarray(expected)[:, 7:23]
    out = center_crop_arr(image, 16)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, expected)


def test_mode_conversions():
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.all(np.asarray(to_rgb(transparent)) == 255)  # composited on white
    half = Image.new("LA", (4, 4), (0, 128))
    assert np.all(np.abs(np.asarray(to_rgb(half)).astype(int) - 127) <= 1)  # black at alpha 0.5 over white
    sixteen_bit = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.all(np.asarray(to_rgb(sixteen_bit)) == 255)  # scaled, not clipped from a wrong range
    assert np.all(np.asarray(to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0)))) == 255)
    palette = Image.new("RGB", (4, 4), (200, 0, 0)).convert("P")
    assert to_rgb(palette).getpixel((0, 0))[0] > 150
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((1, 1)) == (77, 77, 77)


def test_preprocess_rejects_small_and_corrupt(tmp_path):
    with pytest.raises(ImageRejectedError, match="too small"):
        preprocess_image(Image.new("RGB", (31, 64)), 32)
    with pytest.raises(ImageRejectedError, match="corrupt"):
        preprocess_image(b"not an image at all", 32)
    path = tmp_path / "x.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ImageRejectedError, match="truncated|corrupt"):
        preprocess_image(str(path), 32)


def test_builtin_digits_dataset():
    train = load_builtin_dataset("digits", resolution=32, split="train")
    test = load_builtin_dataset("digits", resolution=32, split="test", channels=3)
    assert (len(train), len(test)) == (1617, 180)
    assert train.features["label"].names == [str(d) for d in range(10)]
    assert train[0]["image"].mode == "L" and train[0]["image"].size == (32, 32)
    assert test[0]["image"].mode == "RGB"
    # sklearn's digit order: test is rows 0, 10, 20, ...; the first digits are 0,1,2,... so row 0 is a "0".
    assert test[0]["label"] == 0 and train[0]["label"] == 1
    assert set(train["label"]) == set(range(10))
    again = load_builtin_dataset("digits", resolution=32, split="train")
    assert np.array_equal(np.asarray(train[5]["image"]), np.asarray(again[5]["image"]))
    with pytest.raises(ValueError, match="split"):
        load_builtin_dataset(split="validation")


def test_pixel_dataset_digits_and_flip():
    data = load_pixel_dataset("digits", resolution=16, split="test")
    assert data.images.shape == (180, 1, 16, 16) and data.images.dtype == torch.uint8
    assert data.num_classes == 10 and not data.random_flip
    x, y, extras = data.batch(torch.arange(4))
    assert x.shape == (4, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, data.images[:4].float() / 127.5 - 1)
    assert y.tolist() == data.labels[:4].tolist() and extras == {}
    generator = torch.Generator().manual_seed(3)
    flipped, _, _ = data.batch(torch.arange(64), generator=generator, random_flip=True)
    plain = data.images[:64].float() / 127.5 - 1
    is_mirror = [
        torch.equal(flipped[i], plain[i].flip(-1)) and not torch.equal(plain[i], plain[i].flip(-1)) for i in range(64)
    ]
    is_plain = [torch.equal(flipped[i], plain[i]) for i in range(64)]
    assert all(a or b for a, b in zip(is_mirror, is_plain)) and 10 < sum(is_mirror) < 54


def test_index_batches_cover_every_row_once_and_resume():
    n, batch, world = 48, 4, 3
    per_rank = [list(index_batches(n, batch, epoch=2, seed=7, rank=r, world_size=world)) for r in range(world)]
    assert all(len(b) == steps_per_epoch(n, batch, world) == 4 for b in per_rank)
    seen = torch.cat([torch.cat(b) for b in per_rank])
    assert sorted(seen.tolist()) == list(range(n))
    resumed = list(index_batches(n, batch, epoch=2, seed=7, rank=1, world_size=world, start_step=2))
    assert [t.tolist() for t in resumed] == [t.tolist() for t in per_rank[1][2:]]
    other_epoch = torch.cat(list(index_batches(n, batch, epoch=3, seed=7, rank=0, world_size=world)))
    assert other_epoch.tolist() != torch.cat(per_rank[0]).tolist()
    # 50 rows: drop_last keeps 48 distinct rows; padding covers all 50 with the two extra repeated.
    dropped = torch.cat([torch.cat(list(index_batches(50, batch, rank=r, world_size=world))) for r in range(world)])
    assert len(set(dropped.tolist())) == 48 == len(dropped)
    padded = torch.cat(
        [torch.cat(list(index_batches(50, batch, rank=r, world_size=world, drop_last=False))) for r in range(world)]
    )
    assert set(padded.tolist()) == set(range(50)) and len(padded) == 60


def image_folder(root, classes: dict) -> str:
    """`classes`: class folder name -> list of (file name, content: an image size or raw bytes)."""
    for name, files in classes.items():
        (root / name).mkdir(parents=True)
        for file_name, content in files:
            if isinstance(content, bytes):
                (root / name / file_name).write_bytes(content)
            else:
                Image.new("RGB", content, (90, 40, 200)).save(root / name / file_name)
    return str(root)


@pytest.mark.parametrize("empty", [[], [("notes.txt", b"no image here")]])
def test_a_class_folder_without_images_is_refused_by_name(empty, tmp_path):
    from diffusers_speedup.data.sources import make_source

    root = image_folder(tmp_path / "images", {"cat": [("a.png", (8, 8))], "dog": empty, "zebra": [("a.png", (8, 8))]})
    # Refused while listing, so latent caching stops before encoding anything, and the pixel reader too.
    with pytest.raises(ValueError, match="the class folder 'dog' holds no image files .*would never train"):
        make_source(image_folder=root)
    with pytest.raises(ValueError, match="the class folder 'dog' holds no image files"):
        load_pixel_dataset(root, resolution=8)


def test_a_class_folder_whose_every_image_is_rejected_is_refused_by_name(tmp_path):
    classes = {"cat": [("a.png", (8, 8))], "dog": [("a.jpg", b"\xff\xd8 not a jpeg"), ("b.png", (4, 4))]}
    root = image_folder(tmp_path / "images", classes)
    with pytest.raises(ValueError, match="every image in the class folder 'dog' was rejected \\(first: .*\\)"):
        load_pixel_dataset(root, resolution=8)
