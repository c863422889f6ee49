"""Where other tools put each layer of an adapter file: A1111, ComfyUI and kohya sd-scripts / LyCORIS.

None of these tools is a dependency, so their name -> layer logic is re-implemented minimally from what their
loaders do (read from AUTOMATIC1111 ``extensions-builtin/Lora/networks.py`` with its ``convert_diffusers_name_to_compvis``,
ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` / ``_clip`` and ``comfy/weight_adapter/lora.py``, kohya ``networks/lora.py`` ``create_network_from_weights``). diffusers is importable and is run
for real (:func:`diffusers_placement`). Each function returns ``{file layer name: placed module key or None}``
so docs/formats.md and the tests can say, per consumer, which layers land where lorakit puts them.

The original-layout (LDM) module names the tools match against come from
:func:`lorakit.adapters.keys.sai_unet_path`, which is tested against diffusers' own LDM checkpoint converter.
"""

from __future__ import annotations

import re

import torch

from lorakit.adapters.keys import is_sai_name, kohya_name, module_path_from_kohya, sai_unet_path

_LAYER_SUFFIX = re.compile(r"\.(lora_down\.weight|lora_up\.weight|alpha|hada_\w+|lokr_\w+)$")


def layer_names(keys) -> list[str]:
    """The kohya / LyCORIS layer names of a file's tensor keys (``name.lora_down.weight`` -> ``name``)."""
    out = []
    for key in keys:
        m = _LAYER_SUFFIX.search(key)
        if m and key[: m.start()] not in out:
            out.append(key[: m.start()])
    return out


def _weights(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _te_path(model, path: str) -> str:
    return path if path.startswith("text_model.") or path.startswith("text_projection") else "text_model." + path


def _ldm_tables(pipe, arch: str) -> dict[str, str]:
    """``{A1111 / ComfyUI layer name: lorakit module key}`` for the original-layout model of a pipeline."""
    table = {"diffusion_model_" + sai_unet_path(p, arch).replace(".", "_"): f"unet.{p}" for p in _weights(pipe.unet)}
    te_prefix = "transformer_" if arch != "sdxl" else "0_transformer_"
    for p in _weights(pipe.text_encoder):
        p = _te_path(pipe.text_encoder, p)
        table[te_prefix + p.replace(".", "_")] = f"text_encoder.{p}"
    if arch == "sdxl":
        leaves = {"self_attn.out_proj": "attn_out_proj", "mlp.fc1": "mlp_c_fc", "mlp.fc2": "mlp_c_proj"}
        for p in _weights(pipe.text_encoder_2):
            p = _te_path(pipe.text_encoder_2, p)
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", p)
            if m and m.group(2) in leaves:
                table[f"1_model_transformer_resblocks_{m.group(1)}_{leaves[m.group(2)]}"] = f"text_encoder_2.{p}"
            elif m and m.group(2).endswith(("q_proj", "k_proj", "v_proj")):  # one in_proj; A1111 slices it
                table[f"1_model_transformer_resblocks_{m.group(1)}_attn"] = f"text_encoder_2.{p.rsplit('.', 1)[0]}"
    return table


_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _a1111_layer(kind: str, rest: str) -> str:
    """The compvis tail of a down / up block layer: ``1_<rest>`` in its attention, ``0_<renamed rest>`` in its
    resnet."""
    return f"1_{rest}" if kind == "attentions" else f"0_{_SUFFIX.get(rest, rest)}"


def _te2_leaf(rest: str) -> str:
    return rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")


# A1111's diffusers-name -> compvis-name rewrite (SD1 block arithmetic for every model): (pattern, the compvis
# name from the pattern's groups, digits as ints); the first pattern that matches wins.
_A1111_RULES = (
    (r"lora_unet_conv_in(.*)", lambda g: f"diffusion_model_input_blocks_0_0{g[0]}"),
    (r"lora_unet_conv_out(.*)", lambda g: f"diffusion_model_out_2{g[0]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda g: f"diffusion_model_time_embed_{g[0] * 2 - 2}{g[1]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda g: f"diffusion_model_input_blocks_{1 + g[0] * 3 + g[2]}_{_a1111_layer(g[1], g[3])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda g: f"diffusion_model_middle_block_{1 if g[0] == 'attentions' else g[1] * 2}_"
               f"{_SUFFIX.get(g[2], g[2]) if g[0] == 'resnets' else g[2]}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda g: f"diffusion_model_output_blocks_{g[0] * 3 + g[2]}_{_a1111_layer(g[1], g[3])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda g: f"diffusion_model_input_blocks_{3 + g[0] * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda g: f"diffusion_model_output_blocks_{2 + g[0] * 3}_{2 if g[0] > 0 else 1}_conv"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda g: f"transformer_text_model_encoder_layers_{g[0]}_{g[1]}"),
    (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
     lambda g: f"1_model_transformer_resblocks_{g[0]}_{_te2_leaf(g[1])}"),
)


def _a1111_convert(name: str) -> str:
    """A1111's diffusers-name -> compvis-name rewrite (:data:`_A1111_RULES`); other names as they are."""
    for pattern, rewrite in _A1111_RULES:
        if r := re.match(pattern, name):
            return rewrite([int(x) if x.isdigit() else x for x in r.groups()])
    return name


def a1111_placement(names: list[str], pipe, arch: str) -> dict[str, str | None]:
    """Where A1111's built-in Lora extension applies each layer (None: "unmatched" and skipped)."""
    table = _ldm_tables(pipe, arch)
    out = {}
    for name in names:
        key = _a1111_convert(name)
        hit = table.get(key)
        if hit is None and (x := re.match(r"(.*)_([qkv]_proj)$", key)):
            hit = table.get(x.group(1))
            hit = hit and f"{hit}.{x.group(2)}"
        if hit is None and "lora_unet" in name:
            hit = table.get(name.replace("lora_unet", "diffusion_model"))
        elif hit is None and "lora_te1_text_model" in name:
            hit = table.get(name.replace("lora_te1_text_model", "0_transformer_text_model")) or table.get(
                name.replace("lora_te1_text_model", "transformer_text_model"))
        out[name] = hit
    return out


_CLIP_LEAVES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


def comfyui_placement(keys, pipe, arch: str) -> dict[str, str | None]:
    """Where ComfyUI's LoRA loader applies each layer of a file (keys: the file's tensor names).

    Layer names: ``lora_unet_`` + original (LDM) or diffusers module names, ``unet.``/bare diffusers names with
    ``processor.to_*`` for attention; text encoders ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` +
    ``text_model_encoder_layers_N_<leaf>`` and ``text_encoder(_2).text_model.encoder.layers.N.<leaf>``.
    Weight suffixes: ``.lora_up.weight``, ``_lora.up.weight``, ``.lora_B.weight``, ``.lora_linear_layer.up.weight``,
    ``hada_*``, ``lokr_*``. ComfyUI reads alpha only from ``<layer>.alpha`` tensors (none: scale 1).
    """
    key_map = {}
    for p in _weights(pipe.unet):
        key_map["lora_unet_" + sai_unet_path(p, arch).replace(".", "_")] = f"unet.{p}"
        key_map["lora_unet_" + p.replace(".", "_")] = f"unet.{p}"
        dk = p.replace(".to_", ".processor.to_")
        dk = dk[:-2] if dk.endswith(".to_out.0") else dk
        key_map[dk] = key_map["unet." + dk] = f"unet.{p}"
    encoders = [("text_encoder", ("lora_te1_" if arch == "sdxl" else "lora_te_", "lora_te_"))]
    if arch == "sdxl":
        encoders.append(("text_encoder_2", ("lora_te2_",)))
    for comp, prefixes in encoders:
        for p in _weights(getattr(pipe, comp)):
            p = _te_path(getattr(pipe, comp), p)
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", p)
            if not m or m.group(2) not in _CLIP_LEAVES:
                continue
            for prefix in prefixes:
                key_map[f"{prefix}text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"] = f"{comp}.{p}"
            key_map[f"{comp}.{p}"] = f"{comp}.{p}"
    out = {}
    keys = set(keys)
    suffixes = (".lora_up.weight", "_lora.up.weight", ".lora_B.weight", ".lora_linear_layer.up.weight", ".hada_w1_a",
                ".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a")
    for key in keys:
        for sfx in suffixes:
            if key.endswith(sfx):
                name = key[: -len(sfx)]
                out[name] = key_map.get(name)
    return out


def kohya_placement(names: list[str], pipe, arch: str, rename_diffusers: bool = True) -> dict[str, str | None]:
    """Where kohya sd-scripts' ``create_network_from_weights`` puts each layer: its network names every
    Linear / Conv2d inside Transformer2DModel (+ ResnetBlock2D / Down- / Upsample2D for LoCon) and CLIP attention
    / MLP modules, after its own UNet's module names: diffusers names for SD1/SD2, original (SAI) names for SDXL.
    For SDXL it first renames diffusers-named UNet layers to SAI names (``rename_diffusers``; LyCORIS's loader
    does not). A file layer with no such module is left out."""
    if arch == "sdxl" and rename_diffusers:
        renamed = {n: n if is_sai_name(n) or not n.startswith("lora_unet_")
                   else kohya_name(module_path_from_kohya(n), arch, "sai") for n in names}
        placed = kohya_placement(list(renamed.values()), pipe, arch, rename_diffusers=False)
        return {n: placed[r] for n, r in renamed.items()}
    table = {}
    for p in _weights(pipe.unet):
        if any(w in p for w in (".attentions.", ".resnets.", "samplers.")):
            path = sai_unet_path(p, arch) if arch == "sdxl" else p
            table["lora_unet_" + path.replace(".", "_")] = f"unet.{p}"
    comps = [("text_encoder", "lora_te1_" if arch == "sdxl" else "lora_te_")]
    comps += [("text_encoder_2", "lora_te2_")] if arch == "sdxl" else []
    for comp, prefix in comps:
        for p in _weights(getattr(pipe, comp)):
            p = _te_path(getattr(pipe, comp), p)
            if ".self_attn." in p or ".mlp." in p:
                table[prefix + p.replace(".", "_")] = f"{comp}.{p}"
    return {n: table.get(n) for n in names}


def diffusers_placement(path, pipe) -> dict[str, str | None] | str:
    """Run diffusers' ``load_lora_weights`` on a copy of ``pipe``: ``{lorakit module key: same key}`` for every
    layer that received a peft LoRA layer, or the error message when diffusers refuses the file."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    theirs = copy.deepcopy(pipe)
    try:
        theirs.load_lora_weights(str(path), adapter_name="probe")
    except Exception as err:  # noqa: BLE001 - reported, not raised: the table records refusals
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(theirs, comp, None)
        if model is None:
            continue
        for name, mod in model.named_modules():
            if isinstance(mod, BaseTunerLayer) and "probe" in getattr(mod, "lora_A", {}):
                out[f"{comp}.{_te_path(model, name) if comp != 'unet' else name}"] = f"{comp}.{name}"
    return out

