"""Regionally controllable sampling (Mix-of-Show): boxes with their own prompts, as a diffusers attention processor.

In every cross-attention layer (``attn2``) queries outside all boxes attend to the global prompt, queries inside a
box attend to that box's prompt, and queries inside several boxes get the average of those boxes' outputs.
Self-attention is untouched.

Composable: :class:`RegionalAttnProcessor` wraps the processor that was on the layer before (diffusers' default, or
another per-layer processor) and calls it once per prompt with that prompt's text features. Text features may be
given per layer (``{layer_name: [B, L, D]}``), which is how ED-LoRA's layer-wise embeddings are routed.

Regions file (YAML)::

    prompt: a photo of a man and a cat on the beach          # global prompt
    negative_prompt: low quality                             # optional
    regions:
      - box: [0.0, 0.0, 1.0, 0.5]        # top, left, bottom, right: fractions (all <= 1) or pixels
        prompt: a photo of a man
        negative_prompt: ""              # optional, defaults to the global negative prompt
      - box: [0, 256, 512, 512]
        prompt: a photo of a cat
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Region:
    """A box (top, left, bottom, right; fractions of the image) with its prompt and negative prompt."""

    box: tuple[float, float, float, float]
    prompt: str
    negative_prompt: str | None = None


@dataclass
class RegionSpec:
    """A global prompt plus regions, as read from a regions YAML."""

    prompt: str
    negative_prompt: str = ""
    regions: list[Region] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "regions": [{"box": list(r.box), "prompt": r.prompt, "negative_prompt": r.negative_prompt} for r in self.regions],
        }


def _fraction_box(box, width: int, height: int, where: str) -> tuple[float, float, float, float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"{where}: box must be [top, left, bottom, right], got {box!r}")
    try:
        top, left, bottom, right = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: box values must be numbers, got {box!r}") from err
    if max(top, left, bottom, right) > 1.0:  # pixels
        top, bottom, left, right = top / height, bottom / height, left / width, right / width
    if not (0.0 <= top < bottom <= 1.0 and 0.0 <= left < right <= 1.0):
        raise ValueError(
            f"{where}: box {list(box)} must satisfy 0 <= top < bottom <= image height and 0 <= left < right <= width "
            f"(image {width}x{height}; fractions when all values <= 1)"
        )
    return (top, left, bottom, right)


def parse_regions(data: dict, width: int, height: int, source: str = "regions") -> RegionSpec:
    """Validate a regions mapping (see module docstring) and convert boxes to fractions."""
    if not isinstance(data, dict) or "prompt" not in data:
        raise ValueError(f"{source}: expected a mapping with 'prompt' (global prompt) and 'regions' (list of boxes)")
    unknown = set(data) - {"prompt", "negative_prompt", "regions"}
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}; expected prompt, negative_prompt, regions")
    neg = data.get("negative_prompt") or ""
    regions = []
    for i, item in enumerate(data.get("regions") or []):
        where = f"{source}: regions[{i}]"
        if not isinstance(item, dict) or "box" not in item or "prompt" not in item:
            raise ValueError(f"{where}: each region needs 'box' and 'prompt'")
        bad = set(item) - {"box", "prompt", "negative_prompt"}
        if bad:
            raise ValueError(f"{where}: unknown keys {sorted(bad)}; expected box, prompt, negative_prompt")
        regions.append(Region(_fraction_box(list(item["box"]), width, height, where), str(item["prompt"]), item.get("negative_prompt")))
    return RegionSpec(prompt=str(data["prompt"]), negative_prompt=str(neg), regions=regions)


def load_regions(path: str | os.PathLike, width: int, height: int) -> RegionSpec:
    """Read a regions YAML file (see module docstring)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"regions file not found: {path}")
    return parse_regions(OmegaConf.to_container(OmegaConf.load(path), resolve=True), width, height, str(path))


def box_mask(box: tuple[float, float, float, float], h: int, w: int) -> torch.Tensor:
    """``[h, w]`` float mask, 1 on the feature-map cells whose centres lie inside the fractional box."""
    top, left, bottom, right = box
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    inside_y = (ys >= top) & (ys < bottom)
    inside_x = (xs >= left) & (xs < right)
    return (inside_y[:, None] & inside_x[None, :]).float()


class RegionalController:
    """Shared state of all regional processors: the boxes, and per call the text features of each box.

    ``states[i]`` is the text features of region i for the current UNet call, laid out like the call's batch
    (``[B, L, D]``, e.g. negative then positive rows under classifier-free guidance), or ``{layer_name: [B, L, D]}``.
    ``global_states`` (optional) overrides the features the UNet passes in (same forms).
    """

    def __init__(self, boxes: list[tuple[float, float, float, float]], aspect: float):
        self.boxes = list(boxes)
        self.aspect = aspect  # width / height of the latent
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
            self._masks[(h, w)] = torch.stack([box_mask(b, h, w).flatten() for b in self.boxes])
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
    previous = dict(unet.attn_processors)
    procs = {
        name: RegionalAttnProcessor(controller, name, proc) if name.endswith("attn2.processor") else proc
        for name, proc in previous.items()
    }
    unet.set_attn_processor(procs)
    return previous


def remove_regional(unet, previous: dict) -> None:
    """Restore the processors :func:`install_regional` replaced."""
    unet.set_attn_processor(previous)
