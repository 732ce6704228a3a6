"""Codecs per structure and per method (PEFT import/export as a loop over them), specs from the structure classes,
LoRA initializers as registered strategies, and the reload / spec / bind consistency rules."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.deltas import FrozenWeight, FullDelta, GatedSVDDelta, LowRankDelta, RotationDelta, delta_from_spec
from deltatune.io import from_peft, to_peft
from deltatune.io.record import AdapterRecord
from deltatune.methods import LoRA
from deltatune.methods.lora import Initializer, register_init


class Tiny(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _x():
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(3))


# -- reload keeps a residual init's anchor frozen ------------------------------------------------------------------
@pytest.mark.parametrize("method", [dt.PiSSA(r=4), dt.MiLoRA(r=4), dt.OLoRA(r=4)], ids=["pissa", "milora", "olora"])
def test_reloaded_residual_lora_trains_the_same_components_with_the_anchor_frozen(tmp_path, method):
    model = dt.attach(Tiny(), method)
    with torch.no_grad():  # "train"
        for d in dt.deltas(model, "default").values():
            d.A.add_(0.05 * torch.randn_like(d.A))
    y = model(_x())
    dt.save(model, tmp_path / "a")
    fresh = dt.load(Tiny(), tmp_path / "a", is_trainable=True)
    torch.testing.assert_close(fresh(_x()), y)
    assert dt.trainable_parameters(fresh)[0] == dt.trainable_parameters(model)[0]
    for name, d in dt.deltas(fresh, "default").items():
        old = dt.deltas(model, "default")[name]
        assert d.r == old.r == 4 and d.A0 is not None and not d.A0.requires_grad
        torch.testing.assert_close(d.A0, old.A0)
        torch.testing.assert_close(d.B0, old.B0)
        assert d.spec() == old.spec() and d.spec()["r_anchor"] == 4 and d.spec()["r"] == 8


def test_a_spec_without_anchor_loads_as_a_plain_lora_of_the_folded_rank():
    d = LowRankDelta(6, 5, 2, 1.0, anchored=True)
    with torch.no_grad():
        for t in (d.A, d.B, d.A0, d.B0):
            t.normal_()
    spec, tensors = d.spec(), d.tensors()
    plain = delta_from_spec({k: v for k, v in spec.items() if k != "r_anchor"}, tensors)
    assert plain.r == 4 and plain.A0 is None
    torch.testing.assert_close(plain.dense(), d.dense())
    with pytest.raises(ValueError, match="r_anchor"):
        delta_from_spec({**spec, "r_anchor": 1}, tensors)


# -- spec round-trips dropout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [dt.LoRA(r=2, dropout=0.1), dt.AdaLoRA(init_r=3, target_r=2, dropout=0.1),
                                    dt.VeRA(r=4, dropout=0.1)], ids=["lora", "adalora", "vera"])
def test_spec_round_trips_dropout(tmp_path, method):
    model = dt.attach(Tiny(), method)
    d = dt.deltas(model, "default")["up"]
    assert d.spec()["dropout"] == 0.1
    again = delta_from_spec(d.spec(), d.tensors())
    assert again.dropout is not None and again.dropout.p == 0.1 and again.spec() == d.spec()
    dt.save(model, tmp_path / "a")
    assert dt.deltas(dt.load(Tiny(), tmp_path / "a"), "default")["up"].dropout.p == 0.1
    assert "dropout" not in LowRankDelta(4, 4, 2, 1.0).spec()  # no dropout: the spec is as before


# -- deltas read the weight they act on through the bind interface -------------------------------------------------
class Source:
    """A bind source that is not the model's layer wrapper."""

    def __init__(self, weight, merged=False):
        self.weight, self.merged = weight, merged

    def linear_weight(self):
        return self.weight

    def base_bias(self):
        return None

    def is_merged(self, delta):
        return self.merged


def test_rotation_dense_uses_the_bound_source_only():
    W = torch.randn(6, 8)
    d = RotationDelta(6, 8, block_size=4)
    with pytest.raises(RuntimeError, match="install it on a layer first"):
        d.dense()
    with torch.no_grad():
        d.q.normal_(std=0.1)
    d.bind(FrozenWeight(W))
    expected = W @ torch.block_diag(*d.rotation().detach()).t() - W
    torch.testing.assert_close(d.dense(), expected)
    assert d.base_weight()[0] is W and not d.is_merged()
    d.bind(Source(W, merged=True))
    with pytest.raises(RuntimeError, match="merged rotation"):
        d.dense()


# -- specs come from the structure classes -------------------------------------------------------------------------
def test_structures_build_their_specs():
    assert LowRankDelta.spec_for(6, 5, 2, 0.5, layer="linear") == {
        "structure": "lowrank", "layer": "linear", "out_features": 6, "in_features": 5, "r": 2, "scale": 0.5}
    assert FullDelta.spec_for(3, 4) == {"structure": "full", "layer": None, "out_features": 3, "in_features": 4}
    assert GatedSVDDelta.spec_for(6, 5, 3, 1.0)["structure"] == "gated_svd"
    spec = LowRankDelta.spec_for(6, 5, 2, 0.5)
    d = delta_from_spec(spec, {"A": torch.randn(2, 5), "B": torch.randn(6, 2)})
    assert {k: v for k, v in spec.items() if k != "layer"} == d.spec()


# -- PEFT codecs: a new structure and a new method plug in without touching io -------------------------------------
class HalfDelta(LowRankDelta):
    """A toy structure that writes itself to PEFT at half its scale and twice its B (the same update)."""

    structure = "test_half_lowrank"

    @classmethod
    def peft_export(cls, spec, tensors, build, rank=None, energy=None):
        out = super().peft_export(spec, tensors, build, rank, energy)
        return dataclasses.replace(out, B=2 * out.B, scale=out.scale / 2)


def test_a_structure_says_how_it_is_written_to_peft():
    A, B = torch.randn(2, 5), torch.randn(6, 2)
    spec = {**LowRankDelta.spec_for(6, 5, 2, 1.0, layer="linear"), "structure": "test_half_lowrank"}
    record = AdapterRecord("x", {"method": "lora", "r": 2}, {"m": spec}, {"m": {"A": A, "B": B}})
    config, tensors = to_peft(record)
    torch.testing.assert_close(tensors["base_model.model.m.lora_B.weight"], 2 * B)
    assert config["lora_alpha"] == 1  # scale 1/2 at r = 2


@dataclasses.dataclass
class ToyDoRA(LoRA):
    """A LoRA variant that claims PEFT LoRA checkpoints with use_dora (as DoRA will), here reading them as LoRA;
    only those marked ``test_toy`` (other tests check that a plain deltatune refuses use_dora)."""

    name = "test_toy_dora"
    peft_type = "LORA"
    peft_keys = {**LoRA.peft_keys, "use_dora": lambda value: None, "test_toy": lambda value: None}

    @classmethod
    def reads_peft(cls, config):
        return config.get("peft_type") == "LORA" and bool(config.get("use_dora")) and bool(config.get("test_toy"))

    @classmethod
    def from_peft_config(cls, config, targets, saved):
        return {**super().from_peft_config(config, targets, saved), "method": cls.name}


def test_a_method_says_how_it_reads_peft_configs():
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True, "test_toy": True, "target_modules": ["m"]}
    tensors = {"base_model.model.m.lora_A.weight": torch.randn(2, 5), "base_model.model.m.lora_B.weight": torch.randn(6, 2)}
    record = from_peft(config, tensors, "x", {"m": "linear"})
    assert record.method["method"] == "test_toy_dora" and record.modules["m"]["scale"] == 2
    plain = from_peft({**config, "use_dora": False, "test_toy": False}, tensors, "x", {"m": "linear"})
    assert plain.method["method"] == "lora"
    with pytest.raises(ValueError, match="use_dora"):  # LoRA itself still refuses DoRA checkpoints
        from_peft({**config, "test_toy": False}, tensors, "x", {"m": "linear"})


class MagnitudeDelta(LowRankDelta):
    """A toy structure with one tensor beyond the LoRA factors (as DoRA's magnitude vector will be)."""

    structure = "test_magnitude_lowrank"

    @classmethod
    def peft_export(cls, spec, tensors, build, rank=None, energy=None):
        out = super().peft_export(spec, tensors, build, rank, energy)
        return dataclasses.replace(out, extra={"lora_magnitude_vector.weight": tensors["A"].norm(dim=0)})


@dataclasses.dataclass
class ToyMagnitudeLoRA(LoRA):
    name = "test_toy_magnitude"

    def peft_lora(self):
        return {**super().peft_lora(), "use_dora": True}


def test_structures_and_methods_add_their_own_tensors_and_config_keys_to_an_export():
    A, B = torch.randn(2, 5), torch.randn(6, 2)
    spec = {**LowRankDelta.spec_for(6, 5, 2, 1.0, layer="linear"), "structure": "test_magnitude_lowrank"}
    record = AdapterRecord("x", {"method": "test_toy_magnitude", "r": 2}, {"m": spec}, {"m": {"A": A, "B": B}})
    config, tensors = to_peft(record)
    torch.testing.assert_close(tensors["base_model.model.m.lora_magnitude_vector.weight"], A.norm(dim=0))
    assert config["use_dora"] is True and config["peft_type"] == "LORA"


def test_a_record_of_an_unknown_method_still_exports():
    """A file from a newer deltatune (its method unknown here) exports from what its config says."""
    A, B = torch.randn(2, 5), torch.randn(6, 2)
    spec = LowRankDelta.spec_for(6, 5, 2, 0.5, layer="linear")
    record = AdapterRecord("x", {"method": "from_the_future", "dropout": 0.1, "use_rslora": False},
                           {"m": spec}, {"m": {"A": A, "B": B}})
    config, tensors = to_peft(record)
    assert config["lora_dropout"] == 0.1 and config["lora_alpha"] == 1 and config["use_rslora"] is False
    torch.testing.assert_close(tensors["base_model.model.m.lora_A.weight"], A)


# -- LoRA initializers are registered strategies --------------------------------------------------------------------
def test_a_registered_initializer_is_a_valid_init():
    register_init(Initializer("test_ones", lambda W, r, s, method, stats: torch.ones(r, W.shape[1]), kind="A"))
    model = dt.attach(Tiny(), dt.LoRA(r=2, init="test_ones"))
    d = dt.deltas(model, "default")["up"]
    assert torch.equal(d.A, torch.ones(2, 16)) and torch.equal(d.B, torch.zeros(24, 2))
    with pytest.raises(ValueError, match="unknown statistics"):
        register_init(Initializer("test_bad", kind="A", stats=("nope",)))


def test_corda_and_eva_fields_live_on_their_methods():
    lora = {f.name for f in dataclasses.fields(dt.LoRA)}
    assert not lora & {"calibration", "eva_rho", "eva_tau", "max_batches"}
    assert {"calibration", "max_batches"} <= {f.name for f in dataclasses.fields(dt.CorDA)}
    assert {"eva_rho", "eva_tau", "max_batches"} <= {f.name for f in dataclasses.fields(dt.EVA)}
    with pytest.raises(TypeError, match="eva_rho"):
        dt.LoRA(eva_rho=3)
    with pytest.raises(ValueError, match="eva_rho"):
        dt.EVA(eva_rho=0.5).validate()
    # adapter configs saved before keep loading: the stale fields of a plain LoRA are ignored
    old = {"method": "lora", "r": 4, "init": "kaiming", "calibration": None, "eva_rho": 2.0, "eva_tau": 0.99,
           "max_batches": None}
    assert dt.Method.from_dict(old) == dt.LoRA(r=4)
    assert dt.Method.from_dict({**old, "method": "eva", "eva_rho": 3.0}).eva_rho == 3.0
