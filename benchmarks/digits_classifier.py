"""A small CNN classifier of the built-in digits: the feature space of the convergence benchmark's quality metric.

Inception features (FID) mean a download and say little about 16×16 grayscale digits, so the benchmark measures
sample quality with a classifier trained here, once per setting, and cached on disk: the Fréchet distance between
real held-out digits and samples in its penultimate layer, and its accuracy on class-conditional samples.

    python benchmarks/digits_classifier.py --resolution 16      # trains (seconds on CPU), prints test accuracy
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ClassifierSettings:
    """What the cached classifier depends on (its file name is a hash of these).

    Args:
        resolution: side of the digits in pixels (the diffusion model's resolution).
        feature_dim: width of the penultimate layer, the feature space of the Fréchet distance.
        epochs: passes over the 1617 training digits.
        seed: seed of the initialisation, the batch order and the augmentation.
    """

    resolution: int = 16
    feature_dim: int = 64
    epochs: int = 20
    seed: int = 0


class DigitsClassifier(nn.Module):
    """Two conv blocks, a feature layer and a linear head; input uint8 (N, C, H, W), any C (channels averaged)."""

    def __init__(self, resolution: int = 16, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"DigitsClassifier: resolution must be a multiple of 4, got {resolution}.")
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.features_layer = nn.Linear(32 * (resolution // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        # compute_fid_statistics hands over grayscale replicated to RGB; averaging the channels undoes that.
        return images.float().mean(1, keepdim=True) / 127.5 - 1.0

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of pixels in [-1, 1], shape (N, 1, H, W)."""
        x = F.max_pool2d(F.relu(self.conv1(pixels)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.features_layer(x.flatten(1)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))

    @torch.no_grad()
    def feature_extractor(self, images: torch.Tensor) -> torch.Tensor:
        """The callable FID statistics take: uint8 (N, C, H, W) → features (N, feature_dim)."""
        self.eval()
        return self.features(self.preprocess(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class ids (N,) of uint8 (N, C, H, W) images."""
        self.eval()
        return self(self.preprocess(images)).argmax(1)


def digits_arrays(resolution: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in digits as uint8 (N, 1, H, W) and int64 labels (N,)."""
    from diffusers_speedup.data.builtin import load_builtin_arrays

    images, labels = load_builtin_arrays("digits", resolution, split)
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.copy())


def _shift(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift every image by up to one pixel per axis (background-padded): samples are rarely perfectly centred."""
    shifted = F.pad(pixels, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    size = pixels.shape[-1]
    return shifted[..., dy : dy + size, dx : dx + size]


def train_classifier(settings: ClassifierSettings) -> tuple[DigitsClassifier, float]:
    """Train on the train split; return the model and its accuracy on the held-out test split."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    model = DigitsClassifier(settings.resolution, settings.feature_dim)
    images, labels = digits_arrays(settings.resolution, "train")
    pixels = DigitsClassifier.preprocess(images)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batches_per_epoch = -(-len(pixels) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=settings.epochs * batches_per_epoch)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(pixels), generator=generator)
        for start in range(0, len(pixels), 64):
            index = order[start : start + 64]
            loss = F.cross_entropy(model(_shift(pixels[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    test_images, test_labels = digits_arrays(settings.resolution, "test")
    accuracy = (model.predict(test_images) == test_labels).float().mean().item()
    return model, accuracy


def load_or_train_classifier(settings: ClassifierSettings, cache_dir: str | Path) -> tuple[DigitsClassifier, float]:
    """The classifier for ``settings`` from ``cache_dir`` if trained before, else trained now and saved there.

    Returns the model (in eval mode) and its held-out test accuracy.
    """
    key = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"digits_classifier_{key}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        model = DigitsClassifier(settings.resolution, settings.feature_dim)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), float(saved["test_accuracy"])
    model, accuracy = train_classifier(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "test_accuracy": accuracy, "settings": asdict(settings)}, temporary)
    temporary.replace(path)  # a crash never leaves a half-written classifier that later runs would trust
    return model.eval(), accuracy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--feature_dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default="outputs/benchmarks/classifier")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny convolutions: a second thread only adds contention on a shared machine
    settings = ClassifierSettings(args.resolution, args.feature_dim, args.epochs, args.seed)
    _, accuracy = load_or_train_classifier(settings, args.cache_dir)
    print(f"digits classifier {asdict(settings)}: held-out test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
