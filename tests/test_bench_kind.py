"""benchmarks/bench_kind.py (issue 18, item 4) runs end to end in --quick mode with tiny settings: every arm trains,
is evaluated along the way, timed, plotted and reported; the KIND arm refuses clearly while dt.KIND is missing."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_kind  # noqa: E402

import deltatune as dt  # noqa: E402

TINY = ["--quick", "--samples", "4", "--shots", "4", "--batch", "4", "--base-steps", "2", "--base-batch", "8"]


def test_quick_run_writes_curves_table_and_timing(tmp_path):
    arms = ["lora", "full", "scratch"] + (["kind"] if bench_kind.kind_available() else [])
    results = bench_kind.main([*TINY, "--out", str(tmp_path), "--arms", *arms])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["arms"]) == arms
    for name, r in saved["arms"].items():
        assert [p["step"] for p in r["curve"]] == [0, 2, 4]
        assert all(0 <= p["accuracy"] <= 1 and p["fd"] >= 0 for p in r["curve"])
        assert r["trainable"] > 0 and r["row_params"] == 4 * 128
    assert saved["arms"]["full"]["trainable"] == saved["arms"]["scratch"]["trainable"]
    assert saved["arms"]["lora"]["trainable"] < saved["arms"]["full"]["trainable"]
    assert set(saved["timing"]) == {"floor", *arms} and saved["timing"]["lora"]["vs_lora"][0] == 1.0
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "samples.png").stat().st_size > 0
    body = bench_kind.report(results, None)
    assert "step / LoRA step" in body and "ordering after 4 steps" in body


@pytest.mark.skipif(bench_kind.kind_available(), reason="dt.KIND exists: the KIND arm runs in the test above")
def test_kind_arm_says_what_is_missing(tmp_path):
    assert not hasattr(dt, "KIND")
    with pytest.raises(NotImplementedError, match="dt.KIND"):
        bench_kind.main([*TINY, "--out", str(tmp_path), "--arms", "lora", "kind"])
