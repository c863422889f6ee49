"""One fusion end to end, as ``lorakit fuse`` runs it: refuse a bad output before any work, check memory, load the
adapters and resolve weights and prompts (:class:`lorakit.fusion.FuseInputs`), run the registered method, write
the adapter file / pipeline folder / single-file checkpoint and the JSON report.

The command only parses its flags into a :class:`FuseRequest` and calls :func:`fuse`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit import memory, models  # looked up at call time: tests replace memory.estimate and models.load_base
from lorakit.adapters.io import Adapter, AdapterError, adapter_metadata, load_adapter, save_adapter
from lorakit.fileio import write_json
from lorakit.fusion import FuseInputs, concept_prompts, heldout_prompts
from lorakit.fusion.gradient_memory import fusion_layers
from lorakit.fusion.merge import _maybe_truncate, apply_deltas, missing_layers
from lorakit.fusion.registry import METHODS
from lorakit.models import save_pipeline
from lorakit.outputs import check_out_file, check_replace_dir, check_writable
from lorakit.single_file import save_single_file


@dataclass
class FuseRequest:
    """What to fuse and where to write it (the ``lorakit fuse`` flags of the same names).

    settings: the method's settings dataclass (:mod:`lorakit.fusion.registry`), e.g. ``GradientOptions``.
    out_format: ``auto`` (the method's default), ``pipeline``, ``adapter`` or ``single-file``.
    """

    method: str
    adapters: list[str]
    out: str
    settings: Any
    base: str | None = None
    weights: list[float] | None = None
    out_format: str = "auto"
    overwrite: bool = False
    key_style: str = "auto"
    rank: int | None = None
    prompts: list[str] | None = None
    template: str = "photo of a {}"
    seed: int = 0
    dtype: str = "float32"
    memory_check: bool = True

    @property
    def format(self) -> str:
        return METHODS[self.method].default_format if self.out_format == "auto" else self.out_format

    def input_paths(self) -> list[str]:
        """Every file the run reads: never an output."""
        hypernet = getattr(self.settings, "hypernet", None)
        return [*self.adapters, *([self.base] if self.base else []), *([hypernet] if hypernet else [])]


@dataclass
class FuseRun:
    """What :func:`fuse` did: the output path (None on other processes), the report, the number of adapters."""

    out: Path | None
    report: dict
    adapters: int


def fuse(req: FuseRequest) -> FuseRun:
    """Fuse ``req.adapters`` with ``req.method`` and write the outputs (main process only).

    Raises:
        ValueError / lorakit.errors user errors naming the flag and value (the command turns them into exit 2).
    """
    t0 = time.perf_counter()
    method = METHODS[req.method]
    if method.needs_base and not req.base:
        raise ValueError(f"--method {req.method} needs --base")
    check_output(req)
    if req.base and method.memory_stage and req.memory_check:
        memory_check(req)
    state = process_state()
    inputs = build_inputs(req)
    result = method.load()(inputs)
    report = {
        "written_by": "lorakit",
        "method": req.method,
        "base": req.base,
        "inputs": inputs_report(inputs),
        "processes": state.num_processes,
        **result.report,
    }
    report["time_s"] = round(time.perf_counter() - t0, 3)
    out = write_outputs(req, inputs, result, report) if state.is_main_process else None
    state.wait_for_everyone()
    return FuseRun(out=out, report=report, adapters=len(inputs.adapters))


def _check_counts(req: FuseRequest) -> None:
    n = len(req.adapters)
    bad = [w for w in req.weights or [] if not math.isfinite(w)]
    if bad:
        raise ValueError(f"--weights {' '.join(map(str, req.weights))}: expected finite numbers, got {bad[0]}")
    if req.weights is not None and len(req.weights) != n:
        raise ValueError(f"--weights has {len(req.weights)} values for {n} adapters; give one per adapter")
    if req.prompts is not None and len(req.prompts) != n:
        raise ValueError(f"--prompts has {len(req.prompts)} entries for {n} adapters; give one per adapter "
                         "(several prompts for one adapter are separated by '|')")
    val_given = getattr(req.settings, "val_prompts", None)
    if val_given is not None and len(val_given) != n:
        raise ValueError(f"--val-prompts has {len(val_given)} entries for {n} adapters; give one per adapter")


def build_inputs(req: FuseRequest):
    """Load the adapters and resolve weights and prompts (``FuseInputs``); the base is loaded on demand."""
    import torch
    from accelerate import PartialState

    _check_counts(req)
    paths = list(req.adapters)
    adapters = [load_adapter(p).as_lora() for p in paths]  # LoHa / LoKr layers as exact LoRA factors
    names = [Path(p).stem for p in paths]
    resolved = [concept_prompts(ad, name, req.prompts[i] if req.prompts else None, req.template)
                for i, (ad, name) in enumerate(zip(adapters, names))]
    val_given = getattr(req.settings, "val_prompts", None)
    cache = {}

    def load_pipe():
        if not req.base:
            return None
        if "pipe" not in cache:
            pipe = models.load_base(req.base, torch_dtype=getattr(torch, req.dtype))
            cache["pipe"] = pipe.to(PartialState().device)
        return cache["pipe"]

    return FuseInputs(
        method=req.method, adapters=adapters, paths=paths, names=names,
        weights=list(req.weights) if req.weights else [1.0] * len(paths),
        prompts=[r[0] for r in resolved], sample_prompts=[r[1] for r in resolved], rank=req.rank, seed=req.seed,
        load_pipe=load_pipe, settings=req.settings, prompt_sources=[r[2] for r in resolved],
        val_prompts=[heldout_prompts(ad, val_given[i] if val_given else None, req.prompts is not None)
                     for i, ad in enumerate(adapters)],
    )


def inputs_report(inputs) -> list[dict]:
    """The report's ``inputs``: per adapter its file, weight, kind, rank and prompts."""
    return [
        {"path": p, "name": n, "weight": w, "kind": a.kind, "rank": max((m.rank for m in a.modules.values()), default=0),
         "modules": len(a.modules), "prompts": pr, "sample_prompts": sp, "prompt_source": src, "val_prompts": vp}
        for p, n, w, a, pr, sp, src, vp in zip(inputs.paths, inputs.names, inputs.weights, inputs.adapters,
                                               inputs.prompts, inputs.sample_prompts, inputs.prompt_sources,
                                               inputs.val_prompts or [[]] * len(inputs.paths))
    ]


def write_outputs(req: FuseRequest, inputs, result, report: dict) -> Path:
    """Write the adapter file, the single-file checkpoint or the pipeline folder, plus the JSON report."""
    out = Path(req.out)
    fmt = req.format
    if fmt == "adapter":
        return _write_adapter(req, inputs, result, report)
    if fmt == "single-file" and out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: a single-file checkpoint must end in .safetensors")
    pipe = result.pipeline
    if pipe is None:
        pipe = inputs.load_pipe()
        if pipe is None:
            raise ValueError(f"--out-format pipeline needs --base (the model to add the {req.method} delta to)")
        apply_deltas(pipe, _maybe_truncate(result.modules, req.rank))
    elif req.rank is not None:
        raise ValueError("--rank applies to --out-format adapter; a fused pipeline holds the full solution")
    if fmt == "single-file":
        save_single_file(pipe, out, metadata={"lorakit.fusion": json.dumps({"method": req.method})})
        report["output"] = {"format": "single-file", "path": str(out)}
        write_json(report, out.with_name(out.stem + ".fusion.json"))
        return out
    report["output"] = {"format": "pipeline", "path": str(out)}
    save_pipeline(pipe, out, overwrite=req.overwrite, inputs=req.input_paths(),
                  extra=lambda tmp: write_json(report, tmp / "lorakit_fusion.json"))
    return out


def _write_adapter(req: FuseRequest, inputs, result, report: dict) -> Path:
    """The fused delta as an adapter ``.safetensors`` + ``OUT.fusion.json``."""
    out = Path(req.out)
    if result.modules is None:
        raise ValueError(f"--method {req.method} produces no adapter delta; use --out-format pipeline")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: an adapter output must end in .safetensors")
    check_out_file(out, req.overwrite, inputs=req.input_paths())
    report_path = out.with_name(out.stem + ".fusion.json")
    check_out_file(report_path, req.overwrite, flag="--out (report)", inputs=req.input_paths())
    modules = _maybe_truncate(result.modules, req.rank)
    if req.base:  # a base was given: never write a delta for layers it does not have
        missing = missing_layers(inputs.load_pipe(), modules)
        if missing:
            raise ValueError(f"--base {req.base} has no layer {missing[0]} ({len(missing)} of {len(modules)} "
                             "fused modules); the adapters were made for another base")
    arch = next((a.arch for a in inputs.adapters if a.arch), None) or "sd1"
    triggers = [a.metadata["lorakit.trigger"] for a in inputs.adapters if a.metadata.get("lorakit.trigger")]
    meta = adapter_metadata(arch, "fused-delta", trigger=", ".join(triggers) or None,
                            rank=max(m.rank for m in modules.values()), alpha=None)
    meta["lorakit.fusion"] = json.dumps({"method": req.method, "inputs": [Path(p).name for p in inputs.paths],
                                         "weights": inputs.weights, "rank": req.rank})
    meta.update(result.metadata)
    save_adapter(Adapter(modules=modules, metadata=meta, extra=dict(result.extra)), out, key_style=req.key_style)
    report["output"] = {"format": "adapter", "path": str(out), "modules": len(modules),
                        "ranks": sorted({m.rank for m in modules.values()})}
    write_json(report, report_path)
    return out


def check_output(req: FuseRequest) -> None:
    """Refuse a bad --out before any work: an input, a folder or file lorakit did not write, an existing output
    without --overwrite, an unwritable place."""
    if req.format in ("adapter", "single-file"):
        out = Path(req.out)
        if out.suffix != ".safetensors":
            raise ValueError(f"--out {out}: a {req.format} output must end in .safetensors")
        check_out_file(out, req.overwrite, inputs=req.input_paths())
        check_out_file(out.with_name(out.stem + ".fusion.json"), req.overwrite, flag="--out (report)",
                       inputs=req.input_paths())
    else:
        check_replace_dir(req.out, req.overwrite, inputs=req.input_paths())
        check_writable(Path(req.out).parent)


def process_state():
    """accelerate's process state; without a GPU, launched processes form a gloo group only when told to use the
    CPU. Raises RuntimeError when launched as several processes that did not form one group (each would redo
    all the work and overwrite the same output)."""
    import os

    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and state.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate formed a group of {state.num_processes}")
    return state


def memory_check(req: FuseRequest) -> None:
    """Refuse (InsufficientMemory, exit 2) when the method's estimate exceeds the free memory."""
    import os

    import torch

    if not memory.worth_checking(req.base):
        return
    stage = METHODS[req.method].memory_stage
    opts = req.settings
    size = getattr(opts, "resolution", None) if stage == "fuse-gradient" else getattr(opts, "ref_size", None)
    extra = {}
    if stage == "fuse-gradient":
        # the layers the files adapt (LoCon's convs included), the capture batch, the held-out Grams
        extra = dict(batch=opts.capture_batch, heldout=opts.ridge == "auto", layers=_fusion_layers(req.adapters))
    est = memory.estimate(stage, req.base, resolution=size, n_loras=len(req.adapters),
                          dtype=getattr(torch, req.dtype), device=memory.default_device(),
                          cfg=(getattr(opts, "guidance", 1.0) or 1.0) > 1, max_conv_dim=getattr(opts, "max_conv_dim", 4608),
                          adapter_bytes=sum(os.path.getsize(a) for a in req.adapters if os.path.isfile(a)), **extra)
    memory.preflight(est, "--no-memory-check")


def _fusion_layers(paths):
    """The layers gradient fusion of these files solves, or None (the estimate's default layers) when a file
    cannot be read: the load that follows reports that in its own words."""
    try:
        return fusion_layers(paths)
    except (AdapterError, OSError, ValueError):
        return None
