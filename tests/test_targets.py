"""Target selection: module-name patterns, overrides, layers_to_transform, unit maps (GQA)."""
from __future__ import annotations

import time

import pytest
from helpers import make_minilm, make_smollm

import deltatune as dt
from deltatune.methods.lora import lora_scale
from deltatune.targets import find_blocks


def test_targets_patterns_and_overrides(minilm_dir):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets="all-linear", exclude=r".*\.layer\.5\..*",
                             rank_pattern={"query": 2, r"bert\.encoder\.layer\.0\..*value": 3},
                             alpha_pattern={"key": 4}, use_rslora=False), name="a")
    deltas = dt.deltas(model, "a")
    assert "classifier" not in deltas  # all-linear leaves the head alone
    assert "bert.pooler.dense" in deltas
    assert not any(".layer.5." in n for n in deltas)
    assert deltas["bert.encoder.layer.1.attention.self.query"].r == 2
    assert deltas["bert.encoder.layer.0.attention.self.value"].r == 3
    assert deltas["bert.encoder.layer.1.attention.self.value"].r == 8
    assert deltas["bert.encoder.layer.1.attention.self.key"].scale == pytest.approx(4 / 8)
    assert deltas["bert.encoder.layer.1.output.dense"].scale == pytest.approx(2.0)
    m2 = make_minilm(minilm_dir)
    dt.attach(m2, dt.LoRA(r=4, targets=r"bert\.encoder\.layer\.[0-2]\.attention\.self\.(query|value)"), name="re")
    assert len(dt.deltas(m2, "re")) == 6
    assert lora_scale(16, 4, rslora=True) == 8.0


# -- unit maps and S2FT on real models ----------------------------------------------------------------------------
def test_unit_maps_find_blocks_and_couple_gqa_groups(smollm_dir, minilm_dir):
    blocks = find_blocks(make_smollm(smollm_dir))
    assert len(blocks) == 30 and blocks[0].heads == 9 and blocks[0].kv_heads == 3 and blocks[0].head_dim == 64
    group = blocks[4].coupled("kv", 2)  # KV head 2 serves query heads 6, 7, 8
    assert group["v"][1].tolist() == list(range(128, 192)) and group["k"][1].tolist() == list(range(128, 192))
    assert group["o"] == (1, group["o"][1]) and group["o"][1].tolist() == list(range(384, 576))
    assert blocks[4].coupled("head", 4)["v"][1].tolist() == list(range(64, 128))  # head 4 reads KV head 1
    channel = blocks[0].coupled("channel", 7)
    assert {r: (a, i.tolist()) for r, (a, i) in channel.items()} == {"up": (0, [7]), "gate": (0, [7]),
                                                                      "down": (1, [7])}
    bert = find_blocks(make_minilm(minilm_dir))
    assert [b.names["down"] for b in bert][:1] == ["bert.encoder.layer.0.output.dense"]
    assert bert[0].names["o"] == "bert.encoder.layer.0.attention.output.dense" and bert[0].group_size == 1


peft = pytest.importorskip("peft")


# -- B8: regexes from checkpoints and users never run unbounded ----------------------------------------------
HOSTILE = r"(.|\w)+\d{2}"  # overlapping alternatives under + : exponential backtracking on every module name


def test_hostile_user_patterns_fail_fast(minilm_dir):
    model = make_minilm(minilm_dir)
    for method in (dt.LoRA(targets=HOSTILE), dt.LoRA(targets=["query"], exclude=HOSTILE),
                   dt.LoRA(targets=["query"], rank_pattern={HOSTILE: 2})):
        start = time.monotonic()
        with pytest.raises(ValueError, match="did not finish matching module name"):
            dt.attach(model, method)
        assert time.monotonic() - start < 1.0
    assert dt.adapters(model) == []


def test_literal_pattern_keys_are_not_regexes():
    from deltatune.targets import name_matches

    assert name_matches("bert.encoder.layer.1.attention.self.query", "layer.1.attention.self.query")
    assert not name_matches("bert.encoder.layer_1.attention.self.query", "layer.1.attention.self.query")
    assert name_matches("bert.encoder.layer.1.attention.self.query", r"layer\.\d\.attention\.self\.query")
    assert not name_matches("bert.encoder.layer.1.attention.self.query", "uery")


def test_layers_to_transform_restricts_targets(minilm_dir):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(target_modules=["query", "value"], layers_to_transform=[0, 2]))
    assert sorted(dt.deltas(model, "default")) == [f"bert.encoder.layer.{i}.attention.self.{m}"
                                                   for i in (0, 2) for m in ("query", "value")]
    with pytest.raises(ValueError, match=r"layers=\[99\] keeps none .* indices are \[0, 1, 2, 3, 4, 5\]"):
        dt.attach(model, dt.LoRA(targets=["query"], layers=[99]), name="y")
