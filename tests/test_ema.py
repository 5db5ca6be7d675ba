import math

import pytest
import torch
from safetensors.torch import load_file

from diffusers_speedup.training.ema import (
    ConstantEMA,
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    power_function_ema_beta,
    reconstruct_posthoc_ema,
    sigma_rel_to_gamma,
    solve_posthoc_coefficients,
)


class Tiny(torch.nn.Module):
    """A vector parameter whose trajectory the tests set directly, plus a buffer."""

    def __init__(self, size=1):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(size))
        self.register_buffer("counter", torch.zeros(()))

    def forward(self, x):
        return x * self.weight

    def set(self, value):
        with torch.no_grad():
            self.weight.copy_(torch.as_tensor(value, dtype=self.weight.dtype))
            self.counter += 1


def reference_gamma(sigma_rel):
    """gamma from sigma_rel = sqrt((g+1)/((g+2)^2 (g+3))), by bisection (independent of the library's root finder)."""
    f = lambda g: math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) - sigma_rel
    lo, hi = 1e-9, 1e4  # f decreasing on (0, inf)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------------------- ConstantEMA


def test_constant_ema_matches_geometric_average():
    decay, theta0 = 0.9, 0.5
    model = Tiny()
    model.set(theta0)
    ema = ConstantEMA(model, decay=decay)
    values = [math.sin(k) + 0.1 * k for k in range(1, 31)]
    for step, value in enumerate(values, start=1):
        model.set(value)
        ema.update(model, step)
    n = len(values)
    expected = decay**n * theta0 + sum((1 - decay) * decay ** (n - k) * v for k, v in enumerate(values, start=1))
    assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert ema.num_updates == n
    # Buffers are copied, not averaged.
    assert ema.model.counter.item() == model.counter.item()


def test_constant_ema_has_no_warmup():
    model = Tiny()
    ema = ConstantEMA(model, decay=0.9999)
    model.set(1.0)
    ema.update(model, step=1)
    # No warm-up: the first update already moves the average by 1 - decay (EMAModel's default would copy).
    assert ema.model.weight.item() == pytest.approx(1e-4, rel=1e-4)


def test_constant_ema_start_step():
    decay = 0.5
    model = Tiny()
    ema = ConstantEMA(model, decay=decay, start_step=2)
    trajectory = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    for step, value in trajectory.items():
        model.set(value)
        ema.update(model, step)
    # steps 1-2 copy (value 2), steps 3 and 4 average.
    expected = decay * (decay * 2.0 + (1 - decay) * 3.0) + (1 - decay) * 4.0
    assert ema.model.weight.item() == pytest.approx(expected)
    assert ema.num_updates == 2


def test_constant_ema_eval_mode_fp32_copy_and_round_trip(tmp_path):
    model = Tiny(3).to(torch.bfloat16).train()
    ema = ConstantEMA(model, decay=0.9)
    assert not ema.model.training
    assert ema.model.weight.dtype == torch.float32
    assert not ema.model.weight.requires_grad
    for step in range(1, 4):
        model.set([step, 2 * step, -step])
        ema.update(model, step)

    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    restored = ConstantEMA(Tiny(3), decay=0.9)
    restored.model.train()
    restored.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert not restored.model.training
    assert restored.step == 3 and restored.num_updates == 3
    for step in range(4, 7):
        model.set([step, 0.5, 1.0])
        ema.update(model, step)
        restored.update(model, step)
    torch.testing.assert_close(restored.model.weight, ema.model.weight, rtol=0, atol=0)

    target = Tiny(3)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, ema.model.weight)
    with pytest.raises(ValueError, match="decay"):
        ConstantEMA(Tiny(3), decay=0.5).load_state_dict(ema.state_dict())


def test_constant_ema_of_accelerate_prepared_model_is_plain_module():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        model = accelerator.prepare(torch.nn.Linear(2, 2))
        ema = ConstantEMA(model)
        assert "forward" not in ema.model.__dict__
        assert ema.model(torch.ones(1, 2)).dtype == torch.float32
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_constant_ema_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        ConstantEMA(Tiny(), decay=1.0)
    ema = ConstantEMA(Tiny(2))
    with pytest.raises(ValueError, match="parameters differ"):
        ema.update(torch.nn.Linear(1, 1), 1)


# ------------------------------------------------------------------------------------------- power-function EMA math


@pytest.mark.parametrize(
    "sigma_rel, paper_gamma", [(0.05, 16.97), (0.10, 6.94), (0.15, 3.56), (0.20, 1.83), (0.25, 0.72)]
)
def test_sigma_rel_gamma_conversion(sigma_rel, paper_gamma):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma == pytest.approx(paper_gamma, abs=0.005)
    assert gamma == pytest.approx(reference_gamma(sigma_rel), rel=1e-9)
    expected_sigma = math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
    assert gamma_to_sigma_rel(gamma) == pytest.approx(expected_sigma, rel=1e-12)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.29, 1.0])
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="valid range"):
        sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="valid range"):
        PowerFunctionEMA(Tiny(), sigma_rels=(bad,))


def test_beta_closed_form():
    gamma = 6.94
    for k in (1, 2, 5, 100):
        assert power_function_ema_beta(k * 256, 256, gamma) == pytest.approx((1 - 1 / k) ** (gamma + 1), rel=1e-12)
    assert power_function_ema_beta(1, 1, gamma) == 0.0


def test_power_function_ema_matches_closed_form_weights():
    """After updates at times t_1 < ... < t_n the profile is sum_k (t_k^(g+1) - t_(k-1)^(g+1)) / t_n^(g+1) theta_k."""
    sigma_rels = (0.05, 0.20)
    model = Tiny()
    ema = PowerFunctionEMA(model, sigma_rels=sigma_rels)
    batch_sizes = [4, 4, 8, 4, 16, 4, 4, 8, 4, 4, 4, 12]  # changing batch sizes: time counts images
    values, times, nimg = [], [], 0
    for step, batch_size in enumerate(batch_sizes, start=1):
        nimg += batch_size
        value = math.cos(0.7 * step) + 0.05 * step
        model.set(value)
        ema.update(model, step=step, nimg=nimg)
        values.append(value)
        times.append(nimg)
    for sigma_rel in sigma_rels:
        g = reference_gamma(sigma_rel)
        previous = [0] + times[:-1]
        expected = sum((t ** (g + 1) - tp ** (g + 1)) * v for t, tp, v in zip(times, previous, values)) / times[-1] ** (
            g + 1
        )
        assert ema.get_model(sigma_rel).weight.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert ema.t == nimg and ema.step == len(batch_sizes)
    with pytest.raises(ValueError, match="must increase"):
        ema.update(model, step=13, nimg=nimg)


def test_inner_products_against_numerical_integral():
    """The least-squares solution for a target equal to one of the snapshots is that snapshot alone."""
    ts, gammas = [50.0, 100.0, 100.0], [3.0, 3.0, 10.0]
    coefficients = solve_posthoc_coefficients(ts, gammas, 100.0, 10.0)
    torch.testing.assert_close(torch.tensor(coefficients), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))

    # Normal equations checked against a numerically integrated Gram matrix.
    def response(t, g, tau):
        return torch.where(tau <= t, (g + 1) / t ** (g + 1) * tau**g, torch.zeros_like(tau))

    tau = torch.linspace(0, 100, 400_001, dtype=torch.float64)
    target = (100.0, 5.0)
    basis = torch.stack([response(t, g, tau) for t, g in zip(ts, gammas)])
    gram = torch.trapezoid(basis[:, None] * basis[None], tau)
    rhs = torch.trapezoid(basis * response(*target, tau), tau)
    expected = torch.linalg.solve(gram, rhs)
    expected = expected / expected.sum()
    got = torch.tensor(solve_posthoc_coefficients(ts, gammas, *target))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------ snapshots & reconstruction


def trajectory(step, num_steps):
    tau = step / num_steps
    return [math.sin(2 * math.pi * tau) + tau**2, math.exp(-3 * tau), math.cos(5 * tau) * (1 + tau)]


def test_posthoc_reconstruction_matches_directly_tracked_ema(tmp_path):
    num_steps, batch_size, snapshot_every_steps = 600, 8, 20
    model = Tiny(3)
    ema = PowerFunctionEMA(
        model,
        sigma_rels=(0.05, 0.15),
        snapshot_dir=tmp_path,
        snapshot_every=snapshot_every_steps,
        snapshot_dtype=torch.float32,
    )
    direct = PowerFunctionEMA(model, sigma_rels=(0.05, 0.09, 0.15))
    for step in range(1, num_steps + 1):
        model.set(trajectory(step, num_steps))
        ema.update(model, step, nimg=step * batch_size)
        direct.update(model, step, nimg=step * batch_size)

    snapshots = list_snapshots(tmp_path)
    assert len(snapshots) == 2 * num_steps // snapshot_every_steps
    assert snapshots[-1]["t"] == num_steps * batch_size and snapshots[-1]["step"] == num_steps
    assert not list(tmp_path.glob("*.tmp"))

    reconstructed = reconstruct_posthoc_ema(tmp_path, [0.09, 0.05])
    target = direct.get_model(0.09).weight
    torch.testing.assert_close(reconstructed[0]["weight"], target, rtol=0, atol=2e-4)
    # A tracked profile is reproduced (it is one of the snapshots).
    torch.testing.assert_close(reconstructed[1]["weight"], direct.get_model(0.05).weight, rtol=0, atol=1e-4)
    # The reconstruction is informative: the two stored profiles differ from the target by much more.
    for sigma_rel in (0.05, 0.15):
        assert (direct.get_model(sigma_rel).weight - target).abs().max() > 100 * 2e-4
    # Buffers come from the latest snapshot.
    assert reconstructed[0]["counter"].item() == num_steps

    # Reconstruct at an earlier time: compare with an EMA that stopped there.
    half = PowerFunctionEMA(Tiny(3), sigma_rels=(0.09,))
    probe = Tiny(3)
    for step in range(1, num_steps // 2 + 1):
        probe.set(trajectory(step, num_steps))
        half.update(probe, step, nimg=step * batch_size)
    earlier = reconstruct_posthoc_ema(tmp_path, 0.09, target_t=num_steps // 2 * batch_size)
    torch.testing.assert_close(earlier["weight"], half.model.weight, rtol=0, atol=2e-4)


def test_snapshot_fp16_and_names(tmp_path):
    model = Tiny(2)
    ema = PowerFunctionEMA(model, sigma_rels=(0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=3)
    for step in range(1, 7):
        model.set([step, -step])
        ema.update(model, step)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "phema-000000000003-0.050.safetensors",
        "phema-000000000003-0.100.safetensors",
        "phema-000000000006-0.050.safetensors",
        "phema-000000000006-0.100.safetensors",
    ]
    tensors = load_file(tmp_path / names[-1])
    assert tensors["weight"].dtype == torch.float16
    assert tensors["counter"].dtype == torch.float32  # buffers keep their dtype
    torch.testing.assert_close(tensors["weight"].float(), ema.get_model(0.10).weight, rtol=1e-3, atol=1e-3)


def test_power_function_ema_state_round_trip_and_copy_to(tmp_path):
    model = Tiny(2).train()
    ema = PowerFunctionEMA(model, sigma_rels=(0.05, 0.10))
    assert all(not m.training for m in ema.models)
    for step in range(1, 6):
        model.set([step, step**0.5])
        ema.update(model, step, nimg=step * 4)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")

    restored = PowerFunctionEMA(Tiny(2), sigma_rels=(0.05, 0.10))
    restored.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    for step in range(6, 10):
        model.set([step, 1.0 / step])
        ema.update(model, step, nimg=step * 4)
        restored.update(model, step, nimg=step * 4)
    for a, b in zip(ema.models, restored.models):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
        assert not b.training

    target = Tiny(2)
    ema.copy_to(target, sigma_rel=0.10)
    torch.testing.assert_close(target.weight, ema.get_model(0.10).weight)
    with pytest.raises(ValueError, match="sigma_rels"):
        PowerFunctionEMA(Tiny(2), sigma_rels=(0.05,)).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="not tracked"):
        ema.get_model(0.2)


def test_reconstruction_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no phema"):
        reconstruct_posthoc_ema(tmp_path, 0.1)
    with pytest.raises(ValueError, match="valid range"):
        reconstruct_posthoc_ema(tmp_path, 0.3)


# ------------------------------------------------------------------------------------------------------------ CLI


def load_cli():
    from diffusers_speedup.commands import posthoc_ema

    return posthoc_ema


def test_posthoc_cli_writes_state_dicts_and_pipeline_copy(tmp_path):
    from safetensors.torch import save_file

    run_dir = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    ema = PowerFunctionEMA(model, sigma_rels=(0.05, 0.15), snapshot_dir=run_dir / "ema_snapshots", snapshot_every=4)
    for step in range(1, 13):
        with torch.no_grad():
            model.weight.add_(0.1 * step)
            model.bias.sub_(0.05)
        ema.update(model, step)

    pipeline = run_dir / "pipeline"
    (pipeline / "transformer").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "transformer" / "config.json").write_text('{"in": 3}')
    save_file(
        {k: v.half().contiguous() for k, v in model.state_dict().items()},
        str(pipeline / "transformer" / "diffusion_pytorch_model.safetensors"),
    )

    cli = load_cli()
    out = tmp_path / "out"
    cli.main(["--run_dir", str(run_dir), "--sigma_rel", "0.1", "0.05", "--output_dir", str(out)])

    expected = reconstruct_posthoc_ema(run_dir / "ema_snapshots", 0.1)
    written = load_file(out / "phema-0.100.safetensors")
    for key in ("weight", "bias"):
        torch.testing.assert_close(written[key], expected[key])
    restored = torch.nn.Linear(3, 2)
    restored.load_state_dict(load_file(out / "phema-0.050.safetensors"))

    copied = out / "phema-0.100"
    assert (copied / "model_index.json").is_file() and (copied / "transformer" / "config.json").is_file()
    weights = load_file(copied / "transformer" / "diffusion_pytorch_model.safetensors")
    assert weights["weight"].dtype == torch.float16  # keeps the exported dtype
    torch.testing.assert_close(weights["weight"], expected["weight"].half())

    with pytest.raises(SystemExit, match="no phema"):
        cli.main(["--run_dir", str(tmp_path / "out"), "--sigma_rel", "0.1", "--output_dir", str(tmp_path / "x")])


def test_posthoc_cli_dtype_is_spelled_as_the_recipes_and_still_takes_the_torch_names(tmp_path, capsys):
    snapshots = tmp_path / "snapshots"
    model = torch.nn.Linear(3, 2)
    ema = PowerFunctionEMA(model, sigma_rels=(0.05, 0.15), snapshot_dir=snapshots, snapshot_every=2)
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.add_(0.1)
        ema.update(model, step)
    cli = load_cli()
    argv = ["--snapshot_dir", str(snapshots), "--sigma_rel", "0.1"]
    cli.main([*argv, "--output_dir", str(tmp_path / "new"), "--dtype", "bf16"])
    with pytest.warns(FutureWarning, match="--dtype bfloat16 is deprecated.*use --dtype bf16"):
        cli.main([*argv, "--output_dir", str(tmp_path / "old"), "--dtype", "bfloat16"])
    new, old = (load_file(tmp_path / name / "phema-0.100.safetensors") for name in ("new", "old"))
    assert new["weight"].dtype == old["weight"].dtype == torch.bfloat16
    torch.testing.assert_close(new["weight"], old["weight"], rtol=0, atol=0)
    with pytest.raises(SystemExit) as caught:
        cli.parse_args([*argv, "--output_dir", str(tmp_path / "bad"), "--dtype", "float64"])
    assert caught.value.code == 2
    assert "error: argument --dtype: invalid choice: 'float64'" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["constant", "power"])
def test_parameter_names_are_matched_on_the_first_update_only(kind, monkeypatch):
    model = Tiny(2)
    ema = ConstantEMA(model, decay=0.5) if kind == "constant" else PowerFunctionEMA(model, sigma_rels=(0.1,))
    model.set([1.0, 2.0])
    ema.update(model, 1, nimg=4)
    monkeypatch.setattr(model, "named_parameters", lambda *args, **kwargs: pytest.fail("names matched again"))
    # Moving the model swaps each parameter's data but keeps the parameter: later updates still see its values.
    model.to(torch.float64)
    model.set([3.0, 6.0])
    ema.update(model, 2, nimg=8)
    if kind == "constant":  # 0.5 * (0.5 * 0 + 0.5 * 1) + 0.5 * 3, per element
        expected = torch.tensor([1.75, 3.5])
    else:  # the first update copies (t = delta_t); the second is a lerp by 1 - (1 - 4/8)^(gamma + 1)
        weight = 1 - 0.5 ** (ema.gammas[0] + 1)
        expected = torch.tensor([1.0, 2.0]) + weight * torch.tensor([2.0, 4.0])
    torch.testing.assert_close(ema.model.weight, expected)
