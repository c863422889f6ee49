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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.training.loop import TrainConfig

SALT_LATENT, SALT_NOISE, SALT_OFFSET, SALT_TIMESTEP, SALT_FLIP = 20, 21, 22, 23, 24
_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UNET_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


@dataclass
class ConceptConfig:
    """``concept.*``: the pseudo-words, the class word for the second one, the caption placeholder."""

    name: str = ""  # default: the first pseudo-word without <>
    tokens: str = "<concept1> <concept2>"  # two new pseudo-words
    init_word: str = ""  # class word (one token) that initialises the second pseudo-word, e.g. cat, man
    placeholder: str = "<TOK>"  # replaced by the pseudo-words in every caption
    init_std: float = 0.013  # std of the first pseudo-word's random init


@dataclass
class EDLoRANetwork:
    """``network.*``: LoRA rank/alpha (text encoder and UNet attention)."""

    rank: int = 4
    alpha: float = 4.0  # scale alpha / rank = 1, as the reference's LoRA
    text_encoder_rank: int = 4
    text_encoder_alpha: float = 4.0
    train_text_encoder: bool = True


@dataclass
class EDLoRAConfig(TrainConfig):
    """Config of ``train_edlora.py``: the shared keys (:class:`TrainConfig`) plus these."""

    concept: ConceptConfig = field(default_factory=ConceptConfig)
    network: EDLoRANetwork = field(default_factory=EDLoRANetwork)
    output_name: str = "edlora"
    learning_rate: float = 1e-4  # UNet LoRA
    text_encoder_lr: float | None = 1e-5  # text-encoder LoRA
    embedding_lr: float = 1e-3  # the new token rows
    lr_scheduler: str = "linear"
    noise_offset: float = 0.01
    prediction_type: str | None = None  # epsilon | v_prediction; default: the base scheduler's
    mask_path: str | None = None  # folder of masks, same stems as the images
    masked_loss: bool = False
    attn_reg_weight: float = 0.0  # 0.01 in the paper (needs masks)
    save_precision: str = "fp32"
    sample_resolution: int | None = None


# --------------------------------------------------------------------------------------------------- data


def concept_words(cfg) -> list[str]:
    """The two pseudo-words of ``concept.tokens``; ValueError naming the key otherwise."""
    words = str(cfg.concept.tokens).split()
    if len(words) != 2 or words[0] == words[1]:
        raise ValueError(f"concept.tokens={cfg.concept.tokens!r}: expected two different pseudo-words, e.g. '<cat1> <cat2>'")
    return words


class ConceptImages:
    """Images + captions (placeholder replaced) + optional masks of one concept.

    Item: ``pixel_values`` [3, R, R] in [-1, 1], ``caption`` str, ``mask`` [1, R, R] in [0, 1] (ones without
    masks), ``original_size`` / ``crop_top_left`` / ``target_size`` (SDXL). Centre crop to ``data.resolution``;
    with ``data.random_flip`` the image and its mask flip together, keyed by the sample id.
    """

    def __init__(self, cfg):
        from lorakit.data import scan_folder

        d = cfg.data
        unsupported = [k for k, bad in (("data.buckets", d.buckets), ("data.reg_path", d.reg_path),
                                        ("data.cache_latents", d.cache_latents)) if bad]
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)}: not supported by the ED-LoRA trainer (set to false/null)")
        self.cfg, self.seed = cfg, cfg.seed
        words = " ".join(concept_words(cfg))
        default = d.default_caption or cfg.concept.placeholder
        records = scan_folder(d.path, d.caption_extension, default, d.on_bad_image)
        self.records = []
        for rec in records:
            text = rec.caption
            if cfg.concept.placeholder in text:
                text = text.replace(cfg.concept.placeholder, words)
            elif words not in text:
                raise ValueError(
                    f"caption of {rec.path} has neither the placeholder {cfg.concept.placeholder!r} nor {words!r}: "
                    f"{rec.caption!r}"
                )
            rec.caption = text
            self.records.append(rec)
        self.masks: list[Path | None] = [None] * len(self.records)
        if cfg.mask_path:
            self.masks = [self._find_mask(Path(cfg.mask_path), r.path) for r in self.records]
        elif cfg.masked_loss or cfg.attn_reg_weight:
            raise ValueError("masked_loss / attn_reg_weight need masks: set mask_path to a folder of masks")
        self.items = [i for i in range(len(self.records)) for _ in range(max(1, d.repeats))]

    @staticmethod
    def _find_mask(folder: Path, image: Path) -> Path:
        from lorakit.data import IMAGE_EXTENSIONS

        if not folder.is_dir():
            raise FileNotFoundError(f"mask_path folder not found: {folder}")
        for ext in IMAGE_EXTENSIONS:
            for cand in (folder / (image.stem + ext), folder / (image.stem + "_mask" + ext)):
                if cand.exists():
                    return cand
        raise FileNotFoundError(f"no mask for {image} in {folder} (expected {image.stem}.png or {image.stem}_mask.png)")

    def __len__(self) -> int:
        return len(self.items)

    def get_item(self, i: int, sample_id: int) -> dict:
        import numpy as np
        from PIL import Image, ImageOps

        from lorakit.data import BadImageError, resize_crop
        from lorakit.training.loop import rand_per_sample

        k = self.items[i]
        rec, res = self.records[k], self.cfg.data.resolution
        try:
            with Image.open(rec.path) as raw:
                img = raw.convert("RGB")
        except Exception as err:  # noqa: BLE001
            raise BadImageError(f"unreadable image {rec.path}: {err}") from err
        size = img.size
        img, crop = resize_crop(img, (res, res), True, None)
        mask = None
        if self.masks[k] is not None:
            with Image.open(self.masks[k]) as raw:
                m = raw.convert("L")
            if m.size != size:
                raise ValueError(f"mask {self.masks[k]} is {m.size[0]}x{m.size[1]}, its image {rec.path} is {size[0]}x{size[1]}")
            mask, _ = resize_crop(m, (res, res), True, None)
        if self.cfg.data.random_flip and float(rand_per_sample([sample_id], self.seed, SALT_FLIP)[0]) < 0.5:
            img = ImageOps.mirror(img)
            mask = ImageOps.mirror(mask) if mask is not None else None
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        mask_t = (torch.from_numpy(np.asarray(mask, dtype=np.float32))[None] / 255.0) if mask is not None else torch.ones(1, res, res)
        return {
            "pixel_values": pixels,
            "mask": mask_t,
            "caption": rec.caption,
            "original_size": torch.tensor([size[1], size[0]]),
            "crop_top_left": torch.tensor(crop),
            "target_size": torch.tensor([res, res]),
        }

    def __getitem__(self, i: int) -> dict:
        return self.get_item(i, i)


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
    first = (torch.randn(1, d, generator=gen) * cfg.concept.init_std).to(emb.dtype).repeat(n_layers, 1)
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
    from peft import inject_adapter_in_model

    from lorakit.adapters import edlora as ed
    from lorakit.blocks import lora_config, text_encoder_modules

    words = concept_words(cfg)
    layers = ed.cross_attention_layers(pipe.unet)
    L = len(layers)
    gen = torch.Generator().manual_seed(cfg.seed)
    sides, trained = [], {}
    net = cfg.network
    for comp, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
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
    for module in trained.values():
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return trained, sides, layers


def text_sides(pipe, words: list[str], n_layers: int) -> list[TextSide]:
    """The :class:`TextSide` of every text encoder of a pipeline whose tokenizers already hold ``words``' tokens."""
    from lorakit.adapters.edlora import layer_token_names

    sides = []
    for comp, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if getattr(pipe, comp, None) is None:
            continue
        tok = getattr(pipe, tok_name)
        tmap = {}
        for w in words:
            ids = tok.convert_tokens_to_ids(layer_token_names(w, n_layers))
            tmap[ids[0]] = ids
        first = min(i for v in tmap.values() for i in v)
        sides.append(TextSide(comp, tok, tmap, first, tok.eos_token_id))
    return sides


def encode_captions(captions: list[str], sides: list[TextSide], encoders: dict, n_layers: int, device) -> dict:
    """Packed per-layer text conditioning: ``encoder_hidden_states [B, S, L * C]`` (+ SDXL ``text_embeds [B, P]``)."""
    from lorakit.adapters import edlora as ed

    sdxl = len(sides) > 1
    per_layer, pooled = [], None
    for s in sides:
        ids = s.tokenizer(captions, padding="max_length", max_length=s.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(device)
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
    """Denoising loss of a micro-batch, masked (``mask [B, 1, H, W]``) when ``cfg.masked_loss``.

    Noise (+ ``noise_offset`` x per-channel offset) and timesteps are drawn per sample id (see the loop).
    """
    from lorakit.training.loop import randint_per_sample, randn_per_sample

    dev, seed = latents.device, cfg.seed
    noise = randn_per_sample(latents.shape[1:], sample_ids, seed, SALT_NOISE, dev, latents.dtype)
    if cfg.noise_offset:
        offset = randn_per_sample((latents.shape[1], 1, 1), sample_ids, seed, SALT_OFFSET, dev, latents.dtype)
        noise = noise + cfg.noise_offset * offset
    t = randint_per_sample(0, noise_scheduler.config.num_train_timesteps, sample_ids, seed, SALT_TIMESTEP, dev)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    kwargs = {}
    if "text_embeds" in cond:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
    pred = unet(noisy, t, cond["encoder_hidden_states"], **kwargs).sample
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")
    err = (pred.float() - target.float()) ** 2
    if cfg.masked_loss and mask is not None:
        err = err * torch.nn.functional.interpolate(mask.float(), size=err.shape[-2:], mode="area")
    return err.mean()


# --------------------------------------------------------------------------------------------------- train


def train(cfg, accelerator=None, pipe=None):
    """Run an ED-LoRA training from a resolved :class:`EDLoRAConfig`; returns the loop's ``TrainResult``.

    ``pipe``: an already loaded base pipeline to train in place (tests inspect it afterwards); default: load
    ``cfg.base_model``.
    """
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    from lorakit.adapters import edlora as ed
    from lorakit.adapters.io import from_peft, save_adapter
    from lorakit.config import to_dict
    from lorakit.data import collate
    from lorakit.models import load_base, pipeline_arch
    from lorakit.training.loop import TrainLoop, build_optimizer, make_accelerator, randn_per_sample

    for key in ("mixed_precision", "save_precision"):
        if getattr(cfg, key) not in _DTYPES:
            raise ValueError(f"{key}={getattr(cfg, key)!r}: expected one of {sorted(_DTYPES)}")
    weight_dtype, save_dtype = _DTYPES[cfg.mixed_precision], _DTYPES[cfg.save_precision]
    if not cfg.base_model:
        raise ValueError("base_model is not set (a diffusers folder, a .safetensors checkpoint, a hub id or tiny:sd1)")
    words = concept_words(cfg)
    dataset = ConceptImages(cfg)  # bad data fails before the model loads

    pipe = pipe if pipe is not None else load_base(cfg.base_model)
    arch = pipeline_arch(pipe)
    sdxl = arch == "sdxl"
    if accelerator is None:
        accelerator = make_accelerator(cfg, find_unused_parameters=sdxl)
    set_seed(cfg.seed)  # peft's lora_A init: same on every process
    device = accelerator.device
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if cfg.prediction_type:
        noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
        pipe.scheduler.register_to_config(prediction_type=cfg.prediction_type)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is not None:
            model.requires_grad_(False)
            model.to(device, dtype=torch.float32 if comp == "vae" and sdxl else weight_dtype)
    trained, sides, layers = setup_edlora(pipe, cfg, device)
    L = len(layers)
    for m in trained.values():
        m.to(device)

    store: dict = {}
    if cfg.attn_reg_weight:
        for name in layers:
            proc = pipe.unet.get_submodule(name).processor
            proc.inner = AttentionProbe(proc.inner, store)

    rows = [trained[s.component].get_input_embeddings().rows for s in sides]
    te_lora = [p for s in sides for n, p in trained[s.component].named_parameters() if "lora_" in n and p.requires_grad]
    unet_lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    groups = [{"params": rows, "lr": cfg.embedding_lr}, {"params": te_lora, "lr": te_lr},
              {"params": unet_lora, "lr": cfg.learning_rate}]
    optimizer = build_optimizer(cfg, groups)
    order = list(trained)
    scaling = pipe.vae.config.scaling_factor
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    word_ids = [[w_ids[0] for w_ids in s.token_map.values()] for s in sides][0]

    def compute_loss(batch, step, models):
        live = dict(zip(order, models))
        ids = batch["sample_id"]
        with torch.no_grad():
            dist = pipe.vae.encode(batch["pixel_values"].to(device, pipe.vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        eps = randn_per_sample(mean.shape[1:], ids, cfg.seed, SALT_LATENT, device)
        latents = ((mean + std * eps - shift) * scaling).to(weight_dtype)
        cond = encode_captions(batch["caption"], sides, live, L, device)
        time_ids = None
        if sdxl:
            time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], 1).to(device, weight_dtype)
        if cfg.attn_reg_weight:
            tok_ids = sides[0].tokenizer(batch["caption"], padding="max_length", truncation=True,
                                         max_length=sides[0].tokenizer.model_max_length, return_tensors="pt").input_ids
            store["positions"] = [(tok_ids == w).to(device) for w in word_ids]
            store["maps"] = []
        with accelerator.autocast():
            loss = edlora_loss(live["unet"], noise_scheduler, latents, cond, ids, cfg, time_ids, batch["mask"])
            if cfg.attn_reg_weight:
                present = torch.stack([p.any(-1) for p in store["positions"]], -1).float()
                loss = loss + cfg.attn_reg_weight * attention_regulariser(store["maps"], batch["mask"], present)
                store["positions"] = None
        return loss

    def adapter():
        modules = {}
        for comp, model in trained.items():
            modules.update(from_peft(model, comp))
        for m in modules.values():
            m.down, m.up = m.down.to(save_dtype), m.up.to(save_dtype)
        name = cfg.concept.name or words[0].strip("<>")
        concept = ed.EDLoRAConcept(name=name, words=words, init_word=cfg.concept.init_word)
        return ed.edlora_adapter(modules, embeddings_of(trained, sides, words, L), [concept], layers, arch,
                                 config=to_dict(cfg), rank=cfg.network.rank, alpha=cfg.network.alpha)

    def save(path):
        save_adapter(adapter(), path)

    size = cfg.sample_resolution or cfg.data.resolution

    def sample(step):
        if not cfg.sample_prompts:
            return None
        prompts = [p.replace(cfg.concept.placeholder, " ".join(words)) for p in cfg.sample_prompts]
        encoders = {s.component: trained[s.component] for s in sides}
        cond = encode_captions(prompts, sides, encoders, L, device)
        neg = encode_captions([""] * len(prompts), sides, encoders, L, device)
        kw = dict(prompt_embeds=cond["encoder_hidden_states"], negative_prompt_embeds=neg["encoder_hidden_states"])
        if sdxl:
            kw.update(pooled_prompt_embeds=cond["text_embeds"], negative_pooled_prompt_embeds=neg["text_embeds"])
        gen = torch.Generator(device="cpu").manual_seed(cfg.sample_seed)
        with accelerator.autocast():
            return pipe(num_inference_steps=cfg.sample_num_inference_steps, guidance_scale=cfg.sample_guidance_scale,
                        generator=gen, height=size, width=size, **kw).images

    final = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
    hint = (f"  use it:          from lorakit.adapters.edlora import load_edlora; load_edlora(pipe, '{final}'); "
            f"pipe('a photo of {' '.join(words)}')")
    loop = TrainLoop(cfg, accelerator, [trained[c] for c in order], optimizer, dataset, compute_loss, save,
                     sample=sample if cfg.sample_every else None, collate_fn=collate, summary_hint=hint)
    accelerator.print(
        f"lorakit: ED-LoRA {' '.join(words)} (init {cfg.concept.init_word!r}) on {arch} ({cfg.base_model}): "
        f"{L} cross-attention layers -> {2 * L} new tokens per text encoder, "
        f"{sum(p.numel() for g in groups for p in g['params']):,} trainable parameters, "
        f"{len(dataset.records)} images x {cfg.data.repeats} repeats, global batch "
        f"{cfg.train_batch_size * accelerator.num_processes}"
    )
    return loop.run()


def main(argv: list[str] | None = None) -> int:
    """``train_edlora.py --config X.yaml [key=value ...]``."""
    import argparse

    from lorakit.config import load_config, schema_keys
    from lorakit.threads import configure_threads

    configure_threads()  # one torch thread unless OMP_NUM_THREADS is set (lorakit/threads.py)

    parser = argparse.ArgumentParser(
        description="Train an ED-LoRA (Mix-of-Show) concept: layer-wise embeddings + LoRA (accelerate launch-able).",
        epilog="keys: " + ", ".join(schema_keys(EDLoRAConfig)),
    )
    parser.add_argument("--config", help="a YAML recipe (train_configs/*edlora*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 concept.init_word=cat")
    args = parser.parse_args(argv)
    cfg = load_config(EDLoRAConfig, args.config, args.overrides)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
