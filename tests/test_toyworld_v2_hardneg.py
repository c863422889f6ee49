"""Hard negatives of the v2 oracle (lorakit.toyworld.v2.hardneg) and ``tools/measure_oracle.py --world v2``."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lorakit.toyworld.v2.concepts import IDENTITIES
from lorakit.toyworld.v2.hardneg import BODY, FAMILIES, PALETTES, PARTS, _sprite_parts, hard_negatives

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", [c.name for c in IDENTITIES])
def test_v2_hard_negatives_are_seeded_64px_images_of_every_family(name):
    a, b = hard_negatives(name, 9, seed=3), hard_negatives(name, 9, seed=3)
    assert [f for _, f, _ in a] == list(FAMILIES) * 3
    assert all(im.size == (64, 64) and im.mode == "RGB" for im, _, _ in a)
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, b))
    other = hard_negatives(name, 9, seed=4)
    assert any(not np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, other))
    assert name in PALETTES
    styled = [w for _, _, w in hard_negatives(name, 30, seed=5) if w.endswith(", outline style")]
    assert (not styled) if name in ("inkvel", "pixlor") else 0 < len(styled) < 15  # a style's own kind: never


def _has(arr, colour):
    return bool(np.all(arr == np.array(colour, np.float32), -1).any())


@pytest.mark.parametrize("name", sorted(BODY))
def test_v2_parts_negatives_never_draw_the_whole_identity(name):
    """Class sprite in its colour: its body colour, none of its parts; parts on a class body: its parts, not its
    body colour; parts alone: no body (checked on the supersampled canvas, where colours are exact)."""
    rng = np.random.default_rng(0)
    in_colour, _ = _sprite_parts(name, rng, 256, 0)
    on_class, _ = _sprite_parts(name, rng, 256, 1)
    alone, _ = _sprite_parts(name, rng, 256, 2)
    assert _has(in_colour, BODY[name][0]) and not any(_has(in_colour, c) for c in PARTS[name][:1])
    assert any(_has(on_class, c) for c in PARTS[name]) and not _has(on_class, BODY[name][0])
    assert any(_has(alone, c) for c in PARTS[name]) and not _has(alone, BODY[name][0])
    with pytest.raises(ValueError, match="v2 identities only"):
        hard_negatives("frog", 3)


@pytest.mark.slow
def test_measure_oracle_v2_reports_hard_negatives_and_recall(capsys):
    """The tool's v2 rows on a tiny n, with the bundled oracle and VAE: kwibbit's hard negatives are absent
    (96/96 in docs/toyworld_v2.md's table) and its renders found."""
    sys.path.insert(0, str(ROOT / "tools"))
    import measure_oracle

    assert measure_oracle.main(["--world", "v2", "--concepts", "kwibbit", "--n", "6", "--thresholds", "0.5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    kw = [r for r in rows if r["concept"] == "kwibbit"]
    assert {r["images"] for r in kw} == {"clean", "vae"} and all(r["world"] == "v2" for r in kw)
    for r in kw:
        assert r["hard_negatives_absent"]["n"] == 6 and r["hard_negatives_absent"]["k"] == 6
        assert r["recall"]["n"] == 6 and r["recall"]["k"] >= 5
        assert sum(int(v.split("/")[1]) for v in r["absent_by_what"].values()) == 6


def test_oracle_v2_fine_tune_with_hard_negatives_starts_from_init_and_masks_their_loss(tmp_path):
    """``train_oracle_v2.py --init X --hard-negatives K``: starts from X's weights, adds K negatives per identity
    whose loss mask is their identity's column only, and records both in metrics.json."""
    import importlib

    import torch

    from lorakit.fileio import load_safetensors
    from lorakit.toyworld.v2.concepts import CONCEPTS

    sys.path.insert(0, str(ROOT / "tools"))
    tr = importlib.import_module("train_oracle_v2")
    concepts = list(CONCEPTS)
    x, y, m = tr.render_hard_negatives(2, 20000, concepts)
    assert x.shape == (2 * len(IDENTITIES), 3, 64, 64) and x.dtype == torch.uint8 and not y.any()
    assert (m.sum(1) == 1).all() and m[0, concepts.index(IDENTITIES[0].name)] == 1
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    assert tr.main(["--out", str(first), "--n-train", "16", "--n-eval", "8", "--steps", "1", "--batch", "8"]) == 0
    assert tr.main(["--out", str(tuned), "--init", str(first), "--hard-negatives", "2", "--n-train", "16",
                    "--n-eval", "8", "--steps", "1", "--lr", "0", "--batch", "8"]) == 0
    a, b = (load_safetensors(p / "oracle.safetensors")[0] for p in (first, tuned))
    weights = [k for k in a if "running" not in k and "num_batches" not in k]  # (batch-norm statistics move)
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)  # lr 0: the init's weights, unchanged
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert metrics["init"] == str(first) and metrics["hard_negatives_per_identity"] == 2
    x, _, m = tr.render_hard_negatives(3, 30000, concepts, ["inkvel"])  # --extra-hard inkvel=3: that identity only
    assert len(x) == 3 and (m[:, concepts.index("inkvel")] == 1).all() and m.sum() == 3
    x, y, m = tr.render_character_views(2, 40000, concepts)  # --window-views 2: window + half view per character
    assert x.shape == (8, 3, 64, 64) and (y.sum(1) == 2).all()  # its identity and its class
    names = [concepts[i] for i in y[0].nonzero().flatten().tolist()]
    assert len(names) == 2 and {CONCEPTS[n].role for n in names} == {"identity", "class"}
    assert m[0, concepts.index("plain")] == 0 and m[0, concepts.index("kwibbit")] == 1  # generics not scored
    with pytest.raises(SystemExit, match="IDENTITY=K"):
        tr.main(["--out", str(tmp_path / "bad"), "--n-train", "16", "--n-eval", "8", "--steps", "1", "--batch", "8",
                 "--extra-hard", "inkvel"])
