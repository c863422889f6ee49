"""Gradient fusion of 2, 3 and 4 ED-LoRA concepts vs weighted average vs merge, scored by the toy oracle.

Inputs: one ED-LoRA file per toy concept: by default the toy cache's (``tools/train_toy_edloras.py robot frog
tophat mushroom``: ``train_configs/toy_edlora_character.yaml`` with each concept's images and words, cached by
recipe hash like the toy LoRAs), or ``--edloras robot=PATH frog=PATH ...``. For each set (``--sets robot+frog
robot+frog+tophat ...``) one model per method:
  * ``gradient``: ``lorakit.fusion.gradient`` with its defaults; fit prompts ``concept_prompts(c, 4, seed=0)``,
    held-out ``seed=1`` (toy captions with the trigger word replaced by the concept's pseudo-words);
  * ``weighted``: every ED-LoRA loaded (``load_edlora``: its embeddings and routing) with LoRA scale ``1/N``
    (Mix-of-Show's weight fusion: the average of the deltas);
  * ``merge``: the same with scale 1 (the sum of the deltas).
Evaluation: ``--n`` captions of scenes with every concept of the set (random generic backgrounds, prompt rng seed
7), the triggers replaced by pseudo-words; image seeds 5000..; 20 DDIM steps, guidance 4 (the toy defaults). The
oracle scores each image on every concept of the set. JSON lines: per method, each concept's rate and "all
concepts" with Wilson 95% intervals; per method pair, exact McNemar (paired: same captions and seeds).

    python tools/measure_edlora_fusion_toy.py --sets robot+frog robot+frog+tophat --n 96 \
        --cache artifacts/edlora_fusion_toy --chunks 2     # exit 3: call again (one job-lock hold per call)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.eval.stats import mcnemar_exact, wilson  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("gradient", "weighted", "merge")


def words_of(adapter) -> str:
    """The pseudo-words that stand for an ED-LoRA file's concept (its ``lorakit.trigger``)."""
    words = (adapter.metadata.get("lorakit.trigger") or "").strip()
    if not words:
        raise SystemExit("an ED-LoRA file without lorakit.trigger metadata")
    return words


def with_words(prompts: list[str], names: list[str], words: dict[str, str]) -> list[str]:
    """Toy captions with each concept's trigger word replaced by its pseudo-words."""
    from lorakit.toyworld.concepts import get_concept

    out = []
    for p in prompts:
        for n in names:
            p = p.replace(get_concept(n).trigger, words[n])
        out.append(p)
    return out


def fused_pipe(method: str, base, files: dict[str, str], names: list[str], words: dict[str, str]):
    """A copy of ``base`` with the set ``names`` fused by ``method``."""
    from lorakit.adapters.edlora import load_edlora
    from lorakit.adapters.io import load_adapter
    from lorakit.fusion.gradient import Concept, GradientSettings, fuse_gradient
    from lorakit.toyworld.evaluate import concept_prompts

    pipe = copy.deepcopy(base)
    if method == "gradient":
        concepts = []
        for n in names:
            fit = with_words(concept_prompts(n, 4, seed=0), [n], words)
            val = with_words(concept_prompts(n, 4, seed=1), [n], words)
            concepts.append(Concept(n, load_adapter(files[n]), 1.0, fit, list(fit), val, list(val)))
        fuse_gradient(pipe, concepts, GradientSettings(progress=False))
    else:
        scale = 1.0 / len(names) if method == "weighted" else 1.0
        adapter_names = [load_edlora(pipe, files[n], adapter_name=f"c{i}")["adapter_name"]
                         for i, n in enumerate(names)]
        pipe.set_adapters(adapter_names, [scale] * len(names))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(emit, tag: str, names: list[str], first: str, other: str, present: dict) -> None:
    a_all, b_all = present[first].all(1), present[other].all(1)
    rows = [("all", a_all, b_all)] + [(n, present[first][:, j], present[other][:, j]) for j, n in enumerate(names)]
    for on, a, b in rows:
        wins, losses = int((a & ~b).sum()), int((~a & b).sum())
        emit({"set": tag, "compare": f"{first} vs {other}", "on": on, "n": int(a.numel()), "wins": wins,
              "losses": losses, "mcnemar_p": float(f"{mcnemar_exact(wins, losses):.3g}")})


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edloras", nargs="*", default=[], metavar="CONCEPT=PATH",
                    help="ED-LoRA files (default: the toy cache's, tools/train_toy_edloras.py)")
    ap.add_argument("--sets", nargs="+", default=["robot+frog"], help="concept sets a+b[+c...]")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--n", type=int, default=32, help="evaluation images per method and set")
    ap.add_argument("--base", default=str(REPO / "data" / "toy-base"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", help="keep each (set, method) result here and reuse it (resumable runs)")
    ap.add_argument("--chunks", type=int, default=0,
                    help="with --cache: compute at most this many missing (set, method) results, then exit 3 if "
                         "more remain (one job-lock hold per call); 0 = all")
    ap.add_argument("--hold-s", type=float, default=0,
                    help="with --cache: start no further (set, method) once the last one's time no longer fits in "
                         "this many seconds since the start (exit 3); 0 = no limit")
    ap.add_argument("--out", help="also write the JSON lines here")
    return ap


def edlora_files(given: list[str], needed: set[str]) -> dict[str, str]:
    """``{concept: file}``: the ``--edloras`` given, else the toy cache's trained file of each concept."""
    from lorakit.toyworld.edloras import concept_edlora_path
    from lorakit.toyworld.loras import default_cache_dir

    files = dict(kv.split("=", 1) for kv in given)
    for n in sorted(needed - set(files)):
        path = concept_edlora_path(n, default_cache_dir())
        if not path.exists():
            raise SystemExit(f"no ED-LoRA for {n!r}: {path} is missing; train it with "
                             f"python tools/train_toy_edloras.py {n}, or pass --edloras {n}=FILE")
        files[n] = str(path)
    return files


def result_path(cache: str, tag: str, method: str, files: dict[str, str], n: int) -> Path:
    """The cached result of one (set, method): named by the set, method, n and the files' names (hash-named)."""
    import hashlib

    names = tag.split("+")
    key = hashlib.sha256(repr([Path(files[c]).name for c in names] + [method, n]).encode()).hexdigest()[:12]
    return Path(cache) / f"{tag}-{method}-n{n}-{key}.json"


def measure(tag: str, method: str, base, files: dict, words: dict, n: int) -> dict:
    """Fuse one set by one method, generate ``n`` images, score every concept: the row and the presence matrix."""
    from lorakit.toyworld.evaluate import generate
    from lorakit.toyworld.oracle import score

    names = tag.split("+")
    prompts = with_words(many_prompts(names, n), names, words)
    t0 = time.perf_counter()
    pipe = fused_pipe(method, base, files, names, words)
    fuse_s = time.perf_counter() - t0
    s = score(generate(pipe, prompts, seed=5000), names)
    row = {"set": tag, "method": method, "n": len(prompts), "fuse_s": round(fuse_s, 1), "example_prompt": prompts[0]}
    for j, c in enumerate(names + ["all"]):
        k = int(s.present[:, j].sum()) if c != "all" else int(s.present.all(1).sum())
        lo, hi = wilson(k, len(prompts))
        row[c] = {"k": k, "rate": round(k / len(prompts), 4), "ci95": [round(lo, 3), round(hi, 3)]}
    return {"row": row, "present": s.present.int().tolist()}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from lorakit.adapters.io import load_adapter
    from lorakit.fileio import write_text
    from lorakit.models import load_base

    needed = {n for tag in args.sets for n in tag.split("+")}
    files = edlora_files(args.edloras, needed)
    words = {n: words_of(load_adapter(files[n])) for n in needed}
    base = None
    lines, done, last, t_start = [], 0, 0.0, time.monotonic()
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)

    def emit(obj):
        print(json.dumps(obj), flush=True)
        lines.append(obj)

    for tag in args.sets:
        names = tag.split("+")
        present = {}
        for method in args.methods:
            cached = result_path(args.cache, tag, method, files, args.n) if args.cache else None
            if cached is not None and cached.exists():
                res = json.loads(cached.read_text())
            else:
                late = args.hold_s and last and time.monotonic() - t_start + last > args.hold_s
                if (args.chunks and done >= args.chunks) or late:
                    print(f"{tag} {method}: not measured yet; call again to continue", flush=True)
                    return 3
                if base is None:
                    base = load_base(args.base)
                    base.set_progress_bar_config(disable=True)
                t = time.monotonic()
                res = measure(tag, method, base, files, words, args.n)
                done, last = done + 1, time.monotonic() - t
                if cached is not None:
                    write_text(json.dumps(res), cached)
            present[method] = torch.tensor(res["present"], dtype=torch.bool)
            emit(res["row"])
        for other in args.methods[1:]:
            compare(emit, tag, names, args.methods[0], other, present)
    if args.out:
        write_text("".join(json.dumps(x) + "\n" for x in lines), args.out)
    return 0


def many_prompts(names: list[str], n: int, seed: int = 7) -> list[str]:
    """``n`` captions of scenes with every concept of ``names`` (characters and objects)."""
    import numpy as np

    from lorakit.toyworld.concepts import BACKGROUND_COLORS, GENERIC_BACKGROUNDS, get_concept
    from lorakit.toyworld.render import Scene, caption

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kw = dict(background=str(rng.choice(GENERIC_BACKGROUNDS)), bg_color=str(rng.choice(list(BACKGROUND_COLORS))))
        for c in map(get_concept, names):
            key = {"character": "characters", "object": "objects"}.get(c.kind)
            if key is None:
                kw["style" if c.kind == "style" else "background"] = c.name
            else:
                kw[key] = kw.get(key, ()) + (c.name,)
        out.append(caption(Scene(**kw)))
    return out


if __name__ == "__main__":
    sys.exit(main())
