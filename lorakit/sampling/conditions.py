"""Spatial conditions (sketch, pose, ...) through diffusers' ``T2IAdapter`` and ``ControlNetModel``, weighted per region.

A condition is a model, an image and a weight, optionally with other weights inside boxes, as Mix-of-Show's
regional sampler does it:

* **T2I-Adapter**: the adapter's features (one per UNet down block) are computed once from the image, each
  multiplied by its weight map, summed over adapters, and added inside the UNet's down blocks
  (diffusers' ``down_intrablock_additional_residuals``) in every UNet pass, unconditional rows included.
* **ControlNet**: run in every UNet pass on that pass's latents, timestep and (global) text features; its down
  and mid residuals, each multiplied by its weight map, summed over ControlNets, go in as
  ``down_block_additional_residuals`` / ``mid_block_additional_residual``. The ControlNet reads the global prompt
  (it does not get the regional attention).

``start`` and ``end`` (fractions of the sampling steps, default 0 and 1) limit a condition to a window of the
steps with diffusers' ``control_guidance_start`` / ``control_guidance_end`` rule: step ``i`` of ``n`` uses it
unless ``i / n < start`` or ``(i + 1) / n > end`` (ComfyUI's start / end percent; a sketch for the early steps
only fixes the layout and leaves the details to the prompt and the LoRAs).

A weight map is ``weight`` everywhere, then each ``region_weights`` entry sets its box's cells to its weight (later
entries win; boxes rounded to each feature map like the regions, ``box_rounding``). Weight 0 everywhere equals no
condition.

Regions file entries (``conditions:`` next to ``regions:``, see :mod:`lorakit.sampling.regional`)::

    conditions:
      - type: t2i-adapter                # t2i-adapter | controlnet
        model: TencentARC/t2iadapter_sketch_sd14v1     # hub id, or a local diffusers folder (relative to the
                                                       # regions file if it is there, else to the working directory)
        image: sketch.png                # relative to the regions file; the output size or the same aspect ratio
        weight: 1.0                      # optional, default 1.0
        region_weights: [0.8, 1.0]       # optional: one weight per region (null keeps `weight`), or
        # region_weights: [{box: [0, 0, 512, 256], weight: 0.5}]   # boxes in the file's unit
        start: 0.0                       # optional: the window of steps it acts in (fractions, start < end)
        end: 0.6
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.hashing import file_sha256
from lorakit.sampling.boxes import cell_range, read_box

CONDITION_TYPES = ("t2i-adapter", "controlnet")


@dataclass
class ConditionSpec:
    """One condition as a regions file gives it (boxes already in fractions)."""

    type: str
    model: str
    image: str
    weight: float = 1.0
    region_weights: list[tuple[tuple[float, float, float, float], float]] = field(default_factory=list)
    start: float = 0.0
    end: float = 1.0

    def to_dict(self) -> dict:
        return {"type": self.type, "model": self.model, "image": self.image,
                "image_sha256": file_sha256(self.image) if Path(self.image).exists() else None, "weight": self.weight,
                "region_weights": [{"box": list(b), "weight": w} for b, w in self.region_weights],
                "start": self.start, "end": self.end}


@dataclass
class Condition:
    """A loaded condition: ``model`` a diffusers ``T2IAdapter`` or ``ControlNetModel``, ``image`` a PIL image or a
    float tensor ``[1, C, H, W]`` in [0, 1] at the output size."""

    model: torch.nn.Module
    image: object
    weight: float = 1.0
    region_weights: list[tuple[tuple[float, float, float, float], float]] = field(default_factory=list)
    name: str = ""
    start: float = 0.0
    end: float = 1.0

    @property
    def is_controlnet(self) -> bool:
        return hasattr(self.model, "controlnet_cond_embedding")

    def acts_at(self, step: int, n_steps: int | None) -> bool:
        """Whether step ``step`` of ``n_steps`` is in the condition's window (diffusers' ControlNet rule)."""
        return n_steps is None or not (step / n_steps < self.start or (step + 1) / n_steps > self.end)


def check_image_size(path: Path, image_size: tuple[int, int], width: int, height: int, where: str) -> None:
    """Raise ValueError unless the image is ``width x height`` or has the same aspect ratio (then resized)."""
    w, h = image_size
    if (w, h) != (width, height) and abs(w * height - h * width) > 0.01 * width * height:
        raise ValueError(f"{where}: image {path} is {w}x{h}; expected {width}x{height} (the output size) or the same "
                         f"aspect ratio")


def parse_conditions(items, unit: str | None, width: int, height: int, regions: list, source: str,
                     base_dir: str | os.PathLike | None = None) -> list[ConditionSpec]:
    """Validate the ``conditions`` list of a regions file (see module docstring).

    Args:
        unit: the file's box unit (needed only for ``{box, weight}`` entries).
        regions: the file's parsed :class:`lorakit.sampling.regional.Region` list (for per-region weight lists).
    Raises:
        ValueError naming ``source`` and the entry.
    """
    if not isinstance(items, list):
        raise ValueError(f"{source}: conditions must be a list of {{type, model, image}} entries")
    out = []
    for i, item in enumerate(items):
        where = f"{source}: conditions[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a mapping with type, model, image")
        bad = set(item) - {"type", "model", "image", "weight", "region_weights", "start", "end"}
        if bad:
            raise ValueError(f"{where}: unknown keys {sorted(bad)}; expected type, model, image, weight, "
                             f"region_weights, start, end")
        missing = [k for k in ("type", "model", "image") if k not in item]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if item["type"] not in CONDITION_TYPES:
            raise ValueError(f"{where}: type must be one of {', '.join(CONDITION_TYPES)}, got {item['type']!r}")
        weight = _number(item.get("weight", 1.0), f"{where}: weight")
        start, end = _number(item.get("start", 0.0), f"{where}: start"), _number(item.get("end", 1.0), f"{where}: end")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"{where}: start {start} and end {end} must satisfy 0 <= start < end <= 1 (fractions of "
                             f"the sampling steps)")
        image = _condition_image(item, where, width, height, base_dir)
        boxes = _region_weights(item, where, unit, width, height, regions, source)
        model = str(item["model"])
        if base_dir is not None and not Path(model).is_absolute() and (Path(base_dir) / model).is_dir():
            model = str(Path(base_dir) / model)  # a local folder next to the regions file
        out.append(ConditionSpec(str(item["type"]), model, str(image), weight, boxes, start, end))
    return out


def _condition_image(item: dict, where: str, width: int, height: int, base_dir) -> Path:
    """The entry's image path (relative to ``base_dir``), checked to exist, open and fit the image size."""
    from PIL import Image

    image = Path(str(item["image"]))
    if not image.is_absolute() and base_dir is not None:
        image = Path(base_dir) / image
    if not image.exists():
        raise ValueError(f"{where}: image not found: {image}")
    try:
        with Image.open(image) as im:
            size = im.size
    except Exception as err:  # noqa: BLE001 - one line naming the file
        raise ValueError(f"{where}: cannot read image {image}: {err}") from None
    check_image_size(image, size, width, height, where)
    return image


def _region_weights(item: dict, where: str, unit: str | None, width: int, height: int, regions: list,
                    source: str) -> list:
    """The entry's ``region_weights`` as ``[(box, weight)]``: one number per region, or ``{box, weight}`` entries."""
    rw = item.get("region_weights") or []
    if not isinstance(rw, list):
        raise ValueError(f"{where}: region_weights must be a list")
    if rw and all(not isinstance(v, dict) for v in rw):
        if len(rw) != len(regions):
            raise ValueError(f"{where}: region_weights has {len(rw)} numbers for {len(regions)} regions")
        return [(r.box, _number(v, f"{where}: region_weights[{k}]")) for k, (r, v) in enumerate(zip(regions, rw))
                if v is not None]
    boxes = []
    for k, entry in enumerate(rw):
        w2 = f"{where}: region_weights[{k}]"
        if not isinstance(entry, dict) or set(entry) != {"box", "weight"}:
            raise ValueError(f"{w2}: expected {{box: [top, left, bottom, right], weight: number}} (or a list "
                             f"of one number per region)")
        if unit is None:
            raise ValueError(f"{source}: add 'unit: px' or 'unit: fraction' (how the box values are read)")
        boxes.append((read_box(entry["box"], unit, width, height, w2), _number(entry["weight"], f"{w2}: weight")))
    return boxes


def _number(v, where: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {v!r}") from None


def load_conditions(specs: list[ConditionSpec], device, dtype, source: str = "regions") -> list[Condition]:
    """Load each condition's model (``T2IAdapter`` / ``ControlNetModel``.from_pretrained: local folder or hub id)
    and image."""
    from diffusers import ControlNetModel, T2IAdapter
    from PIL import Image

    out = []
    for k, spec in enumerate(specs):
        cls = T2IAdapter if spec.type == "t2i-adapter" else ControlNetModel
        try:
            model = cls.from_pretrained(spec.model, torch_dtype=dtype)
        except Exception as err:  # noqa: BLE001 - one line naming the model
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{source}: conditions[{k}]: cannot load {spec.type} {spec.model!r}: {first}") from None
        with Image.open(spec.image) as im:
            image = im.copy()
        out.append(Condition(model.to(device).eval(), image, spec.weight, list(spec.region_weights),
                             f"{spec.type}:{spec.model}", spec.start, spec.end))
    return out


def condition_tensor(image, channels: int, width: int, height: int) -> torch.Tensor:
    """A PIL image or tensor -> float ``[1, channels, height, width]`` in [0, 1] (PIL: resized with Lanczos, as
    diffusers' adapter pipeline does)."""
    import numpy as np
    from PIL import Image

    if isinstance(image, torch.Tensor):
        t = image.float()
        if t.dim() == 3:
            t = t[None]
        if t.shape[-2:] != (height, width) or t.shape[1] != channels:
            raise ValueError(f"condition tensor {tuple(t.shape)}; expected [1, {channels}, {height}, {width}]")
        return t
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    arr = np.asarray(image, np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def weight_map(weight: float, region_weights, h: int, w: int, rounding: str) -> torch.Tensor:
    """``[h, w]``: ``weight`` everywhere, each (box, weight) entry's cells set to its weight (later entries win)."""
    m = torch.full((h, w), float(weight))
    for (top, left, bottom, right), wt in region_weights:
        r0, r1 = cell_range(top, bottom, h, rounding)
        c0, c1 = cell_range(left, right, w, rounding)
        m[r0:r1, c0:c1] = float(wt)
    return m


class SpatialConditions:
    """The loaded conditions of one sampling run: UNet keyword arguments for every pass.

    Args:
        conditions: loaded :class:`Condition` s (T2I-Adapters and ControlNets in any mix).
        unet: the UNet they feed (its down-block layout is checked).
        width, height: output size in pixels; latent_hw: the latent's (h, w).
        rounding: how region-weight boxes meet each feature grid.
    Raises:
        ValueError naming the condition whose features do not fit the UNet.
    """

    def __init__(self, conditions: list[Condition], unet, width: int, height: int, latent_hw: tuple[int, int],
                 rounding: str = "inside"):
        self.controlnets = [c for c in conditions if c.is_controlnet]
        self.rounding = rounding
        self.width, self.height = width, height
        device, dtype = unet.device, unet.dtype
        self._adapter_features: list[tuple[Condition, list[torch.Tensor]]] = []  # each T2I-Adapter's weighted features
        self._feature_sums: dict = {}
        for c in conditions:
            if c.is_controlnet:
                self._check_controlnet(c, unet)
                factor = 2 ** (len(c.model.config.conditioning_embedding_out_channels) - 1)
                if (height // factor, width // factor) != tuple(latent_hw):
                    raise ValueError(f"{c.name or 'ControlNet'}: its condition embedding downsamples by {factor}, the "
                                     f"latent is {height // latent_hw[0]}x smaller than the image")
                continue
            image = condition_tensor(c.image, c.model.config.in_channels, width, height).to(device, c.model.dtype)
            with torch.no_grad():
                feats = list(c.model(image))
            self._check_adapter(c, feats, unet, latent_hw)
            feats = [(f * weight_map(c.weight, c.region_weights, *f.shape[-2:], rounding).to(f)).to(dtype) for f in feats]
            self._adapter_features.append((c, feats))
        self._cn_images = {id(c): condition_tensor(c.image, c.model.config.conditioning_channels, width, height).to(device, c.model.dtype)
                           for c in self.controlnets}
        self._maps: dict = {}
        self._memo: dict = {}

    @staticmethod
    def _check_adapter(c: Condition, feats, unet, latent_hw: tuple[int, int]) -> None:
        """Feature k must fit down block k where diffusers adds it: inside a cross-attention block (before its
        downsampler), after any other block (after its downsampler); a last extra one goes to the mid block."""
        expected, (h, w) = [], latent_hw
        for k, block in enumerate(unet.down_blocks):
            ch = unet.config.block_out_channels[k]
            down = getattr(block, "downsamplers", None) is not None
            after = (-(-h // 2), -(-w // 2)) if down else (h, w)
            expected.append((ch, h, w) if getattr(block, "has_cross_attention", False) else (ch, *after))
            h, w = after
        expected.append((unet.config.block_out_channels[-1], h, w))
        got = [tuple(f.shape[1:]) for f in feats]
        if len(got) > len(expected) or got != expected[: len(got)]:
            raise ValueError(f"{c.name or 'T2I-Adapter'}: feature shapes {got} do not fit this UNet's down blocks "
                             f"at this size (expected {expected[: len(got)]})")

    @staticmethod
    def _check_controlnet(c: Condition, unet) -> None:
        cc, uc = c.model.config, unet.config
        for key in ("block_out_channels", "cross_attention_dim", "layers_per_block"):
            a, b = cc.get(key), uc.get(key)
            if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
                raise ValueError(f"{c.name or 'ControlNet'}: {key} {a} does not match the base UNet's {b}")

    def _global_text(self, text: torch.Tensor) -> torch.Tensor:
        """ED-LoRA packs one text feature per UNet cross-attention layer along the last axis (``[B, L, n * D]``,
        one text encoder); a ControlNet reads the first layer's features, as its first cross-attention layer is the
        UNet's first."""
        dims = {c.model.config.cross_attention_dim for c in self.controlnets}
        d = dims.pop() if len(dims) == 1 else None
        if d is None or text.shape[-1] == d:
            return text
        if text.shape[-1] % d:
            raise ValueError(f"ControlNet: text features of width {text.shape[-1]} do not fit its cross-attention "
                             f"width {d}")
        return text[..., :d]

    def _map(self, c: Condition, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        key = (id(c), h, w)
        if key not in self._maps:
            self._maps[key] = weight_map(c.weight, c.region_weights, h, w, self.rounding)
        return self._maps[key].to(like)

    def adapter_features(self, step: int = 0, n_steps: int | None = None) -> list[torch.Tensor] | None:
        """The summed T2I-Adapter features of the adapters acting at ``step`` of ``n_steps`` (None: none acts)."""
        active = tuple(k for k, (c, _) in enumerate(self._adapter_features) if c.acts_at(step, n_steps))
        if not active:
            return None
        if active not in self._feature_sums:
            feats = [self._adapter_features[k][1] for k in active]
            self._feature_sums[active] = [sum(fs[1:], fs[0]) for fs in zip(*feats)]
        return self._feature_sums[active]

    def unet_kwargs(self, step: int, rows: str, sample: torch.Tensor, timestep, text: torch.Tensor,
                    added_cond_kwargs: dict | None = None, n_steps: int | None = None) -> dict:
        """Extra UNet inputs for one pass on ``sample`` ``[R, C, h, w]`` with ``text`` ``[R, L, D]`` at step
        ``step`` of ``n_steps`` (None: every condition acts, whatever its start / end).

        ControlNet outputs are memoised per (step, rows, text tensor), so passes of one step that share their
        inputs (composite, cmlora) run each ControlNet once.
        """
        kw: dict = {}
        n = sample.shape[0]
        features = self.adapter_features(step, n_steps)
        if features is not None:
            kw["down_intrablock_additional_residuals"] = [f.expand(n, *f.shape[1:]) for f in features]
        controlnets = [c for c in self.controlnets if c.acts_at(step, n_steps)]
        if controlnets:
            key = (step, rows, text.data_ptr(), tuple(text.shape))
            if key not in self._memo:
                text = self._global_text(text)
                self._memo = {}  # one step at a time
                down_sum, mid_sum = None, None
                for c in controlnets:
                    image = self._cn_images[id(c)]
                    down, mid = c.model(sample.to(c.model.dtype), timestep, encoder_hidden_states=text.to(c.model.dtype),
                                        controlnet_cond=image.expand(n, *image.shape[1:]), conditioning_scale=1.0,
                                        added_cond_kwargs=added_cond_kwargs, return_dict=False)
                    down = [d * self._map(c, *d.shape[-2:], d) for d in down]
                    mid = mid * self._map(c, *mid.shape[-2:], mid)
                    down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down)]
                    mid_sum = mid if mid_sum is None else mid_sum + mid
                self._memo[key] = (down_sum, mid_sum)
            down_sum, mid_sum = self._memo[key]
            kw["down_block_additional_residuals"] = list(down_sum)
            kw["mid_block_additional_residual"] = mid_sum
        return kw
