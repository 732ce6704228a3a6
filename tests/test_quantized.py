"""Adapters on quantized frozen bases (QLoRA-style): bitsandbytes 4-bit (NF4, FP4) and 8-bit linears on CPU."""
from __future__ import annotations

import pytest
import torch
from helpers import make_minilm

import deltatune as dt

bnb = pytest.importorskip("bitsandbytes")
TARGETS = ["query", "value", "intermediate.dense"]


def quantize(model, kind: str):
    """Every targeted Linear of ``model`` replaced by its bitsandbytes version (weights quantized on .to('cpu'))."""
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and name.endswith(tuple(TARGETS)):
            if kind == "int8":
                q = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=m.bias is not None,
                                        has_fp16_weights=False, threshold=0.0)
                q.load_state_dict(m.state_dict())
            else:
                q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, quant_type=kind,
                                      compute_dtype=torch.float32)
                q.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type=kind)
                q.bias = m.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    return model


def packed(model) -> dict[str, torch.Tensor]:
    """The packed weights by module name (without the adapter wrapper's ``.base``)."""
    return {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items()
            if v.dtype in (torch.uint8, torch.int8)}


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("method", ["lora", "s2ft", "spiel"])
def test_adapters_train_on_a_quantized_base_and_leave_it_untouched(minilm_dir, minilm_batch, kind, method, tmp_path):
    model = quantize(make_minilm(minilm_dir), kind)
    before = packed(model)
    assert before
    with torch.no_grad():
        ref = model(**minilm_batch).logits
    config = {"lora": dt.LoRA(r=8, targets=TARGETS), "s2ft": dt.S2FT(v_ratio=0.1, o_ratio=0.1, d_ratio=0.02),
              "spiel": dt.SpIEL(density=0.01, targets=TARGETS)}[method]
    dt.attach(model, config, name="a")
    kinds = {layer.layer_kind.name for _, layer in dt.model.adapted_layers(model)}
    assert any(k.startswith("bnb_") for k in kinds), kinds
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        torch.testing.assert_close(model(**minilm_batch).logits, ref)  # identity at init on the quantized base
    opt = torch.optim.AdamW(params, lr=1e-2)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])[: ref.shape[0]]
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(**minilm_batch).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if method == "spiel":
            dt.step(model, opt)
    assert losses[-1] < losses[0], losses
    after = packed(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="quantized weight"):
        dt.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in packed(model).items())
    # the adapter file is the ordinary one and loads onto another quantized copy with the same outputs
    dt.save(model, tmp_path / "a")
    other = quantize(make_minilm(minilm_dir), kind)
    dt.load(other, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(other(**minilm_batch).logits, model(**minilm_batch).logits)


def test_the_linear_layout_is_the_dequantized_weight(minilm_dir):
    model = make_minilm(minilm_dir)
    W = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    quantize(model, "nf4")
    dt.attach(model, dt.PiSSA(r=4, targets=["query"]), name="p")  # an SVD init reads the weight
    layer = model.bert.encoder.layer[0].attention.self.query
    deq = layer.linear_weight()
    assert deq.shape == W.shape and deq.dtype == torch.float32
    err = float((deq - W).norm() / W.norm())
    assert 0 < err < 0.15, err  # NF4 rounding, not garbage
