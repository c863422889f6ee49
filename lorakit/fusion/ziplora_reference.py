"""ZipLoRA / LoRA.rar reference data: what each LoRA of a pair is asked to reproduce (latents of its reference
images and their prompt conditioning), from given images, the file's training data folder, or generated images."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.io import Adapter, live_path
from lorakit.conditioning import is_sdxl, pixel_size, sdxl_time_ids
from lorakit.data import IMAGE_EXTENSIONS, _read_caption, open_rgb
from lorakit.logs import warn

# --------------------------------------------------------------------------------------------- references


@dataclass
class Reference:
    """What one LoRA is asked to reproduce: latents of its reference images and their prompt conditioning.

    Shapes: ``latents [n, C, h, w]`` (already scaled by the VAE's scaling factor), ``embeds [n, L, D]``;
    SDXL also ``text_embeds [n, P]`` and ``time_ids [n, 6]``.
    """

    latents: torch.Tensor
    embeds: torch.Tensor
    prompts: list[str]
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    source: str = ""

    def to(self, device, dtype=None) -> "Reference":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        return Reference(mv(self.latents), mv(self.embeds), self.prompts, mv(self.text_embeds), mv(self.time_ids), self.source)

    def select(self, idx: torch.Tensor) -> dict:
        """UNet keyword inputs (minus ``sample`` / ``timestep``) for the items ``idx``."""
        kw = {"encoder_hidden_states": self.embeds[idx]}
        if self.text_embeds is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.text_embeds[idx], "time_ids": self.time_ids[idx]}
        return kw


def prompt_of(adapter: Adapter, source: str | None = None) -> tuple[str, bool]:
    """A prompt for a LoRA: its trigger, else kohya's top tags, else the file name. Returns (prompt, found)."""
    trigger = adapter.metadata.get("lorakit.trigger")
    if trigger:
        return trigger, True
    tags = adapter.metadata.get("ss_tag_frequency")
    if tags:
        try:
            counts: dict[str, int] = {}
            for per_dir in json.loads(tags).values():
                for tag, n in per_dir.items():
                    counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
            top = sorted(counts, key=lambda t: -counts[t])[:3]
            if top:
                return ", ".join(top), True
        except (ValueError, AttributeError):
            pass
    return (Path(source).stem.replace("_", " ") if source else ""), False


def data_dir_of(adapter: Adapter) -> Path | None:
    """The training-image folder named in ``lorakit.config`` metadata, if it still exists here."""
    raw = adapter.metadata.get("lorakit.config")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    candidates = []
    for section in (cfg, cfg.get("data") or {}, cfg.get("dataset") or {}):
        if isinstance(section, dict):
            candidates += [section.get(k) for k in ("path", "dir", "data_dir", "train_data_dir", "image_dir", "instance_data_dir")]
    for c in candidates:
        if isinstance(c, str) and c and Path(c).is_dir():
            return Path(c)
    return None


def load_images(folder: str | Path, size: int, limit: int) -> tuple[torch.Tensor, list[str | None]]:
    """Up to ``limit`` images of a folder, centre-cropped and resized to ``size``; ``[n, 3, size, size]`` in
    [-1, 1], and each image's same-name ``.txt`` caption (None where there is none)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in reference folder {folder}")
    out, captions = [], []
    for p in files:
        img = open_rgb(p)
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
        out.append(t.permute(2, 0, 1).float() / 127.5 - 1.0)
        cap = p.with_suffix(".txt")
        captions.append(_read_caption(cap).strip() if cap.exists() else None)
    return torch.stack(out), captions


@contextmanager
def adapter_weights(pipe, adapter: Adapter, scale: float = 1.0):
    """Temporarily add an adapter's deltas to a pipeline's weights (exact restore on exit)."""
    saved = []
    try:
        for key, mod in adapter.modules.items():
            comp, path = key.split(".", 1)
            model = getattr(pipe, comp, None)
            if model is None:
                continue
            layer = model.get_submodule(live_path(model, path))
            w = layer.weight
            saved.append((layer, w.data))
            w.data = w.data + scale * mod.delta().reshape(w.shape).to(w.device, w.dtype)
        yield pipe
    finally:
        for layer, data in saved:
            layer.weight.data = data


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> dict:
    """Base text-encoder conditioning: ``embeds [n, L, D]`` (+ SDXL ``text_embeds [n, P]``, ``time_ids [n, 6]``)."""
    device = pipe.unet.device
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        s = float(pixel_size(pipe))
        time_ids = sdxl_time_ids((s, s), (0.0, 0.0), (s, s), len(prompts), device=device)
        return {"embeds": embeds, "text_embeds": pooled, "time_ids": time_ids}
    embeds = pipe.encode_prompt(prompts, device, 1, False)[0]
    return {"embeds": embeds}


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W]`` in [-1, 1] -> scaled latents ``[n, C, h, w]`` (the VAE posterior mean)."""
    vae = pipe.vae
    lat = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (lat - shift) * vae.config.scaling_factor


@torch.no_grad()
def generate_latents(pipe, adapter: Adapter, prompt: str, n: int, steps: int = 20, seed: int = 0, size: int | None = None) -> torch.Tensor:
    """Latents ``[n, C, h, w]`` of ``n`` images (``size`` pixels square, default the base's) generated with the
    adapter alone."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    size = size or pixel_size(pipe)
    with adapter_weights(pipe, adapter):
        out = pipe([prompt] * n, num_inference_steps=steps, generator=g, output_type="latent", height=size, width=size)
    return out.images if hasattr(out, "images") else out[0]


def reference_for(
    pipe,
    adapter: Adapter,
    source: str | None = None,
    images: str | Path | torch.Tensor | None = None,
    prompt: str | None = None,
    num_images: int = 4,
    generate_steps: int = 20,
    seed: int = 0,
    size: int | None = None,
) -> Reference:
    """Reference latents and conditioning for one LoRA (see the module docstring for the order of sources).

    Args:
        source: the adapter's file (for messages and the file-name prompt).
        images: a folder of images (same-name .txt captions used as prompts) or a tensor ``[n, 3, H, W]`` in
            [-1, 1]; None looks in the file's metadata, then generates.
        prompt: overrides the prompt from metadata.
        num_images: how many reference images to load or generate.
        size: image side in pixels for loaded/generated images (default the base's native resolution).
    """
    name = source or "adapter"
    found_prompt, has_prompt = prompt_of(adapter, source)
    prompt = prompt or found_prompt
    if images is None:
        images = data_dir_of(adapter)
    if images is None:
        if not has_prompt and not prompt:
            warn(f"{name}: no trigger or tags in its metadata; generating references with an empty prompt")
        warn(f"{name}: no reference images (none given, none named in its metadata); generating {num_images} with "
             "this LoRA alone")
        latents = generate_latents(pipe, adapter, prompt, num_images, steps=generate_steps, seed=seed, size=size)
        prompts = [prompt] * num_images
    else:
        if isinstance(images, torch.Tensor):
            pixels, captions = images, [None] * images.shape[0]
        else:
            pixels, captions = load_images(images, size or pixel_size(pipe), num_images)
        latents = encode_images(pipe, pixels)
        prompts = [c or prompt for c in captions]
    cond = encode_prompts(pipe, prompts)
    return Reference(latents=latents.float(), prompts=prompts, source=name, **cond)
