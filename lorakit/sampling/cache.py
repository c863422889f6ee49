"""Per-LoRA DeepCache-style deep-feature caching on diffusers' ``UNet2DConditionModel``.

A UNet pass is split at depth ``d`` (1 <= d < number of down blocks) and layer ``k`` of ``up_blocks[-d]``
(0 <= k < its number of resnets):

* the **deep feature** is the input of layer ``k`` of ``up_blocks[-d]`` (at ``k = 0`` the block's input, the output
  of ``up_blocks[-d-1]``), i.e. everything the deep blocks (``down_blocks[d:]``, the mid block,
  ``up_blocks[:-d]``) and the block's first ``k`` layers compute;
* the **shallow path** is what the rest needs: ``conv_in``, the time embedding, the down layers whose skip
  features the remaining up layers consume (``down_blocks[:d]`` less the last ``k`` layers of ``down_blocks[d-1]``,
  whose skips only fed the cached layers), layers ``k..`` of ``up_blocks[-d]``, ``up_blocks[-d+1:]``,
  ``conv_norm_out`` and ``conv_out``.

A larger ``k`` caches more and recomputes less (on SD1 at ``d = 1``: ``k = 0`` recomputes 2 down + 3 up layers
at full resolution, ``k = 1`` 1 + 2, ``k = 2`` 0 + 1), as DeepCache's finer ``cache_block_id``.

:func:`unet_split_forward` runs the pieces of the UNet itself. A full pass equals ``unet(...)`` exactly (tested)
and also returns the deep feature; a shallow pass takes a cached deep feature instead of computing it.

:class:`DeepFeatureCache` keeps one deep feature per key (CMLoRA: per adapter) and counts full and shallow passes;
which pass is full comes from :func:`lorakit.sampling.schedules.cmlora_plan`.

The split at depth 1, layer 0 is the one of the CMLoRA authors' code (DeepCache's ``cache_layer_id=0, cache_block_id=1`` on
SD1: the cached feature is the input of the last up block), so a shallow pass gives the same numbers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def _embeddings(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond, class_labels):
    """Time (+ class, + added) embedding and processed text features, as ``UNet2DConditionModel.forward`` does."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    if unet.config.addition_embed_type == "image_hint":
        raise ValueError("image_hint UNets (Kandinsky) are not supported by the split UNet pass")
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    return emb, encoder_hidden_states


def _down(block, sample, emb, ehs, cross_attention_kwargs, intrablock: list | None = None, apply: bool = True):
    """One down block as ``UNet2DConditionModel.forward`` runs it, with the T2I-Adapter residuals ``intrablock``
    (the block's one is popped; when ``apply``: inside a cross-attention block, added in place to any other
    block's output, as diffusers does)."""
    extra = intrablock.pop(0) if intrablock else None
    if not apply:
        extra = None
    if getattr(block, "has_cross_attention", False):
        kw = {"additional_residuals": extra} if extra is not None else {}
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs, cross_attention_kwargs=cross_attention_kwargs,
                     **kw)
    sample, res = block(hidden_states=sample, temb=emb)
    if extra is not None:
        sample += extra  # in place, as diffusers does: a skip that is this same tensor gets it too
    return sample, res


@contextmanager
def _layers(block, start: int, stop: int, resample: bool):
    """Temporarily keep only layers ``start:stop`` of a diffusers down/up block (resnets and, if any, attentions),
    and its down/upsampler only if ``resample``: the block's own forward then runs just that part."""
    saved = {name: getattr(block, name) for name in ("resnets", "attentions", "downsamplers", "upsamplers")
             if getattr(block, name, None) is not None}
    try:
        for name in ("resnets", "attentions"):
            if name in saved:
                setattr(block, name, saved[name][start:stop])
        for name in ("downsamplers", "upsamplers"):
            if name in saved and not resample:
                setattr(block, name, None)
        yield block
    finally:
        for name, value in saved.items():
            setattr(block, name, value)


def split_layers(unet, depth: int, layer: int) -> None:
    """Raise ValueError unless (depth, layer) is a split of this UNet (see the module docstring)."""
    n_down = len(unet.down_blocks)
    if not 1 <= depth <= n_down - 1:
        raise ValueError(f"cache depth {depth} out of range: this UNet has {n_down} down blocks, so 1..{n_down - 1}")
    n_layers = len(unet.up_blocks[len(unet.up_blocks) - depth].resnets)
    if not 0 <= layer <= n_layers - 1:
        raise ValueError(f"cache layer {layer} out of range: up block {len(unet.up_blocks) - depth} has {n_layers} "
                         f"layers, so 0..{n_layers - 1}")


def _up(block, sample, emb, res, ehs, cross_attention_kwargs, upsample_size):
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=sample,
            temb=emb,
            res_hidden_states_tuple=res,
            encoder_hidden_states=ehs,
            cross_attention_kwargs=cross_attention_kwargs,
            upsample_size=upsample_size,
        )
    return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)


@torch.no_grad()
def unet_split_forward(
    unet,
    sample: torch.Tensor,
    timestep,
    encoder_hidden_states: torch.Tensor,
    depth: int = 1,
    deep_feature: torch.Tensor | None = None,
    added_cond_kwargs: dict | None = None,
    cross_attention_kwargs: dict | None = None,
    timestep_cond: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    layer: int = 0,
    down_intrablock_additional_residuals: list[torch.Tensor] | None = None,
    down_block_additional_residuals: list[torch.Tensor] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One UNet pass run piece by piece; full when ``deep_feature`` is None, shallow otherwise.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD1/SD2/SDXL layouts).
        sample: noisy latents ``[B, C, H, W]``; timestep: scalar or ``[B]``.
        encoder_hidden_states: text features ``[B, L, D]``.
        depth: split depth d, ``1 <= d <= len(unet.down_blocks) - 1``.
        deep_feature: the cached input of layer ``layer`` of ``up_blocks[-d]`` ``[B, C_d, H_d, W_d]`` from an
            earlier full pass with the same batch layout and split; None runs the full UNet.
        layer: split layer k inside ``up_blocks[-d]``, ``0 <= k < len(up_blocks[-d].resnets)``.
        down_intrablock_additional_residuals: T2I-Adapter features, one per down block (diffusers' meaning); a
            shallow pass adds those of the down blocks it runs whole.
        down_block_additional_residuals, mid_block_additional_residual: ControlNet residuals, added to the skip
            connections and the mid block's output (a shallow pass uses the skips it needs).
    Returns:
        ``(noise_pred [B, C, H, W], deep_feature)``; the deep feature is the one computed (full pass) or the one
        given (shallow pass).
    Raises:
        ValueError for a split outside the range or a deep feature whose batch does not match.
    """
    split_layers(unet, depth, layer)
    if deep_feature is not None and deep_feature.shape[0] != sample.shape[0]:
        raise ValueError(f"cached deep feature has batch {deep_feature.shape[0]}, the sample has {sample.shape[0]}")
    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb, ehs = _embeddings(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond, class_labels)
    sample = unet.conv_in(sample)
    intrablock = list(down_intrablock_additional_residuals) if down_intrablock_additional_residuals is not None else None
    ctx = _PassInputs(emb, ehs, cross_attention_kwargs, intrablock)
    split_block = len(unet.up_blocks) - depth
    if deep_feature is not None:
        res_stack = _shallow_down(unet, ctx, sample, split_block, layer, down_block_additional_residuals)
        sample, first_up = deep_feature, split_block
    else:
        sample, res_stack = _full_down_mid(unet, ctx, sample, down_block_additional_residuals,
                                           mid_block_additional_residual)
        first_up = 0
    sample, computed = _up_blocks(unet, ctx, sample, res_stack, first_up, split_block, layer,
                                  shallow=deep_feature is not None, forward_upsample_size=forward_upsample_size)
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample), (deep_feature if deep_feature is not None else computed)


@dataclass
class _PassInputs:
    """What every block of one UNet pass reads; ``intrablock`` (T2I-Adapter features) is consumed in order."""

    emb: torch.Tensor
    ehs: torch.Tensor
    cross_attention_kwargs: dict | None
    intrablock: list | None


def _shallow_down(unet, ctx: _PassInputs, sample, split_block: int, layer: int, down_residuals) -> tuple:
    """The skip features a shallow pass's up layers need: the shallow up layers consume a prefix of the full
    pass's skip features (the deeper layers' part is on top of the stack), so the down layers run just far
    enough to produce that prefix."""
    res_stack: tuple = (sample,)
    needed = sum(len(b.resnets) for b in unet.up_blocks[split_block:]) - layer
    for block in unet.down_blocks:
        if len(res_stack) >= needed:
            break
        n_layers = min(len(block.resnets), needed - len(res_stack))
        resample = len(res_stack) + n_layers < needed
        # A T2I-Adapter feature lands after a block's last layer (cross-attention blocks) or on its resampled
        # output (others): a block cut short of that never reaches it.
        whole = n_layers == len(block.resnets) and (resample or getattr(block, "has_cross_attention", False))
        with _layers(block, 0, n_layers, resample=resample):
            sample, res = _down(block, sample, ctx.emb, ctx.ehs, ctx.cross_attention_kwargs, ctx.intrablock,
                                apply=whole)
        res_stack += res
    if down_residuals is not None:
        # zip stops at the shorter: only the prefix of the skips the shallow up layers need
        res_stack = tuple(r + a for r, a in zip(res_stack, down_residuals))
    return res_stack[:needed]


def _full_down_mid(unet, ctx: _PassInputs, sample, down_residuals, mid_residual) -> tuple:
    """Every down block and the mid block; returns (mid output, skip features)."""
    res_stack: tuple = (sample,)
    for block in unet.down_blocks:
        sample, res = _down(block, sample, ctx.emb, ctx.ehs, ctx.cross_attention_kwargs, ctx.intrablock)
        res_stack += res
    if down_residuals is not None:
        res_stack = tuple(r + a for r, a in zip(res_stack, down_residuals))
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, ctx.emb, encoder_hidden_states=ctx.ehs,
                                    cross_attention_kwargs=ctx.cross_attention_kwargs)
        else:
            sample = unet.mid_block(sample, ctx.emb)
        if ctx.intrablock and sample.shape == ctx.intrablock[0].shape:  # T2I-Adapter-XL's mid feature
            sample += ctx.intrablock.pop(0)
    if mid_residual is not None:
        sample = sample + mid_residual
    return sample, res_stack


def _up_blocks(unet, ctx: _PassInputs, sample, res_stack: tuple, first_up: int, split_block: int, layer: int,
               shallow: bool, forward_upsample_size: bool):
    """The up blocks from ``first_up``; returns (output, the deep feature a full pass computed or None)."""
    n_up, upsample_size, deep_feature = len(unet.up_blocks), None, None
    for i in range(first_up, n_up):
        block = unet.up_blocks[i]
        n_layers = len(block.resnets)
        start = layer if (i == split_block and shallow) else 0
        res = res_stack[-(n_layers - start) :]
        res_stack = res_stack[: -(n_layers - start)]
        if i != n_up - 1 and forward_upsample_size:
            upsample_size = res_stack[-1].shape[2:]
        if i == split_block and not shallow:
            if layer:
                with _layers(block, 0, layer, resample=False):
                    sample = _up(block, sample, ctx.emb, res, ctx.ehs, ctx.cross_attention_kwargs, upsample_size)
                res = res[: n_layers - layer]
                start = layer
            deep_feature = sample
        with _layers(block, start, n_layers, resample=True):
            sample = _up(block, sample, ctx.emb, res, ctx.ehs, ctx.cross_attention_kwargs, upsample_size)
    return sample, deep_feature


@dataclass
class DeepFeatureCache:
    """Deep features per adapter and a count of the UNet passes run (``full``, ``shallow`` per adapter)."""

    features: dict[str, torch.Tensor] = field(default_factory=dict)
    full: dict[str, int] = field(default_factory=dict)
    shallow: dict[str, int] = field(default_factory=dict)
    full_steps: dict[str, list[int]] = field(default_factory=dict)

    def run(self, name: str, step: int, full: bool, unet, sample, timestep, encoder_hidden_states, depth: int,
            layer: int = 0, **kwargs):
        """Run adapter ``name``'s UNet pass (full: refresh its cache; shallow: reuse it) split at (``depth``,
        ``layer``). Returns noise_pred."""
        if not full and name not in self.features:
            raise ValueError(f"adapter {name!r} has no cached deep feature at step {step}; the plan must start with a full pass")
        eps, deep = unet_split_forward(
            unet, sample, timestep, encoder_hidden_states, depth, None if full else self.features[name], layer=layer,
            **kwargs
        )
        if full:
            self.features[name] = deep
            self.full[name] = self.full.get(name, 0) + 1
            self.full_steps.setdefault(name, []).append(step)
        else:
            self.shallow[name] = self.shallow.get(name, 0) + 1
        return eps

    def counts(self) -> dict:
        """``{'full': total, 'shallow': total, 'per_adapter': {name: {'full', 'shallow', 'full_steps'}}}``."""
        names = sorted(set(self.full) | set(self.shallow))
        return {
            "full": sum(self.full.values()),
            "shallow": sum(self.shallow.values()),
            "per_adapter": {
                n: {"full": self.full.get(n, 0), "shallow": self.shallow.get(n, 0), "full_steps": self.full_steps.get(n, [])}
                for n in names
            },
        }
