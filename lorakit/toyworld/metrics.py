"""The toy world's contributions to ``lorakit eval``: the ``oracle`` metric (which toy concepts each generated
image shows, by :mod:`lorakit.toyworld.oracle`) and the descriptions of its trigger words for the MLLM judge.

:mod:`lorakit.toyworld` registers both into :mod:`lorakit.eval.registry` when it is imported, so evaluation code
never imports the toy world. From Python::

    from lorakit.eval import evaluate
    from lorakit.toyworld.metrics import OracleSettings
    scored = evaluate("oracle", OracleSettings(images="out"))

This module stays torch-free at import (``lorakit --help`` builds its flags from :class:`OracleSettings`); the
oracle and the report helpers load when the metric runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.eval.metrics import Scored, image_records
from lorakit.eval.settings import EvalSettings
from lorakit.toyworld.concepts import BY_TRIGGER, get_concept


@dataclass(frozen=True)
class OracleSettings(EvalSettings):
    pass


def describe_trigger(name: str) -> tuple[str, str] | None:
    """``(kind, description)`` of a toy-world trigger word (``zorbo`` -> character, "a robot ..."), for the judge,
    which cannot know what a trigger word looks like. Only the nonsense trigger words match, never plain names
    like ``ink`` that a user's own LoRA may use."""
    toy = BY_TRIGGER.get(name)
    return None if toy is None else (toy.kind, toy.description or toy.name)


def _wanted(records) -> list[list]:
    """Per image: its sidecar's concepts (names or trigger words) as toy-world concepts, in order, once each."""
    wanted = []
    for rec in records:
        if not rec.concepts:
            raise ValueError(f"{rec.path}: its sidecar names no 'concepts' or 'adapters' for the oracle to look for")
        try:
            wanted.append(list(dict.fromkeys(get_concept(c.name) for c in rec.concepts)))
        except ValueError as err:
            raise ValueError(f"{rec.path}: {err}") from err
    return wanted


def eval_oracle(s: OracleSettings, records) -> tuple[dict, list, list]:
    """The oracle's verdict on each image's own concepts, with rates per concept, per kind and all at once."""
    from PIL import Image

    # lazy: torch (`lorakit --help` imports this module)
    from lorakit.eval.report import presence_rows, presence_summary
    from lorakit.toyworld.oracle import score

    root = Path(s.images)
    wanted = _wanted(records)
    verdicts = []
    for start in range(0, len(records), s.batch_size):
        batch = records[start : start + s.batch_size]
        union = list(dict.fromkeys(c.name for cs in wanted[start : start + len(batch)] for c in cs))
        result = score([Image.open(r.path).convert("RGB") for r in batch], union)
        for i, cs in enumerate(wanted[start : start + len(batch)]):
            verdicts.append({c.name: bool(result.present[i, result.concepts.index(c.name)]) for c in cs})
    categories = {c.name: c.kind for cs in wanted for c in cs}
    summary = presence_summary([(r.relpath(root), v) for r, v in zip(records, verdicts)], categories)
    result = {
        "metric": "oracle",
        "summary": summary,
        "per_image": [{"image": r.relpath(root), "present": v} for r, v in zip(records, verdicts)],
    }
    headers, rows = presence_rows(summary)
    return result, headers, rows


def oracle(s: OracleSettings) -> Scored:
    return Scored(*eval_oracle(s, image_records(s, "oracle")), "Toy-world oracle: concept presence")
