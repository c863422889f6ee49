"""ED-LoRA's training data: images of one concept with captions naming it, and optional concept masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lorakit.data import IMAGE_EXTENSIONS, open_rgb, resize_crop, scan_folder
from lorakit.rng import rand_per_sample

SALT_FLIP = 24  # per-sample stream of the random flip


def concept_words(cfg) -> list[str]:
    """The two pseudo-words of ``concept.tokens``; ValueError naming the key otherwise."""
    words = str(cfg.concept.tokens).split()
    if len(words) != 2 or words[0] == words[1]:
        raise ValueError(f"concept.tokens={cfg.concept.tokens!r}: expected two different pseudo-words, e.g. '<cat1> <cat2>'")
    return words


class ConceptImages:
    """Images + captions (placeholder replaced) + optional masks of one concept.

    Item: ``pixel_values`` [3, R, R] in [-1, 1], ``caption`` str, ``mask`` [1, R, R] in [0, 1] (ones without
    masks), ``original_size`` / ``crop_top_left`` / ``target_size`` (SDXL). Centre crop to ``data.resolution``;
    with ``data.random_flip`` the image and its mask flip together, keyed by the sample id.
    """

    def __init__(self, cfg):
        d = cfg.data
        unsupported = [k for k, bad in (("data.buckets", d.buckets), ("data.reg_path", d.reg_path),
                                        ("data.cache_latents", d.cache_latents)) if bad]
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)}: not supported by the ED-LoRA trainer (set to false/null)")
        self.cfg, self.seed = cfg, cfg.seed
        words = " ".join(concept_words(cfg))
        default = d.default_caption or cfg.concept.placeholder
        records = scan_folder(d.path, d.caption_extension, default, d.on_bad_image)
        self.records = []
        for rec in records:
            text = rec.caption
            if cfg.concept.placeholder in text:
                text = text.replace(cfg.concept.placeholder, words)
            elif words not in text:
                raise ValueError(
                    f"caption of {rec.path} has neither the placeholder {cfg.concept.placeholder!r} nor {words!r}: "
                    f"{rec.caption!r}"
                )
            rec.caption = text
            self.records.append(rec)
        self.masks: list[Path | None] = [None] * len(self.records)
        if cfg.mask_path:
            self.masks = [self._find_mask(Path(cfg.mask_path), r.path) for r in self.records]
        elif cfg.masked_loss or cfg.attn_reg_weight:
            raise ValueError("masked_loss / attn_reg_weight need masks: set mask_path to a folder of masks")
        self.items = [i for i in range(len(self.records)) for _ in range(max(1, d.repeats))]

    @staticmethod
    def _find_mask(folder: Path, image: Path) -> Path:
        if not folder.is_dir():
            raise FileNotFoundError(f"mask_path folder not found: {folder}")
        for ext in IMAGE_EXTENSIONS:
            for cand in (folder / (image.stem + ext), folder / (image.stem + "_mask" + ext)):
                if cand.exists():
                    return cand
        raise FileNotFoundError(f"no mask for {image} in {folder} (expected {image.stem}.png or {image.stem}_mask.png)")

    def __len__(self) -> int:
        return len(self.items)

    def get_item(self, i: int, sample_id: int) -> dict:
        k = self.items[i]
        rec, res = self.records[k], self.cfg.data.resolution
        img = open_rgb(rec.path)
        size = img.size
        img, crop = resize_crop(img, (res, res), True, None)
        mask = None
        if self.masks[k] is not None:
            with Image.open(self.masks[k]) as raw:
                m = raw.convert("L")
            if m.size != size:
                raise ValueError(f"mask {self.masks[k]} is {m.size[0]}x{m.size[1]}, its image {rec.path} is {size[0]}x{size[1]}")
            mask, _ = resize_crop(m, (res, res), True, None)
        if self.cfg.data.random_flip and float(rand_per_sample([sample_id], self.seed, SALT_FLIP)[0]) < 0.5:
            img = ImageOps.mirror(img)
            mask = ImageOps.mirror(mask) if mask is not None else None
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        mask_t = (torch.from_numpy(np.asarray(mask, dtype=np.float32))[None] / 255.0) if mask is not None else torch.ones(1, res, res)
        return {
            "pixel_values": pixels,
            "mask": mask_t,
            "caption": rec.caption,
            "original_size": torch.tensor([size[1], size[0]]),
            "crop_top_left": torch.tensor(crop),
            "target_size": torch.tensor([res, res]),
        }

    def __getitem__(self, i: int) -> dict:
        return self.get_item(i, i)
