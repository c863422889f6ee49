"""Train a tiny T2I-Adapter (diffusers ``T2IAdapter``) on the toy base: silhouette sketch -> shape placement.

Data are drawn fresh every step (:mod:`lorakit.toyworld.sketch`): half the batches hold one generic shape anywhere
(its caption as the prompt), half hold two shapes, one per half, trained under regional attention with a box per
half (each half's prompt names its shape), the way the adapter is used at sampling time. The base (UNet, VAE, text
encoder) stays frozen; only the adapter trains, with the epsilon loss, timesteps drawn as in the T2I-Adapter paper
(``t = (1 - u^3) T``: more high-noise steps, where the layout is decided).

    python tools/train_toy_sketch_adapter.py --out data/toy-sketch-adapter --minutes 18   # CPU minutes

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


def adapter_config(unet) -> dict:
    """A full T2I-Adapter whose features fit ``unet``'s down blocks, reading a 1-channel sketch at image size."""
    vae_factor = 2  # the toy VAE: 32x32 image -> 16x16 latent
    return {"in_channels": 1, "channels": list(unet.config.block_out_channels), "num_res_blocks": 2,
            "downscale_factor": vae_factor, "adapter_type": "full_adapter"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=str(ROOT / "data" / "toy-base"))
    ap.add_argument("--out", default=str(ROOT / "data" / "toy-sketch-adapter"))
    ap.add_argument("--steps", type=int, default=6000, help="upper bound on steps (--minutes usually stops first)")
    ap.add_argument("--minutes", type=float, default=18.0, help="stop and save after this many CPU minutes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    return ap.parse_args(argv)


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


def draw_batch(step: int, rng, args, vae, text, controller):
    """A fresh batch: (latents, sketch, global prompt embeddings); sets the regional prompts of two-shape steps."""
    from lorakit.toyworld.sketch import random_sketch_scene, render_sketch_scene

    two = step % 2 == 1
    scenes = [random_sketch_scene(rng, 2 if two else 1) for _ in range(args.batch)]
    rendered = [render_sketch_scene(s) for s in scenes]
    img = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 127.5 - 1 for im, _ in rendered])).permute(0, 3, 1, 2)
    sketch = torch.from_numpy(np.stack([sil for _, sil in rendered]))[:, None]
    with torch.no_grad():
        latents = vae.encode(img).latent_dist.mean * vae.config.scaling_factor
    if two:
        glob = text([s.background_prompt() for s in scenes])
        regions = [text([s.region_prompts()[k] for s in scenes]) for k in range(2)]
    else:
        glob = text([s.region_prompts()[0] for s in scenes])
        regions = [glob, glob]  # both halves read the global prompt: plain attention
    controller.set_states(regions)
    return latents, sketch, glob


def train(args, pipe, adapter, noise_sched) -> tuple[list[float], int, float, float]:
    """The adapter's training loop until ``--steps`` or ``--minutes``: (losses, steps, seconds, CPU seconds)."""
    from lorakit.sampling.regional import RegionalController, install_regional
    from lorakit.toyworld.sketch import HALVES

    unet, vae = pipe.unet, pipe.vae
    opt = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=1e-2)
    controller = RegionalController(list(HALVES), aspect=1.0)
    install_regional(unet, controller)
    text = TextCache(pipe.tokenizer, pipe.text_encoder)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    T = noise_sched.config.num_train_timesteps
    log, t0, c0, step = [], time.time(), time.process_time(), 0
    while step < args.steps and time.process_time() - c0 < args.minutes * 60:
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
    return log, step, time.time() - t0, time.process_time() - c0


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
    cfg = adapter_config(pipe.unet)
    adapter = T2IAdapter(**cfg)
    adapter.train()
    log, step, seconds, cpu_seconds = train(args, pipe, adapter, noise_sched)
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
