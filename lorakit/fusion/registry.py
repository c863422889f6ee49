"""The fusion methods ``lorakit fuse`` offers: name -> :class:`FusionMethod`.

Adding a method is one module with ``run(inputs: lorakit.fusion.FuseInputs) -> lorakit.fusion.FuseResult`` (its
settings arrive as ``inputs.settings``, an instance of the method's settings dataclass) and one ``register``
line below. The settings dataclass's :func:`lorakit.options.option` fields become the command's flags and help.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from lorakit.fusion.settings import GradientOptions, LoraRarOptions, MergeOptions, NoSettings, ZipLoRAOptions


@dataclass(frozen=True)
class FusionMethod:
    """One fusion method: where its ``run`` lives (``"module:function"``), what it computes, what it needs."""

    run: str
    help: str
    settings: type = NoSettings
    needs_base: bool = False
    default_format: str = "adapter"  # what --out-format auto writes
    memory_stage: str | None = None  # lorakit.memory.estimate's stage; None: no memory check

    def load(self):
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)


METHODS: dict[str, FusionMethod] = {}  # in the order --help lists them


def register(name: str, method: FusionMethod) -> None:
    METHODS[name] = method


register("gradient", FusionMethod(
    "lorakit.fusion.gradient:run",
    "Mix-of-Show gradient fusion, closed form: per layer W* = argmin sum_i ||W X_i - (W0 + w_i dW_i) X_i||^2 "
    "(+ a ridge toward the weighted average, chosen per layer on held-out activations) from each concept's "
    "recorded activations; writes a fused pipeline folder (or, with --out-format adapter, the delta W* - W0)",
    GradientOptions, needs_base=True, default_format="pipeline", memory_stage="fuse-gradient"))
register("weighted", FusionMethod(
    "lorakit.fusion.merge:run", "W0 + (1/N) sum_i w_i dW_i (average, Mix-of-Show's weight fusion); --combine sum "
    "drops the 1/N; exact (rank = sum of ranks)", MergeOptions))
register("cat", FusionMethod(
    "lorakit.fusion.merge:run", "sum_i w_i dW_i exactly: factors stacked, rank = sum of ranks (peft's cat)",
    MergeOptions))
register("svd", FusionMethod(
    "lorakit.fusion.merge:run", "sum_i w_i dW_i (or the average with --combine average) truncated by SVD to "
    "--rank (default: the largest input rank)", MergeOptions))
register("ties", FusionMethod(
    "lorakit.fusion.merge:run", "TIES (peft merge_utils.ties): keep the top --density of each w_i-weighted delta, "
    "elect a sign per entry, average the agreeing entries; SVD to --rank", MergeOptions))
register("dare", FusionMethod(
    "lorakit.fusion.merge:run", "DARE (peft dare_linear / dare_ties): drop entries at random keeping --density, "
    "rescale by 1/density, weighted sum (or TIES merge); SVD to --rank", MergeOptions))
register("ziplora", FusionMethod(
    "lorakit.fusion.ziplora:run_fuse", "ZipLoRA: --adapters CONTENT STYLE; per-column coefficients m_c, m_s "
    "(init 1) optimised --steps (default 100) on the base so the merge reproduces each LoRA on its reference "
    "images; exact rank r_c + r_s LoRA", ZipLoRAOptions, needs_base=True, memory_stage="ziplora"))
register("lorarar", FusionMethod(
    "lorakit.fusion.lorarar:run_fuse", "LoRA.rar: --adapters CONTENT STYLE merged in one forward pass of a "
    "trained --hypernet (train_lorarar.py); exact rank r_c + r_s LoRA", LoraRarOptions))  # one hypernetwork pass, no base model (~1.1 GiB at SD 1.5 size)
