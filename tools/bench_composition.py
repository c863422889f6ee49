"""Our ComposLoRA on the toy world: how often each composition method shows ALL the concepts of a set.

Composition sets: one held-out character plus 1-3 of {object, style, background} (one concept per category),
so N = 2..4 LoRAs; every combination (78 sets) or a seeded sample of ``--sets-per-size`` per N. Every method
generates K images per set with fixed seeds (the same seeds for every method), the toy-world oracle says which
of the set's concepts each image shows, and the table is method x N -> all-concepts-present rate, presence per
category, seconds per image (sampling only; a fusion method's one-off fuse time per set is reported apart).

Methods: merge (all adapters at --merge-weight, the reference's 0.8), switch, composite, cmlora (sampling time,
``lorakit.sampling``); gradient (Mix-of-Show gradient fusion -> fused pipeline) and weighted (average of the
deltas) through ``lorakit fuse``; lorarar (``lorakit fuse --method lorarar --hypernet H``) for the
character + style pairs only.

Inputs: the toy base (``data/toy-base``), one trained LoRA per held-out concept in ``--adapters-dir`` (found by
their ``lorakit.trigger``; ``.ci/run`` trains them from ``train_configs/toy_*.yaml``), the oracle
(``data/oracle``) and, for lorarar, a trained hypernetwork.

    python tools/bench_composition.py --adapters-dir artifacts/adapters --k 4 --sets-per-size 6
    python tools/bench_composition.py --dry-run          # list the sets and prompts, check the inputs

Writes ``OUT/results.jsonl`` (one JSON line per method x set), ``OUT/summary.json``, ``OUT/table.md`` and the
images with sidecars under ``OUT/images/<method>/n<N>/`` (so ``lorakit eval --metric judge`` can score them too).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLING_METHODS = ("merge", "switch", "composite", "cmlora")
FUSION_METHODS = ("gradient", "weighted")
ALL_METHODS = SAMPLING_METHODS + FUSION_METHODS + ("lorarar",)
CATEGORIES = ("object", "style", "background")


# ---------------------------------------------------------------------------------------------------- sets


def composition_sets(sizes=(2, 3, 4), per_size: int | None = None, seed: int = 0) -> list[dict]:
    """Every set of one character + one concept from each of N-1 of the categories object/style/background.

    Returns:
        ``[{"id", "n", "concepts": {category: name}, "prompt"}]``; with ``per_size``, a seeded sample of that many
        sets per N (all of them when there are fewer).
    """
    import numpy as np

    from lorakit.toyworld.concepts import HELDOUT
    from lorakit.toyworld.render import Scene, caption

    by_kind = {k: [c.name for c in HELDOUT if c.kind == k] for k in ("character", *CATEGORIES)}
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        if not 2 <= n <= 1 + len(CATEGORIES):
            raise ValueError(f"set size {n}: expected 2..{1 + len(CATEGORIES)} (a character and 1-3 other categories)")
        sets = []
        for cats in itertools.combinations(CATEGORIES, n - 1):
            for char in by_kind["character"]:
                for picks in itertools.product(*(by_kind[c] for c in cats)):
                    sets.append({"character": char, **dict(zip(cats, picks))})
        if per_size is not None and per_size < len(sets):
            sets = [sets[i] for i in sorted(rng.choice(len(sets), per_size, replace=False))]
        for concepts in sets:
            scene = Scene(characters=(concepts["character"],), objects=tuple(v for k, v in concepts.items() if k == "object"),
                          style=concepts.get("style"), background=concepts.get("background", "plain"))
            set_id = f"n{n}-" + "-".join(concepts.values())
            out.append({"id": set_id, "n": n, "concepts": concepts, "prompt": caption(scene)})
    return out


# -------------------------------------------------------------------------------------------------- inputs


def find_adapters(folder: Path) -> dict[str, Path]:
    """``{toy concept name: adapter file}`` for every ``.safetensors`` under ``folder`` whose ``lorakit.trigger``
    is a held-out concept's trigger word (the newest file wins when several match)."""
    from safetensors import safe_open

    from lorakit.toyworld.concepts import BY_TRIGGER

    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime):
        try:
            with safe_open(str(path), framework="pt") as f:
                trigger = (f.metadata() or {}).get("lorakit.trigger")
        except Exception:  # noqa: BLE001 - not an adapter we can read: ignore it here
            continue
        if trigger in BY_TRIGGER:
            found[BY_TRIGGER[trigger].name] = path
    return found


def missing_inputs(args, sets) -> list[str]:
    """Everything the run needs that is not there, as readable lines (empty when all is present)."""
    missing = []
    for module, names in (
        ("lorakit.toyworld.concepts", ("HELDOUT", "BY_TRIGGER")),
        ("lorakit.toyworld.render", ("Scene", "caption")),
        ("lorakit.sampling", ("SamplerSettings", "generate", "load_adapters", "load_pipeline", "profile_adapters",
                              "order_by_frequency", "ProfileSettings")),
        ("lorakit.eval.oracle", ("score",)),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            missing.append(f"python module {module} ({err})")
            continue
        gone = [n for n in names if not hasattr(mod, n)]
        if gone:
            missing.append(f"{module}: no {', '.join(gone)}")
    if any(m in args.methods for m in FUSION_METHODS + ("lorarar",)):
        try:
            importlib.import_module("lorakit.commands.fuse")
        except ImportError as err:
            missing.append(f"lorakit fuse command (lorakit.commands.fuse: {err})")
    base = Path(args.base)
    if not args.base.startswith("tiny:") and not (base / "model_index.json").exists():
        missing.append(f"toy base model {base} (build it with tools/train_toy_base.py)")
    if not args.no_score:
        oracle_dir = Path(args.oracle) if args.oracle else ROOT / "data" / "oracle"
        if not (oracle_dir / "config.json").exists() or not (oracle_dir / "oracle.safetensors").exists():
            missing.append(f"oracle weights in {oracle_dir} (build them with tools/train_oracle.py), or pass --no-score")
    if "lorarar" in args.methods and not (args.hypernet and Path(args.hypernet).exists()):
        missing.append("a LoRA.rar hypernetwork for --methods lorarar (--hypernet FILE, from train_lorarar.py)")
    adapters_dir = Path(args.adapters_dir)
    if not adapters_dir.is_dir():
        missing.append(f"adapter folder {adapters_dir} (train the toy LoRAs: python train_blockwise.py "
                       "--config train_configs/toy_<concept>.yaml)")
    else:
        have = find_adapters(adapters_dir)
        need = sorted({c for s in sets for c in s["concepts"].values()})
        lacking = [c for c in need if c not in have]
        if lacking:
            missing.append(f"adapters in {adapters_dir} for {', '.join(lacking)} (no .safetensors with their "
                           "trigger in lorakit.trigger; recipes: train_configs/toy_<concept>.yaml)")
    return missing


# ------------------------------------------------------------------------------------------------- methods


def _save(images, set_, method, seeds, out: Path) -> None:
    from lorakit.fileio import write_json

    folder = out / "images" / method / f"n{set_['n']}"
    folder.mkdir(parents=True, exist_ok=True)
    for img, seed in zip(images, seeds):
        stem = f"{set_['id']}-s{seed}"
        img.save(folder / f"{stem}.png")
        write_json({"prompt": set_["prompt"], "seed": seed, "method": method,
                    "concepts": [{"name": v, "category": k} for k, v in set_["concepts"].items()]},
                   folder / f"{stem}.json")


class SamplingRunner:
    """merge / switch / composite / cmlora on one base pipeline with every concept's adapter loaded once."""

    def __init__(self, args, adapter_files: dict[str, Path]):
        from lorakit.sampling import ProfileSettings, load_adapters, load_pipeline, profile_adapters

        self.args = args
        self.pipe = load_pipeline(args.base)
        names = sorted(adapter_files)
        self.loaded = dict(zip(names, load_adapters(self.pipe, [adapter_files[n] for n in names])))
        self.scores = {}
        if "cmlora" in args.methods:
            prof = ProfileSettings(base=args.base, prompt="a picture", negative_prompt="", steps=args.steps, cfg=args.cfg,
                                   seeds=(0, 1), width=None, height=None, scheduler=None)
            profiles = profile_adapters(self.pipe, list(self.loaded.values()), prof, progress=False)
            self.scores = {n: profiles[a.name]["score"] for n, a in self.loaded.items()}

    def run(self, method: str, set_: dict, seeds: list[int]):
        from dataclasses import replace

        from lorakit.sampling import SamplerSettings, generate, order_by_frequency

        names = list(set_["concepts"].values())  # the character first (switch starts with it)
        adapters = [self.loaded[n] for n in names]
        if method == "merge":
            adapters = [replace(a, weight=self.args.merge_weight) for a in adapters]
        order = order_by_frequency([self.scores[n] for n in names])[0] if method == "cmlora" else None
        settings = SamplerSettings(method=method, steps=self.args.steps, cfg=self.args.cfg)
        t0 = time.perf_counter()
        images, _ = generate(self.pipe, adapters, settings, set_["prompt"], None, seeds, order=order)
        return images, time.perf_counter() - t0, {}


class FusionRunner:
    """gradient / weighted / lorarar: ``lorakit fuse`` per set, then plain sampling of the fused result."""

    def __init__(self, args, adapter_files: dict[str, Path], work: Path):
        self.args, self.files, self.work = args, adapter_files, work

    def run(self, method: str, set_: dict, seeds: list[int]):
        from lorakit.cli import main as lorakit
        from lorakit.sampling import SamplerSettings, generate, load_adapters, load_pipeline

        concepts = set_["concepts"]
        if method == "lorarar" and set(concepts) != {"character", "style"}:
            return None, 0.0, {"skipped": "lorarar merges a content LoRA and a style LoRA only"}
        files = [str(self.files[n]) for n in concepts.values()]
        out = self.work / method / (set_["id"] + ("" if method == "gradient" else ".safetensors"))
        cmd = ["fuse", "--method", method, "--base", self.args.base, "--adapters", *files, "--out", str(out), "--quiet"]
        if method == "lorarar":
            cmd += ["--hypernet", self.args.hypernet]
        t0 = time.perf_counter()
        if lorakit(cmd) != 0:
            raise RuntimeError(f"lorakit {' '.join(cmd)} failed (see the message above)")
        fuse_s = time.perf_counter() - t0
        settings = SamplerSettings(method="merge", steps=self.args.steps, cfg=self.args.cfg)
        if method == "gradient":
            import torch

            pipe = load_pipeline(str(out))
            t0 = time.perf_counter()
            with torch.no_grad():  # the fused model alone: a plain pipeline call, one generator per seed
                images = pipe([set_["prompt"]] * len(seeds), num_inference_steps=self.args.steps,
                              guidance_scale=self.args.cfg,
                              generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        else:
            pipe = load_pipeline(self.args.base)
            adapters = load_adapters(pipe, [out])
            t0 = time.perf_counter()
            images, _ = generate(pipe, adapters, settings, set_["prompt"], None, seeds)
        return images, time.perf_counter() - t0, {"fuse_seconds": fuse_s}


# ------------------------------------------------------------------------------------------------- scoring


def presence(images, concepts: dict[str, str], oracle_path: str | None) -> dict:
    """Oracle verdicts for one set's images: all-present rate and per-category rates."""
    from lorakit.eval.oracle import score

    names = list(concepts.values())
    s = score(images, names, oracle_path=oracle_path)
    cols = [s.concepts.index(n) for n in names]
    present = s.present[:, cols]
    return {
        "all_present": float(present.all(dim=1).float().mean()),
        "per_category": {cat: float(present[:, i].float().mean()) for i, cat in enumerate(concepts)},
    }


def summarize(rows: list[dict], methods, sizes) -> tuple[dict, list[str], list[list]]:
    """method x N table: all-present rate, presence per category, seconds per image (means over sets)."""
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    summary, table = {}, []
    for m in methods:
        for n in sizes:
            rs = [r for r in rows if r["method"] == m and r["n"] == n and not r.get("skipped")]
            if not rs:
                continue
            cell = {
                "sets": len(rs),
                "all_present": mean([r.get("all_present") for r in rs]),
                "per_category": {c: mean([r.get("per_category", {}).get(c) for r in rs])
                                 for c in ("character", *CATEGORIES)},
                "seconds_per_image": mean([r["seconds_per_image"] for r in rs]),
                "fuse_seconds_per_set": mean([r.get("fuse_seconds") for r in rs]),
            }
            summary[f"{m}/n{n}"] = cell
            table.append([m, n, cell["sets"], cell["all_present"], *cell["per_category"].values(),
                          cell["seconds_per_image"], cell["fuse_seconds_per_set"]])
    headers = ["method", "N", "sets", "all present", "character", "object", "style", "background", "s/image",
               "fuse s/set"]
    return summary, headers, table


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--base", default=str(ROOT / "data" / "toy-base"), help="toy base pipeline folder (or tiny:sd1 for a smoke run)")
    p.add_argument("--adapters-dir", default=str(ROOT / "artifacts" / "adapters"),
                   help="folder with one trained LoRA per held-out concept (found by lorakit.trigger)")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--sizes", nargs="+", type=int, default=[2, 3, 4], help="set sizes N (default 2 3 4)")
    p.add_argument("--sets-per-size", type=int, default=None, help="seeded sample of sets per N (default: all)")
    p.add_argument("--k", type=int, default=4, help="images per set and method (seeds SEED..SEED+K-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--merge-weight", type=float, default=0.8, help="merge: every adapter's weight (reference: 0.8)")
    p.add_argument("--hypernet", help="LoRA.rar hypernetwork file (for --methods lorarar)")
    p.add_argument("--oracle", help="oracle folder (default data/oracle)")
    p.add_argument("--no-score", action="store_true", help="time only; do not run the oracle")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench_composition"))
    p.add_argument("--dry-run", action="store_true", help="print the sets and prompts and what is missing; run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sets = composition_sets(tuple(args.sizes), args.sets_per_size, args.seed)
    except ImportError as err:
        print(f"bench_composition: cannot build the composition sets: the toy world is missing ({err})", file=sys.stderr)
        return 2
    missing = missing_inputs(args, sets)
    if args.dry_run:
        for s in sets:
            print(json.dumps({"set": s["id"], "prompt": s["prompt"]}))
        print(f"{len(sets)} sets x {len(args.methods)} methods x {args.k} images", file=sys.stderr)
        for line in missing:
            print(f"missing: {line}", file=sys.stderr)
        return 0
    if missing:
        print("bench_composition: cannot run; missing:\n  - " + "\n  - ".join(missing), file=sys.stderr)
        return 2

    from lorakit.eval.report import markdown_table
    from lorakit.fileio import write_json, write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = find_adapters(Path(args.adapters_dir))
    seeds = [args.seed + i for i in range(args.k)]
    rows = []
    results = out / "results.jsonl"
    results.write_text("")
    sampling = fusion = None
    for method in args.methods:
        if method in SAMPLING_METHODS:
            sampling = sampling or SamplingRunner(args, files)
            runner = sampling
        else:
            fusion = fusion or FusionRunner(args, files, out / "fused")
            runner = fusion
        for s in sets:
            images, seconds, extra = runner.run(method, s, seeds)
            row = {"method": method, "n": s["n"], "set": s["id"], "prompt": s["prompt"], **extra}
            if images is not None:
                row["seconds_per_image"] = seconds / len(images)
                _save(images, s, method, seeds, out)
                if not args.no_score:
                    row.update(presence(images, s["concepts"], args.oracle))
            print(json.dumps(row), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    summary, headers, table = summarize(rows, args.methods, args.sizes)
    write_json({"settings": vars(args), "summary": summary}, out / "summary.json")
    md = ("## Toy ComposLoRA: all-concepts-present rate (oracle), per category, seconds per image\n\n"
          f"K = {args.k} images per set, seeds {seeds[0]}..{seeds[-1]}, {args.steps} steps, CFG {args.cfg}.\n\n"
          + markdown_table(headers, table))
    write_text(md, out / "table.md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
