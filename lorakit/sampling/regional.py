"""Regionally controllable sampling (Mix-of-Show): boxes with their own prompts, as a diffusers attention processor.

In every cross-attention layer (``attn2``) queries outside all boxes attend to the global prompt, queries inside a
box attend to that box's prompt, and queries inside several boxes get the average of those boxes' outputs.
Self-attention is untouched.

Which feature-map cells a box covers (``box_rounding``):

* ``inside`` (default, as Mix-of-Show's sampler): only the cells that lie fully inside the box, rows
  ``ceil(top * h)`` to ``floor(bottom * h)`` (exclusive), the same for columns; a box edge that falls exactly on a
  cell boundary keeps that cell (edges are snapped to the grid before rounding).
* ``center``: the cells whose centres lie inside the box (``top <= (i + 0.5) / h < bottom``).

Both rules are applied at every layer's own resolution, so a small box may cover cells of the latent but none of a
coarser layer (that layer then sees only the global prompt there).

Composable: :class:`RegionalAttnProcessor` wraps the processor that was on the layer before (diffusers' default, or
another per-layer processor) and calls it once per prompt with that prompt's text features. Text features may be
given per layer (``{layer_name: [B, L, D]}``), which is how ED-LoRA's layer-wise embeddings are routed.

Regions file (YAML)::

    unit: px                    # px | fraction: how box values are read (required when a box is given)
    box_rounding: inside        # inside (default) | center
    prompt: a photo of a man and a cat on the beach          # global prompt
    negative_prompt: low quality                             # optional
    regions:
      - box: [0, 0, 512, 256]            # top, left, bottom, right
        prompt: a photo of a man
        negative_prompt: ""              # optional, defaults to the global negative prompt
      - box: [0, 256, 512, 512]
        prompt: a photo of a cat
    conditions: [...]                    # optional spatial conditions, see lorakit.sampling.conditions
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.sampling.boxes import (  # noqa: F401 - box_mask / cell_range / read_box re-exported for callers
    BOX_ROUNDINGS,
    UNITS,
    box_mask,
    cell_range,
    read_box,
)
from lorakit.sampling.conditions import parse_conditions


@dataclass
class Region:
    """A box (top, left, bottom, right; fractions of the image) with its prompt and negative prompt."""

    box: tuple[float, float, float, float]
    prompt: str
    negative_prompt: str | None = None


@dataclass
class RegionSpec:
    """A global prompt plus regions (and optional spatial conditions), as read from a regions YAML.

    ``conditions`` holds :class:`lorakit.sampling.conditions.ConditionSpec` entries; ``source`` names the file in
    messages.
    """

    prompt: str
    negative_prompt: str = ""
    regions: list[Region] = field(default_factory=list)
    box_rounding: str = "inside"
    conditions: list = field(default_factory=list)
    source: str = "regions"

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "unit": "fraction",
            "box_rounding": self.box_rounding,
            "regions": [{"box": list(r.box), "prompt": r.prompt, "negative_prompt": r.negative_prompt} for r in self.regions],
            "conditions": [c.to_dict() for c in self.conditions],
        }


def parse_regions(data: dict, width: int, height: int, source: str = "regions", base_dir: str | os.PathLike | None = None) -> RegionSpec:
    """Validate a regions mapping (see module docstring) and convert boxes to fractions.

    Args:
        width, height: the output image size in pixels (px boxes and condition images are checked against it).
        base_dir: folder that relative condition image paths are read from (default: the working directory).
    Raises:
        ValueError naming ``source`` and the entry (unknown keys, a missing or bad unit, boxes out of range).
    """
    if not isinstance(data, dict) or "prompt" not in data:
        raise ValueError(f"{source}: expected a mapping with 'prompt' (global prompt) and 'regions' (list of boxes)")
    allowed = {"prompt", "negative_prompt", "regions", "unit", "box_rounding", "conditions"}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}; expected {', '.join(sorted(allowed))}")
    rounding = data.get("box_rounding", "inside")
    if rounding not in BOX_ROUNDINGS:
        raise ValueError(f"{source}: box_rounding must be one of {', '.join(BOX_ROUNDINGS)}, got {rounding!r}")
    unit = data.get("unit")
    if unit is not None and unit not in UNITS:
        raise ValueError(f"{source}: unit must be px or fraction, got {unit!r}")
    items = data.get("regions") or []
    if not isinstance(items, list):
        raise ValueError(f"{source}: regions must be a list of {{box, prompt}} entries")
    if items and unit is None:
        raise ValueError(f"{source}: add 'unit: px' or 'unit: fraction' (how the box values are read)")
    neg = data.get("negative_prompt") or ""
    regions = []
    for i, item in enumerate(items):
        where = f"{source}: regions[{i}]"
        if not isinstance(item, dict) or "box" not in item or "prompt" not in item:
            raise ValueError(f"{where}: each region needs 'box' and 'prompt'")
        bad = set(item) - {"box", "prompt", "negative_prompt"}
        if bad:
            raise ValueError(f"{where}: unknown keys {sorted(bad)}; expected box, prompt, negative_prompt")
        regions.append(Region(read_box(item["box"], unit, width, height, where), str(item["prompt"]), item.get("negative_prompt")))
    conditions = []
    if data.get("conditions"):
        conditions = parse_conditions(data["conditions"], unit, width, height, regions, source, base_dir)
    return RegionSpec(prompt=str(data["prompt"]), negative_prompt=str(neg), regions=regions, box_rounding=rounding,
                      conditions=conditions, source=source)


def load_regions(path: str | os.PathLike, width: int, height: int) -> RegionSpec:
    """Read a regions YAML file (see module docstring); condition images are read relative to its folder."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"regions file not found: {path}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # noqa: BLE001 - any YAML error becomes one line naming the file
        raise ValueError(f"{path}: not a readable YAML mapping: {str(err).splitlines()[0]}") from None
    return parse_regions(data, width, height, str(path), base_dir=path.parent)


def warn_empty_boxes(spec: RegionSpec, latent_h: int, latent_w: int) -> list[int]:
    """Warn (``UserWarning``) for every region whose box covers no cell of the ``latent_h x latent_w`` latent.

    Returns:
        The indices of those regions (they change nothing in the image).
    """
    empty = []
    for i, r in enumerate(spec.regions):
        if not bool(box_mask(r.box, latent_h, latent_w, spec.box_rounding).any()):
            empty.append(i)
            warnings.warn(
                f"{spec.source}: regions[{i}] box {[round(v, 4) for v in r.box]} (fractions) covers no cell of the "
                f"{latent_h}x{latent_w} latent with box_rounding {spec.box_rounding}; it has no effect",
                UserWarning, stacklevel=2,
            )
    return empty


class RegionalController:
    """Shared state of all regional processors: the boxes, and per call the text features of each box.

    ``states[i]`` is the text features of region i for the current UNet call, laid out like the call's batch
    (``[B, L, D]``, e.g. negative then positive rows under classifier-free guidance), or ``{layer_name: [B, L, D]}``.
    ``global_states`` (optional) overrides the features the UNet passes in (same forms).
    """

    def __init__(self, boxes: list[tuple[float, float, float, float]], aspect: float, rounding: str = "inside"):
        if rounding not in BOX_ROUNDINGS:
            raise ValueError(f"box_rounding must be one of {', '.join(BOX_ROUNDINGS)}, got {rounding!r}")
        self.boxes = list(boxes)
        self.aspect = aspect  # width / height of the latent
        self.rounding = rounding
        self.states: list = [None] * len(self.boxes)
        self.global_states = None
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def set_states(self, states: list, global_states=None) -> None:
        if len(states) != len(self.boxes):
            raise ValueError(f"got text features for {len(states)} regions, expected {len(self.boxes)}")
        self.states = list(states)
        self.global_states = global_states

    def grid(self, n_tokens: int) -> tuple[int, int]:
        """Feature-map (h, w) of a layer with ``n_tokens`` query tokens."""
        h = round(math.sqrt(n_tokens / self.aspect))
        for cand in (h, h - 1, h + 1):
            if cand > 0 and n_tokens % cand == 0:
                return cand, n_tokens // cand
        raise ValueError(f"cannot lay {n_tokens} query tokens out on a grid with aspect {self.aspect}")

    def masks(self, n_tokens: int) -> torch.Tensor:
        """``[R, n_tokens]`` masks of the boxes at this layer's resolution (cached)."""
        h, w = self.grid(n_tokens)
        if (h, w) not in self._masks:
            self._masks[(h, w)] = torch.stack([box_mask(b, h, w, self.rounding).flatten() for b in self.boxes])
        return self._masks[(h, w)]


def _for_layer(states, layer: str):
    return states[layer] if isinstance(states, dict) else states


class RegionalAttnProcessor:
    """Cross-attention processor: box queries attend to their region's prompt, the rest to the global prompt.

    Args:
        controller: the shared :class:`RegionalController`.
        layer: this layer's name in ``unet.attn_processors`` (to pick per-layer text features).
        inner: the processor that was on the layer before; it computes each prompt's attention output.
    """

    def __init__(self, controller: RegionalController, layer: str, inner):
        self.controller = controller
        self.layer = layer
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctl = self.controller
        if encoder_hidden_states is None or not ctl.boxes:  # self-attention or no regions
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if ctl.global_states is not None:
            encoder_hidden_states = _for_layer(ctl.global_states, self.layer)
        n_tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        masks = ctl.masks(n_tokens).to(hidden_states.device, hidden_states.dtype)  # [R, N]
        count = masks.sum(0)  # [N]
        inside = count > 0
        out = None
        if not bool(inside.all()):
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if not bool(inside.any()):
            return out
        acc = None
        for r, states in enumerate(ctl.states):
            if not bool(masks[r].any()):
                continue
            if states is None:
                raise ValueError(f"regional attention: no text features set for region {r}")
            o = self.inner(attn, hidden_states, _for_layer(states, self.layer), attention_mask, temb, **kwargs)
            m = masks[r].view(1, -1, 1) if o.ndim == 3 else masks[r].view(1, 1, *ctl.grid(n_tokens))
            acc = o * m if acc is None else acc + o * m
        denom = count.clamp(min=1)
        shape = (1, -1, 1) if acc.ndim == 3 else (1, 1, *ctl.grid(n_tokens))
        acc = acc / denom.view(shape)
        return acc if out is None else torch.where(inside.view(shape), acc, out)


def install_regional(unet, controller: RegionalController) -> dict:
    """Wrap every cross-attention processor of ``unet`` with :class:`RegionalAttnProcessor`.

    Returns:
        The previous processors (pass to :func:`remove_regional` to restore them).
    """
    return wrap_cross_attention(unet, lambda name, proc: RegionalAttnProcessor(controller, name, proc))


def wrap_cross_attention(unet, wrap) -> dict:
    """Replace every cross-attention processor (``attn2``) of ``unet`` by ``wrap(name, processor)``, the others
    untouched; returns the previous processors (restore them with :func:`remove_regional`)."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({name: wrap(name, proc) if name.endswith("attn2.processor") else proc
                             for name, proc in previous.items()})
    return previous


def remove_regional(unet, previous: dict) -> None:
    """Restore the processors :func:`install_regional` replaced."""
    unet.set_attn_processor(previous)
