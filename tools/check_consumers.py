"""Which consumer reads which lorakit output: builds each output on the tiny SD1 / SDXL pipelines and reports,
per consumer, how many of the file's layers it places on the module lorakit means. One JSON line per
(arch, output, consumer). docs/formats.md is written from this output.

    python tools/check_consumers.py [--arch sd1 sdxl]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from lorakit.adapters.consumers import (
    a1111_placement,
    comfyui_placement,
    diffusers_placement,
    kohya_placement,
    layer_names,
)
from lorakit.adapters.export import save_diffusers_adapter
from lorakit.adapters.io import Adapter, load_adapter, save_adapter
from lorakit.adapters.keys import is_sai_name, module_path_from_kohya, sai_names_to_module_keys
from lorakit.adapters.loha import LohaModule
from lorakit.adapters.lokr import LokrModule
from lorakit.models import tiny_pipeline
from lorakit.testing import random_adapter


def _lycoris(adapter: Adapter, kind: str, seed: int = 0) -> Adapter:
    """The same layers as LoHa (rank 2) or LoKr (w1 whole, w2 factored rank 2) modules with random weights."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for key, mod in adapter.modules.items():
        shape = mod.delta().shape
        out, flat = shape[0], int(torch.Size(shape[1:]).numel())
        kernel = tuple(shape[2:]) if len(shape) == 4 else None
        if kind == "loha":
            mods[key] = LohaModule(torch.randn(out, 2, generator=g), torch.randn(2, flat, generator=g),
                                   torch.randn(out, 2, generator=g), torch.randn(2, flat, generator=g), 1.0,
                                   kernel=kernel)
        else:
            a = 2 if out % 2 == 0 and shape[1] % 2 == 0 else 1
            mods[key] = LokrModule(w1=torch.randn(a, a, generator=g), w2_a=torch.randn(out // a, 2, generator=g),
                                   w2_b=torch.randn(2, flat // a, generator=g), alpha=1.0, kernel=kernel)
    return Adapter(mods, dict(adapter.metadata), {})


def outputs(pipe, arch: str, folder: Path) -> dict[str, Path]:
    """The files lorakit writes for this architecture, by name."""
    base = random_adapter(pipe, network="locon", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, text_encoder=True)
    base.metadata["lorakit.base_arch"] = arch
    files = {}
    styles = ["diffusers", "sai"] if arch == "sdxl" else ["diffusers"]
    for style in styles:
        files[f"locon kohya ({style} names)"] = save_adapter(base, folder / f"locon-{style}.safetensors", key_style=style)
    style = "sai" if arch == "sdxl" else "diffusers"
    for kind in ("loha", "lokr"):
        files[f"{kind} kohya ({style} names)"] = save_adapter(_lycoris(base, kind), folder / f"{kind}.safetensors")
    files["locon diffusers/peft (convert --to diffusers)"] = save_diffusers_adapter(base, folder / "peft.safetensors")
    files[f"edlora kohya ({style} names) + embeddings"] = save_adapter(_edlora(pipe, base, arch), folder / "ed.safetensors")
    return files


def _edlora(pipe, base: Adapter, arch: str) -> Adapter:
    """An ED-LoRA file: the attention LoRA layers of ``base`` plus per-layer embeddings of two pseudo-words."""
    from lorakit.adapters.edlora import EDLoRAConcept, cross_attention_layers, edlora_adapter

    layers = cross_attention_layers(pipe.unet)
    g = torch.Generator().manual_seed(1)
    comps = ["text_encoder", "text_encoder_2"] if arch == "sdxl" else ["text_encoder"]
    emb = {c: {w: torch.randn(len(layers), getattr(pipe, c).config.hidden_size, generator=g) for w in ("<c1>", "<c2>")}
           for c in comps}
    mods = {k: m for k, m in base.modules.items() if ".attn" in k or "self_attn" in k}
    return edlora_adapter(mods, emb, [EDLoRAConcept("c", ["<c1>", "<c2>"], "cat")], layers, arch)


def _expected(keys: list[str]) -> dict[str, str]:
    """file layer name -> lorakit module key (lorakit's own reading)."""
    names = layer_names(keys)
    if names:
        sai = [n for n in names if is_sai_name(n)]
        table = sai_names_to_module_keys(sai) if sai else {}
        return {n: table.get(n) or module_path_from_kohya(n) for n in names}
    return {k.rsplit(".", 2)[0]: k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_A.weight")}


def _score(placed: dict, expected: dict) -> dict:
    right = [n for n, k in expected.items() if placed.get(n) is not None and placed.get(n) == k]
    wrong = [n for n, k in expected.items() if placed.get(n) is not None and placed.get(n) != k]
    missed = [n for n in expected if placed.get(n) is None]
    return {"layers": len(expected), "placed": len(right), "misplaced": len(wrong), "unplaced": len(missed),
            "first_problem": (wrong + missed)[:1]}


def check(arch: str, folder: Path) -> list[dict]:
    pipe = tiny_pipeline(arch)
    rows = []
    for output, path in outputs(pipe, arch, folder).items():
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        expected = _expected(keys)
        assert set(expected.values()) == set(load_adapter(path).modules), output  # lorakit reads its own file
        names = list(expected)
        # kohya's own networks/lora.py reads LoRA / LoCon; LoHa / LoKr load through LyCORIS's kohya network
        # module, which names layers the same way
        kohya = "kohya sd-scripts" if output.startswith(("locon", "edlora")) else "LyCORIS in sd-scripts"
        by_consumer = {
            "A1111 (re-implemented)": a1111_placement(names, pipe, arch),
            "ComfyUI (re-implemented)": comfyui_placement(keys, pipe, arch),
            f"{kohya} (re-implemented)": kohya_placement(names, pipe, arch, rename_diffusers=kohya == "kohya sd-scripts"),
        }
        ran = diffusers_placement(path, pipe)
        if isinstance(ran, str):
            rows.append({"arch": arch, "output": output, "consumer": "diffusers (run)", "refused": ran,
                         "layers": len(expected), "placed": 0})
        else:
            key_of = {n: k for n, k in expected.items()}
            by_consumer["diffusers (run)"] = {n: (k if k in ran else None) for n, k in key_of.items()}
        for consumer, placed in by_consumer.items():
            rows.append({"arch": arch, "output": output, "consumer": consumer, **_score(placed, expected)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd1", "sdxl"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            (Path(tmp) / arch).mkdir()
            for row in check(arch, Path(tmp) / arch):
                print(json.dumps(row))


if __name__ == "__main__":
    main()
