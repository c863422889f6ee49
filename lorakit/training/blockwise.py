"""Block-wise LoRA / LoCon training (arXiv 2403.07500) on the shared loop.

``train(cfg)`` trains an adapter on the blocks that ``network.blocks`` selects (any vocabulary of
:mod:`lorakit.blocks`) and writes ``<output_dir>/<output_name>.safetensors`` (kohya names, lorakit metadata with
the resolved config and the rank of every block). Run it with ``accelerate launch train_blockwise.py --config
train_configs/<recipe>.yaml [key=value ...]`` or ``lorakit train blockwise --config ...``.

The recipe's phases: check the recipe and data, set up the base models, add the adapters, build the
optimizer, fill the latent cache, then the loop (loss, save, samples). The loss is diffusers' text-to-image
LoRA loss (:mod:`lorakit.training.diffusion_step`): noise (with optional offset) at a uniform timestep, epsilon
or v-prediction target, optional min-SNR-gamma weighting, and a per-sample weight (regularisation images get
``data.reg_weight``). Every random draw is keyed by the sample's global id, so 2 processes x batch b train the
same adapter as 1 process x batch 2b, and a resumed run the same as an uninterrupted one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params
from omegaconf import OmegaConf
from peft import inject_adapter_in_model

from lorakit.adapters.io import Adapter, adapter_metadata, from_peft, save_adapter
from lorakit.blocks import (
    lora_able_modules,
    lora_config,
    module_ranks,
    resolve_block_spec,
    select_target_modules,
    text_encoder_modules,
)
from lorakit.conditioning import batch_time_ids, encode_prompts, is_sdxl, text_encoders
from lorakit.config import to_dict
from lorakit.data import CaptionedImages, LatentCache, collate
from lorakit.logs import note, warn
from lorakit.memory import check_training
from lorakit.models import pipeline_arch
from lorakit.outputs import claim_dir
from lorakit.precision import torch_dtype
from lorakit.training import diffusion_step as step
from lorakit.training import kv_prior
from lorakit.training.entry import main as entry_main
from lorakit.training.loop import TrainLoop, build_optimizer, make_accelerator, preflight
from lorakit.training.recipes import BlockwiseConfig  # noqa: F401 - its recipe schema, importable from here
from lorakit.training.setup import DiffusionRun, base_pipeline, freeze_and_place, require_base, sample_images
from lorakit.training.setup import trainable_count

# Salts of the per-sample random streams (kept here for callers; see lorakit.training.diffusion_step).
SALT_LATENT, SALT_NOISE, SALT_OFFSET, SALT_TIMESTEP = (step.SALT_LATENT, step.SALT_NOISE, step.SALT_OFFSET,
                                                       step.SALT_TIMESTEP)


def block_ranks(cfg, arch: str) -> dict[str, tuple[int, float]]:
    """``{fine block: (rank, alpha multiplier)}`` for the config's ``network.blocks``."""
    spec = cfg.network.blocks
    if hasattr(spec, "items") or isinstance(spec, (list, tuple)) or hasattr(spec, "__len__") and not isinstance(spec, str):
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
    over = []
    for name, (r, _) in ranks.items():
        width = layer_width(model.get_submodule(name))
        if width is not None and r > width:
            over.append((name, r, width))
    if over:
        name, r, width = over[0]
        warn(f"{key}={r} is above the width of {len(over)} of {len(ranks)} layers (e.g. {name}: "
             f"min(in, out) = {width}); a rank above a layer's width adds parameters but no capacity")
    return len(over)


def add_lora(pipe, cfg, arch: str) -> dict[str, torch.nn.Module]:
    """Inject peft LoRA/LoCon into the UNet (configured blocks) and, if asked, the text encoder(s).

    Returns ``{component: module}`` of the components that now train (trainable weights in fp32).
    """
    net = cfg.network
    ranks = module_ranks(
        lora_able_modules(pipe.unet), block_ranks(cfg, arch), net.type, rank=net.rank, alpha=net.alpha,
        conv_rank=net.conv_rank, conv_alpha=net.conv_alpha,
    )
    ranks = select_target_modules(ranks, net.target_modules)
    warn_rank_above_width(pipe.unet, ranks, "network.rank")
    inject_adapter_in_model(lora_config(ranks, dropout=net.dropout), pipe.unet, adapter_name="default")
    trained = {"unet": pipe.unet}
    if net.train_text_encoder:
        for comp, _ in text_encoders(pipe):
            te = getattr(pipe, comp)
            te_ranks = {n: (net.text_encoder_rank, net.text_encoder_alpha) for n in text_encoder_modules(te)}
            warn_rank_above_width(te, te_ranks, "network.text_encoder_rank")
            inject_adapter_in_model(lora_config(te_ranks, dropout=net.dropout), te, adapter_name="default")
            trained[comp] = te
    for module in trained.values():
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
    cast_training_params(list(trained.values()), dtype=torch.float32)  # trainable weights stay fp32
    return trained


def diffusion_loss(unet, noise_scheduler, latents, cond: dict, sample_ids, seed: int, cfg, time_ids=None,
                   loss_weight=None) -> torch.Tensor:
    """Mean denoising loss of a micro-batch (see :func:`lorakit.training.diffusion_step.predict`), weighted by
    min-SNR-gamma (``cfg.min_snr_gamma``) and per sample (``loss_weight`` [b], regularisation)."""
    p = step.predict(unet, noise_scheduler, latents, cond, sample_ids, seed, cfg.noise_offset, time_ids)
    per_sample = torch.nn.functional.mse_loss(p.pred.float(), p.target.float(), reduction="none").mean(dim=(1, 2, 3))
    weight = step.min_snr_weights(noise_scheduler, p.timesteps, cfg.min_snr_gamma)
    if weight is not None:
        per_sample = per_sample * weight
    if loss_weight is not None:
        per_sample = per_sample * loss_weight.to(per_sample)
    return per_sample.mean()


def adapter_from_pipe(pipe, cfg, arch: str, trained: dict) -> Adapter:
    """The trained adapter (float32, as trained) with lorakit's metadata (resolved config, rank of every block);
    :func:`save_fn` casts it to ``save_precision``."""
    modules = {}
    for comp, model in trained.items():
        modules.update(from_peft(model, comp))
    ranks = {blk: r for blk, (r, _) in block_ranks(cfg, arch).items()}
    meta = adapter_metadata(
        arch, cfg.network.type, blocks=ranks, trigger=cfg.trigger or None, config=to_dict(cfg),
        rank=cfg.network.rank, alpha=cfg.network.alpha, **{"lorakit.trainer": "blockwise"},
    )
    return Adapter(modules=modules, metadata=meta)


# ------------------------------------------------------------------------------------------------ the recipe


@dataclass
class Run(DiffusionRun):
    """What the phases of one training build and the loop's callables use."""

    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    noise_scheduler: object = None
    trained: dict | None = None
    owns_pipe: bool = False  # a pipeline passed in stays whole; one loaded here may lose its VAE encoder


def check_recipe(cfg, pipe) -> tuple[CaptionedImages, torch.dtype]:
    """Config values, output_dir and the data, before any model loads. Returns (dataset, compute dtype)."""
    preflight(cfg)
    weight_dtype = torch_dtype(cfg.mixed_precision, "mixed_precision")
    torch_dtype(cfg.save_precision, "save_precision")
    require_base(cfg, pipe)
    if cfg.network.type not in ("lora", "locon"):
        raise ValueError(f"network.type={cfg.network.type!r}: expected 'lora' or 'locon'")
    check_kv_reg_strength(cfg)
    dataset = CaptionedImages(cfg.data, seed=cfg.seed)
    check_training("train", cfg, pipe if pipe is not None else cfg.base_model, weight_dtype,
                   max(cfg.network.rank, cfg.network.conv_rank or 0), conv=cfg.network.type == "locon")
    return dataset, weight_dtype


def setup_models(cfg, accelerator, pipe, weight_dtype) -> Run:
    """Load the base, make the accelerator, freeze the base and place it in the compute dtype."""
    owns_pipe = pipe is None
    pipe = base_pipeline(cfg, pipe)
    sdxl = is_sdxl(pipe)
    if accelerator is None:
        accelerator = make_accelerator(cfg, find_unused_parameters=sdxl and cfg.network.train_text_encoder)
    set_seed(cfg.seed)  # peft's lora_A init: same on every process
    noise_scheduler = step.training_scheduler(pipe, cfg.prediction_type)
    # The SDXL VAE overflows in fp16, so it stays fp32 there.
    vae_dtype = torch.float32 if (sdxl and weight_dtype == torch.float16) else weight_dtype
    freeze_and_place(pipe, accelerator.device, weight_dtype, vae_dtype)
    return Run(cfg, accelerator, pipe, pipeline_arch(pipe), weight_dtype, vae_dtype, noise_scheduler,
               owns_pipe=owns_pipe)


def setup_adapters(run: Run) -> None:
    """Add the LoRA/LoCon layers; ``run.trained`` = the modules that now train."""
    run.trained = add_lora(run.pipe, run.cfg, run.arch)
    if run.cfg.network.kv_reg_strength:  # before training, not at the first save
        kv_prior.require_kv_layers(run.pipe.unet, from_peft(run.pipe.unet, "unet"))
    for module in run.trained.values():
        module.to(run.accelerator.device)
    if run.cfg.channels_last:
        run.pipe.unet.to(memory_format=torch.channels_last)


def setup_optimizer(run: Run) -> tuple[torch.optim.Optimizer, list[dict]]:
    """AdamW over the UNet LoRA (``learning_rate``) and text-encoder LoRA (``text_encoder_lr``)."""
    cfg = run.cfg
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    groups = [{"params": list(run.pipe.unet.parameters()), "lr": cfg.learning_rate}]
    groups += [{"params": list(m.parameters()), "lr": te_lr} for c, m in run.trained.items() if c != "unet"]
    return build_optimizer(cfg, groups), groups


def setup_latent_cache(run: Run, dataset: CaptionedImages) -> None:
    """With ``data.cache_latents``: encode every centre crop once (main process) and read latents from disk."""
    cfg, acc = run.cfg, run.accelerator
    if not cfg.data.cache_latents:
        return
    if not cfg.data.center_crop:
        note("lorakit: data.cache_latents needs data.center_crop=true (random crops change the latents); "
             "training without the cache")
        return
    cache_dir = cfg.data.cache_dir or str(Path(cfg.output_dir) / "latent_cache")
    if cfg.data.cache_dir is None and acc.is_main_process:
        # the cache goes inside output_dir: claim (check + mark) it first, as the loop would
        claim_dir(cfg.output_dir, kind="training", flag="output_dir")
    acc.wait_for_everyone()
    cache = LatentCache(cache_dir, run.pipe.vae, acc.device, run.vae_dtype)
    flips = (False, True) if cfg.data.random_flip else (False,)
    if acc.is_main_process:
        n = cache.fill(dataset, flips)
        total = len({cache.path_for(dataset, i, f) for i in range(len(dataset)) for f in flips})
        note(f"lorakit: latent cache {cache_dir}: {n} encoded, {total - n} reused")
    acc.wait_for_everyone()
    dataset.latent_cache = cache
    if run.owns_pipe and cache.complete(dataset, flips):
        # Every latent is on disk and sampling only decodes: the encoder's weights (65 MiB at SD 1.5 in bf16)
        # would sit unused through the whole run.
        run.pipe.vae.encoder = None
        run.pipe.vae.quant_conv = None


def loss_fn(run: Run, order: list[str]):
    """``compute_loss(batch, step, models)`` of the loop: latents, text conditioning, denoising loss."""
    cfg, pipe, acc = run.cfg, run.pipe, run.accelerator
    sdxl = is_sdxl(pipe)

    def compute_loss(batch, step_index, models):
        live = dict(zip(order, models))
        latents = step.vae_latents(pipe.vae, batch, cfg.seed, run.weight_dtype)
        with torch.set_grad_enabled(cfg.network.train_text_encoder):
            cond = encode_prompts(pipe, batch["caption"], live, acc.device)
        time_ids = batch_time_ids(batch, run.weight_dtype, acc.device) if sdxl else None
        with acc.autocast():
            return diffusion_loss(live["unet"], run.noise_scheduler, latents, cond, batch["sample_id"], cfg.seed,
                                  cfg, time_ids, batch["loss_weight"])

    return compute_loss


def check_kv_reg_strength(cfg) -> None:
    """``network.kv_reg_strength`` needs regularisation captions and a frozen text encoder."""
    strength = cfg.network.kv_reg_strength
    if strength < 0:
        raise ValueError(f"network.kv_reg_strength={strength}: expected 0 (off) or a positive weight")
    if strength and not cfg.data.reg_path:
        raise ValueError(f"network.kv_reg_strength={strength} needs data.reg_path (its captions are what the "
                         "key / value layers are kept off)")
    if strength and cfg.network.train_text_encoder:
        raise ValueError(f"network.kv_reg_strength={strength} needs network.train_text_encoder: false (it "
                         "measures the captions with the base's text encoder)")


def save_fn(run: Run, dataset: CaptionedImages):
    """``save(path)`` of the loop: the adapter in ``save_precision``; with ``network.kv_reg_strength``, its
    cross-attention key / value layers kept off the regularisation captions (:mod:`lorakit.training.kv_prior`;
    the training state, and so a resume, keeps the layers as trained)."""
    cfg = run.cfg
    save_dtype = torch_dtype(cfg.save_precision, "save_precision")
    grams = {}

    def save(path):
        adapter = adapter_from_pipe(run.pipe, cfg, run.arch, run.trained)
        if cfg.network.kv_reg_strength:
            if not grams:
                for key, reg in (("own", False), ("reg", True)):
                    captions = sorted({r.caption for r in dataset.items if r.is_reg == reg})
                    grams[key] = kv_prior.token_gram(run.pipe, captions)
            adapter.modules = kv_prior.keep_off_regularisation(adapter.modules, run.pipe.unet, grams["own"],
                                                               grams["reg"], cfg.network.kv_reg_strength)
        for m in adapter.modules.values():
            m.down, m.up = m.down.to(save_dtype), m.up.to(save_dtype)
        save_adapter(adapter, path)

    return save


def sample_fn(run: Run):
    """``sample(step)`` of the loop: the recipe's sample prompts, or None without ``sample_every``."""
    cfg = run.cfg
    if not cfg.sample_every:
        return None

    def sample(step_index):
        if not cfg.sample_prompts:
            return None
        return sample_images(run.pipe, cfg, run.accelerator, prompt=list(cfg.sample_prompts))

    return sample


def train(cfg, accelerator=None, pipe=None):
    """Run a block-wise LoRA/LoCon training from a resolved :class:`BlockwiseConfig`.

    ``pipe``: an already loaded base pipeline to train on instead of loading ``cfg.base_model`` (benchmarks).

    Returns the loop's :class:`~lorakit.training.loop.TrainResult` (``final_path`` is the adapter file).
    """
    dataset, weight_dtype = check_recipe(cfg, pipe)
    run = setup_models(cfg, accelerator, pipe, weight_dtype)
    setup_adapters(run)
    optimizer, groups = setup_optimizer(run)
    setup_latent_cache(run, dataset)
    order = list(run.trained)
    final = Path(cfg.output_dir) / (cfg.output_name + ".safetensors")
    hint = (f"  use it:          pipe.load_lora_weights('{cfg.output_dir}', weight_name='{cfg.output_name}.safetensors')"
            f"  |  lorakit inspect {final}")
    loop = TrainLoop(cfg, run.accelerator, [run.trained[c] for c in order], optimizer, dataset, loss_fn(run, order),
                     save_fn(run, dataset), sample=sample_fn(run), collate_fn=collate, summary_hint=hint)
    if cfg.compile:
        loop.raw_models[0] = torch.compile(loop.raw_models[0])
    note(
        f"lorakit: block-wise {cfg.network.type} on {run.arch} ({cfg.base_model}): "
        f"{trainable_count(groups):,} trainable parameters, {dataset.num_images} images x {cfg.data.repeats} repeats"
        + (f" + {dataset.num_reg} regularisation images" if dataset.num_reg else "")
        + f", {len(dataset.buckets())} bucket(s), global batch {cfg.train_batch_size * run.accelerator.num_processes}"
    )
    return loop.run()


def main(argv: list[str] | None = None) -> int:
    """``train_blockwise.py --config X.yaml [key=value ...]`` (see :mod:`lorakit.training.entry`)."""
    return entry_main("blockwise", argv)


if __name__ == "__main__":
    sys.exit(main())
