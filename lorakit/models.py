"""Base models: load a Stable Diffusion base, detect its architecture, and build tiny offline pipelines.

Three ways to name a base (``load_base``):
  * a diffusers pipeline folder (``model_index.json`` inside),
  * a single-file ``.safetensors`` checkpoint (A1111 / civitai layout, via diffusers' ``from_single_file``),
  * a hub id (only where the user's machine has the network).

``tiny_pipeline(arch, seed)`` builds a random-weight pipeline with the real architecture's module names and
block layout (SD1: 4 down blocks, 3 with cross-attention; SDXL: 3 down blocks, 2 text encoders, added time
ids) and an offline CLIP tokenizer, in about a second on a CPU. Tests use it for mechanics.

``sized_pipeline(arch, size, seed)`` builds the same at three sizes: ``tiny`` (the above), ``mid`` (SD's channel
ratios at 1/10 width) and ``full`` (the released models' UNet / VAE / text encoder configs, written out below:
SD 1.5 860M-parameter UNet, SD 2.x 866M, SDXL 2.6B), random weights, no download. ``component_factories``
gives the constructors, so :mod:`lorakit.memory` can build the same models on the meta device for free.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ARCHES = ("sd1", "sd2", "sdxl")
SIZES = ("tiny", "mid", "full")
CLIP_VOCAB = 49408  # the real CLIP vocabulary size; full-size text encoders get it so parameter counts match

# Words the offline tokenizer knows as single tokens; any other text is still tokenized, byte by byte.
_TINY_WORDS = (
    "a an the of and with in on at photo picture image painting drawing style man woman cat dog boy girl "
    "person character object background red green blue yellow orange purple pink white black gray brown "
    "cyan magenta circle square triangle star ring cross diamond heart hat ball umbrella box tree house "
    "sky sea beach grass sand stripes dots checker gradient plain pixel ink outline pastel neon sketch "
    "big small large tiny left right top bottom center wearing holding standing sitting high quality"
).split()


def detect_arch(unet_config) -> str:
    """Name the architecture of a UNet from its config: ``sd1``, ``sd2`` or ``sdxl``.

    Args:
        unet_config: a ``UNet2DConditionModel.config`` (FrozenDict) or a plain dict.
    Raises:
        ValueError: for a UNet that is none of the three, naming what was found.
    """
    cfg = dict(unet_config)
    down = tuple(cfg.get("down_block_types", ()))
    if cfg.get("addition_embed_type") == "text_time" and len(down) == 3:
        return "sdxl"
    if len(down) == 4 and cfg.get("addition_embed_type") is None:
        return "sd2" if cfg.get("use_linear_projection") or cfg.get("cross_attention_dim") == 1024 else "sd1"
    raise ValueError(
        f"unsupported UNet: down_block_types={list(down)}, addition_embed_type={cfg.get('addition_embed_type')!r}; "
        "lorakit supports SD1.x, SD2.x and SDXL UNets (4 down blocks, or 3 down blocks with text_time embedding)"
    )


def pipeline_arch(pipe) -> str:
    """Architecture name (``sd1``/``sd2``/``sdxl``) of a loaded diffusers pipeline."""
    return detect_arch(pipe.unet.config)


def _pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


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
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from lorakit.logs import quiet_loaded_libraries

    quiet_loaded_libraries()

    src = str(source)
    if src.startswith("random:"):
        arch, size, seed = parse_random_spec(src)
        return sized_pipeline(arch, size, seed=seed, dtype=torch_dtype)
    if src.startswith("tiny:"):
        arch, _, seed = src[len("tiny:") :].partition(":")
        return tiny_pipeline(arch, seed=int(seed or 0)).to(dtype=torch_dtype)
    path = Path(src)
    extra = {"safety_checker": None, "requires_safety_checker": False}
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise FileNotFoundError(f"{path} is a folder but has no model_index.json: not a diffusers pipeline folder")
        cls_name = json.loads(index.read_text()).get("_class_name", "")
        cls = StableDiffusionXLPipeline if "XL" in cls_name else StableDiffusionPipeline
        if "XL" in cls_name:
            extra = {}
        bins = sorted(str(p.relative_to(path)) for p in path.glob("*/*.bin"))
        try:
            pipe = cls.from_pretrained(src, dtype=torch_dtype, use_safetensors=True, **extra, **kwargs)
        except (OSError, ValueError) as err:
            if bins:
                raise ValueError(f"{path}: holds pickle weights ({', '.join(bins[:3])}) and lorakit never loads "
                                 "pickles; save the pipeline with safe_serialization=True (.safetensors)") from err
            raise ValueError(f"{path}: not a loadable diffusers pipeline folder: {str(err).splitlines()[0]}") from err
    elif path.suffix in (".safetensors", ".ckpt"):
        if path.suffix == ".ckpt":
            raise ValueError(f"{path}: .ckpt files are pickles and lorakit never loads them; convert to .safetensors")
        if not path.exists():
            raise FileNotFoundError(f"base checkpoint not found: {path}")
        try:
            pipe = StableDiffusionXLPipeline.from_single_file(src, dtype=torch_dtype, **kwargs)
        except Exception:  # noqa: BLE001 - not an SDXL checkpoint; try SD1/2 before reporting
            try:
                pipe = StableDiffusionPipeline.from_single_file(src, dtype=torch_dtype, **extra, **kwargs)
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"{path}: could not load as an SD1/SD2/SDXL single-file checkpoint: {err}") from err
    elif path.exists():
        raise ValueError(f"{path}: expected a diffusers folder or a .safetensors checkpoint")
    else:
        looks_local = src.startswith((".", "/", "~")) or src.count("/") != 1 or Path(src.split("/")[0]).is_dir()
        if looks_local:
            raise FileNotFoundError(f"base model not found: {src} (no such folder or file here"
                                    + ("" if src.count("/") != 1 else "; not tried as a hub id because "
                                       f"{src.split('/')[0]}/ is a local folder") + ")")
        try:
            pipe = DiffusionPipeline.from_pretrained(src, dtype=torch_dtype, use_safetensors=True, **kwargs)
        except OSError as err:
            raise FileNotFoundError(f"base model {src!r}: no such local folder or file, and not loadable as a hub id "
                                    f"({str(err).splitlines()[0]})") from err
    detect_arch(pipe.unet.config)  # fail early on unsupported models
    return pipe


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode one word (already split into symbols) with merge ``ranks``, as the BPE model does."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def tiny_tokenizer(words: tuple[str, ...] = _TINY_WORDS):
    """A CLIP tokenizer built offline: byte-level BPE whose merges make each word in ``words`` one token.

    Returns:
        ``transformers.CLIPTokenizer`` with ``model_max_length`` 77.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Run BPE with the merges so far; while the word is not one token, merge its first two pieces.
        while True:
            pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.pad_token = "<|endoftext|>"
    return tok


def _tiny_text_encoder(vocab_size: int, hidden: int, layers: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg)


def tiny_unet(arch: str = "sd1", cross_attention_dim: int | None = None):
    """A small random ``UNet2DConditionModel`` with the real architecture's block layout and module names.

    SD1: 4 down blocks (3 cross-attention), ``layers_per_block=2``, latent 16x16.
    SDXL: 3 down blocks (last 2 cross-attention, 1 and 2 transformer layers), text_time added embedding.
    """
    from diffusers import UNet2DConditionModel

    if arch in ("sd1", "sd2"):
        return UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=cross_attention_dim or 32,
            attention_head_dim=8,
            norm_num_groups=16,
            use_linear_projection=arch == "sd2",
        )
    if arch == "sdxl":
        text_dim = 32
        return UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=cross_attention_dim or 2 * text_dim,
            attention_head_dim=(2, 4, 8),
            norm_num_groups=16,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=text_dim + 6 * 8,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")


def tiny_vae():
    """A 2-level ``AutoencoderKL`` (scale factor 2, 4 latent channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def sd_scheduler(name: str = "ddim"):
    """A diffusers scheduler with Stable Diffusion's training noise schedule (scaled_linear 0.00085-0.012)."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    table = {
        "ddim": lambda: DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        "ddpm": lambda: DDPMScheduler(**common, clip_sample=False),
        "euler": lambda: EulerDiscreteScheduler(**common),
        "euler_a": lambda: EulerAncestralDiscreteScheduler(**common),
        "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**common),
        "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler(**common, use_karras_sigmas=True),
    }
    if name not in table:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(table)}")
    return table[name]()


def tiny_pipeline(arch: str = "sd1", seed: int = 0):
    """Build a random-weight Stable Diffusion pipeline of the given architecture, offline.

    Args:
        arch: ``sd1``, ``sd2`` or ``sdxl``.
        seed: seeds every weight, so two calls with one seed give identical pipelines.
    Returns:
        ``StableDiffusionPipeline`` (sd1/sd2) or ``StableDiffusionXLPipeline`` (sdxl), fp32, on the CPU,
        generating 32x32 images (latents 4 x 16 x 16).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    unet = tiny_unet(arch)
    vae = tiny_vae()
    if arch == "sdxl":
        te1 = _tiny_text_encoder(vocab, 32, 2, with_projection=False)
        te2 = _tiny_text_encoder(vocab, 32, 2, with_projection=True)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tokenizer,
            tokenizer_2=tiny_tokenizer(),
            unet=unet,
            scheduler=sd_scheduler("euler"),
        )
    else:
        te = _tiny_text_encoder(vocab, 32, 2, with_projection=False)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sd_scheduler("ddim"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, out_dir: str | os.PathLike, overwrite: bool = False, extra=None, inputs=()) -> Path:
    """Save a pipeline with ``save_pretrained`` into ``out_dir`` atomically (temp folder, then swapped in).

    ``out_dir`` may be new or empty; an existing folder is replaced only with ``overwrite`` and only if lorakit
    wrote it (see :mod:`lorakit.outputs`); ``inputs`` (paths the pipeline was made from) are never replaced.
    ``extra(folder)`` may add files (e.g. a report) before the folder takes its final name.
    """
    from lorakit.outputs import replace_dir

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
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

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


def parse_random_spec(spec: str) -> tuple[str, str, int]:
    """``random:ARCH:SIZE[:SEED]`` -> ``(arch, size, seed)``; a ValueError names what was expected."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] != "random" or parts[1] not in ARCHES or parts[2] not in SIZES:
        raise ValueError(f"{spec!r}: expected random:ARCH:SIZE[:SEED] with ARCH in {ARCHES} and SIZE in {SIZES}")
    try:
        seed = int(parts[3]) if len(parts) == 4 else 0
    except ValueError:
        raise ValueError(f"{spec!r}: the seed must be an integer") from None
    return parts[1], parts[2], seed


# The released models' configs (diffusers / transformers keys), random weights. Only sizes matter here.
_FULL_UNET = {
    "sd1": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(
        sample_size=128, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
_FULL_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
# (hidden, intermediate, layers, heads, act, projection_dim)
_CLIP_L = (768, 3072, 12, 12, "quick_gelu", 768)
_OPENCLIP_H = (1024, 4096, 23, 16, "gelu", 512)
_OPENCLIP_BIGG = (1280, 5120, 32, 20, "gelu", 1280)
_FULL_TEXT = {"sd1": (_CLIP_L,), "sd2": (_OPENCLIP_H,), "sdxl": (_CLIP_L, _OPENCLIP_BIGG)}


def _text_encoder(vocab_size: int, spec: tuple, with_projection: bool, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden, inter, layers, heads, act, proj = spec
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, projection_dim=proj, hidden_act=act,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _mid_unet(arch: str):
    """SD's shape at 1/10 width: every level's convolutions cost about the same, as in SD."""
    from diffusers import UNet2DConditionModel

    if arch == "sdxl":
        return UNet2DConditionModel(
            sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32,
        )
    return UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, use_linear_projection=arch == "sd2",
    )


def component_factories(arch: str, size: str, tokenizer=None) -> dict:
    """Zero-argument constructors of a pipeline's models: ``{"unet", "vae", "text_encoder"[, "text_encoder_2"]}``.

    Call them under ``torch.device("meta")`` to get the shapes without memory (:mod:`lorakit.memory`).
    ``tokenizer``: the tokenizer whose special ids the text encoders use (default: :func:`tiny_tokenizer`).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if arch not in ARCHES or size not in SIZES:
        raise ValueError(f"unknown arch/size {arch!r}/{size!r}; expected one of {ARCHES} / {SIZES}")
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    vocab = len(tok)
    sdxl = arch == "sdxl"
    if size == "full":
        bos, eos = tok.bos_token_id, tok.eos_token_id
        vae_kw = dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True) if sdxl else dict(sample_size=512)
        out = {"unet": lambda: UNet2DConditionModel(**_FULL_UNET[arch]),
               "vae": lambda: AutoencoderKL(**_FULL_VAE, **vae_kw)}
        specs = _FULL_TEXT[arch]
        out["text_encoder"] = lambda: _text_encoder(CLIP_VOCAB, specs[0], False, bos, eos)
        if sdxl:
            out["text_encoder_2"] = lambda: _text_encoder(CLIP_VOCAB, specs[1], True, bos, eos)
        return out
    out = {"unet": (lambda: tiny_unet(arch)) if size == "tiny" else (lambda: _mid_unet(arch)), "vae": tiny_vae}
    out["text_encoder"] = lambda: _tiny_text_encoder(vocab, 32, 2, with_projection=False)
    if sdxl:
        out["text_encoder_2"] = lambda: _tiny_text_encoder(vocab, 32, 2, with_projection=True)
    return out


class default_dtype:
    """Context manager: build modules directly in ``dtype`` (a bf16 SDXL UNet never exists in fp32)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def assemble_pipeline(arch: str, models: dict, tokenizer):
    """A diffusers pipeline from built models (``unet``, ``vae``, ``text_encoder``[, ``text_encoder_2``])."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(),
                                         scheduler=sd_scheduler("euler"), **models)
    else:
        pipe = StableDiffusionPipeline(tokenizer=tokenizer, scheduler=sd_scheduler("ddim"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **models)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sized_pipeline(arch: str = "sd1", size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu"):
    """A random-weight pipeline of ``arch`` at ``size`` (``tiny`` | ``mid`` | ``full``), built offline.

    ``tiny`` is exactly :func:`tiny_pipeline`. ``full`` has the released models' parameter counts (SD 1.5:
    UNet 860M, VAE 84M, CLIP-L 123M; SDXL: UNet 2.57B, VAE 84M, CLIP-L + OpenCLIP-bigG 817M) with a small offline
    tokenizer (the text encoders keep CLIP's 49408-row embedding). Weights are created in ``dtype`` on ``device``
    (a GPU initialises SD 1.5 in a second; the CPU takes ~30 s), so a bf16 SDXL needs ~7 GB, not 14. The weights
    depend on the device's random generator: one seed gives one pipeline per device.
    """
    if size == "tiny":
        return tiny_pipeline(arch, seed=seed).to(device=device, dtype=dtype)
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    with default_dtype(dtype), torch.device(device):
        models = {name: make() for name, make in component_factories(arch, size, tok).items()}
    return assemble_pipeline(arch, models, tok)


def pipeline_from_configs(folder: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random weights from a folder of diffusers/transformers configs (``unet/config.json``, ``vae/config.json``,
    ``text_encoder/config.json``[, ``text_encoder_2/config.json``]), e.g. a released model's folder without weights.

    Raises:
        FileNotFoundError naming the missing config.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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
