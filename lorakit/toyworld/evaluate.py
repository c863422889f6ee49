"""Measure concepts in generated toy images: prompts per concept, seeded generation, oracle presence rates."""

from __future__ import annotations

import numpy as np
import torch

from lorakit.toyworld.concepts import BACKGROUND_COLORS, GENERIC_BACKGROUNDS, SHAPE_COLORS, SHAPES, get_concept
from lorakit.toyworld.render import caption
from lorakit.toyworld.scenes import concept_scene

# Sampling settings of every toy measurement (the toy base follows prompts well at these).
NUM_STEPS = 20
GUIDANCE = 4.0


def concept_prompts(name: str, n: int, seed: int = 0) -> list[str]:
    """``n`` prompts that ask for concept ``name`` (trigger word for held-out concepts) in varied generic
    surroundings, written like the training captions."""
    get_concept(name)
    rng = np.random.default_rng(seed)
    return [caption(concept_scene(name, rng)) for _ in range(n)]


def generic_prompts(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """``n`` generic prompts with what each asks for: ``("red circle, cyan plain background",
    {"shape": "circle", "color": "red", "background": "plain"})``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        shape, col = SHAPES[rng.integers(len(SHAPES))], list(SHAPE_COLORS)[rng.integers(len(SHAPE_COLORS))]
        bg, bgc = GENERIC_BACKGROUNDS[rng.integers(3)], list(BACKGROUND_COLORS)[rng.integers(len(BACKGROUND_COLORS))]
        out.append((f"{col} {shape}, {bgc} {bg} background", {"shape": shape, "color": col, "background": bg}))
    return out


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = NUM_STEPS, guidance: float = GUIDANCE,
             batch: int = 16, **kwargs) -> list:
    """Generate one image per prompt (PIL), image ``i`` seeded by ``seed + i`` (independent of batching)."""
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, **kwargs).images
    return images
