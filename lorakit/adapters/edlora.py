"""ED-LoRA (Mix-of-Show): layer-wise concept embeddings, per-layer cross-attention routing, file format, loading.

A concept is two pseudo-words (``<cat1> <cat2>``). Each pseudo-word owns one token per UNet cross-attention
layer (``L`` layers in the order down -> mid -> up; 16 on SD1.5, counted from the model by
:func:`cross_attention_layers`). The pseudo-word's own token carries layer 0; ``<cat1>@1 .. <cat1>@{L-1}``
carry layers 1..L-1, so a concept adds ``2 * L`` tokens to each tokenizer / text encoder.

How a prompt is encoded
    Prompt copy ``l`` is the prompt with every pseudo-word replaced by its layer-``l`` token
    (:func:`layer_variant_ids`). All ``L`` copies go through the text encoder in ONE batched forward
    (:func:`encode_layerwise`). The ``L`` feature tensors are *packed* along the channel axis,
    ``[B, S, L * D]`` (:func:`pack_layers`; SDXL: ``[te1 layer 0..L-1 | te2 layer 0..L-1]``), and handed to the
    UNet as ``encoder_hidden_states``. Every cross-attention layer runs a :class:`LayerwiseAttnProcessor` (a
    diffusers attention processor) that cuts out its own copy ``[B, S, D]`` and calls the processor that was
    there before. Plain ``[B, S, D]`` features pass through unchanged, so a UNet with these processors still
    works for ordinary prompts.

    In an ordinary pipeline call the packing is done by forward hooks (``register_forward_pre_hook`` /
    ``register_forward_hook``, torch's public API) on each text encoder, installed by :func:`load_edlora`:
    the pre-hook expands ``input_ids [B, S]`` into the ``L`` copies ``[L*B, S]`` (a batch without any pseudo-word,
    e.g. the negative prompt, is encoded once and tiled: its copies are identical), the hook packs the outputs
    (``last_hidden_state`` and every ``hidden_states`` entry become ``[B, S, L*D]``; the pooled output /
    ``text_embeds`` becomes the mean over the copies of the features at the first end-of-text token, so SDXL's
    pooled embedding stays ``[B, P]``). Known limit: diffusers' ``clip_skip`` applies the text encoder's final
    LayerNorm to packed features and fails; use :func:`layer_hidden_states` (which accepts ``clip_skip``) and pass
    ``prompt_embeds`` instead.

File format (one ``.safetensors``, DESIGN.md; ``lorakit.kind = edlora``)
    * LoRA weights under kohya names (``lora_unet_*``, ``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*``), rank 4 by
      default, on text-encoder q/k/v/out projections and UNet attention to_q/to_k/to_v/to_out.0.
    * ``edlora_emb.<component>.<pseudo-word>`` -> float tensor ``[L, D]``: row ``l`` is the pseudo-word's
      layer-``l`` embedding in that text encoder (``component`` = ``text_encoder`` or ``text_encoder_2``).
    * metadata ``lorakit.edlora`` (JSON)::

        {"version": 1, "n_layers": L, "layers": [cross-attention module paths, down -> mid -> up],
         "components": {"text_encoder": D1, ...},
         "concepts": [{"name": "cat", "words": ["<cat1>", "<cat2>"], "init_word": "cat",
                       "tokens": {"<cat1>": ["<cat1>", "<cat1>@1", ...], "<cat2>": [...]}}]}

      and ``lorakit.trigger`` = ``"<cat1> <cat2>"``.
    ``diffusers.load_lora_weights(path)`` does not read such a file: it only recognises kohya files whose keys
    ALL start with ``lora_``, and with the embedding keys present it silently loads nothing. Load the LoRA part
    alone with ``pipe.load_lora_weights({k: v for k, v in load_file(path).items() if k.startswith("lora_")})``,
    or (with the embeddings) with :func:`load_edlora`.

Public functions
    :func:`load_edlora` (pipeline + file -> prompts with the pseudo-words work), :func:`layer_hidden_states`
    (per-layer features ``[L, B, S, D]`` of a prompt on a pipeline with ED-LoRAs loaded), :func:`loaded_token_maps`,
    :func:`cross_attention_layers`, :func:`layer_token_names`, :func:`add_concept_tokens`,
    :func:`layer_variant_ids`, :func:`encode_layerwise`, :func:`pack_layers` / :func:`unpack_layers`,
    :func:`install_layerwise_processors`, :class:`TrainableTokenRows` (training: only the new rows are
    parameters), :func:`edlora_adapter` / :func:`read_edlora` (in-memory adapter <-> file contents).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.io import Adapter, AdapterError, adapter_metadata, load_adapter

log = logging.getLogger(__name__)

EMB_PREFIX = "edlora_emb."
META_KEY = "lorakit.edlora"
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


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


# ------------------------------------------------------------------------------------------- file <-> memory


@dataclass
class EDLoRAConcept:
    """One concept of an ED-LoRA: its name, pseudo-words, class word and layer tokens per word."""

    name: str
    words: list[str]
    init_word: str = ""
    tokens: dict[str, list[str]] = field(default_factory=dict)


def edlora_adapter(
    modules: dict,
    embeddings: dict[str, dict[str, torch.Tensor]],
    concepts: list[EDLoRAConcept],
    layers: list[str],
    arch: str,
    config: dict | None = None,
    rank: int | None = None,
    alpha: float | None = None,
) -> Adapter:
    """Build the in-memory :class:`Adapter` of an ED-LoRA (save it with ``io.save_adapter``).

    Args:
        modules: LoRA modules ``{component.path: LoraModule}`` (e.g. from ``io.from_peft``).
        embeddings: ``{component: {word: [L, D]}}``.
        concepts: the concepts and their words; layers: cross-attention layer paths (L of them).
    """
    extra, dims = {}, {}
    for comp, table in embeddings.items():
        for word, rows in table.items():
            if rows.shape[0] != len(layers):
                raise ValueError(f"embedding {comp}/{word} has {rows.shape[0]} rows, expected {len(layers)} layers")
            extra[f"{EMB_PREFIX}{comp}.{word}"] = rows.detach().float().cpu().contiguous()
            dims[comp] = int(rows.shape[1])
    for c in concepts:
        c.tokens = {w: layer_token_names(w, len(layers)) for w in c.words}
    info = {
        "version": 1,
        "n_layers": len(layers),
        "layers": layers,
        "components": dims,
        "concepts": [c.__dict__ for c in concepts],
    }
    trigger = " ".join(w for c in concepts for w in c.words)
    meta = adapter_metadata(arch, "edlora", trigger=trigger, config=config, rank=rank, alpha=alpha)
    meta[META_KEY] = json.dumps(info)
    return Adapter(modules=dict(modules), metadata=meta, extra=extra)


def read_edlora(adapter: Adapter, source: str | os.PathLike = "") -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """The concept table (parsed ``lorakit.edlora`` JSON) and embeddings ``{component: {word: [L, D]}}`` of an adapter.

    Raises:
        AdapterError naming ``source`` when the metadata is missing / broken or an embedding is missing.
    """
    where = f"{source}: " if source else ""
    raw = adapter.metadata.get(META_KEY)
    if raw is None:
        raise AdapterError(f"{where}not an ED-LoRA file (no {META_KEY!r} metadata; lorakit.kind={adapter.kind!r})")
    try:
        info = json.loads(raw)
        n_layers, comps, concepts = int(info["n_layers"]), dict(info["components"]), list(info["concepts"])
    except (ValueError, KeyError, TypeError) as err:
        raise AdapterError(f"{where}metadata {META_KEY!r} is not valid ED-LoRA JSON: {err}") from err
    table: dict[str, dict[str, torch.Tensor]] = {c: {} for c in comps}
    for c in concepts:
        for word in c["words"]:
            for comp in comps:
                key = f"{EMB_PREFIX}{comp}.{word}"
                if key not in adapter.extra:
                    raise AdapterError(f"{where}missing embedding tensor {key!r}")
                rows = adapter.extra[key]
                if rows.dim() != 2 or rows.shape[0] != n_layers:
                    raise AdapterError(f"{where}{key} has shape {tuple(rows.shape)}, expected ({n_layers}, D)")
                table[comp][word] = rows
    return info, table


# ------------------------------------------------------------------------------------------ pipeline loading


class _TextHook:
    """Forward hooks on one text encoder: expand ``input_ids`` into layer copies, pack the outputs."""

    def __init__(self, eos_token_id: int, n_layers: int):
        self.eos_token_id, self.n_layers = eos_token_id, n_layers
        self.token_map: dict[int, list[int]] = {}
        self.enabled = True
        self._ids: list[tuple[torch.Tensor, bool] | None] = []
        self.handles: list = []

    def pre(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if not self.enabled or ids is None or ids.dim() != 2:
            self._ids.append(None)
            return None
        # A batch without any pseudo-word has L identical copies: encode it once and tile it afterwards.
        expand = any(bool((ids == word_id).any()) for word_id in self.token_map)
        self._ids.append((ids, expand))
        if not expand:
            return None
        B, S = ids.shape
        new_ids = layer_variant_ids(ids, self.token_map, self.n_layers).reshape(self.n_layers * B, S)
        kwargs = dict(kwargs)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"].repeat(self.n_layers, 1)
        if args:
            return (new_ids, *args[1:]), kwargs
        kwargs["input_ids"] = new_ids
        return args, kwargs

    def post(self, module, args, kwargs, out):
        entry = self._ids.pop()
        if entry is None:
            return None
        ids, expand = entry
        L = self.n_layers
        lw = _layerwise_output(module, out, ids, L if expand else 1, self.eos_token_id)

        def tiled(x):  # [L or 1, B, S, D] -> [L, B, S, D]
            return x if expand else x.expand(L, *x.shape[1:])

        new = {}
        for key, value in out.items():
            if key == "last_hidden_state":
                new[key] = pack_layers([tiled(lw.hidden)])
            elif key == "hidden_states" and value is not None:
                new[key] = tuple(pack_layers([tiled(h)]) for h in lw.hidden_states)
            elif key in ("pooler_output", "text_embeds"):
                if key == "pooler_output" and getattr(module, "text_projection", None) is not None:
                    B = ids.shape[0]
                    pos = first_eos_positions(ids, self.eos_token_id).to(lw.hidden.device)
                    new[key] = lw.hidden[:, torch.arange(B, device=lw.hidden.device), pos].mean(0)
                else:
                    new[key] = lw.pooled
            else:
                new[key] = value
        return type(out)(**new)


@dataclass
class EDLoRAState:
    """What :func:`load_edlora` keeps on a pipeline (``pipe._lorakit_edlora``)."""

    n_layers: int
    layers: list[str]
    dims: dict[str, int]
    hooks: dict[str, _TextHook] = field(default_factory=dict)
    loaded: list[dict] = field(default_factory=list)  # one entry per file: adapter name, scale, concepts


def _text_components(pipe) -> list[str]:
    return [c for c in TEXT_COMPONENTS if getattr(pipe, c, None) is not None]


def _state(pipe) -> EDLoRAState:
    state = getattr(pipe, "_lorakit_edlora", None)
    if state is not None:
        return state
    layers = cross_attention_layers(pipe.unet)
    dims = {c: int(getattr(pipe, c).config.hidden_size) for c in _text_components(pipe)}
    install_layerwise_processors(pipe.unet, tuple(dims.values()))
    state = EDLoRAState(n_layers=len(layers), layers=layers, dims=dims)
    for comp in dims:
        tokenizer = getattr(pipe, _TOKENIZER_OF[comp])
        hook = _TextHook(tokenizer.eos_token_id, len(layers))
        enc = getattr(pipe, comp)
        hook.handles = [
            enc.register_forward_pre_hook(hook.pre, with_kwargs=True),
            enc.register_forward_hook(hook.post, with_kwargs=True),
        ]
        state.hooks[comp] = hook
    pipe._lorakit_edlora = state
    return state


def _free_word(word: str, tokenizers) -> str:
    def taken(w):
        return any(t in tok.get_vocab() or t.lower() in tok.get_vocab() for tok in tokenizers for t in (w, f"{w}@1"))

    if not taken(word):
        return word
    k = 2
    while True:
        cand = f"{word[:-1]}#{k}>" if word.startswith("<") and word.endswith(">") else f"{word}#{k}"
        if not taken(cand):
            return cand
        k += 1


def _adapter_weight(pipe, name: str) -> float:
    from peft.tuners.lora import LoraLayer

    for comp in ("unet", *TEXT_COMPONENTS):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for mod in model.modules():
            if isinstance(mod, LoraLayer) and name in mod.scaling:
                return float(mod.scaling[name] / (mod.lora_alpha[name] / mod.r[name]))
    return 1.0


def load_edlora(pipe, file: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None) -> dict:
    """Load an ED-LoRA file into a diffusers SD / SDXL pipeline, so prompts with its pseudo-words work.

    Adds the layer tokens and their embeddings to every tokenizer / text encoder, installs the per-layer
    cross-attention processors and text-encoder hooks (once per pipeline), and injects the LoRA weights with
    peft under ``adapter_name`` (default: the file's stem, ``_2``, ``_3``... appended if taken). Every ED-LoRA loaded so far stays active at its scale,
    as do adapters that were active before (``pipe.set_adapters`` changes that). Pseudo-words that clash with
    tokens already in the tokenizer (e.g. a second file trained with the same words) are renamed
    ``<cat1>`` -> ``<cat1#2>``; the returned ``words`` map says what to type.

    Args:
        pipe: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (any base of the file's architecture).
        file: the ``.safetensors`` ED-LoRA file.
        scale: LoRA weight of this adapter (the embeddings are not scaled).
    Returns:
        ``{"adapter_name": str, "scale": float, "words": {file word: word to use in prompts},
        "concepts": {concept name: "<w1> <w2>"}}``.
    Raises:
        FileNotFoundError; AdapterError naming the file when it is no ED-LoRA, or its layer count / widths
        differ from the pipeline's.
    """
    from lorakit.adapters.io import apply_adapter

    path = Path(file)
    adapter = load_adapter(path)
    info, table = read_edlora(adapter, path)
    state = _state(pipe)
    if info["n_layers"] != state.n_layers:
        raise AdapterError(
            f"{path}: trained for {info['n_layers']} cross-attention layers; this pipeline's UNet has {state.n_layers}"
        )
    comps = dict(info["components"])
    if set(comps) != set(state.dims) or any(comps[c] != state.dims[c] for c in comps):
        raise AdapterError(f"{path}: embeddings for text encoders {comps}; this pipeline has {state.dims}")
    taken = {entry["adapter_name"] for entry in state.loaded}
    name = adapter_name or path.stem
    if adapter_name is None:
        k = 2
        while name in taken:
            name, k = f"{path.stem}_{k}", k + 1
    if name in taken:
        raise AdapterError(f"{path}: an ED-LoRA named {name!r} is already loaded; pass another adapter_name")
    tokenizers = [getattr(pipe, _TOKENIZER_OF[c]) for c in comps]
    words = {}
    for c in info["concepts"]:
        for w in c["words"]:
            words[w] = _free_word(w, tokenizers)
            if words[w] != w:
                log.warning("%s: pseudo-word %s is taken in this pipeline; it is %s here", path, w, words[w])
    for comp in comps:
        renamed = {words[w]: rows for w, rows in table[comp].items()}
        tokenizer = getattr(pipe, _TOKENIZER_OF[comp])
        token_map = add_concept_tokens(tokenizer, getattr(pipe, comp), list(renamed), state.n_layers, renamed)
        state.hooks[comp].token_map.update(token_map)
    previous = [(n, _adapter_weight(pipe, n)) for n in pipe.get_active_adapters()] if adapter.modules else []
    if adapter.modules:
        apply_adapter(pipe, adapter, name)
        names = [n for n, _ in previous if n != name] + [name]
        weights = [w for n, w in previous if n != name] + [float(scale)]
        pipe.set_adapters(names, weights)
    result = {
        "adapter_name": name,
        "scale": float(scale),
        "words": words,
        "concepts": {c["name"]: " ".join(words[w] for w in c["words"]) for c in info["concepts"]},
    }
    state.loaded.append(result)
    return result


def loaded_token_maps(pipe) -> dict[str, dict[int, list[int]]]:
    """``{component: {word id: [L layer token ids]}}`` of every ED-LoRA loaded into ``pipe`` (empty if none).

    With :func:`layer_variant_ids` this gives the ``[L, B, S]`` ids a tool feeds to a text encoder itself
    (e.g. gradient fusion's text-encoder inputs).
    """
    state = getattr(pipe, "_lorakit_edlora", None)
    return {} if state is None else {c: dict(h.token_map) for c, h in state.hooks.items()}


def layer_hidden_states(pipe, prompt: str | list[str], clip_skip: int | None = None) -> torch.Tensor:
    """Per-layer text features of a prompt on a pipeline with ED-LoRAs loaded (LoRA weights as active).

    Args:
        pipe: a pipeline after :func:`load_edlora` (or any SD/SDXL pipeline: then all copies are equal).
        prompt: one prompt or a list (batch ``B``).
        clip_skip: as diffusers' ``clip_skip`` (layers skipped from the end), computed per copy.
    Returns:
        ``[L, B, S, C]`` with ``C`` the UNet's cross-attention width: copy ``l`` is what cross-attention layer ``l``
        reads (SDXL: te1 and te2 features concatenated, as in the pipeline).
    """
    state = _state(pipe)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    per_layer = []
    with torch.no_grad():
        for comp in state.dims:
            tokenizer, enc = getattr(pipe, _TOKENIZER_OF[comp]), getattr(pipe, comp)
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(enc.device)
            hook = state.hooks[comp]
            hook.enabled = False
            try:
                lw = encode_layerwise(enc, ids, hook.token_map, state.n_layers, hook.eos_token_id, output_hidden_states=True)
            finally:
                hook.enabled = True
            if len(state.dims) > 1:  # SDXL reads the penultimate layer of both encoders
                feats = lw.hidden_states[-(2 + (clip_skip or 0))]
            elif clip_skip:
                final_norm = getattr(enc, "final_layer_norm", None) or enc.text_model.final_layer_norm
                feats = final_norm(lw.hidden_states[-(clip_skip + 1)])
            else:
                feats = lw.hidden
            per_layer.append(feats)
    return torch.cat(per_layer, dim=-1)
