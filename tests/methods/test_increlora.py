"""IncreLoRA: grows to its budget and trains the new components."""
from __future__ import annotations

from helpers import make_minilm, sst2_batches, train_loop

import deltatune as dt


QV = ["query", "value"]


def test_increlora_grows_to_the_budget_and_trains_new_components(minilm_dir, sst2_rows):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.IncreLoRA(init_r=1, target_r=2, targets=QV, top_h=4, incre_interval=2, alpha=4))
    dt.begin(model, total_steps=16)
    history = []
    opt = train_loop(model, sst2_batches(minilm_dir, sst2_rows), 16,
                after=lambda t: history.append(dt.controller_metrics(model)["rank"]))
    ds = dt.deltas(model, "default")
    assert history[0] == 12 and history[-1] == 24 and history == sorted(history)
    assert history[4] == 12 + 4 + 4  # steps 2 and 4 grew 4 modules by one component each
    grown = [d for d in ds.values() if d.r > 1]
    assert {d.scale for d in grown} == {4 / d.r for d in grown}  # alpha / current rank
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in params for d in ds.values() for p in (d.P, d.lam, d.Q))  # new tensors are optimized
    assert all(bool((d.lam != 0).all()) for d in ds.values())  # every component, old and new, trained
