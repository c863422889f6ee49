"""Training the LoRA.rar merging hypernetwork on the shared loop.

``accelerate launch train_lorarar.py --config train_configs/<recipe>.yaml [key=value ...]`` trains one
:class:`~lorakit.fusion.lorarar.MergerHypernet` over every (content, style) pair of the config's LoRAs. One
training sample is one pair: the hypernetwork predicts the coefficients of every merged layer of the pair, and
the loss is ZipLoRA's (:class:`~lorakit.fusion.ziplora.ZipLoRALoss`) on ``ref_batch_size`` noisy reference
latents of each LoRA. Every random draw (which references, noise, timesteps) is keyed by the sample's global id,
so 2 processes x batch b train the same network as 1 process x batch 2b, and resume is exact.

LoRAs: ``content`` / ``style`` list file paths or globs, or mappings ``{path, images, prompt}`` (``images``: a
folder of reference images with optional same-name .txt captions). Where no images are given or named in the
file's metadata, references are generated with that LoRA alone (a warning says so). ``synthetic`` adds random
LoRAs (:func:`lorakit.adapters.synthetic.random_adapter`) for smoke tests and the CPU toy recipe. ``eval_pairs`` (or
``synthetic.eval_pairs``) are held-out pairs: at the end the loss of their plain sum, of the untrained network and
of the trained network is measured on the same noise, printed, and stored in the hypernetwork's metadata.

Output: ``<output_dir>/<output_name>.safetensors`` (the hypernetwork, its config in the header), used by
``lorakit fuse --method lorarar --hypernet FILE --adapters CONTENT STYLE --out merged.safetensors``.
"""

from __future__ import annotations

import copy
import glob
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# looked up at call time: tests replace models.load_base
from lorakit import models as base_models
from lorakit.adapters.io import load_adapter, validate_adapter
from lorakit.adapters.synthetic import random_adapter
from lorakit.conditioning import pixel_size
from lorakit.config import to_dict
from lorakit.fusion.lorarar import MergerHypernet, hypernet_widths, save_hypernet
from lorakit.fusion.ziplora import (
    ZipLoRALoss,
    eval_batches,
    noise_scheduler_of,
    ones_coefficients,
    plan_merge,
    reference_for,
)
from lorakit.logs import note
from lorakit.memory import check_training
from lorakit.models import pipeline_arch
from lorakit.precision import torch_dtype
from lorakit.rng import sample_generator
from lorakit.training.entry import main as entry_main
from lorakit.training.loop import (
    TrainLoop,
    build_optimizer,
    make_accelerator,
    preflight,
)
from lorakit.training.recipes import LoraRarConfig, SyntheticConfig
from lorakit.training.setup import FROZEN

SALT_PAIR = 80  # per-sample stream of the reference draws / noise / timesteps of one pair






@dataclass
class LoraEntry:
    """One input LoRA and its reference data."""

    name: str
    adapter: Any
    ref: Any = None


def expand_entries(items, key: str) -> list[dict]:
    """Config list -> ``[{path, images, prompt}]`` with globs expanded (sorted).

    Raises:
        FileNotFoundError naming the config key and the path or pattern that matched nothing.
    """
    out = []
    for item in items or []:
        spec = dict(item) if hasattr(item, "keys") else {"path": str(item)}
        if "path" not in spec:
            raise ValueError(f"{key}: entry {spec} has no 'path'")
        unknown = set(spec) - {"path", "images", "prompt"}
        if unknown:
            raise ValueError(f"{key}: entry {spec['path']!r} has unknown keys {sorted(unknown)} (expected path, images, prompt)")
        pattern = str(spec["path"])
        paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not paths or not all(Path(p).is_file() for p in paths):
            missing = pattern if not paths else next(p for p in paths if not Path(p).is_file())
            raise FileNotFoundError(f"{key}: no LoRA file at {missing!r}")
        out += [{**spec, "path": p} for p in paths]
    return out


def load_entries(cfg, pipe) -> tuple[list[LoraEntry], list[LoraEntry], list[tuple[LoraEntry, LoraEntry]]]:
    """The content LoRAs, style LoRAs and held-out eval pairs of a config, with their references."""
    size = cfg.reference_size or None
    refs_cache: dict[str, LoraEntry] = {}

    def entry(spec, seed) -> LoraEntry:
        path = spec["path"]
        if path not in refs_cache:
            adapter = load_adapter(path)
            validate_adapter(adapter, pipe, path)
            ref = reference_for(pipe, adapter, path, images=spec.get("images"), prompt=spec.get("prompt"),
                                num_images=cfg.num_ref_images, generate_steps=cfg.generate_steps, seed=seed, size=size)
            refs_cache[path] = LoraEntry(path, adapter, ref)
        return refs_cache[path]

    content = [entry(s, 1000 + i) for i, s in enumerate(expand_entries(cfg.content, "content"))]
    style = [entry(s, 2000 + i) for i, s in enumerate(expand_entries(cfg.style, "style"))]
    evals = []
    for i, pair in enumerate(cfg.eval_pairs or []):
        if len(pair) != 2:
            raise ValueError(f"eval_pairs[{i}]: expected [content, style], got {list(pair)}")
        c = expand_entries([pair[0]], f"eval_pairs[{i}][0]")
        s = expand_entries([pair[1]], f"eval_pairs[{i}][1]")
        evals.append((entry(c[0], 3000 + i), entry(s[0], 4000 + i)))
    syn_c, syn_s, syn_e = synthetic_entries(cfg, pipe)
    return content + syn_c, style + syn_s, evals + syn_e


def synthetic_entries(cfg, pipe):
    """Random content/style LoRAs and held-out pairs per ``cfg.synthetic`` (seeded by ``cfg.seed``)."""
    syn = cfg.synthetic
    if syn.images not in ("random", "generate"):
        raise ValueError(f"synthetic.images={syn.images!r}: expected 'random' or 'generate'")
    size = cfg.reference_size or pixel_size(pipe)

    def make(kind: str, i: int) -> LoraEntry:
        seed = cfg.seed * 100_003 + (0 if kind == "content" else 50_000) + i
        blocks = syn.content_blocks if kind == "content" else syn.style_blocks
        adapter = random_adapter(pipe, blocks, rank=syn.rank, alpha=syn.alpha, seed=seed, std=syn.std)
        trigger = f"{kind} {i}"
        adapter.metadata["lorakit.trigger"] = trigger
        name = f"synthetic-{kind}-{i}"
        if syn.images == "random":
            g = torch.Generator().manual_seed(seed)
            images = torch.rand(cfg.num_ref_images, 3, size, size, generator=g) * 2 - 1
            ref = reference_for(pipe, adapter, name, images=images, prompt=trigger)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = reference_for(pipe, adapter, name, prompt=trigger, num_images=cfg.num_ref_images,
                                    generate_steps=cfg.generate_steps, seed=seed, size=size)
        return LoraEntry(name, adapter, ref)

    content = [make("content", i) for i in range(syn.content)]
    style = [make("style", i) for i in range(syn.style)]
    n = syn.eval_pairs
    evals = [(make("content", syn.content + i), make("style", syn.style + i)) for i in range(n)]
    return content, style, evals


class PairDataset(torch.utils.data.Dataset):
    """Every (content, style) combination: item ``{"content": i, "style": j}``."""

    def __init__(self, n_content: int, n_style: int):
        if n_content < 1 or n_style < 1:
            raise ValueError(
                f"need at least one content and one style LoRA to train on (got {n_content} content, {n_style} style); "
                "set `content` / `style` (paths or globs) or `synthetic.content` / `synthetic.style`"
            )
        self.pairs = [(i, j) for i in range(n_content) for j in range(n_style)]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, k):
        i, j = self.pairs[k]
        return {"content": i, "style": j}


def pair_loss(pipe, noise_scheduler, content: LoraEntry, style: LoraEntry, merge_layers, lam: float):
    """The :class:`ZipLoRALoss` of one pair on the pipeline's UNet."""
    plan = plan_merge(content.adapter, style.adapter, merge_layers)
    if not plan.merged:
        raise ValueError(f"{content.name} + {style.name}: no layer both touch matches merge_layers {list(merge_layers)}")
    return ZipLoRALoss(pipe.unet, noise_scheduler, plan, content.ref, style.ref, lam=lam)


@torch.no_grad()
def batch_losses(pipe, noise_scheduler, content: LoraEntry, style: LoraEntry, nets: dict, cfg, n: int,
                 seed: int) -> dict[str, list[float]]:
    """Per-batch ZipLoRA loss of one pair merged by each of ``nets`` (``{name: hypernetwork, or None for the plain
    sum}``), all on the same ``n`` noise batches (``cfg.ref_batch_size`` items each) drawn from ``seed``: paired
    values, for comparing merges batch by batch."""
    lf = pair_loss(pipe, noise_scheduler, content, style, cfg.merge_layers, cfg.lam)
    batches = eval_batches(lf, n=n, batch_size=cfg.ref_batch_size, seed=seed)
    out = {}
    for name, net in nets.items():
        coeffs = ones_coefficients(lf.plan, lf.device) if net is None else net.coefficients(lf.plan, lf.deltas)
        out[name] = [lf(coeffs, b)[0].item() for b in batches]
    return out


def evaluate_pairs(pipe, noise_scheduler, hypernet, pairs, cfg, init_net=None) -> list[dict]:
    """Mean loss of the plain sum, the untrained network (``init_net``) and ``hypernet`` on each held-out pair, on
    the same fixed noise (``cfg.eval_batches`` batches drawn from ``cfg.seed + 7``)."""
    nets = {"sum": None, **({"init": init_net} if init_net is not None else {}), "lorarar": hypernet}
    rows = []
    for c, s in pairs:
        losses = batch_losses(pipe, noise_scheduler, c, s, nets, cfg, cfg.eval_batches, cfg.seed + 7)
        rows.append({"content": c.name, "style": s.name, **{k: sum(v) / len(v) for k, v in losses.items()}})
    return rows



# --------------------------------------------------------------------------------------------------- the recipe


@dataclass
class Run:
    """What the phases of one hypernetwork training build and the loop's callables use."""

    cfg: Any
    accelerator: Any
    pipe: Any
    dtype: torch.dtype
    content: list = None
    style: list = None
    evals: list = None
    noise_scheduler: Any = None
    net: Any = None
    init_net: Any = None


def check_recipe(cfg, pipe) -> Run:
    """Config values and output_dir before any model loads; the accelerator (every pair may leave some merged
    layer without a gradient, so DDP looks for unused parameters)."""
    preflight(cfg)
    if cfg.ref_batch_size < 1:
        raise ValueError(f"ref_batch_size must be >= 1, got {cfg.ref_batch_size}")
    accelerator = make_accelerator(cfg, find_unused_parameters=True)
    dtype = torch_dtype(cfg.mixed_precision, "mixed_precision")
    if pipe is None and not cfg.base_model:
        raise ValueError("base_model is not set: the base the LoRAs were trained on (a folder, .safetensors or tiny:sd1)")
    check_training("lorarar", cfg, pipe if pipe is not None else cfg.base_model, dtype, rank=4)
    return Run(cfg, accelerator, pipe, dtype)


def setup_models(run: Run) -> None:
    """Load the base, freeze it (eval mode) and move it to the device."""
    pipe = run.pipe if run.pipe is not None else base_models.load_base(run.cfg.base_model)
    for name in FROZEN:
        model = getattr(pipe, name, None)
        if model is not None:
            model.requires_grad_(False)
            model.eval()
    pipe.to(run.accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    if run.cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    run.pipe = pipe


def setup_data(run: Run) -> tuple[PairDataset, list]:
    """The LoRAs with their references (made in fp32), then the base in the compute dtype; every training pair
    must share a merged layer. Returns the pair dataset and the merge plans of the training and held-out pairs."""
    cfg, pipe = run.cfg, run.pipe
    run.content, run.style, run.evals = load_entries(cfg, pipe)
    if run.dtype != pipe.unet.dtype:
        pipe.to(dtype=run.dtype)
    run.noise_scheduler = noise_scheduler_of(pipe)
    dataset = PairDataset(len(run.content), len(run.style))
    plans = [plan_merge(c.adapter, s.adapter, cfg.merge_layers) for c in run.content for s in run.style]
    n_style = len(run.style)
    empty = [f"{run.content[k // n_style].name} + {run.style[k % n_style].name}"
             for k, p in enumerate(plans) if not p.merged]
    if empty:
        raise ValueError(f"no layer both LoRAs touch matches merge_layers {list(cfg.merge_layers)} for: {empty[:3]}")
    return dataset, plans + [plan_merge(c.adapter, s.adapter, cfg.merge_layers) for c, s in run.evals]


def setup_network(run: Run, plans: list) -> tuple[torch.optim.Optimizer, list[int]]:
    """The hypernetwork (seeded), a frozen copy of its initial state, and its optimizer."""
    cfg = run.cfg
    widths = hypernet_widths(plans)
    torch.manual_seed(cfg.seed)
    run.net = MergerHypernet(widths, hidden=cfg.hidden, column_norm=cfg.column_norm,
                             merge_layers=list(cfg.merge_layers), init_scale=cfg.init_scale,
                             base_arch=pipeline_arch(run.pipe)).to(run.accelerator.device)
    run.init_net = copy.deepcopy(run.net)
    return build_optimizer(cfg, [{"params": run.net.parameters()}]), widths


def loss_fn(run: Run):
    """``compute_loss(batch, step, models)``: mean ZipLoRA loss of the batch's pairs merged by the network."""
    cfg = run.cfg

    def compute_loss(batch, step, models):
        problems = [
            pair_loss(run.pipe, run.noise_scheduler, run.content[int(i)], run.style[int(j)], cfg.merge_layers, cfg.lam)
            for i, j in zip(batch["content"], batch["style"])
        ]
        coeffs = run.net.coefficients([p.plan for p in problems], [p.deltas for p in problems], net=models[0])
        total = 0.0
        for problem, co, sid in zip(problems, coeffs, batch["sample_id"].tolist()):
            g = sample_generator(cfg.seed, sid, SALT_PAIR)
            with run.accelerator.autocast():
                loss, _ = problem(co, problem.batch(g, cfg.ref_batch_size))
            total = total + loss
        return total / len(problems)

    return compute_loss


def save_fn(run: Run, final_path: Path, eval_rows: list[dict]):
    """``save(path)``: the hypernetwork with its config; the final one also with the held-out rows."""
    cfg = run.cfg
    meta = {
        "lorakit.base_arch": pipeline_arch(run.pipe),
        "lorakit.config": json.dumps(to_dict(cfg), default=str),
        "lorakit.trained_on": json.dumps({"content": [c.name for c in run.content],
                                          "style": [s.name for s in run.style]}),
    }

    def save(path):
        if run.evals and Path(path) == final_path:  # main process, final artifact: held-out rows in its metadata
            eval_rows[:] = evaluate_pairs(run.pipe, run.noise_scheduler, run.net, run.evals, cfg, run.init_net)
            for r in eval_rows:
                print(
                    f"lorakit: held-out {r['content']} + {r['style']}: loss plain sum {r['sum']:.5f}, "
                    f"untrained {r['init']:.5f}, lorarar {r['lorarar']:.5f}"
                )
        extra = {"lorakit.eval": json.dumps(eval_rows)} if eval_rows else {}
        save_hypernet(run.net, path, {**meta, **extra})

    return save


def train(cfg, pipe=None):
    """Train a hypernetwork (see the module docstring). Returns the loop's ``TrainResult`` with ``.eval`` (the
    held-out rows) and ``.hypernet`` (the trained network) added.

    Args:
        pipe: a base pipeline to use instead of loading ``cfg.base_model`` (it gets frozen and moved).
    """
    run = check_recipe(cfg, pipe)
    setup_models(run)
    dataset, plans = setup_data(run)
    optimizer, widths = setup_network(run, plans)
    note(
        f"lorakit: LoRA.rar on {len(run.content)} content x {len(run.style)} style LoRAs = {len(dataset)} pairs; "
        f"hypernetwork {sum(p.numel() for p in run.net.parameters())} parameters, widths {widths}"
    )
    eval_rows: list[dict] = []
    final_path = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
    loop = TrainLoop(
        cfg, run.accelerator, [run.net], optimizer, dataset, loss_fn(run), save_fn(run, final_path, eval_rows),
        summary_hint=f"  merge a pair:    lorakit fuse --method lorarar --hypernet {final_path} "
        "--adapters CONTENT STYLE --out merged.safetensors",
    )
    result = loop.run()
    result.eval = eval_rows
    result.hypernet = run.net
    return result


def main(argv: list[str] | None = None) -> int:
    """``train_lorarar.py --config X.yaml [key=value ...]`` (see :mod:`lorakit.training.entry`)."""
    return entry_main("lorarar", argv)


__all__ = ["LoraRarConfig", "SyntheticConfig", "train", "main", "evaluate_pairs", "batch_losses", "load_entries", "PairDataset"]
