"""Write an evaluation result as JSON (everything) and a markdown table (the summary)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lorakit.fileio import write_json, write_text
from lorakit.outputs import OutputError


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats with 3 decimals, ``None``/NaN as ``-``.

    Raises:
        ValueError when a row's length differs from the headers'.
    """
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table row {row!r} has {len(row)} cells but there are {len(headers)} headers")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _lorakit_report(js: Path) -> bool:
    try:
        data = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("metric" in data or data.get("written_by") == "lorakit")


def check_report_paths(out: str | os.PathLike) -> Path:
    """``out`` without a .json/.md suffix, after checking that ``OUT.json`` / ``OUT.md`` are new or an earlier
    lorakit report (one with a ``metric``); anything else is never overwritten (OutputError)."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    js, md = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    for p in (js, md):
        if p.is_dir():
            raise OutputError(f"--out {out}: {p} is a folder")
    ours = _lorakit_report(js)
    for p in (js, md):
        if p.exists() and not ours:
            raise OutputError(f"--out {out}: {p} exists and is not a lorakit report; lorakit never overwrites it "
                              "(choose another --out)")
    return out


def write_report(result: dict, out: str | os.PathLike, title: str, headers: list[str], rows: list[list]) -> tuple[Path, Path]:
    """Write ``result`` to ``OUT.json`` and a markdown file ``OUT.md`` (title + table), atomically.

    Args:
        result: JSON-able dict (settings, summary, per-item results).
        out: output path; a ``.json`` / ``.md`` suffix is replaced.
    Returns:
        (json path, markdown path).
    """
    out = check_report_paths(out)
    js = write_json(result, out.with_name(out.name + ".json"))
    md = write_text(f"## {title}\n\n" + markdown_table(headers, rows), out.with_name(out.name + ".md"))
    return js, md


def all_present(verdicts: dict) -> bool | None:
    """Every concept present? ``False`` if any answer is ``False``; ``None`` if any is unknown (and none False)."""
    values = list(verdicts.values())
    if any(v is False for v in values):
        return False
    if not values or any(v is None for v in values):
        return None
    return True


def presence_summary(items: list[tuple[str, dict]], categories: dict[str, str] | None = None) -> dict:
    """Presence rates from per-image verdicts.

    Args:
        items: ``(image name, {concept name: True/False/None})`` per image (None = the answer failed).
        categories: concept name -> category, for per-category rates.
    Returns:
        ``{"images", "all_present_rate", "all_present_images", "failed_images", "per_concept": {name: {"rate",
        "n"}}, "per_category": {...}}``; rates count only answered questions (None/NaN when there are none).
    """
    categories = categories or {}
    flags = [all_present(v) for _, v in items]
    decided = [f for f in flags if f is not None]
    per_concept: dict[str, list] = {}
    per_category: dict[str, list] = {}
    for _, verdicts in items:
        for name, v in verdicts.items():
            if v is None:
                continue
            per_concept.setdefault(name, []).append(v)
            per_category.setdefault(categories.get(name) or "unknown", []).append(v)

    def rate(values):
        return {"rate": sum(values) / len(values) if values else None, "n": len(values)}

    return {
        "images": len(items),
        "all_present_rate": sum(decided) / len(decided) if decided else None,
        "all_present_images": sum(f is True for f in flags),
        "failed_images": sum(f is None for f in flags),
        "per_concept": {k: rate(v) for k, v in sorted(per_concept.items())},
        "per_category": {k: rate(v) for k, v in sorted(per_category.items())},
    }


def presence_rows(summary: dict) -> tuple[list[str], list[list]]:
    """Markdown table (headers, rows) of a :func:`presence_summary`: one row for all concepts, then one per
    category and per concept."""
    headers = ["what", "present rate", "n"]
    decided = summary["images"] - summary["failed_images"]
    rows = [["all concepts (per image)", summary["all_present_rate"], decided]]
    rows += [[f"category: {k}", v["rate"], v["n"]] for k, v in summary["per_category"].items()]
    rows += [[f"concept: {k}", v["rate"], v["n"]] for k, v in summary["per_concept"].items()]
    return headers, rows
