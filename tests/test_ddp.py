"""DDP: two gloo ranks with per-rank batch 4 train exactly like one process with batch 8."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("DELTATUNE_SHARED", HERE.parents[1] / "shared"))
SST2_TRAIN = SHARED / "data" / "glue" / "SST-2" / "train.tsv"


def run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_two_ranks_match_one_process(tmp_path):
    worker = [str(HERE / "ddp_worker.py"), "--data", str(SST2_TRAIN), "--out", str(tmp_path), "--steps", "3"]
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker,
         "--batch-size", "4"])
    run([sys.executable, *worker, "--batch-size", "8"])

    weights = {n: load_file(tmp_path / n / "adapter_model.safetensors") for n in ("rank0", "rank1", "single")}
    results = {n: json.loads((tmp_path / n / "result.json").read_text()) for n in weights}
    assert [results[n]["world_size"] for n in ("rank0", "rank1", "single")] == [2, 2, 1]
    assert weights["rank0"].keys() == weights["rank1"].keys() == weights["single"].keys()
    for k, v in weights["rank0"].items():
        assert torch.equal(v, weights["rank1"][k]), f"ranks disagree on {k}"
        torch.testing.assert_close(v, weights["single"][k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(k.endswith(".B") and v.abs().max() > 0 for k, v in weights["single"].items())  # training happened
    assert results["rank0"]["losses"] == results["rank1"]["losses"]  # rank-0 logs show the global loss
    torch.testing.assert_close(results["rank0"]["losses"], results["single"]["losses"], atol=1e-5, rtol=1e-5)
