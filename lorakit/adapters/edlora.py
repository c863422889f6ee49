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

File format (one ``.safetensors``, ``lorakit.kind = edlora``; docs/edlora.md, section 4)
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
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapters.edlora_tokens import (  # noqa: F401 - re-exported: the ED-LoRA API is this module
    LayerwiseAttnProcessor, LayerwiseText, TrainableTokenRows, _layerwise_output, add_concept_tokens,
    cross_attention_layers, encode_layerwise, first_eos_positions, install_layerwise_processors, layer_token_names,
    layer_variant_ids, pack_layers, unpack_layers,
)
from lorakit.adapters.io import Adapter, AdapterError, adapter_metadata, apply_adapter, load_adapter
from lorakit.logs import warn


EMB_PREFIX = "edlora_emb."
META_KEY = "lorakit.edlora"
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


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


def _free_adapter_name(state: EDLoRAState, path: Path, adapter_name: str | None) -> str:
    """``adapter_name``, or the file's stem with ``_2``, ``_3``... appended until it is not loaded yet."""
    taken = {entry["adapter_name"] for entry in state.loaded}
    name = adapter_name or path.stem
    if adapter_name is None:
        k = 2
        while name in taken:
            name, k = f"{path.stem}_{k}", k + 1
    if name in taken:
        raise AdapterError(f"{path}: an ED-LoRA named {name!r} is already loaded; pass another adapter_name")
    return name


def _add_words(pipe, state: EDLoRAState, info: dict, table: dict, comps: dict, path: Path) -> dict[str, str]:
    """Add the file's layer tokens to every tokenizer / text encoder (renaming taken pseudo-words) and their
    token maps to the text hooks; returns ``{file word: word to use in prompts}``."""
    tokenizers = [getattr(pipe, _TOKENIZER_OF[c]) for c in comps]
    words = {}
    for c in info["concepts"]:
        for w in c["words"]:
            words[w] = _free_word(w, tokenizers)
            if words[w] != w:
                warn(f"{path}: pseudo-word {w} is taken in this pipeline; it is {words[w]} here")
    for comp in comps:
        renamed = {words[w]: rows for w, rows in table[comp].items()}
        tokenizer = getattr(pipe, _TOKENIZER_OF[comp])
        token_map = add_concept_tokens(tokenizer, getattr(pipe, comp), list(renamed), state.n_layers, renamed)
        state.hooks[comp].token_map.update(token_map)
    return words


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
    name = _free_adapter_name(state, path, adapter_name)
    words = _add_words(pipe, state, info, table, comps, path)
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
