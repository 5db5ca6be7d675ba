"""Latent caching with a tiny AutoencoderKL on a folder of real JPEG/PNG files, bad ones included, and the reader."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from PIL import Image
from tiny_models import tiny_vae

from diffusers_speedup.data.latent_cache import cache_latents
from diffusers_speedup.data.latent_dataset import LatentDataset, LatentNormalization
from diffusers_speedup.data.preprocessing import preprocess_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTION = 32
GOOD = {
    "cat/a_rgb.jpg",
    "cat/b_cmyk.jpg",
    "cat/c_gray.png",
    "dog/a_rgba.png",
    "dog/b_palette.png",
    "dog/c_rgb.png",
    "dog/d_rgb.jpg",
    "zebra/a_rgb.jpg",
}
BAD = {"cat/d_corrupt.jpg": "corrupt", "dog/e_small.png": "too small", "zebra/b_truncated.jpg": "truncated|corrupt"}


def _tiny_vae():
    return tiny_vae(RESOLUTION)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    rng = np.random.default_rng(0)
    noise = lambda h, w, c=3: rng.integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()  # noqa: E731
    for folder in ("cat", "dog", "zebra"):
        (images / folder).mkdir(parents=True)
    Image.fromarray(noise(40, 56)).save(images / "cat/a_rgb.jpg")
    Image.fromarray(noise(48, 40)).convert("CMYK").save(images / "cat/b_cmyk.jpg")
    Image.fromarray(noise(36, 36, 1)).save(images / "cat/c_gray.png")
    (images / "cat/d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (images / "cat/notes.txt").write_text("not an image, ignored")
    Image.fromarray(noise(64, 70, 4), mode="RGBA").save(images / "dog/a_rgba.png")
    Image.fromarray(noise(33, 50)).convert("P").save(images / "dog/b_palette.png")
    Image.fromarray(noise(80, 96)).save(images / "dog/c_rgb.png")
    Image.fromarray(noise(32, 32)).save(images / "dog/d_rgb.jpg")
    Image.fromarray(noise(20, 60)).save(images / "dog/e_small.png")
    Image.fromarray(noise(50, 50)).save(images / "zebra/a_rgb.jpg")
    Image.fromarray(noise(64, 64)).save(images / "zebra/b_truncated.jpg")
    data = (images / "zebra/b_truncated.jpg").read_bytes()
    (images / "zebra/b_truncated.jpg").write_bytes(data[: len(data) // 2])
    vae = _tiny_vae()
    vae.save_pretrained(root / "vae")
    reference = root / "reference"
    metadata = cache_latents(
        str(reference), image_folder=str(images), vae=str(root / "vae"), resolution=RESOLUTION,
        batch_size=3, chunk_size=4, num_workers=0, progress=False,
    )  # fmt: skip
    return {"root": root, "images": images, "vae": root / "vae", "reference": reference, "metadata": metadata}


def _run(workspace, output_dir, **kwargs):
    arguments = dict(image_folder=str(workspace["images"]), vae=str(workspace["vae"]), resolution=RESOLUTION)
    arguments.update(batch_size=3, chunk_size=4, num_workers=0, progress=False)
    arguments.update(kwargs)
    return cache_latents(str(output_dir), **arguments)


def _assert_same_rows(path_a, path_b, atol=0.0):
    a, b = load_from_disk(str(path_a)), load_from_disk(str(path_b))
    assert a["path"] == b["path"] and a["index"] == b["index"] and a["label"] == b["label"]
    for column in ("mean", "std", "mean_flip", "std_flip"):
        np.testing.assert_allclose(
            np.asarray(a.with_format("numpy")[column]), np.asarray(b.with_format("numpy")[column]), atol=atol, rtol=0
        )


def test_counts_rejections_and_order(workspace):
    metadata = workspace["metadata"]
    assert (metadata["num_inputs"], metadata["num_accepted"], metadata["num_rejected"]) == (11, 8, 3)
    reasons = {entry["path"]: entry["reason"] for entry in metadata["rejected"]}
    assert set(reasons) == set(BAD)
    for path, pattern in BAD.items():
        assert any(word in reasons[path] for word in pattern.split("|")), reasons[path]
    assert metadata["class_names"] == ["cat", "dog", "zebra"] and metadata["num_classes"] == 3
    assert metadata["latent_shape"] == [4, 16, 16] and metadata["scaling_factor"] == pytest.approx(0.18215)
    assert metadata["resolution"] == RESOLUTION and metadata["crop_method"] == "adm_center_crop"
    dataset = load_from_disk(str(workspace["reference"]))
    assert dataset["path"] == sorted(GOOD)  # deterministic input order, rejected files left out
    assert dataset["index"] == sorted(dataset["index"]) and len(set(dataset["index"])) == 8
    assert dataset["label"] == [0, 0, 0, 1, 1, 1, 1, 2]
    assert dataset.features["label"].names == ["cat", "dog", "zebra"]
    with open(workspace["reference"] / "latents_metadata.json") as file:
        assert json.load(file)["vae_fingerprint"] == metadata["vae_fingerprint"]
    assert not (workspace["reference"] / "chunks").exists()


def test_latents_equal_direct_vae_encode(workspace):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(workspace["vae"])).eval()
    dataset = load_from_disk(str(workspace["reference"])).with_format("numpy")
    for row in (0, 4):
        path = dataset[row]["path"]
        pixels = torch.from_numpy(preprocess_image(str(workspace["images"] / path), RESOLUTION).copy()).permute(2, 0, 1)
        x = pixels.float()[None] / 127.5 - 1
        with torch.no_grad():
            direct = vae.encode(x).latent_dist
            mirrored = vae.encode(x.flip(-1)).latent_dist
        for column, expected in (("mean", direct.mean), ("std", direct.std), ("mean_flip", mirrored.mean)):
            stored = torch.from_numpy(np.asarray(dataset[row][column], dtype=np.float32))
            torch.testing.assert_close(stored, expected[0].half().float(), atol=2e-3, rtol=2e-3)


def test_killed_run_resumes_to_the_same_dataset(workspace, tmp_path):
    written = []

    def crash_after_two(chunk):
        written.append(chunk)
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        _run(workspace, tmp_path / "cache", on_chunk_written=crash_after_two)
    assert written == [0, 1] and not (tmp_path / "cache" / "latents_metadata.json").exists()
    resumed = []
    metadata = _run(workspace, tmp_path / "cache", on_chunk_written=resumed.append)
    assert resumed == [2]  # chunks 0 and 1 are not encoded again
    assert metadata["num_accepted"] == 8 and metadata["num_rejected"] == 3
    _assert_same_rows(workspace["reference"], tmp_path / "cache")
    assert _run(workspace, tmp_path / "cache")["num_accepted"] == 8  # complete cache: nothing to do


def test_refuses_a_folder_made_with_another_vae_or_resolution(workspace, tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        _run(workspace, workspace["reference"], resolution=16)
    other = _tiny_vae()
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other_vae")
    with pytest.raises(ValueError, match="vae_fingerprint"):
        _run(workspace, workspace["reference"], vae=str(tmp_path / "other_vae"))
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a latent cache"):
        _run(workspace, tmp_path / "unrelated")


@pytest.mark.slow
def test_two_processes_give_the_same_rows_as_one(workspace, tmp_path):
    output = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581",
        os.path.join(REPO, "train", "cache_latents.py"), "--output_dir", str(output),
        "--image_folder", str(workspace["images"]), "--vae", str(workspace["vae"]), "--resolution", str(RESOLUTION),
        "--batch_size", "3", "--chunk_size", "4", "--num_workers", "0", "--no_progress", "--keep_chunks",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    # Each chunk records the process (of how many) that wrote it: both ranks of a world of two did the work.
    records = [json.loads(path.read_text()) for path in sorted((output / "chunks").glob("*.json"))]
    writers = {(record["rank"], record["world_size"]) for record in records}
    assert writers == {(0, 2), (1, 2)}
    # Thread counts differ between the runs, so allow fp16 rounding of float32 sums that differ in the last bit.
    _assert_same_rows(workspace["reference"], output, atol=1e-3)


def test_reader_statistics_mirror_choice_and_rank_split(workspace):
    latents = LatentDataset(str(workspace["reference"]))
    assert len(latents) == 8 and latents.latent_shape == (4, 16, 16) and latents.num_classes == 3
    assert latents.scaling_factor == pytest.approx(0.18215) and latents.has_flip
    dataset = load_from_disk(str(workspace["reference"])).with_format("numpy")
    batch = latents.read_batch([5, 1])
    assert batch["mean"].dtype == torch.float16 and batch["mean"].shape == (2, 4, 16, 16)
    assert batch["label"].tolist() == [dataset[5]["label"], dataset[1]["label"]]
    np.testing.assert_array_equal(batch["std_flip"][0].numpy(), dataset[5]["std_flip"].astype(np.float16))

    # Statistics without mirroring: z = (mean + std * eps) * s is Gaussian with mean s*mean and std s*std.
    many = latents.read_batch([3] * 4000)
    z, labels, _ = latents.sample(many, generator=torch.Generator().manual_seed(0), random_flip=False)
    scale, mean, std = latents.scaling_factor, many["mean"][0].float(), many["std"][0].float()
    assert z.shape == (4000, 4, 16, 16) and labels.eq(dataset[3]["label"]).all()
    standardized = (z / scale - mean) / std
    assert standardized.mean().abs() < 0.01 and (standardized.std() - 1).abs() < 0.01

    # Mirror choice: with std = 0 each sample is exactly s*mean or s*mean_flip, about half each.
    zero_std = {**many, "std": torch.zeros_like(many["std"]), "std_flip": torch.zeros_like(many["std"])}
    z = latents.sample(zero_std, generator=torch.Generator().manual_seed(1))[0]
    plain = torch.isclose(z, scale * many["mean"].float()).flatten(1).all(1)
    mirror = torch.isclose(z, scale * many["mean_flip"].float()).flatten(1).all(1)
    assert torch.all(plain ^ mirror) and 1800 < mirror.sum() < 2200

    # Ranks split every epoch into disjoint batches covering all rows.
    batches = [latents.index_batches(2, epoch=1, seed=3, rank=rank, world_size=2) for rank in range(2)]
    seen = [
        index
        for rank_batches in batches
        for indices in rank_batches
        for index in latents.read_batch(indices)["index"].tolist()
    ]
    assert sorted(seen) == list(range(8))
    in_memory = LatentDataset(str(workspace["reference"]), in_memory=True)
    assert torch.equal(in_memory.read_batch([5, 1])["mean"], batch["mean"])


def test_normalizations_follow_the_vae_config_conventions():
    z = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * 5 + 2
    sd = LatentNormalization.from_vae_config({"scaling_factor": 0.18215, "shift_factor": None})
    torch.testing.assert_close(sd.normalize(z), z * 0.18215)
    flux = LatentNormalization.from_vae_config({"scaling_factor": 0.3611, "shift_factor": 0.1159})
    torch.testing.assert_close(flux.normalize(z), (z - 0.1159) * 0.3611)
    # EDM2: (z - raw_mean) / raw_std * 0.5 per channel; SDXL pipelines decode with x * std / scaling_factor + mean.
    mean, std = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]
    edm2 = LatentNormalization.per_channel(mean, std, target_std=0.5)
    expected = torch.stack([(z[:, c] - mean[c]) / std[c] * 0.5 for c in range(4)], dim=1)
    torch.testing.assert_close(edm2.normalize(z), expected)
    assert edm2.vae_config() == {"scaling_factor": 0.5, "shift_factor": None, "latents_mean": mean, "latents_std": std}
    assert LatentNormalization.from_vae_config(edm2.vae_config()) == edm2
    for normalization in (sd, flux, edm2):
        torch.testing.assert_close(normalization.denormalize(normalization.normalize(z)), z)
    with pytest.raises(ValueError, match="3 channels but the latents have 4"):
        LatentNormalization.per_channel(mean[:3], std[:3]).normalize(z)
    with pytest.raises(ValueError, match="latents_std must be positive"):
        LatentNormalization.per_channel(mean, [1, 1, 0, 1])
    with pytest.raises(ValueError, match="together"):
        LatentNormalization(0.5, latents_mean=(0.0,) * 4)


def test_measured_statistics_normalize_each_channel(workspace):
    latents = LatentDataset(str(workspace["reference"]))
    mean, std = latents.latent_statistics()
    # Closed form over the stored posteriors: E[z] = E[m], Var[z] = E[m² + s²] - E[m]², per channel.
    rows = load_from_disk(str(workspace["reference"])).with_format("numpy")
    m = np.stack(rows["mean"]).astype(np.float64)
    s = np.stack(rows["std"]).astype(np.float64)
    expected_mean = m.mean(axis=(0, 2, 3))
    expected_std = np.sqrt((m**2 + s**2).mean(axis=(0, 2, 3)) - expected_mean**2)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(std, expected_std, rtol=1e-12)
    assert latents.latent_statistics(max_rows=3) != (mean, std)  # a strict subset of the rows

    latents.normalization = LatentNormalization.per_channel(mean, std, target_std=0.5)
    z, _, _ = latents.sample(
        latents.read_batch(list(range(len(latents))) * 500),
        generator=torch.Generator().manual_seed(0),
        random_flip=False,
    )
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.01
    assert (z.std(dim=(0, 2, 3)) - 0.5).abs().max() < 0.01


def test_builtin_digits_source(tmp_path):
    metadata = cache_latents(
        str(tmp_path / "digits"), builtin="digits", vae=_tiny_vae(), resolution=RESOLUTION,
        max_images=5, batch_size=5, chunk_size=8, num_workers=0, progress=False, flip=False,
    )  # fmt: skip
    assert metadata["num_accepted"] == 5 and metadata["class_names"] == [str(d) for d in range(10)]
    latents = LatentDataset(str(tmp_path / "digits"))
    assert not latents.has_flip and latents.labels.tolist() == [1, 2, 3, 4, 5]


def test_hf_dataset_source_with_custom_columns(tmp_path):
    from diffusers_speedup.data.builtin import load_builtin_dataset

    digits = load_builtin_dataset(resolution=RESOLUTION, split="test", channels=3).select(range(4))
    digits.rename_columns({"image": "img", "label": "y"}).save_to_disk(str(tmp_path / "hf"))
    metadata = cache_latents(
        str(tmp_path / "cache"), dataset=str(tmp_path / "hf"), image_column="img", label_column="y",
        vae=_tiny_vae(), resolution=RESOLUTION, batch_size=4, num_workers=0, progress=False, flip=False,
    )  # fmt: skip
    assert metadata["num_accepted"] == 4 and metadata["num_classes"] == 10
    assert load_from_disk(str(tmp_path / "cache"))["label"] == digits["label"]
    with pytest.raises(ValueError, match="image_column='image'"):
        cache_latents(str(tmp_path / "other"), dataset=str(tmp_path / "hf"), vae=_tiny_vae(), resolution=RESOLUTION)


def test_pixel_dataset_from_an_image_folder(workspace):
    from diffusers_speedup.data.pixels import load_pixel_dataset

    data = load_pixel_dataset(str(workspace["images"]), resolution=RESOLUTION)
    assert data.images.shape == (8, 3, RESOLUTION, RESOLUTION) and data.random_flip
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2] and data.class_names == ["cat", "dog", "zebra"]
    assert {entry["path"] for entry in data.rejected} == set(BAD)


@pytest.mark.slow
def test_benchmark_tiny_mode_runs(tmp_path):
    script = os.path.join(REPO, "benchmarks", "bench_cache_latents.py")
    command = [sys.executable, script, "--tiny", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "img/s" in result.stdout
    assert json.loads((tmp_path / "caching.json").read_text())


def test_a_mistyped_local_vae_path_says_that_the_path_does_not_exist(workspace, tmp_path, monkeypatch):
    from diffusers_speedup.data.latent_cache import load_vae

    for typo in (str(workspace["root"] / "vea"), "./no_such_vae", str(workspace["vae"]) + "/../../vaes/x/y"):
        with pytest.raises(FileNotFoundError, match="the local folder .* does not exist"):
            load_vae(typo)
    # A sibling of an existing folder is a path too, not the Hub id "<folder>/<name>".
    monkeypatch.chdir(workspace["root"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae("vae/typo")


def test_cache_cli_errors_are_one_line_with_a_non_zero_exit(workspace, tmp_path):
    from diffusers_speedup.commands import cache_latents as cli

    common = ["--image_folder", str(workspace["images"]), "--num_workers", "0", "--no_progress"]
    with pytest.raises(SystemExit) as caught:
        cli.main(["--output_dir", str(tmp_path / "a"), *common, "--vae", str(tmp_path / "vea")])
    assert str(caught.value).startswith("error: vae=") and "does not exist" in str(caught.value)
    # A cache in which every image is rejected (all smaller than the resolution) fails and stays incomplete.
    with pytest.raises(SystemExit) as caught:
        cli.main(["--output_dir", str(tmp_path / "b"), *common, "--vae", str(workspace["vae"]), "--resolution", "512"])
    message = str(caught.value)
    assert "no image was accepted: all 11 inputs were rejected" in message and "too small" in message
    assert "\n" not in message and not (tmp_path / "b" / "latents_metadata.json").exists()


def test_exif_orientation_is_applied_before_the_crop(tmp_path):
    from diffusers_speedup.data.preprocessing import EXIF_ORIENTATION

    # A 48x32 landscape sensor image tagged "rotate 90° clockwise to view" (orientation 6) is a 32x48 portrait.
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "tagged.png", exif=exif.tobytes())
    upright = np.rot90(pixels, k=-1)  # what a viewer shows: the sensor image turned 90° clockwise
    assert upright.shape == (48, 32, 3)
    expected = preprocess_image(Image.fromarray(np.ascontiguousarray(upright)), 32)
    np.testing.assert_array_equal(preprocess_image(str(tmp_path / "tagged.png"), 32), expected)
    assert EXIF_ORIENTATION == "exif_transpose"


def test_a_failed_cache_push_is_one_line_without_the_token(workspace, tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    sys.path.insert(0, os.path.dirname(__file__))
    from fake_hub import FakeHub

    from diffusers_speedup.hub import PushError

    token = "hf_CachePushToken0123456789"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    hub = FakeHub(upload_mode="lfs").install()
    try:
        hub.fail_requests(100, r"/(preupload|commit)/", echo_headers=True)
        with pytest.raises(PushError) as caught:
            _run(workspace, workspace["reference"], push_to_hub="me/latents")  # the complete cache, pushed again
    finally:
        hub.uninstall()
    message = str(caught.value)
    assert message.startswith("pushing dataset ") and "simulated outage" in message and "\n" not in message
    assert token not in message and "***" in message


# ------------------------------------------------------------------ the command's options, spelled as the recipes


def _cache_arguments(monkeypatch, argv):
    """The keyword arguments the cache-latents command hands to `cache_latents` for `argv` (nothing is cached)."""
    from diffusers_speedup.commands import cache_latents as cli

    seen = {}
    monkeypatch.setattr(cli, "cache_latents", lambda output_dir, **kwargs: seen.update(kwargs))
    cli.main(["--output_dir", "unused", "--builtin", "digits", *argv])
    return seen


def _last_error_line(capsys, argv, monkeypatch):
    with pytest.raises(SystemExit) as caught:
        _cache_arguments(monkeypatch, argv)
    assert caught.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cache_cli_precision_is_mixed_precision_and_the_old_dtype_still_works(monkeypatch, capsys):
    assert _cache_arguments(monkeypatch, [])["dtype"] == "auto"  # fp16 on a GPU, fp32 on the CPU
    assert _cache_arguments(monkeypatch, ["--mixed_precision", "bf16"])["dtype"] == "bf16"
    with pytest.warns(FutureWarning, match="--dtype fp16 is deprecated.*use --mixed_precision fp16"):
        assert _cache_arguments(monkeypatch, ["--dtype", "fp16"])["dtype"] == "fp16"
    last_line = _last_error_line(capsys, ["--mixed_precision", "float16"], monkeypatch)
    assert "error: argument --mixed_precision: invalid choice: 'float16'" in last_line
    last_line = _last_error_line(capsys, ["--mixed_precision", "bf16", "--dtype", "fp16"], monkeypatch)
    assert "error: argument --dtype: not allowed with argument --mixed_precision" in last_line


def test_cache_cli_pushes_with_push_to_hub_and_hub_dataset_id_public_unless_private(monkeypatch, capsys):
    assert _cache_arguments(monkeypatch, [])["push_to_hub"] is None
    pushed = _cache_arguments(monkeypatch, ["--push_to_hub", "--hub_dataset_id", "me/latents"])
    assert (pushed["push_to_hub"], pushed["private"]) == ("me/latents", False)
    pushed = _cache_arguments(monkeypatch, ["--push_to_hub", "--hub_dataset_id", "me/latents", "--private"])
    assert (pushed["push_to_hub"], pushed["private"]) == ("me/latents", True)
    last_line = _last_error_line(capsys, ["--push_to_hub"], monkeypatch)
    assert "error: --push_to_hub needs --hub_dataset_id user/name" in last_line
    last_line = _last_error_line(capsys, ["--private", "--public"], monkeypatch)
    assert "error: argument --public: not allowed with argument --private" in last_line


def test_cache_cli_old_push_form_keeps_its_private_default_and_names_the_new_form(monkeypatch):
    # Written before the new form, `--push_to_hub REPO_ID` made a private repository unless --public; it still does.
    with pytest.warns(FutureWarning, match="use --push_to_hub --hub_dataset_id me/latents --private"):
        pushed = _cache_arguments(monkeypatch, ["--push_to_hub", "me/latents"])
    assert (pushed["push_to_hub"], pushed["private"]) == ("me/latents", True)
    with pytest.warns(FutureWarning) as warned:
        pushed = _cache_arguments(monkeypatch, ["--push_to_hub", "me/latents", "--public"])
    assert (pushed["push_to_hub"], pushed["private"]) == ("me/latents", False)
    messages = [str(warning.message) for warning in warned]
    assert any("use --push_to_hub --hub_dataset_id me/latents " in message for message in messages)
    assert any(message.startswith("--public is deprecated") for message in messages)


def test_cache_cli_pushes_the_cache_as_a_private_dataset(workspace, tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    sys.path.insert(0, os.path.dirname(__file__))
    from fake_hub import FakeHub

    from diffusers_speedup.commands import cache_latents as cli

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake Hub takes plain LFS uploads
    monkeypatch.setenv("HF_TOKEN", "hf_CacheCommandToken0123456789")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    argv = ["--output_dir", str(workspace["reference"]), "--image_folder", str(workspace["images"])]  # complete
    argv += ["--vae", str(workspace["vae"]), "--resolution", str(RESOLUTION), "--batch_size", "3", "--chunk_size", "4"]
    argv += ["--num_workers", "0", "--no_progress", "--push_to_hub", "--hub_dataset_id", "me/latents", "--private"]
    hub = FakeHub(upload_mode="lfs").install()
    try:
        cli.main(argv)
    finally:
        hub.uninstall()
    assert hub.private == {"me/latents": True}
    assert "latents_metadata.json" in hub.repos["me/latents"]
