"""What a latent cache stores for a representation encoder (REPA): the clean crop the VAE encoded, or an encoder's
features of it and of its mirror; recorded in the cache's identity and metadata, and read back consistent with the
mirror the reader picks for each row."""

import json
import shutil

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from PIL import Image
from tiny_models import tiny_vae

from diffusers_speedup.data.latent_cache import cache_latents, cached_encoder_inputs, read_cache_metadata
from diffusers_speedup.data.latent_dataset import LatentDataset
from diffusers_speedup.data.preprocessing import preprocess_image

RESOLUTION = 32
# (name, width, height): wider, taller, square, one more than twice the side (the BOX halving runs), exactly the side.
IMAGES = [
    ("a/0.png", 56, 40),
    ("a/1.jpg", 40, 70),
    ("a/2.png", 33, 33),
    ("b/0.png", 90, 66),
    ("b/1.jpg", 64, 64),
    ("b/2.png", 32, 32),
    ("b/3.png", 130, 97),
]


class Patchify(torch.nn.Module):
    """A fixed random 8×8 patch embedding: uint8 ``(B, 3, R, R)`` -> ``(B, (R/8)², 6)``. Its kernels are not
    mirror-symmetric, so the features of a mirrored crop are not a rearrangement of the crop's features."""

    def __init__(self, seed: int = 0, name: str = "test-patchify"):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(6, 3, 8, 8, generator=generator), requires_grad=False)
        self.info = {"encoder": name, "patch": 8, "seed": seed}
        self.calls = []

    def forward(self, images):
        self.calls.append((images.dtype, tuple(images.shape)))
        pixels = images.float() / 255
        return torch.nn.functional.conv2d(pixels, self.weight, stride=8).flatten(2).transpose(1, 2)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's crop as guided-diffusion writes it (openai/guided-diffusion `image_datasets.py` `center_crop_arr`):
    halve with BOX while the short side is at least twice the target, BICUBIC to the target, cut the centre."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.array(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder_inputs")
    rng = np.random.default_rng(0)
    for name, width, height in IMAGES:
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "images" / name)
    tiny_vae(RESOLUTION).save_pretrained(root / "vae")
    reference = root / "reference"
    metadata = _run({"root": root}, reference, store_images=True, feature_encoder=Patchify())
    return {"root": root, "reference": reference, "metadata": metadata}


def _run(workspace, output_dir, **kwargs):
    arguments = dict(image_folder=str(workspace["root"] / "images"), vae=str(workspace["root"] / "vae"))
    arguments.update(resolution=RESOLUTION, batch_size=2, chunk_size=3, num_workers=0, progress=False)
    arguments.update(kwargs)
    return cache_latents(str(output_dir), **arguments)


def _column(path, name) -> np.ndarray:
    """One column of every row, in its stored dtype (datasets' numpy format widens uint8 and float16)."""
    dataset = load_from_disk(str(path))
    return np.stack(dataset.with_format("numpy")[name]).astype(dataset.features[name].dtype)


def test_the_stored_image_is_the_centre_crop_the_vae_encoded(workspace):
    from diffusers import AutoencoderKL

    reference = workspace["reference"]
    features = load_from_disk(str(reference)).features
    assert features["image"].dtype == "uint8" and features["image"].shape == (3, RESOLUTION, RESOLUTION)
    paths = load_from_disk(str(reference))["path"]
    assert paths == sorted(name for name, _, _ in IMAGES)
    images, means, means_flip = (_column(reference, name) for name in ("image", "mean", "mean_flip"))
    vae = AutoencoderKL.from_pretrained(str(workspace["root"] / "vae")).eval()
    for path, stored, mean, mean_flip in zip(paths, images, means, means_flip):
        source = str(workspace["root"] / "images" / path)
        np.testing.assert_array_equal(stored, preprocess_image(source, RESOLUTION).transpose(2, 0, 1))
        # Decoded and cropped here, independently of the package's preprocessing.
        independent = adm_center_crop(Image.open(source).convert("RGB"), RESOLUTION)
        np.testing.assert_array_equal(stored, independent.transpose(2, 0, 1))
        # The VAE's posterior of these very pixels, and of their mirror, is what the row stores.
        pixels = torch.from_numpy(stored)[None].float() / 127.5 - 1
        with torch.no_grad():
            plain, mirrored = vae.encode(torch.cat([pixels, pixels.flip(-1)])).latent_dist.mean.half()
        torch.testing.assert_close(torch.from_numpy(mean), plain, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(mean_flip), mirrored, atol=2e-3, rtol=2e-3)


def test_features_are_the_encoders_of_the_crop_and_of_the_mirrored_crop(workspace):
    reference, encoder = workspace["reference"], Patchify()
    columns = load_from_disk(str(reference)).features
    assert columns["encoder_features"].dtype == "float16" == columns["encoder_features_flip"].dtype
    assert columns["encoder_features"].shape == (16, 6) == columns["encoder_features_flip"].shape
    images = torch.from_numpy(_column(reference, "image"))
    with torch.no_grad():
        expected, expected_flip = encoder(images).half(), encoder(images.flip(-1)).half()
    features = torch.from_numpy(_column(reference, "encoder_features"))
    features_flip = torch.from_numpy(_column(reference, "encoder_features_flip"))
    torch.testing.assert_close(features, expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(features_flip, expected_flip, atol=1e-3, rtol=1e-3)
    # A mirror's features are not the features with their 4×4 token grid mirrored.
    grid_mirrored = features.view(-1, 4, 4, 6).flip(2).reshape(-1, 16, 6)
    assert not torch.allclose(features_flip.float(), grid_mirrored.float(), atol=0.1)


def test_metadata_and_identity_record_the_images_and_the_encoder(workspace, tmp_path):
    expected = {"encoder": "test-patchify", "patch": 8, "seed": 0, "tokens": 16, "dim": 6}
    for recorded in (workspace["metadata"], read_cache_metadata(str(workspace["reference"]))):
        assert recorded["images"] is True and recorded["encoder_features"] == expected
        assert recorded["columns"][-3:] == ["image", "encoder_features", "encoder_features_flip"]
    identity = json.loads((workspace["reference"] / "cache_config.json").read_text())
    assert identity["images"] is True and identity["encoder_features"] == expected
    assert cached_encoder_inputs(workspace["metadata"]) == {"images": True, "encoder_features": expected}

    plain = _run(workspace, tmp_path / "plain", max_images=2)
    assert plain["images"] is False and plain["encoder_features"] is None
    assert not {"image", "encoder_features", "encoder_features_flip"} & set(plain["columns"])


def test_a_cache_written_before_the_keys_existed_loads_and_resumes(workspace, tmp_path):
    old = tmp_path / "old"
    _run(workspace, old)
    for name in ("latents_metadata.json", "cache_config.json"):
        recorded = json.loads((old / name).read_text())
        del recorded["images"], recorded["encoder_features"]
        (old / name).write_text(json.dumps(recorded))
    stored = json.loads((old / "latents_metadata.json").read_text())
    latents = LatentDataset(str(old))
    # The metadata reads as stored (a training checkpoint's data identity hashes it), the keys as their defaults.
    assert latents.metadata == stored and not latents.has_images and latents.encoder_features is None
    assert cached_encoder_inputs(stored) == {"images": False, "encoder_features": None}
    assert _run(workspace, old)["num_accepted"] == len(IMAGES)  # the same settings are not refused
    with pytest.raises(ValueError, match=r"has no column 'image'.*cache-latents --store_images"):
        LatentDataset(str(old), extra_columns=("image",))
    with pytest.raises(ValueError, match=r"has no column 'encoder_features'.*cache_latents\(\.\.\., feature_encoder="):
        LatentDataset(str(old), extra_columns=("encoder_features",))

    # An unfinished cache of then resumes without encoding its finished chunk again.
    def stop(chunk):
        raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        _run(workspace, tmp_path / "unfinished", on_chunk_written=stop)
    config = json.loads((tmp_path / "unfinished" / "cache_config.json").read_text())
    del config["images"], config["encoder_features"]
    (tmp_path / "unfinished" / "cache_config.json").write_text(json.dumps(config))
    resumed = []
    assert _run(workspace, tmp_path / "unfinished", on_chunk_written=resumed.append)["num_accepted"] == len(IMAGES)
    assert resumed == [1, 2]


def test_an_interrupted_cache_resumes_only_with_the_same_images_and_encoder(workspace, tmp_path):
    written = []

    def crash_after_two(chunk):
        written.append(chunk)
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")

    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        _run(workspace, cache, store_images=True, feature_encoder=Patchify(), on_chunk_written=crash_after_two)
    with pytest.raises(ValueError, match="images: cache has True, this run has False"):
        _run(workspace, cache, feature_encoder=Patchify())
    with pytest.raises(ValueError, match="encoder_features.encoder: cache has 'test-patchify', this run has 'other'"):
        _run(workspace, cache, store_images=True, feature_encoder=Patchify(name="other"))
    with pytest.raises(ValueError, match="encoder_features: cache has .*'tokens': 16.*this run has None"):
        _run(workspace, cache, store_images=True)

    resumed = []
    metadata = _run(workspace, cache, store_images=True, feature_encoder=Patchify(), on_chunk_written=resumed.append)
    assert written == [0, 1] and resumed == [2] and metadata["num_accepted"] == len(IMAGES)
    assert load_from_disk(str(cache))["path"] == load_from_disk(str(workspace["reference"]))["path"]
    for column in ("mean", "std", "mean_flip", "std_flip", "image", "encoder_features", "encoder_features_flip"):
        stored, expected = _column(cache, column), _column(workspace["reference"], column)
        assert stored.dtype == expected.dtype and np.array_equal(stored, expected), column


@pytest.mark.parametrize("in_memory", [False, True])
def test_the_extras_follow_the_mirror_the_reader_picks(workspace, in_memory):
    latents = LatentDataset(
        str(workspace["reference"]), extra_columns=("image", "encoder_features"), in_memory=in_memory
    )
    plain_reader = LatentDataset(str(workspace["reference"]), in_memory=in_memory)
    images, features, features_flip = (
        _column(workspace["reference"], name) for name in ("image", "encoder_features", "encoder_features_flip")
    )
    indices = torch.arange(len(latents)).repeat(4)
    batch = latents.read_batch(indices)
    assert {"image", "encoder_features", "encoder_features_flip"} <= set(batch)

    z, _, extras = latents.sample(batch, generator=torch.Generator().manual_seed(5))
    assert set(extras) == {"image", "encoder_features"} and extras["image"].dtype == torch.uint8
    # The extras do not change the draws: the latents equal those of a reader without them.
    same_z = plain_reader.sample(plain_reader.read_batch(indices), generator=torch.Generator().manual_seed(5))[0]
    assert torch.equal(z, same_z)
    # The mirror choice is the generator's first draw, one uniform per row, mirrored below 1/2 ...
    chosen = torch.rand(len(indices), generator=torch.Generator().manual_seed(5)) < 0.5
    # ... and it is the latent's choice: with std = 0 each sample is exactly s·mean or s·mean_flip.
    zero_std = {**batch, "std": torch.zeros_like(batch["std"]), "std_flip": torch.zeros_like(batch["std_flip"])}
    z, _, extras = latents.sample(zero_std, generator=torch.Generator().manual_seed(5))
    scale = latents.scaling_factor
    from_flip = torch.isclose(z, scale * batch["mean_flip"].float()).flatten(1).all(1)
    from_plain = torch.isclose(z, scale * batch["mean"].float()).flatten(1).all(1)
    assert torch.all(from_flip ^ from_plain) and torch.equal(from_flip, chosen) and 0 < chosen.sum() < len(indices)
    for position, row in enumerate(indices.tolist()):
        image, feature = extras["image"][position].numpy(), extras["encoder_features"][position].numpy()
        if chosen[position]:
            np.testing.assert_array_equal(image, images[row][:, :, ::-1])
            np.testing.assert_array_equal(feature, features_flip[row])
        else:
            np.testing.assert_array_equal(image, images[row])
            np.testing.assert_array_equal(feature, features[row])

    _, _, unflipped = latents.sample(batch, generator=torch.Generator().manual_seed(5), random_flip=False)
    assert torch.equal(unflipped["image"], torch.from_numpy(images)[indices])
    assert torch.equal(unflipped["encoder_features"], torch.from_numpy(features)[indices])


def test_without_random_flips_the_mirrored_features_are_not_read(workspace):
    latents = LatentDataset(str(workspace["reference"]), random_flip=False, extra_columns=("encoder_features",))
    assert "encoder_features_flip" not in latents.columns
    _, _, extras = latents.batch(torch.tensor([3, 0]))
    np.testing.assert_array_equal(
        extras["encoder_features"].numpy(), _column(workspace["reference"], "encoder_features")[[3, 0]]
    )
    with pytest.raises(ValueError, match="features of mirrored crops were not read"):
        latents.batch(torch.tensor([3, 0]), random_flip=True)


def test_a_cache_without_mirrors_keeps_one_view_of_the_digits(tmp_path):
    encoder = Patchify()
    metadata = cache_latents(
        str(tmp_path / "digits"), builtin="digits", vae=tiny_vae(RESOLUTION), resolution=RESOLUTION, flip=False,
        store_images=True, feature_encoder=encoder, max_images=5, batch_size=4, num_workers=0, progress=False,
    )  # fmt: skip
    assert metadata["columns"][-2:] == ["image", "encoder_features"] and metadata["encoder_features"]["tokens"] == 16
    # The probe for the token grid, then one call per batch (no mirror): uint8, channels first.
    assert encoder.calls == [
        (torch.uint8, (1, 3, 32, 32)),
        (torch.uint8, (4, 3, 32, 32)),
        (torch.uint8, (1, 3, 32, 32)),
    ]
    latents = LatentDataset(str(tmp_path / "digits"), extra_columns=("image", "encoder_features"))
    assert not latents.has_flip and latents.has_images
    _, _, extras = latents.batch(torch.arange(5), generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(extras["image"].numpy(), _column(tmp_path / "digits", "image"))
    with torch.no_grad():
        torch.testing.assert_close(extras["encoder_features"], encoder(extras["image"]).half(), atol=1e-3, rtol=1e-3)


def test_bad_feature_encoders_and_options_are_named(tmp_path):
    def run(**kwargs):
        cache_latents(
            str(tmp_path / "bad"), builtin="digits", vae=tiny_vae(RESOLUTION), resolution=RESOLUTION, max_images=2,
            num_workers=0, progress=False, **kwargs,
        )  # fmt: skip

    class Described:
        def __init__(self, info, output=None):
            self.info, self.output = info, output

        def __call__(self, images):
            return self.output(images) if self.output else torch.zeros(len(images), 4, 2)

    with pytest.raises(TypeError, match="store_images must be True or False, got 'yes'"):
        run(store_images="yes")
    with pytest.raises(TypeError, match="feature_encoder must be callable"):
        run(feature_encoder="facebook/dinov2-base")
    with pytest.raises(TypeError, match="feature_encoder.info must be a dict describing the encoder"):
        run(feature_encoder=lambda images: torch.zeros(len(images), 4, 2))
    with pytest.raises(TypeError, match="feature_encoder.info is not JSON-serialisable"):
        run(feature_encoder=Described({"weights": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"feature_encoder.info must not set \['tokens'\]"):
        run(feature_encoder=Described({"tokens": 4}))
    with pytest.raises(ValueError, match=r"returned a torch.float32 tensor of shape \(1, 8\) for 1 images"):
        run(feature_encoder=Described({}, lambda images: torch.zeros(len(images), 8)))
    with pytest.raises(ValueError, match="returned a torch.uint8 tensor"):
        run(feature_encoder=Described({}, lambda images: images.flatten(2)))
    with pytest.raises(FloatingPointError, match="not finite in float16 .largest .value. 1e\\+05"):
        run(feature_encoder=Described({}, lambda images: torch.full((len(images), 4, 2), 1e5)))
    assert not (tmp_path / "bad" / "latents_metadata.json").exists()


def test_the_command_stores_images_with_store_images(monkeypatch):
    from diffusers_speedup.commands import cache_latents as cli

    seen = {}
    monkeypatch.setattr(cli, "cache_latents", lambda output_dir, **kwargs: seen.update(kwargs))
    cli.main(["--output_dir", "unused", "--builtin", "digits"])
    assert seen["store_images"] is False
    cli.main(["--output_dir", "unused", "--builtin", "digits", "--store_images"])
    assert seen["store_images"] is True


def test_a_hand_made_cache_without_mirrored_features_is_refused_only_when_mirroring(workspace, tmp_path):
    # A hand-made cache whose features lack their mirrored column cannot mirror samples consistently.
    copy = tmp_path / "copy"
    load_from_disk(str(workspace["reference"])).remove_columns("encoder_features_flip").save_to_disk(str(copy))
    shutil.copy(workspace["reference"] / "latents_metadata.json", copy / "latents_metadata.json")
    with pytest.raises(ValueError, match="has no column 'encoder_features_flip'.*and mirrors"):
        LatentDataset(str(copy), extra_columns=("encoder_features",))
    assert (
        LatentDataset(str(copy), random_flip=False, extra_columns=("encoder_features",)).columns[-1]
        == "encoder_features"
    )


def test_batches_are_copied_out_of_every_arrow_chunk_as_stored(workspace, tmp_path):
    # Re-saved in three shards, the table has several chunks; rows come out of each, in the asked order.
    sharded = tmp_path / "sharded"
    load_from_disk(str(workspace["reference"])).save_to_disk(str(sharded), num_shards=3)
    shutil.copy(workspace["reference"] / "latents_metadata.json", sharded / "latents_metadata.json")
    columns = ("image", "encoder_features")
    latents = LatentDataset(str(sharded), extra_columns=columns)
    assert len(latents.dataset.data.table.column("image").chunks) == 3
    indices = [6, 0, 3, 3, 5, 1, 6, 2]
    batch = latents.read_batch(indices)
    for name in ("mean", "std", "mean_flip", "std_flip", "image", "encoder_features", "encoder_features_flip"):
        expected = _column(workspace["reference"], name)[indices]
        assert batch[name].numpy().dtype == expected.dtype and np.array_equal(batch[name].numpy(), expected), name
    # Arrow's own `take`, the way columns without a numpy view are read, gives the same rows.
    latents._views = dict.fromkeys(latents._views)
    assert all(torch.equal(value, batch[name]) for name, value in latents.read_batch(indices).items())
    with pytest.raises(IndexError, match=r"row indices must lie in \[0, 7\), got 0..7"):
        latents.read_batch([0, 7])
