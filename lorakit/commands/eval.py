"""``lorakit eval --metric clipscore|judge|oracle|retention``: score generated images or a fused model.

Every metric writes ``OUT.json`` (settings, summary, per-image results) and ``OUT.md`` (a markdown table) and
prints the table. The metrics, their options and the Python API live in :mod:`lorakit.eval.registry`.
"""

from __future__ import annotations

import lorakit.toyworld  # noqa: F401  (registers the toy world's oracle metric)
from lorakit.eval.registry import METRICS, evaluate_to_files
from lorakit.eval.settings import EvalSettings
from lorakit.options import add_options, from_args, option_fields


HELP = "score images (CLIPScore, MLLM judge, toy-world oracle) or a fused model (concept retention)"
DESCRIPTION = (
    "Evaluate generated images or a fused/composed model. Images are read from --images with "
    "their sidecars (NAME.json beside NAME.png with at least 'prompt', and 'concepts' or 'adapters'; or a "
    "NAME.txt holding the prompt). Writes OUT.json + OUT.md and prints the table."
)


def add_arguments(p) -> None:
    p.add_argument("--metric", required=True, choices=list(METRICS), help="what to compute")
    add_options(p, [("eval", EvalSettings)])
    shared = {f.name for f in option_fields(EvalSettings)}
    for name, metric in METRICS.items():
        own = [f.name for f in option_fields(metric.settings) if f.name not in shared]
        if own:
            add_options(p.add_argument_group(metric.group), [(name, metric.settings)], skip=shared)
            shared.update(own)


def run(args) -> int:
    _, js, md = evaluate_to_files(args.metric, from_args(METRICS[args.metric].settings, args))
    print(md.read_text())
    print(f"wrote {js} and {md}")
    return 0
