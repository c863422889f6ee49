"""tools/compare_toy2_loras.py: two LoRAs' stored measurement images, scored and paired (no generation)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def _store_images(store, base, adapter, prompts, images):
    from lorakit.fileio import save_image

    tool = importlib.import_module("compare_toy2_loras")
    from lorakit.toyworld.evaluate import GUIDANCE, NUM_STEPS
    from lorakit.toyworld.v2.image_store import StoredPipe, pipeline_tag
    from lorakit.toyworld.v2.measure import IMAGE_SEED, SIZE

    keep = StoredPipe(None, store / pipeline_tag(base, adapter, 0.8))
    call = {"num_inference_steps": NUM_STEPS, "guidance_scale": GUIDANCE, "height": SIZE, "width": SIZE}
    for i, (p, img) in enumerate(zip(prompts, images)):
        path = keep._path(p, IMAGE_SEED + i, call)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(img, path)
    return tool


def test_compare_pairs_two_loras_on_the_same_stored_prompts(tmp_path, capsys):
    from lorakit.errors import run_guarded
    from lorakit.toyworld.v2.evaluate import identity_prompts, world_prompts
    from lorakit.toyworld.v2.measure import IDENTITY_PROMPT_SEED, WORLD_PROMPT_SEED
    from lorakit.toyworld.v2.models import DEFAULT_BASE
    from lorakit.toyworld.v2.render import Scene, render

    n, store, base = 3, tmp_path / "store", str(DEFAULT_BASE)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"lora a"), b.write_bytes(b"lora b")
    kwibbit = [render(Scene(characters=("kwibbit",), seed=s)) for s in range(n)]
    frogs = [render(Scene(characters=("frog",), char_colors=("blue",), seed=s)) for s in range(n)]
    triples = identity_prompts("kwibbit", n, seed=IDENTITY_PROMPT_SEED)
    world = [p for p, _ in world_prompts(n, seed=WORLD_PROMPT_SEED)]
    for adapter, shown in ((a, kwibbit), (b, frogs)):
        _store_images(store, base, adapter, [t for t, _, _ in triples], shown)
        _store_images(store, base, adapter, [c for _, c, _ in triples], frogs)
        tool = _store_images(store, base, adapter, world, frogs)
    args = ["kwibbit", str(a), str(b), "--n", str(n), "--image-store", str(store)]
    assert tool.main(args) == 0
    import json

    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["row"] for r in rows] == ["presence", "leak_class", "leak_world"]
    assert rows[0]["a_rate"]["k"] == n and rows[0]["b_rate"]["k"] == 0 and rows[0]["a_vs_b"]["wins"] == n
    assert all(r["a_rate"]["k"] == r["b_rate"]["k"] == 0 for r in rows[1:])
    # one image more than was measured: a clear error, nothing generated
    assert run_guarded(lambda: tool.main(args[:3] + ["--n", "4", "--image-store", str(store)]), "c") == 2
    assert "measure it first" in capsys.readouterr().err
