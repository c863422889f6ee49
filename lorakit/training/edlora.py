"""ED-LoRA training (Mix-of-Show, NeurIPS 2023) on the shared loop.

``train(cfg)`` learns one concept: two pseudo-words (``concept.tokens``, e.g. ``"<cat1> <cat2>"``) with one
embedding per UNet cross-attention layer each (the first initialised ``randn * 0.013``, the second from
``concept.init_word``), plus rank-4 LoRA on the text encoder's q/k/v/out projections and the UNet's attention
``to_q/to_k/to_v/to_out.0`` (self and cross). Only the new embedding rows train (a separate parameter,
:class:`lorakit.adapters.edlora.TrainableTokenRows`); three learning rates (embeddings 1e-3, text-encoder LoRA 1e-5,
UNet LoRA 1e-4), AdamW with weight decay 0.01, linear decay, noise offset 0.01.

Data (``data.path``): images with same-name ``.txt`` captions that contain the placeholder ``concept.placeholder``
(default ``<TOK>``; replaced by the pseudo-words), or a ``metadata.jsonl`` imagefolder. Optional masks
(``mask_path``: a folder with one mask per image, same file stem, white = concept) weight the loss
(``masked_loss``) and drive the cross-attention regulariser (``attn_reg_weight``, 0.01 in the paper).
See docs/edlora.md.

The result ``<output_dir>/<output_name>.safetensors`` has ``lorakit.kind = edlora``; load it with
``lorakit.adapters.edlora.load_edlora(pipe, file)``. Every random draw is keyed by the global sample id, so
2 processes x batch b equal 1 process x batch 2b, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params
from peft import inject_adapter_in_model

from lorakit.adapters import edlora as ed
from lorakit.adapters.io import from_peft, save_adapter
from lorakit.blocks import lora_config, text_encoder_modules
from lorakit.conditioning import TEXT_ENCODERS, batch_time_ids, is_sdxl, token_ids
from lorakit.config import to_dict
from lorakit.data import collate
from lorakit.logs import note
from lorakit.memory import check_training
from lorakit.models import pipeline_arch
from lorakit.precision import torch_dtype
from lorakit.training import diffusion_step as step
from lorakit.training.edlora_data import ConceptImages, concept_words  # noqa: F401 - the recipe's data, importable here
from lorakit.training.entry import main as entry_main
from lorakit.training.loop import TrainLoop, build_optimizer, make_accelerator, preflight
from lorakit.training.recipes import EDLoRAConfig  # noqa: F401 - its recipe schema, importable from here
from lorakit.training.setup import DiffusionRun, base_pipeline, freeze_and_place, require_base, sample_images
from lorakit.training.setup import trainable_count

UNET_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")








# --------------------------------------------------------------------------------------------------- model


@dataclass
class TextSide:
    """One tokenizer / text encoder pair with its concept tokens."""

    component: str
    tokenizer: object
    token_map: dict[int, list[int]]
    first_id: int
    eos_token_id: int


def _init_rows(cfg, tokenizer, text_encoder, n_layers: int, gen: torch.Generator) -> torch.Tensor:
    """Initial rows ``[2 * L, D]``: word 1 ``randn * init_std`` (all layers alike), word 2 the class word's row."""
    emb = text_encoder.get_input_embeddings().weight.detach()
    d = emb.shape[1]
    # drawn on the CPU generator (same rows on every device), then placed beside the table: the trainer moves the
    # base to the GPU before this runs
    first = (torch.randn(1, d, generator=gen) * cfg.concept.init_std).to(emb.device, emb.dtype).repeat(n_layers, 1)
    if not cfg.concept.init_word:
        raise ValueError("concept.init_word is not set: name the class word of the concept (e.g. cat, man, dog)")
    ids = tokenizer(cfg.concept.init_word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"concept.init_word={cfg.concept.init_word!r} is {len(ids)} tokens for this tokenizer; use a word that "
            "is one token (e.g. cat, man, dog)"
        )
    second = emb[ids[0]].float().unsqueeze(0).repeat(n_layers, 1)
    return torch.cat([first.float(), second])


def setup_edlora(pipe, cfg, device=None) -> tuple[dict[str, torch.nn.Module], list[TextSide], list[str]]:
    """Add the concept's tokens, trainable rows, LoRA and per-layer processors to ``pipe`` (in place).

    Returns ``(trained {component: module}, text sides, cross-attention layer paths)``.
    """
    words = concept_words(cfg)
    layers = ed.cross_attention_layers(pipe.unet)
    L = len(layers)
    gen = torch.Generator().manual_seed(cfg.seed)
    sides, trained = [], {}
    net = cfg.network
    for comp, tok_name in TEXT_ENCODERS:
        enc = getattr(pipe, comp, None)
        if enc is None:
            continue
        tokenizer = getattr(pipe, tok_name)
        rows = _init_rows(cfg, tokenizer, enc, L, gen)
        token_map = ed.add_concept_tokens(tokenizer, enc, words, L)
        ids = [i for w in token_map.values() for i in w]
        first = ids[0]
        if ids != list(range(first, first + 2 * L)):
            raise RuntimeError(f"{tok_name}: new token ids are not contiguous: {ids[:4]}...")
        if net.train_text_encoder:
            ranks = {n: (net.text_encoder_rank, net.text_encoder_alpha) for n in text_encoder_modules(enc)
                     if n.endswith(TE_TARGETS)}
            inject_adapter_in_model(lora_config(ranks), enc, adapter_name="default")
        for name, p in enc.named_parameters():
            p.requires_grad_("lora_" in name)
        enc.set_input_embeddings(ed.TrainableTokenRows(enc.get_input_embeddings(), first, rows))
        sides.append(TextSide(comp, tokenizer, token_map, first, tokenizer.eos_token_id))
        trained[comp] = enc
    unet_ranks = {n: (net.rank, net.alpha) for n, m in pipe.unet.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.endswith(UNET_TARGETS) and (".attn1." in n or ".attn2." in n)}
    inject_adapter_in_model(lora_config(unet_ranks), pipe.unet, adapter_name="default")
    for name, p in pipe.unet.named_parameters():
        p.requires_grad_("lora_" in name)
    ed.install_layerwise_processors(pipe.unet, tuple(getattr(pipe, s.component).config.hidden_size for s in sides))
    trained = {"unet": pipe.unet, **trained}
    cast_training_params(list(trained.values()), dtype=torch.float32)  # trainable weights stay fp32
    return trained, sides, layers


def text_sides(pipe, words: list[str], n_layers: int) -> list[TextSide]:
    """The :class:`TextSide` of every text encoder of a pipeline whose tokenizers already hold ``words``' tokens."""
    sides = []
    for comp, tok_name in TEXT_ENCODERS:
        if getattr(pipe, comp, None) is None:
            continue
        tok = getattr(pipe, tok_name)
        tmap = {}
        for w in words:
            ids = tok.convert_tokens_to_ids(ed.layer_token_names(w, n_layers))
            tmap[ids[0]] = ids
        first = min(i for v in tmap.values() for i in v)
        sides.append(TextSide(comp, tok, tmap, first, tok.eos_token_id))
    return sides


def encode_captions(captions: list[str], sides: list[TextSide], encoders: dict, n_layers: int, device) -> dict:
    """Packed per-layer text conditioning: ``encoder_hidden_states [B, S, L * C]`` (+ SDXL ``text_embeds [B, P]``)."""
    sdxl = len(sides) > 1
    per_layer, pooled = [], None
    for s in sides:
        ids = token_ids(s.tokenizer, captions, device)
        lw = ed.encode_layerwise(encoders[s.component], ids, s.token_map, n_layers, s.eos_token_id,
                                 output_hidden_states=sdxl)
        per_layer.append(lw.hidden_states[-2] if sdxl else lw.hidden)
        pooled = lw.pooled
    out = {"encoder_hidden_states": ed.pack_layers(per_layer)}
    if sdxl:
        out["text_embeds"] = pooled
    return out


def embeddings_of(trained: dict, sides: list[TextSide], words: list[str], n_layers: int) -> dict:
    """``{component: {word: [L, D]}}`` from the trainable rows."""
    out = {}
    for s in sides:
        rows = trained[s.component].get_input_embeddings().rows.detach().float().cpu()
        out[s.component] = {w: rows[k * n_layers : (k + 1) * n_layers].clone() for k, w in enumerate(words)}
    return out


# --------------------------------------------------------------------------------------------------- loss


class AttentionProbe:
    """Inner processor wrapper that records the cross-attention probabilities of the pseudo-word tokens.

    ``positions``: ``[B, S]`` bool per pseudo-word (set before each forward). Records ``[B, N, W]`` (mean over
    heads) per layer in ``maps``.
    """

    def __init__(self, inner, store: dict):
        self.inner, self.store = inner, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        pos = self.store.get("positions")
        if pos is not None and encoder_hidden_states is not None and hidden_states.dim() == 3:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, k, None)  # [B*h, N, S]
            b = hidden_states.shape[0]
            probs = probs.view(b, attn.heads, probs.shape[1], probs.shape[2]).mean(1)  # [B, N, S]
            per_word = torch.stack([(probs * p[:, None, :].to(probs)).sum(-1) / p.sum(-1).clamp(min=1)[:, None].to(probs)
                                    for p in pos], -1)  # [B, N, W]
            self.store.setdefault("maps", []).append(per_word)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def attention_regulariser(maps: list[torch.Tensor], mask: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean over layers, samples and pseudo-words of ``mse(a / max(a), mask)``.

    Args:
        maps: per layer ``[B, N, W]`` attention of each pseudo-word over the ``N = h * w`` queries.
        mask: ``[B, 1, H, W]`` concept mask in [0, 1]; present: ``[B, W]`` whether the word is in the caption.
    """
    losses = []
    H, W = mask.shape[-2:]
    for m in maps:
        n = m.shape[1]
        f = round((H * W / n) ** 0.5)
        target = torch.nn.functional.interpolate(mask.float(), size=(H // f, W // f), mode="area").flatten(1)  # [B, N]
        a = m.float() / m.float().amax(dim=1, keepdim=True).clamp(min=1e-8)
        err = ((a - target[:, :, None]) ** 2).mean(1)  # [B, W]
        losses.append((err * present).sum() / present.sum().clamp(min=1))
    return torch.stack(losses).mean()


def edlora_loss(unet, noise_scheduler, latents, cond, sample_ids, cfg, time_ids=None, mask=None) -> torch.Tensor:
    """Denoising loss of a micro-batch (:func:`lorakit.training.diffusion_step.predict`), masked
    (``mask [B, 1, H, W]``) when ``cfg.masked_loss``."""
    p = step.predict(unet, noise_scheduler, latents, cond, sample_ids, cfg.seed, cfg.noise_offset, time_ids)
    err = (p.pred.float() - p.target.float()) ** 2
    if cfg.masked_loss and mask is not None:
        err = err * torch.nn.functional.interpolate(mask.float(), size=err.shape[-2:], mode="area")
    return err.mean()


# --------------------------------------------------------------------------------------------------- the recipe


@dataclass
class Run(DiffusionRun):
    """What the phases of one ED-LoRA training build and the loop's callables use."""

    words: list[str]
    weight_dtype: torch.dtype
    noise_scheduler: object = None
    trained: dict | None = None
    sides: list[TextSide] | None = None
    layers: list[str] | None = None
    probe: dict | None = None  # the attention probe's store (attn_reg_weight)


def check_recipe(cfg, pipe) -> tuple[ConceptImages, torch.dtype]:
    """Config values, output_dir and the data, before any model loads. Returns (dataset, compute dtype)."""
    preflight(cfg)
    weight_dtype = torch_dtype(cfg.mixed_precision, "mixed_precision")
    torch_dtype(cfg.save_precision, "save_precision")
    require_base(cfg, pipe)
    concept_words(cfg)
    dataset = ConceptImages(cfg)
    check_training("edlora", cfg, pipe if pipe is not None else cfg.base_model, weight_dtype, cfg.network.rank)
    return dataset, weight_dtype


def setup_models(cfg, accelerator, pipe, weight_dtype) -> Run:
    """Load the base, make the accelerator, freeze the base and place it (the SDXL VAE in fp32)."""
    pipe = base_pipeline(cfg, pipe)
    sdxl = is_sdxl(pipe)
    if accelerator is None:
        accelerator = make_accelerator(cfg, find_unused_parameters=sdxl)
    set_seed(cfg.seed)  # peft's lora_A init: same on every process
    noise_scheduler = step.training_scheduler(pipe, cfg.prediction_type)
    freeze_and_place(pipe, accelerator.device, weight_dtype, torch.float32 if sdxl else weight_dtype)
    return Run(cfg, accelerator, pipe, pipeline_arch(pipe), concept_words(cfg), weight_dtype, noise_scheduler)


def setup_adapters(run: Run) -> None:
    """Concept tokens, trainable rows, LoRA, per-layer processors and (``attn_reg_weight``) attention probes."""
    run.trained, run.sides, run.layers = setup_edlora(run.pipe, run.cfg, run.accelerator.device)
    for m in run.trained.values():
        m.to(run.accelerator.device)
    if run.cfg.attn_reg_weight:
        run.probe = {}
        for name in run.layers:
            proc = run.pipe.unet.get_submodule(name).processor
            proc.inner = AttentionProbe(proc.inner, run.probe)


def setup_optimizer(run: Run) -> tuple[torch.optim.Optimizer, list[dict]]:
    """AdamW with three learning rates: embedding rows, text-encoder LoRA, UNet LoRA."""
    cfg, trained = run.cfg, run.trained
    rows = [trained[s.component].get_input_embeddings().rows for s in run.sides]
    te_lora = [p for s in run.sides for n, p in trained[s.component].named_parameters()
               if "lora_" in n and p.requires_grad]
    unet_lora = [p for p in run.pipe.unet.parameters() if p.requires_grad]
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    groups = [{"params": rows, "lr": cfg.embedding_lr}, {"params": te_lora, "lr": te_lr},
              {"params": unet_lora, "lr": cfg.learning_rate}]
    return build_optimizer(cfg, groups), groups


def loss_fn(run: Run, order: list[str]):
    """``compute_loss(batch, step, models)``: latents, per-layer text conditioning, (masked) denoising loss, and
    the cross-attention regulariser."""
    cfg, pipe, acc, store = run.cfg, run.pipe, run.accelerator, run.probe
    device, n_layers, sdxl = acc.device, len(run.layers), is_sdxl(run.pipe)
    word_ids = [w_ids[0] for w_ids in run.sides[0].token_map.values()]

    def compute_loss(batch, step_index, models):
        live = dict(zip(order, models))
        latents = step.vae_latents(pipe.vae, batch, cfg.seed, run.weight_dtype)
        cond = encode_captions(batch["caption"], run.sides, live, n_layers, device)
        time_ids = batch_time_ids(batch, run.weight_dtype, device) if sdxl else None
        if store is not None:
            tok_ids = token_ids(run.sides[0].tokenizer, batch["caption"])
            store["positions"] = [(tok_ids == w).to(device) for w in word_ids]
            store["maps"] = []
        with acc.autocast():
            loss = edlora_loss(live["unet"], run.noise_scheduler, latents, cond, batch["sample_id"], cfg, time_ids,
                               batch["mask"])
            if store is not None:
                present = torch.stack([p.any(-1) for p in store["positions"]], -1).float()
                loss = loss + cfg.attn_reg_weight * attention_regulariser(store["maps"], batch["mask"], present)
                store["positions"] = None
        return loss

    return compute_loss


def save_fn(run: Run):
    """``save(path)``: the ED-LoRA file (LoRA in ``save_precision``, embeddings, concept, layers)."""
    cfg, words, n_layers = run.cfg, run.words, len(run.layers)
    save_dtype = torch_dtype(cfg.save_precision, "save_precision")

    def save(path):
        modules = {}
        for comp, model in run.trained.items():
            modules.update(from_peft(model, comp))
        for m in modules.values():
            m.down, m.up = m.down.to(save_dtype), m.up.to(save_dtype)
        name = cfg.concept.name or words[0].strip("<>")
        concept = ed.EDLoRAConcept(name=name, words=words, init_word=cfg.concept.init_word)
        adapter = ed.edlora_adapter(modules, embeddings_of(run.trained, run.sides, words, n_layers), [concept],
                                    run.layers, run.arch, config=to_dict(cfg), rank=cfg.network.rank,
                                    alpha=cfg.network.alpha)
        save_adapter(adapter, path)

    return save


def sample_fn(run: Run):
    """``sample(step)``: the sample prompts (placeholder -> pseudo-words) through the trained encoders."""
    cfg, sides, n_layers, device = run.cfg, run.sides, len(run.layers), run.accelerator.device
    if not cfg.sample_every:
        return None

    def sample(step_index):
        if not cfg.sample_prompts:
            return None
        prompts = [p.replace(cfg.concept.placeholder, " ".join(run.words)) for p in cfg.sample_prompts]
        encoders = {s.component: run.trained[s.component] for s in sides}
        cond = encode_captions(prompts, sides, encoders, n_layers, device)
        neg = encode_captions([""] * len(prompts), sides, encoders, n_layers, device)
        kw = dict(prompt_embeds=cond["encoder_hidden_states"], negative_prompt_embeds=neg["encoder_hidden_states"])
        if is_sdxl(run.pipe):
            kw.update(pooled_prompt_embeds=cond["text_embeds"], negative_pooled_prompt_embeds=neg["text_embeds"])
        return sample_images(run.pipe, cfg, run.accelerator, **kw)

    return sample


def train(cfg, accelerator=None, pipe=None):
    """Run an ED-LoRA training from a resolved :class:`EDLoRAConfig`; returns the loop's ``TrainResult``.

    ``pipe``: an already loaded base pipeline to train in place (tests inspect it afterwards); default: load
    ``cfg.base_model``.
    """
    dataset, weight_dtype = check_recipe(cfg, pipe)
    run = setup_models(cfg, accelerator, pipe, weight_dtype)
    setup_adapters(run)
    optimizer, groups = setup_optimizer(run)
    order = list(run.trained)
    words = " ".join(run.words)
    final = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
    hint = (f"  use it:          from lorakit.adapters.edlora import load_edlora; load_edlora(pipe, '{final}'); "
            f"pipe('a photo of {words}')")
    loop = TrainLoop(cfg, run.accelerator, [run.trained[c] for c in order], optimizer, dataset, loss_fn(run, order),
                     save_fn(run), sample=sample_fn(run), collate_fn=collate, summary_hint=hint)
    n_layers = len(run.layers)
    note(
        f"lorakit: ED-LoRA {words} (init {cfg.concept.init_word!r}) on {run.arch} ({cfg.base_model}): "
        f"{n_layers} cross-attention layers -> {2 * n_layers} new tokens per text encoder, "
        f"{trainable_count(groups):,} trainable parameters, "
        f"{len(dataset.records)} images x {cfg.data.repeats} repeats, global batch "
        f"{cfg.train_batch_size * run.accelerator.num_processes}"
    )
    return loop.run()


def main(argv: list[str] | None = None) -> int:
    """``train_edlora.py --config X.yaml [key=value ...]`` (see :mod:`lorakit.training.entry`)."""
    return entry_main("edlora", argv)


if __name__ == "__main__":
    sys.exit(main())
