"""Evaluation of generated images and composed models (``lorakit eval``).

Modules, one metric each:
  * :mod:`lorakit.eval.images` - find images and read their sidecars (prompt, concepts).
  * :mod:`lorakit.eval.clipscore` - CLIPScore, ``100 * max(cos(image, prompt), 0)`` with a transformers CLIP.
  * :mod:`lorakit.eval.judge` - an MLLM judge on any OpenAI-compatible chat endpoint (pairwise 0-10 in both
    orders; yes/no concept presence), with retries and an answer cache.
  * :mod:`lorakit.eval.retention` - how much of each concept's own noise-prediction change a fused or composed
    model keeps.
  * :mod:`lorakit.eval.report` - JSON + markdown table output.
  * :mod:`lorakit.eval.registry` - the metrics by name, :func:`evaluate` and :func:`evaluate_to_files` (what
    ``lorakit eval`` runs); :mod:`lorakit.eval.settings` - each metric's settings; :mod:`lorakit.eval.metrics` -
    the metrics as functions of their settings.

The toy world's ``oracle`` metric lives with the toy world (:mod:`lorakit.toyworld.metrics`) and is registered
when :mod:`lorakit.toyworld` is imported.
"""

from lorakit.eval.registry import METRICS, default_out, evaluate, evaluate_to_files, register, register_describer
from lorakit.eval.settings import ClipScoreSettings, EvalSettings, JudgeSettings, RetentionSettings

__all__ = ["METRICS", "ClipScoreSettings", "EvalSettings", "JudgeSettings", "RetentionSettings", "default_out",
           "evaluate", "evaluate_to_files", "register", "register_describer"]
