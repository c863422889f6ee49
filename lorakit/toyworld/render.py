"""Deterministic procedural renderer of toy scenes (PIL + numpy).

A :class:`Scene` says what is in the picture; :func:`render` draws it (4x supersampled, then box-filtered down
to ``size`` x ``size``) and :func:`caption` writes its comma-tag caption. The same scene always gives the same
pixels: position and size jitter come from ``Scene.seed`` only.

>>> img = render(Scene(background="gradient", bg_color="cyan", shape="circle", shape_color="red", seed=3))
>>> caption(Scene(characters=("robot",), objects=("tophat",), background="checker", style="ink"))
'zorbo, hattock, chekka, inkvel'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lorakit.toyworld.concepts import (
    BACKGROUND_COLORS,
    CONCEPTS,
    GENERIC_BACKGROUNDS,
    SHAPE_COLORS,
    SHAPES,
    concepts_of_kind,
)

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """What one toy image shows.

    Attributes:
        background: ``plain``/``gradient``/``stripes`` (generic, drawn in ``bg_color``) or a held-out
            background name (``checker``, ``starry``).
        bg_color: colour of a generic background: ``white``, ``gray``, ``cyan``, ``pink``, ``sand``.
        shape: a generic shape (``circle``, ``square``, ``triangle``, ``cross``) or None.
        shape_color: its colour (``red``, ``green``, ``blue``, ``yellow``, ``purple``, ``orange``).
        characters: up to 2 held-out character names, drawn left to right.
        objects: held-out object names (``tophat`` sits on the first character's head, ``mushroom`` stands
            beside it; alone they are drawn in the middle).
        style: a held-out style name (``pixel``, ``ink``) or None.
        seed: seeds the position/size jitter and background phase.
    """

    background: str = "plain"
    bg_color: str = "white"
    shape: str | None = None
    shape_color: str = "red"
    characters: tuple[str, ...] = ()
    objects: tuple[str, ...] = ()
    style: str | None = None
    seed: int = 0

    def __post_init__(self):
        check_choice(self.background, [*GENERIC_BACKGROUNDS, *(c.name for c in concepts_of_kind("background", True))], "background")
        check_choice(self.bg_color, BACKGROUND_COLORS, "bg_color")
        if self.shape is not None:
            check_choice(self.shape, SHAPES, "shape")
        check_choice(self.shape_color, SHAPE_COLORS, "shape_color")
        for ch in self.characters:
            check_choice(ch, [c.name for c in concepts_of_kind("character")], "character")
        if len(self.characters) > 2:
            raise ValueError(f"a scene holds at most 2 characters, got {list(self.characters)}")
        for ob in self.objects:
            check_choice(ob, [c.name for c in concepts_of_kind("object")], "object")
        if len(set(self.objects)) != len(self.objects):
            raise ValueError(f"objects repeat: {list(self.objects)}")
        if self.style is not None:
            check_choice(self.style, [c.name for c in concepts_of_kind("style")], "style")

    def concepts(self) -> set[str]:
        """Names of the concepts this scene shows (the oracle's targets)."""
        out = set(self.characters) | set(self.objects)
        out.add(self.background)
        if self.shape is not None:
            out |= {self.shape, self.shape_color}
        if self.style is not None:
            out.add(self.style)
        return out


def check_choice(value, allowed, what):
    """A ValueError naming ``what``, the bad value and the allowed ones, unless ``value`` is allowed."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")


def caption(scene: Scene) -> str:
    """Comma-tag caption: characters, objects, shape, background, style (triggers for held-out concepts)."""
    tags = [CONCEPTS[c].trigger for c in scene.characters]
    tags += [CONCEPTS[o].trigger for o in scene.objects]
    if scene.shape is not None:
        tags.append(f"{scene.shape_color} {scene.shape}")
    bg = CONCEPTS[scene.background]
    tags.append(bg.trigger if bg.heldout else f"{scene.bg_color} {scene.background} background")
    if scene.style is not None:
        tags.append(CONCEPTS[scene.style].trigger)
    return ", ".join(tags)


# ---------------------------------------------------------------- backgrounds (numpy, [H, W, 3] float)


def _background(scene: Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    y = np.arange(n, dtype=np.float32)[:, None, None]
    x = np.arange(n, dtype=np.float32)[None, :, None]
    if scene.background in GENERIC_BACKGROUNDS:
        col = np.array(BACKGROUND_COLORS[scene.bg_color], np.float32)
        if scene.background == "plain":
            return np.broadcast_to(col, (n, n, 3)).copy()
        if scene.background == "gradient":
            t = y / (n - 1)
            return np.broadcast_to(col * (0.35 + 0.65 * t), (n, n, 3)).copy()
        period = n / 4
        phase = rng.uniform(0, period)
        band = ((y + phase) // (period / 2)) % 2
        return np.broadcast_to(np.where(band > 0, col * 0.62, col), (n, n, 3)).copy()
    if scene.background == "checker":
        cell = n / 4
        px, py = rng.uniform(0, cell, size=2)
        on = (((x + px) // cell + (y + py) // cell) % 2) > 0
        return np.where(on, np.array([40, 160, 150], np.float32), np.array([25, 35, 95], np.float32)) * np.ones((n, n, 1))
    if scene.background == "starry":
        t = y / (n - 1)
        img = np.broadcast_to(np.array([12, 12, 40], np.float32) * (1 - t) + np.array([35, 20, 75], np.float32) * t, (n, n, 3)).copy()
        pil = Image.fromarray(img.astype(np.uint8))
        d = ImageDraw.Draw(pil)
        for _ in range(9):
            cx, cy = rng.uniform(0.04, 0.96, size=2) * n
            r = rng.uniform(0.025, 0.04) * n
            colour = (255, 230, 80) if rng.random() < 0.6 else (245, 245, 255)
            d.polygon(star_points(cx, cy, r, r * 0.45), fill=colour)
        return np.asarray(pil, np.float32)
    raise AssertionError(scene.background)


def star_points(cx, cy, r_out, r_in, points=4):
    """Polygon of a ``points``-point star centred at (cx, cy)."""
    angles = np.arange(2 * points) * np.pi / points - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a, r in zip(angles, radii)]


# ---------------------------------------------------------------- sprites (PIL, supersampled canvas)


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx, cy, r, colour):
    """A generic shape (circle, square, triangle, cross) of radius ``r`` at (cx, cy)."""
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        k = r * 0.88
        d.rectangle([cx - k, cy - k, cx + k, cy + k], fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r * 1.05), (cx + r * 1.1, cy + r * 0.85), (cx - r * 1.1, cy + r * 0.85)], fill=colour)
    elif shape == "cross":
        a = r * 0.36
        d.rectangle([cx - r, cy - a, cx + r, cy + a], fill=colour)
        d.rectangle([cx - a, cy - r, cx + a, cy + r], fill=colour)


def _robot(d, cx, cy, s, omit=frozenset()):
    """Returns (x, y_top, width) of the head, where a hat goes. ``omit``: parts not drawn (``PARTS["robot"]``)."""
    if "legs" not in omit:
        d.rectangle([cx - 0.17 * s, cy + 0.28 * s, cx - 0.06 * s, cy + 0.48 * s], fill=(60, 60, 70))
        d.rectangle([cx + 0.06 * s, cy + 0.28 * s, cx + 0.17 * s, cy + 0.48 * s], fill=(60, 60, 70))
    if "body" not in omit:
        d.rectangle([cx - 0.26 * s, cy - 0.06 * s, cx + 0.26 * s, cy + 0.30 * s], fill=(170, 170, 180))
    if "head" not in omit:
        d.rectangle([cx - 0.21 * s, cy - 0.36 * s, cx + 0.21 * s, cy - 0.06 * s], fill=(120, 120, 135))
    if "visor" not in omit:
        d.rectangle([cx - 0.17 * s, cy - 0.27 * s, cx + 0.17 * s, cy - 0.16 * s], fill=(60, 230, 255))
    if "antenna" not in omit:
        d.rectangle([cx - 0.015 * s, cy - 0.46 * s, cx + 0.015 * s, cy - 0.36 * s], fill=(60, 60, 70))
        d.ellipse([cx - 0.065 * s, cy - 0.53 * s, cx + 0.065 * s, cy - 0.41 * s], fill=(235, 30, 30))
    return cx, cy - 0.36 * s, 0.42 * s


def _frog(d, cx, cy, s, omit=frozenset()):
    if "body" not in omit:
        d.ellipse([cx - 0.46 * s, cy - 0.18 * s, cx + 0.46 * s, cy + 0.42 * s], fill=(70, 185, 60))
    if "belly" not in omit:
        d.ellipse([cx - 0.26 * s, cy + 0.02 * s, cx + 0.26 * s, cy + 0.38 * s], fill=(180, 230, 120))
    if "eyes" not in omit:
        for sx in (-1, 1):
            ex, ey = cx + sx * 0.22 * s, cy - 0.18 * s
            d.ellipse([ex - 0.14 * s, ey - 0.14 * s, ex + 0.14 * s, ey + 0.14 * s], fill=(70, 185, 60))
            d.ellipse([ex - 0.10 * s, ey - 0.10 * s, ex + 0.10 * s, ey + 0.10 * s], fill=(255, 255, 255))
            d.ellipse([ex - 0.05 * s, ey - 0.05 * s, ex + 0.05 * s, ey + 0.05 * s], fill=(10, 10, 10))
    if "mouth" not in omit:
        d.rectangle([cx - 0.2 * s, cy + 0.02 * s, cx + 0.2 * s, cy + 0.07 * s], fill=(200, 30, 40))
    return cx, cy - 0.3 * s, 0.5 * s


def _ghost(d, cx, cy, s, omit=frozenset()):
    col = (205, 175, 255)
    if "body" not in omit:
        d.ellipse([cx - 0.33 * s, cy - 0.48 * s, cx + 0.33 * s, cy + 0.18 * s], fill=col)
        d.rectangle([cx - 0.33 * s, cy - 0.15 * s, cx + 0.33 * s, cy + 0.36 * s], fill=col)
    if "hem" not in omit:
        for k in (-1, 0, 1):
            hx = cx + k * 0.22 * s
            d.ellipse([hx - 0.11 * s, cy + 0.25 * s, hx + 0.11 * s, cy + 0.47 * s], fill=col)
    for sx in (-1, 1):
        ex = cx + sx * 0.13 * s
        if "eyes" not in omit:
            d.ellipse([ex - 0.06 * s, cy - 0.25 * s, ex + 0.06 * s, cy - 0.07 * s], fill=(20, 15, 40))
        if "cheeks" not in omit:
            d.ellipse([ex + sx * 0.07 * s - 0.05 * s, cy - 0.02 * s, ex + sx * 0.07 * s + 0.05 * s, cy + 0.05 * s],
                      fill=(255, 120, 170))
    return cx, cy - 0.46 * s, 0.46 * s


def _tophat(d, x, y_base, w, omit=frozenset()):
    """A top hat whose brim bottom is at ``y_base``, brim width ``w``."""
    if "brim" not in omit:
        d.rectangle([x - 0.55 * w, y_base - 0.16 * w, x + 0.55 * w, y_base], fill=(25, 25, 30))
    if "crown" not in omit:
        d.rectangle([x - 0.34 * w, y_base - 0.85 * w, x + 0.34 * w, y_base - 0.1 * w], fill=(25, 25, 30))
    if "band" not in omit:
        d.rectangle([x - 0.34 * w, y_base - 0.34 * w, x + 0.34 * w, y_base - 0.18 * w], fill=(215, 30, 45))


def _mushroom(d, x, y_base, h, omit=frozenset()):
    """A mushroom standing on ``y_base``, ``h`` tall."""
    if "stem" not in omit:
        d.rectangle([x - 0.15 * h, y_base - 0.55 * h, x + 0.15 * h, y_base], fill=(240, 225, 185))
    if "cap" not in omit:
        d.chord([x - 0.5 * h, y_base - h, x + 0.5 * h, y_base - 0.2 * h], 180, 360, fill=(215, 35, 35))
    if "spots" not in omit:
        for dx, dy, r in ((-0.25, -0.72, 0.08), (0.05, -0.85, 0.07), (0.27, -0.68, 0.07)):
            d.ellipse([x + (dx - r) * h, y_base + (dy - r) * h, x + (dx + r) * h, y_base + (dy + r) * h],
                      fill=(255, 255, 255))


_CHARACTERS = {"robot": _robot, "frog": _frog, "ghost": _ghost}
# The parts each sprite is drawn from (what ``omit`` may leave out; hard negatives draw only some of them).
PARTS = {
    "robot": ("legs", "body", "head", "visor", "antenna"),
    "frog": ("body", "belly", "eyes", "mouth"),
    "ghost": ("body", "hem", "eyes", "cheeks"),
    "tophat": ("brim", "crown", "band"),
    "mushroom": ("stem", "cap", "spots"),
}


# ---------------------------------------------------------------- styles


def _ink(img: np.ndarray) -> np.ndarray:
    """Thick black outlines at colour edges and flat (posterized) colours; ``img`` [H, W, 3] float 0-255."""
    n = img.shape[0]
    k = max(1, n // 64)
    diff = np.zeros(img.shape[:2], np.float32)
    for dy, dx in ((k, 0), (0, k), (k, k), (k, -k)):
        shifted = np.roll(img, (dy, dx), axis=(0, 1))
        diff = np.maximum(diff, np.abs(img - shifted).max(-1))
    edge = diff > 45
    edge[:k], edge[-k:], edge[:, :k], edge[:, -k:] = False, False, False, False
    grow = edge.copy()
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            grow |= np.roll(edge, (dy, dx), axis=(0, 1))
    flat = np.round(img / 64.0) * 64.0
    flat = 0.75 * flat + 0.25 * np.array([250, 245, 225], np.float32)
    return np.where(grow[..., None], np.array([15, 15, 20], np.float32), flat)


def _pixelate(img: Image.Image, block: int) -> Image.Image:
    """Retro pixel art: ``block`` x ``block`` pixel squares in a 4-level-per-channel palette."""
    n = img.size[0]
    small = np.asarray(img.resize((n // block, n // block), Image.BOX), np.float32)
    small = np.round(small / 85.0) * 85.0
    return Image.fromarray(small.astype(np.uint8)).resize((n, n), Image.NEAREST)


# ---------------------------------------------------------------- render


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB PIL image (same scene -> same pixels).

    Raises:
        ValueError: if ``size`` is not a multiple of 8 between 16 and 256.
    """
    if size % 8 or not 16 <= size <= 256:
        raise ValueError(f"size must be a multiple of 8 in [16, 256], got {size}")
    rng = np.random.default_rng(scene.seed)
    n = size * SUPERSAMPLE
    bg = _background(scene, n, rng)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    # one draw of every jitter so scenes that differ only in content share the layout of a seed
    jit = rng.uniform(-1, 1, size=6)
    if scene.shape is not None:
        r = n * (0.22 + 0.05 * jit[0])
        draw_shape(d, scene.shape, n * (0.5 + 0.12 * jit[1]), n * (0.5 + 0.12 * jit[2]), r, SHAPE_COLORS[scene.shape_color])
    head = None
    if len(scene.characters) == 1:
        s = n * (0.62 + 0.06 * jit[3])
        head = _CHARACTERS[scene.characters[0]](d, n * (0.5 + 0.1 * jit[4]), n * (0.56 + 0.05 * jit[5]), s)
    elif len(scene.characters) == 2:
        s = n * (0.46 + 0.04 * jit[3])
        for i, ch in enumerate(scene.characters):
            h = _CHARACTERS[ch](d, n * (0.26 + 0.48 * i + 0.03 * jit[4]), n * (0.58 + 0.05 * jit[5]), s)
            head = head or h
    for ob in scene.objects:
        if ob == "tophat":
            if head:
                _tophat(d, head[0], head[1] + 0.02 * n, head[2] * 1.1)
            else:
                _tophat(d, n * (0.5 + 0.1 * jit[1]), n * (0.72 + 0.05 * jit[2]), n * (0.6 + 0.05 * jit[0]))
        elif ob == "mushroom":
            if scene.characters:
                _mushroom(d, n * 0.84, n * 0.95, n * 0.34)
            else:
                _mushroom(d, n * (0.5 + 0.1 * jit[1]), n * (0.82 + 0.05 * jit[2]), n * (0.62 + 0.05 * jit[0]))
    arr = np.asarray(canvas, np.float32)
    if scene.style == "ink":
        arr = _ink(arr)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((size, size), Image.BOX)
    if scene.style == "pixel":
        img = _pixelate(img, max(2, size // 16))
    return img
