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

# The names below load lazily (PEP 562): name -> the module that defines it, so that the torch-free modules of
# this package (the method registry in lorakit.sampling.methods, read by `lorakit sample --help`) import
# without torch.
_LAZY = {
    **dict.fromkeys(("SIDECAR_VERSION", "SampleJob", "_check_not_foreign", "adapter_kinds", "load_pipeline",
                     "regenerate", "run_profile", "run_sample"), "jobs"),
    **dict.fromkeys(("METHODS", "generate", "image_size", "unet_pass"), "composer"),
    **dict.fromkeys(("SamplerSettings",), "methods"),
    **dict.fromkeys(("ProfileSettings", "order_by_frequency", "profile_adapters"), "frequency"),
    **dict.fromkeys(("LoadedAdapter", "file_sha256", "load_adapters"), "loading"),
    **dict.fromkeys(("load_regions",), "regional"),
    **dict.fromkeys(("KINDS", "category_sequence", "cmlora_interval_steps", "cmlora_plan", "switch_schedule"),
                    "schedules"),
}
__all__ = sorted(name for name in _LAZY if not name.startswith("_") and name != "SIDECAR_VERSION")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"lorakit.sampling.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lorakit.sampling' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
