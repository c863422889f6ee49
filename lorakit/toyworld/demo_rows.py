"""The rows ``lorakit demo`` samples: one :class:`RowRunner` per process builds each row's image generator.

Rows whose adapters stay the same for every step (a LoRA alone, merge) and the fusions are sampled from a plain
pipeline with deltas written into its weights; the rows that switch adapters during sampling (``ADAPTER_ROWS``) from
a pipeline holding both LoRAs as peft adapters.
"""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path

from lorakit.adapters.io import load_adapter
from lorakit.fusion.gradient import Concept as FuseConcept
from lorakit.fusion.gradient import GradientSettings, fuse_gradient
from lorakit.fusion.merge import apply_deltas, weighted
from lorakit.sampling import (
    ProfileSettings,
    SamplerSettings,
    generate,
    load_adapters,
    load_pipeline,
    order_by_frequency,
    profile_adapters,
)

BATCH = 8  # images generated together (each still from its own seed's generator)


def _plain(pipe, prompt: str, seeds: list[int], steps: int, guidance: float) -> list:
    """Images from a pipeline without adapters, seeded like :func:`lorakit.sampling.generate` (one CPU generator
    per image)."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        return pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    output_type="pil").images


class RowRunner:
    """Builds each row's image generator: ``setup()`` (timed as setup_s) returns ``gen(seeds) -> images``.

    Two pipelines, each loaded on first use: ``pipe`` holds both LoRAs as peft adapters (``ADAPTER_ROWS``: the
    methods that change adapters during sampling) and ``plain`` holds the base weights, restored from a copy
    before each row that writes into them (base, each LoRA alone, merge, the fusions). A row whose adapters stay
    the same for every step (a LoRA alone, merge) is sampled with their deltas added to the weights: the same
    sum as peft's set_adapters, without its extra passes through every LoRA layer. A process that samples only
    one kind of row loads one pipeline.
    """

    def __init__(self, s, loras: dict, prompt: str, world):  # s: lorakit.toyworld.demo.DemoSettings
        self.s, self.prompt, self.world = s, prompt, world
        self.base = s.base or world.base()
        self.loras = loras  # read when a row first needs a file: one LoRA's rows may run while the other trains
        self._files: dict = {}

    @property
    def paths(self) -> list[str]:
        return [self.loras[self.s.character]["path"], self.loras[self.s.second]["path"]]

    @cached_property
    def pipe(self):
        return load_pipeline(self.base, "fp32")

    @cached_property
    def ads(self):
        return load_adapters(self.pipe, self.paths, [self.s.scale] * 2)

    def file(self, name: str):
        if name not in self._files:
            self._files[name] = load_adapter(self.loras[name]["path"])
        return self._files[name]

    @property
    def files(self) -> list:
        return [self.file(self.s.character), self.file(self.s.second)]

    @cached_property
    def plain(self):
        return load_pipeline(self.base, "fp32")

    @cached_property
    def _weights(self):  # taken before any row writes into ``plain``: every such row restores it first
        return {name: _state_copy(getattr(self.plain, name)) for name in _WRITTEN}

    def sampler(self, method: str):
        return SamplerSettings(method=method, steps=self.s.sample_steps, cfg=self.s.guidance)

    def _restored(self):
        """``plain`` with the base weights back (bit-exact), whatever an earlier row wrote into them."""
        for name, state in self._weights.items():
            getattr(self.plain, name).load_state_dict(state)
        return self.plain

    def _fused_gen(self, files: list):
        """Sampling of ``plain`` with ``files``' deltas at the demo's scale added to its weights (merge of them)."""
        pipe = self._restored()
        apply_deltas(pipe, weighted(files, [self.s.scale] * len(files), combine="sum"))
        return lambda seeds: generate(pipe, [], self.sampler("merge"), self.prompt, "", seeds)[0]

    def setup(self, row: str):
        s, prompt = self.s, self.prompt
        if row == "base":
            pipe = self._restored()
            return lambda seeds: _plain(pipe, prompt, seeds, s.sample_steps, s.guidance), {}
        if row in (f"{s.character}_only", f"{s.second}_only"):
            return self._fused_gen([self.file(s.character if row == f"{s.character}_only" else s.second)]), {}
        if row == "merge":
            return self._fused_gen(self.files), {}
        if row in ("switch", "composite"):
            return lambda seeds: generate(self.pipe, self.ads, self.sampler(row), prompt, "", seeds)[0], {}
        if row == "cmlora":
            return self._cmlora()
        if row == "delta-masked-classes-ubase":
            return self._lorakit_delta()
        if row == "gradient":
            return self._gradient()
        if row == "weighted":
            pipe = self._restored()
            apply_deltas(pipe, weighted(self.files, [s.scale] * 2, combine="average"))
            return lambda seeds: _plain(pipe, prompt, seeds, s.sample_steps, s.guidance), {"combine": "average"}
        raise ValueError(f"unknown demo method {row!r}")

    def _cmlora(self):
        prof = ProfileSettings(base=self.base, prompt="a picture", steps=self.s.sample_steps, cfg=self.s.guidance)
        profiles = profile_adapters(self.pipe, self.ads, prof, progress=False)  # cached next to the LoRA files
        order, _ = order_by_frequency([profiles[a.name]["score"] for a in self.ads], "high-first")
        info = {"order": [Path(self.ads[i].path).name for i in order],
                "profile_cached": all(p["cached"] for p in profiles.values())}
        return (lambda seeds: generate(self.pipe, self.ads, self.sampler("cmlora"), self.prompt, "", seeds,
                                       order=order)[0]), info

    def _lorakit_delta(self):
        settings = SamplerSettings(**LORAKIT_DELTA, steps=self.s.sample_steps, cfg=self.s.guidance)
        kinds = [self.world.kind(self.s.character), self.world.kind(self.s.second)]  # a background: around the other
        return (lambda seeds: generate(self.pipe, self.ads, settings, self.prompt, "", seeds, kinds=kinds)[0]), {
            "sampler": LORAKIT_DELTA, "kinds": kinds}

    def _gradient(self):
        s = self.s
        pipe = self._restored()
        concepts = []
        for name, adapter in zip((s.character, s.second), self.files):
            prompts, held = self.world.fusion_prompts(name)  # held: other captions for the ridge choice
            concepts.append(FuseConcept(name=name, adapter=adapter, weight=s.scale, prompts=prompts,
                                        sample_prompts=prompts[:2], val_prompts=held, val_sample_prompts=held,
                                        trigger=self.world.trigger(name)))
        # lorakit fuse's capture steps (10, measured as good as 20 on held-out activations: docs/fusion.md)
        out = fuse_gradient(pipe, concepts, GradientSettings(seed=s.seed, progress=False))
        res = [r["residual"] for r in out["layers"].values() if r.get("residual") is not None]
        info = {"layers": len(out["layers"]), "mean_residual": sum(res) / len(res) if res else None,
                "prompts": {c.name: c.prompts for c in concepts}, "capture_steps": GradientSettings.steps}
        return lambda seeds: _plain(pipe, self.prompt, seeds, s.sample_steps, s.guidance), info


# the ``lorakit sample`` settings of the demo's lorakit row (the benchmark's delta-masked-classes-ubase)
LORAKIT_DELTA = {"method": "delta", "masks": "attention", "prompt_parts": "class-words", "uncond": "base"}
_WRITTEN = ("unet", "text_encoder")  # the components the fusions and fused rows write into
# the rows sampled on ``RowRunner.pipe``; the others use ``plain``
ADAPTER_ROWS = ("switch", "composite", "cmlora", "delta-masked-classes-ubase")
# With 2 jobs the second process samples these (on its own ``pipe``) and the first the rest: measured per image
# (2026-12-06) composite 1.05 s, lorakit's delta 1.10 s, CMLoRA 0.61 s + its profile, switch 0.61 s, the
# base-pipeline rows 0.45 s; so the two processes' shares after training are about equal.
SECOND_PROCESS_ROWS = ("composite", "cmlora", "delta-masked-classes-ubase")


def sample_rows(runner: RowRunner, rows: list[str], seeds: list[int], bar=None) -> dict:
    """``{row: (images, seconds per image, setup seconds, info)}``, the rows in order, ``BATCH`` images at a time."""
    out = {}
    for row in rows:
        if bar is not None:
            bar.set_postfix_str(f"{row}: setup")
        t0 = time.perf_counter()
        gen, info = runner.setup(row)
        setup_s = time.perf_counter() - t0
        if bar is not None:
            bar.set_postfix_str(row)
        images, t1 = [], time.perf_counter()
        for i in range(0, len(seeds), BATCH):  # a batch costs about half as much per image as one at a time
            images += gen(seeds[i:i + BATCH])
            if bar is not None:
                bar.update(len(seeds[i:i + BATCH]))
        out[row] = (images, (time.perf_counter() - t1) / len(seeds), setup_s, info)
    return out


def _state_copy(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
