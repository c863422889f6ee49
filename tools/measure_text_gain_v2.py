"""How much a toy world v2 base uses its prompt, per training step: the denoising loss of step pipelines (their
EMA UNets) on fixed training latents at fixed timesteps and noise, with each latent's caption and with the empty
caption. The gap (empty minus caption) is what the text buys; a base whose gap and loss stop moving has stopped
learning to follow prompts. Prints one JSON line per step: ``{"step", "t<T>": [loss with caption, without]}``.

    python tools/measure_text_gain_v2.py --run /work/shared_artifacts/toybase_v2/run --steps 1000 2000 3000

Reads the run folder only (latents.safetensors, captions.json, unet/toy-unet-stepNNNNNN); ~20 s per step on one
core for the default 48 latents x 4 timesteps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TIMESTEPS = (50, 250, 500, 750)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a tools/train_toy_base_v2.py --work folder")
    p.add_argument("--steps", type=int, nargs="+", required=True, help="steps with a unet/toy-unet-stepNNNNNN pipeline")
    p.add_argument("--n", type=int, default=48, help="latents (every 250th class-world training scene)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    run = Path(args.run)
    lat = load_file(run / "latents.safetensors")
    caps = json.loads((run / "captions.json").read_text())
    idx = list(range(0, len(lat["mean"]), 250))[: args.n]
    x0 = lat["mean"][idx] * float(lat["scale"])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for step in args.steps:
        folder = run / "unet" / f"toy-unet-step{step:06d}"
        if not (folder / "model_index.json").exists():
            raise SystemExit(f"error: no step pipeline {folder}")
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        row: dict = {"step": step, "n": len(idx)}
        with torch.no_grad():
            tok = pipe.tokenizer([caps[i] for i in idx] + [""], padding="max_length", truncation=True,
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
            emb = pipe.text_encoder(tok.input_ids)[0]
            cond, empty = emb[:-1], emb[-1:].expand(len(idx), -1, -1)
            for t in TIMESTEPS:
                tt = torch.full((len(idx),), t)
                xt = sched.add_noise(x0, noise, tt)
                row[f"t{t}"] = [round(float((pipe.unet(xt, tt, c).sample - noise).pow(2).mean()), 4)
                                for c in (cond, empty)]
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
