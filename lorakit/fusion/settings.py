"""Each fusion method's own settings (torch-free, so ``lorakit fuse --help`` builds its flags without torch).

A field made with :func:`lorakit.options.option` is also the ``lorakit fuse`` flag of the same name; a field two
methods share (``steps``, ``layers``) is one flag whose help lists each method's default.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from lorakit.options import option


def ridge_value(value: str):
    """``--ridge``: ``auto`` or a finite number >= 0."""
    if value == "auto":
        return value
    try:
        out = float(value)
    except ValueError:
        out = -1.0
    if not out >= 0 or out == float("inf"):
        raise argparse.ArgumentTypeError(f"expected auto or a finite number >= 0, got {value!r}")
    return out


SCHEDULERS = "ddim, ddpm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras"


@dataclass(frozen=True)
class NoSettings:
    """A method without settings of its own."""


@dataclass(frozen=True)
class GradientOptions:
    steps: int | None = option(None, "gradient: sampling steps recorded per prompt", show_default="10 (the reference samples 20)", type=int)
    resolution: int | None = option(None, "gradient: sampling size in pixels", type=int,
                                    show_default="the pipeline's, 512 SD1 / 1024 SDXL")
    samples: int = option(1, "gradient: samples (seeds) per sampling prompt", type=int)
    guidance: float = option(1.0, "gradient: CFG scale while recording (1 = no CFG, as the reference)", type=float)
    ridge: float | str = option("auto", "gradient: ridge toward --ridge-target, relative to trace(G)/in, or auto: "
                                "per layer, the value of a grid with the lowest objective on held-out activations",
                                type=ridge_value)
    val_prompts: tuple | None = option(None, "gradient: held-out prompts per adapter ('|'-separated) for --ridge auto",
                                       show_default="'a picture of {trigger}' and '{trigger}, high quality' for "
                                       "trigger prompts, else none: other seeds only", nargs="+", metavar="PROMPTS")
    val_samples: int = option(1, "gradient: held-out seeds per sampling prompt", type=int)
    kv_rows: str = option("all", "gradient: token rows of the to_k/to_v stage: the padded sequence the UNet reads "
                          "(all), the concept's tokens + the end token (concept, the reference's), or every prompt "
                          "token", choices=["all", "concept", "prompt"])
    kv_val_rows: str = option("prompt", "gradient: token rows of the to_k/to_v held-out statistics that --ridge auto "
                              "scores on: every prompt token without padding (prompt: padded positions repeat across "
                              "prompts and would hide overfitting), all, or concept", choices=["all", "concept", "prompt"])
    capture_batch: int = option(8, "gradient: prompts x seeds per forward pass while recording", type=int)
    max_conv_dim: int = option(4608, "gradient: solve a conv on unfolded patches when in*kh*kw <= this (Gram memory "
                               "8*dim^2 bytes); larger convs go to --large-convs (0: every conv does)", type=int)
    large_convs: str = option("subspace", "gradient: convs above --max-conv-dim are solved within the span of the "
                              "concepts' LoRA down matrices (subspace: an R x R Gram, R = sum of ranks; listed in the "
                              "report as subspace_layers) or take the weighted average (average: listed as "
                              "fallback_layers)", choices=["subspace", "average"])
    ridge_target: str = option("average", "gradient: the ridge pulls toward the weighted average (average: unseen "
                               "input directions keep the average) or toward W0 (base)", choices=["base", "average"])
    unet_inputs: str = option("fused_text", "gradient: sample the UNet stage with the fused text encoder and "
                              "to_k/to_v (fused_text, the reference) or with each concept's own ones",
                              choices=["fused_text", "own"])
    scheduler: str | None = option(None, f"gradient: sampler while recording ({SCHEDULERS})",
                                   show_default="the pipeline's")
    # ED-LoRA concepts folded into plain words (lorakit.fusion.edlora_fold; docs/edlora.md)
    fold_concepts: bool = option(False, "gradient: fold ED-LoRA concepts into the cross-attention to_k/to_v weights "
                                 "so plain words (--concept-word) call them: no added tokens, writable as "
                                 "--out-format single-file", action="store_true")
    concept_word: tuple | None = option(None, "gradient --fold-concepts: the plain words that stand for an ED-LoRA "
                                        "concept", nargs="+", metavar="CONCEPT=TEXT",
                                        show_default="the concept's name")


@dataclass(frozen=True)
class MergeOptions:
    combine: str | None = option(None, "weighted/svd: average (divide by N) or sum", choices=["average", "sum"],
                                 show_default="average for weighted, sum for svd")
    density: float = option(0.5, "ties/dare: fraction of each delta's entries kept", type=float)
    majority_sign: str = option("total", "ties/dare-ties: sign election by summed magnitude or by count",
                                choices=["total", "frequency"])
    dare_variant: str = option("linear", "dare: peft dare_linear (weighted sum) or dare_ties (sign election + mean)",
                               choices=["linear", "ties"])


@dataclass(frozen=True)
class ZipLoRAOptions:
    steps: int | None = option(None, "ziplora: Adam steps on the coefficients", type=int, show_default="100")
    layers: tuple | None = option(None, "ziplora/lorarar: UNet layers that get per-column coefficients, e.g. to_q "
                                  "to_out.0", nargs="+", metavar="PATTERN",
                                  show_default="every shared layer")
    lr: float = option(0.01, "ziplora: Adam learning rate of the coefficients", type=float)
    lam: float = option(0.01, "ziplora: weight of the |cos| term", type=float)
    ref_images: tuple | None = option(None, "ziplora: reference image folders of CONTENT and STYLE", nargs=2,
                                      metavar="DIR", show_default="the files' metadata, else generated")
    ref_num: int = option(4, "ziplora: reference images per LoRA", type=int)
    ref_size: int | None = option(None, "ziplora: reference image size in pixels", type=int, show_default="base's")
    ref_steps: int = option(20, "ziplora: sampling steps for generated references", type=int)


@dataclass(frozen=True)
class LoraRarOptions:
    hypernet: str | None = option(None, "lorarar: the trained hypernetwork .safetensors (train_lorarar.py)")
    layers: tuple | None = option(None, "ziplora/lorarar: UNet layers that get per-column coefficients, e.g. to_q "
                                  "to_out.0", nargs="+", metavar="PATTERN", show_default="the hypernetwork's")
