import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_speedup.evaluation.fid import (
    FIDStatistics,
    InceptionFeatureExtractor,
    RunningStatistics,
    compute_fid,
    compute_fid_statistics,
    frechet_distance,
    load_fid_statistics,
    save_fid_statistics,
    statistics_from_features,
)
from diffusers_speedup.evaluation.npz_io import iter_npz_array, write_adm_npz


def random_rotation(dim, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q


def closed_form_commuting(mu1, eig1, mu2, eig2):
    # Covariances sharing eigenvectors: tr((Σ1Σ2)^½) = Σ_i sqrt(a_i b_i).
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eig1) - np.sqrt(eig2)) ** 2))


def closed_form_2x2(mu1, s1, mu2, s2):
    # For a 2x2 matrix M with non-negative eigenvalues, tr(M^½) = sqrt(tr M + 2 sqrt(det M)).
    m = s1 @ s2
    trace_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def test_one_dimensional_gaussians():
    # FD(N(m1, s1²), N(m2, s2²)) = (m1 - m2)² + (s1 - s2)²
    assert frechet_distance(1.0, 4.0, -0.5, 0.25) == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2, rel=1e-12)
    assert frechet_distance([3.0], [[9.0]], [3.0], [[9.0]]) == pytest.approx(0.0, abs=1e-12)


def test_diagonal_and_commuting_covariances():
    rng = np.random.default_rng(0)
    dim = 16
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    eig1, eig2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    expected = closed_form_commuting(mu1, eig1, mu2, eig2)
    assert frechet_distance(mu1, np.diag(eig1), mu2, np.diag(eig2)) == pytest.approx(expected, rel=1e-10)
    q = random_rotation(dim, 1)
    sigma1, sigma2 = (q * eig1) @ q.T, (q * eig2) @ q.T
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_non_commuting_2x2_against_closed_form():
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 3.0]])
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form_2x2(mu1, s1, mu2, s2), rel=1e-10)


def test_near_singular_covariances_stay_finite_and_accurate():
    dim = 64
    q = random_rotation(dim, 2)
    rng = np.random.default_rng(3)
    eig1 = rng.uniform(0.5, 2.0, dim)
    eig2 = rng.uniform(0.5, 2.0, dim)
    eig1[:20] = 0.0  # rank-deficient
    eig2[10:30] = 1e-14  # numerically singular
    sigma1, sigma2 = (q * eig1) @ q.T, (q * eig2) @ q.T
    mu = np.zeros(dim)
    value = frechet_distance(mu, sigma1, mu, sigma2)
    assert np.isfinite(value)
    assert value == pytest.approx(closed_form_commuting(mu, eig1, mu, eig2), rel=1e-6)

    # A sample covariance from fewer samples than dimensions is singular; its distance to itself is 0 up to the
    # round-off floor of any square-root method (about sqrt(machine eps) * |Σ| per null direction).
    features = rng.standard_normal((20, dim)) * 3.0 + 5.0
    mean, cov = features.mean(0), np.cov(features, rowvar=False)
    assert abs(frechet_distance(mean, cov, mean, cov)) < 1e-6 * np.trace(cov)


def test_sqrtm_method_agrees_when_scipy_is_installed():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((60, 8)) * 1.5 + 0.3
    s1, s2 = statistics_from_features(a), statistics_from_features(b)
    assert s1.frechet_distance(s2, method="sqrtm") == pytest.approx(s1.frechet_distance(s2), rel=1e-8)


def test_bad_method_and_shapes_are_named():
    with pytest.raises(ValueError, match="method"):
        frechet_distance(0.0, 1.0, 0.0, 1.0, method="svd")
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_statistics_from_features_match_numpy_in_one_or_many_batches():
    rng = np.random.default_rng(5)
    # A large common offset would ruin a naive one-pass covariance.
    features = rng.standard_normal((300, 6)) * np.arange(1, 7) + 1e6
    running = RunningStatistics()
    for start in range(0, 300, 64):
        running.update(torch.from_numpy(features[start : start + 64]))
    for stats in (running.statistics(), statistics_from_features(features)):
        assert stats.num_images == 300
        np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-8, atol=1e-8)


def test_statistics_of_gaussian_samples_approach_closed_form():
    rng = np.random.default_rng(6)
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 3.0]])
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    x = rng.multivariate_normal(mu1, s1, 200_000)
    y = rng.multivariate_normal(mu2, s2, 200_000)
    estimate = statistics_from_features(x).frechet_distance(statistics_from_features(y))
    assert estimate == pytest.approx(closed_form_2x2(mu1, s1, mu2, s2), rel=2e-2)


def test_statistics_save_load_roundtrip_and_adm_reference_layout(tmp_path):
    stats = statistics_from_features(np.random.default_rng(7).standard_normal((10, 4)))
    save_fid_statistics(tmp_path / "stats.npz", stats)
    loaded = load_fid_statistics(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.num_images == 10
    # An ADM reference batch: images plus precomputed statistics; the statistics win, as in ADM's evaluator.
    np.savez(
        tmp_path / "ref.npz",
        arr_0=np.zeros((2, 4, 4, 3), np.uint8),
        mu=np.ones(4, np.float32),
        sigma=np.eye(4),
        mu_s=np.zeros(3),
        sigma_s=np.eye(3),
    )
    ref = compute_fid_statistics(tmp_path / "ref.npz", feature_extractor=lambda x: pytest.fail("no features needed"))
    np.testing.assert_array_equal(ref.mu, np.ones(4))
    with pytest.raises(KeyError, match="mu"):
        load_fid_statistics(_write(tmp_path / "images_only.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8)))


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_streamed_npz_roundtrip(tmp_path):
    images = np.random.default_rng(8).integers(0, 256, (7, 5, 3, 3), dtype=np.uint8)
    labels = np.arange(7)
    write_adm_npz(tmp_path / "s.npz", (images[i : i + 3] for i in range(0, 7, 3)), 7, (5, 3, 3), labels=labels)
    with np.load(tmp_path / "s.npz") as archive:
        np.testing.assert_array_equal(archive["arr_0"], images)
        np.testing.assert_array_equal(archive["arr_1"], labels)
        assert archive["arr_1"].dtype == np.int64
    batches = list(iter_npz_array(tmp_path / "s.npz", "arr_0", batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    with pytest.raises(ValueError, match="expected 8 images"):
        write_adm_npz(tmp_path / "bad.npz", [images], 8, (5, 3, 3))
    assert not (tmp_path / "bad.npz").exists()


def two_channel_means(images: torch.Tensor) -> torch.Tensor:
    """A tiny stand-in for Inception: (mean red, mean green) / 255 per image."""
    assert images.dtype == torch.uint8 and images.shape[1] == 3
    return images[:, :2].double().mean(dim=(2, 3)) / 255.0


def test_fid_end_to_end_with_injected_feature_extractor(tmp_path):
    rng = np.random.default_rng(9)
    base = rng.integers(0, 256, (24, 1, 1, 3)).astype(np.float64)
    samples = np.clip(base + rng.integers(-40, 40, (24, 8, 8, 3)), 0, 255).astype(np.uint8)
    real = np.clip(rng.integers(0, 200, (30, 1, 1, 3)) + rng.integers(0, 60, (30, 8, 8, 3)), 0, 255).astype(np.uint8)

    write_adm_npz(tmp_path / "samples.npz", [samples], 24, (8, 8, 3))
    (tmp_path / "real").mkdir()
    for i, image in enumerate(real):
        Image.fromarray(image).save(tmp_path / "real" / f"{i:03d}.png")

    # Independent expectation: features, np.cov and the 2x2 closed form.
    f_s = samples[..., :2].reshape(24, -1, 2).mean(1) / 255.0
    f_r = real[..., :2].reshape(30, -1, 2).mean(1) / 255.0
    expected = closed_form_2x2(f_s.mean(0), np.cov(f_s, rowvar=False), f_r.mean(0), np.cov(f_r, rowvar=False))

    fid = compute_fid(tmp_path / "samples.npz", tmp_path / "real", feature_extractor=two_channel_means, batch_size=5)
    assert fid == pytest.approx(expected, rel=1e-9)

    # Reference statistics computed once, saved, and reused give the same number.
    reference = compute_fid_statistics(tmp_path / "real", feature_extractor=two_channel_means, batch_size=7)
    reference.save(tmp_path / "ref_stats.npz")
    again = compute_fid(tmp_path / "samples.npz", tmp_path / "ref_stats.npz", feature_extractor=two_channel_means)
    assert again == pytest.approx(expected, rel=1e-9)
    assert compute_fid(samples, samples, feature_extractor=two_channel_means) == pytest.approx(0.0, abs=1e-12)


def test_reference_statistics_from_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(10)
    images = [Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)) for _ in range(6)]
    dataset = datasets.Dataset.from_dict({"picture": images, "label": list(range(6))})
    dataset = dataset.cast_column("picture", datasets.Image())
    seen_shapes = []

    def extractor(batch):
        seen_shapes.append(tuple(batch.shape))
        return two_channel_means(batch)

    stats = compute_fid_statistics(dataset, feature_extractor=extractor, batch_size=4, resolution=8)
    assert stats.num_images == 6 and seen_shapes == [(4, 3, 8, 8), (2, 3, 8, 8)]


def test_missing_torch_fidelity_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match=r'pip install "diffusers-speedup\[eval\]"'):
        InceptionFeatureExtractor()
    images = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ImportError, match=r"diffusers-speedup\[eval\]"):
        compute_fid(images, images)


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        compute_fid_statistics(tmp_path / "nothing_here", feature_extractor=two_channel_means)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        compute_fid_statistics(tmp_path / "empty", feature_extractor=two_channel_means)
    with pytest.raises(ValueError, match="uint8"):
        compute_fid_statistics(np.zeros((3, 4, 4, 3), np.float32), feature_extractor=two_channel_means)
    assert isinstance(compute_fid_statistics(FIDStatistics(np.zeros(1), np.eye(1))), FIDStatistics)


def test_evaluate_cli_writes_json(tmp_path, monkeypatch):
    import json

    from diffusers_speedup.commands import evaluate as cli

    monkeypatch.setattr(cli, "InceptionFeatureExtractor", lambda device, weights_path: two_channel_means)

    rng = np.random.default_rng(11)
    samples = rng.integers(0, 256, (9, 6, 6, 3), dtype=np.uint8)
    real = rng.integers(0, 128, (12, 6, 6, 3), dtype=np.uint8)
    write_adm_npz(tmp_path / "samples.npz", [samples], 9, (6, 6, 3))
    np.savez(tmp_path / "real.npz", arr_0=real)
    result = cli.main(
        [str(tmp_path / "samples.npz"), str(tmp_path / "real.npz"), "--save_reference_stats", str(tmp_path / "r.npz")]
    )
    saved = json.loads((tmp_path / "samples.npz.fid.json").read_text())
    expected = compute_fid(samples, real, feature_extractor=two_channel_means)
    assert saved["fid"] == pytest.approx(expected, rel=1e-12) and result["num_samples"] == 9
    assert load_fid_statistics(tmp_path / "r.npz").num_images == 12


# --------------------------------------------------------------------- evaluate checks everything before any work


@pytest.fixture
def evaluate_cli(monkeypatch):
    """The evaluate command with torch-fidelity hidden and a stand-in feature extractor; `seen` records the size of
    every batch that reaches it."""
    from diffusers_speedup.commands import evaluate as cli

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    seen = []

    def recording_extractor(device, weights_path):
        return lambda batch: seen.append(len(batch)) or two_channel_means(batch)

    monkeypatch.setattr(cli, "InceptionFeatureExtractor", recording_extractor)
    return cli, seen


def images_npz(path, count=4, dtype=np.uint8):
    np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, (count, 6, 6, 3)).astype(dtype))
    return str(path)


@pytest.mark.parametrize(
    "reference, problem",
    [
        ("missing.npz", "reference {dir}/missing.npz does not exist"),
        ("notes.txt", "reference {dir}/notes.txt is neither an .npz file nor a folder"),
        ("broken.npz", "reference {dir}/broken.npz is not a readable .npz archive"),
        ("floats.npz", "reference {dir}/floats.npz: arr_0 must hold uint8 NHWC images"),
        ("labels.npz", "reference {dir}/labels.npz holds neither FID statistics \\(mu, sigma\\) nor images"),
        ("empty_folder", "no image files .* found under {dir}/empty_folder"),
    ],
)
def test_evaluate_names_a_bad_reference_before_any_work_even_without_torch_fidelity(
    reference, problem, evaluate_cli, tmp_path
):
    cli, seen = evaluate_cli
    (tmp_path / "notes.txt").write_text("not images")
    (tmp_path / "broken.npz").write_bytes(b"PK not really")
    images_npz(tmp_path / "floats.npz", dtype=np.float32)
    np.savez(tmp_path / "labels.npz", arr_1=np.arange(4))
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(SystemExit, match="^error: " + problem.format(dir=tmp_path)):
        cli.main([images_npz(tmp_path / "samples.npz"), str(tmp_path / reference)])
    assert seen == [] and not (tmp_path / "samples.npz.fid.json").exists()


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--output", "{dir}/no/such/folder/fid.json"], "--output .*: its folder .* does not exist"),
        (["--save_reference_stats", "{dir}/no/ref.npz"], "--save_reference_stats .*: its folder .* does not exist"),
        (["--inception_weights", "{dir}/weights.pth"], "--inception_weights .*weights.pth does not exist"),
        (["--num_samples", "1"], "--num_samples 1: FID needs at least 2 samples"),
    ],
)
def test_evaluate_checks_its_options_before_any_work(options, problem, evaluate_cli, tmp_path):
    cli, seen = evaluate_cli
    argv = [images_npz(tmp_path / "samples.npz"), images_npz(tmp_path / "real.npz")]
    with pytest.raises(SystemExit, match="^error: " + problem):
        cli.main(argv + [option.format(dir=tmp_path) for option in options])
    assert seen == []


def test_evaluate_without_torch_fidelity_is_one_line_naming_the_extra(evaluate_cli, tmp_path, monkeypatch):
    cli, _ = evaluate_cli
    monkeypatch.setattr(cli, "InceptionFeatureExtractor", InceptionFeatureExtractor)
    with pytest.raises(SystemExit) as caught:
        cli.main([images_npz(tmp_path / "samples.npz"), images_npz(tmp_path / "real.npz")])
    message = str(caught.value)
    assert message.startswith("error: FID features need the optional dependency torch-fidelity")
    assert 'pip install "diffusers-speedup[eval]"' in message and "\n" not in message
    # Two sets of statistics need no features, hence no torch-fidelity.
    save_fid_statistics(tmp_path / "a.npz", FIDStatistics(np.zeros(2), np.eye(2), 10))
    save_fid_statistics(tmp_path / "b.npz", FIDStatistics(np.ones(2), np.eye(2), 10))
    assert cli.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])["fid"] == pytest.approx(2.0)
