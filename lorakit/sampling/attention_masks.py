"""Attention masks for delta composition (``lorakit sample --method delta --masks attention``).

Delta composition adds each adapter's difference from the base prediction, ``p_base + sum_i g_i (p_i - p_base)``,
everywhere in the latent. With masks each difference acts where its concept is: ``p_base + sum_i g_i M_i * (p_i -
p_base)``. The masks come from the base model's own cross-attention in the same step (its conditional pass, which
delta runs anyway): ``M_i`` is the attention the base pays to adapter i's comma tag of the prompt (``kwibbit frog``
in ``kwibbit frog, hattock hat, nocturo night background``), averaged over heads and over the cross-attention layers
at the two finest resolutions that have any, accumulated over the steps so far (as Prompt-to-Prompt's local blending
does), min-max normalised per image to [0, 1] (with ``--mask-threshold T``: 1 where >= T, else 0). The base knows
the class words (``frog``, ``hat``), so it knows where the frog and the hat go before any adapter draws them.

Adapters by kind (``--kinds`` or the files' ``lorakit.category``): a **style** acts everywhere (mask 1), a
**background** where no other adapter's concept is (``1 - max`` of the other masks); every other adapter (character,
object, unknown) by its tag's attention. Why: the base attends to ``night background`` on the objects, not around
them, so a background's own attention map does not say where the background is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.sampling.prompt_parts import adapter_triggers, tag_holds
from lorakit.sampling.regional import wrap_cross_attention

GLOBAL_KINDS = ("style",)
COMPLEMENT_KINDS = ("background",)


def tag_token_spans(tokenizer, prompt: str, triggers: list[str], base_prompt: str | None = None) -> list[list[int]]:
    """Token positions of the comma tag holding each trigger word, in the tokenizer's encoding (start token
    included) of ``base_prompt`` (default ``prompt``): the prompt of the base pass whose attention makes the masks,
    with the same comma tags as ``prompt`` (under ``--prompt-parts class-words`` the triggers are out of it).

    Raises:
        ValueError: a trigger is in no comma tag, or the tags' tokens do not line up with the prompt's encoding.
    """
    base_prompt = prompt if base_prompt is None else base_prompt
    tags = [t.strip() for t in prompt.split(",")]
    base_tags = [t.strip() for t in base_prompt.split(",")]
    if len(base_tags) != len(tags):
        raise ValueError(f"masks attention: {base_prompt!r} does not have the comma tags of {prompt!r}")
    ids = tokenizer(base_prompt).input_ids
    comma = tokenizer(",", add_special_tokens=False).input_ids
    spans, seq = [], ids[:1]
    for i, tag in enumerate(base_tags):
        tokens = tokenizer(tag, add_special_tokens=False).input_ids if tag else []
        spans.append(list(range(len(seq), len(seq) + len(tokens))))
        seq = seq + tokens + (comma if i < len(base_tags) - 1 else [])
    if seq != ids[:len(seq)]:
        raise ValueError(f"masks attention: the comma tags of {base_prompt!r} do not tokenize as the whole prompt does")
    out = []
    for word in triggers:
        hits = [s for tag, s in zip(tags, spans) if word and tag_holds(tag, word)]
        if not hits:
            raise ValueError(f"masks attention: trigger {word!r} is in no comma tag of the prompt {prompt!r}")
        out.append([i for s in hits for i in s if i < tokenizer.model_max_length])
    return out


class _Recorder:
    """Wraps a cross-attention processor; while ``masks.recording``, adds the conditional rows' attention
    probabilities (mean over heads, ``[B, h*w, L]``) to ``masks``."""

    def __init__(self, masks: AttentionMasks, inner):
        self.masks, self.inner = masks, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if self.masks.recording and encoder_hidden_states is not None:
            rows = hidden_states.shape[0] // 2 if self.masks.cfg else 0
            q = attn.head_to_batch_dim(attn.to_q(hidden_states[rows:]))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states[rows:]))
            probs = attn.get_attention_scores(q, k, None)
            self.masks.add(probs.view(-1, attn.heads, *probs.shape[1:]).mean(1))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


class AttentionMasks:
    """The masks of one ``generate`` call: records the base pass's cross-attention and applies the masks to each
    adapter pass's output.

    Args:
        spans: per adapter, the prompt's token positions of its tag (:func:`tag_token_spans`).
        kinds: per adapter, its kind or None (see the module docstring).
        latent_hw: the latent's (h, w); cfg: whether passes carry unconditional + conditional rows.
        threshold: None for soft masks; else a cell's mask is 1 where its scaled attention is >= threshold, else 0.
    """

    def __init__(self, spans: list[list[int]], kinds: list[str | None], latent_hw: tuple[int, int], cfg: bool,
                 threshold: float | None = None):
        self.spans, self.kinds, self.hw, self.cfg, self.threshold = spans, kinds, latent_hw, cfg, threshold
        self.recording = False
        self.total: torch.Tensor | None = None  # [B, N, h, w]: summed attention per adapter tag
        self._step: list[tuple[int, torch.Tensor]] = []  # (layer height, [B, N, h, w]) of this step's base pass
        self.base_out: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None

    def install(self, unet) -> dict:
        return wrap_cross_attention(unet, lambda name, proc: _Recorder(self, proc))

    def add(self, probs: torch.Tensor) -> None:
        """One cross-attention layer's probabilities ``[B, h*w, L]`` of this step's base pass."""
        height, width = self.hw
        h = int(round((probs.shape[1] * height / width) ** 0.5))
        per_tag = torch.stack([probs[..., s].sum(-1) for s in self.spans], 1)
        per_tag = per_tag.view(probs.shape[0], len(self.spans), h, probs.shape[1] // h)
        self._step.append((h, per_tag.float()))

    def _step_maps(self) -> torch.Tensor:
        """This step's ``[B, N, h, w]`` map per tag: the mean over the layers at the two finest resolutions that
        have cross-attention (coarser ones are too coarse to place a small concept), resized to the latent."""
        finest = max(h for h, _ in self._step)
        maps = [F.interpolate(m, self.hw, mode="bilinear", align_corners=False)
                for h, m in self._step if 2 * h >= finest]
        self._step = []
        return torch.stack(maps).mean(0)

    def before_pass(self, term) -> None:
        self.recording = not term.adapters and term.part is None

    def after_pass(self, term, out: torch.Tensor) -> torch.Tensor:
        """The pass output to combine: a base pass's own (its attention becomes this step's masks); an adapter
        pass's ``base + M_i * (out - base)``, so delta's sum becomes ``base + sum_i g_i M_i (p_i - base)``."""
        if self.recording:
            self.recording = False
            self.base_out = out
            self._update()
            return out
        if not term.adapters:
            return out
        (i,) = term.adapters
        m = self.masks[:, i:i + 1].to(out.dtype)
        if out.shape[0] != m.shape[0]:
            m = m.repeat(out.shape[0] // m.shape[0], 1, 1, 1)
        base = self.base_out if out.shape[0] == self.base_out.shape[0] else self.base_out[-out.shape[0]:]
        return base + m * (out - base)

    def _update(self) -> None:
        step = self._step_maps()
        self.total = step if self.total is None else self.total + step
        lo = self.total.amin((2, 3), keepdim=True)
        hi = self.total.amax((2, 3), keepdim=True)
        masks = (self.total - lo) / (hi - lo).clamp_min(1e-12)
        if self.threshold is not None:
            masks = (masks >= self.threshold).to(masks.dtype)
        local = [i for i, k in enumerate(self.kinds) if k not in GLOBAL_KINDS + COMPLEMENT_KINDS]
        cover = masks[:, local].amax(1) if local else torch.zeros_like(masks[:, 0])
        for i, kind in enumerate(self.kinds):
            if kind in GLOBAL_KINDS:
                masks[:, i] = 1.0
            elif kind in COMPLEMENT_KINDS:
                masks[:, i] = 1.0 - cover
        self.masks = masks


def attention_masks(pipe, settings, adapters, prompt: str, kinds: list[str | None] | None,
                    latent_hw: tuple[int, int], cfg: bool, base_prompt: str | None = None) -> AttentionMasks | None:
    """The masks of a run with ``settings.masks == "attention"`` (None otherwise). Triggers: ``settings.triggers``,
    else each file's ``lorakit.trigger``; kinds: ``kinds``, else each file's ``lorakit.category``; ``base_prompt``:
    the base pass's prompt, if not ``prompt``.

    Raises:
        ValueError: naming a missing trigger, a trigger in no comma tag, or a kinds list of the wrong length.
    """
    if settings.masks != "attention" or not adapters:
        return None
    triggers = adapter_triggers(settings, adapters)
    missing = [a.name for a, t in zip(adapters, triggers) if not t]
    if len(triggers) != len(adapters) or missing:
        raise ValueError(f"masks attention: one trigger per adapter is needed (--triggers or lorakit.trigger "
                         f"metadata); got {len(triggers)} for {len(adapters)}, none for {', '.join(missing) or '-'}")
    kinds = list(kinds) if kinds is not None else [getattr(a, "category", None) for a in adapters]
    if len(kinds) != len(adapters):
        raise ValueError(f"masks attention: got {len(kinds)} kinds for {len(adapters)} adapters")
    return AttentionMasks(tag_token_spans(pipe.tokenizer, prompt, triggers, base_prompt), kinds, latent_hw, cfg,
                          settings.mask_threshold)
