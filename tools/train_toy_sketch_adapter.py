"""Train a tiny T2I-Adapter (diffusers ``T2IAdapter``) on a toy base: silhouette sketch -> figure placement.

Data are drawn fresh every step. ``--world v1`` (:mod:`lorakit.toyworld.sketch`, the 32 px ``data/toy-base``):
generic shapes. ``--world v2`` (:mod:`lorakit.toyworld.v2.sketch`, the 64 px ``data/toy2-base``): class
characters (frog, robot, ghost in any colour and variation) on the base's backgrounds, captioned as v2's
captions. Half the batches hold one figure anywhere (its caption as the prompt), half hold two, one per half,
trained under regional attention with a box per half (each half's prompt names its figure; the global prompt is
v1's background, v2's whole caption), the way the adapter is used at sampling time. The base (UNet, VAE, text
encoder) stays frozen; only the adapter trains, with the epsilon loss, timesteps drawn as in the T2I-Adapter
paper (``t = (1 - u^3) T``: more high-noise steps, where the layout is decided).

    python tools/train_toy_sketch_adapter.py --out data/toy-sketch-adapter --minutes 18   # CPU minutes

In parts (``--work``): each call trains until ``--steps`` or ``--budget-s`` wall seconds, keeps a checkpoint
(adapter, AdamW state, both random generators; safetensors + JSON) in ``--work`` and exits 3 while steps remain;
the next call continues it. A run in parts gives the same weights as one uninterrupted run.

    python tools/train_toy_sketch_adapter.py --world v2 --steps 600 --work artifacts/toy2_sketch_adapter \
        --budget-s 500        # repeat while it exits 3

Writes a diffusers ``T2IAdapter`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, written to a
temporary folder and renamed) and ``train_log.json`` (every setting, loss curve, seconds). Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


WORLDS = {"v1": ("toy-base", "toy-sketch-adapter"), "v2": ("toy2-base", "toy2-sketch-adapter")}  # base, out
CHECKPOINT = "checkpoint"


def adapter_config(pipe) -> dict:
    """A full T2I-Adapter whose features fit the UNet's down blocks, reading a 1-channel sketch at image size
    (the pixel unshuffle undoes the VAE's downsampling: 2 for v1's 32 -> 16, 4 for v2's 64 -> 16)."""
    return {"in_channels": 1, "channels": list(pipe.unet.config.block_out_channels), "num_res_blocks": 2,
            "downscale_factor": pipe.vae_scale_factor, "adapter_type": "full_adapter"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", choices=tuple(WORLDS), default="v1", help="toy world (default v1)")
    ap.add_argument("--base", help="base pipeline (default data/toy-base for v1, data/toy2-base for v2)")
    ap.add_argument("--out", help="adapter folder (default data/toy-sketch-adapter, data/toy2-sketch-adapter)")
    ap.add_argument("--steps", type=int, default=6000, help="steps (without --work, --minutes usually stops first)")
    ap.add_argument("--minutes", type=float, default=18.0, help="stop and save after this many CPU minutes")
    ap.add_argument("--work", help="train in parts: checkpoint folder; runs until --steps (exit 0, adapter saved) "
                                   "or --budget-s (exit 3, call again)")
    ap.add_argument("--budget-s", type=float, default=500.0, help="with --work: wall seconds of this call")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)
    base, out = WORLDS[args.world]
    args.base = args.base or str(ROOT / "data" / base)
    args.out = args.out or str(ROOT / "data" / out)
    return args


class TextCache:
    """Prompt embeddings of the frozen text encoder, each caption encoded once."""

    def __init__(self, tok, te):
        self.tok, self.te, self.cache = tok, te, {}

    @torch.no_grad()
    def __call__(self, captions):
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tok(missing, padding="max_length", max_length=self.tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
            for c, e in zip(missing, self.te(ids)[0]):
                self.cache[c] = e
        return torch.stack([self.cache[c] for c in captions])


def draw_scenes(step: int, rng, args) -> list[tuple]:
    """A fresh batch of ``(image, silhouette, global prompt, [left, right] prompts)``: one figure on even steps
    (both halves read the global prompt: plain attention), two on odd steps."""
    two = step % 2 == 1
    if args.world == "v1":
        from lorakit.toyworld.sketch import random_sketch_scene, render_sketch_scene

        scenes = [random_sketch_scene(rng, 2 if two else 1) for _ in range(args.batch)]
        rendered = [render_sketch_scene(s) for s in scenes]
        glob = [s.background_prompt() if two else s.region_prompts()[0] for s in scenes]
    else:
        from lorakit.toyworld.v2.sketch import render_character_scene, training_scene

        scenes = [training_scene(rng, 2 if two else 1) for _ in range(args.batch)]
        rendered = [render_character_scene(s) for s in scenes]
        glob = [s.global_prompt() for s in scenes]
    regions = [s.region_prompts() if two else [g, g] for s, g in zip(scenes, glob)]
    return [(im, sil, g, r) for (im, sil), g, r in zip(rendered, glob, regions)]


def draw_batch(step: int, rng, args, vae, text, controller):
    """A fresh batch: (latents, sketch, global prompt embeddings); sets the regional prompts of two-figure steps."""
    drawn = draw_scenes(step, rng, args)
    img = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 127.5 - 1 for im, *_ in drawn])).permute(0, 3, 1, 2)
    sketch = torch.from_numpy(np.stack([sil for _, sil, *_ in drawn]))[:, None]
    with torch.no_grad():
        latents = vae.encode(img).latent_dist.mean * vae.config.scaling_factor
    glob = text([g for *_, g, _ in drawn])
    controller.set_states([text([r[k] for *_, r in drawn]) for k in range(2)])
    return latents, sketch, glob


def same_run(args) -> dict:
    """The settings a checkpoint must share with the call that continues it."""
    return {"world": args.world, "base": str(Path(args.base).resolve()), "batch": args.batch, "lr": args.lr,
            "seed": args.seed}


def save_checkpoint(work: Path, adapter, opt, sched, rng, gen, step: int, log: list[float], seconds: float,
                    cpu_seconds: float, args) -> None:
    """``work/checkpoint``: adapter, AdamW and both generators (safetensors + JSON, no pickle), written to a
    temporary folder and renamed."""
    from lorakit.fileio import save_safetensors, write_json
    from lorakit.training import state as S

    tmp = work / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    S.save_model_state([adapter], opt, sched, None, tmp)
    save_safetensors({"torch": gen.get_state()}, tmp / "generator.safetensors")
    write_json({"step": step, "run": same_run(args), "numpy": rng.bit_generator.state, "losses": log,
                "seconds": seconds, "cpu_seconds": cpu_seconds}, tmp / "trainer.json")
    final, old = work / CHECKPOINT, work / f".{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(work: Path, adapter, opt, sched, rng, gen, args) -> tuple[int, list[float], float, float]:
    """Restore :func:`save_checkpoint`'s state: (step, losses, seconds, CPU seconds)."""
    from lorakit.fileio import load_safetensors
    from lorakit.training import state as S

    folder = work / CHECKPOINT
    info = json.loads((folder / "trainer.json").read_text())
    if info["run"] != same_run(args):
        raise SystemExit(f"{folder}: made with other settings ({info['run']}); use another --work")
    S.load_model_state([adapter], opt, sched, None, folder)
    gen.set_state(load_safetensors(folder / "generator.safetensors")[0]["torch"])
    rng.bit_generator.state = info["numpy"]
    return info["step"], info["losses"], info["seconds"], info["cpu_seconds"]


def train(args, pipe, adapter, noise_sched) -> tuple[list[float], int, float, float]:
    """The adapter's training loop until ``--steps``, ``--minutes`` (CPU) or, with ``--work``, ``--budget-s``
    (wall; continuing and then keeping the checkpoint): (losses, steps, seconds, CPU seconds), seconds summed
    over the parts."""
    from lorakit.sampling.regional import RegionalController, install_regional
    from lorakit.toyworld.sketch import HALVES

    unet, vae = pipe.unet, pipe.vae
    opt = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)  # constant lr (a checkpoint field)
    controller = RegionalController(list(HALVES), aspect=1.0)
    install_regional(unet, controller)
    text = TextCache(pipe.tokenizer, pipe.text_encoder)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    T = noise_sched.config.num_train_timesteps
    log, step, s_before, c_before = [], 0, 0.0, 0.0
    work = Path(args.work) if args.work else None
    if work is not None and (work / CHECKPOINT).exists():
        step, log, s_before, c_before = load_checkpoint(work, adapter, opt, sched, rng, gen, args)
    t0, c0, first = time.time(), time.process_time(), step

    def more_time() -> bool:
        if work is not None:
            return time.time() - t0 < args.budget_s
        return time.process_time() - c0 < args.minutes * 60

    while step < args.steps and more_time():
        latents, sketch, glob = draw_batch(step, rng, args, vae, text, controller)
        u = torch.rand(args.batch, generator=gen)
        t = ((1 - u**3) * T).long().clamp(0, T - 1)
        noise = torch.randn(latents.shape, generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        feats = adapter(sketch)
        pred = unet(noisy, t, encoder_hidden_states=glob, down_intrablock_additional_residuals=list(feats)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        log.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            print(json.dumps({"step": step, "loss": round(float(np.mean(log[-args.log_every:])), 5),
                              "s": round(time.time() - t0, 1),
                              "cpu_s": round(time.process_time() - c0, 1)}), flush=True)
    seconds, cpu_seconds = s_before + time.time() - t0, c_before + time.process_time() - c0
    if work is not None and step > first:
        save_checkpoint(work, adapter, opt, sched, rng, gen, step, log, seconds, cpu_seconds, args)
    return log, step, seconds, cpu_seconds


def save_adapter(adapter, record: dict, out: Path) -> None:
    """The adapter folder and its ``train_log.json``, written to a temporary folder and renamed over ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    adapter.eval().save_pretrained(tmp, safe_serialization=True)
    (tmp / "train_log.json").write_text(json.dumps(record, indent=1))
    tmp.chmod(0o755)  # mkdtemp makes it private
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from diffusers import DDPMScheduler, StableDiffusionPipeline, T2IAdapter

    pipe = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    cfg = adapter_config(pipe)
    adapter = T2IAdapter(**cfg)
    adapter.train()
    log, step, seconds, cpu_seconds = train(args, pipe, adapter, noise_sched)
    if args.work and step < args.steps:
        print(json.dumps({"checkpoint": str(Path(args.work) / CHECKPOINT), "steps": step, "of": args.steps,
                          "more": "call again"}))
        return 3
    out = Path(args.out)
    record = {"settings": vars(args), "adapter_config": cfg, "steps": step, "seconds": round(seconds, 1),
              "cpu_seconds": round(cpu_seconds, 1), "parameters": sum(p.numel() for p in adapter.parameters()),
              "loss_per_50": [round(float(np.mean(log[i:i + 50])), 5) for i in range(0, len(log), 50)]}
    save_adapter(adapter, record, out)
    print(json.dumps({"saved": str(out), "steps": step, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                      "parameters": record["parameters"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
