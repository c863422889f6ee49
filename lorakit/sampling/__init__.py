"""Sampling with several LoRAs: merge, LoRA Switch, LoRA Composite, CMLoRA, delta composite, regional prompts.

Python API::

    from lorakit.sampling import SampleJob, run_sample
    paths = run_sample(SampleJob(base="tiny:sd1", adapters=["a.safetensors", "b.safetensors"], method="cmlora",
                                 prompts=["a photo of a cat"], out_dir="out", steps=20))

Each image is written as ``<out>/<prompt#>-<image#>-s<seed>.png`` with a JSON sidecar of the same name holding
every setting, the adapters (paths, SHA-256, weights), the seed and the method's schedule, so
:func:`regenerate` (or the same command) makes the identical image again.

Under ``accelerate launch`` the (prompt, seed) items are split across processes with accelerate's
``split_between_processes``; an item's image depends only on its prompt and seed, so it is the same as in a
single process (with the same ``batch_size``; use 1 for bitwise equality across process counts).

Lower-level pieces: :mod:`.composer` (methods and the denoising loop), :mod:`.schedules` (switch and CMLoRA
schedules), :mod:`.frequency` (profiles), :mod:`.cache` (split UNet), :mod:`.loading` (adapter files),
:mod:`.regional` (attention processor).
"""

# The names below load lazily (PEP 562), so that torch-free modules of this package (the method registry in
# lorakit.sampling.methods, read by `lorakit sample --help`) import without torch.
_LAZY = frozenset({
    "KINDS", "LoadedAdapter", "METHODS", "ProfileSettings", "SIDECAR_VERSION", "SampleJob", "SamplerSettings",
    "_check_not_foreign", "adapter_kinds", "category_sequence", "cmlora_interval_steps", "cmlora_plan",
    "file_sha256", "generate", "image_size", "load_adapters", "load_pipeline", "load_regions",
    "order_by_frequency", "profile_adapters", "quiet_loaded_libraries", "regenerate", "run_profile", "run_sample",
    "switch_schedule", "unet_pass",
})

__all__ = [
    "METHODS",
    "LoadedAdapter",
    "ProfileSettings",
    "SampleJob",
    "KINDS",
    "SamplerSettings",
    "category_sequence",
    "cmlora_interval_steps",
    "cmlora_plan",
    "generate",
    "load_adapters",
    "order_by_frequency",
    "profile_adapters",
    "regenerate",
    "run_profile",
    "run_sample",
    "switch_schedule",
    "unet_pass",
]


def __getattr__(name: str):
    if name in _LAZY:
        from lorakit.sampling import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module 'lorakit.sampling' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
