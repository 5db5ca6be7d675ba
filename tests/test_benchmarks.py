"""The benchmark scripts: FLOP counting against hand-computed and published values, and each script's --tiny mode."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")


def _load(name):
    """Import a benchmark script by file (benchmarks/ is a folder of scripts, not a package)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)  # the scripts import each other by file name, as when run directly
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def flops():
    return _load("flops")


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, dim))


def test_linear_flops_are_two_per_multiply_accumulate(flops):
    layer = nn.Linear(16, 32)
    x = torch.randn(3, 16)
    assert flops.count_flops(lambda: layer(x)) == 2 * 3 * 16 * 32


def test_attention_block_flops_match_hand_count(flops):
    # On the meta device, as the benchmarks count (CPU's fused SDPA kernel has no FLOP formula in torch).
    batch, tokens, dim, heads = 2, 10, 24, 3
    with torch.device("meta"):
        block = SelfAttention(dim, heads)
        x = torch.randn(batch, tokens, dim)
    # MACs: qkv projection T·d·3d, scores Q·Kᵀ T·T·d, weighted values A·V T·T·d, output projection T·d·d.
    macs = batch * (tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim)
    assert flops.count_flops(lambda: block(x)) == 2 * macs


def test_dit_xl_matches_published_gflops(flops):
    # DiT Table 4 reports 118.64 "Gflops" for DiT-XL/2 at 256 px, which are multiply-accumulates.
    # The count is 118.62 (the paper's counter rounds element-wise work differently); 0.5 % allows nothing structural.
    spec = flops.MODELS["dit-xl-2"]
    forward = flops.forward_flops_per_image(spec)
    assert forward / 2e9 == pytest.approx(118.64, rel=5e-3)
    assert flops.training_flops_per_image(spec) == 3 * forward


def test_mfu_and_peaks(flops):
    # 1000 img/s of a 712 GFLOP step on a 989.4 TFLOP/s part is 72 % utilisation.
    assert flops.mfu(1000.0, 712e9, 989.4e12) == pytest.approx(712e12 / 989.4e12)
    assert flops.mfu(1000.0, 712e9, None) is None
    assert flops.peak_flops("cpu") is None
    assert flops.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == flops.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert flops.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.5
    assert flops.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None


def test_unknown_model_is_named(flops):
    with pytest.raises(ValueError, match="dit-xxl"):
        flops.get_models(["dit-xxl"])


def test_flops_tiny_main_writes_table(flops, tmp_path):
    rows = flops.main(["--tiny", "--models", "dit-b-2", "--output_dir", str(tmp_path)])
    assert rows[0].training_gflops_per_image == pytest.approx(3 * rows[0].forward_gflops)
    assert json.loads((tmp_path / "flops.json").read_text())[0]["model"] == "dit-b-2"


def test_train_throughput_tiny(tmp_path):
    bench = _load("bench_train_throughput")
    results = bench.main(["--tiny", "--output_dir", str(tmp_path)])
    assert [(r.model, r.loop) for r in results] == [
        (model, loop) for model in ("dit-b-2", "dit-xl-2", "uvit-l-2", "edm2-xs") for loop in ("package", "plain")
    ]
    for result in results:
        assert result.error is None and result.steps == 2
        assert result.images_per_second > 0 and math.isfinite(result.final_loss)
        assert result.mfu is None  # no peak on CPU
    saved = json.loads((tmp_path / "train_throughput.json").read_text())
    assert saved["environment"]["tiny"] and len(saved["results"]) == 8
    assert "package / plain" in (tmp_path / "train_throughput.md").read_text()


def test_train_throughput_records_a_failing_loop_and_measures_the_rest(tmp_path, monkeypatch):
    bench = _load("bench_train_throughput")

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(bench, "plain_step", broken)
    results = bench.main(["--tiny", "--models", "dit-b-2", "--output_dir", str(tmp_path)])
    package, plain = results
    assert package.error is None and package.images_per_second > 0 and not package.failed
    assert plain.failed and plain.error == "failed: RuntimeError: no kernel for this"
    saved = json.loads((tmp_path / "train_throughput.json").read_text())
    assert saved["results"][1]["failed"]


def test_train_throughput_repa_runs_sit_with_and_without_the_alignment(tmp_path, monkeypatch):
    bench = _load("bench_train_throughput")
    from diffusers_speedup.objectives.repa import RepresentationAlignment

    calls = []
    original = RepresentationAlignment.loss

    def counted(self, hidden_state, image=None, **extras):
        calls.append((tuple(hidden_state.shape), image.dtype, tuple(image.shape)))
        return original(self, hidden_state, image=image, **extras)

    monkeypatch.setattr(RepresentationAlignment, "loss", counted)
    results = bench.main(["--tiny", "--models", "sit-xl-2", "--repa", "--output_dir", str(tmp_path)])
    assert [(r.model, r.loop) for r in results] == [  # SiT-XL/2 named as well is measured once
        (model, loop) for model in ("sit-xl-2", "sit-xl-2+repa") for loop in ("package", "plain")
    ]
    assert all(r.error is None and math.isfinite(r.final_loss) for r in results)
    # The term ran in every step of both REPA loops (1 warm-up + 2 timed each), on the tiny SiT's 4×4 tokens of
    # width 24 and the clean uint8 images at 64 px, and never without REPA.
    assert calls == [((4, 16, 24), torch.uint8, (4, 3, 64, 64))] * 6
    # Its model FLOPs count the encoder's forward and the projector's forward and backward on top of the network's.
    flops = _load("flops")
    by_name = {(r.model, r.loop): r for r in results}
    extra = (
        by_name[("sit-xl-2+repa", "plain")].train_gflops_per_image
        - by_name[("sit-xl-2", "plain")].train_gflops_per_image
    )
    encoder = flops.repa_encoder_flops(64, bench.TINY_ENCODER)
    projector = flops.repa_projector_flops(24, 16, projector_dim=32, z_dim=16)
    assert extra * 1e9 == pytest.approx(encoder + projector)
    assert json.loads((tmp_path / "train_throughput.json").read_text())["environment"]["repa"] is True


def test_train_throughput_repa_is_the_papers_setting_on_dinov2_b(flops):
    # REPA on SiT-XL/2 as sit_xl2_repa.yaml: block 8, λ 0.5, projector 2048, DINOv2-B, which is transformers'
    # Dinov2Config default shape; its FLOPs are flops.py --repa's +6.5 % encoder and +1.8 % projector.
    bench = _load("bench_train_throughput")
    from transformers import Dinov2Config

    setting = bench.repa_setting(tiny=False)
    assert (setting.depth, setting.weight, setting.projector_dim) == (8, 0.5, 2048)
    assert {key: getattr(Dinov2Config(), key) for key in setting.encoder} == setting.encoder
    spec = flops.get_models(["sit-xl-2"])[0]
    share = bench.repa_flops_per_image(spec, setting) / flops.training_flops_per_image(spec)
    assert share == pytest.approx(0.065 + 0.0175, abs=0.001)


def test_train_throughput_rejects_bad_arguments(tmp_path):
    bench = _load("bench_train_throughput")
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--batch_size", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="nope"):
        bench.main(["--tiny", "--models", "nope", "--output_dir", str(tmp_path)])


def _karras_sigmas(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = [i / (steps - 1) for i in range(steps)]
    return [(sigma_max ** (1 / rho) + r * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho for r in ramp]


def test_sampling_tiny_counts_network_evaluations(tmp_path):
    bench = _load("bench_sampling")
    results = bench.main(["--tiny", "--output_dir", str(tmp_path)])
    by_case = {(r.case, r.pipeline): r for r in results}
    # Guided DDIM / DPM-Solver: conditional + unconditional rows at every step, in both pipelines.
    for case, steps in (("ddim:10:1.5", 10), ("dpm_solver:5:4.0", 5)):
        for pipeline in ("ClassConditionalPipeline", "DiTPipeline"):
            assert by_case[(case, pipeline)].nfe_per_image == 2 * steps

    # EDM Heun with N = 32 steps: 2 evaluations per step except the last (to σ = 0), so 2N − 1 = 63 unguided.
    sigmas = _karras_sigmas(32)
    evaluations = [2] * 31 + [1]
    unguided = sum(evaluations)
    in_interval = sum(n for sigma, n in zip(sigmas, evaluations) if 0.19 < sigma <= 1.61)
    assert unguided == 63 and in_interval == 12  # steps 17–22 of the grid, as the guidance-interval paper says
    assert by_case[("edm2-xs heun no CFG", "ClassConditionalPipeline")].nfe_per_image == unguided
    assert by_case[("edm2-xs heun full CFG", "ClassConditionalPipeline")].nfe_per_image == 2 * unguided
    assert by_case[("edm2-xs heun interval CFG", "ClassConditionalPipeline")].nfe_per_image == unguided + in_interval
    assert "saves 40% of the network evaluations" in (tmp_path / "sampling.md").read_text()


def test_sampling_rejects_a_malformed_case(tmp_path):
    bench = _load("bench_sampling")
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--cases", "ddim-10", "--output_dir", str(tmp_path)])


def test_flow_presets_flops(flops):
    # SiT-XL/2 is DiT-XL/2's network: 118.64 Gflops (MACs) in SiT's Table 1 as in DiT's Table 4.
    dit = flops.forward_flops_per_image(flops.MODELS["dit-xl-2"])
    sit = flops.forward_flops_per_image(flops.FLOW_MODELS["sit-xl-2"])
    assert sit == dit and sit / 2e9 == pytest.approx(118.64, rel=5e-3)
    # LightningDiT's SwiGLU (hidden int(2/3 · 4d) = 3072 for d = 1152) costs d·2h + h·d = 9216·d MACs per token, GELU's
    # d·4d + 4d·d the same; RoPE and RMSNorm are element-wise. So the SD-VAE rung counts exactly DiT-XL/2's FLOPs.
    assert flops.forward_flops_per_image(flops.FLOW_MODELS["lightningdit-xl-2-sdvae"]) == dit
    # XL/1 on 16×16×32 VA-VAE latents: the same 256 tokens; the patch embedding reads and the final linear writes 32
    # values per token instead of 2·2·4 = 16, 2 · 256 · 1152 · 16 MACs more in all.
    xl1 = flops.forward_flops_per_image(flops.FLOW_MODELS["lightningdit-xl-1"])
    assert xl1 - dit == 2 * (2 * 256 * 1152 * 16)


def test_flow_presets_are_counted_by_default_but_not_benchmarked_by_default(flops):
    assert [spec.name for spec in flops.get_models()] == list(flops.MODELS)
    assert flops.get_models(["lightningdit-xl-1"])[0].sample_shape == (32, 16, 16)


def test_repas_share_of_a_step_is_the_research_notes(flops):
    # DINOv2-B/14 at 224 px: 23.2 GMAC forward, +6.5 % on SiT-XL/2's 712 training GFLOP per image and +34 % on
    # SiT-B/2's 138; the projector over 256 tokens, forward and backward, +1.8 % on XL (flow_repa.md §1.5).
    rows = {row.model: row for row in flops.repa_table()}
    assert rows["sit-xl-2"].encoder_gflops / 2 == pytest.approx(23.16, abs=0.01)
    assert rows["sit-xl-2"].encoder_share == pytest.approx(0.065, abs=0.001)
    assert rows["sit-b-2"].encoder_share == pytest.approx(0.336, abs=0.001)
    assert rows["sit-xl-2"].projector_gflops == pytest.approx(12.48, abs=0.01)
    assert rows["sit-xl-2"].projector_share == pytest.approx(0.0175, abs=0.001)
