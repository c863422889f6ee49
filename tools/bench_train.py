#!/usr/bin/env python
"""Benchmark: lorakit's block-wise LoRA trainer vs a minimal reference loop, same model/batch/resolution.

Reference (what diffusers' train_text_to_image_lora.py does per step): diffusers UNet + peft LoRA on the same
modules (same ranks), torch AdamW, VAE encode + text encode + UNet forward/backward + clip + step every step,
on a batch already in memory. lorakit: ``lorakit.training.blockwise.train`` (latent cache, shared loop,
fused AdamW on CUDA, optional channels_last / torch.compile) reading the same images from a folder.

Prints JSON lines: one per run (median step time over the timed steps, it/s, peak memory) and one with the
ratios (``speed_ratio`` = reference step time / lorakit step time; > 1 means lorakit is faster).

    python tools/bench_train.py                                   # CPU, tiny SD1 pipeline, 32 px, batch 2
    python tools/bench_train.py --device cuda --size sd15 --resolution 512 --batch 4 --dtype bf16
    python tools/bench_train.py --size mid                        # SD's channel ratios at 1/10 width
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class PeakMemory:
    """Peak memory during a block: CUDA max allocated, or the process RSS polled every 5 ms on the CPU."""

    def __init__(self, device: str):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            proc, self._stop = psutil.Process(), threading.Event()
            self._base = proc.memory_info().rss

            def poll():
                peak = self._base
                while not self._stop.is_set():
                    peak = max(peak, proc.memory_info().rss)
                    time.sleep(0.005)
                self._peak = peak

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._peak / 2**20  # whole-process RSS (includes the other run's leftovers)


def make_pipe(size: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """tiny / mid: lorakit.models.sized_pipeline's SD1 sizes; sd15 / sdxl: the released models' configs (random)."""
    from lorakit.models import sized_pipeline

    arch, name = {"tiny": ("sd1", "tiny"), "mid": ("sd1", "mid"), "sd15": ("sd1", "full"), "sdxl": ("sdxl", "full")}[size]
    return sized_pipeline(arch, name, seed=0, dtype=dtype, device=device)


def make_images(folder: Path, n: int, res: int) -> list[str]:
    rng = np.random.default_rng(0)
    caps = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        caps.append(f"a photo of a red circle number {i}")
        (folder / f"{i:03d}.txt").write_text(caps[-1])
    return caps


def _dtype(args) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]


def _pixels_and_ids(args, pipe, folder: Path, captions: list[str]):
    files = sorted(folder.glob("*.png"))[: args.batch]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32)).permute(2, 0, 1)
                          for f in files]) / 127.5 - 1
    ids = pipe.tokenizer(captions[: args.batch], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    return pixels.to(args.device, _dtype(args)), ids.to(args.device)


def _reference_steps(args, pipe, pixels, ids, params, train_text: bool = False, after_step=None,
                     text_copies: int = 1) -> dict:
    """The reference's steps: VAE encode, text encode (with gradients when ``train_text``), UNet forward /
    backward, clip, AdamW, every step; step times and peak memory. ``text_copies`` > 1 encodes the batch that
    many times in one pass and conditions the UNet on the copies' mean (the text encoder's work of a method that
    encodes one prompt copy per cross-attention layer)."""
    from diffusers import DDPMScheduler

    dev, dtype = torch.device(args.device), _dtype(args)
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    times = []
    with PeakMemory(args.device) as mem:
        for _ in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                with torch.set_grad_enabled(train_text):
                    ehs = te(ids.repeat(text_copies, 1))[0]
                    if text_copies > 1:
                        ehs = ehs.unflatten(0, (text_copies, ids.shape[0])).mean(0)
                noise = torch.randn_like(latents)
                t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=dev)
                pred = unet(sched.add_noise(latents, noise, t), t, ehs).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            loss.item()
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[args.warmup :]), "step_times": [round(t, 4) for t in times[args.warmup :]],
            "peak_mem_mb": mem.peak_mb}


def _freeze(args, pipe) -> None:
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        m.to(args.device, dtype=_dtype(args))


def reference(args, pipe, folder: Path, captions: list[str], network: str = "lora",
              gradient_checkpointing: bool = False) -> dict:
    """The minimal reference training loop; returns step times and peak memory. ``network="locon"``: peft LoRA on
    the resnet convs too (the modules lorakit's LoCon adapts); ``gradient_checkpointing``: diffusers' own."""
    from diffusers.training_utils import cast_training_params

    from lorakit.blocks import lora_able_modules, lora_config, module_ranks, resolve_block_spec
    from lorakit.models import pipeline_arch

    _freeze(args, pipe)
    unet = pipe.unet
    ranks = module_ranks(lora_able_modules(unet), resolve_block_spec("all", pipeline_arch(pipe), args.rank), network,
                         args.rank, args.rank, args.rank, args.rank)
    unet.add_adapter(lora_config(ranks), adapter_name="default")
    cast_training_params(unet, dtype=torch.float32)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    return _reference_steps(args, pipe, *_pixels_and_ids(args, pipe, folder, captions), params)


EDLORA_UNET = (".to_q", ".to_k", ".to_v", ".to_out.0")  # in attn1 / attn2: the modules lorakit's ED-LoRA adapts
EDLORA_TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def reference_edlora(args, pipe, folder: Path, words: tuple[str, ...] = ("<cat1>", "<cat2>"),
                     init_word: str = "cat", layer_copies: bool = False) -> dict:
    """The plain recipe ED-LoRA is measured against: peft LoRA on the text encoder's and the UNet's attention (the
    modules lorakit's ED-LoRA adapts, same rank) plus textual inversion of two new tokens as diffusers'
    textual-inversion script trains them (the embedding table takes gradients, every other row is restored after
    each step); text encode with gradients, VAE encode, every step. One embedding for all layers (lorakit's
    ED-LoRA learns one per layer). ``layer_copies``: encode the captions once per cross-attention layer, as
    ED-LoRA must (one copy per layer with that layer's tokens), so the reference does the method's text-encoder
    work and the comparison measures lorakit's implementation rather than the method's extra cost."""
    from diffusers.training_utils import cast_training_params

    from lorakit.adapters.edlora import cross_attention_layers
    from lorakit.blocks import lora_config

    _freeze(args, pipe)
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    tok.add_tokens(list(words))
    te.resize_token_embeddings(len(tok))
    new = tok.convert_tokens_to_ids(list(words))
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        emb[new] = emb[tok(init_word, add_special_tokens=False).input_ids[0]].clone()
    te.add_adapter(lora_config({n: (args.rank, args.rank) for n, _ in te.named_modules() if n.endswith(EDLORA_TEXT)}))
    unet.add_adapter(lora_config({n: (args.rank, args.rank) for n, m in unet.named_modules()
                                  if isinstance(m, torch.nn.Linear) and n.endswith(EDLORA_UNET)
                                  and (".attn1." in n or ".attn2." in n)}))
    emb.requires_grad_(True)
    cast_training_params([unet, te], dtype=torch.float32)
    if emb.dtype != _dtype(args):  # the fp32 table's rows enter the bf16 / fp16 encoder in its dtype (its layer norms
        te.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.to(_dtype(args)))  # need one)
    keep = torch.ones(emb.shape[0], dtype=torch.bool)
    keep[new] = False
    original = emb.detach()[keep].clone()

    def restore():
        with torch.no_grad():
            emb[keep] = original

    for cap in folder.glob("*.txt"):
        cap.write_text("a photo of " + " ".join(words))
    captions = [f.read_text() for f in sorted(folder.glob("*.txt"))]
    params = [p for m in (unet, te) for p in m.parameters() if p.requires_grad]
    copies = len(cross_attention_layers(unet)) if layer_copies else 1
    return _reference_steps(args, pipe, *_pixels_and_ids(args, pipe, folder, captions), params, train_text=True,
                            after_step=restore, text_copies=copies)


def lorakit_run(args, pipe, folder: Path, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """``extra``: more config overrides (e.g. ``gradient_checkpointing=true``, ``network.type=locon``)."""
    from lorakit.config import load_config
    from lorakit.training.blockwise import BlockwiseConfig, train

    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[args.dtype]
    cfg = load_config(BlockwiseConfig, None, [
        "base_model=bench", f"data.path={folder}", f"output_dir={out}", f"data.resolution={args.resolution}",
        f"train_batch_size={args.batch}", f"max_steps={args.warmup + args.steps}", f"network.rank={args.rank}",
        f"network.alpha={args.rank}", "network.blocks=all", "network.type=lora", f"mixed_precision={mp}",
        "data.cache_latents=true", "logging=none", "checkpointing_steps=0", "checkpoint_at_end=false",
        f"channels_last={str(args.device == 'cuda').lower()}", f"compile={str(args.compile).lower()}", *extra,
    ])
    import contextlib

    with PeakMemory(args.device) as mem, contextlib.redirect_stdout(sys.stderr):  # stdout: JSON lines only
        res = train(cfg, pipe=pipe)
    return {"step_s": statistics.median(res.step_seconds[args.warmup :]),
            "step_times": [round(t, 4) for t in res.step_seconds[args.warmup :]], "peak_mem_mb": mem.peak_mb}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="tiny", choices=["tiny", "mid", "sd15", "sdxl"],
                   help="tiny / mid SD1 pipeline, or SD 1.5- / SDXL-sized random weights (lorakit.models.sized_pipeline)")
    p.add_argument("--resolution", type=int, default=None, help="default: 32 (tiny) / 512 (sd15)")
    p.add_argument("--batch", type=int, default=None, help="default: 2 (tiny) / 4 (sd15)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32 (cpu) / bf16 (cuda)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet in the lorakit run")
    args = p.parse_args(argv)
    full = args.size in ("sd15", "sdxl")
    args.resolution = args.resolution or ({"sd15": 512, "sdxl": 1024}[args.size] if full else 32)
    args.batch = args.batch or (4 if full else 2)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common = {"device": args.device, "size": args.size, "resolution": args.resolution, "batch": args.batch,
              "dtype": args.dtype, "rank": args.rank, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "img"
        folder.mkdir()
        captions = make_images(folder, 2 * args.batch, args.resolution)
        wdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        ref = reference(args, make_pipe(args.size, wdtype, args.device), folder, captions)
        ref_row = {"run": "reference", **common, **ref, "it_s": 1 / ref["step_s"]}
        print(json.dumps(ref_row), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        lk = lorakit_run(args, make_pipe(args.size, wdtype, args.device), folder, Path(tmp) / "out")
        lk_row = {"run": "lorakit", **common, **lk, "it_s": 1 / lk["step_s"], "compile": args.compile}
        print(json.dumps(lk_row), flush=True)
    print(json.dumps({"run": "ratio", **common, "speed_ratio": ref["step_s"] / lk["step_s"],
                      "mem_ratio": ref["peak_mem_mb"] / max(lk["peak_mem_mb"], 1e-9)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
