"""Toy world v2 oracle: a small CNN over 64x64 images that says which v2 concepts an image shows.

Multi-label presence of every generic, class and identity concept of :mod:`lorakit.toyworld.v2.concepts`; an
identity also shows its class (``kwibbit`` is a ``frog``), so ``frog`` without ``kwibbit`` means "a frog that is
not kwibbit". Trained by ``tools/train_oracle_v2.py``; scores come as v1's
:class:`lorakit.toyworld.oracle.OracleScores`::

    from lorakit.toyworld.v2.oracle import Oracle
    s = Oracle.load("/path/to/oracle_v2").score(images, ["frog", "kwibbit"])
    s.rates  # {"frog": 1.0, "kwibbit": 0.25}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lorakit.toyworld.oracle import OracleScores

IMAGE_SIZE = 64


class OracleNet(nn.Module):
    """CNN over ``[N, 3, 64, 64]`` RGB in [0, 1] -> presence logits ``[N, n_concepts]``."""

    def __init__(self, n_concepts: int, width: int = 32):
        super().__init__()
        w = width

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            nn.Conv2d(3, w // 2, 3, padding=1), nn.BatchNorm2d(w // 2), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 32
            block(w // 2, w // 2), nn.MaxPool2d(2),  # 16
            block(w // 2, w), nn.MaxPool2d(2),  # 8
            block(w, 2 * w), nn.MaxPool2d(2),  # 4
            block(2 * w, 4 * w),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * w * 16, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, n_concepts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - 0.5) / 0.25))


def to_tensor(images) -> torch.Tensor:
    """PIL images (any size) or a float tensor ``[N, 3, H, W]`` in [0, 1] -> ``[N, 3, 64, 64]`` float."""
    import numpy as np
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must be [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        x = images.detach().float().cpu()
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        return x.clamp(0, 1)
    arrs = []
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise TypeError(f"image {i} is a {type(img).__name__}; expected a PIL image or one [N,3,H,W] tensor")
        img = img.convert("RGB")
        if img.size != (IMAGE_SIZE, IMAGE_SIZE):
            img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
        arrs.append(np.asarray(img, np.float32) / 255.0)
    if not arrs:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


class Oracle:
    """A loaded v2 oracle: ``Oracle.load(folder)``, then :meth:`score`."""

    def __init__(self, net: OracleNet, concepts: list[str], config: dict):
        self.net = net.eval()
        self.concepts = list(concepts)
        self.config = config

    @classmethod
    def load(cls, path: str | os.PathLike) -> Oracle:
        """Load ``<path>/config.json`` + ``<path>/oracle.safetensors``."""
        from lorakit.fileio import load_safetensors

        folder = Path(path)
        cfg_path, w_path = folder / "config.json", folder / "oracle.safetensors"
        for f in (cfg_path, w_path):
            if not f.exists():
                raise FileNotFoundError(f"oracle file missing: {f} (build it with tools/train_oracle_v2.py)")
        config = json.loads(cfg_path.read_text())
        if config.get("world") != "v2":
            raise ValueError(f"{cfg_path}: not a toy world v2 oracle (use lorakit.toyworld.oracle for v1)")
        net = OracleNet(len(config["concepts"]), width=config.get("width", 32))
        net.load_state_dict({k: v.float() for k, v in load_safetensors(w_path)[0].items()})
        return cls(net, config["concepts"], config)

    @torch.no_grad()
    def probabilities(self, images) -> torch.Tensor:
        """Presence probabilities of all the oracle's concepts: ``[N, len(self.concepts)]``."""
        x = to_tensor(images)
        if len(x) == 0:
            return torch.zeros(0, len(self.concepts))
        return torch.cat([torch.sigmoid(self.net(x[i : i + 256])) for i in range(0, len(x), 256)])

    def score(self, images, concepts=None, threshold: float = 0.5) -> OracleScores:
        """Score ``images`` for v2 concept names (default: all)."""
        names = self.concepts if concepts is None else list(dict.fromkeys(concepts))
        for n in names:
            if n not in self.concepts:
                raise ValueError(f"the v2 oracle does not know concept {n!r}; it knows {self.concepts}")
        probs = self.probabilities(images)[:, [self.concepts.index(n) for n in names]]
        return OracleScores(list(names), probs, probs >= threshold, threshold)
