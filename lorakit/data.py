"""Training data: image folders with captions, tag shuffling, aspect buckets, regularisation images, latent cache.

(The dataset classes follow below the config; :class:`DataConfig` is imported by the shared training loop.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """``data.*`` keys of every training recipe.

    ``path``: a folder of images with same-name ``.txt`` captions, or a ``datasets`` imagefolder with
    ``metadata.jsonl`` (``file_name`` + ``text``/``caption`` columns).
    """

    path: str = ""
    caption_extension: str = ".txt"
    default_caption: str = ""  # used for images without a caption
    repeats: int = 1
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    shuffle_tags: bool = False  # shuffle comma-separated tags ...
    keep_tokens: int = 0  # ... keeping the first N tags in place
    caption_dropout: float = 0.0  # probability of an empty caption
    buckets: bool = False  # aspect-ratio buckets
    bucket_min: int = 256
    bucket_max: int = 1024
    bucket_step: int = 64
    reg_path: str | None = None  # regularisation (prior-preservation) images
    reg_weight: float = 1.0
    reg_repeats: int = 1
    cache_latents: bool = False
    cache_dir: str | None = None  # default: <output_dir>/latent_cache
    on_bad_image: str = "error"  # error | skip
