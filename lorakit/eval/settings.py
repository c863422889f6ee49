"""Settings of each metric (torch-free: ``lorakit eval --help`` builds its flags from these dataclasses).

:class:`EvalSettings` holds what every metric shares; each metric's class adds its own fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.options import option


@dataclass(frozen=True)
class EvalSettings:
    images: str | None = option(None, "folder of images with sidecars (clipscore, judge, oracle)")
    recursive: bool = option(False, "also read images in sub-folders", action="store_true")
    out: str | None = option(None, "output path without suffix", show_default="IMAGES/eval_METRIC, ./eval_retention")
    batch_size: int = option(16, "images (or retention samples) per batch", type=int)
    device: str | None = option(None, "torch device", show_default="cuda if available, else cpu")
    prompt: str | None = option(None, "clipscore/judge: score every image against this prompt instead of its "
                                "sidecar's")


@dataclass(frozen=True)
class ClipScoreSettings(EvalSettings):
    clip_model: str = option("openai/clip-vit-base-patch16", "transformers CLIP folder or hub id",
                             show_default="openai/clip-vit-base-patch16, as in the papers")


@dataclass(frozen=True)
class JudgeSettings(EvalSettings):
    judge_url: str | None = option(None, "API base URL, e.g. http://localhost:8000/v1")
    judge_model: str | None = option(None, "model name the endpoint serves")
    judge_key_env: str | None = option(None, "environment variable holding the API key",
                                       show_default="LORAKIT_JUDGE_API_KEY, then OPENAI_API_KEY; none for local "
                                       "servers")
    protocol: str = option("pairwise", "pairwise: --images vs --against, composition/quality 0-10 asked in both "
                           "orders and averaged; yesno: one yes/no question per concept per image",
                           choices=["pairwise", "yesno"])
    against: str | None = option(None, "pairwise: the folder of images to compare with (paired by file name)")
    subject: str | None = option(None, "yesno: ask for this subject in every image (instead of the sidecar concepts)")
    style: str | None = option(None, "yesno: ask for this style in every image (instead of the sidecar concepts)")
    judge_cache: str | None = option(None, "answer cache JSON", show_default="IMAGES/judge_cache.json")
    retries: int = option(3, "transport retries with exponential backoff", type=int)
    parse_retries: int = option(2, "re-asks after a malformed answer", type=int)
    timeout: float = option(120.0, "seconds per request", type=float, show_default="120")
    workers: int = option(1, "parallel requests", type=int)


@dataclass(frozen=True)
class RetentionSettings(EvalSettings):
    base: str | None = option(None, "base model: diffusers folder, .safetensors checkpoint, hub id or tiny:ARCH")
    adapters: tuple | None = option(None, "the concepts' own adapter files", nargs="+")
    fused: str | None = option(None, "fused model: diffusers folder, adapter file (fused-delta or merged LoRA), or "
                               "merge[:W] (every adapter active at weight W, default 0.8)")
    prompts: tuple | None = option(None, "prompts per adapter, in --adapters order, several separated by '|'",
                                   nargs="+", show_default="from each adapter's lorakit.trigger: '{trigger}' and "
                                   "'a picture of {trigger}'")
    samples: int = option(8, "noisy latents per concept", type=int)
    seed: int = option(0, "seed of the noisy latents", type=int)
