"""Two toy characters placed by their sketches: regional sampling with the toy sketch adapter (Mix-of-Show's figure).

One box per half, each with its character's caption; the condition is both characters' silhouettes, each in its
box, through the bundled T2I-Adapter (``data/toy-sketch-adapter``) weighted per region. Used by
``tools/measure_regional_sketch.py`` (with against without the sketch) and by ``lorakit demo``'s regional row.

>>> pipe, loras, adapter = load_sketch_pipeline("data/toy-base", "data/toy-sketch-adapter", ["frog", "robot"])
>>> scene = random_character_scene(np.random.default_rng(0), ("frog", "robot"))
>>> image = sample_scene(pipe, loras, adapter, scene, seed=0, arm="regional+sketch")
>>> character_views(image, scene)     # what the oracle reads for each region
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from lorakit.fileio import save_image, write_text
from lorakit.sampling import SamplerSettings, generate, load_adapters, load_pipeline
from lorakit.sampling.conditions import Condition
from lorakit.sampling.regional import Region, RegionSpec
from lorakit.toyworld.loras import default_cache_dir, train_concept_lora
from lorakit.toyworld.sketch import CharacterScene, HALVES, render_character_scene, silhouette_image

ARMS = ("regional", "regional+sketch")
WINDOW_FILL = 0.8  # the character's size over the oracle window's side (where the oracle knows characters best)


def border_colour(a: np.ndarray) -> np.ndarray:
    """The median colour of an ``[H, W, 3]`` image's border (the background's colour)."""
    return np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)


def foreground(image, threshold: float = 60.0) -> np.ndarray:
    """Pixels whose colour is far from the border's median colour: ``[H, W]`` bool."""
    a = np.asarray(image.convert("RGB"), np.float32)
    return np.abs(a - border_colour(a)).max(-1) > threshold


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def character_views(image, scene: CharacterScene) -> list:
    """For each character: the square window around where its sketch puts it (the sprite ``WINDOW_FILL`` of the
    side), with the other half painted in the border colour, scaled to the image size (what the oracle reads)."""
    w, h = image.size
    a = np.asarray(image.convert("RGB"), np.float32)
    out = []
    for k, c in enumerate(scene.characters):
        b = a.copy()
        if k == 0:
            b[:, w // 2:] = border_colour(a)
        else:
            b[:, : w // 2] = border_colour(a)
        side = min(w, h, max(8, round(c.s * w / WINDOW_FILL)))
        x0 = int(round(min(max(c.cx * w - 0.5 * side, 0), w - side)))
        y0 = int(round(min(max(c.cy * h - 0.5 * side, 0), h - side)))
        crop = Image.fromarray(b.round().astype(np.uint8)).crop((x0, y0, x0 + side, y0 + side))
        out.append(crop.resize((w, h), Image.BILINEAR))
    return out


def load_sketch_pipeline(base: str, adapter: str, characters, loras=None, scale: float = 0.8, lora_dir=None):
    """The toy base with the characters' LoRAs loaded (``loras``: their files; default the toy LoRA cache, trained
    there when missing) and the sketch T2I-Adapter. Returns ``(pipe, loaded adapters, adapter model)``."""
    from diffusers import T2IAdapter

    if loras is None:
        loras = [train_concept_lora(c, lora_dir or default_cache_dir()) for c in characters]
    pipe = load_pipeline(base, dtype="fp32", device="cpu")
    loaded = load_adapters(pipe, list(loras), [scale] * len(loras))
    return pipe, loaded, T2IAdapter.from_pretrained(adapter).eval()


def scene_regions(scene: CharacterScene, adapter=None, weight: float = 1.0):
    """The scene's :class:`RegionSpec` (a box per half with its character's caption) and, with ``adapter``, its
    sketch condition (the silhouette, ``weight`` in each character's box, 0 elsewhere)."""
    spec = RegionSpec(scene.background_prompt(), "", [Region(b, p) for b, p in zip(HALVES, scene.region_prompts())])
    if adapter is None:
        return spec, None
    _, sil = render_character_scene(scene)
    return spec, [Condition(adapter, silhouette_image(sil), 0.0, [(b, weight) for b in HALVES], name="sketch")]


def sample_scene(pipe, loras, adapter, scene: CharacterScene, seed: int, arm: str, method: str = "merge",
                 steps: int = 20, cfg: float = 4.0, weight: float = 1.0, uncond: str = "adapter"):
    """One image of ``scene``: regional prompts, with the sketch (``arm`` ``regional+sketch``) or without."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    spec, conds = scene_regions(scene, adapter if arm == ARMS[1] else None, weight)
    images, _ = generate(pipe, loras, SamplerSettings(method=method, steps=steps, cfg=cfg, uncond=uncond), "", "", [seed],
                         regions=spec, conditions=conds)
    return images[0]


def write_sheet(folder, scenes: list[dict], enlarge: int = 4):
    """``folder/sheet.html``: per scene the sketch, the rendered target and both arms' images, enlarged ``enlarge``
    times with nearest-neighbour scaling (``folder/x4/``), each with the oracle's per-region verdict and the IoU.

    ``scenes``: ``{"title", "images": {column: 32x32 file name in folder}, "verdicts": {column: text}}``.
    """
    from html import escape
    from pathlib import Path

    folder = Path(folder)
    big = folder / f"x{enlarge}"
    big.mkdir(exist_ok=True)
    columns = list(scenes[0]["images"]) if scenes else []
    rows = []
    for s in scenes:
        cells = []
        for col in columns:
            name = s["images"][col]
            img = Image.open(folder / name)
            save_image(img.resize((img.width * enlarge, img.height * enlarge), Image.NEAREST), big / name)
            cells.append(f"<td><a href=\"{escape(name)}\"><img src=\"x{enlarge}/{escape(name)}\" alt=\"{escape(col)}\">"
                         f"</a><div class=\"v\">{escape(s['verdicts'].get(col, ''))}</div></td>")
        rows.append(f"<tr><th>{escape(s['title'])}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>two characters placed by sketches</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:center}} img{{width:{32 * enlarge}px;image-rendering:pixelated}}
.v{{font-size:11px;color:#555}}</style></head><body>
<h1>Two toy characters placed by their sketches</h1>
<p>Regional sampling, one box per half with its character's trigger word; with and without the toy sketch adapter
(same seed). Images {enlarge}x enlarged (nearest neighbour; click for the 32x32 file). Under each image: the oracle's
verdict for each region's character where its sketch puts it (upper case = found, lower case = not) and the IoU of
the drawn figures with the sketch.</p>
<table><tr><th>scene</th>{head}</tr>{''.join(rows)}</table></body></html>
""", folder / "sheet.html")
    return folder / "sheet.html"
