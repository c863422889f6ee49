"""How often each sampling-time composition method shows ALL of a set's concepts, on the toy world, with 95%
Wilson intervals and paired comparisons (the same sets, prompts and seeds for every method).

Sets: each ``--characters`` concept with ``--style`` (N = 2), + each of ``--objects`` (N = 3), + ``--background``
(N = 4);
the prompt is the toy captions' form (``lorakit.toyworld.render.caption``). Every method generates ``--k`` images
per set with seeds 0..k-1; the toy-world oracle (``lorakit.toyworld.oracle``) says which concepts each image shows.

``--world v2``: the sets are toy world v2's (a character identity plus object / style / background identities,
:mod:`lorakit.toyworld.v2.composition`; ``--sizes``, ``--sets``), the LoRAs the v2 recipes' (``--adapters-dir``,
default ``artifacts/toy2_loras``, on ``--base`` default ``data/toy2-base``) and the judge the v2 oracle
(``--oracle``, default ``data/toy2-oracle``):

    python tools/measure_composition_methods.py --world v2 --sizes 2 --sets n2-kwibbit-nocturo --k 16 \
        --methods merge composite composite+ubase delta --out /tmp/mcm2

Methods (``--methods``): ``merge``, ``switch``, ``composite``, ``cmlora`` (lorakit mode), ``cmlora-official``,
``delta``; a ``+ubase`` suffix adds ``uncond="base"`` (the unconditional half from the base model), and
``+parts`` per-adapter prompt parts, ``+kg=character:3`` delta's adapter guidance by kind, and ``+key=value`` any
other ``SamplerSettings`` field (``cmlora+cache_refresh=dominant``, ``composite+encode=per-adapter``). The
references are ``merge``, ``switch``, ``composite`` and ``cmlora-official``. CMLoRA gets the official category
order from the toy concepts' kinds.

    python tools/measure_composition_methods.py --adapters-dir artifacts/adapters --sizes 3 4 --k 4 --out /tmp/mcm

Prints one JSON line per (method, N) (all-present rate, n, Wilson interval, per-kind rates, the character-and-style
rate, s/image) and per (method, reference, N) (paired wins / losses on the same images and exact McNemar p, for
all-present and for character-and-style). ``--summary-only`` re-summarises ``OUT/images.jsonl`` without sampling. ``OUT/images.jsonl`` keeps
every image's verdict, written per batch; a rerun with the same ``--out`` generates only the (method, set, seed)
images not there yet, so a long measurement runs in chunks (``--time-limit``, or a few ``--methods`` at a time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorakit.eval.stats import mcnemar_exact, wilson  # noqa: E402  (re-exported for the tests)

REFERENCES = ("merge", "switch", "composite", "cmlora-official")
T_START = time.perf_counter()


def method_settings(spec: str, steps: int, cfg: float, kinds: list[str] | None = None):
    """``SamplerSettings`` of a method spec such as ``composite+ubase``, ``cmlora-official`` or
    ``delta+ubase+parts+kg=character:3`` (``parts``: ``prompt_parts="per-adapter"``; ``kg=KIND:G,...``: delta's
    ``adapter_guidance``, G for the adapters of those kinds and 1 for the others, in the set's ``kinds`` order)."""
    from lorakit.sampling import SamplerSettings

    from dataclasses import fields

    name, *opts = spec.split("+")
    kw = {"method": name, "steps": steps, "cfg": cfg}
    if name == "cmlora-official":
        kw.update(method="cmlora", cmlora_mode="official")
    types = {f.name: f.type for f in fields(SamplerSettings)}
    shorthand = {"ubase": "uncond=base", "parts": "prompt_parts=per-adapter"}
    for opt in opts:
        key, _, value = shorthand.get(opt, opt).partition("=")
        if key == "kg" and value:
            gains = {k: float(g) for k, g in (item.split(":") for item in value.split(","))}
            kw["adapter_guidance"] = tuple(gains.get(k, 1.0) for k in (kinds or []))
            continue
        if key not in types or not value:
            raise ValueError(f"method spec {spec!r}: option {opt!r} is not ubase, parts, kg=KIND:G or a "
                             "SamplerSettings key=value")
        kw[key] = {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
    return SamplerSettings(**kw)


def make_sets(args) -> list[dict]:
    """``[{id, n, concepts: {kind: name}, prompt}]`` for every character and size (``--world v2``: the v2 sets of
    :mod:`lorakit.toyworld.v2.composition` of ``--sizes``, only ``--sets`` when given)."""
    if args.world == "v2":
        from lorakit.toyworld.v2.composition import composition_sets

        sets = composition_sets(tuple(args.sizes))
        unknown = sorted(set(args.sets or ()) - {s["id"] for s in sets})
        if unknown:
            raise ValueError(f"--sets {' '.join(unknown)}: no such v2 set at sizes {args.sizes}")
        return [s for s in sets if not args.sets or s["id"] in args.sets]
    from lorakit.toyworld.render import Scene, caption

    sets = []
    for n in args.sizes:
        for char in args.characters:
            for obj in args.objects if n >= 3 else [None]:
                concepts = {"character": char, "style": args.style}
                if obj is not None:
                    concepts["object"] = obj
                if n >= 4:
                    concepts["background"] = args.background
                scene = Scene(characters=(char,), objects=(obj,) if obj else (), style=args.style,
                              background=concepts.get("background", "plain"))
                sets.append({"id": f"n{n}-" + "-".join(concepts.values()), "n": n, "concepts": concepts,
                             "prompt": caption(scene)})
    return sets


def find_adapter(folder: Path, concept: str) -> Path:
    """The concept's LoRA of today's recipe and base in ``folder`` (``toy_<concept>-<recipe hash>.safetensors``,
    :func:`lorakit.toyworld.loras.concept_lora_path`), else the newest ``toy_<concept>-*.safetensors`` there."""
    from lorakit.toyworld.loras import concept_lora_path

    current = concept_lora_path(concept, folder)
    if current.exists():
        return current
    found = sorted(folder.glob(f"toy_{concept}-*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no toy_{concept}-*.safetensors in {folder}; train it with "
                                f"python tools/ci_artifacts.py --out {folder.parent} --skip-hypernet --concepts {concept}")
    return found[-1]


def scorer(args):
    """``score(images, set) -> probabilities [N, concepts]`` of the world's oracle, in the set's slot order."""
    if args.world == "v1":
        from lorakit.toyworld.oracle import score

        return lambda images, s: score(images, list(s["concepts"].values())).probs
    from lorakit.toyworld.v2.composition import presence
    from lorakit.toyworld.v2.oracle import Oracle

    oracle = Oracle.load(args.oracle)
    return lambda images, s: presence(oracle, images, s["concepts"])["probs"]


def run_set(pipe, loaded: dict, set_: dict, spec: str, args, done_seeds=frozenset(), sink=None) -> list[dict]:
    """Generate and score one set's images with one method (the seeds not in ``done_seeds``); one record per
    image, each batch's records passed to ``sink`` as soon as they exist (so an interrupted run resumes)."""
    from lorakit.sampling import category_sequence, generate

    score = args.score if hasattr(args, "score") else scorer(args)

    kinds = list(set_["concepts"])
    adapters = [replace(loaded[c], weight=args.scale * args.kind_scale.get(kind, 1.0))
                for kind, c in set_["concepts"].items()]
    order, n_rot = category_sequence(kinds)
    settings = method_settings(spec, args.steps, args.cfg, kinds)
    records, names = [], list(set_["concepts"].values())
    todo = [s for s in range(args.seed_start, args.seed_start + args.k) if s not in done_seeds]
    for start in range(0, len(todo), args.batch):
        if args.time_limit and time.perf_counter() - T_START > args.time_limit:
            break
        seeds = todo[start:start + args.batch]
        t0 = time.perf_counter()
        images, _ = generate(pipe, adapters, settings, set_["prompt"], "", seeds, order=order, n_rotation=n_rot)
        seconds = (time.perf_counter() - t0) / len(seeds)
        verdict = score(images, set_)
        batch = []
        for i, seed in enumerate(seeds):
            probs = [float(p) for p in verdict[i]]
            batch.append({"method": spec, "set": set_["id"], "n": set_["n"], "seed": seed, "kinds": kinds,
                          "probs": dict(zip(names, probs)), "present": [p >= 0.5 for p in probs],
                          "all": all(p >= 0.5 for p in probs), "s_per_image": seconds})
        if sink is not None:
            sink(batch)
        records += batch
    return records


def summarise(records: list[dict], methods: list[str]) -> list[dict]:
    """Rates with Wilson intervals per (method, N) and paired comparisons against every reference."""
    out, by = [], {}
    for r in records:
        by.setdefault((r["method"], r["n"]), {})[(r["set"], r["seed"])] = r
    for (method, n), recs in sorted(by.items()):
        k, total = sum(r["all"] for r in recs.values()), len(recs)
        lo, hi = wilson(k, total)
        found = {}  # per kind over the images whose set has that kind, and character + style together
        for r in recs.values():
            verdicts = dict(zip(_kinds(r), r["present"]))
            for kind, ok in verdicts.items():
                found.setdefault(kind, []).append(ok)
            if "style" in verdicts:
                found.setdefault("cs", []).append(verdicts["character"] and verdicts["style"])
        cs = found.pop("cs", [])
        out.append({"method": method, "n_adapters": n, "all_present": round(k / total, 3), "n": total,
                    "wilson95": [round(lo, 3), round(hi, 3)],
                    "per_kind": {kind: round(sum(v) / len(v), 3) for kind, v in found.items()},
                    "character_and_style": round(sum(cs) / len(cs), 3) if cs else None,
                    "character_and_style_wilson95": [round(v, 3) for v in wilson(sum(cs), len(cs))] if cs else None,
                    "character_and_style_n": len(cs),
                    "s_per_image": round(sum(r["s_per_image"] for r in recs.values()) / total, 3)})
    for (method, n), recs in sorted(by.items()):
        for ref in REFERENCES:
            if ref == method or (ref, n) not in by or method not in methods:
                continue
            keys = recs.keys() & by[(ref, n)].keys()
            row = {"method": method, "vs": ref, "n_adapters": n, "pairs": len(keys)}
            for label, ok in (("all", lambda r: r["all"]), ("cs", _character_and_style)):
                wins = sum(ok(recs[x]) and not ok(by[(ref, n)][x]) for x in keys)
                losses = sum(ok(by[(ref, n)][x]) and not ok(recs[x]) for x in keys)
                row.update({f"{label}_wins": wins, f"{label}_losses": losses,
                            f"{label}_mcnemar_p": round(mcnemar_exact(wins, losses), 5)})
            out.append(row)
    return out


def _kinds(record: dict) -> list[str]:
    """The kind of each verdict of an image record (v1 records have the v1 sets' fixed order)."""
    return record.get("kinds") or list(("character", "style", "object", "background")[:record["n"]])


def _character_and_style(record: dict) -> bool:
    verdicts = dict(zip(_kinds(record), record["present"]))
    return bool(verdicts.get("character") and verdicts.get("style"))


def markdown(rows: list[dict]) -> str:
    """The summary as markdown tables, one per N: rate [95% CI], per kind, and the paired all-present test against
    each reference (wins / losses, exact McNemar p)."""
    lines = []
    for n in sorted({r["n_adapters"] for r in rows}):
        rates = [r for r in rows if r["n_adapters"] == n and "vs" not in r]
        kinds = list(dict.fromkeys(kind for r in rates for kind in r["per_kind"]))
        refs = [ref for ref in REFERENCES if any(r["method"] == ref for r in rates)]
        lines += ["", f"| method (N = {n}) | n | all present [95% CI] | " + " | ".join(kinds) +
                  " | character + style [95% CI] | " + " | ".join(f"vs {ref}: W / L, p" for ref in refs) + " |",
                  "|---" * (4 + len(kinds) + len(refs)) + "|"]
        for r in rates:
            k = round(r["all_present"] * r["n"])
            pairs = []
            for ref in refs:
                pr = next((x for x in rows if x.get("vs") == ref and x["method"] == r["method"] and x["n_adapters"] == n), None)
                pairs.append("-" if pr is None else f"{pr['all_wins']} / {pr['all_losses']}, {pr['all_mcnemar_p']:.2g}")
            lines.append(f"| {r['method']} | {r['n']} | {k}/{r['n']} = {r['all_present']:.2f} "
                         f"[{r['wilson95'][0]:.2f}, {r['wilson95'][1]:.2f}] | "
                         + " | ".join(f"{r['per_kind'][kind]:.2f}" if kind in r["per_kind"] else "-" for kind in kinds)
                         + f" | {_cs_cell(r)} | " + " | ".join(pairs) + " |")
    return "\n".join(lines)


def _cs_cell(row: dict) -> str:
    if row["character_and_style"] is None:
        return "-"
    lo, hi = row["character_and_style_wilson95"]
    n = row.get("character_and_style_n", row["n"])
    return f"{round(row['character_and_style'] * n)}/{n} [{lo:.2f}, {hi:.2f}]"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=("v1", "v2"), default="v1",
                    help="v2: the v2 sets (--sizes, --sets), the v2 recipe LoRAs in --adapters-dir (default "
                    "artifacts/toy2_loras) on --base (default data/toy2-base), the v2 oracle --oracle (default "
                    "data/toy2-oracle)")
    ap.add_argument("--adapters-dir")
    ap.add_argument("--base")
    ap.add_argument("--oracle", help="--world v2: the v2 oracle folder")
    ap.add_argument("--sets", nargs="+", metavar="ID", help="--world v2: only these set ids (n2-kwibbit-nocturo ...)")
    ap.add_argument("--characters", nargs="+", default=["frog", "robot", "ghost"])
    ap.add_argument("--style", default="ink")
    ap.add_argument("--objects", nargs="+", default=["tophat", "mushroom"])
    ap.add_argument("--background", default="starry")
    ap.add_argument("--sizes", nargs="+", type=int, default=[3, 4])
    ap.add_argument("--methods", nargs="+", default=["merge", "switch", "composite", "cmlora-official", "cmlora",
                                                     "composite+ubase", "delta", "merge+ubase"])
    ap.add_argument("--k", type=int, default=11,
                    help="images per set and method (default 11: 66 images per cell with 6 sets)")
    ap.add_argument("--seed-start", type=int, default=0,
                    help="seeds seed_start..seed_start+k-1 (choose settings on one range, report on another)")
    ap.add_argument("--batch", type=int, default=4, help="images per generate call")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0, help="the toy base's guidance (as lorakit demo)")
    ap.add_argument("--scale", type=float, default=0.8, help="LoRA scale of every adapter (the references' 0.8)")
    ap.add_argument("--kind-scale", nargs="+", default=[], metavar="KIND=F",
                    help="multiply one kind's LoRA scale, e.g. object=1.5 (every method alike)")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="seconds: start no new batch after this (0: none); a rerun resumes where it stopped")
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary-only", action="store_true", help="summarise OUT/images.jsonl, generate nothing")
    ap.add_argument("--markdown", action="store_true", help="with --summary-only: also print markdown tables")
    return ap


def _v2_adapters(args, names: list[str], ap) -> list[Path]:
    from lorakit.toyworld.v2.composition import find_adapters

    found = find_adapters(args.adapters_dir, args.base, names)
    lacking = [n for n in names if n not in found]
    if lacking:
        ap.error(f"no v2 LoRA of {', '.join(lacking)} on base {args.base} in {args.adapters_dir} (train them: python "
                 f"tools/train_toy2_loras.py --base {args.base} --out {args.adapters_dir} --identities {' '.join(lacking)})")
    return [found[n] for n in names]


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    v2 = args.world == "v2"
    args.adapters_dir = args.adapters_dir or str(ROOT / "artifacts" / ("toy2_loras" if v2 else "adapters"))
    args.base = args.base or str(ROOT / "data" / ("toy2-base" if v2 else "toy-base"))
    args.oracle = args.oracle or (str(ROOT / "data" / "toy2-oracle") if v2 else None)
    try:
        args.kind_scale = {k: float(v) for k, v in (item.split("=") for item in args.kind_scale)}
    except ValueError:
        ap.error(f"--kind-scale {' '.join(args.kind_scale)}: expected KIND=FACTOR, e.g. object=1.5")
    if args.summary_only:
        records = [json.loads(line) for line in (Path(args.out) / "images.jsonl").read_text().splitlines()]
        rows = summarise(records, args.methods)
        for row in rows:
            print(json.dumps(row))
        if args.markdown:
            print(markdown(rows))
        return

    import torch

    from lorakit.logs import quiet_loaded_libraries
    from lorakit.sampling import load_adapters, load_pipeline

    torch.set_num_threads(1)
    quiet_loaded_libraries()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "images.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {}
    for r in records:
        done.setdefault((r["method"], r["set"]), set()).add(r["seed"])
    try:
        sets = make_sets(args)
    except ValueError as err:
        ap.error(str(err))
    names = sorted({c for s in sets for c in s["concepts"].values()})
    files = [find_adapter(Path(args.adapters_dir), c) for c in names] if not v2 else _v2_adapters(args, names, ap)
    args.score = scorer(args)
    pipe = load_pipeline(args.base, "fp32")
    loaded = dict(zip(names, load_adapters(pipe, files)))

    def sink(batch):
        with log.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in batch)

    for set_ in sets:
        for spec in args.methods:
            recs = run_set(pipe, loaded, set_, spec, args, done.get((spec, set_["id"]), set()), sink)
            records += recs
            if recs:
                print(json.dumps({"done": spec, "set": set_["id"], "images": len(recs),
                                  "all_present": sum(r["all"] for r in recs) / len(recs)}), file=sys.stderr, flush=True)
    summary = summarise(records, args.methods)
    (out / "summary.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "score"}, "files": [str(f) for f in files],
                                                  "rows": summary}, indent=1))
    for row in summary:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
