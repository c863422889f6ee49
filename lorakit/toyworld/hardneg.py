"""Hard negatives for the toy oracle: images that share something with a held-out concept but do not show it.

For every held-out concept three families (``FAMILIES``), all drawn with :mod:`lorakit.toyworld.render`'s sprites:

* ``blobs``: 2-4 ellipses / rectangles / rings around a blob in the concept's own colours on a generic scene (a
  green and a pale-green oval, a green ring around a red one, is not a frog);
* ``parts``: the concept with its most telling parts left out (a frog's body without eyes and mouth, the eyes and
  mouth without the body; a checkerboard in other colours; stripes in the checker's colours; a starless night
  sky; posterized colours without the ink outlines; 2x2 blocks without the pixel palette);
* ``recoloured``: the other characters and objects (or, for backgrounds and styles, other patterns) drawn in the
  concept's colours (a robot in the frog's greens).

A quarter of them is drawn in the ink style and 15% in the pixel style (never the concept's own), as generated
images often are. A good oracle scores the concept absent on every one of them (``tools/measure_oracle.py`` measures how often).

>>> imgs = hard_negatives("frog", 6, seed=0)      # [(PIL image 32x32, family, what), ...] families in turn
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from lorakit.toyworld import render as R
from lorakit.toyworld.concepts import HELDOUT, SHAPE_COLORS, get_concept
from lorakit.toyworld.scenes import generic_scene

FAMILIES = ("blobs", "parts", "recoloured")

# The colours each held-out concept is drawn in (RGB), darkest first.
PALETTES: dict[str, list[tuple[int, int, int]]] = {
    "robot": [(60, 60, 70), (120, 120, 135), (170, 170, 180), (235, 30, 30), (60, 230, 255)],
    "frog": [(10, 10, 10), (200, 30, 40), (70, 185, 60), (180, 230, 120), (255, 255, 255)],
    "ghost": [(20, 15, 40), (255, 120, 170), (205, 175, 255)],
    "tophat": [(25, 25, 30), (215, 30, 45)],
    "mushroom": [(215, 35, 35), (240, 225, 185), (255, 255, 255)],
    "checker": [(25, 35, 95), (40, 160, 150)],
    "starry": [(12, 12, 40), (35, 20, 75), (255, 230, 80), (245, 245, 255)],
    "ink": [(15, 15, 20), (250, 245, 225)],
    "pixel": [(255, 0, 0), (0, 170, 85), (85, 85, 255), (255, 255, 85), (170, 0, 170), (255, 170, 0)],
}

# Part subsets that leave out what makes the sprite that concept (each is one "parts" negative).
PART_KEEPS: dict[str, list[tuple[str, ...]]] = {
    "robot": [("legs", "body", "head"), ("visor", "antenna"), ("body", "legs")],
    "frog": [("body", "belly"), ("eyes", "mouth"), ("body", "mouth")],
    "ghost": [("body",), ("eyes", "cheeks")],
    "tophat": [("crown",), ("brim", "band")],
    "mushroom": [("cap",), ("stem", "spots")],
}

_SPRITES = ("robot", "frog", "ghost", "tophat", "mushroom")


def _generic_canvas(rng: np.random.Generator, n: int, light: bool = False) -> np.ndarray:
    """A generic background (plain / gradient / stripes in a generic colour) as ``[n, n, 3]`` float."""
    scene = generic_scene(rng)
    if light:
        scene = R.Scene("plain", scene.bg_color, seed=scene.seed)
    return R._background(scene, n, rng)


def _to_image(arr: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((size, size), Image.BOX)


def _draw_sprite(d: ImageDraw.ImageDraw, name: str, n: int, rng: np.random.Generator, omit=frozenset()) -> None:
    """One sprite (character or object) near the middle, jittered like :func:`render.render`."""
    jit = rng.uniform(-1, 1, size=3)
    cx, cy = n * (0.5 + 0.1 * jit[0]), n * (0.56 + 0.05 * jit[1])
    if name in R._CHARACTERS:
        R._CHARACTERS[name](d, cx, cy, n * (0.62 + 0.06 * jit[2]), omit)
    elif name == "tophat":
        R._tophat(d, cx, n * (0.72 + 0.05 * jit[1]), n * (0.6 + 0.05 * jit[2]), omit)
    else:
        R._mushroom(d, cx, n * (0.82 + 0.05 * jit[1]), n * (0.62 + 0.05 * jit[2]), omit)


def recolour(arr: np.ndarray, mask: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """Pixels under ``mask`` mapped to ``palette`` by brightness rank (darkest to darkest)."""
    lum = arr[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    values = np.unique(np.round(lum[mask]))
    out = arr.copy()
    pal = np.array(sorted(palette, key=lambda c: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]), np.float32)
    for i, v in enumerate(values):
        sel = mask & (np.round(lum) == v)
        out[sel] = pal[min(len(pal) - 1, int(i * len(pal) / max(1, len(values))))]
    return out


def _blobs(concept: str, rng: np.random.Generator, n: int) -> np.ndarray:
    return draw_blobs(_generic_canvas(rng, n), PALETTES[concept], rng, n)


def draw_blobs(background: np.ndarray, palette, rng: np.random.Generator, n: int) -> np.ndarray:
    """2-4 ellipses, rectangles or rings in ``palette``'s colours on ``background`` (``n x n x 3``), the
    concept's colours without its shape."""
    canvas = Image.fromarray(background.astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0.2, 0.8, size=2) * n
        w, h = rng.uniform(0.08, 0.3, size=2) * n
        col = tuple(int(v) for v in palette[int(rng.integers(len(palette)))])
        box = [cx - w, cy - h, cx + w, cy + h]
        u = rng.random()
        if u < 0.35:  # a ring in one of its colours around a blob in another
            inner = tuple(int(v) for v in palette[int(rng.integers(len(palette)))])
            d.ellipse(box, fill=inner, outline=col, width=max(2, int(n * rng.uniform(0.03, 0.07))))
        else:
            (d.ellipse if u < 0.75 else d.rectangle)(box, fill=col)
    return np.asarray(canvas, np.float32)


def _sprite_parts(concept: str, rng: np.random.Generator, n: int, i: int) -> tuple[np.ndarray, str]:
    keep = PART_KEEPS[concept][i % len(PART_KEEPS[concept])]
    omit = frozenset(R.PARTS[concept]) - set(keep)
    canvas = Image.fromarray(_generic_canvas(rng, n).astype(np.uint8))
    _draw_sprite(ImageDraw.Draw(canvas), concept, n, rng, omit)
    return np.asarray(canvas, np.float32), f"{concept} with only {'+'.join(keep)}"


def _other_parts(concept: str, rng: np.random.Generator, n: int, i: int) -> tuple[np.ndarray, str]:
    """``parts`` negatives of backgrounds and styles."""
    y = np.arange(n, dtype=np.float32)[:, None, None]
    x = np.arange(n, dtype=np.float32)[None, :, None]
    if concept == "checker":
        teal, navy = np.array(PALETTES["checker"][1], np.float32), np.array(PALETTES["checker"][0], np.float32)
        if i % 2 == 0:  # its colours, striped (horizontal or vertical)
            axis = y if rng.random() < 0.5 else x
            band = ((axis + rng.uniform(0, n / 4)) // (n / 8)) % 2
            return np.where(band > 0, teal, navy) * np.ones((n, n, 1)), "teal/navy stripes"
        cols = [np.array(c, np.float32) for c in rng.choice(list(SHAPE_COLORS.values()), 2, replace=False)]
        cell = n / 4
        on = (((x + rng.uniform(0, cell)) // cell + (y + rng.uniform(0, cell)) // cell) % 2) > 0
        return np.where(on, cols[0], cols[1]) * np.ones((n, n, 1)), "checkerboard in other colours"
    if concept == "starry":
        if i % 2 == 0:  # the night sky's gradient without its stars
            t = y / (n - 1)
            sky = np.array(PALETTES["starry"][0], np.float32) * (1 - t) + np.array(PALETTES["starry"][1], np.float32) * t
            return sky * np.ones((1, n, 1), np.float32), "starless night sky"
        sky = R._background(R.Scene("starry"), n, rng)  # its stars on a light generic background
        stars = (sky.max(-1) > 150)[..., None]
        return np.where(stars, sky, _generic_canvas(rng, n, light=True)), "stars on a light background"
    scene = generic_scene(rng, p_empty=0.0)
    base = np.asarray(R.render(scene, n // R.SUPERSAMPLE), np.float32)
    if concept == "ink":
        img = base
        if i % 2 == 0:  # flat posterized colours, no outlines
            flat = np.round(img / 64.0) * 64.0
            return _up(0.75 * flat + 0.25 * np.array([250, 245, 225], np.float32), n), "posterized, no outlines"
        return _up(_thin_outline(img), n), "thin gray outlines, no posterizing"
    if i % 2 == 0:  # pixel: 2x2 blocks in the scene's own colours (no palette)
        small = Image.fromarray(base.astype(np.uint8)).resize((n // 8, n // 8), Image.BOX)
        return _up(np.asarray(small.resize((n // 4, n // 4), Image.NEAREST), np.float32), n), "blocks, no palette"
    return _up(np.round(base / 85.0) * 85.0, n), "4-level palette, no blocks"


def _up(arr: np.ndarray, n: int) -> np.ndarray:
    """A small image scaled (nearest) to the ``n`` x ``n`` supersampled canvas."""
    return np.asarray(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((n, n), Image.NEAREST), np.float32)


def _thin_outline(img: np.ndarray) -> np.ndarray:
    diff = np.zeros(img.shape[:2], np.float32)
    for dy, dx in ((1, 0), (0, 1)):
        diff = np.maximum(diff, np.abs(img - np.roll(img, (dy, dx), axis=(0, 1))).max(-1))
    edge = diff > 45
    edge[:1], edge[:, :1] = False, False
    return np.where(edge[..., None], np.array([120, 120, 120], np.float32), img)


def _recoloured(concept: str, rng: np.random.Generator, n: int, i: int) -> tuple[np.ndarray, str]:
    pal = PALETTES[concept]
    c = get_concept(concept)
    if c.kind in ("character", "object"):
        others = [s for s in _SPRITES if s != concept]
        other = others[i % len(others)]
        bg = _generic_canvas(rng, n, light=True)
        key = np.array([0, 255, 0], np.float32) if concept != "frog" else np.array([255, 0, 255], np.float32)
        canvas = Image.fromarray(np.broadcast_to(key, (n, n, 3)).astype(np.uint8))
        _draw_sprite(ImageDraw.Draw(canvas), other, n, rng)
        arr = np.asarray(canvas, np.float32)
        mask = np.abs(arr - key).max(-1) > 0
        arr = recolour(arr, mask, pal)
        return np.where(mask[..., None], arr, bg), f"{other} in {concept}'s colours"
    # backgrounds and styles: a generic pattern or shape scene in the concept's colours
    kinds = ("stripes", "gradient", "shape")
    kind = kinds[i % len(kinds)]
    scene = generic_scene(rng, p_empty=0.0)
    if kind == "shape":
        arr = np.asarray(R.render(R.Scene("plain", "white", scene.shape, "red", seed=scene.seed), n // R.SUPERSAMPLE),
                         np.float32)
        arr = _up(arr, n)
        mask = np.abs(arr - np.array([240, 240, 232], np.float32)).max(-1) > 30
        cols = sorted(pal, key=lambda c: sum(c))
        return np.where(mask[..., None], np.array(cols[0], np.float32), np.array(cols[-1], np.float32)), \
            f"{scene.shape} in {concept}'s colours"
    arr = R._background(R.Scene(kind, "gray", seed=scene.seed), n, rng)
    return recolour(arr, np.ones(arr.shape[:2], bool), pal), f"{kind} in {concept}'s colours"


def hard_negatives(concept: str, n: int, seed: int = 0, size: int = 32) -> list[tuple[Image.Image, str, str]]:
    """``n`` hard negatives of a held-out concept, families in turn (blobs, parts, recoloured, blobs, ...).

    Args:
        concept: held-out concept name or trigger word.
        n: how many images.
        seed: fixes the whole sequence.
        size: image side in pixels.
    Returns:
        ``[(image, family, what)]``: a ``size`` x ``size`` RGB PIL image, its family (``FAMILIES``) and a few words
        saying what it shows.
    Raises:
        ValueError: for an unknown or a generic concept.
    """
    c = get_concept(concept)
    if not c.heldout:
        raise ValueError(f"hard negatives exist for held-out concepts only ({', '.join(h.name for h in HELDOUT)}), "
                         f"got {concept!r}")
    rng = np.random.default_rng(seed)
    big = size * R.SUPERSAMPLE
    out = []
    for k in range(n):
        family, i = FAMILIES[k % 3], k // 3
        if family == "blobs":
            arr, what = _blobs(c.name, rng, big), f"blobs in {c.name}'s colours"
        elif family == "parts":
            arr, what = (_sprite_parts if c.name in PART_KEEPS else _other_parts)(c.name, rng, big, i)
        else:
            arr, what = _recoloured(c.name, rng, big, i)
        # Generated images often carry a style: some negatives are drawn in one (never the concept's own).
        u = rng.random()
        if u < 0.25 and c.name != "ink":
            arr, what = R._ink(arr), what + ", ink style"
        img = _to_image(arr, size)
        if 0.25 <= u < 0.4 and c.name != "pixel":
            img, what = R._pixelate(img, max(2, size // 16)), what + ", pixel style"
        out.append((img, family, what))
    return out
