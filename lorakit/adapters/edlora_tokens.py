"""ED-LoRA's layer-wise text side: one token per pseudo-word and cross-attention layer, the batched layer-wise
text encoding, the packed ``[B, S, L * D]`` features and the attention processors that route each layer its copy
(the scheme is described in :mod:`lorakit.adapters.edlora`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


# ------------------------------------------------------------------------------------------------ layers, tokens


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Module paths of the UNet's cross-attention layers (``...attn2``), ordered down -> mid -> up.

    (``named_modules`` lists ``up_blocks`` before ``mid_block``; the method's layer order is down, mid, up.)
    """
    names = [n for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False) and n.endswith("attn2")]
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    order = {n: i for i, n in enumerate(names)}
    names.sort(key=lambda n: (rank.get(n.split(".")[0], 3), order[n]))
    if not names:
        raise ValueError("the UNet has no cross-attention layer (attn2): ED-LoRA needs a text-conditioned UNet")
    return names


def layer_token_names(word: str, n_layers: int) -> list[str]:
    """The ``n_layers`` token strings of a pseudo-word: ``[word, word@1, ..., word@{n-1}]``.

    (``@`` and not ``_``: diffusers' textual-inversion prompt conversion would expand ``word_1, word_2, ...``.)
    """
    return [word] + [f"{word}@{l}" for l in range(1, n_layers)]


def _check_word(word: str) -> None:
    if not word or any(c.isspace() for c in word) or "@" in word or "," in word:
        raise ValueError(f"pseudo-word {word!r} must be one non-empty word without spaces, commas or '@' (e.g. '<cat1>')")


def add_concept_tokens(
    tokenizer, text_encoder: nn.Module, words: list[str], n_layers: int, embeddings: dict[str, torch.Tensor] | None = None
) -> dict[int, list[int]]:
    """Add the layer tokens of ``words`` to a tokenizer and rows for them to its text encoder.

    Args:
        tokenizer: the CLIP tokenizer paired with ``text_encoder``.
        text_encoder: a transformers CLIP text model; its input embedding grows to ``len(tokenizer)`` rows.
        words: pseudo-words, each becomes ``n_layers`` tokens (:func:`layer_token_names`).
        embeddings: ``{word: [n_layers, D]}`` rows to write; words missing here keep the resize's init.
    Returns:
        token map ``{id of word: [id of layer 0, ..., id of layer L-1]}`` (layer 0's id is the word's own id).
    Raises:
        ValueError if a token already exists in the tokenizer (naming it) or a tensor has the wrong shape.
    """
    names = [t for w in words for t in layer_token_names(w, n_layers)]
    for w in words:
        _check_word(w)
    vocab = tokenizer.get_vocab()
    taken = [t for t in names if t in vocab or t.lower() in vocab]
    if taken:
        raise ValueError(f"tokens already in the tokenizer: {taken[:4]}; choose new pseudo-words")
    added = tokenizer.add_tokens(names)
    if added != len(names):
        raise ValueError(f"tokenizer added {added} of {len(names)} tokens {names[:3]}...; some already exist")
    emb = text_encoder.get_input_embeddings()
    if len(tokenizer) > emb.weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are written below
        emb = text_encoder.get_input_embeddings()
    token_map = {}
    for w in words:
        ids = tokenizer.convert_tokens_to_ids(layer_token_names(w, n_layers))
        token_map[ids[0]] = ids
        if embeddings is not None and w in embeddings:
            rows = embeddings[w]
            if tuple(rows.shape) != (n_layers, emb.weight.shape[1]):
                raise ValueError(
                    f"embedding of {w!r} has shape {tuple(rows.shape)}; the text encoder needs ({n_layers}, {emb.weight.shape[1]})"
                )
            with torch.no_grad():
                emb.weight[ids] = rows.to(emb.weight)
    return token_map


def layer_variant_ids(input_ids: torch.Tensor, token_map: dict[int, list[int]], n_layers: int) -> torch.Tensor:
    """The ``L`` prompt copies: copy ``l`` has every pseudo-word id replaced by its layer-``l`` token id.

    Args:
        input_ids: ``[B, S]`` token ids.
        token_map: ``{word id: [L layer token ids]}`` (from :func:`add_concept_tokens`).
    Returns:
        ``[L, B, S]`` ids (copy-major).
    """
    out = input_ids.unsqueeze(0).repeat(n_layers, 1, 1)
    for word_id, ids in token_map.items():
        hit = input_ids == word_id
        if hit.any():
            layer_ids = torch.as_tensor(ids, device=input_ids.device, dtype=input_ids.dtype)
            out = torch.where(hit.unsqueeze(0), layer_ids.view(-1, 1, 1), out)
    return out


def first_eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the first end-of-text token per row of ``input_ids [B, S]`` (the last position if none): ``[B]``."""
    hit = input_ids == eos_token_id
    pos = hit.int().argmax(dim=-1)
    return torch.where(hit.any(dim=-1), pos, torch.full_like(pos, input_ids.shape[-1] - 1))


@dataclass
class LayerwiseText:
    """Output of :func:`encode_layerwise` for one text encoder.

    ``hidden``: last hidden state per copy ``[L, B, S, D]``; ``hidden_states``: every layer's output per copy
    (tuple of ``[L, B, S, D]``, only when asked for); ``pooled``: mean over copies of the (projected, for
    ``CLIPTextModelWithProjection``) end-of-text features ``[B, P]``.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


def encode_layerwise(
    text_encoder: nn.Module,
    input_ids: torch.Tensor,
    token_map: dict[int, list[int]],
    n_layers: int,
    eos_token_id: int,
    output_hidden_states: bool = False,
) -> LayerwiseText:
    """Encode the ``L`` layer copies of a prompt batch in one text-encoder forward.

    Args:
        text_encoder: CLIP text model (with or without projection, peft LoRA allowed).
        input_ids: ``[B, S]``; token_map / n_layers: see :func:`layer_variant_ids`.
        eos_token_id: the tokenizer's end-of-text id (the pooled features are read at its first position).
    Returns:
        :class:`LayerwiseText` with ``hidden [L, B, S, D]`` and ``pooled [B, P]``.
    """
    B, S = input_ids.shape
    ids = layer_variant_ids(input_ids, token_map, n_layers).reshape(n_layers * B, S)
    out = text_encoder(ids, output_hidden_states=output_hidden_states)
    return _layerwise_output(text_encoder, out, input_ids, n_layers, eos_token_id)


def _layerwise_output(text_encoder, out, input_ids, n_layers, eos_token_id) -> LayerwiseText:
    B, S = input_ids.shape
    hidden = out.last_hidden_state.reshape(n_layers, B, S, -1)
    pos = first_eos_positions(input_ids, eos_token_id)
    pooled = hidden[:, torch.arange(B, device=hidden.device), pos.to(hidden.device)].mean(0)
    proj = getattr(getattr(text_encoder, "module", text_encoder), "text_projection", None)  # DDP-wrapped or not
    if proj is not None:
        pooled = proj(pooled.to(proj.weight.dtype))
    states = None
    if getattr(out, "hidden_states", None) is not None:
        states = tuple(h.reshape(n_layers, B, S, -1) for h in out.hidden_states)
    return LayerwiseText(hidden=hidden, pooled=pooled, hidden_states=states)


def pack_layers(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Pack per-layer features of one or more text encoders into UNet ``encoder_hidden_states``.

    Args:
        per_layer: one ``[L, B, S, D_e]`` tensor per text encoder (SDXL: te1 then te2).
    Returns:
        ``[B, S, L * sum(D_e)]``, laid out ``[enc 1: layer 0..L-1 | enc 2: layer 0..L-1]``.
    """
    parts = [t.permute(1, 2, 0, 3).reshape(t.shape[1], t.shape[2], -1) for t in per_layer]
    return torch.cat(parts, dim=-1)


def _layer_slice(packed: torch.Tensor, layer: int, n_layers: int, dims: tuple[int, ...]) -> torch.Tensor:
    parts, start = [], 0
    for d in dims:
        parts.append(packed[..., start + layer * d : start + (layer + 1) * d])
        start += n_layers * d
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def unpack_layers(packed: torch.Tensor, n_layers: int, dims: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_layers`: ``[B, S, L * sum(dims)]`` -> ``[L, B, S, sum(dims)]``."""
    if packed.shape[-1] != n_layers * sum(dims):
        raise ValueError(f"packed features have {packed.shape[-1]} channels; expected {n_layers} x {sum(dims)}")
    return torch.stack([_layer_slice(packed, l, n_layers, dims) for l in range(n_layers)])


# ------------------------------------------------------------------------------------------- attention routing


class LayerwiseAttnProcessor:
    """Cross-attention processor of layer ``layer``: reads copy ``layer`` of packed text features.

    ``encoder_hidden_states`` of ``L * sum(dims)`` channels is cut to this layer's ``[B, S, sum(dims)]`` and
    handed to ``inner`` (the processor that was installed before); ``sum(dims)`` channels pass through as they
    are. Any other width is an error naming the layer.
    """

    def __init__(self, layer: int, n_layers: int, dims: tuple[int, ...], inner, name: str = ""):
        self.layer, self.n_layers, self.dims, self.inner, self.name = layer, n_layers, tuple(dims), inner, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            width, plain = encoder_hidden_states.shape[-1], sum(self.dims)
            if width == self.n_layers * plain and self.n_layers > 1:
                encoder_hidden_states = _layer_slice(encoder_hidden_states, self.layer, self.n_layers, self.dims)
            elif width != plain:
                raise ValueError(
                    f"{self.name}: text features have {width} channels; expected {plain} or "
                    f"{self.n_layers} layers x {plain} (packed ED-LoRA features)"
                )
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def install_layerwise_processors(unet: nn.Module, dims: tuple[int, ...]) -> list[str]:
    """Put a :class:`LayerwiseAttnProcessor` on every cross-attention layer of ``unet`` (idempotent).

    Args:
        dims: text-feature width per text encoder (SD1: ``(768,)``; SDXL: ``(768, 1280)``); must sum to the UNet's
            ``cross_attention_dim``.
    Returns:
        the cross-attention layer paths in layer order (see :func:`cross_attention_layers`).
    """
    layers = cross_attention_layers(unet)
    want = unet.config.cross_attention_dim
    if sum(dims) != want:
        raise ValueError(f"text encoder widths {dims} sum to {sum(dims)}, the UNet's cross_attention_dim is {want}")
    for i, name in enumerate(layers):
        attn = unet.get_submodule(name)
        proc = attn.processor
        inner = proc.inner if isinstance(proc, LayerwiseAttnProcessor) else proc
        attn.set_processor(LayerwiseAttnProcessor(i, len(layers), dims, inner, name))
    return layers


# --------------------------------------------------------------------------------------------- training rows


class TrainableTokenRows(nn.Module):
    """A token embedding whose rows from ``first_id`` on are a separate parameter (only they train).

    ``forward(ids [..]) -> [.., D]``: ids below ``first_id`` read the frozen base table, ids ``>= first_id``
    read ``rows[id - first_id]``. Install with ``text_encoder.set_input_embeddings(module)``; :meth:`merged`
    gives a plain ``nn.Embedding`` with the rows written back.
    """

    def __init__(self, base: nn.Embedding, first_id: int, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.first_id = int(first_id)
        self.rows = nn.Parameter(rows.detach().clone().to(base.weight))

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads for dtype / size
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first_id
        base = self.base(ids.clamp(max=self.base.num_embeddings - 1))
        if not bool(new.any()):
            return base + 0.0 * self.rows.sum()  # keep the parameter in the graph (DDP needs every grad)
        extra = self.rows[(ids - self.first_id).clamp(min=0, max=self.rows.shape[0] - 1)].to(base.dtype)
        return torch.where(new.unsqueeze(-1), extra, base)

    def merged(self) -> nn.Embedding:
        n = max(self.base.num_embeddings, self.first_id + self.rows.shape[0])
        emb = nn.Embedding(n, self.base.embedding_dim).to(self.base.weight)
        with torch.no_grad():
            emb.weight[: self.base.num_embeddings] = self.base.weight
            emb.weight[self.first_id : self.first_id + self.rows.shape[0]] = self.rows
        return emb
