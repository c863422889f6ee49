"""Our ComposLoRA on the toy world: how often each composition method shows ALL the concepts of a set.

Composition sets: one held-out character plus 1-3 of {object, style, background} (one concept per category),
so N = 2..4 LoRAs; every combination (78 sets) or a seeded sample of ``--sets-per-size`` per N. Every method
generates K images per set with fixed seeds (the same sets, prompts and seeds for every method), the toy-world
oracle says which of the set's concepts each image shows, and the table is method x N -> all-concepts-present rate
with n (images) and a 95% Wilson interval, presence per category, seconds per image (sampling only; a fusion
method's one-off fuse time per set is reported apart), and a paired exact McNemar test of each method against
merge on the same images (wins = images only that method got right). ``summary.json`` holds every pair of methods.

Like for like: every method runs every LoRA at the same scale ``--scale`` (default 0.8, the references' value):
merge / switch / composite / cmlora set each adapter's weight to it, the fusions get it as ``--weights``
(weighted then averages the scaled deltas: ``W0 + (1/N) sum_i s dW_i``, Mix-of-Show's baseline). Gradient
fusion captures each concept's activations on its own training captions (``data/toy/<concept>/*.txt``), not on a
template the toy world never saw. lorarar's hypernetwork predicts the merge coefficients itself (no scale).

Scale sweep: ``--sweep 0.6 0.8 1.0`` runs every method at every scale on ``--val-k`` validation seeds
(``--val-seed``, default 1000, disjoint from the report seeds), picks each method's best scale per N there
(all-present rate; ties go to the scale nearest ``--scale``) and reports the table on the report seeds at the
picked scales (the validation rates are in ``summary.json``).

Methods: merge, switch, composite, cmlora (the references' sampling-time methods, ``lorakit.sampling``);
lorakit's own variants: composite-ubase (composite with the base model's unconditional pass, ``lorakit sample
--method composite --uncond base``: each LoRA's effect stays in its own guidance term instead of cancelling
against its own unconditional pass) and delta (``--method delta``: base + the sum of each LoRA's difference from
the base, every LoRA at full strength instead of 1/N) and delta-parts (``--method delta --prompt-parts
per-adapter``: each LoRA's difference taken on its own part of the prompt, its trigger's tags plus the shared
ones, against the base on the same part, so a LoRA never sees the other LoRAs' trigger words, and a LoRA
trained on scenes without a hat does not push the hat of the joint prompt away) and delta-masked (``--method delta
--masks attention``: each LoRA's difference confined to where the base's cross-attention puts its comma tag, a
style everywhere, a background around the others). Run only when named: delta-masked-t0.3 / -t0.5 (hard masks),
delta-classes and delta-masked-classes (``--prompt-parts class-words``: the base's passes see the prompt without
trigger words, each LoRA's pass its own trigger back; v2 prompts only), delta-masked-classes-ubase (the same
with ``--uncond base``) and delta-masked-classes-t0.3 / -t0.5 (the same with hard masks); gradient (Mix-of-Show gradient
fusion -> fused pipeline) and weighted (average of the deltas) through ``lorakit fuse``; lorarar (``lorakit fuse
--method lorarar --hypernet H``) and, when named, ziplora (``lorakit fuse --method ziplora`` against each LoRA's
training images) for the character + style pairs only.

Inputs: the toy base (``data/toy-base``), one trained LoRA per held-out concept in ``--adapters-dir`` (found by
their ``lorakit.trigger``; ``.ci/run`` trains them from ``train_configs/toy_*.yaml``), the oracle
(``data/oracle``) and, for lorarar, a trained hypernetwork.

    python tools/bench_composition.py --adapters-dir artifacts/adapters --k 22 --sizes 2 --sets-per-size 3
    python tools/bench_composition.py --sweep 0.6 0.8 1.0 --val-k 8 --k 16 --sizes 2
    python tools/bench_composition.py --dry-run          # list the sets and prompts, check the inputs

Writes ``OUT/results.jsonl`` (one JSON line per method x set x scale, with every image's verdicts),
``OUT/summary.json``, ``OUT/table.md`` and the images with sidecars under ``OUT/images/<method>/n<N>/`` (so
``lorakit eval --metric judge`` can score them too).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from lorakit.toyworld.composition_sets import CATEGORIES, concept_sets

ROOT = Path(__file__).resolve().parents[1]
SAMPLING_METHODS = ("merge", "switch", "composite", "cmlora", "composite-ubase", "delta", "delta-parts", "delta-masked")
# lorakit's own composite variants: the ``lorakit sample`` settings each bench method runs with
SAMPLER_SETTINGS = {"composite-ubase": {"method": "composite", "uncond": "base"},
                    "delta-parts": {"method": "delta", "prompt_parts": "per-adapter"},
                    "delta-masked": {"method": "delta", "masks": "attention"},
                    **{f"delta-masked-t{t}": {"method": "delta", "masks": "attention", "mask_threshold": t}
                       for t in (0.3, 0.5)},
                    "delta-classes": {"method": "delta", "prompt_parts": "class-words"},
                    "delta-masked-classes": {"method": "delta", "masks": "attention", "prompt_parts": "class-words"},
                    "delta-masked-classes-ubase": {"method": "delta", "masks": "attention", "prompt_parts": "class-words",
                                                   "uncond": "base"},
                    **{f"delta-masked-classes-t{t}": {"method": "delta", "masks": "attention", "mask_threshold": t,
                                                      "prompt_parts": "class-words"} for t in (0.3, 0.5)}}
# Variants run only when --methods names them (not in the default list): hard masks at Prompt-to-Prompt's 0.3, 0.5;
# the class-words prompts, also with the base's unconditional pass or hard masks (v2 prompts only: each trigger needs its
# class word beside it).
VARIANT_METHODS = ("delta-masked-t0.3", "delta-masked-t0.5", "delta-classes", "delta-masked-classes",
                   "delta-masked-classes-ubase", "delta-masked-classes-t0.3", "delta-masked-classes-t0.5")
FUSION_METHODS = ("gradient", "weighted")
ALL_METHODS = SAMPLING_METHODS + FUSION_METHODS + ("lorarar",)
# Run only when named: ZipLoRA (``lorakit fuse --method ziplora``, 100 Adam steps on the pair's coefficients against
# each LoRA's training images) for character + style pairs, as lorarar: the per-pair optimisation LoRA.rar replaces.
PAIR_METHODS = ("lorarar", "ziplora")
WORLD_DEFAULTS = {
    "v1": {"base": "data/toy-base", "adapters_dir": "artifacts/adapters"},
    "v2": {"base": "data/toy2-base", "adapters_dir": "artifacts/toy2_loras", "oracle": "data/toy2-oracle"},
}


# ---------------------------------------------------------------------------------------------------- sets


def composition_sets(sizes=(2, 3, 4), per_size: int | None = None, seed: int = 0) -> list[dict]:
    """Every set of one character + one concept from each of N-1 of the categories object/style/background.

    Returns:
        ``[{"id", "n", "concepts": {category: name}, "prompt"}]``; with ``per_size``, a seeded sample of that many
        sets per N (all of them when there are fewer).
    """
    from lorakit.toyworld.concepts import HELDOUT
    from lorakit.toyworld.render import Scene, caption

    by_kind = {k: [c.name for c in HELDOUT if c.kind == k] for k in ("character", *CATEGORIES)}
    out = []
    for n, concepts in concept_sets(by_kind, sizes, per_size, seed):
        scene = Scene(characters=(concepts["character"],), objects=tuple(v for k, v in concepts.items() if k == "object"),
                      style=concepts.get("style"), background=concepts.get("background", "plain"))
        out.append({"id": f"n{n}-" + "-".join(concepts.values()), "n": n, "concepts": concepts, "prompt": caption(scene)})
    return out


# -------------------------------------------------------------------------------------------------- inputs


def find_adapters(folder: Path) -> dict[str, Path]:
    """``{toy concept name: adapter file}`` for every ``.safetensors`` under ``folder`` whose ``lorakit.trigger``
    is a held-out concept's trigger word (the newest file wins when several match). Toy world v2's LoRAs
    (``toy2_<identity>-<hash>``, trained on a ``toy2-base``) carry the same trigger words and share the cache
    ``lorakit demo`` writes; they are skipped: they do not fit the v1 base."""
    from safetensors import safe_open

    from lorakit.toyworld.concepts import BY_TRIGGER

    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - not an adapter we can read: ignore it here
            continue
        trigger = meta.get("lorakit.trigger")
        if trigger in BY_TRIGGER and not _is_v2_lora(path, meta):
            found[BY_TRIGGER[trigger].name] = path
    return found


def _is_v2_lora(path: Path, meta: dict) -> bool:
    """A toy world v2 LoRA: named ``toy2_...`` by its trainer or trained on a ``toy2-base`` folder."""
    if path.name.startswith("toy2_"):
        return True
    try:
        base = json.loads(meta.get("lorakit.config", "{}")).get("base_model") or ""
    except (ValueError, AttributeError):
        return False
    return Path(str(base)).name.startswith("toy2-base")


def missing_inputs(args, sets) -> list[str]:
    """Everything the run needs that is not there, as readable lines (empty when all is present)."""
    if args.world == "v2":
        from lorakit.toyworld.v2.composition import missing_inputs as missing_v2

        return missing_v2(args, sets)
    missing = []
    for module, names in (
        ("lorakit.toyworld.concepts", ("HELDOUT", "BY_TRIGGER")),
        ("lorakit.toyworld.render", ("Scene", "caption")),
        ("lorakit.sampling", ("SamplerSettings", "generate", "load_adapters", "load_pipeline", "profile_adapters",
                              "order_by_frequency", "ProfileSettings")),
        ("lorakit.toyworld.oracle", ("score",)),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            missing.append(f"python module {module} ({err})")
            continue
        gone = [n for n in names if not hasattr(mod, n)]
        if gone:
            missing.append(f"{module}: no {', '.join(gone)}")
    if any(m in args.methods for m in FUSION_METHODS + PAIR_METHODS):
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


def image_stem(out: Path, method: str, n: int, set_id: str, seed: int) -> Path:
    """Where a run keeps one report image (``.png``) and its description (``.json``):
    ``OUT/images/<method>/n<N>/<set>-s<seed>``."""
    return out / "images" / method / f"n{n}" / f"{set_id}-s{seed}"


def _save(images, set_, method, seeds, out: Path) -> None:
    from lorakit.fileio import write_json

    for img, seed in zip(images, seeds):
        stem = image_stem(out, method, set_["n"], set_["id"], seed)
        stem.parent.mkdir(parents=True, exist_ok=True)
        img.save(stem.with_suffix(".png"))
        write_json({"prompt": set_["prompt"], "seed": seed, "method": method,
                    "concepts": [{"name": v, "category": k} for k, v in set_["concepts"].items()]},
                   stem.with_suffix(".json"))


class SamplingRunner:
    """merge / switch / composite / cmlora on one base pipeline with every concept's adapter loaded once."""

    def __init__(self, args, adapter_files: dict[str, Path]):
        from lorakit.sampling import ProfileSettings, load_adapters, load_pipeline, profile_adapters

        self.args = args
        self.pipe = load_pipeline(args.base)
        names = sorted(adapter_files)
        self.loaded = dict(zip(names, load_adapters(self.pipe, [adapter_files[n] for n in names])))
        self.scores = {}
        if "cmlora" in args.methods and args.world == "v1":
            prof = ProfileSettings(base=args.base, prompt="a picture", negative_prompt="", steps=args.steps, cfg=args.cfg,
                                   seeds=(0, 1), width=None, height=None, scheduler=None)
            profiles = profile_adapters(self.pipe, list(self.loaded.values()), prof, progress=False)
            self.scores = {n: profiles[a.name]["score"] for n, a in self.loaded.items()}

    def run(self, method: str, set_: dict, seeds: list[int], scale: float):
        from dataclasses import replace

        from lorakit.sampling import SamplerSettings, category_sequence, generate, order_by_frequency

        names = list(set_["concepts"].values())  # the character first (switch starts with it)
        adapters = [replace(self.loaded[n], weight=scale) for n in names]  # one scale for every method
        order, n_rot, regions, kinds = None, None, None, None
        if self.args.world == "v2":  # the kinds are known: CMLoRA's own category order
            from lorakit.toyworld.v2.composition import region_spec, slot_kinds

            kinds = slot_kinds(set_)
            order, n_rot = category_sequence(kinds)
            regions = region_spec(set_)
        elif method == "cmlora":
            order = order_by_frequency([self.scores[n] for n in names])[0]
        settings = SamplerSettings(**SAMPLER_SETTINGS.get(method, {"method": method}), steps=self.args.steps,
                                   cfg=self.args.cfg)
        t0 = time.perf_counter()
        images, _ = generate(self.pipe, adapters, settings, set_["prompt"], None, seeds, order=order,
                             n_rotation=n_rot, regions=regions, kinds=kinds)
        return images, time.perf_counter() - t0, {}


class FusionRunner:
    """gradient / weighted / lorarar / ziplora: ``lorakit fuse`` per set, then plain sampling of the fused result."""

    def __init__(self, args, adapter_files: dict[str, Path], work: Path):
        self.args, self.files, self.work = args, adapter_files, work

    def run(self, method: str, set_: dict, seeds: list[int], scale: float):
        from lorakit.cli import main as lorakit

        concepts = set_["concepts"]
        if method in PAIR_METHODS and set(concepts) != {"character", "style"}:
            return None, 0.0, {"skipped": f"{method} merges a content LoRA and a style LoRA only"}
        files = [str(self.files[n]) for n in concepts.values()]
        out = self.work / method / f"s{scale:g}" / (set_["id"] + ("" if method == "gradient" else ".safetensors"))
        cmd = ["fuse", "--method", method, "--base", self.args.base, "--adapters", *files, "--out", str(out), "--quiet"]
        if method == "lorarar":
            cmd += ["--hypernet", self.args.hypernet]  # its hypernetwork sets the coefficients
        elif method == "ziplora":  # coefficients optimised on the pair against each LoRA's training images
            cmd += ["--ref-images", *[str(self.reference_folder(n)) for n in concepts.values()]]
        else:
            cmd += ["--weights", *[str(scale)] * len(files)]
            if method == "gradient":
                captions = training_captions
                if self.args.world == "v2":
                    from lorakit.toyworld.v2.composition import training_captions as captions
                cmd += ["--prompts", *["|".join(captions(n, self.args.fusion_prompts)) for n in concepts.values()]]
        t0 = time.perf_counter()
        if lorakit(cmd) != 0:
            raise RuntimeError(f"lorakit {' '.join(cmd)} failed (see the message above)")
        fuse_s = time.perf_counter() - t0
        images, seconds = self.sample_fused(method, out, set_, seeds)
        return images, seconds, {"fuse_seconds": fuse_s}

    def reference_folder(self, concept: str) -> Path:
        """A concept's training images: v2 its identity's recipe data (rendered if missing), v1 data/toy/<concept>."""
        if self.args.world == "v2":
            from lorakit.toyworld.v2.loras import ensure_data

            return ensure_data(concept, Path(self.args.adapters_dir) / "toy2-data")[0]
        return ROOT / "data" / "toy" / concept

    def sample_fused(self, method: str, out: Path, set_: dict, seeds: list[int]):
        """The fused result's images of one set: ``(images, sampling seconds)``."""
        from lorakit.sampling import SamplerSettings, generate, load_adapters, load_pipeline

        settings = SamplerSettings(method="merge", steps=self.args.steps, cfg=self.args.cfg)
        if set_.get("regions"):  # regional sampling of the fused result, as Mix-of-Show samples its fused model
            from lorakit.toyworld.v2.composition import region_spec

            pipe = load_pipeline(str(out) if method == "gradient" else self.args.base)
            adapters = [] if method == "gradient" else load_adapters(pipe, [out])
            t0 = time.perf_counter()
            images, _ = generate(pipe, adapters, settings, set_["prompt"], None, seeds, regions=region_spec(set_))
        elif method == "gradient":
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
        return images, time.perf_counter() - t0


def training_captions(concept: str, n: int) -> list[str]:
    """Up to ``n`` distinct captions of the concept's own training folder ``data/toy/<concept>/*.txt`` (sorted by
    file name), or, without that folder, ``n`` captions of the same form (``lorakit.toyworld.evaluate``)."""
    folder = ROOT / "data" / "toy" / concept
    caps = list(dict.fromkeys(p.read_text().strip() for p in sorted(folder.glob("*.txt")))) if folder.is_dir() else []
    if not caps:
        from lorakit.toyworld.evaluate import concept_prompts

        caps = concept_prompts(concept, n, seed=0)
    return caps[:n]


# ------------------------------------------------------------------------------------------------- scoring


def presence(images, concepts: dict[str, str], oracle_path: str | None) -> dict:
    """Oracle verdicts for one set's images: all-present rate, per-category rates and every image's verdicts
    (``present``: one ``[bool per category]`` list per image, in the set's category order)."""
    from lorakit.toyworld.oracle import score

    names = list(concepts.values())
    s = score(images, names, oracle_path=oracle_path)
    cols = [s.concepts.index(n) for n in names]
    present = s.present[:, cols]
    return {
        "all_present": float(present.all(dim=1).float().mean()),
        "per_category": {cat: float(present[:, i].float().mean()) for i, cat in enumerate(concepts)},
        "present": [[bool(v) for v in row] for row in present],
    }


def _cell_images(rows: list[dict]) -> dict:
    """``{(set, seed): {"all": bool, category: bool}}`` over a cell's rows."""
    out = {}
    for r in rows:
        cats = list(r["categories"])
        for seed, verdicts in zip(r["seeds"], r.get("present", [])):
            out[(r["set"], seed)] = {"all": all(verdicts), **dict(zip(cats, verdicts))}
    return out


def summarize(rows: list[dict], methods, sizes, baseline: str = "merge",
              categories=("character", *CATEGORIES)) -> tuple[dict, list[str], list[list]]:
    """method x N table on the report rows: all-present rate with n and Wilson 95% interval, presence per
    category, seconds per image, fuse seconds per set, and the paired test against ``baseline``.

    Rates count images (sets x seeds) of the cell. ``summary["paired"]`` holds exact McNemar tests of every pair
    of methods per N on the images both produced (same set, prompt and seed).
    """
    from lorakit.eval.stats import fmt_rate, paired, rate

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    summary, table = {"cells": {}, "paired": []}, []
    cells = {}
    for m in methods:  # every cell's per-image verdicts first, so the baseline is there whatever the order
        for n in sizes:
            rs = [r for r in rows if r["method"] == m and r["n"] == n and not r.get("skipped")]
            if rs:
                cells[(m, n)] = _cell_images(rs)
    for m in methods:
        for n in sizes:
            rs = [r for r in rows if r["method"] == m and r["n"] == n and not r.get("skipped")]
            if not rs:
                continue
            imgs = cells[(m, n)]
            k_all = sum(v["all"] for v in imgs.values())
            per_cat = {}
            for c in categories:
                have = [v[c] for v in imgs.values() if c in v]
                per_cat[c] = rate(sum(have), len(have)) if have else None
            cell = {
                "sets": len(rs), "scale": rs[0].get("scale"),
                "all_present": rate(k_all, len(imgs)),
                "per_category": per_cat,
                "seconds_per_image": mean([r["seconds_per_image"] for r in rs]),
                "fuse_seconds_per_set": mean([r.get("fuse_seconds") for r in rs]),
            }
            summary["cells"][f"{m}/n{n}"] = cell
            vs = "-"
            base_imgs = cells.get((baseline, n))
            if m != baseline and base_imgs:
                keys = sorted(imgs.keys() & base_imgs.keys())
                t = paired([imgs[x]["all"] for x in keys], [base_imgs[x]["all"] for x in keys])
                vs = f"+{t['wins']} / -{t['losses']}, p = {t['p']:.3g}"
            table.append([m, n, f"{cell['scale']:g}" if cell["scale"] is not None else "-", cell["sets"],
                          fmt_rate(k_all, len(imgs)),
                          *[f"{v['rate']:.2f}" if v else "-" for v in per_cat.values()],
                          vs, cell["seconds_per_image"], cell["fuse_seconds_per_set"]])
    for n in sizes:
        ms = [m for m in methods if (m, n) in cells]
        for i, a in enumerate(ms):
            for b in ms[i + 1:]:
                keys = sorted(cells[(a, n)].keys() & cells[(b, n)].keys())
                t = paired([cells[(a, n)][x]["all"] for x in keys], [cells[(b, n)][x]["all"] for x in keys])
                summary["paired"].append({"n_adapters": n, "a": a, "b": b, **t})
    headers = ["method", "N", "scale", "sets", "all present [95% CI] (k/n)", *categories,
               f"vs {baseline}: wins / losses, McNemar p", "s/image", "fuse s/set"]
    return summary, headers, table


def pick_scales(rows: list[dict], methods, sizes, default: float) -> dict:
    """``{(method, N): scale}`` with the best all-present rate on the validation rows (ties: nearest ``default``)."""
    best = {}
    for m in methods:
        for n in sizes:
            by_scale = {}
            for r in rows:
                if r["method"] == m and r["n"] == n and not r.get("skipped"):
                    k, tot = by_scale.get(r["scale"], (0, 0))
                    by_scale[r["scale"]] = (k + sum(all(v) for v in r.get("present", [])), tot + len(r["seeds"]))
            if by_scale:
                best[(m, n)] = max(by_scale, key=lambda sc: (by_scale[sc][0] / max(1, by_scale[sc][1]),
                                                             -abs(sc - default)))
    return best


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--base", help="toy base pipeline folder (or tiny:sd1 for a smoke run); default data/toy-base, "
                   "--world v2: data/toy2-base")
    p.add_argument("--adapters-dir",
                   help="folder with one trained LoRA per held-out concept (v1: found by lorakit.trigger, default "
                   "artifacts/adapters; v2: the recipe LoRAs of tools/train_toy2_loras.py --out, default "
                   "artifacts/toy2_loras)")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS + VARIANT_METHODS + ("ziplora",),
                   help="default: all (--world v2: all but lorarar, which needs a v2 hypernetwork); ziplora and the "
                   "variants run only when named")
    p.add_argument("--sizes", nargs="+", type=int, default=[2, 3, 4], help="set sizes N (default 2 3 4)")
    p.add_argument("--sets-per-size", type=int, default=None, help="seeded sample of sets per N (default: all)")
    p.add_argument("--sets", nargs="+", metavar="ID",
                   help="only these set ids (e.g. n2-frog-ink n2-robot-ink; --dry-run lists them)")
    p.add_argument("--k", type=int, default=4, help="images per set and method (seeds SEED..SEED+K-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--scale", type=float, default=0.8,
                   help="LoRA scale of every adapter in every method (default 0.8, the references' value)")
    p.add_argument("--sweep", nargs="+", type=float, metavar="S",
                   help="scales to choose from per method and N on validation seeds (e.g. 0.6 0.8 1.0)")
    p.add_argument("--method-scales", nargs="+", metavar="METHOD=S", default=[],
                   help="a fixed scale per method (e.g. the scales an earlier --sweep chose: merge=0.6 delta=1.0); "
                   "methods not named run at --scale; not with --sweep")
    p.add_argument("--val-k", type=int, default=8, help="validation images per set and scale (with --sweep)")
    p.add_argument("--val-seed", type=int, default=1000, help="first validation seed (with --sweep)")
    p.add_argument("--fusion-prompts", type=int, default=8,
                   help="training captions per concept that gradient fusion captures activations on (default 8)")
    p.add_argument("--hypernet", help="LoRA.rar hypernetwork file (for --methods lorarar)")
    p.add_argument("--oracle", help="oracle folder (default data/oracle; --world v2: data/toy2-oracle)")
    p.add_argument("--lora-set", nargs="+", default=[], metavar="IDENTITY:KEY=VALUE",
                   help="--world v2: use the LoRA trained with this recipe override for that identity "
                   "(train_toy2_loras.py --set KEY=VALUE), e.g. nocturo:max_steps=600; repeatable per identity")
    p.add_argument("--no-score", action="store_true", help="time only; do not run the oracle")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench_composition"))
    p.add_argument("--dry-run", action="store_true", help="print the sets and prompts and what is missing; run nothing")
    p.add_argument("--rescore", action="store_true",
                   help="score OUT's saved report images again with --oracle and rewrite the table; generate nothing")
    _add_world_args(p)
    return _world_defaults(p, p.parse_args(argv))


def _add_world_args(p) -> None:
    p.add_argument("--world", choices=("v1", "v2"), default="v1",
                   help="toy world (v2: identity LoRAs, the v2 oracle; see above)")
    p.add_argument("--regional", action="store_true",
                   help="--world v2: add the two-character regional sets (left / right halves, scored per half)")
    p.add_argument("--resume", action="store_true",
                   help="keep OUT/results.jsonl and run only the cells (method x set x scale x seeds) not in it")
    p.add_argument("--budget-s", type=float,
                   help="start no cell that would end later than this many seconds after the start (exit status 3: "
                   "run the same command with --resume again to continue)")


def _world_defaults(p, args):
    """The world's default base, adapter folder and oracle where the command line names none."""
    defaults = WORLD_DEFAULTS[args.world]
    args.methods = args.methods or [m for m in ALL_METHODS if args.world == "v1" or m != "lorarar"]
    args.method_scales = _method_scales(p, args)
    args.lora_set = _lora_sets(p, args)
    args.base = args.base or str(ROOT / defaults["base"])
    args.adapters_dir = args.adapters_dir or str(ROOT / defaults["adapters_dir"])
    if args.world == "v2":
        args.oracle = args.oracle or str(ROOT / defaults["oracle"])
    elif args.regional:
        p.error("--regional needs --world v2 (the two-character sets are scored by the v2 oracle)")
    return args


def _lora_sets(p, args) -> dict[str, list[str]]:
    """``--lora-set`` as ``{identity: [KEY=VALUE, ...]}`` (an argparse error, exit status 2, for a bad item)."""
    from lorakit.toyworld.v2.concepts import IDENTITIES

    out: dict[str, list[str]] = {}
    names = {c.name for c in IDENTITIES}
    for item in args.lora_set:
        name, _, override = item.partition(":")
        if args.world != "v2":
            p.error(f"--lora-set {item}: only with --world v2 (v1 finds its LoRAs by trigger)")
        if name not in names or "=" not in override:
            p.error(f"--lora-set {item}: expected IDENTITY:KEY=VALUE with one of {' '.join(sorted(names))}, "
                    "e.g. nocturo:max_steps=600")
        out.setdefault(name, []).append(override)
    return out


def _method_scales(p, args) -> dict[str, float]:
    """``--method-scales`` as ``{method: scale}`` (an argparse error, exit status 2, for a bad item)."""
    out = {}
    for item in args.method_scales:
        method, _, value = item.partition("=")
        try:
            out[method] = float(value)
        except ValueError:
            p.error(f"--method-scales {item}: expected METHOD=SCALE, e.g. merge=0.6")
        if method not in args.methods:
            p.error(f"--method-scales {item}: {method} is not one of the run's methods ({' '.join(args.methods)})")
    if out and args.sweep:
        p.error("--method-scales fixes the scales that --sweep would choose: pass one of them")
    return out


def select_sets(args) -> list[dict] | None:
    """The composition sets of the run (``--sizes``, ``--sets-per-size``, ``--sets``); None after saying why not."""
    try:
        if args.world == "v2":
            from lorakit.toyworld.v2 import composition as v2

            sets = v2.composition_sets(tuple(args.sizes), None if args.sets else args.sets_per_size, args.seed)
            sets += v2.regional_sets() if args.regional else []
        else:
            sets = composition_sets(tuple(args.sizes), None if args.sets else args.sets_per_size, args.seed)
    except ValueError as err:
        print(f"bench_composition: --sizes {' '.join(map(str, args.sizes))}: {err}", file=sys.stderr)
        return None
    except ImportError as err:
        print(f"bench_composition: cannot build the composition sets: the toy world is missing ({err})", file=sys.stderr)
        return None
    if args.sets:
        unknown = sorted(set(args.sets) - {s["id"] for s in sets})
        if unknown:
            print(f"bench_composition: --sets {' '.join(unknown)}: no such set at sizes {args.sizes} "
                  "(--dry-run lists them)", file=sys.stderr)
            return None
        sets = [s for s in sets if s["id"] in args.sets]
    return sets


def print_dry_run(args, sets, missing) -> None:
    for s in sets:
        print(json.dumps({"set": s["id"], "prompt": s["prompt"]}))
    print(f"{len(sets)} sets x {len(args.methods)} methods x {args.k} images", file=sys.stderr)
    for line in missing:
        print(f"missing: {line}", file=sys.stderr)


class CellRunner:
    """One method on one set at one scale: generate, save (report phase), score, append to ``OUT/results.jsonl``."""

    def __init__(self, args, files: dict[str, Path], out: Path):
        self.args, self.files, self.out = args, files, out
        self.results = out / "results.jsonl"
        self.runners = {}
        self.cache = load_cells(self.results) if args.resume else {}
        if not args.resume:
            self.results.write_text("")
        self.start, self.ran = time.perf_counter(), 0
        self.score = None if args.no_score else presence_scorer(args)

    def runner_for(self, method):
        key = "sampling" if method in SAMPLING_METHODS + VARIANT_METHODS else "fusion"
        if key not in self.runners:
            self.runners[key] = (SamplingRunner(self.args, self.files) if key == "sampling"
                                 else FusionRunner(self.args, self.files, self.out / "fused"))
        return self.runners[key]

    def __call__(self, method, s, run_seeds, scale, phase):
        key = cell_key(phase, method, s["id"], scale, run_seeds)
        if key in self.cache:  # --resume: this cell ran before
            return self.cache[key]
        end = time.perf_counter() + self.estimate(method, s, run_seeds)
        if self.args.budget_s and self.ran and end > self.start + self.args.budget_s:  # every run makes progress
            raise OutOfBudget(f"{method} on {s['id']}")
        self.ran += 1
        images, seconds, extra = self.runner_for(method).run(method, s, run_seeds, scale)
        row = {"phase": phase, "method": method, "n": s["n"], "set": s["id"], "prompt": s["prompt"], "scale": scale,
               "seeds": run_seeds, "categories": list(s["concepts"]),
               "adapters": {n: Path(self.files[n]).name for n in s["concepts"].values() if n in self.files}, **extra}
        if images is not None:
            row["seconds_per_image"] = seconds / len(images)
            if phase == "report":
                _save(images, s, method, run_seeds, self.out)
            if not self.args.no_score:
                row.update(self.score(images, s))
        print(json.dumps({k: v for k, v in row.items() if k not in ("present", "probs")}), flush=True)
        with self.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.cache[key] = row
        return row

    def estimate(self, method: str, s: dict, seeds: list[int]) -> float:
        """Seconds a cell is expected to take: the method's seconds per image on sets of the same size so far
        (this run's or a resumed one's), else twice the slowest image so far; 0 before any cell ran."""
        same = [r["seconds_per_image"] for r in self.cache.values()
                if r.get("seconds_per_image") and r["method"] == method and r["n"] == s["n"]]
        every = [r["seconds_per_image"] for r in self.cache.values() if r.get("seconds_per_image")]
        per_image = max(same) if same else 2 * max(every) if every else 0.0
        return per_image * len(seeds) + max([r.get("fuse_seconds") or 0 for r in self.cache.values()
                                             if r["method"] == method] or [0])


class OutOfBudget(Exception):
    """The next cell would end after ``--budget-s``."""


def cell_key(phase, method, set_id, scale, seeds) -> tuple:
    return phase, method, set_id, float(scale), tuple(seeds)


def load_cells(results: Path) -> dict:
    """``{cell key: row}`` of the rows in ``results`` (``OUT/results.jsonl`` of an earlier run)."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    return {cell_key(r.get("phase", "report"), r["method"], r["set"], r["scale"], r["seeds"]): r for r in rows}


def presence_scorer(args):
    """``score(images, set) -> verdict fields`` of the world's oracle (v2: one oracle loaded once; regional sets
    are scored per half)."""
    if args.world == "v1":
        return lambda images, s: presence(images, s["concepts"], args.oracle)
    from lorakit.toyworld.v2.composition import per_half
    from lorakit.toyworld.v2.composition import presence as presence_v2
    from lorakit.toyworld.v2.oracle import Oracle

    oracle = Oracle.load(args.oracle)
    return lambda images, s: presence_v2(oracle, images, s["concepts"], regional=per_half(s))


def run_sweep(args, sets, run_cell) -> tuple[dict, list[dict]]:
    """``--sweep``: every method at every scale on the validation seeds; returns (chosen scales, validation rows)."""
    val_rows = []
    val_seeds = [args.val_seed + i for i in range(args.val_k)]
    for method in args.methods:
        for scale in args.sweep:
            for s in sets:
                val_rows.append(run_cell(method, s, val_seeds, scale, "validation"))
    return pick_scales(val_rows, args.methods, args.sizes, args.scale), val_rows


def write_report(args, out: Path, seeds, rows, val_rows, chosen, sets=()) -> None:
    """``OUT/summary.json`` and ``OUT/table.md`` (printed too) from the report rows."""
    from lorakit.eval.report import markdown_table
    from lorakit.fileio import write_json, write_text

    summary, headers, table = summarize(rows, args.methods, args.sizes)
    if args.sweep:
        summary["validation"] = {
            f"{m}/n{n}/s{sc:g}": _val_rate(val_rows, m, n, sc) for m in args.methods for n in args.sizes
            for sc in args.sweep}
        summary["chosen_scales"] = {f"{m}/n{n}": sc for (m, n), sc in chosen.items()}
    extra_md = v2_report(args, rows, sets, seeds, summary) if args.world == "v2" else ""
    write_json({"settings": vars(args), "summary": summary}, out / "summary.json")
    how = (f"each method at the scale it scored best on validation seeds {args.val_seed}..{args.val_seed + args.val_k - 1}"
           f" (from {', '.join(f'{x:g}' for x in args.sweep)})" if args.sweep else
           "each method's LoRAs at its scale of --method-scales (the others at {:g})".format(args.scale)
           if args.method_scales else f"every LoRA at scale {args.scale:g}")
    md = ("## Toy ComposLoRA: all-concepts-present rate (oracle), per category, seconds per image\n\n"
          f"K = {args.k} images per set, seeds {seeds[0]}..{seeds[-1]} (the same sets, prompts and seeds for every "
          f"method), {args.steps} steps, CFG {args.cfg}, {how}. Rates: images where the oracle finds every concept "
          "of the set, with the 95% Wilson interval and k/n; vs merge: images only this method / only merge got "
          "right (exact McNemar p, two-sided).\n\n"
          + markdown_table(headers, table) + extra_md)
    small = sorted({c["all_present"]["n"] for c in summary["cells"].values() if c["all_present"]["n"] < 64})
    if small:
        md += (f"\nCells with n = {', '.join(map(str, small))} images: below 64 the intervals are wide; read no "
               "difference off them that the paired test does not confirm.\n")
    write_text(md, out / "table.md")
    print(md)


def main(argv=None) -> int:
    args = parse_args(argv)
    sets = select_sets(args)
    if sets is None:
        return 2
    if args.rescore:
        return rescore(args)
    missing = missing_inputs(args, sets)
    if args.dry_run:
        print_dry_run(args, sets, missing)
        return 0
    if missing:
        print("bench_composition: cannot run; missing:\n  - " + "\n  - ".join(missing), file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = world_adapters(args, sets)
    seeds = [args.seed + i for i in range(args.k)]
    if args.sweep and set(seeds) & set(range(args.val_seed, args.val_seed + args.val_k)):
        print(f"bench_composition: validation seeds {args.val_seed}..{args.val_seed + args.val_k - 1} overlap the "
              f"report seeds {seeds[0]}..{seeds[-1]}; pass another --val-seed", file=sys.stderr)
        return 2
    run_cell = CellRunner(args, files, out)
    try:
        chosen, val_rows = run_sweep(args, sets, run_cell) if args.sweep else (
            {(m, n): sc for m, sc in args.method_scales.items() for n in args.sizes}, [])
        rows = [run_cell(method, s, seeds, chosen.get((method, s["n"]), args.scale), "report")
                for method, s in cell_order(args, sets)]
    except OutOfBudget as stop:
        print(f"bench_composition: stopped before {stop} (--budget-s {args.budget_s:g}); run the same command "
              "with --resume to continue", file=sys.stderr)
        return 3
    write_report(args, out, seeds, rows, val_rows, chosen, sets)
    return 0


def v2_report(args, rows, sets, seeds, summary: dict) -> str:
    """``--world v2``'s additions to the report (added to ``summary`` and returned as markdown): the regional
    sets' table (each half scored for its character), every set's rate per method, and the oracle's ceiling
    per set (the renderer's own images of the set at the same seeds)."""
    from lorakit.eval.report import markdown_table
    from lorakit.eval.stats import rate
    from lorakit.toyworld.v2.composition import GLOBAL_GROUP, REGIONAL_GROUP, REGIONAL_SLOTS, ceiling

    md = ""
    groups = [g for g in (REGIONAL_GROUP, GLOBAL_GROUP) if any(r["n"] == g for r in rows)]
    if groups:
        two = [r for r in rows if r["n"] in groups]
        reg, headers, table = summarize(two, args.methods, groups, categories=REGIONAL_SLOTS)
        summary["cells"].update(reg["cells"])
        summary["paired"] += reg["paired"]
        summary["regions_vs_global"] = regions_vs_global(two, args.methods)
        md += ("\n### Two characters: N = 2r with left / right regions, 2g the global prompt alone (each half scored "
               "for its character)\n\n" + markdown_table(headers, table)
               + "".join(f"\n{m}: regions vs none on the same pairs and seeds: +{t['wins']} / -{t['losses']}, McNemar "
                         f"p = {t['p']:.3g}\n" for m, t in summary["regions_vs_global"].items()))
    summary["per_set"] = {f"{r['method']}/{r['set']}": rate(sum(all(v) for v in r["present"]), len(r["present"]))
                          for r in rows if r.get("present") is not None}
    if not args.no_score:
        from lorakit.toyworld.v2.oracle import Oracle

        summary["ceiling"] = ceiling(Oracle.load(args.oracle), [s for s in sets if any(r["set"] == s["id"] for r in rows)],
                                     seeds)
        md += ("\nOracle ceiling (the renderer's images of each set at the same seeds, scored the same way): "
               + "; ".join(f"{k} {v['rate']:.2f} ({v['k']}/{v['n']})" for k, v in summary["ceiling"].items()) + "\n")
    return md


def regions_vs_global(rows, methods) -> dict:
    """Per method, the paired test of the two-character sets with regions against the same pair and seed
    without them (both in place or not)."""
    from lorakit.eval.stats import paired

    out = {}
    for m in methods:
        verdict = {(r["n"], r["set"][3:], seed): all(v) for r in rows if r["method"] == m and r.get("present")
                   for seed, v in zip(r["seeds"], r["present"])}
        keys = sorted(k[1:] for k in verdict if k[0] == "2r" and ("2g", *k[1:]) in verdict)
        if keys:
            out[m] = paired([verdict[("2r", *k)] for k in keys], [verdict[("2g", *k)] for k in keys])
    return out


def cell_order(args, sets) -> list[tuple[str, dict]]:
    """(method, set) in run order: v1 method by method; v2 set by set, every method on a set before the next
    set, so a run stopped by its budget leaves paired cells."""
    if args.world == "v2":
        return [(m, s) for s in sets for m in args.methods]
    return [(m, s) for m in args.methods for s in sets]


def world_adapters(args, sets) -> dict[str, Path]:
    """``{concept: adapter file}`` of the world's LoRAs (v1: by trigger; v2: the recipe LoRAs on ``--base``)."""
    if args.world == "v1":
        return find_adapters(Path(args.adapters_dir))
    from lorakit.toyworld.v2.composition import find_adapters as find_v2

    return find_v2(args.adapters_dir, args.base, sorted({c for s in sets for c in s["concepts"].values()}),
                   args.lora_set)


def rescore(args) -> int:
    """``--rescore``: the report rows of ``OUT/results.jsonl`` scored again from their saved images."""
    from PIL import Image

    from lorakit.eval.report import markdown_table
    from lorakit.fileio import write_json, write_text

    out = Path(args.out)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase", "report") == "report"]
    score = presence_scorer(args)
    for r in rows:
        if r.get("skipped"):
            continue
        stems = [image_stem(out, r["method"], r["n"], r["set"], seed) for seed in r["seeds"]]
        images = [Image.open(stem.with_suffix(".png")).convert("RGB") for stem in stems]
        concepts = json.loads(stems[0].with_suffix(".json").read_text())["concepts"]
        concepts = {c["category"]: c["name"] for c in concepts}
        r.update(score(images, {"concepts": concepts}))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sizes = sorted({r["n"] for r in rows}, key=str)
    summary, headers, table = summarize(rows, methods, sizes)
    write_json({"settings": vars(args), "rescored_with": args.oracle or "data/oracle", "summary": summary},
               out / "summary.json")
    md = (f"## Toy ComposLoRA (rescored with oracle {args.oracle or 'data/oracle'})\n\n"
          "Rates: images where the oracle finds every concept of the set, with the 95% Wilson interval and k/n; "
          "vs merge: images only this method / only merge got right (exact McNemar p, two-sided).\n\n"
          + markdown_table(headers, table))
    write_text(md, out / "table.md")
    print(md)
    return 0


def _val_rate(rows, method, n, scale) -> dict | None:
    from lorakit.eval.stats import rate

    rs = [r for r in rows if r["method"] == method and r["n"] == n and r["scale"] == scale and not r.get("skipped")]
    if not rs:
        return None
    return rate(sum(all(v) for r in rs for v in r.get("present", [])), sum(len(r["seeds"]) for r in rs))


if __name__ == "__main__":
    from lorakit.errors import debug_enabled, run_guarded

    sys.exit(run_guarded(main, "bench_composition", debug_enabled()))  # LORAKIT_DEBUG=1: the traceback
