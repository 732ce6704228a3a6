"""diffusers models as first-class targets: every method on a tiny random-config UNet2DConditionModel, a
representative subset on a class-conditional UNet2DModel and on a DiT (DiTTransformer2DModel); S2FT's units on DiT
blocks; extraction of conv LoRAs from two UNet checkpoints; ``deltatune inspect`` on a UNet adapter; transposed
convolutions refused. Random weights from tiny configs (nothing is downloaded)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.cli import main
from deltatune.insight import module_ranks, rank_grid
from deltatune.io import read_record, write_record
from deltatune.targets import FAMILIES, family, find_blocks

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread computes them as fast as two, and two spin-waiting threads on shared cores
    make a tiny conv a hundred times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- tiny models and fixed batches -----------------------------------------------------------------------------------
def unet_cond() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8, norm_num_groups=8,
        attention_head_dim=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def unet_class() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, norm_num_groups=8, in_channels=4,
        out_channels=4, num_class_embeds=10, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def dit() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
                                           sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def _noise(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


#: per model: builder, keyword batch, noise target, and the modules the issue names that "all" must reach
MODELS = {
    "unet_cond": (unet_cond, lambda: dict(sample=_noise(2, 4, 8, 8, seed=1), timestep=torch.tensor([10, 500]),
                                          encoder_hidden_states=_noise(2, 5, 32, seed=2)), [
        *(f"down_blocks.0.attentions.0.transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2")
          for p in ("to_q", "to_k", "to_v", "to_out.0")),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
        "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.proj_out",
        "down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv2", "down_blocks.1.resnets.0.conv_shortcut",
        "time_embedding.linear_1", "time_embedding.linear_2"]),
    "unet_class": (unet_class, lambda: dict(sample=_noise(2, 4, 8, 8, seed=1), timestep=torch.tensor([10, 500]),
                                            class_labels=torch.tensor([3, 8])), [
        *(f"down_blocks.1.attentions.0.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")),
        "down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv2", "down_blocks.1.resnets.0.conv_shortcut",
        "time_embedding.linear_1", "time_embedding.linear_2"]),
    "dit": (dit, lambda: dict(hidden_states=_noise(2, 4, 8, 8, seed=1), timestep=torch.tensor([10, 500]),
                              class_labels=torch.tensor([3, 8])), [
        *(f"transformer_blocks.1.attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")),
        "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff.net.2", "pos_embed.proj",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2", "proj_out_1", "proj_out_2"]),
}

#: method -> (config, whether the output at init is the base's bit for bit: zero-initialized updates; the residual
#: initializations and OFT's identity rotation agree to fp32 rounding)
METHODS = {
    "lora": (lambda t: dt.LoRA(r=2, targets=t), True),
    "pissa": (lambda t: dt.PiSSA(r=2, targets=t), False),
    "milora": (lambda t: dt.MiLoRA(r=2, targets=t), False),
    "olora": (lambda t: dt.OLoRA(r=2, targets=t), False),
    "corda": (lambda t: dt.CorDA(r=2, targets=t), False),
    "eva": (lambda t: dt.EVA(r=2, targets=t), True),
    "adalora": (lambda t: dt.AdaLoRA(init_r=3, target_r=2, targets=t), True),
    "increlora": (lambda t: dt.IncreLoRA(init_r=2, target_r=3, targets=t), True),
    "sora": (lambda t: dt.SoRA(r=2, targets=t), True),
    "spiel": (lambda t: dt.SpIEL(density=0.01, targets=t), True),
    "ltsft": (lambda t: dt.LTSFT(density=0.01, targets=t), True),
    "orthogonal": (lambda t: dt.OrthogonalAdaptation(r=2, targets=t), True),
    "vera": (lambda t: dt.VeRA(r=8, targets=t), True),
    "nola": (lambda t: dt.NOLA(r=2, k_A=4, k_B=4, targets=t), True),
    "oft": (lambda t: dt.OFT(block_size=4, targets=t), False),
    "sorsa": (lambda t: dt.SORSA(r=2, targets=t), False),
    "s2ft": (lambda t: dt.S2FT(ratio=0.25, targets=t), True),
}
#: calibration statistics are per linear layer: the data-aware initializations take the linear targets
DATA_AWARE = {"corda", "eva"}
#: S2FT selects heads and FFN channels of transformer blocks (a unit map): the DiT's blocks, not a UNet's (GEGLU)
UNIT_BASED = {"s2ft"}
SUBSET = ["lora", "adalora", "spiel", "orthogonal", "oft", "sorsa"]  # one per structure family
CASES = [("unet_cond", m, "all-linear" if m in DATA_AWARE else "all") for m in METHODS if m not in UNIT_BASED] + \
    [("unet_cond", m, "all-conv") for m in ("lora", "oft", "spiel")] + \
    [("unet_class", m, "all") for m in SUBSET] + [("dit", m, "all") for m in [*SUBSET, "s2ft", "pissa", "vera"]] + \
    [("dit", "lora", "all-linear")]


def _out(model, batch):
    with torch.no_grad():
        return model(**batch).sample


def _loss(model, batch, target):
    return (model(**batch).sample - target).pow(2).mean()


def _fit(model, batch, target, steps=4, lr=1e-2):
    """A bare loop on one fixed batch; returns the loss before and after."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    dt.begin(model, total_steps=steps)
    with torch.no_grad():
        before = float(_loss(model, batch, target))
    model.train()
    for _ in range(steps):
        _loss(model, batch, target).backward()
        dt.after_backward(model, opt)
        opt.step()
        dt.step(model, opt)
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        return before, float(_loss(model, batch, target))


def _close(a, b, rel=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=rel * float(b.abs().max()))


@pytest.mark.parametrize("model_name,method,targets", CASES, ids=["-".join(c) for c in CASES])
def test_every_method_attaches_trains_merges_and_round_trips(model_name, method, targets, tmp_path):
    build, make_batch, required = MODELS[model_name]
    make_method, exact_at_init = METHODS[method]
    model, batch = build(), make_batch()
    target = _noise(*_out(model, batch).shape, seed=3)
    base_params = [(p, p.detach().clone()) for p in model.parameters()]
    y0 = _out(model, batch)
    dt.attach(model, make_method(targets), data=[batch] if method in DATA_AWARE else None)

    adapted = dt.deltas(model, "default")
    if method in UNIT_BASED:  # heads and FFN channels of every block: the attention and FFN projections only
        assert {n.split(".", 2)[2] for n in adapted} <= {"attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"}
    elif method != "eva":  # EVA redistributes the rank budget (a layer may get none)
        plain = build()
        families = {family(model.get_submodule(n).base) for n in adapted}
        want = [n for n in required if family(plain.get_submodule(n)) in FAMILIES[targets]]
        assert set(want) <= set(adapted), sorted(set(want) - set(adapted))
        assert families == set(FAMILIES[targets])
    y_init = _out(model, batch)
    if exact_at_init:
        assert torch.equal(y_init, y0)
    else:
        _close(y_init, y0)

    before, after = _fit(model, batch, target)
    assert after < before
    y1 = _out(model, batch)
    assert (y1 - y0).abs().max() > 1e-4

    dt.merge(model)
    _close(_out(model, batch), y1)
    dt.unmerge(model)
    assert all(torch.equal(p, p0) for p, p0 in base_params)  # bit for bit
    torch.testing.assert_close(_out(model, batch), y1, rtol=0, atol=0)
    with dt.disabled(model):
        assert torch.equal(_out(model, batch), y0)

    dt.save(model, tmp_path / "a")
    fresh = build()
    dt.load(fresh, tmp_path / "a")
    _close(_out(fresh, batch), y1, rel=1e-6)


@pytest.mark.parametrize("model_name", MODELS)
def test_all_linear_all_conv_and_all_select_by_family(model_name):
    build = MODELS[model_name][0]
    plain = build()
    linear = {n for n, m in plain.named_modules() if isinstance(m, nn.Linear)}
    conv = {n for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)}
    found = {t: set(dt.deltas(dt.attach(build(), dt.LoRA(r=1, targets=t)), "default"))
             for t in ("all-linear", "all-conv", "all")}
    assert found == {"all-linear": linear, "all-conv": conv, "all": linear | conv}


# -- S2FT on DiT blocks ----------------------------------------------------------------------------------------------
def _captured_input(module, run):
    """The input of ``module`` during ``run()``."""
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen["x"]


def test_s2ft_on_dit_blocks_selects_whole_heads_and_ffn_channels():
    model, batch = dit(), MODELS["dit"][1]()
    y0 = _out(model, batch)
    dt.attach(model, dt.S2FT(v_ratio=0.5, o_ratio=0.5, u_ratio=0.25, d_ratio=0.25, seed=1))
    assert torch.equal(_out(model, batch), y0)
    blocks = find_blocks(model, modules=dict(dt.model.base_modules(model)))
    assert [(b.index, b.heads, b.head_dim, b.channels) for b in blocks] == [(0, 2, 8, 64), (1, 2, 8, 64)]
    deltas = dt.deltas(model, "default")
    count = {role: sum(deltas[b.names[role]].idx.numel() for b in blocks if b.names[role] in deltas)
             for role in ("v", "o", "up", "down")}
    # global pool over 2 blocks: int(2 * 2 heads * 0.5) heads of v and of o, int(2 * 64 * 0.25) FFN channels
    assert count == {"v": 2 * 8, "o": 2 * 8, "up": 32, "down": 32}
    for b in blocks:
        for role, axis in (("v", 0), ("o", 1)):
            if b.names[role] in deltas:
                d = deltas[b.names[role]]
                heads = d.idx.view(-1, 8)
                assert d.axis == axis and torch.equal(heads, heads[:, :1] + torch.arange(8))  # whole, aligned heads
                assert torch.equal(heads[:, 0] % 8, torch.zeros(len(heads), dtype=torch.long))
    # a trained v head changes exactly its own head's columns of the attention output (to_out.0's input); a trained
    # up channel changes exactly its own FFN channel (ff.net.2's input)
    b = next(b for b in blocks if b.names["v"] in deltas and b.names["up"] in deltas)
    for role, reader, unit in (("v", "o", 8), ("up", "down", 1)):
        with torch.no_grad():
            for d in deltas.values():
                d.D.zero_()
        reading = model.get_submodule(b.names[reader])
        clean = _captured_input(reading, lambda: _out(model, batch))
        d = deltas[b.names[role]]
        with torch.no_grad():
            d.D.normal_(0, 0.5)
        moved = _captured_input(reading, lambda: _out(model, batch))
        changed = ((moved - clean).abs().amax(dim=(0, 1)) > 1e-7).view(-1, unit).any(1)
        expected = torch.zeros(changed.numel(), dtype=torch.bool)
        expected[(d.idx // unit).unique()] = True
        assert torch.equal(changed, expected), role


def test_s2ft_on_transformer2dmodel_as_dit_and_clear_errors_elsewhere():
    torch.manual_seed(0)
    common = dict(num_layers=1, attention_head_dim=8, num_attention_heads=2, in_channels=4, sample_size=8,
                  patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero", norm_elementwise_affine=False)
    model = diffusers.Transformer2DModel(activation_fn="gelu-approximate", **common)
    dt.attach(model, dt.S2FT(o_ratio=0.5, d_ratio=0.5))
    assert set(dt.deltas(model, "default")) == {"transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.ff.net.2"}
    geglu = diffusers.Transformer2DModel(**common)  # GEGLU packs gate and up rows into one projection: no FFN units
    with pytest.raises(ValueError, match="ff.net.0.proj' has 128 outputs but .*ff.net.2' 64 inputs"):
        dt.attach(geglu, dt.S2FT(o_ratio=0.5, d_ratio=0.5))
    with pytest.raises(ValueError, match="no unit map for model type 'UNet2DConditionModel'"):
        dt.attach(unet_cond(), dt.S2FT())
    assert not any(isinstance(m, dt.AdaptedLayer) for m in geglu.modules())


# -- extraction and inspect on conv weights -----------------------------------------------------------------------
def _low_rank(out_f, in_f, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g) * 0.05


@pytest.mark.parametrize("with_config", [True, False], ids=["kinds-from-config", "kinds-guessed"])
def test_extract_recovers_known_low_rank_conv_and_linear_updates(tmp_path, with_config):
    base, tuned = unet_cond(), unet_cond()
    deltas = {"down_blocks.1.resnets.0.conv1": 2, "down_blocks.1.resnets.0.conv_shortcut": 1,
              "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2, "conv_in": 1}
    want = {}
    with torch.no_grad():
        for i, (name, r) in enumerate(deltas.items()):
            w = tuned.get_submodule(name).weight
            want[name] = _low_rank(w.shape[0], w[0].numel(), r, seed=i)
            w.add_(want[name].reshape(w.shape))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    if not with_config:
        for folder in ("base", "tuned"):
            (tmp_path / folder / "config.json").unlink()
    record, report = dt.extract(tmp_path / "base", tmp_path / "tuned", rank=2)
    assert report.ranks == dict.fromkeys(deltas, 2) and max(report.errors.values()) < 1e-5
    assert report.unchanged > 40 and not report.skipped and not report.kept_whole
    conv1 = record.modules["down_blocks.1.resnets.0.conv1"]
    assert (conv1["layer"], conv1["out_features"], conv1["in_features"], conv1["kernel"]) == \
        ("nn_conv2d", 64, 32 * 3 * 3, [3, 3])
    assert conv1.get("groups") == (1 if with_config else None)  # the groups are not in a weight's shape
    for name, dW in want.items():
        t = record.tensors[name]
        torch.testing.assert_close(t["B"] @ t["A"], dW, rtol=0, atol=1e-5 * float(dW.abs().max()))
    batch = MODELS["unet_cond"][1]()
    want = _out(tuned, batch)
    for fmt in ("deltatune", "peft", "diffusers"):  # the conv factors go to the kernel-shaped file layouts too
        write_record(tmp_path / fmt, record, format=fmt)
        loaded = dt.load(unet_cond(), tmp_path / fmt)
        _close(_out(loaded, batch), want)


def test_inspect_reports_conv_modules_and_parameters_of_a_unet_adapter(tmp_path, capsys):
    model = unet_cond()
    dt.attach(model, dt.LoRA(r=2, targets="all"), name="unet")
    dt.save(model, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {r["module"]: r for r in info["modules"]}
    assert info["params"] == dt.trainable_parameters(model)[0]
    conv1 = rows["down_blocks.1.resnets.0.conv1"]
    assert (conv1["layer"], conv1["shape"], conv1["kernel"], conv1["r"], conv1["params"]) == \
        ("nn_conv2d", [64, 288], [3, 3], 2, 2 * (64 + 288))
    assert rows["time_embedding.linear_1"]["layer"] == "linear"
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    n_conv = sum(isinstance(m, nn.Conv2d) for m in unet_cond().modules())
    assert f"modules   {len(rows)} ({len(rows)} lowrank)" in out and f"params    {info['params']:,}" in out
    lines = out.splitlines()
    header = next(x for x in lines if x.startswith("module "))
    assert header.split() == ["module", "structure", "layer", "shape", "groups", "kernel", "r", "scale", "params"]
    line = next(x for x in lines if x.startswith("down_blocks.1.resnets.0.conv1 "))
    assert line.split() == ["down_blocks.1.resnets.0.conv1", "lowrank", "nn_conv2d", "64x288", "1", "[3,", "3]", "2",
                            "1", "704"]
    assert sum(" nn_conv2d " in x for x in out.splitlines()) == n_conv
    # the rank heatmap keeps the UNet's stacks apart (down_blocks.0 and up_blocks.0 are different layers)
    layers, types, grid = rank_grid(module_ranks(read_record(tmp_path / "a").modules))
    numbered = [m for m in rows if any(p.isdigit() for p in m.split("."))]
    assert sum(v == v for row in grid for v in row) == len(numbered) and "up_blocks/resnets.0.conv1" in types
    assert main(["inspect", str(tmp_path / "a"), "--plot", str(tmp_path / "ranks.png")]) == 0
    assert (tmp_path / "ranks.png").stat().st_size > 1000


def test_mixed_adapter_batches_combine_and_interference_on_a_unet():
    model, batch = unet_cond(), MODELS["unet_cond"][1]()
    for name, method in (("a", dt.LoRA(r=2, targets="all")), ("b", dt.LoRA(r=3, targets="all-conv")),
                         ("c", dt.SpIEL(density=0.01, targets="all")), ("o", dt.OFT(block_size=4, targets="all"))):
        dt.attach(model, method, name=name, activate=False)
        with torch.no_grad():
            for d in dt.deltas(model, name).values():
                for p in d.parameters():  # non-zero updates (inactive adapters' parameters are frozen, not fixed)
                    p.normal_(0, 0.05)
    rows = ["a", "c", None, "o"]
    four = {k: torch.cat([v, v]) for k, v in batch.items()}
    with torch.no_grad():
        mixed = model(**four, adapter_names=rows).sample
    for i, name in enumerate(rows):
        row = {k: v[i:i + 1] for k, v in four.items()}
        with dt.adapter_rows(model, [name]):
            alone = _out(model, row)
        _close(mixed[i:i + 1], alone)
        with dt.adapter_rows(model, [None]):
            assert name is None or (alone - _out(model, row)).abs().max() > 1e-3  # every adapter does something
    errors = dt.combine(model, ["a", "b"], method="sum", name="ab")
    assert set(errors) == set(dt.deltas(model, "a")) and max(errors.values()) == 0.0  # exact: ranks side by side
    combined = _out(model, batch)
    dt.set_active(model, ["a", "b"])
    _close(combined, _out(model, batch))
    overlaps = {r["module"]: r for r in dt.interference(model, ["a", "b"], inputs=[batch])}
    assert set(overlaps) == set(dt.deltas(model, "b")) and all(r["crosstalk_ab"] > 0 for r in overlaps.values())


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["1.conv"], r".*conv"], ids=["by-name", "by-regex"])
def test_a_transposed_conv_is_refused_by_name_and_nothing_is_attached(targets):
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Upsample2D(8, use_conv_transpose=True))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"'1\.conv', and deltatune cannot adapt ConvTranspose2d: transposed "
                                         r"convolutions are not supported"):
        dt.attach(net, dt.LoRA(r=1, targets=targets))
    assert not any(isinstance(m, dt.AdaptedLayer) for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert set(dt.deltas(dt.attach(net, dt.LoRA(r=1, targets="all-conv")), "default")) == {"0"}  # skipped by family


def test_data_aware_initializations_name_a_conv_target_they_cannot_calibrate():
    model, batch = unet_cond(), MODELS["unet_cond"][1]()
    with pytest.raises(ValueError, match="linear layers only, and 'conv_in' is a Conv2d"):
        dt.attach(model, dt.CorDA(r=2, targets="all"), data=[batch])
    assert not any(isinstance(m, dt.AdaptedLayer) for m in model.modules())
