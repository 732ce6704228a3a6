"""DDP: two gloo ranks with per-rank batch 4 (or 2 x 2 accumulated) train exactly like one process with batch 8."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from helpers import SHARED, make_minilm

HERE = Path(__file__).resolve().parent
SST2_TRAIN = SHARED / "data" / "glue" / "SST-2" / "train.tsv"


def run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_two_ranks_match_one_process(tmp_path):
    worker = [str(HERE / "ddp_worker.py"), "--data", str(SST2_TRAIN), "--steps", "3"]
    run([sys.executable, *worker, "--out", str(tmp_path / "one"), "--batch-size", "8"])
    runs = {"batch4": ["--batch-size", "4"], "batch2x2": ["--batch-size", "2", "--grad-accum", "2"]}
    for name, opts in runs.items():
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker,
             "--out", str(tmp_path / name), *opts])

    single = load_file(tmp_path / "one" / "single" / "adapter_model.safetensors")
    ref = json.loads((tmp_path / "one" / "single" / "result.json").read_text())
    assert ref["world_size"] == 1
    assert any(k.endswith(".B") and v.abs().max() > 0 for k, v in single.items())  # training happened
    for name in runs:
        ranks = [load_file(tmp_path / name / f"rank{r}" / "adapter_model.safetensors") for r in (0, 1)]
        results = [json.loads((tmp_path / name / f"rank{r}" / "result.json").read_text()) for r in (0, 1)]
        assert [r["world_size"] for r in results] == [2, 2]
        assert ranks[0].keys() == ranks[1].keys() == single.keys()
        for k, v in ranks[0].items():
            assert torch.equal(v, ranks[1][k]), f"{name}: ranks disagree on {k}"
            torch.testing.assert_close(v, single[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
        assert results[0]["losses"] == results[1]["losses"]  # every rank logs the global loss
        torch.testing.assert_close(results[0]["losses"], ref["losses"], atol=1e-5, rtol=1e-5)
        # evaluation runs on each rank's shard and combines: the same metrics as one process on the whole set
        assert results[0]["eval"] == results[1]["eval"]
        assert results[0]["eval"] == pytest.approx(ref["eval"], abs=1e-5)


def test_adalora_two_ranks_make_the_same_decisions(tmp_path):
    """AdaLoRA under DDP: masking every step and a physical shrink (which rebuilds the DDP wrapper) give every rank
    the same pattern, parameters and budget trace, and match one process with the same global batch."""
    worker = [str(HERE / "ddp_worker.py"), "--data", str(SST2_TRAIN), "--steps", "8", "--method", "adalora"]
    run([sys.executable, *worker, "--out", str(tmp_path / "one"), "--batch-size", "8"])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker,
         "--out", str(tmp_path / "two"), "--batch-size", "4"])
    single = load_file(tmp_path / "one" / "single" / "adapter_model.safetensors")
    ref = json.loads((tmp_path / "one" / "single" / "result.json").read_text())
    ranks = [load_file(tmp_path / "two" / f"rank{r}" / "adapter_model.safetensors") for r in (0, 1)]
    results = [json.loads((tmp_path / "two" / f"rank{r}" / "result.json").read_text()) for r in (0, 1)]
    lams = {k: v for k, v in ranks[0].items() if k.endswith(".lam")}
    assert sum(v.numel() for v in lams.values()) == 3 * len(lams)  # shrunk to the target budget
    assert len({v.numel() for v in lams.values()}) > 1  # ... unevenly: a real allocation
    assert results[0]["ranks"] == results[1]["ranks"] == ref["ranks"]
    assert results[0]["probe"] == results[1]["probe"] == 1.0  # rank 1 received rank 0's value
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for k, v in ranks[0].items():
        assert torch.equal(v, ranks[1][k]), f"ranks disagree on {k}"
        assert v.shape == single[k].shape, f"{k}: pattern differs from the single process"
        torch.testing.assert_close(v, single[k], atol=1e-4, rtol=1e-3, msg=k)


def test_spiel_two_ranks_regrow_the_same_entries(tmp_path):
    """SpIEL under DDP: each rank sees different gradients, so its regrowth candidates differ; rank 0's decision is
    broadcast, and every rank ends with the same indices and values."""
    import deltatune as dt

    worker = [str(HERE / "ddp_worker.py"), "--data", str(SST2_TRAIN), "--steps", "7", "--method", "spiel"]
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker,
         "--out", str(tmp_path / "two"), "--batch-size", "4"])
    ranks = [load_file(tmp_path / "two" / f"rank{r}" / "adapter_model.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for k, v in ranks[0].items():
        assert torch.equal(v, ranks[1][k]), f"ranks disagree on {k}"
    from deltatune.zoo import minilm_path

    start = dt.attach(make_minilm(minilm_path()), dt.SpIEL(density=0.002, targets=["query", "value"]))
    for mod, d in dt.deltas(start, "default").items():
        idx = ranks[0][f"{mod}.idx"].long()
        assert idx.numel() == d.idx.numel() == torch.unique(idx).numel()
        assert not torch.equal(idx.sort().values, d.idx.sort().values)  # entries were regrown
        assert ranks[0][f"{mod}.values"].abs().max() > 0
