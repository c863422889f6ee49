"""The sampling methods (``lorakit sample --method``): how each step's UNet passes are combined.

A method is a plan function ``plan(settings, n, n_steps, order, n_rotation) -> (terms, info)``: per step, the
:class:`Term` s (which adapters one UNet pass has active, and the coefficients of its unconditional and
conditional predictions), plus what the image's sidecar records about the schedule. Adding a method is one
plan function and one ``register`` line; :mod:`lorakit.sampling.composer` runs every method's plan through the
same denoising loop, and ``lorakit sample`` lists the registered methods with their help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lorakit.options import option
from lorakit.sampling.schedules import CACHE_REFRESH_RULES, cmlora_plan, switch_schedule

CMLORA_ORDERS = ("auto", "category", "frequency", "given")


@dataclass
class SamplerSettings:
    """Settings of one sampling run (all go into each image's JSON sidecar); the :func:`lorakit.options.option`
    fields are ``lorakit sample`` flags of the same name."""

    method: str = "merge"
    steps: int = option(30, "denoising steps per image", type=int)
    cfg: float = option(7.5, "classifier-free guidance scale", type=float)
    width: int | None = None
    height: int | None = None
    scheduler: str | None = option(None, "ddim, ddpm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras",
                                   show_default="the base's")
    uncond: str = option("adapter", "unconditional half of CFG: each pass's own adapters (the references) or the "
                         "base model's", choices=["adapter", "base"])
    encode: str = option("once", "prompt encoded once with the adapters active at the start (the references) or "
                         "per pass", choices=["once", "per-adapter"])
    prompt_parts: str = option("joint", "joint: every pass sees the whole prompt (the references); per-adapter: "
                               "a pass with one adapter sees its trigger's comma tags plus the tags of no trigger "
                               "(Composable-Diffusion style; not merge); class-words: the whole prompt with the "
                               "other adapters' trigger words taken out (the base's passes: every trigger out; "
                               "not merge)", choices=["joint", "per-adapter", "class-words"])
    triggers: tuple[str, ...] | None = option(None, "--prompt-parts per-adapter or class-words, --masks attention: "
                                               "each adapter's trigger word", nargs="+", metavar="WORD",
                                               show_default="each file's lorakit.trigger metadata")
    adapter_guidance: tuple[float, ...] | None = option(None, "delta: each adapter's difference from the base "
                                                        "times g (one per adapter)", type=float, nargs="+",
                                                        metavar="G", show_default="1 each")
    masks: str = option("none", "delta: each adapter's difference acts everywhere (none) or where the base's "
                        "cross-attention puts the comma tag holding its trigger (attention; a style everywhere, a "
                        "background where no other adapter is)", choices=["none", "attention"])
    mask_threshold: float | None = option(None, "--masks attention: a cell belongs to a concept (mask 1) where its "
                                          "scaled attention is >= T, else 0 (Prompt-to-Prompt's local blending uses "
                                          "0.3)", type=float, show_default="soft masks")
    adapter_start: float = option(0.0, "fraction of the steps the base model samples alone before the adapters "
                                  "act (steps i with i / steps < start; diffusers' control_guidance_start rule): "
                                  "the base lays the scene out from the prompt's class words, the adapters then "
                                  "draw their identities; not cmlora", type=float)
    switch_every: int = option(5, "switch: steps per adapter (tau; the first gets tau + 1)", type=int)
    cmlora_mode: str = option("lorakit", "official: the authors' code exactly, bugs included; lorakit: the same "
                              "with them fixed", choices=["lorakit", "official"])
    cmlora_interval: int = option(0, "cmlora: dominance rotates every 2/3/2 steps (0, the official default), every "
                                  "step (1) or every c steps", type=int)
    cmlora_order: str = option("auto", "cmlora: auto = category order if every kind is known, else frequency "
                               "profiles (official mode: given)", choices=list(CMLORA_ORDERS))
    dominant_weight: float | None = option(None, "cmlora: the dominant adapter's share", type=float,
                                           show_default="the official (N - 0.5) / (2N - 1.5)")
    # None: lorakit mode on; official mode on iff cmlora_interval >= 2 (as the official code); flag --cache on|off
    cache: bool | None = None
    cache_refresh: str = option("round", "cmlora (lorakit mode): besides the newly dominant adapter, refresh the "
                                "adapters outside the rotation once per round (round), nothing else (dominant) or "
                                "every cache older than --cache-max-age (age)", choices=list(CACHE_REFRESH_RULES))
    cache_max_age: int = option(5, "cmlora --cache-refresh age: oldest cache, in steps", type=int)
    cache_depth: int = option(1, "cmlora: the cache split lies in the D-th up block from the end (1: the "
                              "official)", type=int)
    cache_layer: int | None = option(None, "cmlora: split before layer K of that up block; shallow passes "
                                     "recompute only what follows", type=int,
                                     show_default="1 in lorakit mode, 0 = the official split")

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        choices = {"method": tuple(SAMPLERS), "uncond": ("adapter", "base"), "encode": ("once", "per-adapter"),
                   "prompt_parts": ("joint", "per-adapter", "class-words"), "masks": ("none", "attention"),
                   "cmlora_mode": ("lorakit", "official"), "cmlora_order": CMLORA_ORDERS,
                   "cache_refresh": CACHE_REFRESH_RULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("steps", "switch_every", "cache_max_age", "cache_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.adapter_start < 1.0:
            raise ValueError(f"adapter_start must be in [0, 1), got {self.adapter_start}")
        if self.adapter_start and self.method == "cmlora":
            raise ValueError("adapter_start does not apply to cmlora (its caches and rotation start at step 0)")
        if self.cmlora_interval < 0:
            raise ValueError(f"cmlora_interval must be >= 0, got {self.cmlora_interval}")
        if self.cache_layer is not None and self.cache_layer < 0:
            raise ValueError(f"cache_layer must be >= 0, got {self.cache_layer}")
        if self.dominant_weight is not None and not 0.0 < self.dominant_weight <= 1.0:
            raise ValueError(f"dominant_weight must be in (0, 1], got {self.dominant_weight}")
        if self.adapter_guidance is not None:
            if self.method != "delta":
                raise ValueError(f"adapter_guidance needs method delta, got {self.method!r}")
            if any(g < 0 for g in self.adapter_guidance):
                raise ValueError(f"adapter_guidance values must be >= 0, got {list(self.adapter_guidance)}")
        if self.masks == "attention" and (self.method != "delta" or self.prompt_parts == "per-adapter"):
            raise ValueError("masks attention needs method delta with prompt_parts joint or class-words")
        if self.mask_threshold is not None and (self.masks != "attention" or not 0.0 < self.mask_threshold < 1.0):
            raise ValueError(f"mask_threshold needs masks attention and a value in (0, 1), got {self.mask_threshold}")
        if self.prompt_parts != "joint" and self.method == "merge":
            raise ValueError(f"prompt_parts {self.prompt_parts} needs passes with one adapter; merge has none")
        if self.method == "cmlora" and self.cmlora_mode == "official":
            extras = {"uncond": self.uncond != "adapter", "encode": self.encode != "once",
                      "prompt_parts": self.prompt_parts != "joint",
                      "dominant_weight": self.dominant_weight is not None, "cmlora_order": self.cmlora_order == "frequency",
                      "cache_layer": bool(self.cache_layer)}
            bad = [k for k, v in extras.items() if v]
            if bad:
                raise ValueError(f"cmlora_mode official reproduces the official code; drop {', '.join(bad)} "
                                 "(lorakit's options need cmlora_mode lorakit)")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {v}")

    def cmlora_cache_layer(self, unet) -> int:
        """The split layer inside ``up_blocks[-cache_depth]``: the setting, else 0 in official mode (the official
        split, the block's input) and 1 in lorakit mode (one layer more cached: measured in docs/sampling.md),
        capped at the block's last layer."""
        if self.cache_layer is not None:
            return self.cache_layer
        if self.cmlora_mode == "official":
            return 0
        n_layers = len(unet.up_blocks[len(unet.up_blocks) - self.cache_depth].resnets)
        return min(1, n_layers - 1)

    def cmlora_cache(self) -> bool:
        if self.cache is not None:
            return self.cache
        return self.cmlora_interval >= 2 if self.cmlora_mode == "official" else True


@dataclass(frozen=True)
class Term:
    """One UNet pass of a step: adapters active (indices; () = base model), coefficients of its unconditional
    and conditional predictions, and for cached passes whether it is a full pass."""

    adapters: tuple[int, ...]
    u: float
    c: float
    full: bool = True
    cached: bool = False
    # --prompt-parts per-adapter: the prompt part of adapter `part` (a base pass on one adapter's part); None:
    # a one-adapter pass sees its own part, any other pass the whole prompt
    part: int | None = None


@dataclass
class Plan:
    """What the loop needs from a method: the terms of each step and what the sidecar records."""

    terms: list[list[Term]]
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sampler:
    """One sampling method: its plan function and its ``--help`` line."""

    plan: Callable[..., tuple[list[list[Term]], dict]]
    help: str


SAMPLERS: dict[str, Sampler] = {}  # in the order --help lists them


def register(name: str, sampler: Sampler) -> None:
    SAMPLERS[name] = sampler


def merge_plan(settings: SamplerSettings, n: int, n_steps: int, order=None, n_rotation=None):
    return [[Term(tuple(range(n)), 1.0, 1.0)]] * n_steps, {}


def switch_plan(settings: SamplerSettings, n: int, n_steps: int, order=None, n_rotation=None):
    active = switch_schedule(n_steps, n, settings.switch_every)
    return [[Term((a,), 1.0, 1.0)] for a in active], {"active_per_step": active}


def composite_plan(settings: SamplerSettings, n: int, n_steps: int, order=None, n_rotation=None):
    return [[Term((i,), 1.0 / n, 1.0 / n) for i in range(n)]] * n_steps, {}


def delta_plan(settings: SamplerSettings, n: int, n_steps: int, order=None, n_rotation=None):
    """``p_base + sum_i g_i (p_i - p_base)``: g = ``settings.adapter_guidance`` (default 1 each). With per-adapter
    prompt parts each difference is taken on the adapter's own part, ``p_i(part_i) - p_base(part_i)``, so the
    prompt's difference from the part never enters it (N more base passes)."""
    gains = [1.0] * n if settings.adapter_guidance is None else [float(g) for g in settings.adapter_guidance]
    if len(gains) != n:
        raise ValueError(f"adapter_guidance has {len(gains)} values for {n} adapters")
    if settings.prompt_parts == "per-adapter":
        step = [Term((), 1.0, 1.0)] + [t for i, g in enumerate(gains) for t in (Term((i,), g, g), Term((), -g, -g, part=i))]
        return [step] * n_steps, {}
    base = 1.0 - sum(gains)
    return [[Term((), base, base)] + [Term((i,), g, g) for i, g in enumerate(gains)]] * n_steps, {}


def cmlora_terms(settings: SamplerSettings, n: int, n_steps: int, order: list[int] | None, n_rotation: int | None):
    order = list(range(n)) if order is None else list(order)
    if sorted(order) != list(range(n)):
        raise ValueError(f"cmlora order {order} must be a permutation of 0..{n - 1}")
    cache = settings.cmlora_cache()
    plan = cmlora_plan(n_steps, order, n_rotation or n, settings.cmlora_interval, settings.cmlora_mode, cache,
                       settings.cache_refresh, settings.cache_max_age, settings.dominant_weight)
    terms = [[Term((order[p],), w[p], w[p], full[p], cache) for p in range(n)] for w, full in zip(plan.weights, plan.full)]
    info = dict(order=order, n_rotation=n_rotation or n, dominants=[order[d] for d in plan.dominant],
                rotations=plan.rotations, cache=cache, plan=[[int(f) for f in row] for row in plan.full])
    return terms, info


register("merge", Sampler(merge_plan, "all adapters active in one UNet pass"))
register("switch", Sampler(switch_plan, "LoRA Switch: one adapter per step, rotated every --switch-every steps"))
register("composite", Sampler(composite_plan, "LoRA Composite: each adapter in its own pass, predictions averaged"))
register("cmlora", Sampler(cmlora_terms, "CMLoRA: composite with a rotating dominant adapter and a per-adapter "
                                         "deep-feature cache"))
register("delta", Sampler(delta_plan, "base + the sum of each adapter's difference from the base (docs/sampling.md)"))


def _with_uncond_base(terms: list[Term]) -> list[Term]:
    """The same terms with their unconditional halves replaced by one base-model unconditional pass (the base's
    conditional coefficient, delta's 1 - N, is kept: delta then adds each adapter's conditional difference from
    the base to the base's own CFG; base passes on an adapter's prompt part keep their conditional half)."""
    base_c = sum(t.c for t in terms if not t.adapters and t.part is None)
    return [Term((), 1.0, base_c)] + [Term(t.adapters, 0.0, t.c, t.full, t.cached, t.part) for t in terms
                                      if t.adapters or t.part is not None]


def method_plan(settings: SamplerSettings, n: int, n_steps: int, order: list[int] | None, n_rotation: int | None) -> Plan:
    """The terms of every step for ``settings.method`` with ``n`` adapters."""
    terms, info = SAMPLERS[settings.method].plan(settings, n, n_steps, order, n_rotation)
    if settings.uncond == "base":
        terms = [_with_uncond_base(step) for step in terms]
    base_steps = sum(1 for i in range(n_steps) if i / n_steps < settings.adapter_start)
    if base_steps:
        terms = [[Term((), 1.0, 1.0)]] * base_steps + list(terms[base_steps:])
        info = {**info, "base_steps": base_steps}
    return Plan(terms, info)
