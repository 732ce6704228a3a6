"""KIND: class-gated SVD components (learngenes always on, tailors per class) on real MiniLM weights and a
class-conditional diffusers UNet; mixed classes in a batch, transfer, recombination, merge, save/load, PEFT export,
DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SHARED, make_minilm, real_weight

import deltatune as dt
from deltatune.deltas.kind import KindDelta

HERE = Path(__file__).resolve().parent
TARGETS = ["query", "value", "intermediate.dense"]


def kind_minilm(minilm_dir, **kw):
    model = make_minilm(minilm_dir).eval()
    cfg = dict(n_classes=3, n_tailors=4, n_learngenes=16, targets=TARGETS, condition="task")
    cfg.update(kw)
    dt.attach(model, dt.KIND(**cfg), name="kind")
    return model


def train_mode(model):
    """``model.train()`` without the encoder's dropout (so that two runs can be compared)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def perturb(model, name="kind", std=0.05, seed=3):
    """Move every trainable component off its SVD init (tailors included), so that classes differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in dt.deltas(model, name).values():
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std * (p.abs().mean() + 1e-3))


def dense_class_weight(d: KindDelta, W: torch.Tensor, c) -> torch.Tensor:
    """``W - U0 diag(sigma0) Vh0 + U_L diag(sigma_L) Vh_L + U_T diag(sigma_T m_c) Vh_T``, from the parameters."""
    m = torch.zeros(d.n_groups * d.n_tailors)
    if c != "learngenes" and int(d.groups[c]) >= 0:
        k = int(d.groups[c])
        m[k * d.n_tailors:(k + 1) * d.n_tailors] = 1
    with torch.no_grad():
        return (W - d.U0 @ torch.diag(d.sigma0) @ d.Vh0 + d.U_L @ torch.diag(d.sigma_L) @ d.Vh_L
                + d.U_T @ torch.diag(d.sigma_T * m) @ d.Vh_T)


# -- the structure -----------------------------------------------------------------------------------------------------
def test_svd_init_deals_components_and_the_anchor_holds_the_weight(minilm_dir):
    W, b = real_weight(minilm_dir, "encoder.layer.1.attention.self.query")
    method = dt.KIND(n_classes=3, n_tailors=4, n_learngenes=8, condition="task")
    d = method.build("q", W, b)
    S = torch.linalg.svdvals(W)
    torch.testing.assert_close(d.sigma_L, S[:8])
    # tailor block k holds components 8 + k, 8 + k + 3, ...: equal shares of energy per class
    torch.testing.assert_close(d.sigma_T.view(3, 4), S[8:20].view(4, 3).t())
    torch.testing.assert_close(d.sigma0, torch.cat([S[:8], d.sigma_T.detach()]))
    # full decomposition: n_learngenes=None takes every component that is not a tailor, the anchor is W
    full = dt.KIND(n_classes=3, n_tailors=4, condition="task").build("q", W, b)
    assert full.n_learngenes == 384 - 12 and full.r_anchor == 384
    torch.testing.assert_close(full.U0 @ torch.diag(full.sigma0) @ full.Vh0, W, atol=2e-5, rtol=0)


def test_fixed_gates_equal_the_dense_class_weights_and_merge_exactly(minilm_dir, minilm_batch):
    model = kind_minilm(minilm_dir)
    perturb(model)
    layer = model.bert.encoder.layer[0].attention.self.query
    d, W = layer.deltas["kind"], layer.base.weight.detach().clone()
    for c in (0, 2, "learngenes"):
        dt.kind_select(model, c)
        torch.testing.assert_close(W + d.dense(), dense_class_weight(d, W, c), atol=1e-5, rtol=1e-5)
    # with every tailor off the layer is its learngene-only update, whatever the batch says
    dt.kind_select(model, "learngenes")
    lg = model(**minilm_batch).logits
    dt.kind_select(model, None)
    n = minilm_batch["input_ids"].shape[0]
    # a fixed class merges into plain weights: same outputs, and unmerge restores the base bit for bit
    before = {k: v.clone() for k, v in model.state_dict().items() if "deltas" not in k}
    routed = model(**minilm_batch, condition=[1] * n).logits
    dt.kind_select(model, 1)
    dt.merge(model)
    torch.testing.assert_close(model(**minilm_batch).logits, routed, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)
    assert not torch.allclose(lg, routed)


@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_mixed_classes_in_one_batch_equal_per_class_runs_outputs_and_gradients(minilm_dir, minilm_batch, gate):
    model = kind_minilm(minilm_dir, gate=gate)
    perturb(model)
    n = minilm_batch["input_ids"].shape[0]
    task = torch.tensor([0, 1, 2, 1, 0, 2][:n])
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p.shape == (3, 3) for p in params) == (gate == "soft")  # the soft gate's logits train
    out = model(**minilm_batch, condition=task).logits
    out.pow(2).sum().backward()
    mixed = [p.grad.clone() for p in params]
    model.zero_grad()
    summed = [torch.zeros_like(p) for p in params]
    for c in range(3):
        rows = (task == c).nonzero().squeeze(1)
        sub = {k: v[rows] for k, v in minilm_batch.items()}
        o = model(**sub, condition=task[rows]).logits
        torch.testing.assert_close(o, out[rows], atol=1e-5, rtol=1e-5)
        o.pow(2).sum().backward()
        for s, p in zip(summed, params):
            s += p.grad
        model.zero_grad()
    for a, b in zip(mixed, summed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    if gate == "soft":  # every row weighs every block
        return
    # each class's tailors get gradient only from its own rows: class 2's block is untouched by rows 0 and 1
    d = model.bert.encoder.layer[0].attention.self.query.deltas["kind"]
    sub = {k: v[:2] for k, v in minilm_batch.items()}
    model(**sub, condition=task[:2]).logits.pow(2).sum().backward()
    g = d.U_T.grad.view(d.out_features, 3, 4)
    assert g[:, 2].abs().max() == 0 and g[:, 0].abs().max() > 0 and g[:, 1].abs().max() > 0


def test_a_class_conditional_unet_gates_every_sample_by_its_class_labels():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=4, norm_num_groups=8, attention_head_dim=8).eval()
    dt.attach(unet, dt.KIND(n_classes=4, n_tailors=1, n_learngenes=2, targets="all",
                            exclude=["time_embedding", "conv_in", "conv_out"]), name="kind")
    kinds = {type(layer.base).__name__ for _, layer in dt.model.adapted_layers(unet)}
    assert kinds == {"Linear", "Conv2d"}  # LoCon with a per-sample gate between the factors
    perturb(unet)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([3, 0, 1, 3])
    out = unet(x, t, class_labels=y).sample
    for c in (0, 1, 3):
        rows = (y == c).nonzero().squeeze(1)
        dt.kind_select(unet, c)
        torch.testing.assert_close(unet(x[rows], t[rows], class_labels=y[rows]).sample, out[rows], atol=1e-5,
                                   rtol=1e-4)
    dt.kind_select(unet, None)
    with pytest.raises(ValueError, match="gave none"):
        unet(x, t)
    with pytest.raises(ValueError, match="class id 4 is outside"):
        unet(x, t, class_labels=torch.tensor([0, 1, 2, 4]))


# -- downstream ----------------------------------------------------------------------------------------------------------
def test_transfer_copies_learngenes_exactly_and_trains_only_the_tailors(minilm_dir, minilm_batch):
    model = kind_minilm(minilm_dir)
    perturb(model)
    old = {m: {k: v.clone() for k, v in d.tensors().items()} for m, d in dt.deltas(model, "kind").items()}
    dt.kind_transfer(model, n_classes=2, n_tailors=3)
    for m, d in dt.deltas(model, "kind").items():
        assert d.n_classes == 2 and d.n_groups == 2 and d.n_tailors == 3 and d.frozen_learngenes
        for k in ("U_L", "sigma_L", "Vh_L", "U0", "sigma0", "Vh0"):
            assert torch.equal(getattr(d, k), old[m][k]), (m, k)
        assert all(not isinstance(getattr(d, k), torch.nn.Parameter) for k in ("U_L", "sigma_L", "Vh_L"))
        # fresh tailors: orthonormal, orthogonal to the learngenes, sigma 0
        torch.testing.assert_close(d.U_T.t() @ d.U_T, torch.eye(6), atol=1e-5, rtol=0)
        assert float((d.U_L.t() @ d.U_T).abs().max()) < 1e-4 and float(d.sigma_T.abs().max()) == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("U_T", "sigma_T", "Vh_T") for n in trainable)
    # starts from the learngene-only model for every new class
    n = minilm_batch["input_ids"].shape[0]
    start = model(**minilm_batch, condition=[1] * n).logits
    dt.kind_select(model, "learngenes")
    torch.testing.assert_close(model(**minilm_batch).logits, start)
    dt.kind_select(model, None)
    # one optimizer step changes tailors only
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("U_T", "sigma_T", "Vh_T"))}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**minilm_batch, condition=[0, 1] * (n // 2)).logits.pow(2).sum().backward()
    opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if k in frozen)
    # trainable learngenes: they are parameters again
    dt.kind_transfer(model, n_classes=2, learngenes="trainable")
    assert any(n.endswith("U_L") for n, p in model.named_parameters() if p.requires_grad)


def test_recombination_keeps_chosen_classes_exactly_with_fewer_components(minilm_dir, minilm_batch):
    model = kind_minilm(minilm_dir)
    perturb(model)
    n = minilm_batch["input_ids"].shape[0]
    ref = {c: model(**minilm_batch, condition=[c] * n).logits for c in (0, 2)}
    before = dt.trainable_parameters(model)[0]
    dt.kind_recombine(model, [2, 0])
    assert dt.trainable_parameters(model)[0] < before
    for c in (0, 2):
        torch.testing.assert_close(model(**minilm_batch, condition=[c] * n).logits, ref[c], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="class 1 was removed"):
        model(**minilm_batch, condition=[1] * n)


def test_save_load_round_trip_after_transfer(minilm_dir, minilm_batch, tmp_path):
    model = kind_minilm(minilm_dir, gate="soft")
    perturb(model)
    dt.kind_transfer(model, n_classes=3, n_tailors=2)
    perturb(model, seed=5)
    n = minilm_batch["input_ids"].shape[0]
    task = [0, 1, 2, 0, 1, 2][:n]
    ref = model(**minilm_batch, condition=task).logits
    dt.save(model, tmp_path / "k")
    fresh = make_minilm(minilm_dir).eval()
    dt.load(fresh, tmp_path / "k")
    torch.testing.assert_close(fresh(**minilm_batch, condition=task).logits, ref)
    d = next(iter(dt.deltas(fresh, "kind").values()))
    assert d.frozen_learngenes and d.gate == "soft"
    assert {n.rsplit(".", 1)[-1] for n, p in fresh.named_parameters() if p.requires_grad} == \
        {"U_T", "sigma_T", "Vh_T", "logits"}


def test_the_learngene_part_exports_to_a_peft_lora_that_peft_reads(minilm_dir, minilm_batch, tmp_path):
    peft = pytest.importorskip("peft")
    model = kind_minilm(minilm_dir)
    perturb(model)
    dt.kind_select(model, "learngenes")
    ref = model(**minilm_batch).logits
    dt.save(model, tmp_path / "lg", format="peft")
    cfg = json.loads((tmp_path / "lg" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(make_minilm(minilm_dir), tmp_path / "lg").eval()
    torch.testing.assert_close(theirs(**minilm_batch).logits, ref, atol=1e-4, rtol=1e-4)
    # without a fixed gate there is no single update to write: a clear error, nothing written
    dt.kind_select(model, None)
    with pytest.raises(ValueError, match="kind_select"):
        dt.save(model, tmp_path / "none", format="peft")


def test_gradient_checkpointing_keeps_the_condition_for_the_rerun(minilm_dir, minilm_batch):
    model = kind_minilm(minilm_dir)
    perturb(model)
    n = minilm_batch["input_ids"].shape[0]
    task = torch.tensor([0, 1, 2, 1, 0, 2][:n])
    params = [p for p in model.parameters() if p.requires_grad]
    train_mode(model)
    model(**minilm_batch, condition=task).logits.pow(2).sum().backward()
    ref = [p.grad.clone() for p in params]
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(**minilm_batch, condition=task).logits.pow(2).sum().backward()
    for a, p in zip(ref, params):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-4)


def test_bad_input_is_refused_clearly(minilm_dir, minilm_batch):
    with pytest.raises(ValueError, match="n_classes"):
        dt.attach(make_minilm(minilm_dir), dt.KIND(targets=TARGETS))
    with pytest.raises(ValueError, match="singular components"):
        dt.attach(make_minilm(minilm_dir), dt.KIND(n_classes=3, n_tailors=200, n_learngenes=0, targets=TARGETS))
    model = kind_minilm(minilm_dir)
    n = minilm_batch["input_ids"].shape[0]
    with pytest.raises(ValueError, match="gave none"):
        model(**minilm_batch)
    with pytest.raises(ValueError, match="integer class ids"):
        model(**minilm_batch, condition=torch.zeros(n))
    with pytest.raises(ValueError, match="entries"):
        model(**minilm_batch, condition=[0] * (n - 1) if n > 2 else [0, 0, 0])
    with pytest.raises(ValueError, match="outside"):
        dt.kind_select(model, 3)


def test_two_ddp_ranks_train_kind_like_one_process(tmp_path):
    worker = [str(HERE / "kind_ddp_worker.py"), "--data", str(SHARED / "data" / "glue" / "SST-2" / "train.tsv")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for cmd in ([sys.executable, *worker, "--out", str(tmp_path / "one"), "--batch-size", "8"],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker,
                 "--out", str(tmp_path / "two"), "--batch-size", "4"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    from safetensors.torch import load_file
    single = load_file(tmp_path / "one" / "rank0.safetensors")
    ranks = [load_file(tmp_path / "two" / f"rank{r}.safetensors") for r in (0, 1)]
    assert any(k.endswith("sigma_T") and not torch.equal(v, ranks[0][k]) for k, v in load_file(
        tmp_path / "one" / "init.safetensors").items())  # the tailors trained
    for k, v in ranks[0].items():
        assert torch.equal(v, ranks[1][k]), f"ranks disagree on {k}"
        torch.testing.assert_close(v, single[k], atol=1e-5, rtol=1e-4, msg=k)


def test_kind_rows_mix_with_other_adapters_in_one_batch_inference_and_training(minilm_dir, minilm_batch):
    model = kind_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=4, targets=TARGETS), name="lora", activate=False)
    perturb(model)
    perturb(model, "lora", std=0.5)
    n = minilm_batch["input_ids"].shape[0]
    names = ["kind", "lora", "kind", None, "lora", "kind"][:n]
    task = torch.tensor([2, 0, 1, 0, 0, 0][:n])  # read by the KIND rows only
    with torch.no_grad():
        mixed = model(**minilm_batch, adapter_names=names, condition=task).logits
        for name in ("kind", "lora", None):
            rows = torch.tensor([i for i, a in enumerate(names) if a == name])
            sub = {k: v[rows] for k, v in minilm_batch.items()}
            with dt.adapter_rows(model, [name] * len(rows)):
                alone = model(**sub, condition=task[rows]).logits
            torch.testing.assert_close(mixed[rows], alone, atol=1e-5, rtol=1e-5, msg=str(name))
    # training: one backward gives both adapters the gradients of their own rows
    train_mode(model)
    dt.set_active(model, ["kind", "lora"])
    params = [p for p in model.parameters() if p.requires_grad]
    model(**minilm_batch, adapter_names=names, condition=task).logits.pow(2).sum().backward()
    together = [p.grad.clone() for p in params]
    model.zero_grad()
    for name in ("kind", "lora"):
        rows = torch.tensor([i for i, a in enumerate(names) if a == name])
        sub = {k: v[rows] for k, v in minilm_batch.items()}
        model(**sub, adapter_names=[name] * len(rows), condition=task[rows]).logits.pow(2).sum().backward()
    for a, p in zip(together, params):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-4)
