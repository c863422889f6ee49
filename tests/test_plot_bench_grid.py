"""tools/plot_bench_grid.py: a benchmark run's images in one picture, a mark per concept under each."""

import json

import numpy as np
from PIL import Image

import plot_bench_grid as tool
from lorakit.toyworld.demo_report import GRID_COLOURS

SET = "n2-kwibbit-nocturo"


def _bench_out(tmp_path, present):
    out = tmp_path / "out"
    folder = out / "images" / "merge" / "n2"
    folder.mkdir(parents=True)
    for seed in range(len(present)):
        Image.new("RGB", (64, 64), (0, 0, 255)).save(folder / f"{SET}-s{seed}.png")
    row = {"phase": "report", "method": "merge", "n": 2, "set": SET, "seeds": list(range(len(present))),
           "present": present}
    (out / "results.jsonl").write_text(json.dumps(row) + "\n")
    return out


def test_one_row_per_method_under_the_renders_with_a_mark_per_concept(tmp_path):
    out = _bench_out(tmp_path, [[True, False], [False, True]])
    assert tool.main([str(out), "--set", SET, "--methods", "merge", "--seeds", "0", "1",
                      "--out", str(tmp_path / "g.png")]) == 0
    g = np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).astype(int)
    size, label_w, cell_w, cell_h = 128, 150, 130, 128 + 6 + 4
    assert g.shape == (2 * cell_h, label_w + 2 * cell_w, 3)
    assert np.abs(g[cell_h + 2 + size // 2, label_w + size // 2] - (0, 0, 255)).max() < 40  # the method's image
    mark_y = cell_h + 2 + size + 4
    colours = [tuple(g[mark_y, label_w + j * cell_w + m * size // 2 + size // 4]) for j in range(2) for m in range(2)]
    green, red = GRID_COLOURS[True], GRID_COLOURS[False]
    close = [min((green, red), key=lambda c: sum(abs(a - b) for a, b in zip(c, col))) for col in colours]
    assert close == [green, red, red, green]


def test_a_missing_seed_is_one_line_and_exit_2(tmp_path, capsys):
    out = _bench_out(tmp_path, [[True, True]])
    assert tool.main([str(out), "--set", SET, "--methods", "merge", "--seeds", "0", "5",
                      "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "seed 5" in err and len(err.splitlines()) == 1 and not (tmp_path / "g.png").exists()
