"""``lorakit convert IN OUT``: rewrite an adapter file in another layout (kohya names, SAI names, diffusers)."""

from __future__ import annotations

DTYPES = ("float32", "float16", "bfloat16")


HELP = "rewrite an adapter file for another tool (kohya/A1111/ComfyUI names, SDXL SAI names, diffusers/peft)"
DESCRIPTION = (
    "Read any adapter file lorakit reads (kohya with diffusers or SAI names, LyCORIS LoHa/LoKr, "
    "peft/diffusers with alpha metadata) and write it as: kohya (lora_unet_/lora_te*_ names that kohya, "
    "A1111, ComfyUI and diffusers read; SDXL UNet layers in SAI names unless --key-style diffusers) or "
    "diffusers (unet./text_encoder. lora_A/lora_B keys with diffusers' lora_adapter_metadata). The delta of "
    "every layer is kept exactly (see docs/formats.md)."
)


def add_arguments(p) -> None:
    p.add_argument("input", help="adapter .safetensors file")
    p.add_argument("output", help="output .safetensors file (must not be the input)")
    p.add_argument("--to", choices=["kohya", "diffusers"], default="kohya",
                   help="output layout (default: kohya, which every tool reads; diffusers: for diffusers / peft only)")
    p.add_argument("--key-style", choices=["auto", "diffusers", "sai"], default="auto",
                   help="kohya UNet names: sai (lora_unet_input_blocks_..., SDXL only), diffusers "
                        "(lora_unet_down_blocks_...), auto = sai for SDXL, diffusers for SD1/SD2")
    p.add_argument("--as-lora", action="store_true",
                   help="write LoHa / LoKr layers as their exact LoRA factorisation (readable by diffusers too)")
    p.add_argument("--dtype", choices=DTYPES, help="store the weights in this dtype (default: as read)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT that lorakit wrote (never a "
                                                            "file it did not write)")


def check_output(dst, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite`` and its header says lorakit wrote it."""
    from safetensors import safe_open

    if not dst.exists():
        return
    if not overwrite:
        raise ValueError(f"{dst} exists; pass --overwrite to replace it (only files lorakit wrote are replaced)")
    try:
        with safe_open(str(dst), "pt") as f:
            ours = "lorakit.format" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a readable safetensors file: certainly not ours
        ours = False
    if not ours:
        raise ValueError(f"{dst} exists and lorakit did not write it; choose another output path")


def run(args) -> int:
    from pathlib import Path

    import torch

    from lorakit.adapters.export import save_diffusers_adapter
    from lorakit.adapters.io import load_adapter, save_adapter

    src, dst = Path(args.input), Path(args.output)
    if dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: the output must end in .safetensors")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the output would overwrite the input; choose another path")
    check_output(dst, args.overwrite)
    adapter = load_adapter(src)
    if args.as_lora:
        adapter = adapter.as_lora()
    adapter.metadata.setdefault("lorakit.base_arch", adapter.arch or "sd1")
    adapter.metadata["lorakit.converted_from"] = src.name
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.to == "diffusers":
        if args.key_style != "auto":
            raise ValueError("--key-style applies to --to kohya")
        save_diffusers_adapter(adapter, dst, dtype)
    else:
        save_adapter(adapter, dst, dtype=dtype, key_style=args.key_style)
    kinds = sorted({m.kind for m in adapter.modules.values()})
    print(f"lorakit convert: {src} -> {dst} ({args.to}, {len(adapter.modules)} layers, {'/'.join(kinds)}, "
          f"{adapter.metadata['lorakit.base_arch']})")
    if args.to == "diffusers":
        print("lorakit convert: note: this layout is for diffusers / peft; ComfyUI skips its attention layers "
              "(as it does in diffusers' own files) and A1111, kohya sd-scripts and LyCORIS read none of it: give "
              "those tools the kohya layout (--to kohya, the default). docs/formats.md has the measured table.")
    return 0
