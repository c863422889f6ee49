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

``--world v2``: toy world v2 (64x64) with its ED-LoRAs (``tools/train_toy2_loras.py --adapter edlora``, cache
``--edlora-cache``), its base (``--base``, default ``data/toy2-base``) and its oracle (``--oracle``, default
``data/toy2-oracle``); a cached result is keyed by the base's and the oracle's weights. Sets of the character and object identities
(``zorbo+kwibbit``, ``zorbo+kwibbit+hattock``, ``zorbo+kwibbit+hattock+shroomel``; at most two characters, as a v2
scene holds). Fit / held-out prompts: ``identity_prompts(c, 4, seed=0 / 1)`` (v2 training-style captions, ``zorbo
robot, ...``); evaluation: ``--n`` captions of one scene with every identity of the set on a random generic
background (prompt rng seed 7), each identity word replaced by its pseudo-words (``<zorbo1> <zorbo2> robot, ...``);
image seeds 5000..; 20 DDIM steps, guidance 4, 64x64. The v2 oracle scores each identity (an identity, not its class);
a last row per set, ``oracle_on_renders``, scores renders of the evaluation scenes themselves (the ceiling).

    python tools/measure_edlora_fusion_toy.py --world v2 \
        --edlora-cache artifacts/edlora_v2 --sets zorbo+kwibbit --n 96 --cache artifacts/edlora_v2/fusion --chunks 1

``--eval single`` (v2): Mix-of-Show's test of a fused model, one identity at a time. For each identity of the set,
``--n`` images of prompts naming only that identity (``<zorbo1> <zorbo2> robot, white plain background``: every
generic-background caption of the identity alone, less those gradient fusion fits or validates on; image ``i``
takes caption ``i mod len`` and seed ``5000 + i``), the same (prompt, seed) pairs for every method and every set;
the oracle scores that identity. Rows per (set, method): each identity's rate and the rate pooled over the set's
identities, with Wilson 95% intervals; exact McNemar per identity and pooled on the same pairs; and ``unfused``,
each identity's own ED-LoRA alone (scale 1): the ceiling. Cached per (set, method, identity).
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


def with_words(prompts: list[str], names: list[str], words: dict[str, str], world: str = "v1") -> list[str]:
    """Toy captions with each concept's caption word (v1: its trigger; v2: the identity's name) replaced by its
    pseudo-words."""
    out = []
    for p in prompts:
        for n in names:
            p = p.replace(caption_word(n, world), words[n])
        out.append(p)
    return out


def caption_word(name: str, world: str = "v1") -> str:
    """The word that names concept ``name`` in the toy captions of ``world``."""
    from lorakit.toyworld.concepts import get_concept

    return get_concept(name).trigger if world == "v1" else name


def fit_prompts(name: str, seed: int, world: str = "v1", n: int = 4) -> list[str]:
    """``n`` training-style captions of one concept (with its caption word): gradient fusion's fit (seed 0) and
    held-out (seed 1) prompts."""
    if world == "v1":
        from lorakit.toyworld.evaluate import concept_prompts

        return concept_prompts(name, n, seed=seed)
    from lorakit.toyworld.v2.evaluate import identity_prompts

    return [with_trigger for with_trigger, _, _ in identity_prompts(name, n, seed=seed)]


def fused_pipe(method: str, base, files: dict[str, str], names: list[str], words: dict[str, str],
               world: str = "v1"):
    """A copy of ``base`` with the set ``names`` fused by ``method``."""
    from lorakit.adapters.edlora import load_edlora
    from lorakit.adapters.io import load_adapter
    from lorakit.fusion.gradient import Concept, GradientSettings, fuse_gradient

    pipe = copy.deepcopy(base)
    if method == "gradient":
        concepts = []
        for n in names:
            fit = with_words(fit_prompts(n, 0, world), [n], words, world)
            val = with_words(fit_prompts(n, 1, world), [n], words, world)
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
    ap.add_argument("--methods", nargs="+", choices=(*METHODS, "unfused"),
                    help=f"default: {' '.join(METHODS)} (--eval single: and unfused, each ED-LoRA alone); the first "
                         "is compared with each other")
    ap.add_argument("--n", type=int, default=32, help="evaluation images per method and set")
    ap.add_argument("--world", choices=("v1", "v2"), default="v1", help="toy world (default v1)")
    ap.add_argument("--base", help="base pipeline (default: data/toy-base for v1, data/toy2-base for v2)")
    ap.add_argument("--oracle", help="v2 oracle folder (default: data/toy2-oracle; v1 uses data/oracle)")
    ap.add_argument("--edlora-cache", help="v2: the ED-LoRA cache of tools/train_toy2_loras.py --adapter edlora")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", help="keep each (set, method) result here and reuse it (resumable runs)")
    ap.add_argument("--chunks", type=int, default=0,
                    help="with --cache: compute at most this many missing (set, method) results, then exit 3 if "
                         "more remain (one job-lock hold per call); 0 = all")
    ap.add_argument("--hold-s", type=float, default=0,
                    help="with --cache: start no further (set, method) once the last one's time no longer fits in "
                         "this many seconds since the start (exit 3); 0 = no limit")
    ap.add_argument("--eval", choices=("scenes", "single"), default="scenes",
                    help="scenes: captions of one scene with every concept of the set (default); single (v2): "
                         "each identity alone, held-out generic captions (Mix-of-Show's evaluation)")
    ap.add_argument("--out", help="also write the JSON lines here")
    return ap


def edlora_files(given: list[str], needed: set[str], v2_cache: str | None = None,
                 v2_base: str | None = None) -> dict[str, str]:
    """``{concept: file}``: the ``--edloras`` given, else the cache's trained file of each concept (v1: the toy
    cache; v2 when ``v2_cache`` is given: ``tools/train_toy2_loras.py --adapter edlora``'s, on ``v2_base``)."""
    files = dict(kv.split("=", 1) for kv in given)
    for n in sorted(needed - set(files)):
        if v2_cache is None:
            from lorakit.toyworld.edloras import concept_edlora_path
            from lorakit.toyworld.loras import default_cache_dir

            path, train = concept_edlora_path(n, default_cache_dir()), f"python tools/train_toy_edloras.py {n}"
        else:
            from lorakit.toyworld.v2.edloras import edlora_path

            path = edlora_path(n, v2_cache, v2_base)
            train = (f"python tools/train_toy2_loras.py --adapter edlora --base {v2_base} --out {v2_cache} "
                     f"--identities {n}")
        if not path.exists():
            raise SystemExit(f"no ED-LoRA for {n!r}: {path} is missing; train it with {train}, "
                             f"or pass --edloras {n}=FILE")
        files[n] = str(path)
    return files


def result_path(cache: str, tag: str, method: str, files: dict[str, str], n: int, extra: tuple = ()) -> Path:
    """The cached result of one (set, method): named by the set, method, n and the files' names (hash-named);
    ``extra`` (v2: hashes of the base's and the oracle's weights) goes into the key too."""
    import hashlib

    names = tag.split("+")
    key = hashlib.sha256(repr([Path(files[c]).name for c in names] + [method, n, *extra]).encode()).hexdigest()[:12]
    return Path(cache) / f"{tag}-{method}-n{n}-{key}.json"


def measure(tag: str, method: str, base, files: dict, words: dict, n: int, world: str = "v1",
            oracle=None) -> dict:
    """Fuse one set by one method, generate ``n`` images, score every concept: the row and the presence matrix.
    ``oracle``: v2's loaded oracle (v1 uses the bundled one)."""
    from lorakit.toyworld.evaluate import generate

    names = tag.split("+")
    prompts = with_words(set_prompts(names, n, world), names, words, world)
    t0 = time.perf_counter()
    pipe = fused_pipe(method, base, files, names, words, world)
    fuse_s = time.perf_counter() - t0
    if world == "v1":
        from lorakit.toyworld.oracle import score

        s = score(generate(pipe, prompts, seed=5000), names)
    else:
        s = oracle.score(generate(pipe, prompts, seed=5000, height=64, width=64), names)
    row = {"set": tag, "method": method, "n": len(prompts), "fuse_s": round(fuse_s, 1), "example_prompt": prompts[0]}
    if world != "v1":
        row["world"] = world
    for j, c in enumerate(names + ["all"]):
        k = int(s.present[:, j].sum()) if c != "all" else int(s.present.all(1).sum())
        lo, hi = wilson(k, len(prompts))
        row[c] = {"k": k, "rate": round(k / len(prompts), 4), "ci95": [round(lo, 3), round(hi, 3)]}
    return {"row": row, "present": s.present.int().tolist()}


def _inputs(args, needed: set[str]):
    """The ED-LoRA files and their words, the base folder, the cache-key extras and the oracle (v2) of a run."""
    from lorakit.adapters.io import load_adapter

    v2 = args.world == "v2"
    for tag in args.sets:
        check_set(tag.split("+"), args.world)
    extra, oracle = v2_inputs(args, needed) if v2 else ((), None)
    files = edlora_files(args.edloras, needed, args.edlora_cache if v2 else None, args.base)
    words = {n: words_of(load_adapter(files[n])) for n in needed}
    base_dir = args.base or str(REPO / "data" / "toy-base")
    return files, words, base_dir, extra, oracle


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from lorakit.fileio import write_text
    from lorakit.models import load_base

    needed = {n for tag in args.sets for n in tag.split("+")}
    if args.eval == "single" and args.world != "v2":
        raise ValueError("--eval single needs --world v2")
    if args.methods is None:
        args.methods = [*METHODS, "unfused"] if args.eval == "single" else list(METHODS)
    if "unfused" in args.methods and args.eval != "single":
        raise ValueError("--methods unfused needs --eval single")
    files, words, base_dir, extra, oracle = _inputs(args, needed)
    if args.eval == "single":
        return run_single(args, files, words, base_dir, extra, oracle)
    base = None
    lines, done, last, t_start = Rows(), 0, 0.0, time.monotonic()
    emit = lines.emit
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)

    for tag in args.sets:
        names = tag.split("+")
        present = {}
        for method in args.methods:
            cached = result_path(args.cache, tag, method, files, args.n, extra) if args.cache else None
            if cached is not None and cached.exists():
                res = json.loads(cached.read_text())
            else:
                late = args.hold_s and last and time.monotonic() - t_start + last > args.hold_s
                if (args.chunks and done >= args.chunks) or late:
                    print(f"{tag} {method}: not measured yet; call again to continue", flush=True)
                    return 3
                if base is None:
                    base = load_base(base_dir)
                    base.set_progress_bar_config(disable=True)
                t = time.monotonic()
                res = measure(tag, method, base, files, words, args.n, args.world, oracle)
                done, last = done + 1, time.monotonic() - t
                if cached is not None:
                    write_text(json.dumps(res), cached)
            present[method] = torch.tensor(res["present"], dtype=torch.bool)
            emit(res["row"])
        for other in args.methods[1:]:
            compare(emit, tag, names, args.methods[0], other, present)
        if oracle is not None:
            emit(oracle_ceiling(tag, args.n, oracle))
    if args.out:
        write_text("".join(json.dumps(x) + "\n" for x in lines), args.out)
    return 0


def single_prompts(name: str, n: int) -> list[str]:
    """``n`` v2 captions naming only identity ``name`` (its caption word + class + a generic background): every
    ``<colour> <generic> background`` caption of it alone, less gradient fusion's fit and held-out prompts
    (``fit_prompts(name, 0 / 1)``), repeated in order up to ``n``."""
    from lorakit.toyworld.concepts import BACKGROUND_COLORS, GENERIC_BACKGROUNDS
    from lorakit.toyworld.v2.concepts import get_concept
    from lorakit.toyworld.v2.render import Scene, caption

    c = get_concept(name)
    kw = ({"characters": (name,)} if c.kind == "character" else {"hat" if c.cls == "hat" else "mushroom": name})
    seen = set(fit_prompts(name, 0, "v2") + fit_prompts(name, 1, "v2"))
    pool = [p for bg in GENERIC_BACKGROUNDS for colour in BACKGROUND_COLORS
            if (p := caption(Scene(background=bg, bg_color=colour, **kw))) not in seen]
    return [pool[i % len(pool)] for i in range(n)]


def single_path(cache: str, tag: str, method: str, name: str, files: dict[str, str], n: int, extra: tuple) -> Path:
    """The cached presence of identity ``name`` under ``method``'s fusion of set ``tag`` (``unfused``: its own
    ED-LoRA alone, whatever the set)."""
    import hashlib

    names = [name] if method == "unfused" else tag.split("+")
    key = hashlib.sha256(repr([Path(files[c]).name for c in names] + [method, n, "single", name, *extra]).encode())
    prefix = name if method == "unfused" else f"{tag}-{method}-{name}"
    return Path(cache) / f"{prefix}-{'unfused-' if method == 'unfused' else ''}single-n{n}-{key.hexdigest()[:12]}.json"


def rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": round(k / n, 4), "ci95": [round(lo, 3), round(hi, 3)]}


def single_row(tag: str, method: str, kept: dict[str, list[int]], example: str) -> dict:
    """One (set, method)'s row: each identity's rate and the rate pooled over the set's identities."""
    pooled = [x for v in kept.values() for x in v]
    return {"set": tag, "method": method, "eval": "single", "world": "v2", "example_prompt": example,
            **{c: rate(sum(v), len(v)) for c, v in kept.items()}, "pooled": rate(sum(pooled), len(pooled))}


class Rows(list):
    """The JSON lines of a run: each printed as it comes and kept for ``--out``."""

    def emit(self, obj: dict) -> None:
        print(json.dumps(obj), flush=True)
        self.append(obj)


def run_single(args, files, words, base_dir, extra, oracle) -> int:
    """``--eval single``: every (set, method), then ``unfused``, one identity at a time (cached per identity)."""
    from lorakit.fileio import write_text
    from lorakit.models import load_base
    from lorakit.toyworld.evaluate import generate

    lines, done, last, t_start, base = Rows(), 0, 0.0, time.monotonic(), None
    emit = lines.emit
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)

    for tag in args.sets:
        names = tag.split("+")
        kept = {}
        for method in args.methods:
            kept[method], pipe, example = {}, None, None
            for name in names:
                prompts = with_words(single_prompts(name, args.n), [name], words, "v2")
                example = example or prompts[0]
                path = single_path(args.cache, tag, method, name, files, args.n, extra) if args.cache else None
                if path is not None and path.exists():
                    kept[method][name] = json.loads(path.read_text())["kept"]
                    continue
                late = args.hold_s and last and time.monotonic() - t_start + last > args.hold_s
                if (args.chunks and done >= args.chunks) or late:
                    print(f"{tag} {method} {name}: not measured yet; call again to continue", flush=True)
                    return 3
                t = time.monotonic()
                if base is None:
                    base = load_base(base_dir)
                    base.set_progress_bar_config(disable=True)
                if pipe is None or method == "unfused":
                    pipe = fused_pipe("merge" if method == "unfused" else method, base, files,
                                      [name] if method == "unfused" else names, words, "v2")
                images = generate(pipe, prompts, seed=5000, height=64, width=64)
                kept[method][name] = oracle.score(images, [name]).present[:, 0].int().tolist()
                done, last = done + 1, time.monotonic() - t
                if path is not None:
                    write_text(json.dumps({"set": tag, "method": method, "identity": name, "prompts": prompts,
                                           "kept": kept[method][name]}), path)
            emit(single_row(tag, method, kept[method], example))
        for other in args.methods[1:]:
            compare_single(emit, tag, args.methods[0], other, kept)
    if args.out:
        write_text("".join(json.dumps(x) + "\n" for x in lines), args.out)
    return 0


def compare_single(emit, tag: str, first: str, other: str, kept: dict) -> None:
    """Exact McNemar of ``first`` against ``other`` per identity and pooled, on the same (prompt, seed) pairs."""
    names = list(kept[first])
    a = {c: torch.tensor(kept[first][c], dtype=torch.bool) for c in names}
    b = {c: torch.tensor(kept[other][c], dtype=torch.bool) for c in names}
    a["pooled"], b["pooled"] = torch.cat([a[c] for c in names]), torch.cat([b[c] for c in names])
    for on in [*names, "pooled"]:
        wins, losses = int((a[on] & ~b[on]).sum()), int((~a[on] & b[on]).sum())
        emit({"set": tag, "eval": "single", "compare": f"{first} vs {other}", "on": on, "n": int(a[on].numel()),
              "wins": wins, "losses": losses, "mcnemar_p": float(f"{mcnemar_exact(wins, losses):.3g}")})


def v2_inputs(args, needed: set[str]):
    """``--world v2``: fill ``args.base`` / ``args.oracle`` with the bundled defaults; ``(cache-key extra: hashes
    of the base's and the oracle's weights, the loaded oracle)``."""
    from lorakit.toyworld.loras import content_hash, tree_hash
    from lorakit.toyworld.v2.models import DEFAULT_BASE
    from lorakit.toyworld.v2.oracle import DEFAULT_ORACLE, Oracle

    args.base, args.oracle = args.base or str(DEFAULT_BASE), args.oracle or str(DEFAULT_ORACLE)
    if not args.edlora_cache and not needed <= {kv.split("=", 1)[0] for kv in args.edloras}:
        raise SystemExit("--world v2 needs --edlora-cache (or --edloras for every identity of the sets)")
    return (content_hash({}, Path(args.base)), tree_hash(Path(args.oracle))), Oracle.load(args.oracle)


def check_set(names: list[str], world: str) -> None:
    """SystemExit naming the set unless its concepts fit in one scene of ``world``."""
    if len(set(names)) != len(names) or len(names) < 2:
        raise SystemExit(f"set {'+'.join(names)}: expected 2 or more different concepts")
    if world == "v2":
        from lorakit.toyworld.v2.edloras import EDLORA_IDENTITIES

        bad = [n for n in names if n not in EDLORA_IDENTITIES]
        if bad:
            raise SystemExit(f"set {'+'.join(names)}: {', '.join(bad)} not a v2 ED-LoRA identity "
                             f"({', '.join(EDLORA_IDENTITIES)})")
        from lorakit.toyworld.v2.concepts import get_concept

        kinds = [get_concept(n).kind == "character" for n in names]
        if sum(kinds) > 2:
            raise SystemExit(f"set {'+'.join(names)}: a v2 scene holds at most two characters")


def set_prompts(names: list[str], n: int, world: str = "v1", seed: int = 7) -> list[str]:
    """``n`` captions of scenes with every concept of ``names`` (with their caption words)."""
    return many_prompts(names, n, seed) if world == "v1" else many_prompts_v2(names, n, seed)


def many_prompts_v2(names: list[str], n: int, seed: int = 7) -> list[str]:
    """``n`` v2 captions of one scene with every identity of ``names`` (:func:`set_scenes_v2`)."""
    from lorakit.toyworld.v2.render import caption

    return [caption(s) for s in set_scenes_v2(names, n, seed)]


def set_scenes_v2(names: list[str], n: int, seed: int = 7) -> list:
    """``n`` v2 scenes with every identity of ``names`` (characters left to right in the given order, the hat and
    the mushroom identities) on a random generic background."""
    import numpy as np

    from lorakit.toyworld.concepts import BACKGROUND_COLORS, GENERIC_BACKGROUNDS
    from lorakit.toyworld.v2.concepts import get_concept
    from lorakit.toyworld.v2.render import Scene

    kw = {"characters": tuple(c for c in names if get_concept(c).kind == "character")}
    for c in names:
        if get_concept(c).kind == "object":
            kw["hat" if get_concept(c).cls == "hat" else "mushroom"] = c
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bg = str(GENERIC_BACKGROUNDS[int(rng.integers(len(GENERIC_BACKGROUNDS)))])
        colours = list(BACKGROUND_COLORS)
        colour = colours[int(rng.integers(len(colours)))]
        out.append(Scene(background=bg, bg_color=colour, seed=int(rng.integers(2**31)), **kw))
    return out


def oracle_ceiling(tag: str, n: int, oracle) -> dict:
    """The v2 oracle on renders of the evaluation scenes themselves: how often it finds each identity when the
    image is exactly what the caption says (the best any fusion can score)."""
    from lorakit.toyworld.v2.render import render

    names = tag.split("+")
    s = oracle.score([render(sc) for sc in set_scenes_v2(names, n)], names)
    row = {"set": tag, "method": "oracle_on_renders", "n": n, "world": "v2"}
    for j, c in enumerate(names + ["all"]):
        k = int(s.present[:, j].sum()) if c != "all" else int(s.present.all(1).sum())
        lo, hi = wilson(k, n)
        row[c] = {"k": k, "rate": round(k / n, 4), "ci95": [round(lo, 3), round(hi, 3)]}
    return row


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
    from lorakit.errors import script_main

    sys.exit(script_main(main, "measure_edlora_fusion_toy"))
