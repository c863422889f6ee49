"""Refit some concepts' output rows of a v2 oracle, every other weight kept bit for bit.

For a concept whose look changed (pixlor's, 2026-12-06), retraining the whole oracle would move every other
concept's scores and so every number measured with it. This gives only the named concepts a new output: a
logistic regression on the frozen network's flattened feature map (2,048 values, the oracle's ``row_head``), so
every other concept scores exactly as before (``tests/test_refit_oracle_rows.py``). (A refit of the last layer's
row alone, on its 128 inputs, found the look tried first, four console greens, in 251 of 282 images through the
VAE, against 269 for this on the same images.)

Data, as ``tools/train_oracle_v2.py`` draws it: fresh renders of the world (labelled from the scene), each row's
identity in ``--n-identity`` of its own training scenes, and ``--hard-negatives`` of its hard negatives (whose loss
counts only their row); every image once clean and once through the VAE's round trip (noisy latents) with blur /
noise / jitter / shifts. The evaluation draws all of it again from other seeds (``--seed + 1000``) and reports,
per row, recall and the rate of absent images called absent, clean and through the VAE, before and after.

    python tools/refit_oracle_rows.py --oracle data/toy2-oracle --rows pixlor --out /tmp/oracle_refit
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from toy_oracle_training import log
from train_oracle_v2 import as_float, degrade, render_hard_negatives, render_set, vae_roundtrip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--oracle", default="data/toy2-oracle", help="the v2 oracle folder to start from")
    p.add_argument("--vae", default="data/toy2-base/vae", help="v2 VAE folder for the round trips")
    p.add_argument("--rows", nargs="+", required=True, help="identities whose rows are refitted")
    p.add_argument("--out", required=True, help="new oracle folder (must not exist)")
    p.add_argument("--n-plain", type=int, default=3000, help="world renders for training")
    p.add_argument("--n-identity", type=int, default=800, help="training scenes of each row's identity")
    p.add_argument("--hard-negatives", type=int, default=600, help="hard negatives per row")
    p.add_argument("--n-eval", type=int, default=800, help="world renders for evaluation (and a third as many of "
                                                           "each identity's scenes and hard negatives)")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 weight on the refitted rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def identity_scenes(names: list[str], n: int, seed: int, concepts: list[str]):
    """``n`` training scenes of each identity -> images uint8 ``[N, 3, 64, 64]``, labels ``[N, C]``."""
    from lorakit.toyworld.oracle import presence_labels
    from lorakit.toyworld.v2.render import render
    from lorakit.toyworld.v2.scenes import concept_scene

    rng = np.random.default_rng(seed)
    scenes = [concept_scene(name, rng) for name in names for _ in range(n)]
    imgs = np.stack([np.asarray(render(s)) for s in scenes]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(imgs)), presence_labels(scenes, concepts)


def dataset(args, seed: int, n_plain: int, n_identity: int, n_hard: int, concepts: list[str], vae):
    """Clean and VAE + degraded copies of world renders, identity scenes and hard negatives:
    ``(x float [2N, 3, 64, 64], y [2N, C], mask [2N, C], through_vae bool [2N])``."""
    x, y = render_set(n_plain, seed, concepts)
    xi, yi = identity_scenes(args.rows, n_identity, seed + 10000, concepts)
    xh, yh, mh = render_hard_negatives(n_hard, seed + 20000, concepts, args.rows)
    x, y = torch.cat([x, xi, xh]), torch.cat([y, yi, yh])
    mask = torch.cat([torch.ones(len(x) - len(xh), len(concepts)), mh])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        xv = degrade(as_float(vae_roundtrip(vae, x, gen)), gen)
    through = torch.cat([torch.zeros(len(x), dtype=torch.bool), torch.ones(len(x), dtype=torch.bool)])
    return torch.cat([as_float(x), xv]), torch.cat([y, y]), torch.cat([mask, mask]), through


def features(net, x: torch.Tensor) -> torch.Tensor:
    """The frozen network's flattened feature map, ``[N, 2048]``."""
    net.eval()
    with torch.no_grad():
        return torch.cat([net.features((x[i:i + 256] - 0.5) / 0.25).flatten(1) for i in range(0, len(x), 256)])


def fit_row(f: torch.Tensor, t: torch.Tensor, m: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted logistic regression of targets ``t`` on standardised features ``f`` (loss weights ``m``, L2 ``l2``)
    -> ``(weight [F], bias)`` on the unstandardised features."""
    mu, sd = f.mean(0), f.std(0) + 1e-3
    z = (f - mu) / sd
    w, b = torch.zeros(f.shape[1], requires_grad=True), torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=1000, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, t, reduction="none") * m).sum()
        loss = loss / m.sum() + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach() / sd, b.detach()
    return w, b - (mu * w).sum()


def rates(logits: torch.Tensor, t: torch.Tensor, m: torch.Tensor, through: torch.Tensor) -> dict:
    """Recall and absent-called-absent, clean and through the VAE, with counts."""
    out = {}
    for part, sel in (("clean", ~through), ("vae", through)):
        pred, pos, valid = logits[sel] > 0, t[sel] > 0.5, m[sel] > 0
        out[part] = {"recall": [int((pred & pos).sum()), int(pos.sum())],
                     "absent_called_absent": [int((~pred & ~pos & valid).sum()), int((~pos & valid).sum())]}
    return out


def main(argv=None) -> int:
    from diffusers import AutoencoderKL

    from lorakit.fileio import load_safetensors, save_safetensors, write_json
    from lorakit.toyworld.v2.concepts import get_concept
    from lorakit.toyworld.v2.oracle import Oracle

    args = parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise ValueError(f"--out {out}: already exists; name a new folder")
    for name in args.rows:
        if get_concept(name).role != "identity":
            raise ValueError(f"--rows {name}: not a v2 identity")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    oracle = Oracle.load(args.oracle)
    net, concepts = oracle.net, list(oracle.concepts)
    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32).eval()
    x, y, m, through = dataset(args, args.seed, args.n_plain, args.n_identity, args.hard_negatives, concepts, vae)
    xe, ye, me, te = dataset(args, args.seed + 1000, args.n_eval, args.n_eval // 3, args.n_eval // 3, concepts, vae)
    log(f"{len(x)} training and {len(xe)} evaluation images ({time.time() - t0:.0f} s)")
    f, fe = features(net, x), features(net, xe)
    rows = [concepts.index(name) for name in args.rows]
    weight, bias = torch.zeros(len(rows), f.shape[1]), torch.zeros(len(rows))
    report = {}
    with torch.no_grad():
        old = torch.cat([net(xe[k:k + 256]) for k in range(0, len(xe), 256)])
    for j, (name, i) in enumerate(zip(args.rows, rows)):
        weight[j], bias[j] = fit_row(f, y[:, i], m[:, i], args.l2)
        report[name] = {"before": rates(old[:, i], ye[:, i], me[:, i], te),
                        "after": rates(fe @ weight[j] + bias[j], ye[:, i], me[:, i], te)}
        log(f"{name}: {json.dumps(report[name])}")
    tensors, meta = load_safetensors(Path(args.oracle) / "oracle.safetensors")
    config = dict(oracle.config)
    kept = [c for c in config.get("row_heads", []) if c not in args.rows]  # earlier refits of other rows stay
    if kept:
        keep = [config["row_heads"].index(c) for c in kept]
        weight = torch.cat([tensors["row_head.weight"][keep].float(), weight])
        bias = torch.cat([tensors["row_head.bias"][keep].float(), bias])
    tensors["row_head.weight"], tensors["row_head.bias"] = weight.contiguous(), bias.contiguous()
    config["row_heads"] = kept + list(args.rows)
    config["refit"] = {"rows": args.rows, "from": args.oracle, "by": "tools/refit_oracle_rows.py", "args": vars(args)}
    metrics_path = Path(args.oracle) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics["refit"] = {"rows": report, "seconds": round(time.time() - t0, 1), "args": vars(args)}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # the folder appears whole or not at all
    tmp.mkdir(parents=True)
    save_safetensors(tensors, tmp / "oracle.safetensors", meta)
    write_json(config, tmp / "config.json")
    write_json(metrics, tmp / "metrics.json")
    tmp.rename(out)
    log(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    raise SystemExit(run_guarded(main, "refit_oracle_rows"))
