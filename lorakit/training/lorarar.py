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
LoRAs (``lorakit.testing.random_adapter``) for smoke tests and the CPU toy recipe. ``eval_pairs`` (or
``synthetic.eval_pairs``) are held-out pairs: at the end the loss of their plain sum, of the untrained network and
of the trained network is measured on the same noise, printed, and stored in the hypernetwork's metadata.

Output: ``<output_dir>/<output_name>.safetensors`` (the hypernetwork, its config in the header), used by
``lorakit fuse --method lorarar --hypernet FILE --adapters CONTENT STYLE --out merged.safetensors``.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.training.loop import TrainConfig

SALT_PAIR = 80  # per-sample stream of the reference draws / noise / timesteps of one pair


@dataclass
class SyntheticConfig:
    """Random LoRAs on the base (``lorakit.testing.random_adapter``) for tests and the CPU toy recipe."""

    content: int = 0  # how many random content LoRAs (blocks: content_blocks)
    style: int = 0  # how many random style LoRAs (blocks: style_blocks)
    eval_pairs: int = 0  # extra held-out (content, style) pairs, used only for the end-of-run evaluation
    rank: int = 4
    alpha: float = 4.0
    content_blocks: str = "all"
    style_blocks: str = "upper"
    std: float = 0.3
    images: str = "random"  # random (noise images) | generate (images made with each LoRA alone)


@dataclass
class LoraRarConfig(TrainConfig):
    """Config of ``train_lorarar.py``: the shared keys (:class:`TrainConfig`) plus these."""

    content: list[Any] = field(default_factory=list)  # paths / globs / {path, images, prompt}
    style: list[Any] = field(default_factory=list)
    eval_pairs: list[Any] = field(default_factory=list)  # [[content, style], ...]: held-out pairs to report
    merge_layers: list[str] = field(default_factory=lambda: ["to_q", "to_out.0"])  # others both touch: summed
    hidden: int = 128
    column_norm: str = "layer_rms"  # layer_rms | none
    init_scale: float = 0.1
    lam: float = 0.01  # weight of sum_layers |cos(m_c dW_c, m_s dW_s)|
    ref_batch_size: int = 1  # noisy reference latents per LoRA per pair sample
    num_ref_images: int = 4
    reference_size: int = 0  # pixels; 0 = the base's native resolution
    generate_steps: int = 20  # sampling steps for generated references
    eval_batches: int = 4
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    output_name: str = "lorarar_hypernet"
    learning_rate: float = 0.01
    adam_weight_decay: float = 0.0


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
    from lorakit.adapters.io import load_adapter, validate_adapter
    from lorakit.fusion.ziplora import reference_for

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
    from lorakit.fusion.ziplora import pixel_size, reference_for
    from lorakit.testing import random_adapter

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
    from lorakit.fusion.ziplora import ZipLoRALoss, plan_merge

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
    from lorakit.fusion.ziplora import eval_batches, ones_coefficients

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


def _freeze(pipe) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            model.requires_grad_(False)
            model.eval()


def train(cfg, pipe=None):
    """Train a hypernetwork (see the module docstring). Returns the loop's ``TrainResult`` with ``.eval`` (the
    held-out rows) and ``.hypernet`` (the trained network) added.

    Args:
        pipe: a base pipeline to use instead of loading ``cfg.base_model`` (it gets frozen and moved).
    """
    from lorakit.config import to_dict
    from lorakit.fusion.lorarar import MergerHypernet, hypernet_widths, save_hypernet
    from lorakit.fusion.ziplora import noise_scheduler_of, plan_merge
    from lorakit.models import load_base, pipeline_arch
    from lorakit.training.loop import TrainLoop, build_optimizer, make_accelerator, sample_generator

    if cfg.ref_batch_size < 1:
        raise ValueError(f"ref_batch_size must be >= 1, got {cfg.ref_batch_size}")
    accelerator = make_accelerator(cfg, find_unused_parameters=True)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    if pipe is None:
        if not cfg.base_model:
            raise ValueError("base_model is not set: the base the LoRAs were trained on (a folder, .safetensors or tiny:sd1)")
        pipe = load_base(cfg.base_model)
    _freeze(pipe)
    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    content, style, evals = load_entries(cfg, pipe)
    if dtype != pipe.unet.dtype:
        pipe.to(dtype=dtype)
    noise_scheduler = noise_scheduler_of(pipe)
    dataset = PairDataset(len(content), len(style))
    plans = [plan_merge(c.adapter, s.adapter, cfg.merge_layers) for c in content for s in style]
    empty = [f"{content[k // len(style)].name} + {style[k % len(style)].name}" for k, p in enumerate(plans) if not p.merged]
    if empty:
        raise ValueError(f"no layer both LoRAs touch matches merge_layers {list(cfg.merge_layers)} for: {empty[:3]}")
    widths = hypernet_widths(plans + [plan_merge(c.adapter, s.adapter, cfg.merge_layers) for c, s in evals])
    arch = pipeline_arch(pipe)
    torch.manual_seed(cfg.seed)
    net = MergerHypernet(widths, hidden=cfg.hidden, column_norm=cfg.column_norm, merge_layers=list(cfg.merge_layers),
                         init_scale=cfg.init_scale, base_arch=arch).to(accelerator.device)
    init_net = copy.deepcopy(net)
    optimizer = build_optimizer(cfg, [{"params": net.parameters()}])
    accelerator.print(
        f"lorakit: LoRA.rar on {len(content)} content x {len(style)} style LoRAs = {len(dataset)} pairs; "
        f"hypernetwork {sum(p.numel() for p in net.parameters())} parameters, widths {widths}"
    )

    def compute_loss(batch, step, models):
        problems = [
            pair_loss(pipe, noise_scheduler, content[int(i)], style[int(j)], cfg.merge_layers, cfg.lam)
            for i, j in zip(batch["content"], batch["style"])
        ]
        coeffs = net.coefficients([p.plan for p in problems], [p.deltas for p in problems], net=models[0])
        total = 0.0
        for problem, co, sid in zip(problems, coeffs, batch["sample_id"].tolist()):
            g = sample_generator(cfg.seed, sid, SALT_PAIR)
            with accelerator.autocast():
                loss, _ = problem(co, problem.batch(g, cfg.ref_batch_size))
            total = total + loss
        return total / len(problems)

    meta = {
        "lorakit.base_arch": arch,
        "lorakit.config": json.dumps(to_dict(cfg), default=str),
        "lorakit.trained_on": json.dumps({"content": [c.name for c in content], "style": [s.name for s in style]}),
    }
    eval_rows: list[dict] = []
    final_path = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"

    def save(path):
        if evals and Path(path) == final_path:  # main process, final artifact: held-out rows go into its metadata
            eval_rows[:] = evaluate_pairs(pipe, noise_scheduler, net, evals, cfg, init_net)
            for r in eval_rows:
                print(
                    f"lorakit: held-out {r['content']} + {r['style']}: loss plain sum {r['sum']:.5f}, "
                    f"untrained {r['init']:.5f}, lorarar {r['lorarar']:.5f}"
                )
        extra = {"lorakit.eval": json.dumps(eval_rows)} if eval_rows else {}
        save_hypernet(net, path, {**meta, **extra})

    loop = TrainLoop(
        cfg, accelerator, [net], optimizer, dataset, compute_loss, save,
        summary_hint=f"  merge a pair:    lorakit fuse --method lorarar --hypernet {final_path} "
        "--adapters CONTENT STYLE --out merged.safetensors",
    )
    result = loop.run()
    result.eval = eval_rows
    result.hypernet = net
    return result


def main(argv: list[str] | None = None) -> int:
    from lorakit.config import load_config, schema_keys
    from lorakit.threads import configure_threads

    configure_threads()  # one torch thread unless OMP_NUM_THREADS is set (lorakit/threads.py)

    parser = argparse.ArgumentParser(
        prog="train_lorarar.py",
        description="Train the LoRA.rar merging hypernetwork over content/style LoRA pairs "
        "(run with `accelerate launch train_lorarar.py --config ...` for several GPUs/processes).",
        epilog="config keys: " + ", ".join(schema_keys(LoraRarConfig)),
    )
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. train_configs/toy_lorarar.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=50 synthetic.content=3")
    args = parser.parse_args(argv)
    cfg = load_config(LoraRarConfig, args.config, args.overrides)
    train(cfg)
    return 0


__all__ = ["LoraRarConfig", "SyntheticConfig", "train", "main", "evaluate_pairs", "batch_losses", "load_entries", "PairDataset"]
