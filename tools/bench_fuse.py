"""Gradient fusion, lorakit's recipe vs the Mix-of-Show reference's, judged on held-out activations.

Two recipes fuse the same concepts from the same base, each end to end (capture + solve, timed):
  * ``lorakit``: ``fuse_gradient`` with its defaults (``--ridge auto``: per-layer ridge chosen on held-out prompts
    and seeds; text rows start..end token; to_k/to_v fitted on the padded rows the UNet reads, their ridge scored
    on held-out prompt rows without padding; every concept's prompts in the same batched passes);
  * ``reference``: our re-implementation of the official ``gradient_fusion.py`` routine (not its code): the same
    stage order, ITS OWN rows (text encoder: the unpadded prompt; to_k/to_v: tokens with id >= the end token, i.e.
    ED-LoRA pseudo-words + the end token, only the end token for a plain LoRA), one prompt per forward pass, every
    activation kept on the host, LBFGS from W0 per layer (500 iterations text encoder and to_k/to_v, 50 UNet).
Both get the same fit prompts, sampling prompts and size; each samples with its own number of steps (the
reference: ``--steps``, 20 as in its code; lorakit: its default, 10, chosen by held-out measurement, docs/fusion.md). Then every layer's weights of both fused models,
the base W0 and the weighted average ``W0 + (1/N) sum_i dW_i`` are scored on HELD-OUT activations that neither
recipe saw (other prompts with each concept's trigger, other seeds), recorded with each concept's OWN model (its
LoRA fully on: what the fused layer should reproduce):

    objective(W) = sum_i ||(W - W0 - dW_i) X_i||^2 / sum_i ||dW_i X_i||^2      (1 = no better than W0)

to_k/to_v layers are scored on two row sets: ``all`` (the padded sequence the UNet reads while sampling) and
``prompt`` (start..end token). JSON lines: one per layer (``--per-layer``), one per stage (share of layers where
lorakit <= reference and <= weighted, mean objectives, median lorakit/reference ratio), one with end-to-end times
and capture memory (wall and, for a shared CPU, CPU seconds). Every ratio comes from this one run.

    python tools/bench_fuse.py                                     # tiny SD1, 2 random trigger LoRAs, CPU
    python tools/bench_fuse.py --toy --adapters frog.safetensors ink.safetensors   # toy world, toy captions
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbfgs_fusion_reference import REFERENCE_ITERS, layer_data, lbfgs_solve  # noqa: E402

from lorakit.adapters.io import load_adapter  # noqa: E402
from lorakit.fusion.capture import GramCollector, token_rows  # noqa: E402
from lorakit.fusion.gradient import (  # noqa: E402
    Concept, GradientSettings, LayerSolution, _call_pipe, _min_resolution, fuse_gradient, stage_of,
)
from lorakit.fusion.merge import apply_deltas  # noqa: E402

EVAL_TEMPLATES = ("a {} on a table", "{} in the snow", "a close-up photo of {}")


def reference_solver(base_weights: dict, timing: dict):
    """The reference's per-layer LBFGS on the kept activations, as a ``fuse_gradient`` solver."""

    def solve(prob, stats, n_concepts):
        W0 = base_weights[prob.key]
        W0f = W0.reshape(W0.shape[0], -1).double()
        t0 = time.perf_counter()
        X, Y = layer_data(stats, prob, W0)
        W = lbfgs_solve(X, Y, W0f, REFERENCE_ITERS[stage_of(prob.key)]).double()
        timing["solve_s"] = timing.get("solve_s", 0.0) + time.perf_counter() - t0
        # the reference keeps every input and output activation (float32 here) until its layer is solved
        timing["activation_bytes"] = timing.get("activation_bytes", 0) + 4 * X.shape[0] * (X.shape[1] + Y.shape[1])
        eye = torch.eye(W0f.shape[0], dtype=torch.float64)
        return LayerSolution(up=eye, down=W - W0f, report={"stage": stage_of(prob.key), "method": "lbfgs",
                                                             "tokens": int(X.shape[0])})

    return solve


def concept_sets(adapters, names, toy: bool, n_prompts: int) -> list[dict]:
    """Per concept: fit / sampling / held-out (lorakit's ridge) / evaluation prompts and the trigger."""
    out = []
    for ad, name in zip(adapters, names):
        trig = (ad.metadata.get("lorakit.trigger") or name).strip()
        if toy:
            from lorakit.toyworld.concepts import get_concept
            from lorakit.toyworld.evaluate import concept_prompts

            c = get_concept(trig).name
            fit = concept_prompts(c, n_prompts, seed=0)
            sets = dict(fit=fit, sample=fit, val=concept_prompts(c, n_prompts, seed=1),
                        eval=concept_prompts(c, n_prompts, seed=2))
        else:
            from lorakit.fusion import HELDOUT_TEMPLATES

            sets = dict(fit=[f"photo of a {trig}", trig], sample=[f"photo of a {trig}"],
                        val=[t.format(trig) for t in HELDOUT_TEMPLATES], eval=[t.format(trig) for t in EVAL_TEMPLATES])
        out.append({"name": name, "trigger": trig, **sets})
    return out


def layer_weight(pipe, prob) -> torch.Tensor:
    model = getattr(pipe, prob.component)
    return model.get_submodule(prob.path).weight.detach().double().reshape(prob.shape[0], -1).cpu()


@torch.no_grad()
def heldout_grams(base, adapters, sets, probs, args) -> dict:
    """``{(row_set, key): {concept: G_i}}``: held-out inputs of every fused layer with concept i's own model."""
    out: dict = {}
    small = _min_resolution(base)
    for i, (ad, cs) in enumerate(zip(adapters, sets)):
        _concept_grams(out, i, base, ad, cs["eval"], probs, small, args)
    return out


def _concept_grams(out: dict, i: int, base, ad, prompts, probs, small, args) -> None:
    """Concept i's held-out Grams into ``out``, recorded with its own model (a copy of the base, freed on return)."""
    own = copy.deepcopy(base)
    apply_deltas(own, ad.modules)
    own.set_progress_bar_config(disable=True)
    device = own.unet.device
    by_comp: dict = {}
    for p in probs.values():
        by_comp.setdefault((p.component, stage_of(p.key)), {})[p.key] = (p.path, {})
    seeds = [10_000 + 100 * i + k for k in range(len(prompts) * args.eval_samples)]
    runs = []
    for (comp, stage), layers in by_comp.items():
        if stage == "text_encoder":
            tok = own.tokenizer if comp == "text_encoder" else own.tokenizer_2
            runs.append(("prompt", comp, layers, token_rows(tok, prompts, "prompt"), lambda: own.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)))
        elif stage == "cross_kv":
            for rows in ("all", "prompt"):
                runs.append((rows, comp, layers, token_rows(own.tokenizer, prompts, rows),
                             lambda: _call_pipe(own, prompts, seeds[: len(prompts)], 1, small, 1.0)))
        else:
            reps = [p for p in prompts for _ in range(args.eval_samples)]
            runs.append(("all", comp, layers, None,
                         lambda reps=reps: _call_pipe(own, reps, seeds, args.steps, args.resolution, 1.0)))
    for rows_name, comp, layers, rows, fn in runs:
        coll = GramCollector(getattr(own, comp), layers)
        with coll:
            coll.concept, coll.rows = i, rows
            fn()
        for key, st in coll.stats.items():
            out.setdefault((rows_name, key), {})[i] = st.G.cpu()


def objective(W: torch.Tensor, targets: dict, grams: dict) -> float:
    """``sum_i tr((W - W_i) G_i (W - W_i)^T)``."""
    total = 0.0
    for i, G in grams.items():
        E = W - targets[i]
        total += float((E @ G * E).sum())
    return total


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="base model (default tiny:sd1, or data/toy-base with --toy)")
    ap.add_argument("--adapters", nargs="*", help="adapter files (default: 2 random trigger LoRAs on the tiny base)")
    ap.add_argument("--network", choices=["lora", "locon"], default="lora",
                    help="the 2 random adapters: LoRA on the text encoder and attention layers, or LoCon (also convs)")
    ap.add_argument("--toy", action="store_true", help="toy-world captions as prompts (adapters: toy LoRAs)")
    ap.add_argument("--n-prompts", type=int, default=4, help="--toy: captions per set (fit, held-out, evaluation)")
    ap.add_argument("--steps", type=int, default=20,
                    help="sampling steps of the reference recipe and of the held-out evaluation (lorakit samples "
                         "with its own default, GradientSettings.steps, unless --set steps=N)")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=2, help="held-out seeds per evaluation prompt")
    ap.add_argument("--heldout-sample-prompts", type=int, default=0,
                    help="lorakit's held-out sampling prompts per concept for --ridge auto (0 = all held-out prompts)")
    ap.add_argument("--per-layer", action="store_true", help="also print one line per layer")
    ap.add_argument("--no-eval", action="store_true", help="times only: skip the held-out scoring")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference recipe (its time is 0 and its weights are W0)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="lorakit GradientSettings overrides, e.g. kv_rows=prompt ridge_target=average ridge=1e-6")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave)")
    return ap.parse_args(argv)


def load_inputs(args):
    """(base name, base pipeline, adapters, their names): ``--adapters``, or 2 random trigger LoRAs."""
    from lorakit.models import load_base
    from lorakit.testing import random_adapter

    base_name = args.base or ("data/toy-base" if args.toy else "tiny:sd1")
    base = load_base(base_name).to(args.device)
    base.set_progress_bar_config(disable=True)
    if args.adapters:
        adapters = [load_adapter(p) for p in args.adapters]
        names = [Path(p).stem for p in args.adapters]
    else:
        adapters, names = [], []
        for seed, trig in ((1, "red circle"), (2, "blue square")):
            ad = random_adapter(base, network=args.network, text_encoder=True, rank=4, alpha=4.0, seed=seed, std=0.1)
            ad.metadata["lorakit.trigger"] = trig
            adapters.append(ad)
            names.append(trig.replace(" ", "_"))
    return base_name, base, adapters, names


def parse_overrides(pairs) -> dict:
    overrides = {}
    for kv in pairs:
        k, v = kv.split("=", 1)
        for kind in (int, float, str):  # steps=10 must stay an int
            try:
                overrides[k] = kind(v)
                break
            except ValueError:
                continue
    return overrides


class Timed:
    """Wall and CPU seconds of the block (after a device sync) and, on CUDA, its peak memory."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self.peak = torch.cuda.max_memory_allocated() if self.cuda else None


def statistics_bytes(out_l) -> int:
    """Bytes of lorakit's closed-form statistics of one split (fit or held-out)."""
    def gram_dim(p):  # a conv solved in its LoRA subspace keeps an R x R Gram
        return sum(d.shape[0] for d in p.downs.values()) if "space" in out_l["layers"][p.key] else p.in_dim

    return sum(8 * (gram_dim(p) ** 2 + sum(d.shape[0] for d in p.downs.values()) * gram_dim(p))
               for p in out_l["problems"].values() if out_l["layers"][p.key]["method"] == "closed_form")


def run_reference(base, adapters, sets, common, base_w, args):
    """The reference recipe on its own copy of the base: (pipeline, LBFGS timing, Timed)."""
    # its own rows (trigger=None: a plain LoRA keeps only the end token), one prompt per pass, LBFGS
    pipe_r = copy.deepcopy(base)
    ref_concepts = [Concept(s["name"], ad, 1.0, list(s["fit"]), list(s["sample"]), trigger=None)
                    for ad, s in zip(adapters, sets)]
    timing: dict = {}
    with Timed(args.device) as timed:
        if not args.no_reference:
            # the reference's rows: kv_rows="concept" with trigger=None = ED-LoRA pseudo-words + end token, or the end
            # token alone for a plain LoRA
            ref = GradientSettings(**common, steps=args.steps, ridge=0.0, batch=1, keep_inputs=True, kv_rows="concept", max_conv_dim=10**9)
            fuse_gradient(pipe_r, ref_concepts, ref,
                          solver=reference_solver(base_w, timing))
    return pipe_r, timing, timed


def heldout_objectives(probs, base_w, grams, pipes, n_adapters, out_l, per_layer: bool) -> dict:
    """``{stage/rows: {method: [held-out objective / W0's, per layer]}}`` (one JSON line a layer with ``per_layer``)."""
    pipe_r, pipe_l = pipes
    per_stage: dict = {}
    for key, prob in probs.items():
        stage = stage_of(key)
        W0 = base_w[key].double().reshape(prob.shape[0], -1)
        targets = {i: W0 + (prob.ups[i] @ prob.downs[i]) if i in prob.ups else W0 for i in range(n_adapters)}
        Ws = {"w0": W0, "weighted": W0 + sum(prob.ups[i] @ prob.downs[i] for i in prob.ups) / n_adapters,
              "reference": layer_weight(pipe_r, prob), "lorakit": layer_weight(pipe_l, prob)}
        for rows in (("all", "prompt") if stage == "cross_kv" else ("prompt",) if stage == "text_encoder" else ("all",)):
            g = grams.get((rows, key))
            if not g:
                continue
            obj = {m: objective(W, targets, g) for m, W in Ws.items()}
            if obj["w0"] <= 0:
                continue
            rel = {m: v / obj["w0"] for m, v in obj.items() if m != "w0"}
            name = f"{stage}/{rows}" if stage == "cross_kv" else f"{stage}/conv" if prob.is_conv else stage
            if per_layer:
                print(json.dumps({"layer": key, "set": name, **{f"heldout_{m}": round(v, 6) for m, v in rel.items()},
                                  "ridge": out_l["layers"][key].get("ridge")}))
            agg = per_stage.setdefault(name, {m: [] for m in rel})
            for m, v in rel.items():
                agg[m].append(v)
    return per_stage


def print_stages(per_stage: dict) -> None:
    for name, agg in per_stage.items():
        L, R, A = agg["lorakit"], agg["reference"], agg["weighted"]
        n = len(L)
        print(json.dumps({
            "stage": name, "layers": n,
            "lorakit_le_reference": round(sum(lv <= rv * (1 + 1e-9) for lv, rv in zip(L, R)) / n, 4),
            "lorakit_le_weighted": round(sum(lv <= av * (1 + 1e-9) for lv, av in zip(L, A)) / n, 4),
            "mean_heldout_lorakit": round(statistics.fmean(L), 5),
            "mean_heldout_reference": round(statistics.fmean(R), 5),
            "mean_heldout_weighted": round(statistics.fmean(A), 5),
            "median_ratio_lorakit_over_reference": round(statistics.median(lv / max(rv, 1e-300)
                                                                           for lv, rv in zip(L, R)), 4),
        }))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_name, base, adapters, names = load_inputs(args)
    sets = concept_sets(adapters, names, args.toy, args.n_prompts)
    common = dict(resolution=args.resolution, samples=1, guidance=1.0, progress=False)

    # lorakit: defaults, end to end
    pipe_l = copy.deepcopy(base)
    concepts = [Concept(s["name"], ad, 1.0, list(s["fit"]), list(s["sample"]), list(s["val"]),
                        list(s["val"])[: args.heldout_sample_prompts or None], s["trigger"])
                for ad, s in zip(adapters, sets)]
    overrides = parse_overrides(args.set)
    with Timed(args.device) as lk:
        settings_l = GradientSettings(**{**common, **overrides})
        out_l = fuse_gradient(pipe_l, concepts, settings_l)
    probs = out_l["problems"]
    n_splits = 2  # fit + held-out statistics with ridge auto

    base_w = {k: getattr(base, p.component).get_submodule(p.path).weight.detach().cpu() for k, p in probs.items()}
    pipe_r, timing, ref = run_reference(base, adapters, sets, common, base_w, args)

    # held-out scoring
    t0 = time.perf_counter()
    grams = {} if args.no_eval else heldout_grams(base, adapters, sets, probs, args)
    t_eval = time.perf_counter() - t0
    print_stages(heldout_objectives(probs, base_w, grams, (pipe_r, pipe_l), len(adapters), out_l, args.per_layer))
    st = out_l["stages"]
    print(json.dumps({
        "base": base_name, "adapters": names, "lorakit_settings": overrides, "device": args.device, "threads": torch.get_num_threads(),
        "reference_steps": args.steps, "lorakit_steps": settings_l.steps, "resolution": args.resolution,
        "layers": len(probs),
        "lorakit_s": round(lk.seconds, 2),
        "lorakit_capture_s": round(sum(s.get("capture_s", 0) for s in st.values()), 2),
        "lorakit_solve_s": round(sum(s.get("solve_s", 0) for s in st.values()), 2),
        "reference_s": round(ref.seconds, 2), "reference_lbfgs_s": round(timing.get("solve_s", 0.0), 2),
        "reference_capture_s": round(ref.seconds - timing.get("solve_s", 0.0), 2),
        "speedup_end_to_end": round(ref.seconds / lk.seconds, 2),
        # CPU seconds of this process: on a shared CPU the wall times above include other jobs
        "lorakit_cpu_s": round(lk.cpu, 2), "reference_cpu_s": round(ref.cpu, 2),
        "speedup_end_to_end_cpu": round(ref.cpu / max(lk.cpu, 1e-9), 2),
        "lorakit_statistics_bytes": statistics_bytes(out_l) * n_splits,
        "reference_activation_bytes": timing.get("activation_bytes", 0),
        "cuda_peak_bytes_lorakit": lk.peak, "cuda_peak_bytes_reference": ref.peak,
        "heldout_eval_s": round(t_eval, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
