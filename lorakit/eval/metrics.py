"""The metrics of ``lorakit eval`` as functions of their settings (:mod:`lorakit.eval.settings`).

Each metric ``fn(settings) -> Scored`` returns the full JSON-able result, a table (headers, rows) and its title;
:func:`lorakit.eval.registry.evaluate` looks them up by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.eval.images import Concept, find_images
from lorakit.eval.registry import DESCRIBERS
from lorakit.logs import tqdm, warn


@dataclass
class Scored:
    """A metric's output: ``result`` (everything, written as OUT.json) and the summary table (OUT.md)."""

    result: dict
    headers: list
    rows: list
    title: str


def _device(s) -> str:
    import torch

    return s.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _need(s, metric: str, *names):
    missing = ["--" + n.replace("_", "-") for n in names if not getattr(s, n)]
    if missing:
        raise ValueError(f"--metric {metric} needs {', '.join(missing)}")


# ----------------------------------------------------------------------------------------------- clipscore


def eval_clipscore(s, records) -> tuple[dict, list, list]:
    from PIL import Image

    # lazy: torch (`lorakit --help` imports this module)
    from lorakit.eval.clipscore import clip_scores, load_clip

    root = Path(s.images)
    prompts = []
    for rec in records:
        prompt = s.prompt or rec.prompt
        if not prompt:
            raise ValueError(f"{rec.path}: no prompt (no sidecar NAME.json with 'prompt' or NAME.txt); pass --prompt")
        prompts.append(prompt)
    model, tokenizer, processor = load_clip(s.clip_model, _device(s))
    scores = []

    for start in tqdm(range(0, len(records), s.batch_size), desc="clipscore"):
        batch = records[start : start + s.batch_size]
        images = [Image.open(r.path).convert("RGB") for r in batch]
        scores += clip_scores(model, tokenizer, processor, images, prompts[start : start + s.batch_size], len(batch)).tolist()
    mean = sum(scores) / len(scores)
    std = (sum((x - mean) ** 2 for x in scores) / len(scores)) ** 0.5
    result = {
        "metric": "clipscore",
        "clip_model": str(s.clip_model),
        "images": len(scores),
        "mean": mean,
        "std": std,
        "per_image": [{"image": r.relpath(root), "prompt": p, "clipscore": x} for r, p, x in zip(records, prompts, scores)],
    }
    return result, ["images", "CLIPScore mean", "std"], [[len(scores), mean, std]]


# --------------------------------------------------------------------------------------------------- judge


def _judge_client(s):
    # lazy: torch (`lorakit --help` imports this module)
    from lorakit.eval.judge import AnswerCache, JudgeClient, api_key_from_env

    _need(s, "judge", "judge_url", "judge_model")
    cache = Path(s.judge_cache) if s.judge_cache else Path(s.images) / "judge_cache.json"
    return JudgeClient(
        base_url=s.judge_url,
        model=s.judge_model,
        api_key=api_key_from_env(s.judge_key_env),
        timeout=s.timeout,
        retries=s.retries,
        parse_retries=s.parse_retries,
        cache=AnswerCache(cache),
    )


def pair_records(records_a, root_a: Path, records_b, root_b: Path):
    """Pairs (a, b) with the same relative path, or else the same relative path without suffix.

    Returns:
        (pairs, unmatched names of A, unmatched names of B).
    """
    def key(rec, root):
        return rec.relpath(root).rsplit(".", 1)[0]

    by_b = {key(r, root_b): r for r in records_b}
    pairs, lonely_a = [], []
    for rec in records_a:
        other = by_b.pop(key(rec, root_a), None)
        if other is None:
            lonely_a.append(rec.relpath(root_a))
        else:
            pairs.append((rec, other))
    return pairs, lonely_a, sorted(r.relpath(root_b) for r in by_b.values())


def eval_judge_pairwise(s, records, client) -> tuple[dict, list, list]:
    # lazy: torch (`lorakit --help` imports this module)
    from lorakit.eval.judge import CRITERIA, judge_pair, map_items

    _need(s, "judge", "against")
    root_a, root_b = Path(s.images), Path(s.against)
    pairs, lonely_a, lonely_b = pair_records(records, root_a, find_images(root_b, s.recursive), root_b)
    if not pairs:
        raise ValueError(f"no image in {root_a} has a same-name image in {root_b}")
    if lonely_a or lonely_b:
        warn(f"{len(lonely_a)} images of --images and {len(lonely_b)} of --against have no partner; skipped")

    def one(pair):
        a, b = pair
        prompt = s.prompt or a.prompt or b.prompt
        if not prompt:
            raise ValueError(f"{a.path}: no prompt in its sidecar (nor in {b.path}'s); pass --prompt")
        return judge_pair(client, a.path, b.path, prompt, a.concepts or b.concepts)

    results = map_items(one, pairs, s.workers, desc="judge pairwise")
    ok = [r for r in results if not r["failed"]]
    mean = {side: {c: (sum(r[side][c] for r in ok) / len(ok) if ok else None) for c in CRITERIA} for side in ("a", "b")}
    wins_a = sum(r["a"]["composition"] > r["b"]["composition"] for r in ok)
    wins_b = sum(r["a"]["composition"] < r["b"]["composition"] for r in ok)
    result = {
        "metric": "judge",
        "protocol": "pairwise",
        "judge_model": client.model,
        "images_a": str(root_a),
        "images_b": str(root_b),
        "pairs": len(pairs),
        "failed_pairs": len(pairs) - len(ok),
        "unmatched": {"a": lonely_a, "b": lonely_b},
        "mean": mean,
        "composition_wins": {"a": wins_a, "b": wins_b, "ties": len(ok) - wins_a - wins_b},
        "requests": client.requests_made,
        "cache_hits": client.cache.hits,
        "per_pair": [
            {"a": a.relpath(root_a), "b": b.relpath(root_b), **{k: r[k] for k in ("a_first", "b_first", "failed")},
             "scores_a": r["a"], "scores_b": r["b"], **({"answers": r["answers"]} if r["failed"] else {})}
            for (a, b), r in zip(pairs, results)
        ],
    }
    headers = ["images", "composition", "quality", "composition wins", "pairs judged", "failed"]
    rows = [
        [str(root_a), mean["a"]["composition"], mean["a"]["quality"], wins_a, len(ok), len(pairs) - len(ok)],
        [str(root_b), mean["b"]["composition"], mean["b"]["quality"], wins_b, len(ok), len(pairs) - len(ok)],
    ]
    return result, headers, rows


def _yesno_concepts(s, rec):
    if s.subject or s.style:
        out = []
        if s.subject:
            out.append(Concept("subject", "subject", s.subject))
        if s.style:
            out.append(Concept("style", "style", s.style))
        return out
    concepts = rec.concepts
    if not concepts:
        raise ValueError(f"{rec.path}: its sidecar names no 'concepts' or 'adapters'; pass --subject / --style")
    return [_described(c) for c in concepts]


def _described(concept):
    """A concept whose name a registered describer knows (:func:`lorakit.eval.registry.register_describer`, e.g.
    the toy world's trigger words such as ``zorbo``) gets that describer's category and description: an MLLM
    cannot know what a trigger word looks like. Other concepts are returned as they are."""
    if concept.category and concept.description != concept.name:
        return concept
    for describe in DESCRIBERS:
        found = describe(concept.name)
        if found is not None:
            category, description = found
            desc = concept.description if concept.description != concept.name else description
            return Concept(concept.name, concept.category or category, desc)
    return concept


def eval_judge_yesno(s, records, client) -> tuple[dict, list, list]:
    # lazy: torch (`lorakit --help` imports this module)
    from lorakit.eval.judge import judge_presence, map_items
    from lorakit.eval.report import presence_rows, presence_summary

    root = Path(s.images)
    concepts = [_yesno_concepts(s, rec) for rec in records]
    results = map_items(lambda i: judge_presence(client, records[i].path, concepts[i]), range(len(records)),
                        s.workers, desc="judge yes/no")
    categories = {c.name: c.category for cs in concepts for c in cs}
    summary = presence_summary([(r.relpath(root), res["answers"]) for r, res in zip(records, results)], categories)
    result = {
        "metric": "judge",
        "protocol": "yesno",
        "judge_model": client.model,
        "summary": summary,
        "requests": client.requests_made,
        "cache_hits": client.cache.hits,
        "per_image": [
            {"image": r.relpath(root), "answers": res["answers"], "all_present": res["all_present"],
             **({"failed": res["failed"], "raw": res["raw"]} if res["failed"] else {})}
            for r, res in zip(records, results)
        ],
    }
    headers, rows = presence_rows(summary)
    return result, headers, rows


# ----------------------------------------------------------------------------------------------- retention


def eval_retention(s) -> tuple[dict, list, list]:
    # lazy: torch (`lorakit --help` imports this module)
    from lorakit.adapters.io import load_adapter
    from lorakit.eval.retention import ConceptSpec, default_prompts, retention
    from lorakit.models import load_base

    _need(s, "retention", "base", "adapters", "fused")
    if s.prompts and len(s.prompts) != len(s.adapters):
        raise ValueError(f"--prompts has {len(s.prompts)} entries but there are {len(s.adapters)} --adapters; "
                         "give one entry per adapter (several prompts separated by '|')")
    concepts = []
    for i, path in enumerate(s.adapters):
        adapter = load_adapter(path)
        if s.prompts:
            prompts = [p.strip() for p in s.prompts[i].split("|") if p.strip()]
        else:
            prompts = default_prompts(adapter, path)
        concepts.append(ConceptSpec(Path(path).stem, adapter, prompts, str(path)))
    pipe = load_base(s.base).to(_device(s))
    pipe.set_progress_bar_config(disable=True)
    res = retention(pipe, concepts, s.fused, samples=s.samples, seed=s.seed, batch_size=s.batch_size,
                    progress=True)
    result = {"metric": "retention", "base": s.base, "fused": s.fused,
              "adapters": list(s.adapters), **res}
    headers = ["concept", "projection", "cosine", "rel. error", "own change"]
    rows = [[r["name"], r["projection"], r["cosine"], r["rel_error"], r["own_change"]] for r in res["concepts"]]
    m = res["mean"]
    rows.append(["mean", m["projection"], m["cosine"], m["rel_error"], m["own_change"]])
    return result, headers, rows


# ------------------------------------------------------------------------------------------- by metric name


def image_records(s, metric: str):
    """The images of ``s.images`` (with their sidecars) that ``metric`` scores; a named error without --images."""
    _need(s, metric, "images")
    return find_images(s.images, s.recursive)


def clipscore(s) -> Scored:
    return Scored(*eval_clipscore(s, image_records(s, "clipscore")), f"CLIPScore ({s.clip_model})")


def judge(s) -> Scored:
    records = image_records(s, "judge")
    client = _judge_client(s)
    if s.protocol == "pairwise":
        return Scored(*eval_judge_pairwise(s, records, client),
                      f"MLLM judge ({s.judge_model}), pairwise, both orders averaged")
    return Scored(*eval_judge_yesno(s, records, client), f"MLLM judge ({s.judge_model}), yes/no concept presence")


def retention(s) -> Scored:
    return Scored(*eval_retention(s), f"Concept retention of {s.fused}")
