"""Block-wise LoRA / LoCon training (arXiv 2403.07500) on the shared loop.

``train(cfg)`` trains an adapter on the blocks that ``network.blocks`` selects (any vocabulary of
:mod:`lorakit.blocks`) and writes ``<output_dir>/<output_name>.safetensors`` (kohya names, lorakit metadata with
the resolved config and the rank of every block). Run it with ``accelerate launch train_blockwise.py --config
train_configs/<recipe>.yaml [key=value ...]`` or ``lorakit train blockwise --config ...``.

The loss is diffusers' text-to-image LoRA loss: noise (with optional offset) at a uniform timestep, epsilon or
v-prediction target (``scheduler.get_velocity``), optional min-SNR-gamma weighting (``compute_snr``), and a
per-sample weight (regularisation images get ``data.reg_weight``). Every random draw is keyed by the sample's
global id, so 2 processes x batch b train the same adapter as 1 process x batch 2b, and a resumed run the
same as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.training.recipes import BlockwiseConfig  # noqa: F401 - its recipe schema, importable from here

# Salts of the per-sample random streams (see lorakit.training.loop.randn_per_sample).
SALT_LATENT, SALT_NOISE, SALT_OFFSET, SALT_TIMESTEP = 20, 21, 22, 23




_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _dtype(name: str, key: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{key}={name!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def block_ranks(cfg, arch: str) -> dict[str, tuple[int, float]]:
    """``{fine block: (rank, alpha multiplier)}`` for the config's ``network.blocks``."""
    from lorakit.blocks import resolve_block_spec

    spec = cfg.network.blocks
    if hasattr(spec, "items") or isinstance(spec, (list, tuple)) or hasattr(spec, "__len__") and not isinstance(spec, str):
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    return resolve_block_spec(spec, arch, cfg.network.rank)


def layer_width(module: torch.nn.Module) -> int | None:
    """The largest useful LoRA rank of a layer: min(in, out) (a conv's input counts its kernel)."""
    if isinstance(module, torch.nn.Linear):
        return min(module.in_features, module.out_features)
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        return min(module.in_channels * kh * kw, module.out_channels)
    return None


def warn_rank_above_width(model: torch.nn.Module, ranks: dict[str, tuple[int, float]], key: str) -> int:
    """Print one warning when some layers get a rank above min(in, out): the extra rank adds parameters and
    memory but no capacity (the update cannot exceed that rank). Returns how many layers are affected."""
    import sys

    over = []
    for name, (r, _) in ranks.items():
        width = layer_width(model.get_submodule(name))
        if width is not None and r > width:
            over.append((name, r, width))
    if over:
        name, r, width = over[0]
        print(f"lorakit: warning: {key}={r} is above the width of {len(over)} of {len(ranks)} layers (e.g. {name}: "
              f"min(in, out) = {width}); a rank above a layer's width adds parameters but no capacity",
              file=sys.stderr)
    return len(over)


def add_lora(pipe, cfg, arch: str) -> dict[str, torch.nn.Module]:
    """Inject peft LoRA/LoCon into the UNet (configured blocks) and, if asked, the text encoder(s).

    Returns ``{component: module}`` of the components that now train.
    """
    from peft import inject_adapter_in_model

    from lorakit.blocks import lora_able_modules, lora_config, module_ranks, text_encoder_modules

    net = cfg.network
    ranks = module_ranks(
        lora_able_modules(pipe.unet), block_ranks(cfg, arch), net.type, rank=net.rank, alpha=net.alpha,
        conv_rank=net.conv_rank, conv_alpha=net.conv_alpha,
    )
    warn_rank_above_width(pipe.unet, ranks, "network.rank")
    inject_adapter_in_model(lora_config(ranks, dropout=net.dropout), pipe.unet, adapter_name="default")
    trained = {"unet": pipe.unet}
    if net.train_text_encoder:
        for comp in ("text_encoder", "text_encoder_2"):
            te = getattr(pipe, comp, None)
            if te is None:
                continue
            te_ranks = {n: (net.text_encoder_rank, net.text_encoder_alpha) for n in text_encoder_modules(te)}
            warn_rank_above_width(te, te_ranks, "network.text_encoder_rank")
            inject_adapter_in_model(lora_config(te_ranks, dropout=net.dropout), te, adapter_name="default")
            trained[comp] = te
    for module in trained.values():
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
    return trained


def encode_prompts(pipe, captions: list[str], encoders: dict[str, torch.nn.Module], device) -> dict:
    """Text conditioning for the UNet.

    SD1/SD2: ``encoder_hidden_states`` [b, 77, d] (last hidden state). SDXL: penultimate hidden states of both
    encoders concatenated [b, 77, d1 + d2] and ``text_embeds`` [b, d2] (pooled projection of encoder 2).
    ``encoders`` maps component names to the modules to call (the prepared ones when they train).
    """
    def ids(tok):
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(device)

    if getattr(pipe, "text_encoder_2", None) is None:
        return {"encoder_hidden_states": encoders["text_encoder"](ids(pipe.tokenizer))[0]}
    out1 = encoders["text_encoder"](ids(pipe.tokenizer), output_hidden_states=True)
    out2 = encoders["text_encoder_2"](ids(pipe.tokenizer_2), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return {"encoder_hidden_states": hidden, "text_embeds": out2[0]}


def diffusion_loss(unet, noise_scheduler, latents, cond: dict, sample_ids, seed: int, cfg, time_ids=None,
                   loss_weight=None) -> torch.Tensor:
    """Mean denoising loss of a micro-batch.

    Args:
        latents: [b, C, h, w] scaled VAE latents. cond: from :func:`encode_prompts`.
        sample_ids: [b] global sample ids (keys of the noise/timestep draws).
        time_ids: SDXL [b, 6] (original size, crop top-left, target size).
        loss_weight: [b] per-sample weights (regularisation).
    """
    from diffusers.training_utils import compute_snr

    from lorakit.training.loop import randint_per_sample, randn_per_sample

    dev, b = latents.device, latents.shape[0]
    noise = randn_per_sample(latents.shape[1:], sample_ids, seed, SALT_NOISE, dev, latents.dtype)
    if cfg.noise_offset:
        offset = randn_per_sample((latents.shape[1], 1, 1), sample_ids, seed, SALT_OFFSET, dev, latents.dtype)
        noise = noise + cfg.noise_offset * offset
    timesteps = randint_per_sample(0, noise_scheduler.config.num_train_timesteps, sample_ids, seed, SALT_TIMESTEP, dev)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    kwargs = {}
    if "text_embeds" in cond:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
    pred = unet(noisy, timesteps, cond["encoder_hidden_states"], **kwargs).sample
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma and cfg.min_snr_gamma > 0:
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=cfg.min_snr_gamma)
        per_sample = per_sample * (weight / snr if kind == "epsilon" else weight / (snr + 1))
    if loss_weight is not None:
        per_sample = per_sample * loss_weight.to(per_sample)
    return per_sample.mean()


def adapter_from_pipe(pipe, cfg, arch: str, trained: dict, dtype: torch.dtype | None = None):
    """The trained adapter (``lorakit.adapters.io.Adapter``) with DESIGN.md metadata."""
    from lorakit.adapters.io import Adapter, adapter_metadata, from_peft
    from lorakit.config import to_dict

    modules = {}
    for comp, model in trained.items():
        modules.update(from_peft(model, comp))
    if dtype is not None:
        for m in modules.values():
            m.down, m.up = m.down.to(dtype), m.up.to(dtype)
    ranks = {blk: r for blk, (r, _) in block_ranks(cfg, arch).items()}
    meta = adapter_metadata(
        arch, cfg.network.type, blocks=ranks, trigger=cfg.trigger or None, config=to_dict(cfg),
        rank=cfg.network.rank, alpha=cfg.network.alpha, **{"lorakit.trainer": "blockwise"},
    )
    return Adapter(modules=modules, metadata=meta)


def train(cfg, accelerator=None, pipe=None):
    """Run a block-wise LoRA/LoCon training from a resolved :class:`BlockwiseConfig`.

    ``pipe``: an already loaded base pipeline to train on instead of loading ``cfg.base_model`` (benchmarks).

    Returns the loop's :class:`~lorakit.training.loop.TrainResult` (``final_path`` is the adapter file).
    """
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    from lorakit.adapters.io import save_adapter
    from lorakit.data import CaptionedImages, LatentCache, collate
    from lorakit.memory import check_training
    from lorakit.models import load_base, pipeline_arch
    from lorakit.training.loop import TrainLoop, build_optimizer, make_accelerator, preflight, mixed_precision, randn_per_sample

    preflight(cfg)  # config values and output_dir, before any model loads
    weight_dtype = _DTYPES[mixed_precision(cfg)]
    save_dtype = _dtype(cfg.save_precision, "save_precision")
    if not cfg.base_model and pipe is None:
        raise ValueError("base_model is not set (a diffusers folder, a .safetensors checkpoint, a hub id or tiny:sd1)")
    if cfg.network.type not in ("lora", "locon"):
        raise ValueError(f"network.type={cfg.network.type!r}: expected 'lora' or 'locon'")
    dataset = CaptionedImages(cfg.data, seed=cfg.seed)  # fail on bad data before loading the model
    check_training("train", cfg, pipe if pipe is not None else cfg.base_model, weight_dtype,
                   max(cfg.network.rank, cfg.network.conv_rank or 0), conv=cfg.network.type == "locon")

    owns_pipe = pipe is None  # a pipeline passed in stays whole; one loaded here may lose its VAE encoder
    if pipe is None:
        pipe = load_base(cfg.base_model)
    arch = pipeline_arch(pipe)
    sdxl = arch == "sdxl"
    if accelerator is None:
        accelerator = make_accelerator(cfg, find_unused_parameters=sdxl and cfg.network.train_text_encoder)
    set_seed(cfg.seed)  # peft's lora_A init: same on every process
    device = accelerator.device

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if cfg.prediction_type:
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={cfg.prediction_type!r}: expected 'epsilon' or 'v_prediction'")
        noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
        pipe.scheduler.register_to_config(prediction_type=cfg.prediction_type)

    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is not None:
            model.requires_grad_(False)
    # Frozen weights in the compute dtype; the SDXL VAE overflows in fp16, so it stays fp32 there.
    vae_dtype = torch.float32 if (sdxl and weight_dtype == torch.float16) else weight_dtype
    pipe.vae.to(device, dtype=vae_dtype)
    pipe.unet.to(device, dtype=weight_dtype)
    for comp in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, comp, None) is not None:
            getattr(pipe, comp).to(device, dtype=weight_dtype)
    trained = add_lora(pipe, cfg, arch)
    for module in trained.values():
        module.to(device)
    if cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)

    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    groups = [{"params": list(pipe.unet.parameters()), "lr": cfg.learning_rate}]
    groups += [{"params": list(m.parameters()), "lr": te_lr} for c, m in trained.items() if c != "unet"]
    optimizer = build_optimizer(cfg, groups)

    if cfg.data.cache_latents:
        if not cfg.data.center_crop:
            accelerator.print("lorakit: data.cache_latents needs data.center_crop=true (random crops change the "
                              "latents); training without the cache")
        else:
            cache_dir = cfg.data.cache_dir or str(Path(cfg.output_dir) / "latent_cache")
            if cfg.data.cache_dir is None and accelerator.is_main_process:
                # the cache goes inside output_dir: claim (check + mark) it first, as the loop would
                from lorakit.outputs import claim_dir

                claim_dir(cfg.output_dir, kind="training", flag="output_dir")
            accelerator.wait_for_everyone()
            cache = LatentCache(cache_dir, pipe.vae, device, vae_dtype)
            flips = (False, True) if cfg.data.random_flip else (False,)
            if accelerator.is_main_process:
                n = cache.fill(dataset, flips)
                total = len({cache.path_for(dataset, i, f) for i in range(len(dataset)) for f in flips})
                accelerator.print(f"lorakit: latent cache {cache_dir}: {n} encoded, {total - n} reused")
            accelerator.wait_for_everyone()
            dataset.latent_cache = cache
            if owns_pipe and cache.complete(dataset, flips):
                # Every latent is on disk and sampling only decodes: the encoder's weights (65 MiB at SD 1.5 in
                # bf16) would sit unused through the whole run.
                pipe.vae.encoder = None
                pipe.vae.quant_conv = None

    order = list(trained)
    scaling = pipe.vae.config.scaling_factor
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0

    def compute_loss(batch, step, models):
        live = dict(zip(order, models))
        encoders = {c: live.get(c, getattr(pipe, c, None)) for c in ("text_encoder", "text_encoder_2")}
        ids = batch["sample_id"]
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            with torch.no_grad():
                dist = pipe.vae.encode(batch["pixel_values"].to(device, vae_dtype)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        eps = randn_per_sample(mean.shape[1:], ids, cfg.seed, SALT_LATENT, device)
        latents = ((mean + std * eps - shift) * scaling).to(weight_dtype)
        with torch.set_grad_enabled(cfg.network.train_text_encoder):
            cond = encode_prompts(pipe, batch["caption"], encoders, device)
        time_ids = None
        if sdxl:
            time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], 1)
            time_ids = time_ids.to(device, weight_dtype)
        with accelerator.autocast():
            return diffusion_loss(live["unet"], noise_scheduler, latents, cond, ids, cfg.seed, cfg, time_ids,
                                  batch["loss_weight"])

    def save(path):
        save_adapter(adapter_from_pipe(pipe, cfg, arch, trained, save_dtype), path)

    size = cfg.sample_resolution or cfg.data.resolution

    def sample(step):
        if not cfg.sample_prompts:
            return None
        gen = torch.Generator(device="cpu").manual_seed(cfg.sample_seed)
        with accelerator.autocast():
            out = pipe(list(cfg.sample_prompts), num_inference_steps=cfg.sample_num_inference_steps,
                       guidance_scale=cfg.sample_guidance_scale, generator=gen, height=size, width=size)
        return out.images

    hint = (f"  use it:          pipe.load_lora_weights('{cfg.output_dir}', weight_name='{cfg.output_name}.safetensors')"
            f"  |  lorakit inspect {Path(cfg.output_dir) / (cfg.output_name + '.safetensors')}")
    loop = TrainLoop(cfg, accelerator, [trained[c] for c in order], optimizer, dataset, compute_loss, save,
                     sample=sample if cfg.sample_every else None, collate_fn=collate, summary_hint=hint)
    if cfg.compile:
        loop.raw_models[0] = torch.compile(loop.raw_models[0])
    accelerator.print(
        f"lorakit: block-wise {cfg.network.type} on {arch} ({cfg.base_model}): "
        f"{sum(p.numel() for g in groups for p in g['params'] if p.requires_grad):,} trainable parameters, "
        f"{dataset.num_images} images x {cfg.data.repeats} repeats"
        + (f" + {dataset.num_reg} regularisation images" if dataset.num_reg else "")
        + f", {len(dataset.buckets())} bucket(s), global batch {cfg.train_batch_size * accelerator.num_processes}"
    )
    return loop.run()


def main(argv: list[str] | None = None) -> int:
    """``train_blockwise.py --config X.yaml [key=value ...]`` (see :mod:`lorakit.training.entry`)."""
    from lorakit.training.entry import main as entry_main

    return entry_main("blockwise", argv)
