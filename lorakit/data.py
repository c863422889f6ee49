"""Training data: image folders with captions, tag shuffling, aspect buckets, regularisation images, latent cache.

The ``data.*`` keys of a recipe are :class:`lorakit.config.DataConfig` (re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lorakit.config import DataConfig  # noqa: F401 - the data.* schema, re-exported
from lorakit.fileio import load_safetensors, save_safetensors
from lorakit.hashing import file_sha256
from lorakit.logs import tqdm, warn
from lorakit.rng import sample_generator

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the folder or file."""


class BadImageError(DatasetError):
    """An image file that cannot be decoded; the message names the file."""


@dataclass
class ImageRecord:
    """One training image: where it is, its caption, its pixel size and its loss weight (regularisation)."""

    path: Path
    caption: str
    size: tuple[int, int]  # (width, height)
    weight: float = 1.0
    is_reg: bool = False


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the caption as "
                           "UTF-8") from None


def to_rgb(img):
    """A PIL image as 8-bit RGB, correctly for every mode: 16/32-bit greyscale scaled (``convert('RGB')`` clips
    them to white), float images taken as [0, 1], transparency (RGBA, LA, palette with transparency) laid on
    white instead of showing whatever colour the transparent pixels hold."""

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "RGBA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(path: Path):
    """Decode an image file to 8-bit RGB (see :func:`to_rgb`); BadImageError naming the file if it cannot."""

    try:
        with Image.open(path) as raw:
            raw.load()
            return to_rgb(raw)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for damaged files
        raise BadImageError(f"unreadable image {path}: {err}") from err


def _check_image(path: Path) -> tuple[int, int]:
    """(width, height) of a decodable image; raises BadImageError naming the file otherwise."""

    try:
        with Image.open(path) as img:
            img.load()
            return img.size
    except Exception as err:  # noqa: BLE001 - PIL raises many types for damaged files
        raise BadImageError(f"unreadable image {path}: {err}") from err


def scan_folder(folder: str | os.PathLike, caption_extension: str = ".txt", default_caption: str = "",
                on_bad_image: str = "error", weight: float = 1.0, is_reg: bool = False) -> list[ImageRecord]:
    """Find the images of a dataset folder and their captions.

    Two layouts: a ``metadata.jsonl`` (``datasets`` imagefolder: one JSON object per line with ``file_name`` and
    ``text`` or ``caption``), else every image under the folder (recursively) with a same-name caption file.

    Args:
        on_bad_image: ``error`` raises :class:`BadImageError` naming the file; ``skip`` prints it and goes on.
    Raises:
        FileNotFoundError for a missing folder; DatasetError naming the folder when it holds no usable image.
    """
    if on_bad_image not in ("error", "skip"):
        raise DatasetError(f"data.on_bad_image={on_bad_image!r}: expected 'error' or 'skip'")
    root = Path(folder)
    if not str(folder) or not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root} (set data.path to a folder of images)")
    meta = root / "metadata.jsonl"
    entries: list[tuple[Path, str]] = []
    if meta.exists():
        for n, line in enumerate(_read_caption(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DatasetError(f"{meta}:{n}: expected a JSON object with 'file_name' (and 'text'): {err}") from err
            text = row.get("text", row.get("caption", default_caption))
            entries.append((root / name, str(text if text is not None else default_caption)))
    else:
        uncaptioned = 0
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            cap = path.with_suffix(caption_extension)
            uncaptioned += not cap.exists()
            text = _read_caption(cap).strip() if cap.exists() else default_caption
            entries.append((path, text))
        if uncaptioned:
            warn(f"{uncaptioned} of {len(entries)} images in {root} have no {caption_extension} "
                 f"caption; they train with data.default_caption={default_caption!r}")
    records = []
    for path, text in entries:
        try:
            size = _check_image(path) if path.exists() else None
            if size is None:
                raise BadImageError(f"image listed in {meta} does not exist: {path}")
        except BadImageError as err:
            if on_bad_image == "error":
                raise BadImageError(f"{err} (set data.on_bad_image=skip to skip such files)") from err
            warn(f"skipping {err}")
            continue
        records.append(ImageRecord(path, text, size, weight, is_reg))
    if not records:
        kinds = ", ".join(IMAGE_EXTENSIONS)
        raise DatasetError(f"no usable images in {root} (looked for {kinds} files, or metadata.jsonl)")
    return records


def process_caption(caption: str, shuffle_tags: bool, keep_tokens: int, dropout: float, gen) -> str:
    """kohya-style caption processing with a seeded generator.

    ``shuffle_tags`` shuffles the comma-separated tags after the first ``keep_tokens`` (which stay in place);
    with probability ``dropout`` the caption becomes empty (unconditional training).
    """

    drop = torch.rand((1,), generator=gen).item()
    if shuffle_tags:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        order = torch.randperm(len(tail), generator=gen).tolist()
        caption = ", ".join(head + [tail[i] for i in order])
    if dropout > 0 and drop < dropout:
        return ""
    return caption


def bucket_sizes(resolution: int, lo: int, hi: int, step: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (width, height): multiples of ``step`` in ``[lo, hi]`` with area <= resolution²."""
    area = resolution * resolution
    sizes = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, (area // w) // step * step)
        if h >= lo:
            sizes.add((w, h))
            sizes.add((h, w))
    if not sizes:
        raise DatasetError(f"no bucket fits resolution {resolution} within [{lo}, {hi}] with step {step}")
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to an image's (width, height)."""
    ar = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def resize_crop(img, target: tuple[int, int], center: bool, gen) -> tuple[object, tuple[int, int]]:
    """Resize a PIL image to cover ``target`` (width, height) and crop to it.

    Returns (image, (crop top, crop left)) in resized pixels, as SDXL's ``crops_coords_top_left`` wants.
    """

    tw, th = target
    scale = max(tw / img.width, th / img.height)
    nw, nh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    if center:
        left, top = (nw - tw) // 2, (nh - th) // 2
    else:
        left = int(torch.randint(0, nw - tw + 1, (1,), generator=gen))
        top = int(torch.randint(0, nh - th + 1, (1,), generator=gen))
    if nw * nh > 4 * tw * th:
        # An extreme aspect ratio (4 x 20000 at 512 would resize to 512 x 2.56M): resample only the crop's box.
        box = (left / scale, top / scale, (left + tw) / scale, (top + th) / scale)
        return img.resize((tw, th), Image.BICUBIC, box=box), (top, left)
    img = img.resize((nw, nh), Image.BICUBIC)
    return img.crop((left, top, left + tw, top + th)), (top, left)


class CaptionedImages:
    """Images + captions for diffusion training, with repeats, buckets, regularisation and latent caching.

    Index space: every image ``repeats`` times (regularisation images ``reg_repeats`` times). ``get_item(i,
    sample_id)`` draws all per-sample randomness (tag shuffle, caption dropout, flip, random crop) from a generator
    keyed by (seed, sample_id), so a sample is the same on any number of processes and after a resume.

    Item: ``pixel_values`` float [3, H, W] in [-1, 1] (or ``latent_mean``/``latent_std`` [4, H/f, W/f] when a
    latent cache is attached), ``caption`` str, ``loss_weight`` float, ``original_size`` (h, w),
    ``crop_top_left`` (top, left), ``target_size`` (h, w).
    """

    def __init__(self, cfg: DataConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        recs = scan_folder(cfg.path, cfg.caption_extension, cfg.default_caption, cfg.on_bad_image)
        items = [r for r in recs for _ in range(max(1, cfg.repeats))]
        self.num_images, self.num_reg = len(recs), 0
        if cfg.reg_path:
            reg = scan_folder(cfg.reg_path, cfg.caption_extension, cfg.default_caption, cfg.on_bad_image,
                              weight=cfg.reg_weight, is_reg=True)
            self.num_reg = len(reg)
            items += [r for r in reg for _ in range(max(1, cfg.reg_repeats))]
        self.items = items
        if cfg.buckets:
            sizes = bucket_sizes(cfg.resolution, cfg.bucket_min, cfg.bucket_max, cfg.bucket_step)
            self.targets = [nearest_bucket(r.size, sizes) for r in items]
        else:
            self.targets = [(cfg.resolution, cfg.resolution)] * len(items)
        self.latent_cache = None

    def __len__(self) -> int:
        return len(self.items)

    def buckets(self) -> list[list[int]]:
        """Indices grouped by target size (one group without buckets)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(self.targets):
            groups.setdefault(t, []).append(i)
        return [groups[k] for k in sorted(groups)]

    def _view(self, i: int, gen) -> tuple[object, tuple[int, int], bool]:
        """(PIL image cropped to its target, crop top-left, flipped) for item ``i``."""

        rec = self.items[i]
        img = open_rgb(rec.path)
        flip = bool(self.cfg.random_flip) and bool(torch_rand(gen) < 0.5)
        img, crop = resize_crop(img, self.targets[i], self.cfg.center_crop, gen)
        if flip:
            img = ImageOps.mirror(img)
        return img, crop, flip

    def get_item(self, i: int, sample_id: int) -> dict:


        rec, (tw, th) = self.items[i], self.targets[i]
        gen = sample_generator(self.seed, sample_id, salt=10)
        caption = process_caption(rec.caption, self.cfg.shuffle_tags, self.cfg.keep_tokens, self.cfg.caption_dropout, gen)
        item = {
            "caption": caption,
            "loss_weight": torch.tensor(rec.weight, dtype=torch.float32),
            "original_size": torch.tensor([rec.size[1], rec.size[0]]),
            "target_size": torch.tensor([th, tw]),
        }
        if self.latent_cache is not None and self.cfg.center_crop:
            flip = bool(self.cfg.random_flip) and bool(torch_rand(gen) < 0.5)
            mean, std = self.latent_cache.get(self, i, flip)
            item.update(latent_mean=mean, latent_std=std, crop_top_left=torch.tensor(self.center_crop_of(i)))
            return item
        img, crop, _ = self._view(i, gen)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        item.update(pixel_values=arr, crop_top_left=torch.tensor(crop))
        return item

    def __getitem__(self, i: int) -> dict:
        return self.get_item(i, i)

    def center_crop_of(self, i: int) -> tuple[int, int]:
        """(top, left) of the centre crop of item ``i`` (what the latent cache stores)."""
        (w, h), (tw, th) = self.items[i].size, self.targets[i]
        scale = max(tw / w, th / h)
        nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
        return (nh - th) // 2, (nw - tw) // 2

    def center_view(self, i: int, flip: bool):
        """Pixel tensor [3, H, W] of the centre crop of item ``i`` (flipped if asked), for the latent cache."""

        rec = self.items[i]
        img = open_rgb(rec.path)
        img, _ = resize_crop(img, self.targets[i], True, None)
        if flip:
            img = ImageOps.mirror(img)
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def torch_rand(gen) -> float:

    return torch.rand((1,), generator=gen).item()


def collate(items: list[dict]) -> dict:
    """Stack a list of dataset items into a batch (tensors stacked, captions as a list)."""

    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float)):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out


class LatentCache:
    """VAE latents on disk, one safetensors file per (image file hash, target size, flip, VAE fingerprint).

    Files live in ``cache_dir`` and are reused across runs and recipes with the same VAE. A file holds the
    latent distribution's ``mean`` and ``std`` [C, H/f, W/f] (float32); the trainer samples from it each step.
    """

    def __init__(self, cache_dir: str | os.PathLike, vae, device=None, dtype=None):

        self.dir = Path(cache_dir)
        self.vae, self.device = vae, device or torch.device("cpu")
        self.dtype = dtype or next(vae.parameters()).dtype
        h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
        for p in list(vae.parameters())[:4]:
            h.update(p.detach().float().cpu().numpy().tobytes())
        self.vae_id = h.hexdigest()[:12]
        self._hashes: dict[Path, str] = {}
        self.hits = self.misses = 0

    def path_for(self, ds: CaptionedImages, i: int, flip: bool) -> Path:
        rec, (w, h) = ds.items[i], ds.targets[i]
        if rec.path not in self._hashes:
            self._hashes[rec.path] = file_sha256(rec.path)
        tag = "_flip" if flip else ""
        return self.dir / f"{self._hashes[rec.path][:24]}_{w}x{h}{tag}_vae{self.vae_id}.safetensors"

    def encode(self, pixels):
        """[B, 3, H, W] in [-1, 1] -> (mean, std) each [B, C, H/f, W/f] float32 on the CPU."""

        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def fill(self, ds: CaptionedImages, flips: tuple[bool, ...] = (False,), batch_size: int = 8, progress: bool = True) -> int:
        """Encode every (image, flip) of ``ds`` not yet on disk. Returns how many were encoded."""


        todo, seen = [], set()
        for i in range(len(ds)):
            for flip in flips:
                p = self.path_for(ds, i, flip)
                if p not in seen and not p.exists():
                    seen.add(p)
                    todo.append((i, flip, p))
        groups: dict[tuple[int, int], list] = {}
        for t in todo:
            groups.setdefault(ds.targets[t[0]], []).append(t)
        bar = tqdm(total=len(todo), desc="cache latents", disable=not progress or not todo)
        for group in groups.values():
            for k in range(0, len(group), batch_size):
                chunk = group[k : k + batch_size]
                mean, std = self.encode(torch.stack([ds.center_view(i, f) for i, f, _ in chunk]))
                for (i, f, p), m, s in zip(chunk, mean, std):
                    save_safetensors({"mean": m, "std": s}, p, {"source": str(ds.items[i].path)})
                bar.update(len(chunk))
        bar.close()
        return len(todo)

    def complete(self, ds: CaptionedImages, flips: tuple[bool, ...] = (False,)) -> bool:
        """Every (image, flip) of ``ds`` is on disk."""
        return all(self.path_for(ds, i, f).exists() for i in range(len(ds)) for f in flips)

    def get(self, ds: CaptionedImages, i: int, flip: bool):
        """(mean, std) of item ``i``, from disk (encoded now if missing)."""

        p = self.path_for(ds, i, flip)
        if p.exists():
            self.hits += 1
            t, _ = load_safetensors(p)
            return t["mean"], t["std"]
        self.misses += 1
        if getattr(self.vae, "encoder", None) is None:
            raise FileNotFoundError(f"{p}: a cached latent disappeared during training (the trainer freed the VAE "
                                    "encoder once the cache was complete); restart the run to re-encode it")
        mean, std = self.encode(ds.center_view(i, flip)[None])
        save_safetensors({"mean": mean[0], "std": std[0]}, p, {"source": str(ds.items[i].path)})
        return mean[0], std[0]
