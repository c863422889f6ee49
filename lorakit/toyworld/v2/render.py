"""Deterministic renderer of toy world v2 scenes: 64x64, classes with variation and fixed identities.

A :class:`Scene` says what is in the picture; :func:`render` draws it (4x supersampled, box-filtered down) and
:func:`caption` describes the whole scene in comma tags, identities as ``<trigger> <class word>``:

>>> caption(Scene(characters=("kwibbit",), hat="hat", hat_color="blue", background="night"))
'kwibbit frog, blue hat, night background'

A class instance's look (pose, parts, proportions) varies with ``Scene.seed``; its colour is in the scene (and the
caption). An identity always has the same look; only its position and size jitter with the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lorakit.toyworld.concepts import (
    BACKGROUND_COLORS,
    GENERIC_BACKGROUNDS,
    SHAPE_COLORS,
    SHAPES,
)
from lorakit.toyworld.render import check_choice, draw_shape, star_points
from lorakit.toyworld.v2.concepts import CONCEPTS, concepts_of

SIZE = 64
SUPERSAMPLE = 4

CHARACTERS = tuple(c.name for c in concepts_of("character"))
BACKGROUNDS = (*GENERIC_BACKGROUNDS, *(c.name for c in concepts_of("background") if c.role != "generic"))
STYLES = tuple(c.name for c in concepts_of("style"))
HATS = ("hat", "hattock")
MUSHROOMS = ("mushroom", "shroomel")
# Backgrounds drawn in (and captioned with) a background colour.
COLOURED_BACKGROUNDS = (*GENERIC_BACKGROUNDS, "checker")


@dataclass(frozen=True)
class Scene:
    """What one v2 image shows.

    Attributes:
        background: ``plain``/``gradient``/``stripes``/``checker`` (in ``bg_color``), ``night``, or an identity
            background (``chekka``, ``nocturo``).
        bg_color: ``white``, ``gray``, ``cyan``, ``pink`` or ``sand``.
        shape, shape_color: a generic shape (or None) and its colour.
        characters: up to 2 characters, class (``frog``) or identity (``kwibbit``), left to right.
        char_colors: the colour of each class character (ignored for identities); defaults to ``red``.
        hat: None, ``hat`` (class) or ``hattock``; worn by the first character, else standing alone.
        hat_color: colour of a class hat.
        mushroom: None, ``mushroom`` or ``shroomel``; beside the characters, else alone.
        mushroom_color: cap colour of a class mushroom.
        style: None, ``outline``, ``mosaic``, ``inkvel`` or ``pixlor``.
        seed: drives position, size and a class instance's variation.
    """

    background: str = "plain"
    bg_color: str = "white"
    shape: str | None = None
    shape_color: str = "red"
    characters: tuple[str, ...] = ()
    char_colors: tuple[str, ...] = ()
    hat: str | None = None
    hat_color: str = "red"
    mushroom: str | None = None
    mushroom_color: str = "red"
    style: str | None = None
    seed: int = 0

    def __post_init__(self):
        check_choice(self.background, BACKGROUNDS, "background")
        check_choice(self.bg_color, BACKGROUND_COLORS, "bg_color")
        if self.shape is not None:
            check_choice(self.shape, SHAPES, "shape")
        for col in (self.shape_color, self.hat_color, self.mushroom_color, *self.char_colors):
            check_choice(col, SHAPE_COLORS, "colour")
        for ch in self.characters:
            check_choice(ch, CHARACTERS, "character")
        if len(self.characters) > 2:
            raise ValueError(f"a scene holds at most 2 characters, got {list(self.characters)}")
        if self.char_colors and len(self.char_colors) != len(self.characters):
            raise ValueError(f"char_colors {list(self.char_colors)} must give one colour per character")
        if self.hat is not None:
            check_choice(self.hat, HATS, "hat")
        if self.mushroom is not None:
            check_choice(self.mushroom, MUSHROOMS, "mushroom")
        if self.style is not None:
            check_choice(self.style, STYLES, "style")

    def colour_of(self, i: int) -> str:
        return self.char_colors[i] if self.char_colors else "red"

    def concepts(self) -> set[str]:
        """Names of the concepts this scene shows; an identity also shows its class."""
        names = set(self.characters) | {self.background}
        names |= {x for x in (self.hat, self.mushroom, self.style) if x is not None}
        if self.shape is not None:
            names |= {self.shape, self.shape_color}
        return names | {CONCEPTS[n].cls for n in names if CONCEPTS[n].cls}


def _tag(name: str, colour: str | None) -> str:
    c = CONCEPTS[name]
    return f"{name} {c.cls}" if c.role == "identity" else f"{colour} {name}" if colour else name


def caption(scene: Scene) -> str:
    """Comma tags for the whole scene: characters, hat, mushroom, shape, background, style."""
    tags = [_tag(ch, scene.colour_of(i)) for i, ch in enumerate(scene.characters)]
    if scene.hat is not None:
        tags.append(_tag(scene.hat, scene.hat_color))
    if scene.mushroom is not None:
        tags.append(_tag(scene.mushroom, scene.mushroom_color))
    if scene.shape is not None:
        tags.append(f"{scene.shape_color} {scene.shape}")
    bg = scene.background
    tags.append(f"{scene.bg_color} {bg} background" if bg in COLOURED_BACKGROUNDS else f"{_tag(bg, None)} background")
    if scene.style is not None:
        tags.append(f"{_tag(scene.style, None)} style")
    return ", ".join(tags)


# ---------------------------------------------------------------- helpers


def _rgb(c) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(v), 0, 255)) for v in c)


def _shade(c, f):
    return _rgb(np.array(c, np.float32) * f)


def _tint(c, f):
    """Blend ``c`` towards white by ``f``."""
    return _rgb(np.array(c, np.float32) * (1 - f) + 255 * f)


# ---------------------------------------------------------------- backgrounds ([n, n, 3] float)


def _background(scene: Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    y = np.arange(n, dtype=np.float32)[:, None, None]
    x = np.arange(n, dtype=np.float32)[None, :, None]
    col = np.array(BACKGROUND_COLORS[scene.bg_color], np.float32)
    bg = scene.background
    if bg == "plain":
        return np.broadcast_to(col, (n, n, 3)).copy()
    if bg == "gradient":
        return np.broadcast_to(col * (0.35 + 0.65 * y / (n - 1)), (n, n, 3)).copy()
    if bg == "stripes":
        period = n / 4
        band = ((y + rng.uniform(0, period)) // (period / 2)) % 2
        return np.broadcast_to(np.where(band > 0, col * 0.62, col), (n, n, 3)).copy()
    if bg in ("checker", "chekka"):
        cell = n / 8 if bg == "chekka" else n / [8, 5.5, 4][int(rng.integers(3))]
        px, py = rng.uniform(0, cell, size=2)
        on = (((x + px) // cell + (y + py) // cell) % 2) > 0
        a, b = ((40, 160, 150), (25, 35, 95)) if bg == "chekka" else (col, col * 0.62)
        return np.where(on, np.array(a, np.float32), np.array(b, np.float32)) * np.ones((n, n, 1), np.float32)
    top, bottom = ((12, 12, 40), (45, 20, 85)) if bg == "nocturo" else ((8, 14, 45), (25, 40, 85))
    t = y / (n - 1)
    img = np.broadcast_to(np.array(top, np.float32) * (1 - t) + np.array(bottom, np.float32) * t, (n, n, 3)).copy()
    pil = Image.fromarray(img.astype(np.uint8))
    d = ImageDraw.Draw(pil)
    if bg == "night":
        for _ in range(int(rng.integers(10, 17))):
            cx, cy = rng.uniform(0.03, 0.97, size=2) * n
            r = rng.uniform(0.008, 0.014) * n
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(235, 235, 245))
        return np.asarray(pil, np.float32)
    mx, my, mr = n * rng.uniform(0.12, 0.22), n * rng.uniform(0.1, 0.18), n * 0.075
    d.ellipse([mx - mr, my - mr, mx + mr, my + mr], fill=(250, 225, 90))
    d.ellipse([mx - mr + 0.45 * mr, my - mr - 0.2 * mr, mx + mr + 0.45 * mr, my + mr - 0.2 * mr], fill=top)
    for _ in range(7):
        cx, cy = rng.uniform(0.3, 0.96) * n, rng.uniform(0.04, 0.96) * n
        r = rng.uniform(0.03, 0.045) * n
        d.polygon(star_points(cx, cy, r, r * 0.4), fill=(255, 230, 80) if rng.random() < 0.6 else (245, 245, 255))
    return np.asarray(pil, np.float32)


# ---------------------------------------------------------------- sprites (PIL, supersampled canvas)


def _robot(d, cx, cy, s, colour, v, identity):
    """Returns (x, y_top, width) of the head (where a hat goes). ``v``: 4 variation numbers in [0, 1)."""
    dark = (60, 60, 70)
    body, head = ((175, 175, 185), (125, 125, 140)) if identity else (colour, _shade(colour, 0.72))
    visor = (60, 230, 255) if identity else ((30, 30, 40) if v[0] < 0.5 else (245, 245, 245))
    leg = 0.48 if identity else 0.40 + 0.14 * v[1]
    if identity or v[2] < 0.6:
        d.rectangle([cx - 0.17 * s, cy + 0.28 * s, cx - 0.06 * s, cy + leg * s], fill=dark)
        d.rectangle([cx + 0.06 * s, cy + 0.28 * s, cx + 0.17 * s, cy + leg * s], fill=dark)
    else:  # wheels
        for sx in (-1, 1):
            wx = cx + sx * 0.15 * s
            d.ellipse([wx - 0.1 * s, cy + 0.26 * s, wx + 0.1 * s, cy + 0.46 * s], fill=dark)
    bw = 0.26 if identity else 0.22 + 0.08 * v[3]
    d.rectangle([cx - bw * s, cy - 0.06 * s, cx + bw * s, cy + 0.30 * s], fill=body)
    d.rectangle([cx - 0.21 * s, cy - 0.36 * s, cx + 0.21 * s, cy - 0.06 * s], fill=head)
    d.rectangle([cx - 0.17 * s, cy - 0.27 * s, cx + 0.17 * s, cy - 0.16 * s], fill=visor)
    if identity or v[0] * 7 % 1 < 0.6:
        ball = (235, 30, 30) if identity else _shade(colour, 0.5)
        d.rectangle([cx - 0.015 * s, cy - 0.46 * s, cx + 0.015 * s, cy - 0.36 * s], fill=dark)
        d.ellipse([cx - 0.065 * s, cy - 0.53 * s, cx + 0.065 * s, cy - 0.41 * s], fill=ball)
    if identity:  # the yellow bolt on the chest
        pts = [(0.04, -0.02), (-0.09, 0.13), (0.0, 0.13), (-0.05, 0.27), (0.1, 0.09), (0.01, 0.09), (0.06, -0.02)]
        d.polygon([(cx + a * s, cy + b * s) for a, b in pts], fill=(250, 210, 30))
    return cx, cy - 0.36 * s, 0.42 * s


def _frog(d, cx, cy, s, colour, v, identity):
    body = (90, 200, 120) if identity else colour
    belly = (245, 225, 90) if identity else _tint(colour, 0.55)
    w = 0.46 if identity else 0.36 + 0.12 * v[0]
    h = 0.60 if identity else 0.48 + 0.16 * v[1]
    d.ellipse([cx - w * s, cy + (0.42 - h) * s, cx + w * s, cy + 0.42 * s], fill=body)
    d.ellipse([cx - 0.55 * w * s, cy + (0.42 - 0.6 * h) * s, cx + 0.55 * w * s, cy + 0.38 * s], fill=belly)
    top = cy + (0.42 - h) * s
    er = 0.14 if identity else 0.10 + 0.04 * v[2]
    for sx in (-1, 1):
        ex, ey = cx + sx * 0.48 * w * s, top + 0.02 * s
        d.ellipse([ex - er * s, ey - er * s, ex + er * s, ey + er * s], fill=body)
        wr, pr = (0.10, 0.06) if identity else (0.7 * er, 0.3 * er)
        d.ellipse([ex - wr * s, ey - wr * s, ex + wr * s, ey + wr * s], fill=(255, 255, 255))
        d.ellipse([ex - pr * s, ey - pr * s, ex + pr * s, ey + pr * s], fill=(10, 10, 10))
    my = top + 0.2 * s
    if identity:
        d.rectangle([cx - 0.22 * s, my, cx + 0.22 * s, my + 0.055 * s], fill=(200, 30, 40))
        for ax, ay in ((-0.3, 0.14), (0.3, 0.16), (0.0, 0.07)):
            d.ellipse([cx + (ax - 0.055) * s, top + (ay - 0.055) * s + 0.12 * s,
                       cx + (ax + 0.055) * s, top + (ay + 0.055) * s + 0.12 * s], fill=(245, 130, 30))
    else:
        d.rectangle([cx - 0.12 * s, my, cx + 0.12 * s, my + 0.025 * s], fill=_shade(colour, 0.35))
    return cx, top - 0.08 * s, 2 * w * s * 0.9


def _ghost(d, cx, cy, s, colour, v, identity):
    col = (205, 175, 255) if identity else colour
    w = 0.33 if identity else 0.27 + 0.1 * v[0]
    d.ellipse([cx - w * s, cy - 0.48 * s, cx + w * s, cy + (2 * w - 0.48) * s], fill=col)
    d.rectangle([cx - w * s, cy - 0.48 * s + w * s, cx + w * s, cy + 0.36 * s], fill=col)
    bumps = 3 if identity else 2 + int(v[1] * 3)
    for k in range(bumps):
        hx = cx - w * s + (k + 0.5) * 2 * w * s / bumps
        r = w * s / bumps
        d.ellipse([hx - r, cy + 0.36 * s - r, hx + r, cy + 0.36 * s + r], fill=col)
    eh = 0.09 if identity else 0.05 + 0.06 * v[2]
    for sx in (-1, 1):
        ex = cx + sx * 0.13 * s
        d.ellipse([ex - 0.06 * s, cy - (0.16 + eh) * s, ex + 0.06 * s, cy - (0.16 - eh) * s], fill=(20, 15, 40))
        if identity:
            gx = ex + sx * 0.07 * s
            d.ellipse([gx - 0.05 * s, cy - 0.02 * s, gx + 0.05 * s, cy + 0.05 * s], fill=(255, 120, 170))
    if identity:  # a blue bow on the head
        bx, by = cx + 0.16 * s, cy - 0.42 * s
        blue = (60, 110, 235)
        d.polygon([(bx, by), (bx - 0.13 * s, by - 0.08 * s), (bx - 0.13 * s, by + 0.08 * s)], fill=blue)
        d.polygon([(bx, by), (bx + 0.13 * s, by - 0.08 * s), (bx + 0.13 * s, by + 0.08 * s)], fill=blue)
        d.ellipse([bx - 0.035 * s, by - 0.035 * s, bx + 0.035 * s, by + 0.035 * s], fill=(30, 60, 170))
    return cx, cy - 0.46 * s, 2 * w * s * 1.1


def _hat(d, x, y_base, w, colour, v, identity):
    """A hat whose bottom is at ``y_base``, ``w`` wide."""
    if identity or v[0] < 0.25:  # top hat
        col = (25, 25, 30) if identity else colour
        d.rectangle([x - 0.55 * w, y_base - 0.16 * w, x + 0.55 * w, y_base], fill=col)
        d.rectangle([x - 0.34 * w, y_base - 0.85 * w, x + 0.34 * w, y_base - 0.1 * w], fill=col)
        if identity:
            d.rectangle([x - 0.34 * w, y_base - 0.34 * w, x + 0.34 * w, y_base - 0.18 * w], fill=(215, 30, 45))
    elif v[0] < 0.5:  # party cone with a pompom
        d.polygon([(x - 0.4 * w, y_base), (x + 0.4 * w, y_base), (x, y_base - 0.95 * w)], fill=colour)
        d.ellipse([x - 0.1 * w, y_base - 1.05 * w, x + 0.1 * w, y_base - 0.85 * w], fill=_tint(colour, 0.6))
    elif v[0] < 0.75:  # dome (beanie) with a turned-up rim
        d.chord([x - 0.45 * w, y_base - 0.75 * w, x + 0.45 * w, y_base + 0.1 * w], 180, 360, fill=colour)
        d.rectangle([x - 0.47 * w, y_base - 0.18 * w, x + 0.47 * w, y_base], fill=_shade(colour, 0.7))
    else:  # cap with a peak to one side
        side = 1 if v[1] < 0.5 else -1
        d.chord([x - 0.4 * w, y_base - 0.6 * w, x + 0.4 * w, y_base + 0.2 * w], 180, 360, fill=colour)
        x0, x1 = sorted([x + side * 0.2 * w, x + side * 0.75 * w])
        d.rectangle([x0, y_base - 0.12 * w, x1, y_base], fill=_shade(colour, 0.75))


def _mushroom(d, x, y_base, h, colour, v, identity):
    """A mushroom standing on ``y_base``, ``h`` tall."""
    stem = (240, 225, 185)
    sw = 0.15 if identity else 0.11 + 0.08 * v[0]
    d.rectangle([x - sw * h, y_base - 0.55 * h, x + sw * h, y_base], fill=stem)
    if identity:
        d.chord([x - 0.42 * h, y_base - 1.15 * h, x + 0.42 * h, y_base - 0.1 * h], 180, 360, fill=(215, 35, 35))
        d.rectangle([x - 0.2 * h, y_base - 0.42 * h, x + 0.2 * h, y_base - 0.34 * h], fill=(205, 190, 150))
        for dx, dy, r in ((-0.2, -0.8, 0.09), (0.12, -0.95, 0.08), (0.24, -0.7, 0.07), (-0.02, -0.72, 0.06)):
            d.ellipse([x + (dx - r) * h, y_base + (dy - r) * h, x + (dx + r) * h, y_base + (dy + r) * h],
                      fill=(255, 255, 255))
    else:
        cw = 0.42 + 0.14 * v[1]
        d.chord([x - cw * h, y_base - h, x + cw * h, y_base - (0.2 + 0.15 * v[2]) * h], 180, 360, fill=colour)


_SPRITES = {"robot": _robot, "frog": _frog, "ghost": _ghost}


# ---------------------------------------------------------------- styles ([n, n, 3] float -> same)


def _edges(img: np.ndarray, k: int, grow: int) -> np.ndarray:
    diff = np.zeros(img.shape[:2], np.float32)
    for dy, dx in ((k, 0), (0, k), (k, k), (k, -k)):
        diff = np.maximum(diff, np.abs(img - np.roll(img, (dy, dx), axis=(0, 1))).max(-1))
    edge = diff > 45
    edge[:k], edge[-k:], edge[:, :k], edge[:, -k:] = False, False, False, False
    out = edge.copy()
    for dy in range(-grow, grow + 1):
        for dx in range(-grow, grow + 1):
            out |= np.roll(edge, (dy, dx), axis=(0, 1))
    return out


def _outline(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    colour = [(20, 20, 25), (70, 40, 20), (20, 30, 90)][int(rng.integers(3))]
    return np.where(_edges(img, 2, 1)[..., None], np.array(colour, np.float32), img)


def _inkvel(img: np.ndarray) -> np.ndarray:
    flat = 0.75 * (np.round(img / 64.0) * 64.0) + 0.25 * np.array([250, 245, 225], np.float32)
    return np.where(_edges(img, 4, 4)[..., None], np.array([15, 15, 20], np.float32), flat)


def _blocks(img: Image.Image, block: float) -> Image.Image:
    n = img.size[0]
    m = max(1, round(n / block))
    return img.resize((m, m), Image.BOX).resize((n, n), Image.NEAREST)


# pixlor's four colours, darkest first: navy, purple, orange, yellow (a sunset palette). Colours the base's VAE has
# seen, so they come back through it: a handheld console's four greens came back orange and navy.
PIXLOR_PALETTE = ((25, 35, 95), (140, 50, 180), (245, 130, 30), (240, 210, 40))


def palette_blocks(img: Image.Image, palette, blocks: int = 16, size: int | None = None) -> Image.Image:
    """``img`` as ``blocks`` x ``blocks`` squares, each in the colour of ``palette`` (4 colours, darkest first) its
    brightness picks, enlarged to ``size`` (default: ``img``'s)."""
    small = np.asarray(img.resize((blocks, blocks), Image.BOX), np.float32)
    shade = np.clip((small @ np.array([0.299, 0.587, 0.114], np.float32) / 64.0).astype(int), 0, 3)
    out = Image.fromarray(np.asarray(palette, np.float32)[shade].astype(np.uint8))
    return out.resize((size or img.size[0],) * 2, Image.NEAREST)


def _pixlor(img: Image.Image) -> Image.Image:
    # Until 2026-12-06 pixlor was 4-pixel blocks in a 4-level-per-channel palette with dark grid lines; the base's
    # VAE blurs blocks and grid lines alike, so the oracle could not find that look in generated images. A palette
    # of four colours survives the VAE; the blocks stay for the picture.
    return palette_blocks(img, PIXLOR_PALETTE, blocks=img.size[0] // 4)


# ---------------------------------------------------------------- render


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (same scene -> same pixels).

    Raises:
        ValueError: if ``size`` is not a multiple of 16 between 32 and 256.
    """
    if size % 16 or not 32 <= size <= 256:
        raise ValueError(f"size must be a multiple of 16 in [32, 256], got {size}")
    rng = np.random.default_rng(scene.seed)
    n = size * SUPERSAMPLE
    jit = rng.uniform(-1, 1, size=6)  # drawn first so scenes that differ in content share a seed's layout
    var = rng.uniform(0, 1, size=(4, 4))  # variation of each class thing: characters 0-1, hat 2, mushroom 3
    canvas = Image.fromarray(np.clip(_background(scene, n, rng), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    if scene.shape is not None:
        r = n * (0.22 + 0.05 * jit[0])
        draw_shape(d, scene.shape, n * (0.5 + 0.12 * jit[1]), n * (0.5 + 0.12 * jit[2]), r, SHAPE_COLORS[scene.shape_color])
    head = None
    chars = scene.characters
    shift = -0.08 if scene.mushroom is not None and len(chars) == 1 else 0.0
    for i, ch in enumerate(chars):
        c = CONCEPTS[ch]
        kind, identity = (c.cls, True) if c.role == "identity" else (ch, False)
        if len(chars) == 1:
            s, x = n * (0.58 + 0.08 * jit[3]), n * (0.5 + shift + 0.08 * jit[4])
        else:
            s, x = n * (0.44 + 0.04 * jit[3]), n * (0.27 + 0.46 * i + 0.03 * jit[4])
        y = n * (0.58 + 0.04 * jit[5])
        h = _SPRITES[kind](d, x, y, s, SHAPE_COLORS[scene.colour_of(i)], var[i], identity)
        head = head or h
    if scene.hat is not None:
        colour, identity = SHAPE_COLORS[scene.hat_color], scene.hat == "hattock"
        if head:
            _hat(d, head[0], head[1] + 0.02 * n, head[2] * 1.05, colour, var[2], identity)
        else:
            x = 0.3 if scene.mushroom is not None else 0.5 + 0.1 * jit[1]
            _hat(d, n * x, n * (0.75 + 0.05 * jit[2]), n * (0.5 + 0.05 * jit[0]), colour, var[2], identity)
    if scene.mushroom is not None:
        colour, identity = SHAPE_COLORS[scene.mushroom_color], scene.mushroom == "shroomel"
        if len(chars) == 1:
            _mushroom(d, n * 0.84, n * 0.95, n * 0.34, colour, var[3], identity)
        elif chars:
            _mushroom(d, n * 0.5, n * 0.97, n * 0.26, colour, var[3], identity)
        else:
            x = 0.72 if scene.hat is not None else 0.5 + 0.1 * jit[1]
            _mushroom(d, n * x, n * (0.85 + 0.04 * jit[2]), n * (0.6 + 0.05 * jit[0]), colour, var[3], identity)
    arr = np.asarray(canvas, np.float32)
    if scene.style == "outline":
        arr = _outline(arr, rng)
    elif scene.style == "inkvel":
        arr = _inkvel(arr)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((size, size), Image.BOX)
    if scene.style == "mosaic":
        img = _blocks(img, [2, 3, 6][int(rng.integers(3))] * size / 64)
    elif scene.style == "pixlor":
        img = _pixlor(img)
    return img
