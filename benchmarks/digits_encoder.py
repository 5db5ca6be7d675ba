"""A tiny DINOv2-shaped encoder of the built-in digits, trained here without labels: REPA's target in the study.

REPA aligns a block of the diffusion model to the patch tokens of a frozen pretrained encoder (DINOv2 in the paper).
Nothing can be downloaded here, and the digits are 8×8 and grayscale, so the convergence study trains its own
encoder once, on the digits' **training split**, and caches it (like ``digits_classifier.py``):

* **Architecture**: a transformers ``Dinov2Model`` from a random ``Dinov2Config`` sized for the digits: 8×8 input,
  patch 2, hidden 64, 4 layers, 4 heads, MLP ratio 4 (0.20 M parameters). Patch 2 makes its token grid 4×4, the
  grid of the study's DiT (patch 2 on 8×8); REPA resizes the clean image to token grid × encoder patch pixels, here
  8×8, so the digits go in at their own size. Its input is REPA's preprocessing of DINOv2's: the uint8 image / 255,
  the gray channel repeated to RGB, normalised with ImageNet's mean and standard deviation (``encoder_pixels``);
  its target is the last hidden state's patch tokens (after the final LayerNorm; REPA's ``x_norm_patchtokens``).
* **Objective: SimCLR on the mean patch token.** Two augmented views of each digit (a random affine map: rotation
  within ±10°, scale 0.9–1.1, shift within ±1 pixel; and a quarter of the patches replaced by DINOv2's mask token)
  are pulled together against the other digits of the batch (NT-Xent, temperature 0.1, on an MLP projection of the
  mean patch token; 800 steps of batch 128, AdamW 1e-3: 90 s on one thread of a shared 2-core Intel Xeon,
  2026-12-02). Why: REPA aligns to features that say what the image is
  (DINOv2's), at every token; a contrastive loss on the pooled tokens gives them the digit's identity in a minute
  or two on CPU, and the tokens stay spatial (each still encodes its own patch; the feature check below measures
  both).
  Tried here first (2026-12-02, same budget): masked-patch pixel prediction (SimMIM-style, a linear head, half the
  patches masked) learned little at 8×8 (its masked-patch error on the test split was 0.058–0.078 against 0.073
  for predicting each position's mean, and a linear probe of its features was no better than of random ones), and
  adding it to SimCLR changed the features little. DINO-style self-distillation (momentum teacher, centring, many
  crops) needs more steps and can collapse at this size.
* **Fair to the evaluation**: the evaluation's classifier (``digits_classifier.py``) is a CNN trained with labels
  and cross-entropy; this encoder is a ViT, never sees a label, and the study never measures in its feature space.
* **The control**: the same encoder at its initialisation (the weights training starts from), saved next to it, so
  REPA with it has the same extra loss term and shapes but no learned features.

``load_or_train_encoders`` writes ``<cache>/digits_encoder_<hash>/{trained,random}`` with ``save_pretrained`` (and
each folder's ``preprocessor_config.json``: the preprocessing above as a ``BitImageProcessor``), and ``report.json``:
the training seconds and machine, and a sanity check of the features that the study never uses (fitted on the
training split, measured on the test split), for the trained encoder, the random one and the raw pixels:
linear-probe and 5-nearest-neighbour accuracy of the mean patch token (what the tokens say about the digit), the R²
of a linear map from one patch token to its own 2×2 patch (whether the tokens stay spatial) and to the whole 8×8
image (how much of the digit each token carries), and the mean cosine similarity between an image's tokens.

    python benchmarks/digits_encoder.py              # trains (a minute or two on CPU), prints the report
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits_classifier.py next to this file

from digits_classifier import digits_arrays  # noqa: E402

# DINOv2's (ImageNet's) normalisation, which REPA applies to the clean image before the encoder.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderSettings:
    """What the cached encoders depend on (their folder name is a hash of these).

    Args:
        resolution: side of the digits in pixels (the diffusion model's resolution).
        patch_size: the encoder's patch; resolution / patch_size is its token grid (4×4, the study DiT's).
        hidden_size, num_layers, num_heads: the ViT.
        steps, batch_size, lr: AdamW (weight decay 0.05) with a one-cycle schedule.
        temperature: NT-Xent's temperature.
        mask_ratio: the fraction of patches each view replaces by the mask token (an augmentation).
        seed: seed of the initialisation (the random control's weights), the batches and the augmentations.
    """

    resolution: int = 8
    patch_size: int = 2
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    steps: int = 800
    batch_size: int = 128
    lr: float = 1e-3
    temperature: float = 0.1
    mask_ratio: float = 0.25
    seed: int = 0


# Seconds on CPU: the test's.
TINY = EncoderSettings(hidden_size=16, num_layers=1, num_heads=2, steps=2, batch_size=8)


def encoder_config(settings: EncoderSettings):
    """The ``Dinov2Config`` of the digits encoder (DINOv2's defaults otherwise: MLP ratio 4, layer scale 1)."""
    from transformers import Dinov2Config

    if settings.resolution % settings.patch_size:
        raise ValueError(
            f"EncoderSettings: resolution {settings.resolution} is not a multiple of patch_size {settings.patch_size}."
        )
    return Dinov2Config(
        image_size=settings.resolution,
        patch_size=settings.patch_size,
        num_channels=3,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        mlp_ratio=4,
    )


def encoder_pixels(gray: torch.Tensor) -> torch.Tensor:
    """The encoder's input from grayscale pixels in [0, 1], shape (N, 1, H, W): repeated to RGB and normalised with
    ImageNet's statistics, as REPA preprocesses the clean image for DINOv2 (uint8 / 255, then the normalisation)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=gray.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=gray.dtype).view(1, 3, 1, 1)
    return (gray.expand(-1, 3, -1, -1) - mean) / std


def _processor() -> str:
    """The CPU's model name where Linux tells it, else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.is_file()
        else []
    )
    return names[0].split(":", 1)[1].strip() if names else platform.processor() or platform.machine()


def _augment(gray: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random affine map per image: rotation within ±10°, scale 0.9–1.1, shift within ±1 pixel (background 0)."""
    n = len(gray)
    angle = (torch.rand(n, generator=generator) - 0.5) * (math.pi / 9)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (4 / gray.shape[-1])  # ±1 px in [-1, 1] coordinates
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(gray.shape), align_corners=False)
    return F.grid_sample(gray, grid, align_corners=False, padding_mode="zeros")


def patches(gray: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, 1, H, W) → (N, tokens, patch_size²), tokens in the ViT's row-major order."""
    return F.unfold(gray, patch_size, stride=patch_size).transpose(1, 2)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each embedding's positive is the other view of its image, its negatives the 2N − 2 others."""
    z = F.normalize(torch.cat([first, second]), dim=1)
    similarity = z @ z.T / temperature
    similarity = similarity.masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    n = len(first)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(similarity, positives)


def train_encoder(settings: EncoderSettings, log=print) -> tuple[nn.Module, nn.Module, dict]:
    """Train on the training split without labels. Returns (trained, random control, training facts)."""
    from transformers import Dinov2Model

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = Dinov2Model(encoder_config(settings))
    control = Dinov2Model(encoder_config(settings))
    control.load_state_dict(model.state_dict())  # the weights training starts from
    width, tokens = settings.hidden_size, (settings.resolution // settings.patch_size) ** 2
    projector = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
    parameters = [*model.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.1)
    images, _ = digits_arrays(settings.resolution, "train")  # the labels are never used
    gray = images.float() / 255.0
    start = time.perf_counter()
    model.train()
    for step in range(settings.steps):
        batch = gray[torch.randint(0, len(gray), (settings.batch_size,), generator=generator)]
        views = torch.cat([_augment(batch, generator), _augment(batch, generator)])
        masks = torch.rand(len(views), tokens, generator=generator) < settings.mask_ratio
        hidden = model(encoder_pixels(views), bool_masked_pos=masks).last_hidden_state[:, 1:]
        first, second = projector(hidden.mean(1)).chunk(2)
        loss = nt_xent(first, second, settings.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(settings.steps // 4, 1) == 0 or step == settings.steps - 1:
            log(f"encoder step {step}: NT-Xent {loss.item():.3f}")
    facts = {
        "seconds": time.perf_counter() - start,
        "machine": f"{_processor()}, {torch.get_num_threads()} torch thread(s)",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "final_nt_xent": loss.item(),
    }
    return model.eval(), control.eval(), facts


@torch.no_grad()
def patch_tokens(model, gray: torch.Tensor) -> torch.Tensor:
    """The final patch tokens (REPA's targets), (N, tokens, width), of grayscale pixels in [0, 1]."""
    return model(encoder_pixels(gray)).last_hidden_state[:, 1:]


def _r2(fit_x, fit_y, held_x, held_y) -> float:
    """R² on the held-out rows of a ridge regression (α 1, negligible next to the tens of thousands of rows) fitted on the others."""
    from sklearn.linear_model import Ridge

    return float(Ridge(1.0).fit(fit_x, fit_y).score(held_x, held_y))


def feature_check(trained, control, settings: EncoderSettings) -> dict:
    """The sanity check of the features (see the module doc). Only reported: the study never uses it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (train, train_labels), (test, test_labels) = (digits_arrays(settings.resolution, s) for s in ("train", "test"))
    train, test = train.float() / 255.0, test.float() / 255.0
    size = settings.patch_size
    report = {}
    for name, model in (("trained", trained), ("random", control), ("pixels", None)):
        if model is None:
            fit, held = train.flatten(1), test.flatten(1)
        else:
            fit_tokens, held_tokens = patch_tokens(model, train), patch_tokens(model, test)
            fit, held = fit_tokens.mean(1), held_tokens.mean(1)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        probe.fit(fit.numpy(), train_labels.numpy())
        neighbours = KNeighborsClassifier(5).fit(fit.numpy(), train_labels.numpy())
        report[name] = {
            "linear_probe_accuracy": float(probe.score(held.numpy(), test_labels.numpy())),
            "knn5_accuracy": float(neighbours.score(held.numpy(), test_labels.numpy())),
        }
        if model is None:
            continue
        tokens = fit_tokens.shape[1]
        unit = F.normalize(held_tokens, dim=-1)
        similarity = unit @ unit.transpose(1, 2)
        rows = lambda t: t.reshape(-1, t.shape[-1]).numpy()  # noqa: E731  one row per token
        report[name].update(
            {
                "own_patch_r2": _r2(
                    rows(fit_tokens), rows(patches(train, size)), rows(held_tokens), rows(patches(test, size))
                ),
                "whole_image_r2": _r2(
                    rows(fit_tokens),
                    train.flatten(1).repeat_interleave(tokens, 0).numpy(),
                    rows(held_tokens),
                    test.flatten(1).repeat_interleave(tokens, 0).numpy(),
                ),
                "token_cosine_similarity": similarity[:, ~torch.eye(tokens, dtype=torch.bool)].mean().item(),
            }
        )
    return report


def _save(model, folder: Path, settings: EncoderSettings) -> None:
    from transformers import BitImageProcessor

    model.save_pretrained(folder)
    BitImageProcessor(
        do_resize=True,
        size={"height": settings.resolution, "width": settings.resolution},
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    ).save_pretrained(folder)


def load_or_train_encoders(settings: EncoderSettings, cache_dir: str | Path, log=print) -> tuple[Path, dict]:
    """The folder holding ``trained/`` and ``random/`` for ``settings`` (trained now and saved if not cached), and
    its report (training seconds and machine, the feature check)."""
    key = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"digits_encoder_{key}"
    if (folder / "report.json").is_file():
        return folder, json.loads((folder / "report.json").read_text())
    trained, control, facts = train_encoder(settings, log)
    with torch.no_grad():
        features = feature_check(trained, control, settings)
    report = {"settings": asdict(settings), "training": facts, "features": features}
    temporary = folder.with_name(folder.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    _save(trained, temporary / "trained", settings)
    _save(control, temporary / "random", settings)
    (temporary / "report.json").write_text(json.dumps(report, indent=1))
    if folder.exists():  # a folder without its report: a crash before the rename's time, never trusted
        shutil.rmtree(folder)
    temporary.rename(folder)  # a crash never leaves a half-written encoder that later runs would trust
    return folder, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--steps", type=int, default=EncoderSettings.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default="outputs/benchmarks/encoder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny ViT: a second thread only adds contention on a shared machine
    settings = EncoderSettings(resolution=args.resolution, steps=args.steps, seed=args.seed)
    folder, report = load_or_train_encoders(settings, args.cache_dir)
    print(f"digits encoder in {folder}:\n{json.dumps(report, indent=1)}")


if __name__ == "__main__":
    main()
