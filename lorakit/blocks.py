"""UNet block maps: which block each LoRA-able module belongs to, and every block vocabulary users know.

Blocks (Block-wise LoRA paper): ``IN0..IN3`` = ``down_blocks.0-3``, ``MID`` = ``mid_block``, ``OUT0..OUT3`` =
``up_blocks.0-3`` (SDXL: ``IN0-IN2``, ``MID``, ``OUT0-OUT2``). Each coarse block splits into kohya's fine
blocks, numbered as in the original (LDM) UNet: ``IN00`` is ``conv_in``; down block ``d`` layer ``i`` is
``IN{1 + d*3 + i}``, its downsampler ``IN{3 + d*3}``; up block ``u`` layer ``j`` is ``OUT{u*3 + j}`` and its
upsampler belongs to ``OUT{u*3 + 2}``. ``TE`` holds text-encoder modules (LoRA Block Weight's ``BASE``).

A *block spec* (``network.blocks`` in configs) may be any of:
  * a preset name: ``all``, ``upper``, ``middle``, ``bottom``, ``none``, ``character`` (= all), ``style`` (= upper);
  * a mapping of block names to ranks, coarse (``{IN0: 8, OUT3: 8}``) or fine (``{IN04: 4}``); blocks not
    named get rank 0; the key ``default`` sets the rank of blocks not named;
  * a kohya ``block_dims`` vector: 25 ranks for SD1/SD2 (IN00-IN11, MID, OUT00-OUT11), 19 for SDXL
    (IN00-IN08, MID, OUT00-OUT08), or for SDXL the 23-value layout of kohya's ``sdxl_train.py --block_lr``
    (time/label embedding, IN00-IN08, MID00-MID02, OUT00-OUT08, out): the embedding and ``out`` values are
    ignored (no LoRA-able block there) and the three MID values must agree (lorakit gives the mid block one rank);
  * a LoRA Block Weight vector: 17 weights for SD1/SD2 (BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID,
    OUT03-OUT11), 12 for SDXL (BASE, IN04, IN05, IN07, IN08, MID, OUT00-OUT05). A weight ``w`` keeps the
    block at the network rank with alpha scaled by ``w``; ``w = 0`` skips it; blocks the vector does not list
    (they hold no attention) are skipped.
Vectors may be lists or comma-separated strings.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch

COARSE = {
    "sd1": ["IN0", "IN1", "IN2", "IN3", "MID", "OUT0", "OUT1", "OUT2", "OUT3"],
    "sdxl": ["IN0", "IN1", "IN2", "MID", "OUT0", "OUT1", "OUT2"],
}
COARSE["sd2"] = COARSE["sd1"]

# The paper's layer groups: "upper" = outermost in/out pair, "middle" = the next, "bottom" = the deepest.
PRESETS = {
    "sd1": {"upper": ["IN0", "OUT3"], "middle": ["IN1", "OUT2"], "bottom": ["IN2", "OUT1"]},
    "sdxl": {"upper": ["IN0", "OUT2"], "middle": ["IN1", "OUT1"], "bottom": ["IN2", "OUT0"]},
}
PRESETS["sd2"] = PRESETS["sd1"]
PRESET_ALIASES = {"character": "all", "style": "upper"}

LBW_BLOCKS = {
    "sd1": ["TE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(3, 12)],
    "sdxl": ["TE", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(0, 6)],
}
LBW_BLOCKS["sd2"] = LBW_BLOCKS["sd1"]
SDXL_BLOCK_LR_LEN = 23  # kohya sdxl_train.py: embed, IN00-IN08, MID00-MID02, OUT00-OUT08, out


def fine_blocks(arch: str) -> list[str]:
    """kohya fine block names in vector order: ``IN00..``, ``MID``, ``OUT00..`` (25 for SD1, 19 for SDXL)."""
    n = 12 if arch in ("sd1", "sd2") else 9
    return [f"IN{i:02d}" for i in range(n)] + ["MID"] + [f"OUT{i:02d}" for i in range(n)]


_UNET_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.")
_TE_RE = re.compile(r"^(?:text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


@dataclass(frozen=True)
class ModuleInfo:
    """Where one LoRA-able module sits.

    ``coarse``/``fine``: block names; ``family``: ``attn`` (transformer: attention, proj, ff), ``resnet``
    (resnet convs and time projection) or ``sampler`` (down/up-sampler conv); ``conv3x3``: a spatial conv
    (uses the conv rank in LoCon).
    """

    name: str
    coarse: str
    fine: str
    family: str
    conv3x3: bool


def unet_module_block(name: str, layers_per_block: int = 2) -> tuple[str, str] | None:
    """(coarse, fine) block of a UNet module path such as ``down_blocks.1.attentions.0.proj_in``.

    Returns None for modules outside the 9 (SDXL: 7) blocks (``conv_in``, ``time_embedding``, ``conv_out``).
    """
    if name.startswith("mid_block."):
        return "MID", "MID"
    m = _UNET_RE.match(name)
    if not m:
        return None
    side, idx, kind, sub = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    step = layers_per_block + 1
    if side == "down_blocks":
        fine = idx * step + (layers_per_block if kind == "downsamplers" else sub) + 1
        return f"IN{idx}", f"IN{fine:02d}"
    fine = idx * step + (layers_per_block if kind == "upsamplers" else sub)
    return f"OUT{idx}", f"OUT{fine:02d}"


def lora_able_modules(unet: torch.nn.Module) -> dict[str, ModuleInfo]:
    """Every Linear / Conv2d of a UNet that belongs to a block, with its block and family.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or anything with its module names and ``config``).
    Returns:
        ``{module path: ModuleInfo}`` in model order.
    """
    lpb = unet.config.layers_per_block
    lpb = lpb if isinstance(lpb, int) else lpb[0]
    out = {}
    for name, mod in unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        where = unet_module_block(name, lpb)
        if where is None:
            continue
        if ".attentions." in name:
            family = "attn"
        elif ".resnets." in name:
            family = "resnet"
        elif "samplers." in name:
            family = "sampler"
        else:
            continue
        conv3x3 = isinstance(mod, torch.nn.Conv2d) and tuple(mod.kernel_size) != (1, 1)
        out[name] = ModuleInfo(name, where[0], where[1], family, conv3x3)
    return out


def text_encoder_modules(text_encoder: torch.nn.Module) -> list[str]:
    """LoRA-able Linear layers of a CLIP text encoder (attention q/k/v/out projections and MLP fc1/fc2).

    Paths are the live model's (transformers >= 5 has no ``text_model.`` prefix).
    """
    return [n for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear) and _TE_RE.match(n)]


def _parse_vector(value) -> list[float] | None:
    if isinstance(value, str) and "," in value:
        try:
            return [float(v) for v in value.split(",")]
        except ValueError as err:
            raise ValueError(f"block vector {value!r} has a value that is not a number") from err
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, (str, dict))):
        try:
            if not hasattr(value, "keys"):
                return [float(v) for v in value]
        except (TypeError, ValueError) as err:
            raise ValueError(f"block vector {list(value)!r} has a value that is not a number") from err
    return None


def _closest(word: str, choices) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def resolve_block_spec(spec, arch: str, rank: int) -> dict[str, tuple[int, float]]:
    """Turn any block spec into ``{fine block: (rank, alpha multiplier)}`` for every fine block of ``arch``.

    Args:
        spec: preset name, mapping, kohya vector or LBW vector (see the module docstring); None = ``all``.
        arch: ``sd1``, ``sd2`` or ``sdxl``.
        rank: the network rank used by presets, coarse names given ``true`` and LBW vectors.
    Raises:
        ValueError naming the bad preset, block name or vector length and what is accepted.
    """
    if arch not in COARSE:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(COARSE)}")
    fines = fine_blocks(arch)
    coarse_of = {f: ("MID" if f == "MID" else _coarse_of_fine(f, arch)) for f in fines}
    if spec is None:
        spec = "all"
    vec = _parse_vector(spec)
    if vec is not None:
        return _from_vector(vec, arch, fines, rank)
    if isinstance(spec, str):
        return _from_preset(spec, arch, fines, coarse_of, rank)
    if hasattr(spec, "items"):
        return _from_mapping(spec, arch, fines, coarse_of, rank)
    raise ValueError(f"cannot read block spec {spec!r}: expected a preset name, a mapping or a vector")


def _from_vector(vec: list, arch: str, fines: list[str], rank: int) -> dict[str, tuple[int, float]]:
    """A kohya block_dims vector (or SDXL block_lr layout) of ranks, or an LBW vector of alpha multipliers."""
    if arch == "sdxl" and len(vec) == SDXL_BLOCK_LR_LEN:
        mids = vec[10:13]
        if len(set(mids)) != 1:
            raise ValueError(
                f"23-value SDXL block vector: MID00-MID02 = {mids}, but lorakit gives the mid block one rank; "
                "use the same value three times (or the 19-value IN00-IN08, MID, OUT00-OUT08 vector)")
        vec = vec[1:10] + [mids[0]] + vec[13:22]
    if len(vec) == len(fines):
        return {f: (int(v), 1.0) for f, v in zip(fines, vec)}
    lbw = LBW_BLOCKS[arch]
    if len(vec) == len(lbw):
        weights = dict(zip(lbw, vec))
        return {f: ((rank, weights[f]) if weights.get(f, 0.0) != 0.0 else (0, 1.0)) for f in fines}
    raise ValueError(
        f"block vector has {len(vec)} values; for {arch} expected {len(fines)} (kohya block_dims "
        f"{fines[0]}..{fines[-1]})"
        + (f", {SDXL_BLOCK_LR_LEN} (kohya sdxl block_lr layout)" if arch == "sdxl" else "")
        + f" or {len(lbw)} (LoRA Block Weight {','.join(lbw)})"
    )


def _from_preset(spec: str, arch: str, fines: list[str], coarse_of: dict, rank: int) -> dict[str, tuple[int, float]]:
    name = PRESET_ALIASES.get(spec.strip().lower(), spec.strip().lower())
    if name == "all":
        return {f: (rank, 1.0) for f in fines}
    if name == "none":
        return {f: (0, 1.0) for f in fines}
    if name in PRESETS[arch]:
        keep = set(PRESETS[arch][name])
        return {f: ((rank, 1.0) if coarse_of[f] in keep else (0, 1.0)) for f in fines}
    choices = ["all", "none", *PRESETS[arch], *PRESET_ALIASES]
    raise ValueError(f"unknown block preset {spec!r}{_closest(name, choices)}; presets: {', '.join(choices)}")


def _from_mapping(spec, arch: str, fines: list[str], coarse_of: dict, rank: int) -> dict[str, tuple[int, float]]:
    """``{block: rank}`` with coarse or fine block names and an optional ``default``."""
    items = {str(k).upper(): v for k, v in dict(spec).items()}
    default = items.pop("DEFAULT", 0)
    default = rank if default is True else int(default)
    out = {f: (default, 1.0) for f in fines}
    coarse = COARSE[arch]
    for key, value in items.items():
        if value is None or isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            raise ValueError(
                f"block {key!r}: rank {value!r} is not a number (in YAML flow mappings write a space after "
                "the colon: {IN0: 8, OUT3: 8})")
        r = rank if value is True else (0 if value is False else int(value))
        if key in ("TE", "BASE"):
            continue
        if key in fines:
            out[key] = (r, 1.0)
        elif key in coarse:
            for f in fines:
                if coarse_of[f] == key:
                    out[f] = (r, 1.0)
        else:
            raise ValueError(
                f"unknown block {key!r} for {arch}{_closest(key, coarse + fines)}; "
                f"use {', '.join(coarse)} or kohya fine blocks {fines[0]}..{fines[-1]}"
            )
    return out


def _coarse_of_fine(fine: str, arch: str) -> str:
    idx = int(fine[-2:])
    if fine.startswith("IN"):
        return "IN0" if idx == 0 else f"IN{(idx - 1) // 3}"
    return f"OUT{idx // 3}"


def module_ranks(
    modules: dict[str, ModuleInfo],
    block_ranks: dict[str, tuple[int, float]],
    network: str = "lora",
    rank: int = 4,
    alpha: float = 4.0,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
) -> dict[str, tuple[int, float]]:
    """Per-module (rank, alpha) for a network type. Modules with rank 0 are left out.

    ``lora`` adapts transformer modules (attention, proj_in/out, ff); ``locon`` also resnet convs, time
    projections and down/up-samplers. A block's rank replaces ``rank`` for Linear/1x1 modules; spatial convs use
    ``conv_rank`` (default: the block's rank) scaled the same way. Alpha keeps the ratio ``alpha / rank`` of the
    network and is multiplied by the block's weight (LBW vectors).
    """
    if network not in ("lora", "locon"):
        raise ValueError(f"unknown network type {network!r}; expected 'lora' or 'locon'")
    out = {}
    for name, info in modules.items():
        if network == "lora" and info.family != "attn":
            continue
        block_rank, weight = block_ranks[info.fine]
        if block_rank <= 0:
            continue
        if info.conv3x3:
            base_r = conv_rank if conv_rank is not None else rank
            base_a = conv_alpha if conv_alpha is not None else alpha
            r = max(1, round(block_rank * base_r / rank)) if rank else block_rank
            a = base_a * r / base_r
        else:
            r = block_rank
            a = alpha * r / rank
        if r > 0:
            out[name] = (r, a * weight)
    return out


def select_target_modules(ranks: dict[str, tuple[int, float]], target_modules) -> dict[str, tuple[int, float]]:
    """The entries of ``ranks`` whose module path is, or ends with ``.`` + , one of ``target_modules`` (peft's rule
    for a list); ``None`` keeps them all.

    Raises:
        ValueError naming ``network.target_modules`` if it is not a list of strings or a suffix matches no module.
    """
    if target_modules is None:
        return ranks
    if isinstance(target_modules, str) or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"network.target_modules: expected a list of module-name suffixes such as [attn2.to_k, "
                         f"attn2.to_v], got {target_modules!r}")
    suffixes = [str(t) for t in target_modules]

    def matches(name: str, suffix: str) -> bool:
        return name == suffix or name.endswith("." + suffix)

    unused = [t for t in suffixes if not any(matches(n, t) for n in ranks)]
    if unused:
        raise ValueError(f"network.target_modules: {', '.join(unused)} matches no module the network type and "
                         f"blocks select (e.g. {next(iter(ranks), '-')})")
    return {n: v for n, v in ranks.items() if any(matches(n, t) for t in suffixes)}


def lora_config(ranks: dict[str, tuple[int, float]], dropout: float = 0.0, init: bool | str = True):
    """A peft ``LoraConfig`` that puts exactly the given (rank, alpha) on exactly the given modules.

    Args:
        ranks: ``{module path: (rank, alpha)}`` as returned by ``module_ranks``.
    Raises:
        ValueError if ``ranks`` is empty (no block selected).
    """
    from peft import LoraConfig

    if not ranks:
        raise ValueError("the block spec selects no module: every block has rank 0")
    names = list(ranks)
    r0, a0 = ranks[names[0]]
    return LoraConfig(
        r=r0,
        lora_alpha=a0,
        target_modules=names,
        rank_pattern={"^" + re.escape(n): r for n, (r, _) in ranks.items() if r != r0},
        alpha_pattern={"^" + re.escape(n): a for n, (_, a) in ranks.items() if a != a0},
        lora_dropout=dropout,
        init_lora_weights=init,
    )


def block_of_key(module_key: str, layers_per_block: int = 2) -> str:
    """Fine block name of an adapter module key such as ``unet.up_blocks.3.attentions.2.proj_out``.

    Text-encoder keys give ``TE``; UNet modules outside the blocks give ``OTHER``.
    """
    if module_key.startswith("text_encoder"):
        return "TE"
    path = module_key.split(".", 1)[1] if module_key.startswith("unet.") else module_key
    where = unet_module_block(path, layers_per_block)
    return where[1] if where else "OTHER"
