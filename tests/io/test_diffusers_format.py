"""Diffusion LoRA files on a real diffusers UNet (tiny random config), checked with diffusers' and PEFT's own loaders:
the diffusers format (``load_lora_adapter`` / ``save_lora_adapter`` / a pipeline's ``save_lora_weights``), the
kohya format (diffusers' kohya converter), PEFT conv LoRA both ways, and bad files."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import changed_entries, randomize, state_snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.cli import main
from deltatune.io import NotLowRank

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402

CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8,
              norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
#: conv (3x3 conv1 / conv2, 1x1 conv_shortcut, the downsampler) and attention / linear targets
TARGETS = ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "to_q", "to_v", "to_out.0", "proj_in",
           "time_emb_proj"]
FILE = "pytorch_lora_weights.safetensors"
ATOL = 1e-5


def tiny_unet(**changes) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**CONFIG, **changes}).eval()


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([3, 700]), cond).sample


@pytest.fixture(scope="module")
def base_out():
    return unet_output(tiny_unet())


@pytest.fixture(scope="module")
def adapted(base_out):
    """A deltatune LoRA on conv and attention layers with alpha != r and a rank pattern, random non-zero B."""
    unet = tiny_unet()
    dt.attach(unet, dt.LoRA(r=4, alpha=8, targets=TARGETS, rank_pattern={"conv_shortcut": 2},
                            alpha_pattern={"to_q": 3}), name="style")
    randomize(unet, "style", std=0.1)
    out = unet_output(unet)
    assert (out - base_out).abs().max() > 0.05  # the delta is not zero
    return unet, out


@pytest.mark.parametrize("component", ["unet", None])
def test_export_loads_in_diffusers_load_lora_adapter(tmp_path, adapted, component):
    unet, ours = adapted
    dt.save(unet, tmp_path, format="diffusers", component=component)
    with safe_open(str(tmp_path / FILE), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    pre = "unet." if component else ""
    assert meta[f"{pre}lora_alpha"] == 8 and meta[f"{pre}r"] == 4
    assert shapes[f"{pre}down_blocks.0.resnets.0.conv1.lora_A.weight"] == (4, 32, 3, 3)
    assert shapes[f"{pre}down_blocks.0.resnets.0.conv1.lora_B.weight"] == (32, 4, 1, 1)
    assert shapes[f"{pre}down_blocks.1.resnets.0.conv_shortcut.lora_A.weight"] == (2, 32, 1, 1)
    fresh = tiny_unet()
    fresh.load_lora_adapter(str(tmp_path), prefix=component, use_safetensors=True)
    torch.testing.assert_close(unet_output(fresh), ours, atol=ATOL, rtol=0)
    back = tiny_unet()  # and deltatune reads its own file back
    dt.load(back, tmp_path)
    torch.testing.assert_close(unet_output(back), ours, atol=ATOL, rtol=0)


def _diffusers_lora(unet) -> torch.Tensor:
    """A LoRA that diffusers itself attaches (PEFT inside), random B, alpha != r; returns the UNet's output."""
    unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False,
                                rank_pattern={"conv2": 2}), adapter_name="default")
    return unet_output(unet)


def test_diffusers_save_lora_adapter_loads_with_dt(tmp_path, base_out):
    unet = tiny_unet()
    theirs = _diffusers_lora(unet)
    assert (theirs - base_out).abs().max() > 0.05
    unet.save_lora_adapter(str(tmp_path))
    fresh = tiny_unet()
    dt.load(fresh, tmp_path / FILE)  # the file itself, as people download them
    torch.testing.assert_close(unet_output(fresh), theirs, atol=ATOL, rtol=0)


def test_pipeline_save_lora_weights_loads_with_dt(tmp_path):
    unet = tiny_unet()
    theirs = _diffusers_lora(unet)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    fresh = tiny_unet()
    dt.load(fresh, tmp_path)  # keys carry 'unet.'; the folder's pytorch_lora_weights.safetensors
    torch.testing.assert_close(unet_output(fresh), theirs, atol=ATOL, rtol=0)


def test_file_without_metadata_reads_alpha_as_r(tmp_path, adapted):
    """diffusers' own convention for a file without ``lora_adapter_metadata``: scale 1. deltatune reads it the
    same way diffusers does."""
    unet, _ = adapted
    dt.save(unet, tmp_path, format="diffusers")
    save_file(load_file(tmp_path / FILE), tmp_path / "bare.safetensors")  # the same tensors, no metadata
    ours, theirs = tiny_unet(), tiny_unet()
    dt.load(ours, tmp_path / "bare.safetensors")
    theirs.load_lora_adapter(str(tmp_path), weight_name="bare.safetensors", prefix="unet")
    torch.testing.assert_close(unet_output(ours), unet_output(theirs), atol=ATOL, rtol=0)


def test_kohya_export_read_by_diffusers_converter(tmp_path, adapted):
    unet, ours = adapted
    dt.save(unet, tmp_path, format="kohya")
    t = load_file(tmp_path / FILE)
    n = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert t[f"{n}.lora_down.weight"].shape == (4, 32, 3, 3) and t[f"{n}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert t[f"{n}.alpha"].dim() == 0 and float(t[f"{n}.alpha"]) == 8
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float(t[f"{q}.alpha"]) == 8  # one alpha for all; to_q's own (alpha 3) is folded into its lora_up
    B = dt.deltas(unet, "style")["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].B.detach()
    torch.testing.assert_close(t[f"{q}.lora_up.weight"], B * 3 / 8)
    # diffusers' pipeline loader: lora_state_dict runs its kohya converter, load_lora_into_unet attaches it
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path), use_safetensors=True)
    fresh = tiny_unet()
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, fresh)
    lora_layers = [n for n, m in fresh.named_modules() if hasattr(m, "lora_A")]
    assert len(lora_layers) == len(dt.deltas(unet, "style"))  # every module was mapped back
    torch.testing.assert_close(unet_output(fresh), ours, atol=ATOL, rtol=0)
    back = tiny_unet()
    dt.load(back, tmp_path)
    torch.testing.assert_close(unet_output(back), ours, atol=ATOL, rtol=0)


def test_kohya_missing_alpha_means_r(tmp_path, adapted):
    unet, _ = adapted
    dt.save(unet, tmp_path, format="kohya")
    t = {k: v for k, v in load_file(tmp_path / FILE).items() if not k.endswith(".alpha")}
    save_file(t, tmp_path / "noalpha.safetensors")
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "noalpha.safetensors"))
    theirs, ours = tiny_unet(), tiny_unet()
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, theirs)
    dt.load(ours, tmp_path / "noalpha.safetensors")
    torch.testing.assert_close(unet_output(ours), unet_output(theirs), atol=ATOL, rtol=0)
    assert {d.scale for d in dt.deltas(ours, "default").values()} == {1.0}


def test_peft_made_conv_lora_imports(tmp_path, base_out):
    """A PEFT LoRA on the UNet's convs and attention, made and saved by PEFT (get_peft_model, save_pretrained)."""
    unet = tiny_unet()
    pm = get_peft_model(unet, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                                          rank_pattern={"conv_shortcut": 2}))
    theirs = unet_output(pm)
    assert (theirs - base_out).abs().max() > 0.05
    pm.save_pretrained(str(tmp_path))
    fresh = tiny_unet()
    dt.load(fresh, tmp_path)
    torch.testing.assert_close(unet_output(fresh), theirs, atol=ATOL, rtol=0)
    conv1 = dt.deltas(fresh, "default")["down_blocks.0.resnets.0.conv1"]
    assert conv1.A.shape == (4, 32 * 9) and conv1.scale == 2  # linear layout, alpha / r


def test_peft_export_of_conv_loads_in_peft(tmp_path, adapted):
    unet, ours = adapted
    dt.save(unet, tmp_path, format="peft")
    pm = PeftModel.from_pretrained(tiny_unet(), str(tmp_path))
    torch.testing.assert_close(unet_output(pm), ours, atol=ATOL, rtol=0)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 12, 3, padding=1, groups=4)

    def forward(self, x):
        return self.conv(x)


def test_grouped_conv_export_is_exact_in_peft(tmp_path):
    """PEFT's grouped-conv LoRA (``lora_A`` over all inputs, ``lora_B`` grouped) holds ours exactly at rank
    ``groups * r`` with a block-diagonal ``lora_A``; PEFT runs it to the same output, and it reads back."""
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    m = Grouped()
    dt.attach(m, dt.LoRA(r=2, alpha=4, targets=["conv"]), name="g")
    randomize(m, "g", std=0.3)
    ours = m(x).detach()
    dt.save(m, tmp_path, format="peft")
    t = load_file(tmp_path / "adapter_model.safetensors")
    assert t["base_model.model.conv.lora_A.weight"].shape == (8, 8, 3, 3)  # R = 4 groups * r 2
    assert t["base_model.model.conv.lora_B.weight"].shape == (12, 2, 1, 1)
    pm = PeftModel.from_pretrained(Grouped(), str(tmp_path))
    torch.testing.assert_close(pm(x), ours, atol=1e-5, rtol=0)
    back = Grouped()
    dt.load(back, tmp_path)
    torch.testing.assert_close(back(x), ours, atol=1e-5, rtol=0)
    with pytest.raises(NotLowRank, match="grouped convolution"):
        dt.save(m, tmp_path / "k", format="kohya")


def test_peft_grouped_lora_mixing_groups_is_refused(tmp_path):
    pm = get_peft_model(Grouped(), LoraConfig(r=4, target_modules=["conv"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path))
    m = Grouped()
    before = state_snapshot(m)
    with pytest.raises(ValueError, match="mixes input groups"):
        dt.load(m, tmp_path)
    assert dt.adapters(m) == [] and changed_entries(m, before) == []


# -- bad files: a clear error naming the file and the key, and nothing attached ------------------------------------
def _refused(unet, path, match):
    before = state_snapshot(unet)
    with pytest.raises(ValueError, match=match) as e:
        dt.load(unet, path)
    assert dt.adapters(unet) == [] and changed_entries(unet, before) == []
    return str(e.value)


def test_kohya_file_for_another_unet_is_refused(tmp_path, adapted):
    unet, _ = adapted
    dt.save(unet, tmp_path, format="kohya")
    t = load_file(tmp_path / FILE)
    renamed = {k.replace("down_blocks_1_resnets_0_conv1", "down_blocks_7_resnets_0_conv1"): v for k, v in t.items()}
    save_file(renamed, tmp_path / "other.safetensors")
    msg = _refused(tiny_unet(), tmp_path / "other.safetensors", "lacks")
    assert "other.safetensors" in msg and "lora_unet_down_blocks_7_resnets_0_conv1" in msg
    # a UNet of other widths: the names exist, the shapes do not fit
    wide = tiny_unet(block_out_channels=(16, 32))
    msg = _refused(wide, tmp_path, "does not fit")
    assert FILE in msg and "key 'lora_unet_" in msg


def test_kernel_mismatch_is_refused(tmp_path, adapted):
    """A 3x3 lora_A for the 1x1 conv_shortcut (whose flattened size would fit a 3x3 on fewer channels)."""
    unet, _ = adapted
    dt.save(unet, tmp_path, format="diffusers")
    t = load_file(tmp_path / FILE)
    key = "unet.down_blocks.1.resnets.0.conv_shortcut.lora_A.weight"
    r, c = t[key].shape[:2]
    t[key] = torch.randn(r, c, 3, 3)
    save_file(t, tmp_path / "bad.safetensors")
    msg = _refused(tiny_unet(), tmp_path / "bad.safetensors", "kernel")
    assert "bad.safetensors" in msg and "down_blocks.1.resnets.0.conv_shortcut" in msg


def test_dora_files_are_refused(tmp_path, adapted):
    unet, _ = adapted
    dt.save(unet, tmp_path, format="kohya")
    t = load_file(tmp_path / FILE)
    t["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"] = torch.ones(32, 1, 1, 1)
    save_file(t, tmp_path / "dora.safetensors")
    msg = _refused(tiny_unet(), tmp_path / "dora.safetensors", "DoRA")
    assert "dora.safetensors" in msg and "lora_unet_down_blocks_0_resnets_0_conv1.dora_scale" in msg


def test_cli_export_to_diffusers_and_kohya(tmp_path, adapted):
    unet, ours = adapted
    dt.save(unet, tmp_path / "own")
    assert main(["export", str(tmp_path / "own"), "--to", "kohya", str(tmp_path / "kohya")]) == 0
    assert main(["export", str(tmp_path / "own"), "--to", "diffusers", str(tmp_path / "diff")]) == 0
    for folder in ("kohya", "diff"):
        back = tiny_unet()
        dt.load(back, tmp_path / folder)
        torch.testing.assert_close(unet_output(back), ours, atol=ATOL, rtol=0)
    fresh = tiny_unet()
    fresh.load_lora_adapter(str(tmp_path / "diff"), prefix="unet", use_safetensors=True)
    torch.testing.assert_close(unet_output(fresh), ours, atol=ATOL, rtol=0)


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.conv(x)


def test_grouped_conv_rank_survives_peft_round_trips(tmp_path):
    """Our export's block-diagonal ``lora_A`` has equal blocks: it reads back at rank r, not groups * r, so a
    second save writes the same shapes (no g-fold growth per round trip)."""
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    m = Depthwise()
    dt.attach(m, dt.LoRA(r=2, alpha=4, targets=["conv"]), name="g")
    randomize(m, "g", std=0.3)
    ours = m(x).detach()
    shapes = []
    for i in range(2):
        dt.save(m, tmp_path / str(i), format="peft")
        shapes.append({k: v.shape for k, v in load_file(tmp_path / str(i) / "adapter_model.safetensors").items()})
        m = Depthwise()
        dt.load(m, tmp_path / str(i), name="g")
        assert dt.deltas(m, "g")["conv"].A.shape == (2, 9)
        torch.testing.assert_close(m(x), ours, atol=1e-5, rtol=0)
    assert shapes[0] == shapes[1]
    assert shapes[0]["base_model.model.conv.lora_A.weight"] == (16, 8, 3, 3)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


def test_peft_conv_adapter_reads_without_a_model(tmp_path, capsys):
    """Without a model a 4-D factor says Conv2d: ``inspect`` and ``export --to diffusers|kohya`` of a PEFT conv
    adapter work, and the exports run to PEFT's output; the safetensors file itself loads as its folder."""
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    pm = get_peft_model(Convs(), LoraConfig(r=2, lora_alpha=6, target_modules=["conv", "lin"],
                                           init_lora_weights=False))
    theirs = pm(x).detach()
    pm.save_pretrained(str(tmp_path / "peft"))
    assert main(["inspect", str(tmp_path / "peft"), "--json"]) == 0
    rows = {r["module"]: r for r in json.loads(capsys.readouterr().out)["modules"]}
    assert rows["conv"]["layer"] == "nn_conv2d" and rows["conv"]["kernel"] == [3, 3]
    for to in ("diffusers", "kohya"):
        assert main(["export", str(tmp_path / "peft"), "--to", to, str(tmp_path / to)]) == 0
        back = Convs()
        dt.load(back, tmp_path / to)
        torch.testing.assert_close(back(x), theirs, atol=1e-5, rtol=0)
    back = Convs()
    dt.load(back, tmp_path / "peft" / "adapter_model.safetensors")  # the weights file of an adapter folder
    torch.testing.assert_close(back(x), theirs, atol=1e-5, rtol=0)


class LinearNamedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Linear(36, 6)


def test_conv_factors_for_a_linear_layer_say_so(tmp_path):
    """4-D factors on a Linear: an error about the factors' dimensions, not a "torn checkpoint" rank error."""
    get_peft_model(Convs(), LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False)
                   ).save_pretrained(str(tmp_path))
    m = LinearNamedConv()
    before = state_snapshot(m)
    with pytest.raises(ValueError, match="not 2-D") as e:
        dt.load(m, tmp_path)
    assert "torn" not in str(e.value) and "'conv'" in str(e.value)
    assert dt.adapters(m) == [] and changed_entries(m, before) == []


def tiny_text_encoder():
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=100, max_position_embeddings=16)).eval()


def text_output(te) -> torch.Tensor:
    with torch.no_grad():
        return te(torch.arange(8).reshape(1, 8)).last_hidden_state


def test_pipeline_files_of_several_components_load_one(tmp_path):
    """A pipeline file with UNet and text-encoder LoRAs (diffusers' save_lora_weights; kohya lora_unet_* with
    lora_te_*): the UNet's by default, the text encoder's with component=, the rest skipped with one warning."""
    unet, te = tiny_unet(), tiny_text_encoder()
    unet_out = _diffusers_lora(unet)
    te_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(te_config, te)
    te_out = text_output(te)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(tmp_path / "pipe"), unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict())
    n_te = len(get_peft_model_state_dict(te))
    ours = tiny_unet()
    with pytest.warns(UserWarning, match=f"skipped {n_te} keys"):
        dt.load(ours, tmp_path / "pipe")
    torch.testing.assert_close(unet_output(ours), unet_out, atol=ATOL, rtol=0)
    ours_te = tiny_text_encoder()
    with pytest.warns(UserWarning, match="skipped"):
        dt.load(ours_te, tmp_path / "pipe", component="text_encoder")
    torch.testing.assert_close(text_output(ours_te), te_out, atol=ATOL, rtol=0)
    # kohya: one file of both, as A1111 files are
    dt.save(ours, tmp_path / "ku", format="kohya")
    dt.save(ours_te, tmp_path / "kt", format="kohya", component="text_encoder")
    both = {**load_file(tmp_path / "ku" / FILE), **load_file(tmp_path / "kt" / FILE)}
    save_file(both, tmp_path / "a1111.safetensors")
    back, back_te = tiny_unet(), tiny_text_encoder()
    with pytest.warns(UserWarning, match=f"skipped {len(load_file(tmp_path / 'kt' / FILE))} keys"):
        dt.load(back, tmp_path / "a1111.safetensors")
    torch.testing.assert_close(unet_output(back), unet_out, atol=ATOL, rtol=0)
    with pytest.warns(UserWarning, match="skipped"):
        dt.load(back_te, tmp_path / "a1111.safetensors", component="text_encoder")
    torch.testing.assert_close(text_output(back_te), te_out, atol=ATOL, rtol=0)
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "a1111.safetensors"))
    assert any(k.startswith("text_encoder.") for k in state)  # diffusers reads the same file as both components
    with pytest.raises(ValueError, match="no LoRA for component 'transformer'"):
        dt.load(tiny_unet(), tmp_path / "pipe", component="transformer")
    dt.save(ours, tmp_path / "own", format="diffusers", component=None)  # a model's own keys: any component's
    own = tiny_unet()
    dt.load(own, tmp_path / "own", component="unet")
    torch.testing.assert_close(unet_output(own), unet_out, atol=ATOL, rtol=0)


def test_grouped_conv_file_without_metadata_reads_as_scale_one(tmp_path):
    """Without metadata a module's update is ``B A`` (alpha = r); a grouped conv's rank is lora_A's rows (its
    lora_B has R / groups columns). Reference: PEFT running a grouped-conv LoRA with distinct block-diagonal
    blocks of lora_A at scale 1."""
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    pm = get_peft_model(Grouped(), LoraConfig(r=8, lora_alpha=8, target_modules=["conv"], init_lora_weights=False))
    A = pm.base_model.model.conv.lora_A["default"].weight
    with torch.no_grad():  # input group j -> channels 2j, 2j+1 only (an update of the grouped weight)
        A.copy_(A * torch.block_diag(*[torch.ones(2, 2)] * 4)[:, :, None, None])
    theirs = pm(x).detach()
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(pm).items()}
    save_file(state, tmp_path / "bare.safetensors")
    back = Grouped()
    dt.load(back, tmp_path / "bare.safetensors")
    torch.testing.assert_close(back(x), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key, value, match", [("lora_alpha", "8", "number"), ("use_rslora", "yes", "true or false"),
                                               ("r", 4.5, "integer")])
def test_bad_metadata_numbers_are_refused(tmp_path, key, value, match):
    """The file's LoraConfig gets the checks an adapter_config.json gets: a ValueError naming the file and key."""
    m = Convs()
    dt.attach(m, dt.LoRA(r=2, targets=["conv", "lin"]))
    dt.save(m, tmp_path, format="diffusers", component=None)
    with safe_open(str(tmp_path / FILE), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    meta[key] = value
    save_file(load_file(tmp_path / FILE), tmp_path / "bad.safetensors",
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    msg = _refused(Convs(), tmp_path / "bad.safetensors", match)
    assert "bad.safetensors" in msg and repr(key) in msg


class OddConvs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.plain = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.plain(self.reflect(self.dilated(x)))


@pytest.mark.parametrize("format", ["peft", "diffusers", "kohya"])
def test_export_of_convs_peft_runs_otherwise_warns(tmp_path, format):
    """PEFT's lora_A has no dilation or padding_mode: one warning names those modules (not the plain conv); the
    file itself reads back exactly."""
    x = torch.randn(1, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    m = OddConvs()
    dt.attach(m, dt.LoRA(r=2, targets=["dilated", "reflect", "plain"]))
    randomize(m, "default", std=0.3)
    with pytest.warns(UserWarning, match="otherwise than deltatune") as record:
        dt.save(m, tmp_path, format=format)
    msgs = [str(w.message) for w in record if "otherwise than deltatune" in str(w.message)]
    assert len(msgs) == 1 and "dilated: dilation (2, 2)" in msgs[0] and "reflect: padding_mode 'reflect'" in msgs[0]
    assert "plain" not in msgs[0]
    back = OddConvs()
    dt.load(back, tmp_path)
    torch.testing.assert_close(back(x), m(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_adapter_name_survives_lora_files(tmp_path, format):
    """The name goes into the safetensors metadata (which diffusers' loader ignores); name= still renames."""
    m = Convs()
    dt.attach(m, dt.LoRA(r=2, targets=["conv", "lin"]), name="style")
    dt.save(m, tmp_path, format=format)
    back = Convs()
    dt.load(back, tmp_path)
    assert dt.adapters(back) == ["style"]
    renamed = Convs()
    dt.load(renamed, tmp_path / FILE, name="other")
    assert dt.adapters(renamed) == ["other"]
