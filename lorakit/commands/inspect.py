"""``lorakit inspect FILE [--base PATH]``: what an adapter file holds and whether it fits a base."""

from __future__ import annotations

import json


HELP = "show what an adapter file holds (kind, arch, per-block ranks, trigger, config) and if it fits a base"
DESCRIPTION = (
    "Read a LoRA/LoCon/LoHa/LoKr/ED-LoRA .safetensors file (lorakit, kohya with diffusers or SAI "
    "names, LyCORIS, diffusers/peft layouts; docs/formats.md) and "
    "print its kind, architecture, per-block ranks, layer counts, parameter count, trigger words and "
    "training config summary. With --base, check that it fits that base model."
)


def add_arguments(p) -> None:
    p.add_argument("file", help="adapter .safetensors file")
    p.add_argument("--base", help="base model (diffusers folder, .safetensors checkpoint or hub id) to check against")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def summarize(adapter) -> dict:
    """A JSON-able summary of an :class:`~lorakit.adapters.io.Adapter`."""
    from lorakit.blocks import block_of_key

    blocks: dict[str, dict] = {}
    for key, mod in adapter.modules.items():
        b = blocks.setdefault(block_of_key(key), {"modules": 0, "ranks": set(), "params": 0})
        b["modules"] += 1
        b["ranks"].add(mod.rank)
        b["params"] += mod.num_parameters()
    meta = adapter.metadata
    config = json.loads(meta["lorakit.config"]) if "lorakit.config" in meta else None
    return {
        "kind": adapter.kind,
        "layer_types": sorted({m.kind for m in adapter.modules.values()}),
        "format": adapter.source_format,
        "arch": adapter.arch or "unknown",
        "modules": len(adapter.modules),
        "linear": sum(not m.is_conv for m in adapter.modules.values()),
        "conv": sum(m.is_conv for m in adapter.modules.values()),
        "parameters": adapter.num_parameters(),
        "blocks": {k: {**v, "ranks": sorted(v["ranks"])} for k, v in sorted(blocks.items(), key=lambda kv: _order(kv[0]))},
        "trigger": meta.get("lorakit.trigger"),
        "extra_tensors": sorted(adapter.extra),
        "config": {k: config[k] for k in ("base_model", "max_steps", "network", "seed") if k in config} if config else None,
    }


def _order(block: str):
    if block == "TE":
        return (0, 0)
    if block.startswith("IN"):
        return (1, int(block[2:]))
    if block == "MID":
        return (2, 0)
    if block.startswith("OUT"):
        return (3, int(block[3:]))
    return (4, 0)


def run(args) -> int:
    from lorakit.adapters.io import load_adapter, validate_adapter

    adapter = load_adapter(args.file)
    report = summarize(adapter)
    if args.base:
        from lorakit.models import load_base

        try:
            validate_adapter(adapter, load_base(args.base), source=args.file)
            report["fits_base"] = True
        except ValueError as err:
            report["fits_base"] = False
            report["fit_error"] = str(err)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report.get("fits_base", True) else 1
    print(f"file:       {args.file}")
    print(f"kind:       {report['kind']}    arch: {report['arch']}    format: {report['format']}")
    print(f"modules:    {report['modules']} ({report['linear']} linear, {report['conv']} conv)")
    print(f"parameters: {report['parameters']:,}")
    if report["trigger"]:
        print(f"trigger:    {report['trigger']}")
    if report["extra_tensors"]:
        print(f"extra:      {', '.join(report['extra_tensors'][:8])}")
    print("\nblock   modules  rank(s)  params")
    for name, b in report["blocks"].items():
        print(f"{name:<7} {b['modules']:>7}  {','.join(map(str, b['ranks'])):>7}  {b['params']:>7,}")
    if report["config"]:
        print("\ntraining config: " + json.dumps(report["config"]))
    if "fits_base" in report:
        print("\nfits base:  " + ("yes" if report["fits_base"] else f"NO - {report['fit_error']}"))
        return 0 if report["fits_base"] else 1
    return 0
