"""The metrics ``lorakit eval`` offers (name -> :class:`Metric`) and the Python entry points the command uses.

Python::

    from lorakit.eval import evaluate, ClipScoreSettings
    scored = evaluate("clipscore", ClipScoreSettings(images="out"))      # Scored(result, headers, rows, title)
    scored, json_path, md_path = evaluate_to_files("clipscore", ClipScoreSettings(images="out"))

Adding a metric is one module with ``fn(settings) -> lorakit.eval.metrics.Scored`` (settings: a subclass of
:class:`lorakit.eval.settings.EvalSettings` whose option fields become the command's flags) and one
``register`` line below. Packages above evaluation register their own metrics when they are imported: the toy
world (``import lorakit.toyworld``, which ``lorakit eval`` does) adds ``oracle``
(``lorakit.toyworld.metrics.OracleSettings``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from lorakit.eval.settings import ClipScoreSettings, EvalSettings, JudgeSettings, RetentionSettings


@dataclass(frozen=True)
class Metric:
    run: str  # "module:function"
    settings: type
    group: str  # the title of its options in --help
    reads_images: bool = True  # scores the images of --images (else a model; OUT defaults to ./eval_NAME)

    def load(self):
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)


METRICS: dict[str, Metric] = {}


def register(name: str, metric: Metric) -> None:
    METRICS[name] = metric


register("clipscore", Metric("lorakit.eval.metrics:clipscore", ClipScoreSettings, "clipscore"))
register("judge", Metric("lorakit.eval.metrics:judge", JudgeSettings,
                         "judge (any OpenAI-compatible chat endpoint: vLLM, ollama, hosted APIs)"))
register("retention", Metric("lorakit.eval.metrics:retention", RetentionSettings, "retention", reads_images=False))


# Describers of concept names the judge cannot know (trigger words): ``fn(name) -> (category, description)`` or
# None, asked in registration order.
DESCRIBERS: list = []


def register_describer(describe) -> None:
    if describe not in DESCRIBERS:
        DESCRIBERS.append(describe)


def _metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"metric {name!r}: expected one of {', '.join(METRICS)} (a package's own metrics are "
                         "there once it is imported, e.g. `import lorakit.toyworld` for 'oracle')")
    return METRICS[name]


def default_out(name: str, settings: EvalSettings) -> Path:
    """``settings.out``, else ``IMAGES/eval_NAME`` (judge: ``eval_judge_PROTOCOL``), or ``./eval_NAME`` for a
    metric of a model."""
    if settings.out:
        return Path(settings.out)
    if not _metric(name).reads_images:
        return Path(f"eval_{name}")
    suffix = f"_{settings.protocol}" if hasattr(settings, "protocol") else ""
    return Path(settings.images) / f"eval_{name}{suffix}"


def evaluate(name: str, settings: EvalSettings | None = None):
    """Compute metric ``name`` (settings default: the metric's class with its defaults); returns its ``Scored``."""
    metric = _metric(name)
    settings = metric.settings() if settings is None else settings
    if settings.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {settings.batch_size}")
    return metric.load()(settings)


def evaluate_to_files(name: str, settings: EvalSettings):
    """:func:`evaluate`, then write OUT.json and OUT.md (OUT: :func:`default_out`), refusing a bad OUT before
    any scoring (a judge run costs money). Returns ``(scored, json path, markdown path)``."""
    # lazy: torch (`lorakit --help` imports this module)
    from lorakit.eval.report import check_report_paths, write_report

    if settings.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {settings.batch_size}")
    if not _metric(name).reads_images or settings.images:
        check_report_paths(default_out(name, settings))
    scored = evaluate(name, settings)
    js, md = write_report(scored.result, default_out(name, settings), scored.title, scored.headers, scored.rows)
    return scored, js, md
