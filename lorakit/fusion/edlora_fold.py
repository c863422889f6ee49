"""Fold ED-LoRA concepts into plain words: a fused model without added tokens or per-layer routing.

A single-file checkpoint (A1111, ComfyUI, diffusers ``from_single_file``) holds no tokenizer and gives every
cross-attention layer the same text features, so an ED-LoRA concept's pseudo-words (one embedding per layer)
cannot be carried as they are. What can be carried are weights. Each concept gets a *stand-in*: plain text made
of tokens the base tokenizer already has (default: the concept's name; ``--concept-word NAME=TEXT``). Then in
every cross-attention layer ``l`` the ``to_k`` / ``to_v`` weight is re-solved so that, on the fusion's prompts
with the stand-in written where the pseudo-words were,

    W_l* = argmin_W  sum_i sum_rows ||W x_plain - (W0_l + a_i dW_i,l) x_i^(l)||^2  +  lam ||W - T_l||^2

``x_plain``: the text features of the stand-in prompt (the fused text encoder, no added token); ``x_i^(l)``:
what layer ``l`` reads for the same prompt with concept i's pseudo-words (layer-``l`` embeddings, fused text
encoder): the targets of gradient fusion's to_k/to_v stage. ``T_l`` is gradient fusion's own to_k/to_v weight
(what the unfolded model has); ``lam`` is chosen per layer on the held-out prompts as gradient fusion's ridge.
Rows are aligned token by token (:func:`row_pairs`): the tokens before and after the words match one to one,
the stand-in's tokens are paired with the pseudo-words proportionally (a shorter stand-in fits their average).
The same prompts with the concept words removed add rows whose target is the unfolded model's own output
(``T_l x``): without them the fold also moved the keys / values of prompts without any concept about as far as
the whole fusion had (measured on the toy base; docs/edlora.md).

Afterwards the pseudo-words are removed (tokenizers restored, embedding tables back to the base vocabulary,
ED-LoRA's hooks and per-layer processors taken off): an ordinary SD1 / SDXL pipeline that the stand-in words
drive. Limits: one weight per layer and token row reproduces the per-layer embeddings only on directions the
prompts cover; the stand-in words lose their base meaning; SDXL's pooled text embedding is not folded.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch

from lorakit.adapters.edlora import cross_attention_layers, layer_hidden_states
from lorakit.adapters.io import LoraModule
from lorakit.fusion.edlora_standins import (  # noqa: F401  (re-exported)
    StandIn, default_text, parse_concept_words, resolve_stand_ins, with_stand_ins,
)

_TOKENIZERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
# Relative ridges (lam / (trace(G) / in)) scored on the held-out prompts; inf = gradient fusion's weight itself.
FOLD_RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, float("inf"))
FOLD_RIDGE_WITHOUT_HELDOUT = 1e-2


def row_pairs(plain: list[int], pseudo: list[int], eos: int) -> tuple[list[int], list[int]]:
    """Pairs of token positions (plain prompt, pseudo-word prompt) whose features should give the same k/v.

    Both are padded id lists of one length ``S``. Tokens before and after the part that differs (up to and
    including the end token, then the padding, shifted by the length difference) pair one to one; the differing
    span (stand-in vs pseudo-words) pairs proportionally, each position of either side at least once.
    """
    S = len(plain)
    e1 = plain.index(eos) if eos in plain else S - 1
    e2 = pseudo.index(eos) if eos in pseudo else S - 1
    a = 0
    while a <= min(e1, e2) and plain[a] == pseudo[a]:
        a += 1
    b = 0
    while b < min(e1, e2) + 1 - a and plain[e1 - b] == pseudo[e2 - b]:
        b += 1
    m, n = e1 + 1 - a - b, e2 + 1 - a - b
    pairs = {(r, r) for r in range(a)}
    if m and n:
        pairs |= {(a + i, a + i * n // m) for i in range(m)} | {(a + j * m // n, a + j) for j in range(n)}
    pairs |= {(r, r + n - m) for r in range(a + m, S) if 0 <= r + n - m < S}
    pairs = sorted(pairs)
    return [p for p, _ in pairs], [q for _, q in pairs]


def plain_features(pipe, prompts: list[str]) -> torch.Tensor:
    """``[B, S, C]``: what every cross-attention layer reads for prompts without pseudo-words (as the pipeline's
    ``encode_prompt``: SD1 the last hidden state, SDXL both encoders' penultimate layers), ED-LoRA hooks off."""
    state = getattr(pipe, "_lorakit_edlora", None)
    hooks = list(state.hooks.values()) if state is not None else []
    comps = [(c, t) for c, t in _TOKENIZERS if getattr(pipe, c, None) is not None]
    for h in hooks:
        h.enabled = False
    try:
        parts = []
        with torch.no_grad():
            for comp, tok_name in comps:
                tok, enc = getattr(pipe, tok_name), getattr(pipe, comp)
                ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(enc.device)
                out = enc(ids, output_hidden_states=True)
                parts.append(out.hidden_states[-2] if len(comps) > 1 else out.last_hidden_state)
    finally:
        for h in hooks:
            h.enabled = True
    return torch.cat(parts, -1)


@dataclass
class _Rows:
    """Features of one split (float32; solved in float64 one layer at a time): plain inputs ``x [N, C]``; for its
    first ``M`` rows the inputs of the per-layer targets ``xt [L, M, C]`` and the concept that owns each
    ``owner [M]``; rows ``M:`` keep the unfolded model's keys / values (their target input is ``x`` itself)."""

    x: torch.Tensor
    xt: torch.Tensor
    owner: torch.Tensor


class ConceptFold:
    """Fold ED-LoRA concepts into the to_k / to_v weights of a gradient fusion (module docstring).

    ``prepare`` before :func:`lorakit.fusion.gradient.fuse_gradient` (checks the stand-ins, keeps the base
    tokenizers), ``apply`` after it (solves, writes the weights, removes the pseudo-words).
    """

    def __init__(self, stand_ins: list[StandIn], tokenizers: dict[str, object], preserve: bool = True):
        self.stand_ins = stand_ins
        self.tokenizers = tokenizers
        self.preserve = preserve
        self.keep_prompts = [""]  # classifier-free guidance's unconditional prompt: its keys / values stay

    @classmethod
    def prepare(cls, pipe, concepts, given=None) -> ConceptFold:
        stand_ins = resolve_stand_ins(pipe, concepts, given)
        toks = {t: copy.deepcopy(getattr(pipe, t)) for c, t in _TOKENIZERS if getattr(pipe, t, None) is not None}
        return cls(stand_ins, toks)

    def _subs(self, table: dict | None) -> list[tuple[str, str]]:
        renamed = table["concepts"] if table else []
        if len(renamed) != len(self.stand_ins):
            raise RuntimeError("the fused concept table does not match the stand-ins")
        for s, r in zip(self.stand_ins, renamed):
            s.words = list(r["words"])
        return [(" ".join(s.words), s.text) for s in self.stand_ins]

    def _rows(self, pipe, concepts, subs, split: str) -> _Rows | None:
        eos = pipe.tokenizer.eos_token_id
        xs, xts, owners, keeps = [], [], [], []
        for i, c in enumerate(concepts):
            prompts = c.prompts if split == "fit" else c.val_prompts
            if not prompts:
                continue
            plain = [with_stand_ins(p, subs) for p in prompts]
            x, xt = plain_features(pipe, plain), layer_hidden_states(pipe, prompts)
            ids_p = pipe.tokenizer(plain, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                   truncation=True).input_ids
            ids_t = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                   truncation=True).input_ids
            for b in range(len(prompts)):
                rp, rt = row_pairs(ids_p[b], ids_t[b], eos)
                xs.append(x[b, rp])
                xts.append(xt[:, b, rt])
                owners.append(torch.full((len(rp),), i))
            if self.preserve:
                keep = plain_features(pipe, [" ".join(with_stand_ins(p, [(w, "") for w, _ in subs]).split())
                                             for p in prompts]).reshape(-1, x.shape[-1])
                keeps.append(keep)
        if not xs:
            return None
        if self.preserve and self.keep_prompts:
            keeps.append(plain_features(pipe, list(self.keep_prompts)).reshape(-1, xs[0].shape[-1]))
        return _Rows(torch.cat(xs + keeps).float(), torch.cat(xts, 1).float(), torch.cat(owners))

    def apply(self, pipe, concepts, out: dict, ridge: float | str = "auto") -> dict:
        """Fold into ``pipe`` (after gradient fusion) and return ``out`` with the to_k / to_v modules replaced by
        the folded deltas (full rank: ``up = W* - W0``, ``down = I``), no ED-LoRA embeddings or metadata, and a
        ``fold`` report (stand-ins, per-layer ridge and held-out error relative to the unfolded weight)."""
        subs = self._subs(out.get("edlora"))
        fit, val = self._rows(pipe, concepts, subs, "fit"), self._rows(pipe, concepts, subs, "val")
        if fit is None:
            raise ValueError("--fold-concepts: the fusion has no prompts to fold the concepts on")
        probs = out.get("problems", {})
        modules = dict(out["modules"])
        layers = {}
        for layer, path in enumerate(cross_attention_layers(pipe.unet)):
            attn = pipe.unet.get_submodule(path)
            for leaf in ("to_k", "to_v"):
                key = f"unet.{path}.{leaf}"
                lin = getattr(attn, leaf)
                current = lin.weight.detach().double()
                w0 = current - _delta(modules.get(key), current)
                W, rep = _solve(fit, val, layer, w0, probs.get(key), current, ridge, key)
                with torch.no_grad():
                    lin.weight.copy_(W.to(lin.weight))
                modules[key] = LoraModule(down=torch.eye(W.shape[1]), up=(W - w0).float().cpu(),
                                          alpha=float(W.shape[1]))
                layers[key] = rep
        remove_pseudo_words(pipe, self.tokenizers)
        held = [r["heldout_vs_unfolded"] for r in layers.values() if r.get("heldout_vs_unfolded") is not None]
        report = {"stand_ins": {s.name: {"text": s.text, "pseudo_words": " ".join(s.words)} for s in self.stand_ins},
                  "layers": layers, "rows": {"fit": int(fit.x.shape[0]), "heldout": int(val.x.shape[0]) if val else 0},
                  "mean_heldout_vs_unfolded": sum(held) / len(held) if held else None}
        meta = {"lorakit.folded_concepts": json.dumps({s.name: s.text for s in self.stand_ins}),
                "lorakit.trigger": ", ".join(s.text for s in self.stand_ins)}
        return {**out, "modules": modules, "extra": {}, "metadata": meta, "edlora": None, "fold": report}


def _delta(mod: LoraModule | None, like: torch.Tensor) -> torch.Tensor:
    if mod is None:
        return torch.zeros_like(like)
    return (mod.up.double() @ mod.down.double()).to(like.device) * mod.scale


def _targets(rows: _Rows, layer: int, w0: torch.Tensor, prob, current: torch.Tensor) -> torch.Tensor:
    """``(W0 + a_i dW_i) x_i^(l)`` for every concept row (concept i owns it), then ``current x`` for the rows
    that keep the unfolded model's output."""
    dev = w0.device
    xt = rows.xt[layer].to(dev, torch.float64)
    y = xt @ w0.T
    if prob is not None:
        for i, up in prob.ups.items():
            mine = (rows.owner == i).to(dev)
            if mine.any():
                y[mine] += (xt[mine] @ prob.downs[i].to(dev).T) @ up.to(dev).T
    keep = rows.x[xt.shape[0] :].to(dev, torch.float64)
    return torch.cat([y, keep @ current.T])


def _fit(x, y, target, rel):
    if rel == float("inf"):
        return target.clone()
    G = x.T @ x
    lam = rel * float(G.diagonal().sum()) / G.shape[0]
    A = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(A, (y.T @ x + lam * target).T).T


def _err(W, x, y) -> float:
    return float(((x @ W.T - y) ** 2).sum())


def _solve(fit: _Rows, val: _Rows | None, layer: int, w0, prob, current, ridge, key) -> tuple[torch.Tensor, dict]:
    dev = current.device
    x, y = fit.x.to(dev, torch.float64), _targets(fit, layer, w0, prob, current)
    rep = {}
    if ridge == "auto" and val is not None:
        xv, yv = val.x.to(dev, torch.float64), _targets(val, layer, w0, prob, current)
        scores = [(_err(_fit(x, y, current, r), xv, yv), r) for r in FOLD_RIDGES]
        best, rel = min(scores, key=lambda t: (t[0], -t[1]))
        unfolded = _err(current, xv, yv)
        rep.update(heldout_vs_unfolded=best / unfolded if unfolded > 0 else None)
        x, y = torch.cat([x, xv]), torch.cat([y, yv])
    else:
        rel = FOLD_RIDGE_WITHOUT_HELDOUT if ridge == "auto" else float(ridge)
    W = _fit(x, y, current, rel)
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"--fold-concepts: layer {key}: the fold gave NaN or inf (check the inputs)")
    base = _err(current, x, y)
    rep.update(ridge="inf" if rel == float("inf") else rel, fit_vs_unfolded=_err(W, x, y) / base if base > 0 else None)
    return W, rep


def remove_pseudo_words(pipe, tokenizers: dict[str, object]) -> None:
    """Undo the ED-LoRA loading of a pipeline (keeping its weights): the base ``tokenizers`` back, each text
    encoder's embedding table cut to their vocabulary, the text hooks and per-layer processors removed."""
    state = getattr(pipe, "_lorakit_edlora", None)
    if state is not None:
        for hook in state.hooks.values():
            for h in hook.handles:
                h.remove()
        for path in state.layers:
            attn = pipe.unet.get_submodule(path)
            attn.set_processor(getattr(attn.processor, "inner", attn.processor))
        del pipe._lorakit_edlora
    for comp, tok_name in _TOKENIZERS:
        enc, tok = getattr(pipe, comp, None), tokenizers.get(tok_name)
        if enc is None or tok is None:
            continue
        if enc.get_input_embeddings().weight.shape[0] > len(tok):
            enc.resize_token_embeddings(len(tok), mean_resizing=False)
        pipe.register_modules(**{tok_name: tok})
