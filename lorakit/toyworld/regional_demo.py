"""Two toy characters placed by their sketches: regional sampling with the toy sketch adapter (Mix-of-Show's figure).

One box per half, each with its character's caption, a global prompt (v1: the background; v2: the whole scene's
caption, as Mix-of-Show names every concept there); the condition is both characters' silhouettes, each in its
box, through the bundled T2I-Adapter weighted per region. Toy world v2 (the default: ``data/toy2-base``,
``data/toy2-sketch-adapter``, identities of :mod:`lorakit.toyworld.v2.sketch`) or v1 (``data/toy-base``,
``data/toy-sketch-adapter``, :mod:`lorakit.toyworld.sketch`). Used by ``tools/measure_regional_sketch.py`` (with
against without the sketch).

>>> pipe, loras, adapter = load_sketch_pipeline(WORLDS["v2"].base, WORLDS["v2"].adapter, loras=[fused_edlora_file])
>>> scene = WORLDS["v2"].random_scene(np.random.default_rng(0), ("kwibbit", "zorbo"))
>>> image = sample_scene(pipe, loras, adapter, scene, seed=0, arm="regional+sketch", words=concept_words(loras))
>>> character_views(image, scene)     # what the oracle reads for each region
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Callable

import numpy as np
from diffusers import T2IAdapter
from PIL import Image

from lorakit.fileio import save_image, write_text
from lorakit.resources import data_path
from lorakit.sampling import SamplerSettings, generate, load_adapters, load_pipeline
from lorakit.sampling.conditions import Condition
from lorakit.sampling.loading import is_edlora, read_metadata
from lorakit.sampling.regional import Region, RegionSpec
from lorakit.toyworld.loras import default_cache_dir, train_concept_lora
from lorakit.toyworld import sketch as v1_sketch
from lorakit.toyworld.oracle import load_oracle
from lorakit.toyworld.sketch import CharacterScene, HALVES, render_character_scene, silhouette_image
from lorakit.toyworld.v2 import sketch as v2_sketch
from lorakit.toyworld.v2.oracle import Oracle as V2Oracle

ARMS = ("regional", "regional+sketch")


@dataclass(frozen=True)
class SketchWorld:
    """What the demo needs of a toy world: its base, sketch adapter, example folder, default characters, scene
    generator and oracle loader."""

    base: str
    adapter: str
    example: str
    characters: tuple[str, str]
    random_scene: Callable
    load_oracle: Callable


def _v1_oracle():
    return load_oracle()


def _v2_oracle():
    return V2Oracle.load()


def _v2_scene(rng, characters=("kwibbit", "zorbo"), background="plain", bg_color="white"):
    return v2_sketch.random_character_scene(rng, characters, background, bg_color)


def _v1_scene(rng, characters=("frog", "robot"), background="plain", bg_color="white"):
    return v1_sketch.random_character_scene(rng, characters, background, bg_color)


WORLDS = {
    "v1": SketchWorld(str(data_path("toy-base")), str(data_path("toy-sketch-adapter")),
                      str(data_path("regional-sketch-example")), ("frog", "robot"), _v1_scene, _v1_oracle),
    "v2": SketchWorld(str(data_path("toy2-base")), str(data_path("toy2-sketch-adapter")),
                      str(data_path("regional-sketch-example-v2")), ("kwibbit", "zorbo"), _v2_scene, _v2_oracle),
}
DEFAULT_WORLD = "v2"
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


def load_sketch_pipeline(base: str, adapter: str, characters=(), loras=None, scale: float = 0.8, lora_dir=None):
    """A toy base with LoRAs loaded and the sketch T2I-Adapter. ``loras``: the files to load (plain LoRAs, each at
    ``scale``, or ED-LoRA files, fused or not, at scale 1 with their pseudo-words); default (v1 only): the toy
    LoRA cache's LoRAs of ``characters``, trained there when missing. Returns ``(pipe, loaded adapters, adapter
    model)``."""
    if loras is None:
        loras = [train_concept_lora(c, lora_dir or default_cache_dir()) for c in characters]
    pipe = load_pipeline(base, dtype="fp32", device="cpu")
    scales = [1.0 if is_edlora(read_metadata(p)) else scale for p in loras]
    loaded = load_adapters(pipe, list(loras), scales)
    return pipe, loaded, T2IAdapter.from_pretrained(adapter).eval()


def concept_words(loaded) -> dict[str, str]:
    """``{concept name: its pseudo-words}`` of the loaded ED-LoRA files (fused or not): ``{"zorbo": "<zorbo1>
    <zorbo2>"}``; empty for plain LoRAs."""
    words = {}
    for a in loaded:
        table = a.metadata.get("lorakit.edlora")
        for c in json.loads(table)["concepts"] if table else ():
            words[c["name"]] = " ".join(c["words"])
    return words


def with_words(prompt: str, words: dict[str, str] | None) -> str:
    """``prompt`` with each concept's name replaced by its pseudo-words (``zorbo robot`` -> ``<zorbo1> <zorbo2>
    robot``), as an ED-LoRA's captions were written."""
    for name, w in (words or {}).items():
        prompt = re.sub(rf"(?<![<\w]){re.escape(name)}(?![\w>])", w, prompt)
    return prompt


def scene_regions(scene: CharacterScene, adapter=None, weight: float = 1.0, words: dict[str, str] | None = None):
    """The scene's :class:`RegionSpec` (a box per half with its character's caption, the scene's global prompt;
    ``words``: ED-LoRA pseudo-words put in for the concept names) and, with ``adapter``, its sketch condition (the
    silhouette, ``weight`` in each character's box, 0 elsewhere)."""
    spec = RegionSpec(with_words(scene.global_prompt(), words), "",
                      [Region(b, with_words(p, words)) for b, p in zip(HALVES, scene.region_prompts())])
    if adapter is None:
        return spec, None
    _, sil = render_character_scene(scene)
    return spec, [Condition(adapter, silhouette_image(sil), 0.0, [(b, weight) for b in HALVES], name="sketch")]


def sample_scene(pipe, loras, adapter, scene: CharacterScene, seed: int, arm: str, method: str = "merge",
                 steps: int = 20, cfg: float = 4.0, weight: float = 1.0, uncond: str = "adapter",
                 words: dict[str, str] | None = None):
    """One image of ``scene``: regional prompts, with the sketch (``arm`` ``regional+sketch``) or without."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    spec, conds = scene_regions(scene, adapter if arm == ARMS[1] else None, weight, words)
    images, _ = generate(pipe, loras, SamplerSettings(method=method, steps=steps, cfg=cfg, uncond=uncond), "", "", [seed],
                         regions=spec, conditions=conds)
    return images[0]


def write_sheet(folder, scenes: list[dict], enlarge: int = 4):
    """``folder/sheet.html``: per scene the sketch, the rendered target and both arms' images, enlarged ``enlarge``
    times with nearest-neighbour scaling (``folder/x4/``), each with the oracle's per-region verdict and the IoU.

    ``scenes``: ``{"title", "images": {column: image file name in folder}, "verdicts": {column: text}}``.
    """
    folder = Path(folder)
    big = folder / f"x{enlarge}"
    big.mkdir(exist_ok=True)
    columns = list(scenes[0]["images"]) if scenes else []
    rows, size = [], 32
    for s in scenes:
        cells = []
        for col in columns:
            name = s["images"][col]
            img = Image.open(folder / name)
            size = img.width
            save_image(img.resize((img.width * enlarge, img.height * enlarge), Image.NEAREST), big / name)
            cells.append(f"<td><a href=\"{escape(name)}\"><img src=\"x{enlarge}/{escape(name)}\" alt=\"{escape(col)}\">"
                         f"</a><div class=\"v\">{escape(s['verdicts'].get(col, ''))}</div></td>")
        rows.append(f"<tr><th>{escape(s['title'])}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>two characters placed by sketches</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:center}} img{{width:{size * enlarge}px;image-rendering:pixelated}}
.v{{font-size:11px;color:#555}}</style></head><body>
<h1>Two toy characters placed by their sketches</h1>
<p>Regional sampling, one box per half with its character's trigger word; with and without the toy sketch adapter
(same seed). Images {enlarge}x enlarged (nearest neighbour; click for the {size}x{size} file). Under each image: the oracle's
verdict for each region's character where its sketch puts it (upper case = found, lower case = not) and the IoU of
the drawn figures with the sketch.</p>
<table><tr><th>scene</th>{head}</tr>{''.join(rows)}</table></body></html>
""", folder / "sheet.html")
    return folder / "sheet.html"
