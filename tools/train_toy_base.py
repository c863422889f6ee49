"""Train the toy-world base model (``data/toy-base``): a small SD1-layout pipeline for 32x32 toy scenes.

Stages (each is skipped when its output already exists in ``--work``, so an interrupted build continues):
  1. render   ``--n-generic`` generic scenes (the UNet's data) and ``--n-mixed`` mixed scenes (VAE only)
  2. vae      train the AutoencoderKL (L1 reconstruction + small KL) with lorakit's shared TrainLoop
  3. latents  encode the generic scenes; set ``vae.config.scaling_factor`` = 1 / std(latents)
  4. unet     train the UNet (epsilon prediction, Min-SNR-5 weighting, 10% caption dropout, EMA) with the
              shared TrainLoop; the text encoder stays frozen at its random initialisation
  5. export   the EMA pipeline (fp32, ~8 MB) to ``--out`` (with the fine-tuned decoder, if one was made)

``--finetune-decoder STEPS`` (a second process, started once stage 2 is done) trains only the VAE decoder
meanwhile: the encoder is frozen, so the latents the UNet learns stay valid, and the images get sharper.

Every ``--save-every`` UNet steps a usable pipeline is written to ``<work>/unet/toy-base-stepNNNNNN`` so a
partial run can be exported (``--export-from``). Uses a GPU through Accelerate when one is present.

    python tools/train_toy_base.py --work /tmp/toybase --out data/toy-base
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from toy_base_stages import continued_vae, epsilon_loss, load_rendered, log, posterior_stats, prepare_run
from toy_base_stages import render_once, to_tensor, train_autoencoder, train_config, unet_start


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/toybase", help="working folder (data, checkpoints, partial pipelines)")
    p.add_argument("--out", default="data/toy-base", help="where the final pipeline goes")
    p.add_argument("--n-generic", type=int, default=8000)
    p.add_argument("--n-mixed", type=int, default=3000)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--unet-steps", type=int, default=2000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=6e-4)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-from", help="export this partial pipeline folder to --out and stop")
    p.add_argument("--decoder", help="with --export-from: a VAE folder whose decoder replaces the pipeline's")
    p.add_argument("--finetune-decoder", type=int, default=0, metavar="STEPS",
                   help="only fine-tune the VAE decoder for STEPS steps (run beside the UNet stage) and stop")
    p.add_argument("--init-from", metavar="PIPELINE",
                   help="continue from a trained toy pipeline (e.g. data/toy-base): its VAE, text encoder and UNet "
                        "are the starting point, the VAE stage is skipped")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ 1. render


def render_data(work: Path, n_generic: int, n_mixed: int, seed: int) -> Path:
    from lorakit.toyworld import render, scenes

    return render_once(work, seed, [(scenes.generic_scene, n_generic), (scenes.mixed_scene, n_mixed)], render, "n_generic")


def load_data(work: Path):
    return load_rendered(work, "n_generic")


# ------------------------------------------------------------------------------------------------ 2. vae


class _Rows(torch.utils.data.Dataset):
    def __init__(self, **tensors):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


def _cfg(work: Path, name: str, steps: int, batch: int, lr: float, seed: int, save_every: int = 0):
    return train_config(work, name, steps, batch, lr, seed, warmup=min(100, steps // 10), save_every=save_every,
                        checkpoint_every=save_every * 5 if save_every else 0, keep_checkpoints=1)


def train_vae(work: Path, steps: int, batch: int, seed: int):
    from diffusers import AutoencoderKL

    from lorakit.toyworld.base import toy_vae

    final = work / "vae" / "toy-vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final)
    images, _, _ = load_data(work)
    torch.manual_seed(seed)
    vae = toy_vae()
    cfg = _cfg(work, "vae", steps, batch, 2e-3, seed, save_every=100)
    t0 = time.time()
    train_autoencoder(vae, cfg, _Rows(image=to_tensor(images)))
    log(f"vae trained {steps} steps in {time.time() - t0:.0f} s")
    return AutoencoderKL.from_pretrained(final)


def finetune_decoder(work: Path, steps: int, batch: int, seed: int) -> Path:
    """Train only the VAE decoder (encoder frozen, so the UNet's latents stay valid) for ``steps`` more steps.

    Runs beside the UNet stage (another process); ``export`` uses the result when it exists.
    """
    from diffusers import AutoencoderKL

    from lorakit.training.loop import TrainLoop, build_optimizer, make_accelerator

    images, _, _ = load_data(work)
    vae = AutoencoderKL.from_pretrained(work / "vae" / "toy-vae")
    vae.requires_grad_(False)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for prm in trainable:
        prm.requires_grad_(True)
    cfg = _cfg(work, "decoder", steps, batch, 1e-3, seed + 1, save_every=100)
    acc = make_accelerator(cfg)
    opt = build_optimizer(cfg, [{"params": trainable}])
    data = _Rows(image=to_tensor(images))

    def compute_loss(b, step, models):
        with torch.no_grad():
            z = vae.encode(b["image"]).latent_dist.sample()
        rec = models[0].decode(z).sample
        return (rec - b["image"]).abs().mean()

    def save(path):
        vae.save_pretrained(path)

    t0 = time.time()
    TrainLoop(cfg, acc, [vae], opt, data, compute_loss, save, artifact_suffix="").run()
    log(f"decoder fine-tuned {steps} steps in {time.time() - t0:.0f} s")
    return work / "decoder" / "toy-decoder"


# ------------------------------------------------------------------------------------------------ 3. latents


@torch.no_grad()
def encode_latents(work: Path, vae):
    from lorakit.fileio import load_safetensors, save_safetensors

    out = work / "latents.safetensors"
    if out.exists():
        t, _ = load_safetensors(out)
        return t["mean"], t["std"], float(t["scale"])
    images, n_generic, _ = load_data(work)
    mean, std, scale = posterior_stats(vae, images, n_generic)
    save_safetensors({"mean": mean, "std": std, "scale": torch.tensor(scale)}, out)
    return mean, std, scale


# ------------------------------------------------------------------------------------------------ 4. unet


def train_unet(work: Path, vae, mean, std, scale, args):
    import copy

    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from lorakit.models import save_pipeline
    from lorakit.toyworld.base import LatentCaptions, build_toy_pipeline
    from lorakit.training.loop import TrainLoop, build_optimizer, make_accelerator

    _, n_generic, captions = load_data(work)
    vae.register_to_config(scaling_factor=scale)
    pipe = build_toy_pipeline(seed=args.seed, vae=vae)
    ids, text = unet_start(pipe, captions[:n_generic], args.init_from)
    unet = pipe.unet
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    ema = EMAModel(copy.deepcopy(unet).parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    cfg = _cfg(work, "unet", args.unet_steps, args.unet_batch, args.unet_lr, args.seed, args.save_every)
    acc = make_accelerator(cfg)
    opt = build_optimizer(cfg, [{"params": list(unet.parameters())}])
    data = LatentCaptions(mean * scale, std * scale, ids, args.seed)
    state = {"ema_step": 0}
    loss = epsilon_loss(noise_sched, text.to(acc.device), args.seed)
    ema.to(acc.device)

    def update_ema(step):
        # The loop calls compute_loss(step) right after optimizer step `step`: fold that step into the EMA.
        if step > state["ema_step"]:
            ema.step(acc.unwrap_model(unet).parameters())
            state["ema_step"] = step

    def compute_loss(b, step, models):
        update_ema(step)
        return loss(b, models[0])

    def save(path):
        update_ema(loop.global_step)
        ema_unet = copy.deepcopy(acc.unwrap_model(unet)).cpu()
        ema.copy_to(ema_unet.parameters())
        pipe_out = build_toy_pipeline(seed=args.seed, vae=vae, unet=ema_unet)
        pipe_out.text_encoder.load_state_dict(pipe.text_encoder.state_dict())
        save_pipeline(pipe_out, path, overwrite=True)  # inside the run's own (marked) output_dir
        log(f"saved pipeline (EMA) at step {loop.global_step} -> {path}")

    t0 = time.time()
    loop = TrainLoop(cfg, acc, [unet], opt, data, compute_loss, save, artifact_suffix="")
    result = loop.run()
    log(f"unet trained {result.global_step} steps in {time.time() - t0:.0f} s, final loss {result.losses[-1]:.4f}")
    return Path(result.final_path)


# ------------------------------------------------------------------------------------------------ 5. export


def export(src: Path, out: Path, decoder: Path | None = None) -> None:
    """Save the pipeline at ``src`` (fp32) to ``out``; with ``decoder``, take the VAE decoder from that VAE."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from lorakit.models import save_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    if decoder is not None and (decoder / "config.json").exists():
        tuned = AutoencoderKL.from_pretrained(decoder)
        pipe.vae.decoder.load_state_dict(tuned.decoder.state_dict())
        pipe.vae.post_quant_conv.load_state_dict(tuned.post_quant_conv.state_dict())
        log(f"using the fine-tuned decoder {decoder}")
    # fp32 on disk: the whole pipeline is ~8 MB, and diffusers loads fp16 files as fp16 when no torch_dtype is
    # given, which a CPU user calling plain from_pretrained(...) does not want.
    save_pipeline(pipe, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"exported {src} -> {out} (fp32, {size / 1e6:.1f} MB)")


def main(argv=None) -> int:
    args = parse_args(argv)
    work = prepare_run(args)
    if args.export_from:
        export(Path(args.export_from), Path(args.out), Path(args.decoder) if args.decoder else None)
        return 0
    if args.finetune_decoder:
        finetune_decoder(work, args.finetune_decoder, args.vae_batch, args.seed)
        return 0
    t0 = time.time()
    if args.init_from:
        render_data(work, args.n_generic, 0, args.seed)
        vae, scale = continued_vae(args.init_from)
        mean, std, _ = encode_latents(work, vae)
    else:
        render_data(work, args.n_generic, args.n_mixed, args.seed)
        vae = train_vae(work, args.vae_steps, args.vae_batch, args.seed)
        mean, std, scale = encode_latents(work, vae)
    final = train_unet(work, vae, mean, std, scale, args)
    export(final, Path(args.out), None if args.init_from else work / "decoder" / "toy-decoder")
    log(f"total {time.time() - t0:.0f} s ({math.ceil((time.time() - t0) / 60)} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
