"""FSDP2 (``fully_shard``) with adapters, on 2 real gloo ranks (``torchrun``): a frozen MiniLM base with trainable
adapters of eight structures (LoRA, AdaLoRA with its budget and orthogonal regularizer, S2FT, SpIEL, OFT, VeRA,
Orthogonal Adaptation, SORSA with its regularizer) trains to the same adapter as one process on the whole batch;
``dt.save`` on the sharded model writes the ordinary checkpoint (equal to the one-process file, loadable onto an
unsharded base); merge, attach, load and resizes on the sharded model are refused with errors that say what to do."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import DATA, logits, make_minilm, run_one_and_two_ranks
from safetensors.torch import load_file

import deltatune as dt

HERE = Path(__file__).parent
SST2 = DATA / "glue" / "SST-2"
METHODS = ["lora", "adalora", "s2ft", "spiel", "oft", "vera", "orthogonal", "sorsa"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    run_one_and_two_ranks(HERE / "fsdp_worker.py", ["--data", str(SST2 / "dev.tsv")], tmp / "one", tmp / "two")
    return tmp / "one", tmp / "two"


@pytest.mark.parametrize("name", METHODS)
def test_two_sharded_ranks_train_the_adapter_of_one_process(runs, name):
    one, two = runs
    single, sharded = torch.load(one / f"{name}.pt"), torch.load(two / f"{name}.pt")
    assert single.keys() == sharded.keys()
    # AdamW at lr 1e-2 moves each entry by up to ~3e-2 in 3 steps; summation-order noise in near-zero gradients
    # shows up as ~2e-5 after its normalization
    for k, v in single.items():
        torch.testing.assert_close(sharded[k], v, atol=1e-4, rtol=1e-3, msg=k)
    # the checkpoint dt.save wrote from the sharded model is the one-process checkpoint
    f1, f2 = load_file(one / name / "adapter_model.safetensors"), load_file(two / name / "adapter_model.safetensors")
    assert f1.keys() == f2.keys() and f1
    for k, v in f1.items():
        if k.startswith("@controller/state/trackers/"):
            continue  # SpIEL's candidate tracker accumulates each rank's own gradients (as under DDP): rank 0's
        torch.testing.assert_close(f2[k], v, atol=1e-4, rtol=1e-3, msg=k)


def test_the_sharded_checkpoint_loads_onto_an_unsharded_base_and_trained(runs, minilm_dir, minilm_batch):
    _, two = runs
    base = make_minilm(minilm_dir)
    before = logits(base, minilm_batch)
    for name in ("lora", "adalora", "oft"):
        model = dt.load(make_minilm(minilm_dir), two / name)
        after = logits(model, minilm_batch)
        assert torch.isfinite(after).all()
        assert not torch.allclose(after[:, 0] - after[:, 1], before[:, 0] - before[:, 1], atol=1e-4), name


def test_sharded_models_refuse_merge_attach_load_and_resizes(runs):
    _, two = runs
    refusals = json.loads((two / "refusals.json").read_text())
    assert set(refusals) == {"merge", "attach", "load", "resize"}
    assert all(refusals.values()), refusals  # every one raised
    assert "sharded by FSDP2" in refusals["merge"] and "dt.load it onto the base model in one process" in \
        refusals["merge"]
    assert "before fully_shard" in refusals["attach"] and "before fully_shard" in refusals["load"]
    assert "silently" in refusals["resize"] and "shrink='never'" in refusals["resize"]
