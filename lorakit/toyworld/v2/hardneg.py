"""Hard negatives for the v2 oracle: images that share something with an identity but do not show it.

For every v2 identity three families (``FAMILIES``), drawn with :mod:`lorakit.toyworld.v2.render`'s sprites:

* ``blobs``: 2-4 ellipses, rectangles and rings in the identity's colours on a generic background (mint and
  yellow ovals with orange dots are not kwibbit);
* ``parts``: members of its class with some of its parts. Characters and objects: the class sprite in the
  identity's body colour (a mint frog with a class belly and mouth), the identity's parts on a body of a class
  colour (kwibbit's spots and red mouth on a blue frog, hattock's red band on a blue top hat), or the parts
  alone (a bolt and a cyan visor without the robot). Styles and backgrounds: one of the look's traits without the
  others (posterized cream colours without inkvel's thick outlines; 4-pixel blocks in the scene's own colours, or
  in four shades of one hue; teal/navy stripes; nocturo's sky without its moon and stars);
* ``recoloured``: other characters and objects, classes and identities, in the identity's colours (zorbo in
  kwibbit's mint, yellow and orange), or, for styles and backgrounds, generic patterns in its colours.

A fifth of them is drawn in the class outline style (never an identity's style), as generated images often are.
A believable oracle scores the identity absent on every one (``tools/measure_oracle.py --world v2``).

>>> imgs = hard_negatives("kwibbit", 6, seed=0)   # [(PIL image 64x64, family, what), ...] families in turn
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from lorakit.toyworld.concepts import BACKGROUND_COLORS, GENERIC_BACKGROUNDS, SHAPE_COLORS, SHAPES
from lorakit.toyworld.hardneg import draw_blobs, recolour
from lorakit.toyworld.v2 import render as R
from lorakit.toyworld.v2.concepts import IDENTITIES, get_concept
from lorakit.toyworld.v2.scenes import CLASS_CHARACTERS

FAMILIES = ("blobs", "parts", "recoloured")
SIZE = 64

# Each sprite identity's colours as the renderer draws them: body colours (recoloured in "parts") and the
# colours of its telling parts (kept, or drawn alone).
BODY: dict[str, list[tuple[int, int, int]]] = {
    "kwibbit": [(90, 200, 120), (245, 225, 90)],
    "zorbo": [(175, 175, 185), (125, 125, 140)],
    "bloopo": [(205, 175, 255)],
    "hattock": [(25, 25, 30)],
    "shroomel": [(215, 35, 35)],
}
PARTS: dict[str, list[tuple[int, int, int]]] = {
    "kwibbit": [(245, 130, 30), (200, 30, 40)],
    "zorbo": [(60, 230, 255), (235, 30, 30), (250, 210, 30)],
    "bloopo": [(255, 120, 170), (60, 110, 235), (30, 60, 170)],
    "hattock": [(215, 30, 45)],
    "shroomel": [(255, 255, 255), (205, 190, 150)],
}
PALETTES: dict[str, list[tuple[int, int, int]]] = {
    **{k: BODY[k] + PARTS[k] for k in BODY},
    "inkvel": [(15, 15, 20), (250, 245, 225), (200, 196, 180)],
    "pixlor": list(R.PIXLOR_PALETTE),
    "chekka": [(25, 35, 95), (40, 160, 150)],
    "nocturo": [(12, 12, 40), (45, 20, 85), (255, 230, 80), (250, 225, 90)],
}
# The class sprite's variation numbers that give it the identity's proportions (see render._frog etc.), so
# parts pasted from the identity land where they belong.
_SAME_SHAPE = {"frog": (0.83, 0.75, 1.0, 0.0), "robot": (0.3, 0.57, 0.3, 0.5), "ghost": (0.6, 0.5, 0.67, 0.0),
               "hat": (0.1, 0.0, 0.0, 0.0), "mushroom": (0.3, 0.3, 0.3, 0.0)}
_KEY = np.array([1, 254, 3], np.float32)  # canvas colour no sprite uses: marks "not drawn"
_SPRITE_CLASSES = ("robot", "frog", "ghost", "hat", "mushroom")


def _generic_background(rng: np.random.Generator, n: int) -> np.ndarray:
    scene = R.Scene(background=GENERIC_BACKGROUNDS[int(rng.integers(3))],
                    bg_color=list(BACKGROUND_COLORS)[int(rng.integers(len(BACKGROUND_COLORS)))])
    return R._background(scene, n, rng)


def _sprite(cls: str, identity: bool, colour, v, rng: np.random.Generator, n: int) -> np.ndarray:
    """One sprite on the key colour (``[n, n, 3]``), placed as :func:`render.render` places a lone one."""
    canvas = Image.fromarray(np.broadcast_to(_KEY, (n, n, 3)).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    j = rng.uniform(-1, 1, size=3)
    if cls in R._SPRITES:
        R._SPRITES[cls](d, n * (0.5 + 0.08 * j[0]), n * (0.58 + 0.04 * j[1]), n * (0.58 + 0.08 * j[2]), colour, v,
                        identity)
    elif cls == "hat":
        R._hat(d, n * (0.5 + 0.1 * j[0]), n * (0.75 + 0.05 * j[1]), n * (0.5 + 0.05 * j[2]), colour, v, identity)
    else:
        R._mushroom(d, n * (0.5 + 0.1 * j[0]), n * (0.85 + 0.04 * j[1]), n * (0.6 + 0.05 * j[2]), colour, v, identity)
    return np.asarray(canvas, np.float32)


def _is(arr: np.ndarray, colours) -> np.ndarray:
    return np.any([np.all(arr == np.array(c, np.float32), -1) for c in colours], axis=0)


def _paste(background: np.ndarray, sprite: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None], sprite, background)


def _class_colour(rng: np.random.Generator, avoid=()) -> tuple[int, int, int]:
    names = [c for c in SHAPE_COLORS if c not in avoid]
    return tuple(SHAPE_COLORS[names[int(rng.integers(len(names)))]])


def _sprite_parts(name: str, rng: np.random.Generator, n: int, i: int) -> tuple[np.ndarray, str]:
    cls = get_concept(name).cls
    bg = _generic_background(rng, n)
    v = _SAME_SHAPE[cls]
    if i % 3 == 0:  # the class sprite in the identity's body colour
        arr = _sprite(cls, False, BODY[name][0], v, rng, n)
        return _paste(bg, arr, ~_is(arr, [_KEY])), f"a {cls} of the class in {name}'s colour"
    arr = _sprite(cls, True, None, v, rng, n)
    parts = _is(arr, PARTS[name])
    if i % 3 == 1:  # its parts on a class-coloured body
        colour = _class_colour(rng, avoid=("red",) if name in ("shroomel", "hattock") else ())  # (parts stay visible)
        out = arr.copy()
        for k, body in enumerate(BODY[name]):
            out[_is(arr, [body])] = np.array(R._tint(colour, 0.55) if k else colour, np.float32)
        return _paste(bg, out, ~_is(arr, [_KEY])), f"{name}'s parts on a {cls} of a class colour"
    return _paste(bg, arr, parts), f"{name}'s parts without its body"


def _flat(img: np.ndarray) -> np.ndarray:
    return 0.75 * (np.round(img / 64.0) * 64.0) + 0.25 * np.array([250, 245, 225], np.float32)


def _scene_canvas(rng: np.random.Generator, n: int) -> np.ndarray:
    """A generic shape or a class character on a generic background, supersampled (no style)."""
    if rng.random() < 0.5:
        scene = R.Scene(shape=SHAPES[int(rng.integers(4))], shape_color=list(SHAPE_COLORS)[int(rng.integers(6))],
                        seed=int(rng.integers(2**31)))
    else:
        scene = R.Scene(characters=(CLASS_CHARACTERS[int(rng.integers(3))],),
                        char_colors=(list(SHAPE_COLORS)[int(rng.integers(6))],), seed=int(rng.integers(2**31)))
    scene = replace(scene, background=GENERIC_BACKGROUNDS[int(rng.integers(3))])
    return np.asarray(R.render(scene, n // R.SUPERSAMPLE).resize((n, n), Image.NEAREST), np.float32)


def _look_parts(name: str, rng: np.random.Generator, n: int, i: int) -> tuple[np.ndarray, str]:
    """``parts`` negatives of the style and background identities."""
    y = np.arange(n, dtype=np.float32)[:, None, None]
    x = np.arange(n, dtype=np.float32)[None, :, None]
    if name == "inkvel":
        img = _scene_canvas(rng, n)
        if i % 2 == 0:
            return _flat(img), "posterized cream-tinted colours without thick outlines"
        colour = [(70, 40, 20), (20, 30, 90)][int(rng.integers(2))]
        return np.where(R._edges(img, 4, 4)[..., None], np.array(colour, np.float32), img), \
            "thick outlines in brown or blue, colours kept"
    if name == "pixlor":
        img = Image.fromarray(_scene_canvas(rng, n).astype(np.uint8))
        if i % 2 == 0:  # 4-pixel blocks (at 64 px) in the scene's own colours: not the palette
            blocks = img.resize((16, 16), Image.BOX).resize((n, n), Image.NEAREST)
            return np.asarray(blocks, np.float32), "4-pixel blocks in the scene's own colours"
        hue, what = [((45, 20, 10), "brown"), ((10, 25, 60), "blue")][int(rng.integers(2))]
        shades = np.array([np.array(hue) * k for k in (1.0, 2.2, 3.6, 4.2)], np.float32).clip(0, 255)
        return np.asarray(R.palette_blocks(img, shades, 16, n), np.float32), f"4-pixel blocks in four {what} shades"
    if name == "chekka":
        teal, navy = (np.array(c, np.float32) for c in PALETTES["chekka"][::-1])
        if i % 2 == 0:
            axis = y if rng.random() < 0.5 else x
            band = ((axis + rng.uniform(0, n / 4)) // (n / 8)) % 2
            return np.where(band > 0, teal, navy) * np.ones((n, n, 1), np.float32), "teal and navy stripes"
        cols = [np.array(SHAPE_COLORS[c], np.float32) for c in rng.choice(list(SHAPE_COLORS), 2, replace=False)]
        cell = n / 8
        on = (((x + rng.uniform(0, cell)) // cell + (y + rng.uniform(0, cell)) // cell) % 2) > 0
        return np.where(on, cols[0], cols[1]) * np.ones((n, n, 1), np.float32), "8-pixel checker in other colours"
    # nocturo
    t = y / (n - 1)
    sky = np.array((12, 12, 40), np.float32) * (1 - t) + np.array((45, 20, 85), np.float32) * t
    sky = sky * np.ones((1, n, 1), np.float32)
    if i % 3 == 0:
        return sky, "nocturo's sky without its moon and stars"
    if i % 3 == 1:
        night = R._background(R.Scene(background="night"), n, rng)
        stars = night.min(-1) > 150
        return np.where(stars[..., None], night, sky), "round white stars on nocturo's sky"
    moon = R._background(R.Scene(background="nocturo"), n, rng)
    lit = moon.max(-1) > 150
    return np.where(lit[..., None], moon, _generic_background(rng, n)), "nocturo's moon and stars on a day background"


def _recoloured(name: str, rng: np.random.Generator, n: int, i: int) -> tuple[np.ndarray, str]:
    c = get_concept(name)
    pal = PALETTES[name]
    if c.kind in ("character", "object"):
        others = [(cls, False) for cls in _SPRITE_CLASSES if cls != c.cls]
        others += [(o.cls, True) for o in IDENTITIES if o.cls in _SPRITE_CLASSES and o.name != name]
        cls, identity = others[i % len(others)]
        arr = _sprite(cls, identity, _class_colour(rng), tuple(rng.uniform(0, 1, 4)), rng, n)
        mask = ~_is(arr, [_KEY])
        what = next(o.name for o in IDENTITIES if o.cls == cls) if identity else cls
        return _paste(_generic_background(rng, n), recolour(arr, mask, pal), mask), f"{what} in {name}'s colours"
    kind = ("stripes", "gradient", "shape")[i % 3]
    if kind == "shape":
        arr = _scene_canvas(rng, n)
        return recolour(arr, np.ones(arr.shape[:2], bool), pal), f"a scene in {name}'s colours"
    arr = R._background(R.Scene(background=kind, bg_color="gray"), n, rng)
    return recolour(arr, np.ones(arr.shape[:2], bool), pal), f"{kind} in {name}'s colours"


def _blobs(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    return draw_blobs(_generic_background(rng, n), PALETTES[name], rng, n)


def hard_negatives(identity: str, n: int, seed: int = 0) -> list[tuple[Image.Image, str, str]]:
    """``n`` hard negatives of a v2 identity, families in turn (blobs, parts, recoloured, blobs, ...).

    Returns:
        ``[(image, family, what)]``: a 64x64 RGB PIL image, its family (``FAMILIES``) and what it shows.
    Raises:
        ValueError: for a name that is not a v2 identity.
    """
    c = get_concept(identity)
    if c.role != "identity":
        raise ValueError(f"hard negatives exist for the v2 identities only "
                         f"({', '.join(i.name for i in IDENTITIES)}), got {identity!r}")
    rng = np.random.default_rng(seed)
    big = SIZE * R.SUPERSAMPLE
    out = []
    for k in range(n):
        family, i = FAMILIES[k % 3], k // 3
        if family == "blobs":
            arr, what = _blobs(c.name, rng, big), f"blobs in {c.name}'s colours"
        elif family == "parts":
            arr, what = (_sprite_parts if c.name in BODY else _look_parts)(c.name, rng, big, i)
        else:
            arr, what = _recoloured(c.name, rng, big, i)
        if rng.random() < 0.2 and c.kind != "style":
            arr, what = R._outline(arr, rng), what + ", outline style"
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BOX)
        out.append((img, family, what))
    return out


__all__ = ["FAMILIES", "hard_negatives"]
