"""Images to evaluate and their sidecars.

``lorakit sample`` writes ``NAME.png`` with a JSON sidecar ``NAME.json`` (at least ``"prompt"``; usually the
adapters, seed and settings). A same-name ``NAME.txt`` holding the prompt (the training-caption layout) is also
read. Concepts come from the sidecar's ``"concepts"`` field, else from its ``"adapters"`` field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Concept:
    """One concept an image should show.

    name: the identifier (toy-world concept name or trigger word) that the oracle understands.
    category: ``character``, ``object``, ``clothing``, ``style``, ``background`` ... or ``""`` when unknown.
    description: words a human or an MLLM understands ("a red cat"); defaults to the name.
    """

    name: str
    category: str = ""
    description: str = ""

    def __post_init__(self):
        self.description = self.description or self.name


@dataclass
class ImageRecord:
    """An image file and what its sidecar says about it."""

    path: Path
    sidecar: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str | None:
        p = self.sidecar.get("prompt")
        return p if isinstance(p, str) else None

    @property
    def concepts(self) -> list[Concept]:
        return sidecar_concepts(self.sidecar, self.path)

    def relpath(self, root: Path) -> str:
        return self.path.relative_to(root).as_posix()


def read_sidecar(image: str | os.PathLike) -> dict:
    """The sidecar of one image: ``NAME.json`` / ``NAME.png.json`` (a JSON object) or ``NAME.txt`` (the prompt).

    Returns ``{}`` when there is none.
    Raises:
        ValueError naming the sidecar when the JSON is unreadable or not an object.
    """
    image = Path(image)
    for js in (image.with_suffix(".json"), image.with_name(image.name + ".json")):
        if js.exists():
            try:
                data = json.loads(js.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{js}: sidecar is not valid JSON: {err}") from err
            if not isinstance(data, dict):
                raise ValueError(f"{js}: sidecar must be a JSON object, got {type(data).__name__}")
            return data
    txt = image.with_suffix(".txt")
    if txt.exists():
        return {"prompt": txt.read_text().strip()}
    return {}


def find_images(folder: str | os.PathLike, recursive: bool = False) -> list[ImageRecord]:
    """All images in ``folder`` (sorted by relative path) with their sidecars.

    Raises:
        FileNotFoundError if ``folder`` is not a folder; ValueError if it holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = root.rglob("*") if recursive else root.iterdir()
    paths = sorted(
        (p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not paths:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found" + ("" if recursive else " (try --recursive)"))
    return [ImageRecord(p, read_sidecar(p)) for p in paths]


def _adapter_trigger(path: str) -> str | None:
    """``lorakit.trigger`` from an adapter file's header, without reading its tensors."""
    p = Path(path)
    if p.suffix != ".safetensors" or not p.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return (f.metadata() or {}).get("lorakit.trigger")
    except Exception:  # noqa: BLE001 - an unreadable file just has no trigger here
        return None


def _concept_from(item, source: Path) -> Concept:
    if isinstance(item, str):
        trigger = _adapter_trigger(item)
        if trigger:
            return Concept(trigger)
        name = Path(item).stem if item.endswith(".safetensors") else item
        return Concept(name)
    if isinstance(item, dict):
        # An explicit concept beats the adapter file's trigger, which beats a name (for adapter records written
        # by ``lorakit sample`` the name is only the adapter's slot in the pipeline).
        name = item.get("concept") or item.get("trigger")
        if not name and item.get("path"):
            name = _adapter_trigger(item["path"])
        name = name or item.get("name") or (Path(item["path"]).stem if item.get("path") else None)
        if not name:
            raise ValueError(f"{source}: concept entry {item!r} has none of name/concept/trigger/path")
        return Concept(str(name), str(item.get("category", "")), str(item.get("description", "")))
    raise ValueError(f"{source}: concept entry {item!r} must be a string or an object")


def sidecar_concepts(sidecar: dict, source: Path | str = "sidecar") -> list[Concept]:
    """The concepts a sidecar names: ``"concepts"`` (strings or objects with name/category/description), else
    ``"adapters"`` (adapter paths, or objects with concept/trigger/path/name as ``lorakit sample`` writes them;
    a path's ``lorakit.trigger`` names its concept). Returns ``[]`` when neither field is there."""
    items = sidecar.get("concepts")
    if items is None:
        items = sidecar.get("adapters")
    if items is None:
        return []
    if isinstance(items, (str, dict)):
        items = [items]
    return [_concept_from(item, Path(source)) for item in items]
