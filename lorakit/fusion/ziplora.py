"""ZipLoRA: merge a content and a style LoRA with one learned coefficient per column, optimised per pair.

Per merged layer ``dW = m_c * dW_c + m_s * dW_s`` where ``m_c, m_s`` hold one coefficient per column (input
dimension ``j`` of ``dW [out, in]``; input channel of a conv delta ``[out, in, kh, kw]``). The loss (shared with
LoRA.rar, :mod:`lorakit.fusion.lorarar`) is

    L = mse(f_merged(x_c), f_c(x_c)) + mse(f_merged(x_s), f_s(x_s)) + lam * sum_layers |cos(m_c*dW_c, m_s*dW_s)|

with ``f`` the UNet's noise prediction on noisy latents ``x`` of each LoRA's own reference images and prompts.
The base UNet never changes: each prediction runs ``torch.func.functional_call`` on its detached weights with
every LoRA's low-rank output added to its layer's, so gradients reach only the coefficients and no full-size
weight is formed.

A column-scaled merge is exactly a LoRA of rank ``r_c + r_s`` (:func:`export_merged`): scale the columns of
each down matrix by its coefficient (with the alpha/rank scale folded in) and stack down and up matrices.

Reference data (:func:`reference_for`) comes from, in order: images/prompt given by the caller or a config;
a data folder named in the file's ``lorakit.config`` metadata (``images + same-name .txt captions``); else
images generated with that LoRA alone (a warning says so). Prompts: captions, else ``lorakit.trigger``, else
kohya's ``ss_tag_frequency`` top tags, else the file name.

Text-encoder modules present in both adapters are summed (coefficients 1) and the loss uses the base text
encoders' prompt embeddings.

Merge plans and the export live in :mod:`lorakit.fusion.ziplora_plan`, reference data in
:mod:`lorakit.fusion.ziplora_reference`; both are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorakit.adapters.io import Adapter, AdapterError, LoraModule
from lorakit.fusion import FuseResult
from lorakit.fusion.ziplora_plan import (  # noqa: F401  (re-exported: the pair-merge API lives in this module)
    ALL_LAYERS, LORARAR_LAYERS, MergeLayer, MergePlan, _per_column, columns, export_merged,
    layer_matches, merge_metadata, merged_delta, plan_merge,
)
from lorakit.fusion.ziplora_reference import (  # noqa: F401  (re-exported)
    IMAGE_EXTENSIONS, Reference, adapter_weights, data_dir_of, encode_images, encode_prompts, generate_latents,
    load_images, pixel_size, prompt_of, reference_for,
)
from lorakit.logs import show_progress, tqdm


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

    The adapted layers are never materialised: each prediction adds every LoRA's low-rank output to its layer's
    (``x -> up((down * m) x)``, by forward hooks), and the cosine term is computed from the factors. So the
    memory is the base's plus the activations, not several full-size float32 copies of every merged weight
    (40 bytes per weight element: 13 GiB at SD 1.5 size).

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
        self._deltas = None

        def factors(key: str, mods: list[LoraModule]) -> tuple[torch.Tensor, torch.Tensor]:
            module = self._module(key)
            return _patch_factors(module, [(m, None) for m in mods], self.device)

        unet_layers = [la for la in plan.merged + plan.summed if la.key.startswith("unet.")]
        content = {**plan.content_only, **{la.key: la.content for la in unet_layers}}
        style = {**plan.style_only, **{la.key: la.style for la in unet_layers}}
        self.content_weights = {k: factors(k, [m]) for k, m in content.items() if k.startswith("unet.")}
        self.style_weights = {k: factors(k, [m]) for k, m in style.items() if k.startswith("unet.")}
        fixed = {k: factors(k, [m]) for k, m in {**plan.content_only, **plan.style_only}.items() if k.startswith("unet.")}
        for layer in plan.summed:
            if layer.key.startswith("unet."):
                fixed[layer.key] = factors(layer.key, [layer.content, layer.style])
        self.fixed_weights = fixed
        self.merged_layers = {layer.key: layer for layer in plan.merged}
        for key in self.merged_layers:
            self._module(key)
        # |<m_c dW_c, m_s dW_s>| and both norms are sums over columns of m_c m_s g_cs, m_c^2 g_cc, m_s^2 g_ss
        self.grams = {layer.key: _column_grams(layer, self.device) for layer in plan.merged}

    def _module(self, key: str):
        name = key.split(".", 1)[1]
        try:
            module = self.unet.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise AdapterError(f"layer {key}: the base UNet has no linear or conv layer {name}")
        return module

    @property
    def deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{merged layer key: (dW_c, dW_s)}``, float32, computed on first use (LoRA.rar's hypernetwork reads
        the columns)."""
        if self._deltas is None:
            self._deltas = {layer.key: tuple(d.to(self.device) for d in layer.deltas()) for layer in self.plan.merged}
        return self._deltas

    def predict(self, weights: dict, sample, timestep, cond: dict) -> torch.Tensor:
        """UNet noise prediction with low-rank updates ``{layer key: (down, up)}`` added: ``[b, C, h, w]``."""
        from torch.func import functional_call

        handles = [self._module(key).register_forward_hook(_lowrank_hook(*f)) for key, f in weights.items()]
        try:
            out = functional_call(self.unet, self.params, (sample,), {"timestep": timestep, **cond, "return_dict": False})
        finally:
            for h in handles:
                h.remove()
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
        """The merged model's low-rank updates for ``coeffs`` (for :meth:`predict`) and the cosine penalty
        ``sum_layers |cos(m_c * dW_c, m_s * dW_s)|``, both differentiable in ``coeffs``."""
        weights = dict(self.fixed_weights)
        cos_sum = torch.zeros((), device=self.device)
        for key, layer in self.merged_layers.items():
            m_c, m_s = coeffs[key]
            weights[key] = _patch_factors(self._module(key), [(layer.content, m_c), (layer.style, m_s)], self.device)
            g_cs, g_cc, g_ss = self.grams[key]
            dot = (m_c * m_s * g_cs).sum()
            norms = ((m_c * m_c * g_cc).sum() * (m_s * m_s * g_ss).sum()).clamp_min(1e-24).sqrt()
            cos_sum = cos_sum + (dot / norms).abs()
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


def _down_up(mod: LoraModule, module) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA's factors in the layout of ``module``: Linear ``[r, in]``, ``[out, r]``; Conv2d ``[r, in, kh, kw]``
    (a 1x1 conv's down may be stored 2-D), ``[out, r, 1, 1]``."""
    down, up = mod.down.float(), mod.up.float()
    if isinstance(module, torch.nn.Conv2d):
        if down.dim() == 2:
            down = down.reshape(*down.shape, 1, 1)
        return down, up.reshape(up.shape[0], -1, 1, 1)
    return down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)


def _patch_factors(module, mods: list[tuple[LoraModule, torch.Tensor | None]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """One low-rank update ``(down, up)`` for the sum of ``scale * m * dW`` over ``mods`` (``m`` scales the
    down factor's input columns; ``None``: 1): the factors stacked, ranks added."""
    downs, ups = [], []
    for mod, m in mods:
        down, up = _down_up(mod, module)
        down = down.to(device) * mod.scale
        if m is not None:
            down = down * m.reshape(1, -1, *([1] * (down.dim() - 2))).to(down.dtype)
        downs.append(down)
        ups.append(up.to(device))
    return torch.cat(downs), torch.cat(ups, dim=1)


def _lowrank_hook(down: torch.Tensor, up: torch.Tensor):
    """A forward hook adding ``up(down(x))`` to a Linear or Conv2d output, in the input's dtype."""

    def hook(module, inputs, out):
        x = inputs[0]
        d, u = down.to(x.dtype), up.to(x.dtype)
        if isinstance(module, torch.nn.Conv2d):
            h = F.conv2d(x, d, None, module.stride, module.padding, module.dilation, module.groups)
            return out + F.conv2d(h, u)
        return out + F.linear(F.linear(x, d), u)

    return hook


@torch.no_grad()
def _column_grams(layer: MergeLayer, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per input column ``i``: ``<dW_c[:, i], dW_s[:, i]>``, ``|dW_c[:, i]|^2``, ``|dW_s[:, i]|^2`` (float64 from
    the factors: ``sum_ab (B_a^T B_b) sum_k A_a[a, i, k] A_b[b, i, k]``), so the cosine of the column-scaled
    deltas needs no full-size matrix."""
    parts = []
    for mod in (layer.content, layer.style):
        down, up = mod.down.double().to(device), mod.up.double().to(device)
        parts.append((mod.scale * down.reshape(down.shape[0], down.shape[1], -1), up.reshape(up.shape[0], -1)))
    if parts[0][0].shape[1:] != parts[1][0].shape[1:]:  # a 1x1 conv stored 2-D in one file and 4-D in the other
        k = max(parts[0][0].shape[2], parts[1][0].shape[2])
        parts = [(a.reshape(a.shape[0], a.shape[1], k), b) for a, b in parts]

    def gram(x, y):
        (a_x, b_x), (a_y, b_y) = x, y
        return torch.einsum("ab,aik,bik->i", b_x.T @ b_y, a_x, a_y).float()

    return gram(parts[0], parts[1]), gram(parts[0], parts[0]), gram(parts[1], parts[1])


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
    args = inputs.settings
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
