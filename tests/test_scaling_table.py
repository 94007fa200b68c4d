"""benchmarks/scaling_table.py: the arithmetic behind RESULTS.md's scaling table (hours from rates,
speed-ups, GPU-hours and cost), the projection rule, and the model sizes it assumes."""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from jpcap_helpers.train.costs import cost_estimate, packed_flops_per_caption
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("scaling_table", ROOT / "benchmarks" / "scaling_table.py")
st = importlib.util.module_from_spec(spec)
sys.modules["scaling_table"] = st   # dataclasses look their module up there
spec.loader.exec_module(st)


def test_hours_gpu_hours_and_cost_follow_from_the_rates():
    table = st.rows(usd_per_gpu_hour=2.0, usd_per_t4_hour=0.5)
    t4, h100, one, one_cg, two, two_cg, four, eight = table
    captions, images = 3 * 413_915, 5_000 + 5_000 + 26_500
    assert one.train_h == pytest.approx(captions / 341.98 / 3600)            # ≈ 1.01 h
    assert one.caption_h == pytest.approx(images / 174.50 / 3600)
    assert h100.gpus == 1 and h100.train_h == pytest.approx(one.train_h * 152.74 / 145.45)
    assert h100.caption_h == pytest.approx(images / ((190.35 + 164.83 + 190.94) / 3) / 3600) and "ESTIMATED" in h100.basis
    assert one_cg.train_h == pytest.approx(captions / 447.16 / 3600) and one_cg.caption_h == one.caption_h
    assert one_cg.gpus == 1 and "train.cudagraphs" in one_cg.hardware and "run G9" in one_cg.basis
    assert two.train_h * 1.855 == pytest.approx(one.train_h) and two.caption_h * 1.94 == pytest.approx(one.caption_h)
    assert two_cg.gpus == 2 and two_cg.train_h * 174.73 / 89.32 == pytest.approx(one_cg.train_h)
    assert two_cg.caption_h == two.caption_h and "run Z4" in two_cg.basis
    assert "PROJECTED" not in two.basis and "MEASURED" not in eight.basis
    assert four.basis.startswith("training 3.44× PROJECTED") and "captioning 3.50× MEASURED" in four.basis  # 4 × (1.855/2)²
    assert four.caption_h * 3.50 == pytest.approx(one.caption_h)
    assert eight.train_h < four.train_h < two.train_h and eight.caption_h < four.caption_h < two.caption_h
    assert four.train_h * st.projected_speedup(4)[0] == pytest.approx(one.train_h)
    for row, price in zip(table, (0.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0), strict=True):
        assert row.total_h == pytest.approx(row.train_h + row.caption_h)
        assert row.gpu_hours == pytest.approx(row.gpus * row.total_h)
        assert row.usd == pytest.approx(row.gpu_hours * price)
    # the T4 row is the cost model's estimate for packed captions
    flops = packed_flops_per_caption(st.N_VIT, st.N_LLM, 264, 25, 936, 413_915 / 82_783)
    assert t4.train_h == pytest.approx(cost_estimate(flops, captions)["hours"]) and "ESTIMATED" in t4.basis
    assert t4.caption_h == pytest.approx(36_500 / 2.5 / 3600)


def test_projection_keeps_the_measured_and_extends_the_efficiency_trend():
    measured = {1: 1.0, 2: 1.85, 4: 3.29}
    assert st.projected_speedup(2, measured) == (1.85, False) and st.projected_speedup(4, measured) == (3.29, False)
    s8, projected = st.projected_speedup(8, measured)
    eff4, eff2 = 3.29 / 4, 1.85 / 2
    assert projected and s8 == pytest.approx(8 * eff4 * eff4 / eff2)       # ≈ 5.85×
    s16, _ = st.projected_speedup(16, measured)
    assert s16 == pytest.approx(16 * eff4 * (eff4 / eff2) ** 2) and s16 / 16 < s8 / 8
    assert st.projected_speedup(8, {1: 1.0, 2: 2.0, 4: 4.0})[0] == pytest.approx(8.0)   # perfect stays perfect
    # from one measured doubling (the table's): 4 GPUs keep losing efficiency at the 1 → 2 rate
    assert st.projected_speedup(4, {1: 1.0, 2: 1.55}) == (pytest.approx(4 * 0.775 ** 2), True)


def test_markdown_states_assumptions_and_results_markers(tmp_path):
    text = st.markdown(st.rows(), 3.5, 0.35)
    for needed in ("ESTIMATED", "MEASURED", "PROJECTED", "$3.50", "--usd-per-gpu-hour", "36,500", "upper bound"):
        assert needed in text, needed
    assert "{" not in text and "}" not in text   # every placeholder formatted
    doc = tmp_path / "R.md"
    doc.write_text(f"# head\n{st.START}\nold\n{st.END}\ntail\n", encoding="utf-8")
    st.write_results("new table", doc)
    st.write_results("new table", doc)   # idempotent
    assert doc.read_text(encoding="utf-8") == f"# head\n{st.START}\nnew table\n{st.END}\ntail\n"


def test_model_sizes_are_qwen2_vl_2b():
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from jpcap_helpers.models import train_tiny_tokenizer
    from jpcap_helpers.train.costs import count_parameters_unpacked
    from tests.conftest import qwen2_vl_2b_config

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(qwen2_vl_2b_config(train_tiny_tokenizer(["画像"] * 10, 300)))
    assert count_parameters_unpacked(model.model.visual) == st.N_VIT
    assert count_parameters_unpacked(model.model.language_model) == st.N_LLM
    assert math.isclose(st.IMAGE_TOKENS * 4, st.PATCHES)
