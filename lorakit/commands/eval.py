"""``lorakit eval --metric clipscore|judge|oracle|retention``: score generated images or a fused model.

Every metric writes ``OUT.json`` (settings, summary, per-image results) and ``OUT.md`` (a markdown table) and
prints the table. ``OUT`` defaults to ``IMAGES/eval_<metric>`` (``./eval_retention`` for retention).
"""

from __future__ import annotations

import sys
from pathlib import Path

METRICS = ("clipscore", "judge", "oracle", "retention")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score images (CLIPScore, MLLM judge, toy-world oracle) or a fused model (concept retention)",
        description="Evaluate generated images or a fused/composed model. Images are read from --images with "
        "their sidecars (NAME.json beside NAME.png with at least 'prompt', and 'concepts' or 'adapters'; or a "
        "NAME.txt holding the prompt). Writes OUT.json + OUT.md and prints the table.",
    )
    p.add_argument("--metric", required=True, choices=METRICS, help="what to compute")
    p.add_argument("--images", help="folder of images with sidecars (clipscore, judge, oracle)")
    p.add_argument("--recursive", action="store_true", help="also read images in sub-folders")
    p.add_argument("--out", help="output path without suffix (default: IMAGES/eval_METRIC, ./eval_retention)")
    p.add_argument("--batch-size", type=int, default=16, help="images (or retention samples) per batch (default: 16)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    g = p.add_argument_group("clipscore")
    g.add_argument("--clip-model", default="openai/clip-vit-base-patch16",
                   help="transformers CLIP folder or hub id (default: openai/clip-vit-base-patch16, as in the papers)")
    g.add_argument("--prompt", help="score every image against this prompt instead of its sidecar's")

    g = p.add_argument_group("judge (any OpenAI-compatible chat endpoint: vLLM, ollama, hosted APIs)")
    g.add_argument("--judge-url", help="API base URL, e.g. http://localhost:8000/v1")
    g.add_argument("--judge-model", help="model name the endpoint serves")
    g.add_argument("--judge-key-env", default=None,
                   help="environment variable holding the API key (default: LORAKIT_JUDGE_API_KEY, then OPENAI_API_KEY; none for local servers)")
    g.add_argument("--protocol", choices=["pairwise", "yesno"], default="pairwise",
                   help="pairwise: --images vs --against, composition/quality 0-10 asked in both orders and averaged; "
                   "yesno: one yes/no question per concept per image (default: pairwise)")
    g.add_argument("--against", help="pairwise: the folder of images to compare with (paired by file name)")
    g.add_argument("--subject", help="yesno: ask for this subject in every image (instead of the sidecar concepts)")
    g.add_argument("--style", help="yesno: ask for this style in every image (instead of the sidecar concepts)")
    g.add_argument("--judge-cache", help="answer cache JSON (default: IMAGES/judge_cache.json)")
    g.add_argument("--retries", type=int, default=3, help="transport retries with exponential backoff (default: 3)")
    g.add_argument("--parse-retries", type=int, default=2, help="re-asks after a malformed answer (default: 2)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    g.add_argument("--workers", type=int, default=1, help="parallel requests (default: 1)")

    g = p.add_argument_group("retention")
    g.add_argument("--base", help="base model: diffusers folder, .safetensors checkpoint, hub id or tiny:ARCH")
    g.add_argument("--adapters", nargs="+", help="the concepts' own adapter files")
    g.add_argument("--fused", help="fused model: diffusers folder, adapter file (fused-delta or merged LoRA), "
                   "or merge[:W] (every adapter active at weight W, default 0.8)")
    g.add_argument("--prompts", nargs="+",
                   help="prompts per adapter, in --adapters order, several separated by '|' (default: from each "
                   "adapter's lorakit.trigger: '{trigger}' and 'a picture of {trigger}')")
    g.add_argument("--samples", type=int, default=8, help="noisy latents per concept (default: 8)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noisy latents (default: 0)")
    p.set_defaults(func=run)


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _need(args, *names):
    missing = ["--" + n.replace("_", "-") for n in names if not getattr(args, n)]
    if missing:
        raise ValueError(f"--metric {args.metric} needs {', '.join(missing)}")


def _default_out(args) -> Path:
    if args.out:
        return Path(args.out)
    if args.metric == "retention":
        return Path("eval_retention")
    suffix = f"_{args.protocol}" if args.metric == "judge" else ""
    return Path(args.images) / f"eval_{args.metric}{suffix}"


# ----------------------------------------------------------------------------------------------- clipscore


def eval_clipscore(args, records) -> tuple[dict, list, list]:
    from PIL import Image

    from lorakit.eval.clipscore import clip_scores, load_clip

    root = Path(args.images)
    prompts = []
    for rec in records:
        prompt = args.prompt or rec.prompt
        if not prompt:
            raise ValueError(f"{rec.path}: no prompt (no sidecar NAME.json with 'prompt' or NAME.txt); pass --prompt")
        prompts.append(prompt)
    model, tokenizer, processor = load_clip(args.clip_model, _device(args))
    scores = []
    from lorakit.logs import tqdm

    for s in tqdm(range(0, len(records), args.batch_size), desc="clipscore"):
        batch = records[s : s + args.batch_size]
        images = [Image.open(r.path).convert("RGB") for r in batch]
        scores += clip_scores(model, tokenizer, processor, images, prompts[s : s + args.batch_size], len(batch)).tolist()
    mean = sum(scores) / len(scores)
    std = (sum((x - mean) ** 2 for x in scores) / len(scores)) ** 0.5
    result = {
        "metric": "clipscore",
        "clip_model": str(args.clip_model),
        "images": len(scores),
        "mean": mean,
        "std": std,
        "per_image": [{"image": r.relpath(root), "prompt": p, "clipscore": x} for r, p, x in zip(records, prompts, scores)],
    }
    return result, ["images", "CLIPScore mean", "std"], [[len(scores), mean, std]]


# --------------------------------------------------------------------------------------------------- judge


def _judge_client(args):
    from lorakit.eval.judge import AnswerCache, JudgeClient, api_key_from_env

    _need(args, "judge_url", "judge_model")
    cache = Path(args.judge_cache) if args.judge_cache else Path(args.images) / "judge_cache.json"
    return JudgeClient(
        base_url=args.judge_url,
        model=args.judge_model,
        api_key=api_key_from_env(args.judge_key_env),
        timeout=args.timeout,
        retries=args.retries,
        parse_retries=args.parse_retries,
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


def eval_judge_pairwise(args, records, client) -> tuple[dict, list, list]:
    from lorakit.eval.images import find_images
    from lorakit.eval.judge import CRITERIA, judge_pair, map_items

    _need(args, "against")
    root_a, root_b = Path(args.images), Path(args.against)
    pairs, lonely_a, lonely_b = pair_records(records, root_a, find_images(root_b, args.recursive), root_b)
    if not pairs:
        raise ValueError(f"no image in {root_a} has a same-name image in {root_b}")
    if lonely_a or lonely_b:
        print(f"warning: {len(lonely_a)} images of --images and {len(lonely_b)} of --against have no partner; skipped",
              file=sys.stderr)

    def one(pair):
        a, b = pair
        prompt = args.prompt or a.prompt or b.prompt
        if not prompt:
            raise ValueError(f"{a.path}: no prompt in its sidecar (nor in {b.path}'s); pass --prompt")
        return judge_pair(client, a.path, b.path, prompt, a.concepts or b.concepts)

    results = map_items(one, pairs, args.workers, desc="judge pairwise")
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


def _yesno_concepts(args, rec):
    from lorakit.eval.images import Concept

    if args.subject or args.style:
        out = []
        if args.subject:
            out.append(Concept("subject", "subject", args.subject))
        if args.style:
            out.append(Concept("style", "style", args.style))
        return out
    concepts = rec.concepts
    if not concepts:
        raise ValueError(f"{rec.path}: its sidecar names no 'concepts' or 'adapters'; pass --subject / --style")
    return [_described(c) for c in concepts]


def _described(concept):
    """A concept named by a toy-world trigger word (``zorbo``) gets the toy world's kind and description (an MLLM
    cannot know what a trigger word looks like). Only the nonsense trigger words match, never plain names like
    ``ink`` that a user's own LoRA may use. Other concepts are returned as they are."""
    from lorakit.eval.images import Concept

    if concept.category and concept.description != concept.name:
        return concept
    try:
        from lorakit.toyworld.concepts import BY_TRIGGER
    except ImportError:
        return concept
    toy = BY_TRIGGER.get(concept.name)
    if toy is None:
        return concept
    desc = concept.description if concept.description != concept.name else (toy.description or toy.name)
    return Concept(concept.name, concept.category or toy.kind, desc)


def eval_judge_yesno(args, records, client) -> tuple[dict, list, list]:
    from lorakit.eval.judge import map_items, judge_presence
    from lorakit.eval.report import presence_rows, presence_summary

    root = Path(args.images)
    concepts = [_yesno_concepts(args, rec) for rec in records]
    results = map_items(lambda i: judge_presence(client, records[i].path, concepts[i]), range(len(records)),
                        args.workers, desc="judge yes/no")
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


# -------------------------------------------------------------------------------------------------- oracle


def eval_oracle(args, records) -> tuple[dict, list, list]:
    from PIL import Image

    from lorakit.eval.report import presence_rows, presence_summary

    try:
        from lorakit.eval.oracle import score
        from lorakit.toyworld.concepts import get_concept
    except ImportError as err:
        raise ValueError(f"--metric oracle needs the toy world (lorakit.eval.oracle, lorakit.toyworld), which is not "
                         f"available in this install: {err}") from err
    root = Path(args.images)
    wanted = []  # per image: toy-world concepts (sidecar names and triggers resolved to oracle names)
    for rec in records:
        if not rec.concepts:
            raise ValueError(f"{rec.path}: its sidecar names no 'concepts' or 'adapters' for the oracle to look for")
        try:
            wanted.append(list(dict.fromkeys(get_concept(c.name) for c in rec.concepts)))
        except ValueError as err:
            raise ValueError(f"{rec.path}: {err}") from err
    verdicts = []
    for s in range(0, len(records), args.batch_size):
        batch = records[s : s + args.batch_size]
        union = list(dict.fromkeys(c.name for cs in wanted[s : s + len(batch)] for c in cs))
        result = score([Image.open(r.path).convert("RGB") for r in batch], union)
        for i, cs in enumerate(wanted[s : s + len(batch)]):
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


# ----------------------------------------------------------------------------------------------- retention


def eval_retention(args) -> tuple[dict, list, list]:
    from lorakit.adapters.io import load_adapter
    from lorakit.eval.retention import ConceptSpec, default_prompts, retention
    from lorakit.models import load_base

    _need(args, "base", "adapters", "fused")
    if args.prompts and len(args.prompts) != len(args.adapters):
        raise ValueError(f"--prompts has {len(args.prompts)} entries but there are {len(args.adapters)} --adapters; "
                         "give one entry per adapter (several prompts separated by '|')")
    concepts = []
    for i, path in enumerate(args.adapters):
        adapter = load_adapter(path)
        if args.prompts:
            prompts = [p.strip() for p in args.prompts[i].split("|") if p.strip()]
        else:
            prompts = default_prompts(adapter, path)
        concepts.append(ConceptSpec(Path(path).stem, adapter, prompts, str(path)))
    pipe = load_base(args.base).to(_device(args))
    pipe.set_progress_bar_config(disable=True)
    res = retention(pipe, concepts, args.fused, samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                    progress=True)
    result = {"metric": "retention", "base": args.base, "fused": args.fused,
              "adapters": list(args.adapters), **res}
    headers = ["concept", "projection", "cosine", "rel. error", "own change"]
    rows = [[r["name"], r["projection"], r["cosine"], r["rel_error"], r["own_change"]] for r in res["concepts"]]
    m = res["mean"]
    rows.append(["mean", m["projection"], m["cosine"], m["rel_error"], m["own_change"]])
    return result, headers, rows


def run(args) -> int:
    from lorakit.eval.images import find_images
    from lorakit.eval.report import write_report

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.metric == "retention" or args.images:
        from lorakit.eval.report import check_report_paths

        check_report_paths(_default_out(args))  # before any scoring (a judge run costs money)
    if args.metric == "retention":
        result, headers, rows = eval_retention(args)
        title = f"Concept retention of {args.fused}"
    else:
        _need(args, "images")
        records = find_images(args.images, args.recursive)
        if args.metric == "clipscore":
            result, headers, rows = eval_clipscore(args, records)
            title = f"CLIPScore ({args.clip_model})"
        elif args.metric == "oracle":
            result, headers, rows = eval_oracle(args, records)
            title = "Toy-world oracle: concept presence"
        else:
            client = _judge_client(args)
            if args.protocol == "pairwise":
                result, headers, rows = eval_judge_pairwise(args, records, client)
                title = f"MLLM judge ({args.judge_model}), pairwise, both orders averaged"
            else:
                result, headers, rows = eval_judge_yesno(args, records, client)
                title = f"MLLM judge ({args.judge_model}), yes/no concept presence"
    js, md = write_report(result, _default_out(args), title, headers, rows)
    print(md.read_text())
    print(f"wrote {js} and {md}")
    return 0
