"""Sampling jobs: :class:`SampleJob`, :func:`run_sample` (every image with its JSON sidecar), :func:`regenerate`
and the CMLoRA profiling run; the package docstring (:mod:`lorakit.sampling`) describes the API."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorakit.fileio import save_image, write_json
from lorakit.logs import quiet_loaded_libraries, tqdm
from lorakit.models import load_base
from lorakit.outputs import OutputError, check_writable
from lorakit.sampling.attention_masks import attention_masks
from lorakit.sampling.composer import generate, image_size, prompt_parts_of
from lorakit.sampling.conditions import load_conditions
from lorakit.sampling.frequency import ProfileSettings, order_by_frequency, profile_adapters
from lorakit.sampling.loading import LoadedAdapter, file_sha256, load_adapters
from lorakit.sampling.methods import SamplerSettings
from lorakit.sampling.regional import load_regions
from lorakit.sampling.schedules import KINDS, category_sequence

SIDECAR_VERSION = "2"


@dataclass
class SampleJob:
    """Everything one ``lorakit sample`` run needs (also what a sidecar records)."""

    base: str
    adapters: list[str]
    out_dir: str
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    weights: list[float] | None = None
    kinds: list[str] | None = None  # concept category per adapter (cmlora's category order); None: file metadata
    seed: int = 0
    num_images: int = 1
    batch_size: int = 1
    regions: str | None = None
    dtype: str = "auto"
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    profile_prompt: str = "a picture"
    profile_steps: int | None = None
    profile_seeds: tuple[int, ...] = (0, 1)


def _dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype must be auto, fp32, fp16 or bf16, got {name!r}")
    return table[name]


def load_pipeline(base: str, dtype: str = "auto", device=None):
    """Load the base (``lorakit.models.load_base``) on ``device`` with the progress bar off."""
    from accelerate import PartialState

    device = device or PartialState().device
    pipe = load_base(base, torch_dtype=_dtype(dtype, device)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter_kinds(job: SampleJob, adapters: list[LoadedAdapter]) -> list[str | None]:
    """Each adapter's concept category: ``job.kinds`` if given, else the file's ``lorakit.category`` metadata."""
    kinds = list(job.kinds) if job.kinds is not None else [a.category for a in adapters]
    if len(kinds) != len(adapters):
        raise ValueError(f"got {len(kinds)} kinds for {len(adapters)} adapters")
    for a, k in zip(adapters, kinds):
        if k is not None and k not in KINDS:
            raise ValueError(f"{Path(a.path).name}: kind {k!r}; expected one of {', '.join(KINDS)}")
    return kinds


def _cmlora_order(pipe, job: SampleJob, adapters: list[LoadedAdapter]) -> tuple[list[int], int, dict]:
    """CMLoRA's pass order, its number of rotating adapters and what decided it (recorded in the sidecar).

    ``auto``: the official category order when every adapter's kind is known, else lorakit's frequency order
    (official mode: the given order, as the official code has no other); ``category``, ``frequency``, ``given``.
    """
    kinds = adapter_kinds(job, adapters)
    how = job.sampler.cmlora_order
    if how == "auto":
        known = all(k is not None for k in kinds)
        how = "category" if known else ("given" if job.sampler.cmlora_mode == "official" else "frequency")
    if how == "category":
        missing = [Path(a.path).name for a, k in zip(adapters, kinds) if k is None]
        if missing:
            raise ValueError(f"cmlora category order needs every adapter's kind (--kinds); unknown for {', '.join(missing)}")
        order, n_rot = category_sequence(kinds)
        return order, n_rot, {"by": "category", "kinds": kinds}
    if how == "given" or len(adapters) == 1:
        return list(range(len(adapters))), len(adapters), {"by": "given"}
    prof = ProfileSettings(
        base=job.base, prompt=job.profile_prompt, negative_prompt=job.negative_prompt,
        steps=job.profile_steps or job.sampler.steps, cfg=job.sampler.cfg, seeds=tuple(job.profile_seeds),
        width=job.sampler.width, height=job.sampler.height, scheduler=job.sampler.scheduler,
    )
    profiles = profile_adapters(pipe, adapters, prof, progress=False)
    scores = [profiles[a.name]["score"] for a in adapters]
    order, groups = order_by_frequency(scores, "high-first")
    return order, len(adapters), {"by": "frequency", "scores": {a.name: {"score": s, "group": g}
                                                                 for a, s, g in zip(adapters, scores, groups)}}


def _check_not_foreign(out_dir: Path, stems: list[str]) -> None:
    """Refuse to replace an image or JSON file lorakit did not write (a lorakit sample has a sidecar JSON with
    ``lorakit.sidecar``); earlier lorakit samples of the same names are replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} exists and is not a folder")
    check_writable(out_dir)
    if not out_dir.is_dir():
        return
    for stem in stems:
        png, js = out_dir / f"{stem}.png", out_dir / f"{stem}.json"
        if not (png.exists() or js.exists()):
            continue
        try:
            ours = "lorakit.sidecar" in json.loads(js.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise OutputError(f"--out {out_dir} already holds {stem}.png/.json that lorakit did not write; choose "
                              "another folder (lorakit never overwrites files it did not write)")


def _work_items(job: SampleJob, prompts: list[str]) -> list[tuple[int, int, int]]:
    """(prompt index, image index, seed) for every image of the run."""
    return [(p, i, job.seed + i) for p in range(len(prompts)) for i in range(job.num_images)]


def _batches(items: list, batch_size: int) -> list[list]:
    """This process's items in UNet batches of one prompt each."""
    batches = []
    for p in sorted({it[0] for it in items}):
        share = [it for it in items if it[0] == p]
        batches += [share[k : k + batch_size] for k in range(0, len(share), batch_size)]
    return batches


def _sidecar(job: SampleJob, prompts: list[str], p_idx: int, i: int, seed: int, adapters, regions, profile: dict,
             info: dict) -> dict:
    """The JSON sidecar of one image: every setting needed to make it again."""
    return {
        "lorakit.sidecar": SIDECAR_VERSION,
        "base": job.base,
        "prompt": prompts[p_idx],
        "negative_prompt": job.negative_prompt,
        "prompt_index": p_idx,
        "image_index": i,
        "seed": seed,
        "dtype": job.dtype,
        "adapters": [a.record() for a in adapters],
        "kinds": job.kinds,
        "sampler": asdict(job.sampler),
        "regions": regions.to_dict() if regions is not None else None,
        "regions_file": str(Path(job.regions).resolve()) if job.regions else None,
        "profile": profile,
        "profile_settings": {"prompt": job.profile_prompt, "steps": job.profile_steps, "seeds": list(job.profile_seeds)},
        "batch_size": job.batch_size,
        "schedule": {k: v for k, v in info.items()
                     if k in ("order", "n_rotation", "dominants", "rotations", "active_per_step", "passes",
                              "prompt_parts")},
    }


def run_sample(job: SampleJob, progress: bool = True) -> list[Path]:
    """Generate and save every image of a job on this process's share of the work (see module docstring).

    Returns:
        The PNG paths this process wrote.
    Raises:
        ValueError / FileNotFoundError naming the bad setting or file.
    """
    from accelerate import PartialState

    job.sampler.check()
    if job.num_images < 1 or job.batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {job.num_images} and {job.batch_size}")
    state = PartialState()
    quiet_loaded_libraries()  # diffusers loads text-encoder LoRA through transformers: its key report
    pipe = load_pipeline(job.base, job.dtype, state.device)
    adapters = load_adapters(pipe, job.adapters, job.weights)
    height, width = image_size(pipe, job.sampler)
    regions = load_regions(job.regions, width, height) if job.regions else None
    conditions = None
    if regions is not None and regions.conditions:
        conditions = load_conditions(regions.conditions, pipe.unet.device, pipe.unet.dtype, regions.source)
    prompts = [regions.prompt] if regions is not None else list(job.prompts)
    if not prompts:
        raise ValueError("no prompt given: pass --prompt (or a --regions file with a global prompt)")
    order, n_rot, profile = None, None, {}
    kinds = adapter_kinds(job, adapters)  # a bad --kinds fails before any image
    for prompt in prompts:  # as do the triggers of --prompt-parts and --masks attention (in a comma tag of each prompt)
        base_prompt, _ = prompt_parts_of(job.sampler, adapters, prompt, regions)
        attention_masks(pipe, job.sampler, adapters, prompt, kinds, (1, 1), False, base_prompt)
    if job.sampler.method == "cmlora" and adapters:
        order, n_rot, profile = _cmlora_order(pipe, job, adapters)
    out_dir = Path(job.out_dir)
    items = _work_items(job, prompts)
    _check_not_foreign(out_dir, [f"{p_idx:03d}-{i:04d}-s{seed}" for p_idx, i, seed in items])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with state.split_between_processes(items) as mine:
        batches = _batches(mine, job.batch_size)
        bar = tqdm(total=len(mine), desc=f"sample[{state.process_index}]", disable=not progress or not state.is_local_main_process)
        for batch in batches:
            p = batch[0][0]
            images, info = generate(
                pipe, adapters, job.sampler, prompts[p], job.negative_prompt, [s for _, _, s in batch], regions, order,
                n_rot, conditions=conditions, kinds=kinds,
            )
            for (p_idx, i, seed), image in zip(batch, images):
                stem = f"{p_idx:03d}-{i:04d}-s{seed}"
                png = out_dir / f"{stem}.png"
                save_image(image, png)
                sidecar = _sidecar(job, prompts, p_idx, i, seed, adapters, regions, profile, info)
                write_json(sidecar, png.with_suffix(".json"))
                written.append(png)
            bar.update(len(batch))
        bar.close()
    state.wait_for_everyone()
    return written


def regenerate(sidecar_path: str | Path, out_dir: str | Path) -> Path:
    """Regenerate the image a JSON sidecar describes into ``out_dir`` (checks each adapter file's SHA-256)."""
    data = json.loads(Path(sidecar_path).read_text())
    if data.get("lorakit.sidecar") != SIDECAR_VERSION:
        raise ValueError(f"{sidecar_path}: sidecar version {data.get('lorakit.sidecar')!r}, this lorakit regenerates "
                         f"version {SIDECAR_VERSION!r} (run the command recorded in it with this version instead)")
    for a in data["adapters"]:
        if file_sha256(a["path"]) != a["sha256"]:
            raise ValueError(f"{a['path']}: SHA-256 differs from the one recorded in {sidecar_path}; the adapter changed")
    sampler = SamplerSettings(**data["sampler"])
    prof = data.get("profile_settings") or {}
    job = SampleJob(
        base=data["base"],
        adapters=[a["path"] for a in data["adapters"]],
        weights=[a["weight"] for a in data["adapters"]],
        kinds=data.get("kinds"),
        out_dir=str(out_dir),
        prompts=[data["prompt"]],
        negative_prompt=data["negative_prompt"],
        seed=data["seed"],
        num_images=1,
        dtype=data.get("dtype", "auto"),
        sampler=sampler,
        profile_prompt=prof.get("prompt", "a picture"),
        profile_steps=prof.get("steps"),
        profile_seeds=tuple(prof.get("seeds", (0, 1))),
    )
    if data.get("regions_file"):
        job.regions = data["regions_file"]
    return run_sample(job, progress=False)[0]


def run_profile(base: str, adapters: list[str], settings: ProfileSettings | None = None, dtype: str = "auto",
                use_cache: bool = True) -> dict:
    """Profile adapter files on a base: ``{path: {'score', 'group', 'rank', 'cached', ...}}`` (see :mod:`.frequency`)."""
    quiet_loaded_libraries()  # diffusers loads text-encoder LoRA through transformers: its key report
    pipe = load_pipeline(base, dtype)
    loaded = load_adapters(pipe, adapters)
    settings = settings or ProfileSettings(base=base)
    profiles = profile_adapters(pipe, loaded, settings, use_cache=use_cache)
    scores = [profiles[a.name]["score"] for a in loaded]
    order, groups = order_by_frequency(scores, "high-first")
    rank = {idx: r for r, idx in enumerate(order)}
    return {
        a.path: {**profiles[a.name], "group": groups[i], "rank": rank[i]} for i, a in enumerate(loaded)
    }
