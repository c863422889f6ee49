"""CLIPScore (Hessel et al. 2021, as used by ComposLoRA/CMLoRA): ``100 * max(cos(E_image, E_text), 0)``.

The CLIP model is a transformers ``CLIPModel`` from a local folder or a hub id (the papers use
``openai/clip-vit-base-patch16``); its tokenizer and image processor are loaded from the same place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.logs import tqdm


def load_clip(source: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load (model, tokenizer, image processor) of a CLIP checkpoint.

    Args:
        source: a folder with ``config.json`` + weights + tokenizer + preprocessor files, or a hub id.
    Raises:
        FileNotFoundError for a missing local path; ValueError naming the source when it is no CLIP model.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    src = str(source)
    if not Path(src).exists() and (src.startswith((".", "/", "~")) or src.count("/") != 1):
        raise FileNotFoundError(f"CLIP model not found: {src} (not a folder, and not a hub id like openai/clip-vit-base-patch16)")
    try:
        model = CLIPModel.from_pretrained(src).to(device).eval()
    except (OSError, ValueError) as err:
        raise ValueError(f"{src}: could not load a transformers CLIPModel: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        processor = AutoImageProcessor.from_pretrained(src)
    except (OSError, ValueError) as err:
        raise ValueError(f"{src}: CLIP tokenizer / image processor files missing or unreadable: {err}") from err
    return model, tokenizer, processor


def _features(out) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_embeddings(model, tokenizer, processor, images: list, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLIP embeddings of images and prompts.

    Args:
        images: PIL images (any size; the processor resizes and crops).
        prompts: texts; longer than the tokenizer's max length (77) are truncated.
    Returns:
        (image embeddings ``[n_images, d]``, text embeddings ``[n_prompts, d]``), float32.
    """
    device = next(model.parameters()).device
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    text = tokenizer(prompts, padding=True, truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
    img = _features(model.get_image_features(pixel_values=pixels.to(device, model.dtype))).float()
    txt = _features(
        model.get_text_features(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device))
    ).float()
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


def clip_scores(model, tokenizer, processor, images: list, prompts: list[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """CLIPScore of each (image, prompt) pair: ``100 * max(cos, 0)``.

    Args:
        images: ``n`` PIL images; prompts: ``n`` texts (pair i is images[i] with prompts[i]).
    Returns:
        ``[n]`` float32 tensor on the CPU.
    Raises:
        ValueError when the counts differ.
    """
    if len(images) != len(prompts):
        raise ValueError(f"clip_scores: {len(images)} images but {len(prompts)} prompts")

    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc="clipscore", disable=not progress):
        img, txt = clip_embeddings(
            model, tokenizer, processor, images[start : start + batch_size], prompts[start : start + batch_size]
        )
        scores.append(100.0 * (img * txt).sum(-1).clamp(min=0).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)
