"""Evaluation of generated images and composed models (``lorakit eval``).

Modules, one metric each:
  * :mod:`lorakit.eval.images` - find images and read their sidecars (prompt, concepts).
  * :mod:`lorakit.eval.clipscore` - CLIPScore, ``100 * max(cos(image, prompt), 0)`` with a transformers CLIP.
  * :mod:`lorakit.eval.judge` - an MLLM judge on any OpenAI-compatible chat endpoint (pairwise 0-10 in both
    orders; yes/no concept presence), with retries and an answer cache.
  * :mod:`lorakit.eval.oracle` - the toy world's concept classifier (owned by the toy world).
  * :mod:`lorakit.eval.retention` - how much of each concept's own noise-prediction change a fused or composed
    model keeps.
  * :mod:`lorakit.eval.report` - JSON + markdown table output.
"""
