"""Loading adapter files into a pipeline for sampling, each under its own adapter name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.adapters.edlora import load_edlora
from lorakit.adapters.io import apply_adapter, load_adapter, validate_adapter
from lorakit.hashing import file_sha256  # noqa: F401 - the one file hasher, re-exported for callers
from lorakit.logs import library_notices_off

KIND_METADATA_KEY = "lorakit.category"  # the concept category (character, style, ...) a file may record


@dataclass
class LoadedAdapter:
    """An adapter file loaded into a pipeline under ``name``."""

    name: str
    path: str
    sha256: str
    kind: str
    weight: float = 1.0
    metadata: dict = field(default_factory=dict, repr=False)

    @property
    def category(self) -> str | None:
        """The concept category the file's metadata records (``lorakit.category``), or None."""
        return self.metadata.get(KIND_METADATA_KEY) or None

    def record(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "kind": self.kind, "weight": self.weight}


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable .safetensors adapter file: {err}") from err


def is_edlora(meta: dict) -> bool:
    """Whether an adapter file's metadata marks an ED-LoRA or a fused delta of ED-LoRAs (``lorakit fuse
    --out-format adapter``: kind ``fused-delta`` with the ED-LoRA table): both carry layer-wise embeddings that only
    ``load_edlora`` installs."""
    return meta.get("lorakit.kind") == "edlora" or "lorakit.edlora" in meta


def load_adapters(pipe, paths: list, weights: list[float] | None = None) -> list[LoadedAdapter]:
    """Load adapter files into ``pipe`` (diffusers ``load_lora_weights``), each under its own adapter name.

    Files whose metadata says ``lorakit.kind=edlora`` or holds an ED-LoRA table (``lorakit.edlora``: a fused delta of
    ED-LoRAs) go through ``lorakit.adapters.edlora.load_edlora`` where
    that module exists; every other file is a plain LoRA/LoCon (kohya, lorakit or diffusers layout).

    Args:
        paths: adapter ``.safetensors`` files.
        weights: LoRA scale per adapter (default 1.0 each).
    Raises:
        FileNotFoundError, ValueError (via ``AdapterError``) naming the file that does not fit the base.
    """
    import importlib.util

    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths):
        raise ValueError(f"got {len(weights)} weights for {len(paths)} adapters")
    loaded = []
    for i, (path, weight) in enumerate(zip(paths, weights)):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"adapter file not found: {path}")
        meta = read_metadata(path)
        name = f"a{i}_" + re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:40]
        kind = meta.get("lorakit.kind", "lora")
        if is_edlora(meta) and importlib.util.find_spec("lorakit.adapters.edlora") is not None:
            load_edlora(pipe, path, adapter_name=name)
        else:
            adapter = load_adapter(path)
            validate_adapter(adapter, pipe, path)
            if any(m.kind != "lora" for m in adapter.modules.values()):  # LoHa / LoKr: diffusers reads LoRA only; peft gets the exact LoRA form
                apply_adapter(pipe, adapter, name)
            else:
                with library_notices_off():  # peft's notice on every adapter after the first
                    pipe.load_lora_weights(str(path), adapter_name=name)
        loaded.append(LoadedAdapter(name, str(path.resolve()), file_sha256(path), kind, float(weight), meta))
    return loaded
