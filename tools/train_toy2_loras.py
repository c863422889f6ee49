"""Train toy world v2 identity LoRAs (``train_configs/toy2_<identity>.yaml``) or, with ``--adapter edlora``,
ED-LoRAs (``train_configs/toy2_edlora_<identity>.yaml``) in parts that fit a time budget.

On a shared machine one recipe may not finish in one sitting. This trains ``--chunk`` steps at a time
(:func:`lorakit.training.chunked.train_chunk`: a checkpoint at each stop, resumed bit-exactly) and
stops before the next part would pass ``--budget-s``; run the same command again to continue. The finished LoRA
is the file ``tools/measure_toyworld.py --world v2 --work <the same --out>`` looks for (same recipe hash).

    python tools/train_toy2_loras.py --out /work/shared_artifacts/toy2_loras \\
        --identities kwibbit inkvel --budget-s 480
    python tools/train_toy2_loras.py --adapter edlora --base PIPELINE --out /work/shared_artifacts/edlora_v2 \\
        --identities zorbo kwibbit bloopo hattock --budget-s 480

Prints one JSON line per identity: ``{"identity", "done", "step", "max_steps", "adapter"}``; exit status 0 when
every identity is done, 3 when some are not (run it again), 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="a v2 pipeline folder (default: the bundled data/toy2-base)")
    p.add_argument("--out", required=True, help="the LoRA cache folder (as measure_toyworld.py's --work)")
    p.add_argument("--identities", nargs="+", required=True, help="v2 identities, in the order to train them")
    p.add_argument("--adapter", choices=ADAPTERS, default="lora",
                   help="lora: the block-wise LoRA recipes (default); edlora: the ED-LoRA recipes")
    p.add_argument("--chunk", type=int, default=50, help="steps per part (default 50)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="stop before a part would end later than this many seconds after the start")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (max_steps=400)")
    p.add_argument("--threads", type=int, default=1)
    return p


ADAPTERS = ("lora", "edlora")


def _adapter_module(adapter: str):
    """The module with ``<path function>``, ``max_steps`` and the chunk trainer of one adapter type."""
    import importlib

    return importlib.import_module({"lora": "lorakit.toyworld.v2.loras",
                                    "edlora": "lorakit.toyworld.v2.edloras"}[adapter])


def train_within(identity: str, out: str, base: str, overrides: list[str], chunk: int, deadline: float,
                 clock=time.monotonic, adapter: str = "lora", last_part: list | None = None) -> dict:
    """Train ``identity``'s parts while the next one is expected to end before ``deadline`` (by ``clock``);
    the row that says how far it got. ``last_part``: ``[seconds of the last part]`` carried over from the
    identity trained before (updated here), so a new identity does not start a part that cannot end in time."""
    from lorakit.training.chunked import trained_step

    mod = _adapter_module(adapter)
    path_of = mod.lora_path if adapter == "lora" else mod.edlora_path
    train_part = mod.train_identity_lora_chunk if adapter == "lora" else mod.train_identity_edlora_chunk
    target = path_of(identity, out, base, overrides)
    max_steps = mod.max_steps(identity, out, base, overrides)
    last_part = [None] if last_part is None else last_part
    step, last = (max_steps if target.exists() else trained_step(target)), last_part[0]
    while step < max_steps:
        if last is not None and clock() + last > deadline:
            break
        start = clock()
        stop = min(max_steps, (step // chunk + 1) * chunk)
        with contextlib.redirect_stdout(sys.stderr):
            train_part(identity, out, base, stop, overrides)
        step, last = stop, clock() - start
        last_part[0] = last
    done = target.exists()
    return {"identity": identity, "done": done, "step": step, "max_steps": max_steps,
            "adapter": str(target) if done else None}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.base is None:
        from lorakit.toyworld.v2.models import DEFAULT_BASE

        args.base = str(DEFAULT_BASE)
    deadline, last_part = time.monotonic() + args.budget_s, [None]
    for identity in args.identities:
        row = train_within(identity, args.out, args.base, args.set, args.chunk, deadline, adapter=args.adapter,
                           last_part=last_part)
        print(json.dumps(row), flush=True)
        if not row["done"]:
            return 3
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    raise SystemExit(run_guarded(main, "train_toy2_loras"))
