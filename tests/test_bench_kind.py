"""benchmarks/bench_kind.py (issue 18, item 4) runs end to end in --quick mode with tiny settings: every arm trains,
is evaluated along the way, timed, plotted and reported; --resume and --sweep do what they say; without dt.KIND
the KIND arm refuses clearly."""
import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_kind  # noqa: E402

import deltatune as dt  # noqa: E402

TINY = ["--quick", "--samples", "4", "--shots", "4", "--batch", "4", "--base-steps", "2", "--base-batch", "8", "--steps", "2",
        "--eval-every", "2", "--rounds", "1"]
ARMS = ["lora", "full", "scratch"] + (["kind"] if bench_kind.kind_available() else [])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # the judge and the pretrained models, made once


@pytest.fixture(scope="module")
def quick(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("quick")
    return out, bench_kind.main([*TINY, "--out", str(out), "--cache", cache, "--arms", *ARMS])


def test_quick_run_writes_curves_table_and_timing(quick):
    out, results = quick
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["arms"]) == ARMS
    for name, r in saved["arms"].items():
        assert [p["step"] for p in r["curve"]] == [0, 2]
        assert all(0 <= p["accuracy"] <= 1 and p["fd"] >= 0 for p in r["curve"])
        assert r["trainable"] > 0 and r["row_params"] == 4 * 128
        assert (out / f"samples-{name}.png").stat().st_size > 0
    assert saved["arms"]["full"]["trainable"] == saved["arms"]["scratch"]["trainable"]
    assert saved["arms"]["lora"]["trainable"] < saved["arms"]["full"]["trainable"]
    assert set(saved["timing"]) == {"floor", *ARMS} and saved["timing"]["lora"]["vs_lora"][0] == 1.0
    assert (out / "curves.png").stat().st_size > 0
    body = bench_kind.report(results, None)
    assert "step / LoRA step" in body and "ordering after 2 steps" in body


def test_resume_keeps_the_arms_whose_settings_did_not_change(quick, cache, tmp_path):
    out, first = quick
    shutil.copy(out / "results.json", tmp_path / "results.json")
    again = bench_kind.main([*TINY, "--out", str(tmp_path), "--cache", cache, "--arms", *ARMS, "--lr-scratch", "1e-3",
                             "--resume"])
    old = json.loads((out / "results.json").read_text())["arms"]
    assert again["arms"]["lora"] == old["lora"] and again["arms"]["full"] == old["full"]
    assert again["arms"]["scratch"]["lr"] == 1e-3 and first["arms"]["scratch"]["lr"] != 1e-3


def test_sweep_picks_the_candidate_with_the_lowest_held_out_loss(cache, tmp_path):
    r = bench_kind.main([*TINY, "--out", str(tmp_path), "--cache", cache, "--arms", "lora", "--sweep", "1",
                         "--lrs-lora", "1e-3", "3e-3"])["arms"]["lora"]
    assert set(r["lr_sweep"]) == {1e-3, 3e-3} and r["lr"] == min(r["lr_sweep"], key=r["lr_sweep"].get)


def test_kind_arm_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delattr(dt, "KIND", raising=False)  # a deltatune without KIND: the arm refuses before any work
    with pytest.raises(NotImplementedError, match="dt.KIND"):
        bench_kind.main([*TINY, "--out", str(tmp_path), "--arms", "lora", "kind"])
    assert not (tmp_path / "results.json").exists()
