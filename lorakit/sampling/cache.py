"""Per-LoRA DeepCache-style deep-feature caching on diffusers' ``UNet2DConditionModel``.

A UNet pass is split at depth ``d`` (1 <= d < number of down blocks):

* the **shallow path** is ``conv_in``, the time embedding, ``down_blocks[:d]``, ``up_blocks[-d:]``,
  ``conv_norm_out`` and ``conv_out``;
* the **deep feature** is the input of ``up_blocks[-d]`` (the output of ``up_blocks[-d-1]``), i.e. everything
  the deep blocks (``down_blocks[d:]``, the mid block, ``up_blocks[:-d]``) compute.

:func:`unet_split_forward` runs the pieces of the UNet itself. A full pass equals ``unet(...)`` exactly (tested)
and also returns the deep feature; a shallow pass takes a cached deep feature instead of computing it.

:class:`DeepFeatureCache` keeps one deep feature per key (CMLoRA: per adapter) and counts full and shallow passes;
which pass is full comes from :func:`lorakit.sampling.schedules.cmlora_plan`.

The split at depth 1 is the one of the CMLoRA authors' code (DeepCache's ``cache_layer_id=0, cache_block_id=1`` on
SD1: the cached feature is the input of the last up block), so a shallow pass gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def max_cache_depth(unet) -> int:
    """The deepest split that still leaves deep blocks to cache: ``len(unet.down_blocks) - 1``."""
    return len(unet.down_blocks) - 1


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


def _down(block, sample, emb, ehs, cross_attention_kwargs, intrablock: list | None = None):
    """One down block as ``UNet2DConditionModel.forward`` runs it, with the T2I-Adapter residuals ``intrablock``
    (popped: inside a cross-attention block, added in place to any other block's output)."""
    if getattr(block, "has_cross_attention", False):
        extra = {"additional_residuals": intrablock.pop(0)} if intrablock else {}
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs, cross_attention_kwargs=cross_attention_kwargs,
                     **extra)
    sample, res = block(hidden_states=sample, temb=emb)
    if intrablock:
        sample += intrablock.pop(0)  # in place, as diffusers does: a skip that is this same tensor gets it too
    return sample, res


def _without_downsampler(block, sample, emb, ehs, cross_attention_kwargs, intrablock: list | None = None):
    downsamplers = block.downsamplers
    block.downsamplers = None
    try:
        return _down(block, sample, emb, ehs, cross_attention_kwargs, intrablock)
    finally:
        block.downsamplers = downsamplers


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
        deep_feature: the cached input of ``up_blocks[-d]`` ``[B, C_d, H_d, W_d]`` from an earlier full pass with
            the same batch layout; None runs the full UNet.
        down_intrablock_additional_residuals: T2I-Adapter features, one per down block (diffusers' meaning).
        down_block_additional_residuals, mid_block_additional_residual: ControlNet residuals, added to the skip
            connections and the mid block's output (a shallow pass uses the skips it needs).
    Returns:
        ``(noise_pred [B, C, H, W], deep_feature)``; the deep feature is the one computed (full pass) or the one
        given (shallow pass).
    Raises:
        ValueError for a depth outside the range or a deep feature whose batch does not match.
    """
    n_down = len(unet.down_blocks)
    if not 1 <= depth <= n_down - 1:
        raise ValueError(f"cache depth {depth} out of range: this UNet has {n_down} down blocks, so 1..{n_down - 1}")
    if deep_feature is not None and deep_feature.shape[0] != sample.shape[0]:
        raise ValueError(f"cached deep feature has batch {deep_feature.shape[0]}, the sample has {sample.shape[0]}")
    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb, ehs = _embeddings(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond, class_labels)
    sample = unet.conv_in(sample)
    res_stack: tuple = (sample,)
    shallow = deep_feature is not None
    down_blocks = unet.down_blocks[:depth] if shallow else unet.down_blocks
    intrablock = list(down_intrablock_additional_residuals) if down_intrablock_additional_residuals is not None else None
    for k, block in enumerate(down_blocks):
        if shallow and k == depth - 1:
            # The last shallow block's downsampled output only feeds the deep blocks: skip computing it.
            sample, res = _without_downsampler(block, sample, emb, ehs, cross_attention_kwargs, intrablock)
        else:
            sample, res = _down(block, sample, emb, ehs, cross_attention_kwargs, intrablock)
        res_stack += res
    if down_block_additional_residuals is not None:
        # zip stops at the shorter: a shallow pass has only the prefix of the skips its up blocks need
        res_stack = tuple(r + a for r, a in zip(res_stack, down_block_additional_residuals))
    n_up = len(unet.up_blocks)
    if shallow:
        # The shallow up blocks consume a prefix of the full residual stack (the deeper blocks' part is on top).
        needed = sum(len(b.resnets) for b in unet.up_blocks[n_up - depth :])
        res_stack = res_stack[:needed]
        sample = deep_feature
        first_up = n_up - depth
    else:
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=ehs, cross_attention_kwargs=cross_attention_kwargs)
            else:
                sample = unet.mid_block(sample, emb)
            if intrablock and sample.shape == intrablock[0].shape:  # T2I-Adapter-XL's mid feature
                sample += intrablock.pop(0)
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual
        first_up = 0
    upsample_size = None
    for i in range(first_up, n_up):
        block = unet.up_blocks[i]
        if i == n_up - depth and not shallow:
            deep_feature = sample
        res = res_stack[-len(block.resnets) :]
        res_stack = res_stack[: -len(block.resnets)]
        if i != n_up - 1 and forward_upsample_size:
            upsample_size = res_stack[-1].shape[2:]
        sample = _up(block, sample, emb, res, ehs, cross_attention_kwargs, upsample_size)
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample), deep_feature


@dataclass
class DeepFeatureCache:
    """Deep features per adapter and a count of the UNet passes run (``full``, ``shallow`` per adapter)."""

    features: dict[str, torch.Tensor] = field(default_factory=dict)
    full: dict[str, int] = field(default_factory=dict)
    shallow: dict[str, int] = field(default_factory=dict)
    full_steps: dict[str, list[int]] = field(default_factory=dict)

    def run(self, name: str, step: int, full: bool, unet, sample, timestep, encoder_hidden_states, depth: int, **kwargs):
        """Run adapter ``name``'s UNet pass (full: refresh its cache; shallow: reuse it). Returns noise_pred."""
        if not full and name not in self.features:
            raise ValueError(f"adapter {name!r} has no cached deep feature at step {step}; the plan must start with a full pass")
        eps, deep = unet_split_forward(
            unet, sample, timestep, encoder_hidden_states, depth, None if full else self.features[name], **kwargs
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
