"""Toy-world oracle: a small CNN that says which toy concepts an image shows (multi-label presence).

It knows every generic concept (shapes, shape colours, background kinds) and every held-out one (characters,
objects, styles, backgrounds) of :mod:`lorakit.toyworld.concepts`; ``lorakit eval --metric oracle`` runs it on
generated images (:mod:`lorakit.toyworld.metrics`). It was trained by ``tools/train_oracle.py``
on renders degraded like generated images (noise, blur, the toy VAE's round trip with latent noise); its
weights are ``data/oracle/oracle.safetensors`` + ``data/oracle/config.json``.

Usage::

    from lorakit.toyworld.oracle import score
    s = score(images, ["robot", "ink"])      # images: list of PIL images or a float tensor [N, 3, H, W] in [0, 1]
    s.probs        # FloatTensor [N, 2]: presence probability of each asked concept in each image
    s.present      # BoolTensor  [N, 2]: probs >= threshold (default 0.5)
    s.rates        # {"robot": 0.9, "ink": 0.75}: fraction of images where each concept is present
    s.all_rate     # fraction of images where ALL asked concepts are present (e.g. character AND style)
    s.per_image()  # [{"robot": 0.97, "ink": 0.88}, ...]
    s.to_dict()    # JSON-able summary
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from lorakit.fileio import load_safetensors
from lorakit.resources import data_path
from lorakit.toyworld.concepts import get_concept

IMAGE_SIZE = 32
DEFAULT_DIR = data_path("oracle")


class OracleNet(nn.Module):
    """CNN over RGB ``[N, 3, S, S]`` in [0, 1] -> presence logits ``[N, n_concepts]``; ``image_size`` S is 32 (v1)
    or 64 (toy world v2: one more stride-2 stage in front, so both reach 4x4 before the head).

    ``row_heads``: indices of concepts whose logit comes instead from a linear layer ``row_head`` over the flattened
    feature map (``tools/refit_oracle_rows.py`` fits it for a concept whose look changed, leaving every other
    concept's logit as it was)."""

    def __init__(self, n_concepts: int, width: int = 32, image_size: int = IMAGE_SIZE, row_heads: Sequence[int] = ()):
        super().__init__()
        if image_size not in (32, 64):
            raise ValueError(f"OracleNet image_size must be 32 or 64, got {image_size}")
        w = width

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        stem = [] if image_size == 32 else [nn.Conv2d(3, w // 2, 3, padding=1), nn.BatchNorm2d(w // 2),
                                            nn.ReLU(inplace=True), nn.MaxPool2d(2)]  # 64 -> 32
        self.features = nn.Sequential(
            *stem,
            block(w // 2 if stem else 3, w // 2), nn.MaxPool2d(2),  # 16x16
            block(w // 2, w), nn.MaxPool2d(2),  # 8x8
            block(w, 2 * w), nn.MaxPool2d(2),  # 4x4
            block(2 * w, 4 * w),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * w * 16, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, n_concepts))
        self.row_heads = list(row_heads)
        self.row_head = nn.Linear(4 * w * 16, len(self.row_heads)) if self.row_heads else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features((x - 0.5) / 0.25)
        out = self.head(h)
        if self.row_head is not None:
            out = out.clone()
            out[:, self.row_heads] = self.row_head(h.flatten(1))
        return out


def to_tensor(images, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images (list of PIL, any size, or a float tensor ``[N, 3, H, W]`` in [0, 1]) -> ``[N, 3, size, size]``."""
    import numpy as np
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must be [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        x = images.detach().float().cpu()
        if x.shape[-2:] != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
        return x.clamp(0, 1)
    arrs = []
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise ValueError(f"image {i} is a {type(img).__name__}; expected a PIL image or one [N,3,H,W] tensor")
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BOX)
        arrs.append(np.asarray(img, np.float32) / 255.0)
    if not arrs:
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


def presence_labels(scenes, concepts: list[str]) -> torch.Tensor:
    """The oracle's training targets: float ``[len(scenes), len(concepts)]``, 1 where ``scene.concepts()`` holds
    the concept (v1 and v2 scenes alike)."""
    labels = torch.zeros(len(scenes), len(concepts))
    index = {c: i for i, c in enumerate(concepts)}
    for k, s in enumerate(scenes):
        for c in s.concepts():
            labels[k, index[c]] = 1
    return labels


@dataclass
class OracleScores:
    """What :func:`score` returns.

    Attributes:
        concepts: the concept names scored, in column order.
        probs: FloatTensor ``[N, len(concepts)]``, presence probabilities in [0, 1].
        present: BoolTensor ``[N, len(concepts)]``, ``probs >= threshold``.
        threshold: the decision threshold used.
    """

    concepts: list[str]
    probs: torch.Tensor
    present: torch.Tensor
    threshold: float

    @property
    def rates(self) -> dict[str, float]:
        """``{concept: fraction of images where it is present}``."""
        return {c: float(self.present[:, i].float().mean()) for i, c in enumerate(self.concepts)}

    @property
    def all_rate(self) -> float:
        """Fraction of images where every scored concept is present at once."""
        return float(self.present.all(dim=1).float().mean()) if self.concepts else 1.0

    def per_image(self) -> list[dict[str, float]]:
        """One ``{concept: probability}`` dict per image."""
        return [{c: float(p[i]) for i, c in enumerate(self.concepts)} for p in self.probs]

    def to_dict(self) -> dict:
        """JSON-able: concepts, threshold, rates, all_rate, per-image probabilities."""
        return {"concepts": self.concepts, "threshold": self.threshold, "rates": self.rates,
                "all_rate": self.all_rate, "per_image": self.per_image()}


class Oracle:
    """A loaded oracle: ``Oracle.load(dir)``, then :meth:`score`. Toy world v2's oracle
    (:class:`lorakit.toyworld.v2.oracle.Oracle`) is this class at 64x64 over v2's concepts."""

    image_size = IMAGE_SIZE
    trainer = "tools/train_oracle.py"

    def __init__(self, net: OracleNet, concepts: list[str], config: dict):
        self.net = net.eval()
        self.concepts = list(concepts)
        self.config = config

    @classmethod
    def default_dir(cls) -> Path:
        """``$LORAKIT_ORACLE`` or the bundled ``data/oracle``."""
        return Path(os.environ.get("LORAKIT_ORACLE") or DEFAULT_DIR)

    @classmethod
    def check_config(cls, config: dict, path: Path) -> None:
        """Refuse an oracle of another toy world."""
        if config.get("world", "v1") != "v1":
            raise ValueError(f"{path}: a toy world {config['world']} oracle (load it with its world's Oracle)")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Oracle:
        """Load ``<path>/config.json`` + ``<path>/oracle.safetensors`` (default: :meth:`default_dir`)."""
        folder = Path(path) if path else cls.default_dir()
        cfg_path, w_path = folder / "config.json", folder / "oracle.safetensors"
        for f in (cfg_path, w_path):
            if not f.exists():
                raise FileNotFoundError(f"oracle file missing: {f} (build it with {cls.trainer})")
        config = json.loads(cfg_path.read_text())
        cls.check_config(config, cfg_path)
        row_heads = [config["concepts"].index(c) for c in config.get("row_heads", [])]
        net = OracleNet(len(config["concepts"]), width=config.get("width", 32), image_size=cls.image_size,
                        row_heads=row_heads)
        net.load_state_dict({k: v.float() for k, v in load_safetensors(w_path)[0].items()})
        return cls(net, config["concepts"], config)

    def to_tensor(self, images) -> torch.Tensor:
        """Images (list of PIL, or float tensor ``[N, 3, H, W]`` in [0, 1]) -> ``[N, 3, S, S]`` float."""
        return to_tensor(images, self.image_size)

    @torch.no_grad()
    def probabilities(self, images) -> torch.Tensor:
        """Presence probabilities of ALL oracle concepts: ``[N, len(self.concepts)]``."""
        x = self.to_tensor(images)
        if len(x) == 0:
            return torch.zeros(0, len(self.concepts))
        return torch.cat([torch.sigmoid(self.net(x[i : i + 256])) for i in range(0, len(x), 256)])

    def concept_name(self, name: str) -> str:
        """The concept a name asks for (v1: a name or a trigger word)."""
        return get_concept(name).name

    def score(self, images, concepts=None, threshold: float = 0.5) -> OracleScores:
        """Score ``images`` for ``concepts`` (names or trigger words; default: all). See :class:`OracleScores`."""
        names = self.concepts if concepts is None else list(dict.fromkeys(self.concept_name(c) for c in concepts))
        for n in names:
            if n not in self.concepts:
                raise ValueError(f"the oracle does not know concept {n!r}; it knows {self.concepts}")
        probs = self.probabilities(images)[:, [self.concepts.index(n) for n in names]]
        return OracleScores(list(names), probs, probs >= threshold, threshold)


@lru_cache(maxsize=4)
def load_oracle(path: str | None = None) -> Oracle:
    """The oracle from ``path`` (default ``data/oracle``), loaded once per process."""
    return Oracle.load(path)


def score(images, concepts=None, threshold: float = 0.5, oracle_path: str | None = None) -> OracleScores:
    """Which toy concepts do ``images`` show?

    Args:
        images: list of PIL images (any size; resized to 32x32) or a float tensor ``[N, 3, H, W]`` in [0, 1].
        concepts: concept names or trigger words (e.g. ``["robot", "inkvel"]``); None = every concept.
        threshold: presence decision threshold on the probability.
        oracle_path: folder with ``config.json`` + ``oracle.safetensors`` (default ``data/oracle``).
    Returns:
        :class:`OracleScores` with ``probs`` ``[N, C]``, ``present`` ``[N, C]``, ``rates`` ``{concept: float}``,
        ``all_rate``, ``per_image()``, ``to_dict()``.
    Raises:
        ValueError: for an unknown concept or a badly shaped tensor; FileNotFoundError if the weights are missing.
    """
    return load_oracle(oracle_path).score(images, concepts, threshold)
