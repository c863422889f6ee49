"""Run other tools' own loading code on the files lorakit writes. By hand, not in CI: it needs their sources.

    python tools/check_consumers_real.py --sources DIR [--arch sd1 sdxl]

DIR holds source checkouts, never copied into lorakit:

* ``DIR/comfyui``: ComfyUI (its ``comfy/`` package). Run: ``comfy.model_detection.detect_unet_config`` and the
  SD15 / SDXL ``process_clip_state_dict`` on lorakit's single-file checkpoint of the same pipeline, then
  ``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``, ``comfy.lora_convert.convert_lora``,
  ``comfy.lora.load_lora`` and ``comfy.lora.calculate_weight`` (the weight each patch gives).
* ``DIR/sd-scripts``: kohya sd-scripts. Run: ``networks.lora.create_network_from_weights`` on kohya's own
  UNet class for SDXL (``library.sdxl_original_unet.SdxlUNet2DConditionModel``, full size on the meta device:
  layer names only) and on the diffusers UNet for SD1 (kohya's SD1 UNet has diffusers' module names), then
  ``merge_to`` for SD1 (the weight it merges).
* ``DIR/a1111``: the files of AUTOMATIC1111's ``extensions-builtin/Lora`` (``networks.py``, ``network*.py``,
  ``lyco_helpers.py``, ``lora_logger.py``). Run: ``networks.load_network`` (its
  ``convert_diffusers_name_to_compvis`` and fallbacks, on a model whose module tree is the single-file
  checkpoint's: ``model.diffusion_model.*``, the CLIP ``transformer.*`` / SDXL embedders) and each module's
  ``calc_updown`` (the weight change it applies). ``modules.*`` (the webui), ``gradio`` and ``lora_patches``
  are stand-ins.
* ``DIR/lycoris``: LyCORIS. Run: ``lycoris.kohya.create_network_from_weights`` + ``merge_to`` on the UNet as
  kohya names it (SD1: diffusers names; SDXL: the single-file checkpoint's module tree, which is kohya's SDXL
  UNet naming) and the text encoders.

Needs ``einops``. kohya sd-scripts and LyCORIS name text-encoder layers by the module tree of transformers 4
(which sd-scripts pins), where ``CLIPTextModel`` has a ``text_model`` level that transformers 5 dropped; under
transformers 5 the encoders are handed to them inside a ``text_model`` wrapper so the tree is the one they
were written for. Imports of theirs that pull in GPUs, torchvision or cv2 and are not used here are replaced
by stand-ins written in this file.

One JSON line per (arch, output, consumer): ``keys_used`` / ``keys`` (tensors of the file the consumer takes),
``layers`` / ``placed`` (layers put on the module lorakit means), ``exact`` (of those, the ones whose weight
change equals lorakit's within 1e-6 of its largest entry; null where the consumer's weights were not computed)
and the first problem. docs/formats.md is written from this output.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import traceback
import types
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_consumers import outputs  # noqa: E402 - tools/ is not a package

from lorakit.adapters.io import load_adapter  # noqa: E402
from lorakit.adapters.keys import kohya_name  # noqa: E402
from lorakit.models import tiny_pipeline  # noqa: E402
from lorakit.single_file import pipeline_to_ldm  # noqa: E402

UNET = "model.diffusion_model."


# --------------------------------------------------------------------------------------------- stand-ins


def _comfy_imports(root: Path) -> None:
    """ComfyUI on CPU, with ``comfy.model_base`` (GPU model classes, torchvision) replaced by empty classes:
    comfy/lora.py only asks ``isinstance(model, comfy.model_base.X)`` for non-SD models."""
    if "comfy.lora" in sys.modules:
        return
    sys.path.insert(0, str(root))
    sys.argv = sys.argv[:1] + ["--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    stand_in = types.ModuleType("comfy.model_base")

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {})
        setattr(stand_in, name, cls)
        return cls

    stand_in.__getattr__ = __getattr__
    sys.modules["comfy.model_base"] = stand_in
    comfy.model_base = stand_in


def _kohya_imports(root: Path) -> None:
    """sd-scripts' ``library.utils`` imports torchvision and cv2 for image code; networks/lora.py only needs
    its ``setup_logging``."""
    if "library.utils" not in sys.modules:
        utils = types.ModuleType("library.utils")
        utils.setup_logging = lambda *a, **k: None
        sys.modules["library.utils"] = utils
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _a1111_imports(root: Path, sd_model) -> types.ModuleType:
    """A1111's Lora extension with the webui's ``modules`` package replaced by the few names it touches here."""
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    from safetensors.torch import load_file

    opts = types.SimpleNamespace(lora_functional=False, lora_preferred_name="Alias from file",
                                 lora_bundled_ti_to_infotext=False, lora_in_memory_limit=0)
    shared = module("modules.shared", sd_model=sd_model, opts=opts, walk_files=lambda *a, **k: [], cmd_opts=types.SimpleNamespace(lora_dir=tempfile.mkdtemp(), lyco_dir_backcompat=tempfile.mkdtemp()))
    devices = module("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=torch.float32,
                     torch_gc=lambda: None, cond_cast_unet=lambda x: x)
    sd_models = module("modules.sd_models", read_state_dict=lambda f: load_file(f),
                       read_metadata_from_safetensors=lambda f: {})
    errors = module("modules.errors", display=lambda *a, **k: None)
    parts = dict(shared=shared, devices=devices, sd_models=sd_models, errors=errors,
                 scripts=module("modules.scripts"), sd_hijack=module("modules.sd_hijack"),
                 cache=module("modules.cache"), hashes=module("modules.hashes"), patches=module("modules.patches"))
    mmdit = module("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (), {}))
    sd3 = module("modules.models.sd3", __path__=[], mmdit=mmdit)
    ti = module("modules.textual_inversion.textual_inversion")
    module("modules", **parts, __path__=[], models=module("modules.models", __path__=[], sd3=sd3),
           textual_inversion=module("modules.textual_inversion", __path__=[], textual_inversion=ti))
    module("gradio")
    module("lora_patches", LoraPatches=object)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import importlib.util

    spec = importlib.util.spec_from_file_location("networks", root / "networks.py")
    networks = importlib.util.module_from_spec(spec)
    sys.modules["networks"] = networks
    spec.loader.exec_module(networks)
    return networks


class _A1111Model(torch.nn.Module):
    """The module tree A1111 names LoRA layers after: ``model.diffusion_model.*`` and the text encoders
    (SD1: ``cond_stage_model.wrapped.transformer.*``; SDXL: ``conditioner.embedders[i].wrapped.*``), built from
    the single-file checkpoint's keys (its state dict is that tree's)."""

    def __init__(self, ldm: dict, arch: str):
        super().__init__()
        self.is_sdxl = arch == "sdxl"
        self.model = _ModuleTree({k[len("model."):]: v for k, v in ldm.items() if k.startswith(UNET)}, keep=True)
        if self.is_sdxl:
            embedders = []
            for i in (0, 1):
                prefix = f"conditioner.embedders.{i}."
                emb = torch.nn.Module()
                emb.wrapped = _ModuleTree({k[len(prefix):]: v for k, v in ldm.items() if k.startswith(prefix)}, keep=True)
                embedders.append(emb)
            self.conditioner = torch.nn.Module()
            self.conditioner.embedders = torch.nn.ModuleList(embedders)
        else:
            cond = torch.nn.Module()
            prefix = "cond_stage_model."
            cond.wrapped = _ModuleTree({k[len(prefix):]: v for k, v in ldm.items() if k.startswith(prefix)}, keep=True)
            self.cond_stage_model = cond


def _open_clip_to_hf(path: str) -> str:
    """OpenCLIP (SDXL second encoder, original layout) -> transformers names, for reporting."""
    import re

    m = re.match(r"model\.transformer\.resblocks\.(\d+)\.(.+)$", path)
    leaf = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    return f"text_encoder_2.text_model.encoder.layers.{m.group(1)}.{leaf.get(m.group(2), m.group(2))}" if m else path


def a1111(root: Path, pipe, arch: str, path: Path, ldm: dict) -> dict:
    """A1111's modules are top-level names (``networks``, ``network``, ``modules``...) that would shadow kohya's
    ``networks`` package: they are imported for this call only."""
    before, path_before = dict(sys.modules), list(sys.path)
    try:
        return _a1111(root, pipe, arch, path, ldm)
    finally:
        for name in list(sys.modules):
            if name not in before:
                del sys.modules[name]
            elif sys.modules[name] is not before[name]:
                sys.modules[name] = before[name]
        sys.path[:] = path_before


def _a1111(root: Path, pipe, arch: str, path: Path, ldm: dict) -> dict:
    sd_model = _A1111Model(ldm, arch)
    networks = _a1111_imports(root, sd_model)
    sai_to_key = _sai_to_module_keys(pipe, ldm)
    names = {id(m): n for n, m in sd_model.named_modules()}
    net = networks.load_network("probe", types.SimpleNamespace(filename=str(path)))
    keys = net_keys(path)
    deltas, used = {}, 0
    for key, mod in net.modules.items():
        used += sum(k.split(".", 1)[0] == mod.network_key.split(".", 1)[0] for k in keys)
        name = names[id(mod.sd_module)]
        if name.startswith("model.diffusion_model."):
            target = sai_to_key.get(name[len("model.diffusion_model."):])
        elif name.startswith(("cond_stage_model.wrapped.transformer.", "conditioner.embedders.0.")):
            target = "text_encoder." + name.split("transformer.", 1)[1]
        else:
            target = _open_clip_to_hf(name.split("wrapped.", 1)[1])
        if isinstance(mod.sd_module, torch.nn.MultiheadAttention):  # OpenCLIP's fused q/k/v: one layer each
            proj = key.rsplit("_", 2)[-2] + "_proj"
            target = _open_clip_to_hf(name.split("wrapped.", 1)[1]).replace(".attn", ".self_attn") + "." + proj
            weight = mod.sd_module.in_proj_weight
        else:
            weight = mod.sd_module.weight
        updown, _ = mod.calc_updown(torch.zeros_like(weight))  # A1111 adds this to the weight
        deltas[target] = updown.detach()
    return {"keys_used": used, "deltas": deltas}


def net_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# ------------------------------------------------------------------------------------------------ consumers


def comfyui(root: Path, pipe, arch: str, path: Path, ldm: dict) -> dict:
    _comfy_imports(root)
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    unet_sd = {"diffusion_model." + k[len(UNET):]: v for k, v in ldm.items() if k.startswith(UNET)}
    unet_config = comfy.model_detection.detect_unet_config(ldm, UNET)
    model = types.SimpleNamespace(state_dict=lambda: unet_sd,
                                  model_config=types.SimpleNamespace(unet_config=unet_config))
    clip_cls = comfy.supported_models.SDXL if arch == "sdxl" else comfy.supported_models.SD15
    clip_sd = clip_cls.process_clip_state_dict(None, {k: v for k, v in ldm.items() if not k.startswith(UNET)})
    clip = types.SimpleNamespace(state_dict=lambda: clip_sd)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
    lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(path), safe_load=True))
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    try:
        patches = comfy.lora.load_lora(lora, key_map)
    finally:
        logging.getLogger().removeHandler(warnings)
    unused = {m.split(": ", 1)[1] for m in warnings.messages if m.startswith("lora key not loaded")}
    # their own diffusers <-> original-layout table, to name each patched weight the way lorakit does
    to_diffusers = {"diffusion_model." + v: "unet." + k[: -len(".weight")]
                    for k, v in comfy.utils.unet_to_diffusers(unet_config).items() if k.endswith(".weight")}
    weights = {**unet_sd, **clip_sd}
    deltas = {}
    for target, patch in patches.items():
        if target in to_diffusers:
            key = to_diffusers[target]
        else:
            key = (target[: -len(".weight")].replace("clip_l.transformer.", "text_encoder.")
                   .replace("clip_g.transformer.", "text_encoder_2."))
        base = torch.zeros_like(weights[target], dtype=torch.float32)
        deltas[key] = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], base, target)
    return {"keys_used": len(lora) - len(unused), "deltas": deltas}


def _names_in(models: dict[str, torch.nn.Module]) -> dict[int, str]:
    return {id(m): f"{comp}.{name}" for comp, model in models.items() for name, m in model.named_modules()}


def _zeroed(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _te(model: torch.nn.Module) -> torch.nn.Module:
    """A zeroed copy of a text encoder with transformers 4's module tree (``text_model.encoder...``)."""
    model = _zeroed(model)
    if hasattr(model, "text_model"):
        return model
    wrapper = torch.nn.Module()
    wrapper.text_model = model
    return wrapper


def _used(keys: list[str], names: set[str]) -> int:
    return sum(k.split(".", 1)[0] in names for k in keys)


def kohya(root: Path, pipe, arch: str, path: Path, keys: list[str]) -> dict:
    _kohya_imports(root)
    import networks.lora as kohya_lora

    comps = ["text_encoder", "text_encoder_2"] if arch == "sdxl" else ["text_encoder"]
    tes = {c: _te(getattr(pipe, c)) for c in comps}
    te_arg = list(tes.values()) if arch == "sdxl" else tes["text_encoder"]
    if arch == "sdxl":  # kohya's SDXL UNet is fixed at full size: build it without memory, for its layer names
        from library.sdxl_original_unet import SdxlUNet2DConditionModel

        with torch.device("meta"):
            unet = SdxlUNet2DConditionModel()
    else:
        unet = _zeroed(pipe.unet)
    network, weights = kohya_lora.create_network_from_weights(1.0, str(path), None, te_arg, unet, for_inference=True)
    loras = network.text_encoder_loras + network.unet_loras
    used = _used(list(weights), {lora.lora_name for lora in loras})  # after its own diffusers -> SAI renaming
    if arch == "sdxl":
        placed = {lora.lora_name for lora in network.unet_loras}
        te_names = _names_in(tes)
        te_placed = {lora.lora_name: te_names[id(lora.org_module)] for lora in network.text_encoder_loras}
        return {"keys_used": used, "names": placed, "te_names": te_placed, "keys": list(weights)}
    models = {"unet": unet, **tes}
    name_of = _names_in(models)
    network.merge_to(te_arg, unet, weights, torch.float32, "cpu")
    deltas = {name_of[id(lora.org_module)]: lora.org_module.weight.detach().clone() for lora in loras}
    return {"keys_used": used, "deltas": deltas}


class _ModuleTree(torch.nn.Module):
    """Linear / Conv2d modules at the paths of a state dict (the original-layout UNet, as kohya names it);
    ``keep``: also OpenCLIP's fused attention projections."""

    def __init__(self, state: dict[str, torch.Tensor], keep: bool = False):
        super().__init__()
        for key, w in state.items():
            fused = keep and key.endswith(".in_proj_weight")
            if not fused and (not key.endswith(".weight") or w.ndim not in (2, 4)):
                continue
            parent = self
            *path, leaf, _ = key.split(".") if not fused else (*key.split("."), None)
            if fused:
                leaf = path.pop()
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            if fused:  # OpenCLIP attention: one MultiheadAttention with q/k/v fused (as in A1111's model)
                mod = torch.nn.MultiheadAttention(w.shape[1], 1, bias=False)
                with torch.no_grad():
                    for p in mod.parameters():
                        p.zero_()
                parent.add_module(leaf, mod)
                continue
            if isinstance(parent, torch.nn.MultiheadAttention):
                continue
            mod = torch.nn.Linear(w.shape[1], w.shape[0], bias=False) if w.ndim == 2 else torch.nn.Conv2d(
                w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False)
            with torch.no_grad():
                mod.weight.zero_()
            parent.add_module(leaf, mod)


def lycoris(root: Path, pipe, arch: str, path: Path, keys: list[str], ldm: dict) -> dict:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from lycoris.kohya import create_network_from_weights

    comps = ["text_encoder", "text_encoder_2"] if arch == "sdxl" else ["text_encoder"]
    tes = {c: _te(getattr(pipe, c)) for c in comps}
    te_arg = list(tes.values()) if arch == "sdxl" else tes["text_encoder"]
    if arch == "sdxl":
        unet = _ModuleTree({k[len(UNET):]: v for k, v in ldm.items() if k.startswith(UNET)})
        sai_to_key = _sai_to_module_keys(pipe, ldm)
    else:
        unet = _zeroed(pipe.unet)
    network, weights = create_network_from_weights(1.0, str(path), None, te_arg, unet)
    loras = network.unet_loras + network.text_encoder_loras
    used = _used(keys, {lora.lora_name for lora in loras})
    name_of = _names_in({"unet": unet, **tes})

    def key_of(lora):
        org = lora.org_module[0] if isinstance(lora.org_module, list) else lora.org_module
        key = name_of[id(org)]
        return (sai_to_key[key[len("unet."):]] if arch == "sdxl" and key.startswith("unet.") else key), org

    # the weight change its forward adds (LoHa / LoKr: get_weight * scalar; LoCon: the merged change)
    forward = {key_of(lora)[0]: (lora.get_weight(lora.shape) * lora.scalar).detach().float()
               for lora in loras if hasattr(lora, "get_weight") and hasattr(lora, "scalar")}
    network.merge_to(te_arg, unet, weights, torch.float32, "cpu")
    merged = {key: org.weight.detach().clone() for key, org in map(key_of, loras)}
    return {"keys_used": used, "deltas": {**merged, **forward}, "merged": merged}


def _sai_to_module_keys(pipe, ldm: dict) -> dict[str, str]:
    """original-layout UNet module path -> ``unet.<diffusers path>``, through diffusers' own single-file
    converter (not lorakit's name table)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    probe = {k: torch.full((1,), float(i)) for i, k in enumerate(ldm) if k.startswith(UNET)}
    converted = convert_ldm_unet_checkpoint(probe, dict(pipe.unet.config))
    index = {int(v.item()): k for k, v in converted.items()}
    out = {}
    for i, k in enumerate(ldm):
        if k.startswith(UNET) and k.endswith(".weight") and i in index:
            out[k[len(UNET): -len(".weight")]] = "unet." + index[i][: -len(".weight")]
    return out


# ---------------------------------------------------------------------------------------------------- report


def _exact(keys: list[str], ours: dict, theirs: dict) -> list[str]:
    """The keys whose weight change matches lorakit's within 1e-6 of its largest entry."""
    out = []
    for k in keys:
        mine, other = ours[k], theirs[k].float()
        if mine.numel() == other.numel():
            diff = (mine.reshape(other.shape) - other).abs().max() / mine.abs().max().clamp_min(1e-30)
            if diff <= 1e-6:
                out.append(k)
    return out


def _score(output: str, consumer: str, arch: str, keys: list[str], got: dict, ours: dict) -> dict:
    row = {"arch": arch, "output": output, "consumer": consumer, "keys_used": got["keys_used"], "keys": len(keys),
           "layers": len(ours)}
    if "deltas" in got:
        placed = [k for k in ours if k in got["deltas"]]
        exact = _exact(placed, ours, got["deltas"])
        row.update(placed=len(placed), exact=len(exact),
                   first_problem=([k for k in ours if k not in got["deltas"]] + [k for k in placed if k not in exact])[:1])
        if "merged" in got and got["merged"] is not got["deltas"]:
            row["merge_to_exact"] = len(_exact(placed, ours, got["merged"]))
    else:  # kohya SDXL, layer names only: a UNet layer is placed right when kohya's network has a module of
        # that (SAI) name, after kohya's own renaming of the file, and it is the SAI name of lorakit's module
        te_right = [n for n, k in got["te_names"].items() if k in ours]
        in_file = {k.split(".", 1)[0] for k in got["keys"]}
        want = {kohya_name(k, arch, "sai"): k for k in ours if k.startswith("unet.")}
        unet_right = [n for n in want if n in in_file and n in got["names"]]
        row.update(placed=len(te_right) + len(unet_right), exact=None,
                   first_problem=[want[n] for n in want if n not in unet_right][:1])
    return row


def diffusers_written(pipe, folder: Path) -> Path:
    """A LoRA file written by diffusers' own ``save_lora_weights`` (attention and resnet layers of the UNet,
    the text encoder's attention), for comparison with lorakit's ``convert --to diffusers`` output."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = copy.deepcopy(pipe)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    type(pipe).save_lora_weights(folder / "diffusers-own", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                 text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    return folder / "diffusers-own" / "pytorch_lora_weights.safetensors"


def check(arch: str, folder: Path, sources: Path, consumers: list[str]) -> list[dict]:
    pipe = tiny_pipeline(arch)
    ldm = pipeline_to_ldm(pipe)
    rows = []
    files = outputs(pipe, arch, folder)
    files["diffusers' own save_lora_weights (reference, not lorakit)"] = diffusers_written(pipe, folder)
    for output, path in files.items():
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        ours = {k: m.delta() for k, m in load_adapter(path).modules.items()}
        for consumer in consumers:
            try:
                if consumer == "A1111":
                    got = a1111(sources / "a1111", pipe, arch, path, ldm)
                elif consumer == "ComfyUI":
                    got = comfyui(sources / "comfyui", pipe, arch, path, ldm)
                elif consumer == "kohya sd-scripts":
                    if output.startswith(("loha", "lokr")):
                        continue  # LoHa / LoKr: kohya loads them through LyCORIS
                    got = kohya(sources / "sd-scripts", pipe, arch, path, keys)
                else:
                    got = lycoris(sources / "lycoris", pipe, arch, path, keys, ldm)
            except Exception as err:  # noqa: BLE001 - a consumer refusing the file is a result
                traceback.print_exc()
                rows.append({"arch": arch, "output": output, "consumer": consumer, "keys_used": 0, "keys": len(keys),
                             "layers": len(ours), "placed": 0, "refused": f"{type(err).__name__}: {err}"[:200]})
                continue
            rows.append(_score(output, consumer, arch, keys, got, ours))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", required=True, type=Path, help="folder with comfyui/, a1111/, sd-scripts/, lycoris/")
    parser.add_argument("--arch", nargs="+", default=["sd1", "sdxl"])
    parser.add_argument("--consumers", nargs="+", default=["ComfyUI", "A1111", "kohya sd-scripts", "LyCORIS"])
    args = parser.parse_args()
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            (Path(tmp) / arch).mkdir()
            for row in check(arch, Path(tmp) / arch, args.sources, args.consumers):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
