"""Base models: load a Stable Diffusion base, detect its architecture, and build tiny offline pipelines.

Three ways to name a base (``load_base``):
  * a diffusers pipeline folder (``model_index.json`` inside),
  * a single-file ``.safetensors`` checkpoint (A1111 / civitai layout, via diffusers' ``from_single_file``),
  * a hub id (only where the user's machine has the network).

and two random-weight ones: ``tiny:ARCH[:SEED]`` (:func:`lorakit.tiny_models.tiny_pipeline`, the real
architecture's module names at a tiny size) and ``random:ARCH:SIZE[:SEED]``
(:func:`lorakit.sized_models.sized_pipeline`, up to the released models' sizes). Both are re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lorakit.conditioning import detect_arch, pipeline_arch  # noqa: F401 - re-exported: callers name them here
from lorakit.logs import quiet_loaded_libraries
from lorakit.outputs import replace_dir
from lorakit.sized_models import (  # noqa: F401 - re-exported: the pipelines a base name can resolve to
    CLIP_VOCAB,
    SIZES,
    assemble_pipeline,
    component_factories,
    default_dtype,
    parse_random_spec,
    sized_pipeline,
)
from lorakit.tiny_models import (  # noqa: F401 - re-exported
    ARCHES,
    sd_scheduler,
    tiny_pipeline,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)

_tiny_text_encoder = tiny_text_encoder  # the name benchmarks used


def load_base(source: str | os.PathLike, torch_dtype: torch.dtype = torch.float32, **kwargs):
    """Load a Stable Diffusion base pipeline.

    Args:
        source: a diffusers folder, a single-file ``.safetensors`` checkpoint, a hub id, ``tiny:ARCH[:SEED]``
            (a random tiny pipeline from :func:`tiny_pipeline`, for tests and quick checks) or
            ``random:ARCH:SIZE[:SEED]`` (:func:`sized_pipeline`, e.g. ``random:sd1:full`` = SD 1.5's sizes).
        torch_dtype: dtype of the loaded weights.
    Returns:
        A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` with ``safety_checker`` disabled.
    Raises:
        FileNotFoundError / ValueError with the path and what was expected.
    """
    quiet_loaded_libraries()
    src = str(source)
    if src.startswith("random:"):
        arch, size, seed = parse_random_spec(src)
        return sized_pipeline(arch, size, seed=seed, dtype=torch_dtype)
    if src.startswith("tiny:"):
        arch, _, seed = src[len("tiny:") :].partition(":")
        return tiny_pipeline(arch, seed=int(seed or 0)).to(dtype=torch_dtype)
    path = Path(src)
    if path.is_dir():
        pipe = _load_folder(path, torch_dtype, **kwargs)
    elif path.suffix in (".safetensors", ".ckpt"):
        pipe = _load_single_file(path, torch_dtype, **kwargs)
    elif path.exists():
        raise ValueError(f"{path}: expected a diffusers folder or a .safetensors checkpoint")
    else:
        pipe = _load_hub(src, torch_dtype, **kwargs)
    detect_arch(pipe.unet.config)  # fail early on unsupported models
    return pipe


_NO_SAFETY_CHECKER = {"safety_checker": None, "requires_safety_checker": False}


def _load_folder(path: Path, torch_dtype: torch.dtype, **kwargs):
    """A diffusers pipeline folder (safetensors weights only)."""
    index = path / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{path} is a folder but has no model_index.json: not a diffusers pipeline folder")
    xl = "XL" in json.loads(index.read_text()).get("_class_name", "")
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = {} if xl else _NO_SAFETY_CHECKER
    bins = sorted(str(p.relative_to(path)) for p in path.glob("*/*.bin"))
    try:
        return cls.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True, **extra, **kwargs)
    except (OSError, ValueError) as err:
        if bins:
            raise ValueError(f"{path}: holds pickle weights ({', '.join(bins[:3])}) and lorakit never loads "
                             "pickles; save the pipeline with safe_serialization=True (.safetensors)") from err
        raise ValueError(f"{path}: not a loadable diffusers pipeline folder: {str(err).splitlines()[0]}") from err


def _load_single_file(path: Path, torch_dtype: torch.dtype, **kwargs):
    """A single-file ``.safetensors`` checkpoint: SDXL first, then SD1/SD2."""
    if path.suffix == ".ckpt":
        raise ValueError(f"{path}: .ckpt files are pickles and lorakit never loads them; convert to .safetensors")
    if not path.exists():
        raise FileNotFoundError(f"base checkpoint not found: {path}")
    try:
        return StableDiffusionXLPipeline.from_single_file(str(path), dtype=torch_dtype, **kwargs)
    except Exception:  # noqa: BLE001 - not an SDXL checkpoint; try SD1/2 before reporting
        try:
            return StableDiffusionPipeline.from_single_file(str(path), dtype=torch_dtype, **_NO_SAFETY_CHECKER,
                                                            **kwargs)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{path}: could not load as an SD1/SD2/SDXL single-file checkpoint: {err}") from err


def _load_hub(src: str, torch_dtype: torch.dtype, **kwargs):
    """A hub id (``owner/name``), where the machine has the network; a local-looking name is not tried."""
    looks_local = src.startswith((".", "/", "~")) or src.count("/") != 1 or Path(src.split("/")[0]).is_dir()
    if looks_local:
        raise FileNotFoundError(f"base model not found: {src} (no such folder or file here"
                                + ("" if src.count("/") != 1 else "; not tried as a hub id because "
                                   f"{src.split('/')[0]}/ is a local folder") + ")")
    try:
        return DiffusionPipeline.from_pretrained(src, dtype=torch_dtype, use_safetensors=True, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"base model {src!r}: no such local folder or file, and not loadable as a hub id "
                                f"({str(err).splitlines()[0]})") from err


def save_pipeline(pipe, out_dir: str | os.PathLike, overwrite: bool = False, extra=None, inputs=()) -> Path:
    """Save a pipeline with ``save_pretrained`` into ``out_dir`` atomically (temp folder, then swapped in).

    ``out_dir`` may be new or empty; an existing folder is replaced only with ``overwrite`` and only if lorakit
    wrote it (see :mod:`lorakit.outputs`); ``inputs`` (paths the pipeline was made from) are never replaced.
    ``extra(folder)`` may add files (e.g. a report) before the folder takes its final name.
    """
    def build(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("text_encoder", "text_encoder_2"):
            if (tmp / name).is_dir():
                add_text_model_prefix(tmp / name)
        if extra is not None:
            extra(tmp)

    return replace_dir(out_dir, build, kind="pipeline", overwrite=overwrite, inputs=inputs)


def add_text_model_prefix(folder: Path) -> None:
    """Give a saved CLIP text encoder's weights the ``text_model.`` prefix where they lack it.

    transformers 5 saves ``CLIPTextModel`` without the prefix, which transformers 4 cannot load (it keeps
    random weights and only warns); with the prefix both versions load every weight.
    """

    def renamed(key: str) -> str:
        return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
            if all(renamed(k) == k for k in keys):
                continue
            tensors = {renamed(k): f.get_tensor(k) for k in keys}
        save_file(tensors, str(shard), metadata=meta)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed(k): v for k, v in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2))


def pipeline_from_configs(folder: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random weights from a folder of diffusers/transformers configs (``unet/config.json``, ``vae/config.json``,
    ``text_encoder/config.json``[, ``text_encoder_2/config.json``]), e.g. a released model's folder without weights.

    Raises:
        FileNotFoundError naming the missing config.
    """
    root = Path(folder)
    for need in ("unet", "vae", "text_encoder"):
        if not (root / need / "config.json").is_file():
            raise FileNotFoundError(f"{root / need / 'config.json'}: missing (expected diffusers' per-model configs)")
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    with default_dtype(dtype):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        arch = detect_arch(unet.config)
        models = {"unet": unet, "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))}
        for name in ("text_encoder", "text_encoder_2"):
            path = root / name / "config.json"
            if path.is_file():
                cfg = CLIPTextConfig.from_json_file(path)
                # The tiny tokenizer's special ids, so pooling finds its end-of-text token.
                cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.eos_token_id
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                models[name] = cls(cfg)
    if arch == "sdxl" and "text_encoder_2" not in models:
        raise FileNotFoundError(f"{root / 'text_encoder_2' / 'config.json'}: missing (an SDXL UNet needs two text encoders)")
    return assemble_pipeline(arch, models, tok)
