"""bf16 on the fast path: under CPU autocast and on a bf16 base with float32 adapters, every structure with a fused
node runs that node (checked in the autograd graph), computes in bf16 and gives float32 gradients that match a
float32 reference within bf16 tolerance."""
from __future__ import annotations

import pytest
import torch
from helpers import make_minilm

import deltatune as dt

METHODS = {
    "lora": (lambda: dt.LoRA(r=8, targets=["query", "value"]), "_LowRankLinearBackward"),
    "lora-dropout": (lambda: dt.LoRA(r=8, dropout=0.1, targets=["query", "value"]), "_LowRankLinearBackward"),
    "s2ft": (lambda: dt.S2FT(v_ratio=0.1, o_ratio=0.1, d_ratio=0.02), "_SlicedLinearBackward"),
    "spiel": (lambda: dt.SpIEL(density=0.01, targets=["query", "value"]), "_SparseLinearBackward"),
    "oft": (lambda: dt.OFT(block_size=32, targets=["query", "value"]), "_RotatedLinearBackward"),
}


def nodes(t: torch.Tensor) -> set[str]:
    """Names of every node in ``t``'s autograd graph."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        todo.extend(f for f, _ in fn.next_functions)
    return names


def adapted(minilm_dir, method, dtype=torch.float32):
    model = make_minilm(minilm_dir).to(dtype)
    dt.attach(model, method(), name="a")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for d in dt.deltas(model, "a").values():
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def grads(model, batch, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch).logits
    out.float().pow(2).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_bf16_close(got: dict, ref: dict):
    assert got.keys() == ref.keys()
    for n, g in got.items():
        assert g.dtype == torch.float32, n  # master weights stay float32 and so do their gradients
        err = float((g - ref[n]).norm() / ref[n].norm().clamp_min(1e-12))
        assert err < 0.05, (n, err)


@pytest.mark.parametrize("name", list(METHODS))
def test_autocast_and_a_bf16_base_run_the_fused_node(minilm_dir, minilm_batch, name):
    method, node = METHODS[name]
    ref_model = adapted(minilm_dir, method)
    ref_model.train() if name == "lora-dropout" else ref_model.eval()
    torch.manual_seed(1)
    _, ref = grads(ref_model, minilm_batch)
    assert node in nodes(ref_model(**minilm_batch).logits)
    # CPU autocast on the float32 model: the fused node runs, in bf16
    torch.manual_seed(1)
    out, got = grads(ref_model, minilm_batch, autocast=True)
    assert node in nodes(out), sorted(nodes(out))
    if name != "lora-dropout":  # dropout masks differ between runs
        assert_bf16_close(got, ref)
    # a bf16 base with float32 adapter parameters (dt.attach keeps adapters in float32)
    bf = adapted(minilm_dir, method, torch.bfloat16)
    bf.train() if name == "lora-dropout" else bf.eval()
    assert all(p.dtype == torch.float32 for p in bf.parameters() if p.requires_grad)
    out, got = grads(bf, minilm_batch)
    assert out.dtype == torch.bfloat16 and node in nodes(out), sorted(nodes(out))
    if name != "lora-dropout":
        assert_bf16_close(got, ref)
