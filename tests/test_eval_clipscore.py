"""CLIPScore mechanics on a tiny random CLIP (built from a config, offline tokenizer, in-code image processor)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.cli import main
from lorakit.eval.clipscore import clip_scores, load_clip


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from lorakit.models import tiny_tokenizer

    tok = tiny_tokenizer()
    v = len(tok)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    out = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(n)]


def _direct(model, tok, proc, image, prompt):
    """CLIPScore of one pair, computed from the model's own forward outputs."""
    ids = tok([prompt], padding=True, return_tensors="pt")
    px = proc(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=px)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    return 100 * max(cos, 0.0)


def test_batched_scores_equal_direct_computation(tiny_clip_dir):
    model, tok, proc = load_clip(tiny_clip_dir)
    assert not model.training
    images = _images(5)
    prompts = ["a red cat", "a blue dog wearing a hat", "star", "a girl holding an umbrella on the beach", "ring"]
    scores = clip_scores(model, tok, proc, images, prompts, batch_size=2)
    direct = torch.tensor([_direct(model, tok, proc, im, p) for im, p in zip(images, prompts)])
    assert scores.shape == (5,)
    torch.testing.assert_close(scores, direct, atol=1e-4, rtol=1e-5)
    assert (scores >= 0).all()
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        clip_scores(model, tok, proc, images[:2], prompts[:1])


def test_negative_cosine_scores_zero(tiny_clip_dir):
    import copy

    model, tok, proc = load_clip(tiny_clip_dir)
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        flipped.text_projection.weight.neg_()  # text embeddings -> their negatives: cos -> -cos
    images, prompts = _images(6, seed=1), ["a red cat", "black square", "sky sea beach"] * 2
    pos = clip_scores(model, tok, proc, images, prompts, batch_size=4)
    neg = clip_scores(flipped, tok, proc, images, prompts, batch_size=4)
    cos = torch.tensor([_direct(model, tok, proc, im, p) - _direct(flipped, tok, proc, im, p) for im, p in zip(images, prompts)])
    assert (cos.abs() > 1e-3).all()
    torch.testing.assert_close(torch.minimum(pos, neg), torch.zeros(6))  # one of the two is clamped to 0
    torch.testing.assert_close(pos + neg, cos.abs(), atol=1e-4, rtol=1e-5)


def test_cli_reads_sidecars(tiny_clip_dir, tmp_path):
    images = _images(3, seed=2)
    prompts = ["a red cat", "a blue dog", "a green tree"]
    for i, (im, p) in enumerate(zip(images, prompts)):
        im.save(tmp_path / f"{i:03d}.png")
    (tmp_path / "000.json").write_text(json.dumps({"prompt": prompts[0], "seed": 1}))
    (tmp_path / "001.txt").write_text(prompts[1] + "\n")
    (tmp_path / "002.png.json").write_text(json.dumps({"prompt": prompts[2]}))
    assert main(["eval", "--metric", "clipscore", "--images", str(tmp_path), "--clip-model", str(tiny_clip_dir),
                 "--batch-size", "2"]) == 0
    res = json.loads((tmp_path / "eval_clipscore.json").read_text())
    model, tok, proc = load_clip(tiny_clip_dir)
    direct = [_direct(model, tok, proc, Image.open(tmp_path / f"{i:03d}.png").convert("RGB"), p) for i, p in enumerate(prompts)]
    assert [r["prompt"] for r in res["per_image"]] == prompts
    assert [r["clipscore"] for r in res["per_image"]] == pytest.approx(direct, abs=1e-4)
    assert res["mean"] == pytest.approx(sum(direct) / 3, abs=1e-4)
    assert "CLIPScore" in (tmp_path / "eval_clipscore.md").read_text()
    (tmp_path / "003.png").write_bytes((tmp_path / "000.png").read_bytes())  # no sidecar
    assert main(["eval", "--metric", "clipscore", "--images", str(tmp_path), "--clip-model", str(tiny_clip_dir)]) == 2
    assert main(["eval", "--metric", "clipscore", "--images", str(tmp_path), "--clip-model", str(tmp_path / "nope")]) == 2
