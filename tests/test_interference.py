"""Cross-talk between adapters (deltatune.interference)."""
from __future__ import annotations

import json

import torch
from helpers import make_minilm, set_random_values

import deltatune as dt
from deltatune.interference import crosstalk


Q_NAME = "bert.encoder.layer.0.attention.self.query"


# -- interference ------------------------------------------------------------------------------------------------
def test_orthogonal_slots_interfere_far_less_than_plain_lora(minilm_dir, minilm_batch, tmp_path, capsys):
    from deltatune.cli import main

    targets = ["query", "value", "intermediate.dense"]
    oa = make_minilm(minilm_dir)
    lora = make_minilm(minilm_dir)
    for k, name in enumerate(["a", "b"]):
        dt.attach(oa, dt.OrthogonalAdaptation(r=8, slot=k, targets=targets), name=name, activate=False)
        dt.attach(lora, dt.LoRA(r=8, targets=targets), name=name, activate=False)
        set_random_values(oa, name, std=0.05, seed=k)
        set_random_values(lora, name, std=0.05, seed=k)
    ids = torch.randint(1000, 20000, (4, 24), generator=torch.Generator().manual_seed(0))
    rows = {m: dt.interference(model, ["a", "b"], inputs=[ids]) for m, model in (("oa", oa), ("lora", lora))}
    assert len(rows["oa"]) == 6 * len(targets)
    for r_oa, r_lora in zip(rows["oa"], rows["lora"]):
        assert r_oa["input_overlap"] < 1e-6 < 1e-3 < r_lora["input_overlap"]
        assert r_oa["crosstalk_ab"] > 0 and r_oa["crosstalk_ba"] > 0  # generic inputs: small, not zero
    assert dt.active_adapters(oa) == ["a"] and not oa.training  # the model is left as it was
    # on inputs that lie in a's input subspace, the orthogonal b adds exactly nothing; a LoRA b does not
    layer_oa = dt.deltas(oa, "a")[Q_NAME]
    x_in_a = torch.randn(64, 8) @ layer_oa.A
    ratio = lambda model: float(dt.deltas(model, "b")[Q_NAME](x_in_a).norm()  # noqa: E731
                                / dt.deltas(model, "a")[Q_NAME](x_in_a).norm())
    assert ratio(oa) < 1e-5 and ratio(lora) > 1e-2
    # measured cross-talk is a ratio of norms over the captured layer inputs
    talk = crosstalk(lora, ["a", "b"], {"a": [ids]})
    assert set(k[1:] for k in talk) == {("a", "b")}
    # the CLI compares saved adapters
    dt.save(oa, tmp_path / "oa", names=["a", "b"])
    assert main(["inspect", str(tmp_path / "oa" / "a"), "--interference", str(tmp_path / "oa" / "b"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 3 * 6 and max(r["input_overlap"] for r in printed) < 1e-6


def test_crosstalk_after_a_merged_single_adapter_batch():
    """A batch served with merge_single leaves that adapter merged; measuring cross-talk takes it out first (as
    switching adapters does) instead of refusing."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).eval()
    for name in ("a", "b"):
        dt.attach(net, dt.LoRA(r=2, targets=["0", "2"]), name=name)
        for d in dt.deltas(net, name).values():
            torch.nn.init.normal_(d.B, std=0.1)
    dt.set_serving(net, merge_single=True)
    x = torch.randn(4, 8)
    with torch.no_grad():
        net(x, adapter_names=["a"] * 4)
    assert net[0].merged  # kept merged for the next batch of "a"
    out = crosstalk(net, ["a", "b"], {"a": [x], "b": [x]})
    assert not net[0].merged and set(out) == {(m, a, b) for m in ("0", "2") for a, b in (("a", "b"), ("b", "a"))}
