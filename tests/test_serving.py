"""Mixed-adapter batches (every row through its own adapter, every delta type), generation with the KV cache,
hot loading and the merged single-adapter path, on real MiniLM and SmolLM2 weights."""
from __future__ import annotations

import pytest
import torch
from helpers import logits, make_minilm, make_smollm, randomize

import deltatune as dt


def _alone(model, name, batch):
    """The batch with only adapter ``name`` active (``None``: the base model)."""
    if name is None:
        with dt.disabled(model):
            return logits(model, batch)
    dt.set_active(model, name)
    return logits(model, batch)


MINILM_SPECS = {
    "lora4": lambda: dt.LoRA(r=4, targets=["query", "value"], modules_to_save=["classifier"]),
    "lora8": lambda: dt.LoRA(r=8, targets=["query", "key", "dense", "word_embeddings"], rank_pattern={"key": 2}),
    "pissa": lambda: dt.PiSSA(r=4, targets=["value"]),
    "adalora": lambda: dt.AdaLoRA(init_r=6, target_r=4, targets=["query", "value"]),
    "vera": lambda: dt.VeRA(r=16, targets=["value"]),
    "s2ft": lambda: dt.S2FT(v_ratio=0.1, o_ratio=0.1, d_ratio=0.02),
    "spiel": lambda: dt.SpIEL(density=0.001),
    "oft": lambda: dt.OFT(block_size=32, targets=["value", "output.dense"]),
}


@pytest.fixture(scope="module")
def minilm_many(minilm_dir):
    model = make_minilm(minilm_dir)
    for i, (name, spec) in enumerate(MINILM_SPECS.items()):
        dt.attach(model, spec(), name=name, activate=False)
        randomize(model, name, std=0.03, seed=i + 1)
    return model


def test_each_row_of_a_mixed_batch_equals_that_row_run_alone(minilm_many, minilm_batch):
    model = minilm_many
    n = minilm_batch["input_ids"].shape[0]
    every = [*MINILM_SPECS, None, "base"]
    batches = [(every[k:] + every[:k])[:n] for k in (0, 4, 7)]  # together: every adapter and the base
    for rows in batches:
        with torch.no_grad():
            mixed = model(**minilm_batch, adapter_names=rows).logits
        for i, name in enumerate(rows):
            want = _alone(model, None if name == "base" else name, minilm_batch)[i]
            torch.testing.assert_close(mixed[i], want, atol=2e-5, rtol=0, msg=f"row {i} ({name})")
    # the context manager does the same; afterwards the model is as it was
    dt.set_active(model, "lora4")
    before = logits(model, minilm_batch)
    with dt.adapter_rows(model, batches[0]):
        again = logits(model, minilm_batch)
    with torch.no_grad():
        torch.testing.assert_close(again, model(**minilm_batch, adapter_names=batches[0]).logits)
    assert dt.active_adapters(model) == ["lora4"]
    torch.testing.assert_close(logits(model, minilm_batch), before)


def test_mixed_batches_say_what_is_wrong(minilm_many, minilm_batch):
    model = minilm_many
    n = minilm_batch["input_ids"].shape[0]
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        model(**minilm_batch, adapter_names=["nope"] * n)
    with pytest.raises(ValueError, match=f"{2 * n} entries for a batch of {n} rows"):
        with torch.no_grad():
            model(**minilm_batch, adapter_names=["lora4", "lora8"] * n)
    with pytest.raises(ValueError, match="one adapter name per row"):  # inside a routing, layers check too
        with torch.no_grad(), dt.adapter_rows(model, ["lora4", "lora8"] * n):
            model(**minilm_batch)
    with pytest.raises(ValueError, match="a list with one adapter name"):
        model(**minilm_batch, adapter_names="lora4")
    with pytest.raises(ValueError, match=f"2 entries for a batch of {n} rows"):
        model(**minilm_batch, adapter_names=["lora4", "lora8"])
    with pytest.raises(ValueError, match="adapter_names is empty"):
        with dt.adapter_rows(model, []):
            pass
    dt.set_active(model, "lora8")
    dt.merge(model, "lora8")
    try:
        with pytest.raises(ValueError, match=r"\['lora8'\] are merged"):
            model(**minilm_batch, adapter_names=["lora4", "lora8"] + ["base"] * (n - 2))
    finally:
        dt.unmerge(model)
    # the failed calls left no routing behind
    dt.set_active(model, "lora4")
    torch.testing.assert_close(logits(model, minilm_batch), _alone(model, "lora4", minilm_batch))


def test_merged_single_adapter_path_is_exact_and_undone_for_mixed_batches(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir)
    for i, name in enumerate(["a", "b"]):
        dt.attach(model, dt.LoRA(r=4, targets=["query", "value"]), name=name, activate=False)
        randomize(model, name, seed=i + 5)
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    original = weight.detach().clone()
    n = minilm_batch["input_ids"].shape[0]
    want_a, want_b = _alone(model, "a", minilm_batch), _alone(model, "b", minilm_batch)
    dt.set_serving(model, merge_single=True)
    with torch.no_grad():
        got = model(**minilm_batch, adapter_names=["a"] * n).logits
        layer = model.bert.encoder.layer[0].attention.self.query
        assert list(layer.merged) == ["a"]  # kept merged for the next batch that uses it
        torch.testing.assert_close(got, want_a, atol=2e-5, rtol=0)
        torch.testing.assert_close(model(**minilm_batch, adapter_names=["b"] * n).logits, want_b, atol=2e-5, rtol=0)
        assert list(layer.merged) == ["b"]
        rows = ["a", "b"] * (n // 2) + ["a"] * (n % 2)
        mixed = model(**minilm_batch, adapter_names=rows).logits
        assert not layer.merged
        for i, name in enumerate(rows):
            torch.testing.assert_close(mixed[i], (want_a if name == "a" else want_b)[i], atol=2e-5, rtol=0)
        # a served single adapter stays merged and becomes the active one: plain calls see the same model
        model(**minilm_batch, adapter_names=["b"] * n)
        assert dt.active_adapters(model) == ["b"]
        torch.testing.assert_close(model(**minilm_batch).logits, want_b, atol=2e-5, rtol=0)
        dt.set_active(model, "a")  # switching takes the served merge out
        assert not layer.merged
        torch.testing.assert_close(model(**minilm_batch).logits, want_a, atol=2e-5, rtol=0)
    dt.set_serving(model, merge_single=False)
    torch.testing.assert_close(weight.detach(), original, atol=1e-6, rtol=0)


def test_hot_loading_and_switching_need_no_reinjection(minilm_dir, minilm_batch, tmp_path):
    donor = make_minilm(minilm_dir)
    for i, name in enumerate(["a", "b", "c"]):
        dt.attach(donor, (dt.LoRA(r=4 + 2 * i) if name != "c" else dt.S2FT(v_ratio=0.1, o_ratio=0.1)), name=name,
                  activate=False)
        randomize(donor, name, seed=i + 11)
    dt.save(donor, tmp_path / "all")
    at_start = dt.load(make_minilm(minilm_dir), tmp_path / "all", activate=False)
    serving = dt.load(make_minilm(minilm_dir), tmp_path / "all" / "a", name="a")
    layers = {n: id(m) for n, m in dt.model.adapted_layers(serving)}
    for name in ("b", "c"):  # loaded into the running model
        dt.load(serving, tmp_path / "all" / name, name=name, activate=False)
    assert {n: id(m) for n, m in dt.model.adapted_layers(serving) if n in layers} == layers  # same wrappers
    n = minilm_batch["input_ids"].shape[0]
    rows = (["c", "a", "b", None] * n)[:n]
    with torch.no_grad():
        torch.testing.assert_close(serving(**minilm_batch, adapter_names=rows).logits,
                                   at_start(**minilm_batch, adapter_names=rows).logits)
    dt.set_active(serving, "c")
    torch.testing.assert_close(logits(serving, minilm_batch), _alone(at_start, "c", minilm_batch))
    # an adapter replaced under the same name is served with its new factors (no stale stacks)
    dt.delete(serving, "b")
    dt.load(serving, tmp_path / "all" / "a", name="b", activate=False)
    with torch.no_grad():
        got = serving(**minilm_batch, adapter_names=["b"] + ["c"] * (n - 1)).logits
    torch.testing.assert_close(got[0], _alone(serving, "a", minilm_batch)[0], atol=2e-5, rtol=0)


def test_generation_with_mixed_adapters_matches_each_adapter_token_for_token(smollm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    tok.padding_side = "left"
    model = make_smollm(smollm_dir)
    specs = {"lora": dt.LoRA(r=8), "lora_qv": dt.LoRA(r=4, targets=["q_proj", "v_proj"]),
             "s2ft": dt.S2FT(o_ratio=0.05, d_ratio=0.02), "oft": dt.OFT(block_size=32, targets=["q_proj"]),
             "spiel": dt.SpIEL(density=0.0005, targets=["down_proj"])}
    for i, (name, spec) in enumerate(specs.items()):
        dt.attach(model, spec, name=name, activate=False)
        randomize(model, name, std=0.05, seed=i + 1)
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):", "List three colors:", "Hello",
               "2 + 2 ="]
    batch = tok(prompts, padding=True, return_tensors="pt")
    rows = ["lora", "lora_qv", "s2ft", None, "oft", "spiel"]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    mixed = model.generate(**batch, adapter_names=rows, **kw)
    beams = model.generate(**batch, adapter_names=rows, num_beams=2, num_return_sequences=2, **kw)
    with dt.disabled(model):
        plain = model.generate(**batch, **kw)
    for i, name in enumerate(rows):
        if name is None:
            want, want_beams = plain, None
            with dt.disabled(model):
                want_beams = model.generate(**batch, num_beams=2, num_return_sequences=2, **kw)
        else:
            dt.set_active(model, name)
            want, want_beams = model.generate(**batch, **kw), model.generate(**batch, num_beams=2,
                                                                              num_return_sequences=2, **kw)
        assert torch.equal(mixed[i], want[i]), name
        assert torch.equal(beams[2 * i: 2 * i + 2], want_beams[2 * i: 2 * i + 2]), name
    changed = sum(not mixed[i].equal(plain[i]) for i, name in enumerate(rows) if name is not None)
    assert changed >= 3  # the adapters really change what is generated


def test_a_refused_single_adapter_merge_leaves_the_active_adapters_as_they_were():
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8)).eval()
    dt.attach(net, dt.LoRA(r=2, targets=["0"]), name="a")
    dt.attach(net, dt.LoRA(r=2, targets=["0"]), name="bad", activate=False)
    with torch.no_grad():
        dt.deltas(net, "bad")["0"].B.fill_(float("nan"))  # merging it would put NaN into the weights: refused
    dt.set_serving(net, merge_single=True)
    with pytest.raises(ValueError, match="NaN"):
        net(torch.randn(2, 8), adapter_names=["bad", "bad"])
    assert dt.active_adapters(net) == ["a"] and not net[0].merged
