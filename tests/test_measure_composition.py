"""tools/measure_composition_methods.py: its statistics and method specs (the sampling itself is tested elsewhere)."""

import pytest

import measure_composition_methods as mcm


def test_wilson_and_mcnemar():
    lo, hi = mcm.wilson(0, 24)
    assert lo == 0.0 and hi == pytest.approx(0.138, abs=1e-3)
    lo, hi = mcm.wilson(12, 24)
    assert (lo, hi) == pytest.approx((0.314, 0.686), abs=1e-3)
    assert mcm.mcnemar_exact(8, 0) == pytest.approx(2 / 2**8)
    assert mcm.mcnemar_exact(3, 3) == 1.0 and mcm.mcnemar_exact(0, 0) == 1.0


def test_method_specs_and_summary():
    st = mcm.method_settings("cmlora-official", 10, 4.0)
    assert (st.method, st.cmlora_mode) == ("cmlora", "official")
    st = mcm.method_settings("composite+ubase+encode=per-adapter", 10, 4.0)
    assert (st.uncond, st.encode) == ("base", "per-adapter")
    st = mcm.method_settings("delta+ubase+parts+kg=character:3,object:2", 10, 4.0, ["character", "style", "object"])
    assert (st.prompt_parts, st.adapter_guidance, st.uncond) == ("per-adapter", (3.0, 1.0, 2.0), "base")
    with pytest.raises(ValueError, match="nonsense"):
        mcm.method_settings("merge+nonsense", 10, 4.0)
    rec = lambda m, seed, present: {"method": m, "set": "s", "n": 2, "seed": seed, "present": present,  # noqa: E731
                                    "all": all(present), "s_per_image": 1.0}
    records = [rec("new", s, [True, True]) for s in range(6)] + [rec("merge", s, [True, s == 0]) for s in range(6)]
    rows = mcm.summarise(records, ["new", "merge"])
    new = next(r for r in rows if r["method"] == "new" and "vs" not in r)
    assert new["all_present"] == 1.0 and new["per_kind"] == {"character": 1.0, "style": 1.0}
    pair = next(r for r in rows if r.get("vs") == "merge")
    assert (pair["all_wins"], pair["all_losses"], pair["pairs"]) == (5, 0, 6)


def test_markdown_table_has_intervals_and_paired_tests():
    rec = lambda m, seed, present: {"method": m, "set": "s", "n": 3, "seed": seed, "present": present,  # noqa: E731
                                    "all": all(present), "s_per_image": 1.0}
    records = [rec("new", s, [True, True, s < 3]) for s in range(6)] + [rec("merge", s, [True, s == 0, False])
                                                                        for s in range(6)]
    table = mcm.markdown(mcm.summarise(records, ["new", "merge"]))
    assert "| new | 6 | 3/6 = 0.50 [0.19, 0.81] | 1.00 | 1.00 | 0.50 | 6/6 [0.61, 1.00] | 3 / 0, 0.25 |" in table
    assert "| merge | 6 | 0/6 = 0.00 [0.00, 0.39] |" in table
