"""CI-trained artifacts: the toy concept LoRAs, a toy LoRA.rar hypernetwork on them, and a slice of the toy
ComposLoRA benchmark. ``.ci/run`` calls this after the tests.

    python tools/ci_artifacts.py --out artifacts --jobs 2              # all three stages, 2 LoRAs at a time
    python tools/ci_artifacts.py --out artifacts --skip-bench          # only the (cached) trainings
    python tools/ci_artifacts.py --lora-override max_steps=2 --hypernet-override max_steps=2 --skip-bench

Stages (each prints JSON lines: what it trains or reuses, and its wall time):

1. ``adapters``: one LoRA per held-out toy concept (``lorakit.toyworld.concepts.HELDOUT``) from its recipe
   ``train_configs/toy_<concept>.yaml`` with ``lorakit.toyworld.loras.train_concept_lora`` into
   ``OUT/adapters/toy_<concept>-<hash>.safetensors``. The hash covers the resolved recipe, the base weights and
   the concept's images, so an unchanged recipe is reused and any change retrains. Files of the same concept with
   another hash are moved to ``OUT/stale/adapters/`` (leftovers of interrupted runs over 6 hours old are deleted), so the benchmark,
   which finds adapters by their ``lorakit.trigger``, sees exactly the current ones. Then (unless ``--skip-v2``)
   toy world v2's recipe LoRAs of the identities of ``--v2-sets`` (``OUT/adapters/toy2_<identity>-<hash>``, the
   cache ``lorakit demo`` reads).
2. ``hypernet``: ``train_configs/toy_lorarar.yaml`` trained on those LoRAs (content = characters + objects,
   style = styles, references = each LoRA's training images) into ``OUT/hypernet/toy_lorarar-<hash>.safetensors``
   (hash: resolved recipe, input LoRA bytes, base weights). One content LoRA is held out of training and its pair
   with a style (by default the first character + style set of the benchmark slice) is the recipe's
   ``eval_pairs``, so the benchmark's lorarar row merges a pair the network never saw.
3. ``bench``: ``tools/bench_composition.py`` on a small slice (``--sets-per-size``, ``--k``, ``--sizes``,
   ``--bench-steps``; all methods) into ``OUT/bench_composition/`` (table.md, summary.json, results.jsonl, images;
   the per-set fused models are deleted afterwards unless ``--keep-fused``); then the same on toy world v2
   (``--world v2``, the sets of ``--v2-sets``, every method but lorarar) into ``OUT/bench_composition_v2/``.

A failing stage stops the run with exit status 1 and a ``{"stage": ..., "error": ...}`` line naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HYPERNET_RECIPE = ROOT / "train_configs" / "toy_lorarar.yaml"
V2_SETS = ("n2-kwibbit-nocturo",)


def emit(record: dict) -> None:
    """One JSON line on stdout."""
    print(json.dumps(record, default=str), flush=True)


class StageError(RuntimeError):
    """A stage that failed; the message names the stage and what went wrong."""


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


LEFTOVER_AGE_S = 6 * 3600  # a temp run folder / .tmp file younger than this may belong to a run in progress


def remove_stale(folder: Path, prefix: str, keep: Path) -> list[str]:
    """Clear ``folder/<prefix>-*`` except ``keep`` and its sidecars (``keep.name`` + anything, e.g. the
    benchmark's ``.profile.json``): other ``.safetensors`` files and their sidecars (older hashes, or someone's
    experiment) are moved to ``<folder>/../stale/<folder name>/`` (out of the benchmark's sight, nothing lost);
    leftovers of interrupted runs (``.tmp`` files, temp run folders) are deleted once they are ``LEFTOVER_AGE_S``
    old: a younger one may be another process's training in progress (the cache is shared by the demo, the tests
    and CI).

    Returns:
        The names cleared.
    """
    gone = []
    for p in sorted(folder.glob(f"{prefix}-*")):
        if p.name.startswith(keep.name):
            continue
        leftover = not (p.is_file() and (p.suffix == ".safetensors" or ".safetensors." in p.name))
        if leftover and time.time() - p.stat().st_mtime < LEFTOVER_AGE_S:
            continue
        if p.is_file() and (p.suffix == ".safetensors" or ".safetensors." in p.name):
            trash = folder.parent / "stale" / folder.name
            trash.mkdir(parents=True, exist_ok=True)
            os.replace(p, trash / p.name)
        else:
            _remove(p)
        gone.append(p.name)
    return gone


def _snapshot(folder: Path, prefix: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.glob(f"{prefix}-*.safetensors")}


# ---------------------------------------------------------------------------------------------- adapters


def train_adapters(out: Path, overrides: list[str], concepts: list[str] | None = None, force: bool = False,
                   base: str | None = None, jobs: int = 1, threads: int = 1, pool=None) -> dict[str, Path]:
    """Stage 1: the held-out concept LoRAs in ``out`` (trained or reused), stale files cleared (``remove_stale``).

    Args:
        jobs: LoRAs trained at a time (>1: that many worker processes with ``threads`` torch threads each).
        pool: a worker pool (:func:`worker_pool`) to train in instead, shared with another stage's LoRAs.
    Returns:
        ``{concept name: adapter file}``.
    Raises:
        StageError naming the concept whose training failed, or when the benchmark's adapter lookup
        (``find_adapters``) would not see exactly these files.
    """
    from lorakit.toyworld.concepts import HELDOUT
    from lorakit.toyworld.loras import train_concept_lora

    out.mkdir(parents=True, exist_ok=True)
    names = concepts or [c.name for c in HELDOUT]
    files = start_cached("adapters", "concept", out, names, "toy_", train_concept_lora,
                         lambda n: (n, out, base, overrides, force), overrides, jobs, threads, pool)()
    check_adapter_lookup(out, files)
    return {n: files[n] for n in names}


def start_cached(stage: str, what: str, out: Path, names, prefix: str, train_fn, fn_args, overrides, jobs: int,
                 threads: int, pool=None):
    """Train (or reuse) ``train_fn(*fn_args(name))`` for each name (a LoRA file ``out/<prefix><name>-<hash>``),
    one JSON line each (trained or reused, the stale files cleared by ``remove_stale``). With ``pool`` the
    trainings are queued there at once; the returned ``wait()`` gives ``{name: file}`` when they are done (without
    a pool, ``wait()`` does the training).

    Raises (from ``wait()``):
        StageError naming the ``what`` (concept / identity) whose training failed.
    """
    before = {n: _snapshot(out, f"{prefix}{n}") for n in names}
    t0 = time.perf_counter()
    files: dict[str, Path] = {}

    def finish(name: str, get_path) -> None:
        try:
            path = Path(get_path())
        except Exception as err:  # noqa: BLE001 - reported with the name, then the run stops
            raise StageError(f"{stage}: training the {name!r} LoRA (train_configs/{prefix}{name}.yaml, overrides "
                             f"{overrides}) failed: {type(err).__name__}: {err}") from err
        trained = path not in before[name] or before[name][path] != path.stat().st_mtime_ns
        files[name] = path
        emit({"stage": stage, what: name, "action": "trained" if trained else "reused", "file": str(path),
              "removed": remove_stale(out, f"{prefix}{name}", path), "elapsed_s": round(time.perf_counter() - t0, 2)})

    if pool is not None:
        done = _queue(pool, names, train_fn, fn_args, finish)
        return lambda: (done(), files)[1]
    return lambda: (_train_each(names, train_fn, fn_args, finish, jobs, threads), files)[1]


def worker_pool(jobs: int, threads: int):
    """``jobs`` spawned worker processes with ``threads`` torch threads each (a context manager)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the workers' torch at import
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=torch.set_num_threads, initargs=(threads,))


def _queue(pool, names, train_fn, fn_args, finish):
    """Queue ``train_fn(*fn_args(name))`` for each name in ``pool`` now; the returned ``done()`` calls
    ``finish(name, future.result)`` in order (on an error the queued trainings are cancelled)."""
    futures = {n: pool.submit(train_fn, *fn_args(n)) for n in names}

    def done() -> None:
        try:
            for name in names:
                finish(name, futures[name].result)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # do not start the queued ones
            raise

    return done


def _train_each(names, train_fn, fn_args, finish, jobs: int, threads: int) -> None:
    """``finish(name, get_path)`` for each name, ``get_path`` returning ``train_fn(*fn_args(name))``: in this
    process (``jobs`` <= 1), or in ``jobs`` worker processes with ``threads`` torch threads each."""
    if jobs <= 1:
        for name in names:
            finish(name, lambda name=name: train_fn(*fn_args(name)))
        return
    with worker_pool(jobs, threads) as pool:
        _queue(pool, names, train_fn, fn_args, finish)()


def start_v2_adapters(out: Path, identities: list[str], overrides: list[str], force: bool = False,
                      jobs: int = 1, threads: int = 1, pool=None):
    """Stage 1, toy world v2: each identity's recipe LoRA (``train_configs/toy2_<identity>.yaml``) on the bundled
    v2 base, in ``out`` (the cache ``lorakit demo`` reads, so the demo's pair is trained once), stale files of
    the same identity cleared (``remove_stale``).

    With ``pool``, queued there at once (see :func:`start_cached`).

    Returns:
        ``wait()``, which gives ``{identity: adapter file}``.
    Raises (from ``wait()``):
        StageError naming the identity whose training failed. (The v2 benchmark finds a LoRA by its recipe hash,
        so files of other hashes in ``out`` cannot be taken for it.)
    """
    from lorakit.toyworld.v2.loras import train_identity_lora
    from lorakit.toyworld.v2.models import DEFAULT_BASE

    out.mkdir(parents=True, exist_ok=True)
    return start_cached("adapters-v2", "identity", out, identities, "toy2_", train_identity_lora,
                        lambda n: (n, out, DEFAULT_BASE, overrides, force), overrides, jobs, threads, pool)


def check_adapter_lookup(out: Path, files: dict[str, Path]) -> None:
    """The benchmark finds adapters by ``lorakit.trigger`` under ``out``: make sure it finds exactly ``files``."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from bench_composition import find_adapters
    finally:
        sys.path.pop(0)
    found = find_adapters(out)
    wrong = {n: str(found.get(n)) for n, p in files.items() if found.get(n) is None or found[n].resolve() != p.resolve()}
    if wrong:
        raise StageError(f"adapters: find_adapters({out}) picks other files than the current ones for {wrong}; "
                         f"remove the other .safetensors carrying those triggers from {out}")


# ---------------------------------------------------------------------------------------------- hypernet


def split_loras(files: dict[str, Path], holdout: tuple[str, str] | None):
    """content = characters + objects, style = styles; the held-out content LoRA is left out of training.

    Each LoRA is named with its references, ``{path, images: data/toy/<concept>}`` (the concept's training images
    in this checkout), never left to the folder recorded in the LoRA's metadata: a cached LoRA trained in another
    checkout records that checkout's folder, which may be gone; the references were then generated with each LoRA
    alone instead, so the same files gave other held-out losses depending on which checkouts still existed.

    Returns:
        ``(content entries, style entries, eval pairs [[content entry, style entry]])``.
    """
    from lorakit.toyworld.concepts import CONCEPTS

    def entry(n: str) -> dict:
        return {"path": str(files[n]), "images": str(ROOT / "data" / "toy" / n)}

    kind = {n: CONCEPTS[n].kind for n in files}
    content = [n for n in files if kind[n] in ("character", "object")]
    style = [n for n in files if kind[n] == "style"]
    evals = []
    if holdout:
        c, s = holdout
        if c not in content or s not in style:
            raise StageError(f"hypernet: held-out pair {c} + {s}: expected a character/object LoRA and a style LoRA "
                             f"among {sorted(files)}")
        content.remove(c)
        evals = [[entry(c), entry(s)]]
    if not content or not style:
        raise StageError(f"hypernet: need content (character/object) and style LoRAs to train on, got content "
                         f"{content}, style {style}")
    return [entry(n) for n in content], [entry(n) for n in style], evals


def _sha_tensors(path: str | Path) -> str:
    """SHA-256 of a safetensors file's tensors (names, dtypes, shapes, bytes), not of its metadata: a LoRA's
    metadata records the checkout it was trained in, which must not change what it hashes to."""
    import torch

    from lorakit.fileio import load_safetensors

    tensors, _ = load_safetensors(path)
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _sha_entry(spec: dict) -> dict:
    """A LoRA entry by content: its tensors' hash and the hash of its reference images (names + bytes)."""
    from lorakit.toyworld.loras import tree_hash

    out = {"path": _sha_tensors(spec["path"])}
    if spec.get("images"):
        out["images"] = tree_hash(Path(spec["images"]))
    if spec.get("prompt"):
        out["prompt"] = spec["prompt"]
    return out


def hypernet_hash(cfg) -> str:
    """Hash of what determines the hypernetwork: resolved recipe (minus output/logging keys; LoRAs replaced by
    their tensors' SHA-256 and their reference images' hash, so neither the folders nor the checkout they were
    trained in matter) and the base weights."""
    from omegaconf import OmegaConf

    from lorakit.toyworld.loras import RUN_ONLY_KEYS, content_hash

    r = OmegaConf.to_container(cfg, resolve=True)
    for key in RUN_ONLY_KEYS + ("resume",):
        r.pop(key, None)
    r["content"] = [_sha_entry(e) for e in r["content"]]
    r["style"] = [_sha_entry(e) for e in r["style"]]
    r["eval_pairs"] = [[_sha_entry(e) for e in pair] for pair in r["eval_pairs"]]
    base = Path(str(r.pop("base_model")))
    return content_hash(r, base)


def hypernet_config(files: dict[str, Path], overrides: list[str], holdout, base: str | None = None,
                    entries: dict | None = None):
    """The toy LoRA.rar recipe pointed at the trained toy LoRAs (synthetic LoRAs off, 32-px references =
    the LoRAs' own training images at the base's resolution), plus ``overrides``. ``entries`` (``content``,
    ``style``, ``eval_pairs`` lists of ``{path, images}``) replaces the v1 split of ``files`` and ``holdout``."""
    from omegaconf import OmegaConf

    from lorakit.config import load_config
    from lorakit.training.lorarar import LoraRarConfig

    if entries is None:
        content, style, evals = split_loras(files, holdout)
        entries = {"content": content, "style": style, "eval_pairs": evals}
    ov = [f"base_model={base or ROOT / 'data' / 'toy-base'}", "synthetic.content=0", "synthetic.style=0",
          "synthetic.eval_pairs=0", "reference_size=0"] + list(overrides)
    cfg = load_config(LoraRarConfig, HYPERNET_RECIPE, ov)
    return OmegaConf.merge(cfg, entries)


def train_hypernet(files: dict[str, Path], out: Path, overrides: list[str], holdout, force: bool = False,
                   base: str | None = None) -> Path:
    """Stage 2: the toy LoRA.rar hypernetwork on ``files`` in ``out`` (trained or reused), stale files cleared."""
    try:
        cfg = hypernet_config(files, overrides, holdout, base)
    except StageError:
        raise
    except Exception as err:  # noqa: BLE001
        raise StageError(f"hypernet: bad recipe {HYPERNET_RECIPE} with overrides {overrides}: "
                         f"{type(err).__name__}: {err}") from err
    return train_hypernet_config(cfg, out, force=force)


def train_hypernet_config(cfg, out: Path, force: bool = False, prefix: str = "toy_lorarar") -> Path:
    """The hypernetwork of ``cfg`` (:func:`hypernet_config`) as ``out/<prefix>-<hash>.safetensors``, trained or
    reused; older ``<prefix>-*`` files there removed."""
    from omegaconf import OmegaConf

    from lorakit.fileio import copy_file
    from lorakit.training.lorarar import train

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        target = out / f"{prefix}-{hypernet_hash(cfg)}.safetensors"
    except Exception as err:  # noqa: BLE001
        raise StageError(f"hypernet: cannot read the LoRAs or references of the recipe: "
                         f"{type(err).__name__}: {err}") from err
    trained = force or not target.exists()
    if trained:
        with tempfile.TemporaryDirectory(prefix=f"{prefix}-", dir=out) as work:
            run = OmegaConf.merge(cfg, {"output_dir": work, "checkpointing_steps": 0, "checkpoint_at_end": False,
                                        "save_every": 0, "logging": "none"})
            try:
                result = train(run)
            except Exception as err:  # noqa: BLE001
                raise StageError(f"hypernet: training {HYPERNET_RECIPE.name} on {len(cfg.content)} content x "
                                 f"{len(cfg.style)} style LoRAs failed: {type(err).__name__}: {err}") from err
            copy_file(result.final_path, target)
    removed = remove_stale(out, prefix, target)
    emit({"stage": "hypernet", "action": "trained" if trained else "reused", "file": str(target),
          "content": [Path(e.path).name for e in cfg.content], "style": [Path(e.path).name for e in cfg.style],
          "held_out": [[Path(e.path).name for e in pair] for pair in cfg.eval_pairs],
          "eval": held_out_losses(target), "removed": removed, "seconds": round(time.perf_counter() - t0, 2)})
    return target


def held_out_losses(path: Path) -> list[dict]:
    """The held-out rows (plain sum / untrained / trained loss) stored in the hypernetwork's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        rows = json.loads((f.metadata() or {}).get("lorakit.eval", "[]"))
    return [{k: (Path(v).name if k in ("content", "style") else round(v, 5)) for k, v in r.items()} for r in rows]


# ------------------------------------------------------------------------------------------------- bench


def bench_argv(args, adapters: Path, hypernet: Path | None, out: Path) -> list[str]:
    """Command line of ``tools/bench_composition.py`` for the slice."""
    argv = [sys.executable, str(ROOT / "tools" / "bench_composition.py"), "--adapters-dir", str(adapters),
            "--out", str(out), "--sets-per-size", str(args.sets_per_size), "--k", str(args.k),
            "--steps", str(args.bench_steps), "--seed", str(args.seed), "--sizes", *map(str, args.sizes),
            "--methods", *args.methods]
    if args.base:
        argv += ["--base", args.base]
    if hypernet is not None:
        argv += ["--hypernet", str(hypernet)]
    return argv


def run_bench(args, adapters: Path, hypernet: Path | None, out: Path) -> None:
    """Stage 3: the benchmark slice in a subprocess (its output streams through)."""
    if "lorarar" in args.methods and hypernet is None:
        raise StageError("bench: --methods lorarar needs the hypernet stage (drop lorarar or do not skip it)")
    bench_subprocess("bench", bench_argv(args, adapters, hypernet, out), out, args)


def bench_subprocess(stage: str, argv: list[str], out: Path, args) -> None:
    """Run ``tools/bench_composition.py`` (``argv``) into ``out``, replaced first (results.jsonl / images of an
    earlier slice must not mix with this one); the per-set fused models (a full pipeline per gradient set:
    intermediates) are removed afterwards unless ``--keep-fused``."""
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise StageError(f"{stage}: tools/bench_composition.py exited with status {proc.returncode} (its messages "
                         "are above)")
    removed = []
    if not args.keep_fused and (out / "fused").exists():
        shutil.rmtree(out / "fused")
        removed.append("fused")
    emit({"stage": stage, "out": str(out), "table": str(out / "table.md"), "summary": str(out / "summary.json"),
          "removed": removed, "seconds": round(time.perf_counter() - t0, 2)})


def v2_identities(set_ids) -> list[str]:
    """The identities of the v2 benchmark sets ``set_ids`` (StageError naming an unknown set)."""
    from lorakit.toyworld.v2.composition import composition_sets

    known = {s["id"]: s for s in composition_sets((2, 3, 4), None, 0)}
    unknown = [i for i in set_ids if i not in known]
    if unknown:
        raise StageError(f"adapters-v2: --v2-sets {' '.join(unknown)}: no such v2 set (e.g. {V2_SETS[0]}; "
                         "tools/bench_composition.py --world v2 --dry-run lists them)")
    return list(dict.fromkeys(c for i in set_ids for c in known[i]["concepts"].values()))


def run_bench_v2(args, adapters: Path, out: Path) -> None:
    """Stage 3, toy world v2: the benchmark on ``--v2-sets`` (every method but lorarar, which is v1's) with the
    LoRAs of stage 1."""
    argv = [sys.executable, str(ROOT / "tools" / "bench_composition.py"), "--world", "v2", "--adapters-dir",
            str(adapters), "--out", str(out), "--sets", *args.v2_sets, "--sizes", "2", "3", "4", "--k", str(args.k),
            "--steps", str(args.bench_steps), "--seed", str(args.seed),
            "--methods", *[m for m in args.methods if m != "lorarar"]]
    bench_subprocess("bench-v2", argv, out, args)


def default_holdout(args) -> tuple[str, str] | None:
    """The first character + style set of the benchmark slice (the pair the lorarar row merges), else ghost + ink."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from bench_composition import composition_sets
    finally:
        sys.path.pop(0)
    for s in composition_sets(tuple(args.sizes), args.sets_per_size, args.seed):
        if set(s["concepts"]) == {"character", "style"}:
            return s["concepts"]["character"], s["concepts"]["style"]
    return "ghost", "ink"


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="artifacts", help="artifacts folder (adapters/, hypernet/, bench_composition/)")
    p.add_argument("--base", help="toy base folder (default: data/toy-base)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: the toy models are too small to gain from more, and "
                   "extra threads stall badly on a busy machine)")
    p.add_argument("--jobs", type=int, default=1, help="LoRAs trained at a time, in worker processes (e.g. $(nproc))")
    p.add_argument("--verbose", action="store_true", help="show the libraries' notices and loading bars too")
    p.add_argument("--lora-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override of every concept recipe (e.g. max_steps=2; changes the hash); repeatable")
    p.add_argument("--hypernet-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override of train_configs/toy_lorarar.yaml (e.g. max_steps=2); repeatable")
    p.add_argument("--concepts", nargs="+", help="only these held-out concepts (default: all nine)")
    p.add_argument("--holdout", nargs=2, metavar=("CONTENT", "STYLE"),
                   help="pair kept out of hypernet training (default: the slice's first character + style set)")
    p.add_argument("--force", action="store_true", help="retrain even when the hash matches")
    p.add_argument("--skip-hypernet", action="store_true", help="stop after the adapters (implies --skip-bench)")
    p.add_argument("--skip-bench", action="store_true", help="train (or reuse) the adapters and hypernet only")
    p.add_argument("--skip-v2", action="store_true", help="no toy world v2 LoRAs and no v2 benchmark slice")
    p.add_argument("--v2-sets", nargs="+", default=list(V2_SETS), metavar="ID",
                   help=f"the v2 benchmark slice's sets (default {' '.join(V2_SETS)}: `lorakit demo`'s pair, so "
                   "the demo finds its LoRAs trained); their identities' LoRAs are trained in the adapters stage")
    g = p.add_argument_group("benchmark slice (tools/bench_composition.py)")
    g.add_argument("--sets-per-size", type=int, default=2)
    g.add_argument("--k", type=int, default=2, help="images per set and method")
    g.add_argument("--sizes", nargs="+", type=int, default=[2, 3, 4])
    g.add_argument("--bench-steps", type=int, default=20, help="sampling steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--methods", nargs="+", default=None, help="default: every method of the benchmark")
    g.add_argument("--keep-fused", action="store_true",
                   help="keep bench_composition/fused/ (the fused models of every set; ~50 MB, removed by default)")
    return p.parse_args(argv)


def train_all_adapters(args, out: Path, timed, cpu: dict) -> tuple[dict[str, Path], dict[str, Path]]:
    """Stage 1 for v1 and v2. With 2 or more jobs one pool trains both: v2's LoRAs are queued first (nocturo's
    1200 steps are the longest training), the v1 ones behind them, so no worker waits at the stage boundary.
    ``timed(name, fn)`` records each stage's wait; in the shared pool the workers' CPU seconds (counted when the
    pool closes) go to ``cpu["adapters"]``, both stages together. Returns ``(v1 files, v2 files)``."""

    def v1(pool):
        return train_adapters(out, args.lora_override, args.concepts, args.force, args.base, jobs=args.jobs,
                              threads=args.threads, pool=pool)

    def v2_start(pool):
        return start_v2_adapters(out, v2_identities(args.v2_sets), args.lora_override, args.force, args.jobs,
                                 args.threads, pool)

    if args.skip_v2:
        return timed("adapters", lambda: v1(None)), {}
    if args.jobs < 2:
        return timed("adapters", lambda: v1(None)), timed("adapters-v2", v2_start(None))
    c0 = _cpu_seconds()
    with worker_pool(args.jobs, args.threads) as pool:
        v2_wait = v2_start(pool)
        files = timed("adapters", lambda: v1(pool))
        v2_files = timed("adapters-v2", v2_wait)
    cpu["adapters"] = round(_cpu_seconds() - c0, 2)
    return files, v2_files


def main(argv=None) -> int:
    args = parse_args(argv)
    from lorakit import logs

    logs.configure("verbose" if args.verbose else None)  # before the libraries load; the workers inherit it
    from lorakit.threads import configure_threads

    configure_threads(max(1, args.threads))  # before torch loads (passive OpenMP waiting; workers inherit it)
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from bench_composition import ALL_METHODS
    finally:
        sys.path.pop(0)
    args.methods = args.methods or list(ALL_METHODS)
    out = Path(args.out)
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    stage = "adapters"

    def timed(name, fn):
        """Run one stage; record its wall seconds and CPU seconds (this process + finished children)."""
        t0, c0 = time.perf_counter(), _cpu_seconds()
        result = fn()
        times[name], cpu[name] = round(time.perf_counter() - t0, 2), round(_cpu_seconds() - c0, 2)
        return result

    try:
        files, v2_files = train_all_adapters(args, out / "adapters", timed, cpu)
        emit({"stage": "adapters", "done": len(files), "seconds": times["adapters"], "cpu_seconds": cpu["adapters"]})
        if not args.skip_v2:
            emit({"stage": "adapters-v2", "done": len(v2_files), "seconds": times["adapters-v2"]})
        if not args.skip_hypernet:
            stage = "hypernet"
            holdout = tuple(args.holdout) if args.holdout else default_holdout(args)
            hypernet = timed("hypernet", lambda: train_hypernet(files, out / "hypernet", args.hypernet_override,
                                                                holdout, args.force, args.base))
        if not (args.skip_bench or args.skip_hypernet):
            stage = "bench"
            timed("bench", lambda: run_bench(args, out / "adapters", hypernet, out / "bench_composition"))
            if not args.skip_v2:
                stage = "bench-v2"
                timed("bench-v2", lambda: run_bench_v2(args, out / "adapters", out / "bench_composition_v2"))
    except StageError as err:
        emit({"stage": stage, "error": str(err)})
        print(f"ci_artifacts: {err}", file=sys.stderr)
        return 1
    emit({"stage": "done", "seconds": times, "total_seconds": round(sum(times.values()), 2), "cpu_seconds": cpu,
          "threads": torch.get_num_threads(), "jobs": args.jobs})
    return 0


def _cpu_seconds() -> float:
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


if __name__ == "__main__":
    sys.exit(main())
