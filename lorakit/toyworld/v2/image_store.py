"""Keep a measurement's generated images on disk, so a long measurement can stop at a time budget and continue.

:class:`StoredPipe` wraps a diffusers pipeline as :func:`lorakit.toyworld.evaluate.generate` calls it (a batch of
prompts, one seeded generator per image). A batch whose images are all on disk is read back; any other batch is
generated whole, exactly as without the store (the same prompts in the same batch: the same pixels), and saved as
lossless PNGs. Before generating, it raises :class:`OutOfTime` when the batch would end after the deadline;
running the same measurement again reads back what was made and continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from lorakit.fileio import save_image
from lorakit.toyworld.loras import content_hash, tree_hash


class OutOfTime(RuntimeError):
    """The next batch would end after the deadline; what was generated so far is on disk."""


def pipeline_tag(base: str | os.PathLike, adapter: str | os.PathLike | None = None, scale: float = 1.0) -> str:
    """A folder name for a pipeline's images: a hash of the base's weights, plus the adapter file's bytes and
    scale when a LoRA is loaded (the images change exactly when these do)."""
    tag = "base-" + content_hash({}, Path(base))
    if adapter is not None:
        tag += f"-lora-{tree_hash(Path(adapter))[:16]}-s{scale:g}"
    return tag


class StoredPipe:
    """``pipe`` with its images kept under ``folder`` (one PNG per prompt, seed, steps, guidance and size)."""

    def __init__(self, pipe, folder: str | os.PathLike, deadline: float | None = None, clock=time.monotonic):
        self.pipe, self.folder, self.deadline, self.clock = pipe, Path(folder), deadline, clock
        self.last_batch_s = 0.0
        self.generated = 0

    def __getattr__(self, name):  # vae, load_lora_weights, set_adapters, ...: the wrapped pipeline's
        return getattr(self.pipe, name)

    def _path(self, prompt: str, seed: int, call: dict) -> Path:
        key = json.dumps({"prompt": prompt, "seed": seed, **call}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.png"

    def __call__(self, prompts, generator, **call):
        from PIL import Image

        paths = [self._path(p, g.initial_seed(), call) for p, g in zip(prompts, generator)]
        if all(p.exists() for p in paths):
            return _Output([Image.open(p).convert("RGB") for p in paths])
        if self.deadline is not None and self.clock() + self.last_batch_s > self.deadline:
            raise OutOfTime(f"stopped at the time budget ({self.generated} new images kept in {self.folder})")
        start = self.clock()
        out = self.pipe(prompts, generator=generator, **call)
        self.folder.mkdir(parents=True, exist_ok=True)
        for img, path in zip(out.images, paths):
            save_image(img, path)
        self.last_batch_s = self.clock() - start
        self.generated += len(paths)
        return out


class _Output:
    def __init__(self, images):
        self.images = images
