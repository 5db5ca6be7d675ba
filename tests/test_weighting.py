import math

import pytest
import torch

from diffusers_speedup import compute_loss_weights
from diffusers_speedup.objectives import WEIGHTING_KINDS, LossWeighting

GAMMA = 5.0
# SNR below, at and above γ.
SNRS = torch.tensor([1.0, 5.0, 20.0])


def test_min_snr_closed_form_for_each_prediction_type():
    # ε: min(SNR, γ)/SNR; x0: min(SNR, γ); v: min(SNR, γ)/(SNR + 1)  (Hang et al. 2023, Eq. and official code)
    expected = {
        "epsilon": [1.0, 1.0, 5.0 / 20.0],
        "sample": [1.0, 5.0, 5.0],
        "v_prediction": [1.0 / 2.0, 5.0 / 6.0, 5.0 / 21.0],
    }
    for prediction_type, values in expected.items():
        weights = compute_loss_weights("min_snr", SNRS, prediction_type, gamma=GAMMA)
        torch.testing.assert_close(weights, torch.tensor(values), rtol=1e-6, atol=0)


def test_soft_min_snr_closed_form():
    # x0: SNR·γ/(SNR+γ); ε: γ/(SNR+γ); v: SNR·γ/((SNR+γ)(SNR+1)).
    s = SNRS.double()
    x0 = s * GAMMA / (s + GAMMA)
    for prediction_type, values in {"sample": x0, "epsilon": GAMMA / (s + GAMMA), "v_prediction": x0 / (s + 1)}.items():
        weights = compute_loss_weights("soft_min_snr", SNRS, prediction_type, gamma=GAMMA)
        torch.testing.assert_close(weights, values.float(), rtol=1e-6, atol=0)


def test_p2_and_edm_and_constant_closed_forms():
    s = SNRS.double()
    torch.testing.assert_close(
        compute_loss_weights("p2", SNRS, "epsilon", k=1.0, gamma=0.5), (1.0 / (1.0 + s) ** 0.5).float()
    )
    # EDM: λ(σ) = (σ² + σ_d²)/(σ σ_d)² on the x0 error, σ² = 1/SNR.
    sigma_sq, sigma_data = 1.0 / s, 0.5
    edm = (sigma_sq + sigma_data**2) / (sigma_sq * sigma_data**2)
    torch.testing.assert_close(compute_loss_weights("edm", SNRS, "sample", sigma_data=sigma_data), edm.float())
    torch.testing.assert_close(compute_loss_weights("edm", SNRS, "epsilon"), (edm / s).float())
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        assert torch.equal(compute_loss_weights("constant", SNRS, prediction_type), torch.ones(3))


def test_matches_the_corrected_diffusers_snr_gamma_block():
    # The block of diffusers' train_text_to_image.py (after the v-prediction fix), written out here.
    snr = torch.tensor([0.01, 0.3, 2.0, 5.0, 7.5, 1175.0])
    base = torch.stack([snr, GAMMA * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    reference = {"epsilon": base / snr, "v_prediction": base / (snr + 1), "sample": base}
    for prediction_type, expected in reference.items():
        torch.testing.assert_close(compute_loss_weights("min_snr", snr, prediction_type, gamma=GAMMA), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", WEIGHTING_KINDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_finite_and_non_negative_at_snr_zero_and_infinity(dtype, kind, prediction_type):
    snr = torch.tensor([0.0, 1e-12, 1e-4, 1.0, 1e4, 6e4, math.inf], dtype=dtype)
    weights = compute_loss_weights(kind, snr, prediction_type)
    assert weights.dtype == torch.float32
    assert torch.isfinite(weights).all(), weights
    assert (weights >= 0).all(), weights
    # The official Min-SNR guard: the regressed target gets weight 1 at SNR = 0.
    assert weights[0] == 1.0


def test_weights_non_negative_over_documented_parameter_ranges():
    snr = torch.logspace(-6, 6, 200)
    for gamma in (0.01, 1.0, 5.0, 100.0):
        for kind in ("min_snr", "soft_min_snr"):
            for prediction_type in ("epsilon", "v_prediction", "sample"):
                assert (compute_loss_weights(kind, snr, prediction_type, gamma=gamma) >= 0).all()
    for k, gamma in ((1.0, 0.0), (1.0, 0.5), (1.0, 1.0), (0.1, 2.0)):
        assert (compute_loss_weights("p2", snr, "epsilon", k=k, gamma=gamma) >= 0).all()


@pytest.mark.parametrize(
    ("kind", "prediction_type", "params", "message"),
    [
        ("min_snr", "epsilon", {"gamma": 0.0}, "gamma must be > 0"),
        ("soft_min_snr", "epsilon", {"gamma": -1.0}, "gamma must be > 0"),
        ("p2", "epsilon", {"k": 0.0}, "k > 0"),
        ("edm", "epsilon", {"sigma_data": 0.0}, "sigma_data must be > 0"),
        ("min_snr", "epsilon", {"gama": 5.0}, "unknown parameter"),
        ("minsnr", "epsilon", {}, "Unknown loss weighting kind 'minsnr'"),
        ("min_snr", "flow", {}, "Unknown prediction_type 'flow'"),
        ("min_snr", "epsilon", {"gamma": "5"}, "gamma must be a number"),
    ],
)
def test_bad_arguments_raise_a_clear_error(kind, prediction_type, params, message):
    with pytest.raises(ValueError, match=message):
        compute_loss_weights(kind, SNRS, prediction_type, **params)


def test_a_loss_weighting_is_checked_when_built_and_then_only_computes():
    with pytest.raises(ValueError, match="gamma must be > 0"):
        LossWeighting("min_snr", "epsilon", gamma=0.0)
    with pytest.raises(ValueError, match="Unknown prediction_type 'x0'"):
        LossWeighting("min_snr", "x0")
    weighting = LossWeighting("min_snr", "v_prediction", gamma=GAMMA)
    assert weighting.params == {"gamma": GAMMA}
    torch.testing.assert_close(weighting(SNRS), torch.tensor([1.0 / 2.0, 5.0 / 6.0, 5.0 / 21.0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(weighting.x0_space(SNRS), torch.tensor([1.0, 5.0, 5.0]), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="defined on the regressed target"):
        LossWeighting("constant").x0_space(SNRS)
