"""ZipLoRA: merge a content and a style LoRA with one learned coefficient per column, optimised per pair.

Per merged layer ``dW = m_c * dW_c + m_s * dW_s`` where ``m_c, m_s`` hold one coefficient per column (input
dimension ``j`` of ``dW [out, in]``; input channel of a conv delta ``[out, in, kh, kw]``). The loss (shared with
LoRA.rar, :mod:`lorakit.fusion.lorarar`) is

    L = mse(f_merged(x_c), f_c(x_c)) + mse(f_merged(x_s), f_s(x_s)) + lam * sum_layers |cos(m_c*dW_c, m_s*dW_s)|

with ``f`` the UNet's noise prediction on noisy latents ``x`` of each LoRA's own reference images and prompts.
The base UNet never changes: each prediction runs ``torch.func.functional_call`` with the adapted weights
``W0 + dW`` of the touched layers, so gradients reach only the coefficients.

A column-scaled merge is exactly a LoRA of rank ``r_c + r_s`` (:func:`export_merged`): scale the columns of
each down matrix by its coefficient (with the alpha/rank scale folded in) and stack down and up matrices.

Reference data (:func:`reference_for`) comes from, in order: images/prompt given by the caller or a config;
a data folder named in the file's ``lorakit.config`` metadata (``images + same-name .txt captions``); else
images generated with that LoRA alone (a warning says so). Prompts: captions, else ``lorakit.trigger``, else
kohya's ``ss_tag_frequency`` top tags, else the file name.

Text-encoder modules present in both adapters are summed (coefficients 1) and the loss uses the base text
encoders' prompt embeddings.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.adapters.io import Adapter, AdapterError, LoraModule, adapter_metadata, live_path
from lorakit.conditioning import is_sdxl, pixel_size, sdxl_time_ids
from lorakit.data import IMAGE_EXTENSIONS
from lorakit.logs import show_progress

log = logging.getLogger(__name__)

ALL_LAYERS = ("*",)
LORARAR_LAYERS = ("to_q", "to_out.0")  # the paper's merged layers; to_k / to_v are summed


# --------------------------------------------------------------------------------------------- merge plan


@dataclass
class MergeLayer:
    """One layer both adapters touch."""

    key: str  # adapter module key, ``unet.<path>``
    content: LoraModule
    style: LoraModule

    @property
    def path(self) -> str:
        return self.key.split(".", 1)[1]

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dW_c, dW_s)``, float32, ``[out, in]`` or ``[out, in, kh, kw]``."""
        dc, ds = self.content.delta(), self.style.delta()
        if dc.dim() != ds.dim():  # a 1x1 conv stored 2-D in one file and 4-D in the other
            dc, ds = dc.reshape(dc.shape[0], dc.shape[1], -1).squeeze(-1), ds.reshape(ds.shape[0], ds.shape[1], -1).squeeze(-1)
        return dc, ds


@dataclass
class MergePlan:
    """How two adapters combine: ``merged`` layers get per-column coefficients; ``summed`` layers add both
    deltas (coefficients fixed at 1); layers only one adapter has are kept as they are."""

    merged: list[MergeLayer] = field(default_factory=list)
    summed: list[MergeLayer] = field(default_factory=list)
    content_only: dict[str, LoraModule] = field(default_factory=dict)
    style_only: dict[str, LoraModule] = field(default_factory=dict)


def layer_matches(key: str, patterns) -> bool:
    """Whether a module key is selected by layer patterns.

    A pattern matches a key that ends with ``.pattern`` (``to_q``, ``to_out.0``, ``attn2.to_v``) or, when it
    holds ``*``/``?``, the whole key as a glob (``*`` alone = every layer).
    """
    for p in patterns:
        if any(c in p for c in "*?["):
            if fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key, "unet." + p):
                return True
        elif key.endswith("." + p):
            return True
    return False


def plan_merge(content: Adapter, style: Adapter, merge_layers=LORARAR_LAYERS) -> MergePlan:
    """Pair the layers of a content and a style adapter.

    Args:
        merge_layers: patterns (:func:`layer_matches`) of the UNet layers that get coefficients.
    Raises:
        AdapterError when a layer both adapters touch has different shapes in the two files.
    """
    plan = MergePlan()
    for key, c in content.modules.items():
        s = style.modules.get(key)
        if s is None:
            plan.content_only[key] = c
            continue
        if c.down.shape[1:] != s.down.shape[1:] and c.down.reshape(c.rank, -1).shape != s.down.reshape(s.rank, -1).shape:
            raise AdapterError(
                f"layer {key}: content down {tuple(c.down.shape)} and style down {tuple(s.down.shape)} do not fit the "
                "same base layer (are both adapters for the same base model?)"
            )
        if c.up.shape[0] != s.up.shape[0]:
            raise AdapterError(f"layer {key}: content up {tuple(c.up.shape)} vs style up {tuple(s.up.shape)}")
        layer = MergeLayer(key, c, s)
        if key.startswith("unet.") and layer_matches(key, merge_layers):
            plan.merged.append(layer)
        else:
            plan.summed.append(layer)
    plan.style_only = {k: s for k, s in style.modules.items() if k not in content.modules}
    return plan


def columns(delta: torch.Tensor) -> torch.Tensor:
    """The columns of a delta as rows: ``[out, in]`` -> ``[in, out]``; ``[out, in, kh, kw]`` -> ``[in, out*kh*kw]``."""
    return delta.transpose(0, 1).reshape(delta.shape[1], -1)


def _per_column(m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return m.reshape(1, -1, *([1] * (delta.dim() - 2)))


def merged_delta(dc: torch.Tensor, ds: torch.Tensor, m_c: torch.Tensor, m_s: torch.Tensor) -> torch.Tensor:
    """``m_c * dW_c + m_s * dW_s`` with ``m [in]`` scaling the columns of ``dW [out, in(, kh, kw)]``."""
    return _per_column(m_c, dc) * dc + _per_column(m_s, ds) * ds


def _scaled_down(mod: LoraModule, m: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    down = mod.down.float().reshape(mod.rank, *like.shape[1:]) if mod.down.dim() != like.dim() else mod.down.float()
    if m is None:
        return down * mod.scale
    return down * _per_column(mod.scale * m.detach().float().to(down.device), down)


def _stack(c: LoraModule, s: LoraModule, m_c=None, m_s=None) -> LoraModule:
    """The exact rank ``r_c + r_s`` LoRA of ``m_c * dW_c + m_s * dW_s`` (alpha = rank, so scale 1)."""
    like = c.down if c.down.dim() >= s.down.dim() else s.down
    down = torch.cat([_scaled_down(c, m_c, like), _scaled_down(s, m_s, like)], dim=0)
    up_c, up_s = c.up.float(), s.up.float()
    if up_c.dim() != up_s.dim():
        up_c, up_s = up_c.reshape(up_c.shape[0], -1, *([1] * (like.dim() - 2))), up_s.reshape(up_s.shape[0], -1, *([1] * (like.dim() - 2)))
    up = torch.cat([up_c, up_s], dim=1)
    return LoraModule(down=down, up=up, alpha=float(down.shape[0]))


def export_merged(plan: MergePlan, coeffs: dict[str, tuple[torch.Tensor, torch.Tensor]], metadata: dict | None = None) -> Adapter:
    """Write a merge as a plain LoRA, exactly.

    Merged layers become rank ``r_c + r_s`` modules with ``down = [scale_c * m_c * A_c ; scale_s * m_s * A_s]``
    (columns scaled), ``up = [B_c, B_s]``, ``alpha = r_c + r_s``; summed layers the same with coefficients 1;
    layers only one adapter has are copied.

    Args:
        coeffs: ``{layer key: (m_c [in], m_s [in])}`` for every layer in ``plan.merged``.
    """
    missing = [layer.key for layer in plan.merged if layer.key not in coeffs]
    if missing:
        raise ValueError(f"no coefficients for merged layer(s) {missing[:3]} ({len(missing)} in all)")
    out = Adapter(metadata=dict(metadata or {}))
    for layer in plan.merged:
        m_c, m_s = coeffs[layer.key]
        out.modules[layer.key] = _stack(layer.content, layer.style, m_c, m_s)
    for layer in plan.summed:
        out.modules[layer.key] = _stack(layer.content, layer.style)
    for key, mod in {**plan.content_only, **plan.style_only}.items():
        out.modules[key] = LoraModule(mod.down, mod.up, mod.alpha)  # shared tensors: nothing writes to them
    return out


def merge_metadata(method: str, content: Adapter, style: Adapter, sources=(None, None), **extra) -> dict[str, str]:
    """Header metadata of a merged adapter: DESIGN.md keys plus the method and its inputs."""
    arch = content.arch or style.arch or "sd1"
    triggers = [t for t in (content.metadata.get("lorakit.trigger"), style.metadata.get("lorakit.trigger")) if t]
    merge = {"method": method, "content": str(sources[0] or ""), "style": str(sources[1] or ""), **extra}
    return adapter_metadata(arch, "lora", trigger=", ".join(triggers) or None, **{"lorakit.merge": json.dumps(merge, default=str)})


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

    from lorakit.data import _read_caption, open_rgb

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
            warnings.warn(f"{name}: no trigger or tags in its metadata; generating references with an empty prompt")
        warnings.warn(
            f"{name}: no reference images (none given, none named in its metadata); generating {num_images} with "
            "this LoRA alone"
        )
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


# --------------------------------------------------------------------------------------------- the loss


@dataclass
class LossBatch:
    """Noisy latents, timesteps, conditioning and the single-LoRA targets for one loss evaluation."""

    noisy: tuple[torch.Tensor, torch.Tensor]  # content, style: [b, C, h, w]
    timesteps: tuple[torch.Tensor, torch.Tensor]
    cond: tuple[dict, dict]
    targets: tuple[torch.Tensor, torch.Tensor]  # f_c(x_c), f_s(x_s)


class ZipLoRALoss:
    """The ZipLoRA objective for one (content, style) pair on a frozen UNet.

    Args:
        unet: the base UNet (not changed; its parameters are used detached).
        noise_scheduler: a diffusers scheduler with ``add_noise`` and ``config.num_train_timesteps`` (DDPM).
        plan: :func:`plan_merge` of the pair; only UNet modules enter the loss.
        ref_c / ref_s: :class:`Reference` of the content / style LoRA.
        lam: weight of the cosine term.
    """

    def __init__(self, unet, noise_scheduler, plan: MergePlan, ref_c: Reference, ref_s: Reference, lam: float = 0.01):
        self.unet, self.scheduler, self.plan, self.lam = unet, noise_scheduler, plan, lam
        p = next(unet.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.refs = (ref_c.to(self.device, self.dtype), ref_s.to(self.device, self.dtype))
        self.params = {n: t.detach() for n, t in unet.named_parameters()}
        self.deltas = {layer.key: tuple(d.to(self.device) for d in layer.deltas()) for layer in plan.merged}

        def weight_name(key):
            name = key.split(".", 1)[1] + ".weight"
            if name not in self.params:
                raise AdapterError(f"layer {key}: the base UNet has no parameter {name}")
            return name

        def over(mods):
            out = {}
            for key, mod in mods.items():
                if key.startswith("unet."):
                    w = self.params[weight_name(key)]
                    out[weight_name(key)] = (w.float() + mod.delta().to(self.device).reshape(w.shape)).to(w.dtype)
            return out

        unet_layers = [layer for layer in plan.merged + plan.summed]
        content = {**plan.content_only, **{la.key: la.content for la in unet_layers}}
        style = {**plan.style_only, **{la.key: la.style for la in unet_layers}}
        self.content_weights, self.style_weights = over(content), over(style)
        fixed = over({**plan.content_only, **plan.style_only})
        for layer in plan.summed:
            if layer.key.startswith("unet."):
                name = weight_name(layer.key)
                dc, ds = layer.deltas()
                w = self.params[name]
                fixed[name] = (w.float() + (dc + ds).to(self.device).reshape(w.shape)).to(w.dtype)
        self.fixed_weights = fixed
        self.merged_names = {layer.key: weight_name(layer.key) for layer in plan.merged}

    def predict(self, weights: dict, sample, timestep, cond: dict) -> torch.Tensor:
        """UNet noise prediction with some weights replaced: ``[b, C, h, w]``."""
        from torch.func import functional_call

        out = functional_call(self.unet, {**self.params, **weights}, (sample,), {"timestep": timestep, **cond, "return_dict": False})
        return out[0]

    @torch.no_grad()
    def batch(self, generator: torch.Generator, batch_size: int = 1) -> LossBatch:
        """Draw reference items, noise and timesteps (from ``generator``, CPU) and compute both targets."""
        noisy, ts, conds, targets = [], [], [], []
        T = self.scheduler.config.num_train_timesteps
        for ref, weights in zip(self.refs, (self.content_weights, self.style_weights)):
            idx = torch.randint(0, ref.latents.shape[0], (batch_size,), generator=generator)
            noise = torch.randn((batch_size, *ref.latents.shape[1:]), generator=generator).to(self.device, self.dtype)
            t = torch.randint(0, T, (batch_size,), generator=generator).to(self.device)
            x = self.scheduler.add_noise(ref.latents[idx.to(self.device)], noise, t)
            cond = ref.select(idx.to(self.device))
            noisy.append(x)
            ts.append(t)
            conds.append(cond)
            targets.append(self.predict(weights, x, t, cond).float())
        return LossBatch(tuple(noisy), tuple(ts), tuple(conds), tuple(targets))

    def merged_weights(self, coeffs: dict) -> tuple[dict, torch.Tensor]:
        """The merged model's replaced weights for ``coeffs`` and the cosine penalty ``sum_layers |cos|``."""
        weights = dict(self.fixed_weights)
        cos_sum = torch.zeros((), device=self.device)
        for key, name in self.merged_names.items():
            dc, ds = self.deltas[key]
            m_c, m_s = coeffs[key]
            sc, ss = _per_column(m_c, dc) * dc, _per_column(m_s, ds) * ds
            w = self.params[name]
            weights[name] = (w.float() + (sc + ss).reshape(w.shape)).to(w.dtype)
            cos_sum = cos_sum + F.cosine_similarity(sc.flatten(), ss.flatten(), dim=0, eps=1e-12).abs()
        return weights, cos_sum

    def __call__(self, coeffs: dict, batch: LossBatch) -> tuple[torch.Tensor, dict]:
        """The loss (scalar, differentiable in ``coeffs``) and its parts as floats."""
        weights, cos_sum = self.merged_weights(coeffs)
        (xc, xs), (tc, ts), (cc, cs) = batch.noisy, batch.timesteps, batch.cond
        if xc.shape[1:] == xs.shape[1:] and cc["encoder_hidden_states"].shape[1:] == cs["encoder_hidden_states"].shape[1:]:
            # one forward for both halves: the merged model is the same for content and style inputs
            pred = self.predict(weights, torch.cat([xc, xs]), torch.cat([tc, ts]), _cat_cond(cc, cs)).float()
            preds = (pred[: xc.shape[0]], pred[xc.shape[0] :])
        else:
            preds = tuple(self.predict(weights, x, t, c).float() for x, t, c in zip(batch.noisy, batch.timesteps, batch.cond))
        parts = [F.mse_loss(p, target) for p, target in zip(preds, batch.targets)]
        loss = parts[0] + parts[1] + self.lam * cos_sum
        return loss, {"content": parts[0].item(), "style": parts[1].item(), "cos": cos_sum.item(), "loss": loss.item()}


def _cat_cond(a: dict, b: dict) -> dict:
    out = {"encoder_hidden_states": torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]])}
    if "added_cond_kwargs" in a:
        out["added_cond_kwargs"] = {k: torch.cat([a["added_cond_kwargs"][k], b["added_cond_kwargs"][k]]) for k in a["added_cond_kwargs"]}
    return out


def ones_coefficients(plan: MergePlan, device=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Coefficients 1 for every merged layer (= the plain sum of the two LoRAs)."""
    out = {}
    for layer in plan.merged:
        n = layer.content.down.shape[1]
        out[layer.key] = (torch.ones(n, device=device), torch.ones(n, device=device))
    return out


@torch.no_grad()
def evaluate(loss_fn: ZipLoRALoss, coeffs: dict, batches: list[LossBatch]) -> float:
    """Mean loss of ``coeffs`` over fixed batches (for comparing merges on the same noise)."""
    return sum(loss_fn(coeffs, b)[0].item() for b in batches) / len(batches)


def eval_batches(loss_fn: ZipLoRALoss, n: int = 4, batch_size: int = 2, seed: int = 1234) -> list[LossBatch]:
    """``n`` fixed loss batches drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [loss_fn.batch(g, batch_size) for _ in range(n)]


def optimize_coefficients(
    loss_fn: ZipLoRALoss, steps: int = 100, lr: float = 0.01, batch_size: int = 1, seed: int = 0, progress: bool = False
) -> tuple[dict, list[float]]:
    """ZipLoRA's per-pair optimisation: coefficients start at 1, Adam on the loss for ``steps`` steps.

    Returns:
        ``({layer key: (m_c [in], m_s [in])}, loss per step)``.
    """
    from lorakit.logs import tqdm

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    coeffs = {k: (a.requires_grad_(), b.requires_grad_()) for k, (a, b) in ones_coefficients(loss_fn.plan, loss_fn.device).items()}
    opt = torch.optim.Adam([t for pair in coeffs.values() for t in pair], lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in tqdm(range(steps), desc="ziplora", disable=not progress):
        loss, parts = loss_fn(coeffs, loss_fn.batch(g, batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(parts["loss"])
    return {k: (a.detach(), b.detach()) for k, (a, b) in coeffs.items()}, history


def noise_scheduler_of(pipe):
    """A DDPM scheduler from the pipeline's scheduler config (the training noise schedule)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def ziplora_merge(
    pipe,
    content: Adapter,
    style: Adapter,
    steps: int = 100,
    lr: float = 0.01,
    lam: float = 0.01,
    layers=ALL_LAYERS,
    batch_size: int = 1,
    refs: tuple[Reference, Reference] | None = None,
    sources: tuple[str | None, str | None] = (None, None),
    seed: int = 0,
    progress: bool = True,
    num_images: int = 4,
    reference_size: int | None = None,
    generate_steps: int = 20,
) -> tuple[Adapter, dict]:
    """Merge a content and a style LoRA with ZipLoRA; the result is an exact rank ``r_c + r_s`` LoRA.

    Args:
        pipe: the base pipeline both LoRAs were trained on (not changed).
        layers: UNet layer patterns that get coefficients (default every layer both adapters touch).
        refs: precomputed references; default :func:`reference_for` each adapter.
        sources: the adapters' file paths (metadata, messages).
        num_images / reference_size / generate_steps: for references found or generated (:func:`reference_for`).
    Returns:
        ``(merged adapter, info)`` with ``info = {"history": [loss per step], "coefficients": {...}}``.
    """
    plan = plan_merge(content, style, layers)
    if not plan.merged:
        raise AdapterError(f"no layer both adapters touch matches the merge layers {list(layers)}")
    if refs is None:
        kw = dict(num_images=num_images, size=reference_size, generate_steps=generate_steps)
        refs = (reference_for(pipe, content, sources[0], seed=seed, **kw), reference_for(pipe, style, sources[1], seed=seed + 1, **kw))
    loss_fn = ZipLoRALoss(pipe.unet, noise_scheduler_of(pipe), plan, *refs, lam=lam)
    coeffs, history = optimize_coefficients(loss_fn, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    meta = merge_metadata("ziplora", content, style, sources, steps=steps, lr=lr, lam=lam, layers=list(layers))
    return export_merged(plan, coeffs, meta), {"history": history, "coefficients": coeffs, "loss_fn": loss_fn}


__all__ = [
    "ALL_LAYERS", "LORARAR_LAYERS", "MergeLayer", "MergePlan", "Reference", "ZipLoRALoss", "LossBatch",
    "columns", "merged_delta", "plan_merge", "export_merged", "merge_metadata", "reference_for", "layer_matches",
    "ones_coefficients", "optimize_coefficients", "ziplora_merge", "evaluate", "eval_batches", "noise_scheduler_of",
    "adapter_weights", "encode_prompts",
]


# --------------------------------------------------------------------------------------------- lorakit fuse


def check_pair(inputs) -> tuple[Adapter, Adapter]:
    """The (content, style) adapters of a ``lorakit fuse`` call, each scaled by its ``--weights`` value.

    Raises:
        ValueError unless exactly two adapters are given.
    """
    if len(inputs.adapters) != 2:
        raise ValueError(
            f"--method {inputs.method} merges exactly two adapters (--adapters CONTENT STYLE), got {len(inputs.adapters)}"
        )
    out = []
    for adapter, w in zip(inputs.adapters, inputs.weights):
        if w != 1.0:
            adapter = Adapter({k: LoraModule(m.down, m.up, m.alpha * w) for k, m in adapter.modules.items()},
                              dict(adapter.metadata), dict(adapter.extra))
        out.append(adapter)
    return out[0], out[1]


def run_fuse(inputs):
    """``lorakit fuse --method ziplora --base BASE --adapters CONTENT STYLE --out merged.safetensors``."""
    from lorakit.fusion import FuseResult

    args = inputs.args
    content, style = check_pair(inputs)
    pipe = inputs.load_pipe()
    images = getattr(args, "ref_images", None) or [None, None]
    if len(images) != 2:
        raise ValueError(f"--ref-images takes one folder per adapter (2), got {len(images)}")
    given = [p[0] if src == "--prompts" else None for p, src in zip(inputs.prompts, inputs.prompt_sources)] \
        if inputs.prompt_sources else [None, None]
    kw = dict(num_images=args.ref_num, size=args.ref_size, generate_steps=args.ref_steps)
    refs = tuple(
        reference_for(pipe, ad, path, images=img, prompt=pr, seed=inputs.seed + i, **kw)
        for i, (ad, path, img, pr) in enumerate(zip((content, style), inputs.paths, images, given))
    )
    steps = 100 if args.steps is None else args.steps
    layers = args.layers or list(ALL_LAYERS)
    merged, info = ziplora_merge(pipe, content, style, steps=steps, lr=args.lr, lam=args.lam, layers=layers,
                                 refs=refs, sources=tuple(inputs.paths), seed=inputs.seed, progress=show_progress())
    hist = info["history"]
    report = {"settings": {"steps": steps, "lr": args.lr, "lam": args.lam, "layers": layers},
              "loss_first": hist[0] if hist else None, "loss_last": hist[-1] if hist else None,
              "merged_layers": len(info["loss_fn"].plan.merged),
              "references": [{"source": r.source, "images": int(r.latents.shape[0]), "prompts": r.prompts} for r in refs]}
    return FuseResult(modules=merged.modules, report=report, metadata={"lorakit.merge": merged.metadata["lorakit.merge"]})
