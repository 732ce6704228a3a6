"""HF PEFT as the numerical reference: same LoRA weights give the same outputs and gradients, and checkpoints
move both ways, on MiniLM (BERT) and SmolLM2-135M (Llama with grouped-query attention)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import logits, make_minilm, make_smollm, randomize

import deltatune as dt
from deltatune.methods.lora import svd_triplets


peft = pytest.importorskip("peft")


def _copy_ours_into_peft(model, peft_model, name):
    """Copy our factors into PEFT's modules of the same names."""
    n = 0
    for mod, delta in dt.deltas(model, name).items():
        layer = peft_model.base_model.model.get_submodule(mod)
        with torch.no_grad():
            if isinstance(delta, dt.FullDelta):
                layer.modules_to_save["default"].weight.copy_(delta.weight)
                layer.modules_to_save["default"].bias.copy_(delta.bias)
            elif hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
                layer.lora_embedding_A["default"].copy_(delta.A)
                layer.lora_embedding_B["default"].copy_(delta.B)
            else:
                layer.lora_A["default"].weight.copy_(delta.A)
                layer.lora_B["default"].weight.copy_(delta.B)
        n += 1
    return n


def _pair(make, path, cfg_kwargs, ours_kwargs):
    from peft import LoraConfig, get_peft_model

    ours = make(path)
    dt.attach(ours, dt.LoRA(**ours_kwargs), name="x")
    randomize(ours, "x", std=0.05)
    ref = get_peft_model(make(path), LoraConfig(**cfg_kwargs)).eval()
    assert _copy_ours_into_peft(ours, ref, "x") == len(dt.deltas(ours, "x"))
    return ours, ref


def test_minilm_outputs_and_gradients_equal_peft(minilm_dir, minilm_batch):
    ours, ref = _pair(
        make_minilm, minilm_dir,
        dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense", "word_embeddings"],
             modules_to_save=["classifier"], task_type="SEQ_CLS", rank_pattern={"value": 4}, use_rslora=True),
        dict(r=8, alpha=16, targets=["query", "key", "value", "dense", "word_embeddings"],
             modules_to_save=["classifier"], rank_pattern={"value": 4}, use_rslora=True),
    )
    torch.testing.assert_close(logits(ours, minilm_batch), logits(ref, minilm_batch), atol=1e-5, rtol=0)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    ours(**minilm_batch, labels=labels).loss.backward()
    ref(**minilm_batch, labels=labels).loss.backward()
    mod = "bert.encoder.layer.2.attention.self.value"
    ours_g = dt.deltas(ours, "x")[mod].A.grad
    ref_g = ref.base_model.model.get_submodule(mod).lora_A["default"].weight.grad
    torch.testing.assert_close(ours_g, ref_g, atol=1e-6, rtol=1e-4)


def test_smollm2_gqa_outputs_equal_peft(smollm_dir, smollm_batch):
    ours, ref = _pair(
        make_smollm, smollm_dir,
        dict(r=16, lora_alpha=32, target_modules="all-linear"),
        dict(r=16, alpha=32, targets="all-linear"),
    )
    assert len(dt.deltas(ours, "x")) == 30 * 7  # q, k, v, o, gate, up, down; not the tied lm_head
    k = dt.deltas(ours, "x")["model.layers.0.self_attn.k_proj"]
    assert (k.out_features, k.in_features) == (192, 576)  # 3 KV heads of 64
    torch.testing.assert_close(logits(ours, smollm_batch), logits(ref, smollm_batch), atol=1e-4, rtol=1e-5)


def test_our_peft_checkpoint_loads_in_peft(minilm_dir, minilm_batch, tmp_path):
    from peft import PeftModel

    ours = make_minilm(minilm_dir)
    dt.attach(ours, dt.LoRA(r=8, alpha=16, targets="all-linear", modules_to_save=["classifier"],
                            rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"key": 5}), name="x")
    randomize(ours, "x")
    dt.save(ours, tmp_path / "p", format="peft")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["r"] == 8
    assert cfg["rank_pattern"] == {"bert.encoder.layer.1.attention.self.query": 2}
    ref = PeftModel.from_pretrained(make_minilm(minilm_dir, seed=7), tmp_path / "p").eval()
    torch.testing.assert_close(logits(ref, minilm_batch), logits(ours, minilm_batch), atol=1e-5, rtol=0)


def test_peft_checkpoint_loads_with_dt_load(smollm_dir, smollm_batch, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # init_lora_weights=False draws random A and B
    ref = get_peft_model(make_smollm(smollm_dir), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], init_lora_weights=False,
    )).eval()
    ref.save_pretrained(tmp_path / "peft")
    y_ref = logits(ref, smollm_batch)
    ours = make_smollm(smollm_dir)
    dt.load(ours, tmp_path / "peft", name="imported")
    deltas = dt.deltas(ours, "imported")
    assert len(deltas) == 30 * 3 + 1
    torch.testing.assert_close(logits(ours, smollm_batch), y_ref, atol=1e-4, rtol=1e-5)
    # and it merges like any other adapter (the tied embedding is untied first, so lm_head keeps W)
    with pytest.warns(UserWarning, match="untying"):
        dt.merge(ours)
    assert ours.lm_head.weight is not ours.model.embed_tokens.base.weight
    # merged fp32 weights round differently from x W^T + s (x A^T) B^T; over 30 layers with large random deltas
    # that is ~1e-3 on logits of magnitude ~20
    torch.testing.assert_close(logits(ours, smollm_batch), y_ref, atol=3e-3, rtol=1e-4)


def test_residual_inits_take_the_right_components(minilm_dir):
    model = make_minilm(minilm_dir)
    W = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    U, S, Vh = torch.linalg.svd(W)
    for method, part in ((dt.PiSSA(r=8, alpha=16), slice(0, 8)), (dt.MiLoRA(r=8), slice(384 - 8, 384))):
        m = make_minilm(minilm_dir)
        dt.attach(m, method, name="a")
        d = dt.deltas(m, "a")["bert.encoder.layer.0.attention.self.query"]
        expect = U[:, part] @ torch.diag(S[part]) @ Vh[part]
        torch.testing.assert_close(d.scale * d.B0 @ d.A0, expect, atol=1e-4, rtol=1e-4)
    m = make_minilm(minilm_dir)
    dt.attach(m, dt.OLoRA(r=8), name="a")
    d = dt.deltas(m, "a")["bert.encoder.layer.0.attention.self.query"]
    torch.testing.assert_close(d.B0.T @ d.B0, torch.eye(8), atol=1e-5, rtol=0)  # Q columns orthonormal
    # randomized SVD finds (nearly) the same top subspace
    Ur, Sr, _ = svd_triplets(W, 8, "top", niter=8)
    torch.testing.assert_close(Sr, S[:8], rtol=2e-2, atol=0)


# -- A6: PEFT's habits ------------------------------------------------------------------------------------------
def test_peft_argument_names_mean_the_same():
    assert dt.LoRA(lora_alpha=16, target_modules=["query"], lora_dropout=0.1, exclude_modules=["x"],
                   layers_to_transform=[0]) == \
        dt.LoRA(alpha=16, targets=["query"], dropout=0.1, exclude=["x"], layers=[0])
    ada = dt.AdaLoRA(init_r=6, target_r=4, tinit=2, tfinal=3, deltaT=1, target_modules=["query"])
    assert (ada.t_init, ada.t_final, ada.delta_t, ada.targets) == (2, 3, 1, ["query"])
    with pytest.raises(TypeError, match=r"'alpah'; did you mean alpha=\?"):
        dt.LoRA(alpah=16)
    with pytest.raises(TypeError, match=r"LoRA\(\) got 'alpha' twice"):
        dt.LoRA(alpha=8, lora_alpha=16)
    with pytest.raises(TypeError, match="'init_lora_weights'; use init="):
        dt.LoRA(init_lora_weights="gaussian")
    with pytest.raises(TypeError, match="OFT.* unexpected argument 'lora_alpha'"):
        dt.OFT(lora_alpha=16)
    # records keep working: from_dict reads PEFT names too
    assert dt.Method.from_dict({"method": "lora", "lora_alpha": 4}).alpha == 4
