"""deltatune.diffusion: the noise-prediction loop on real MNIST digits, DDIM sampling, concept rows, EMA, grids."""
import pytest
import torch

import deltatune as dt
from deltatune import diffusion as D
from deltatune.zoo import mnist_digits

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def digits():
    x, y = mnist_digits(8)
    return x, y


def unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=10, norm_num_groups=8, attention_head_dim=8)


def heldout(model, x, y, sched):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return sum(D.noise_loss(model, sched, x, y, generator=g).item() for _ in range(3)) / 3


def test_training_on_real_digits_lowers_the_held_out_noise_loss(digits):
    x, y = digits
    train_x, train_y, test_x, test_y = x[:400], y[:400], x[-200:], y[-200:]
    model, sched = unet(), D.ddpm_scheduler()
    before = heldout(model, test_x, test_y, sched)
    h = D.train(model, train_x, train_y, steps=40, batch_size=32, lr=3e-3, scheduler=sched, seed=0)
    after = heldout(model, test_x, test_y, sched)
    assert len(h.losses) == 40 and all(torch.isfinite(torch.tensor(h.losses)))
    assert after < 0.7 * before, (before, after)
    assert sum(h.losses[-10:]) < sum(h.losses[:10])


def test_sampling_is_seeded_and_reproducible():
    model = unet()
    a = D.sample(model, [1, 2, 3], (1, 8, 8), steps=4, seed=5)
    b = D.sample(model, [1, 2, 3], (1, 8, 8), steps=4, seed=5)
    c = D.sample(model, [1, 2, 3], (1, 8, 8), steps=4, seed=6)
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    # another batch size draws the same noise in order: the same images to float rounding (batched kernels)
    d = D.sample(model, [1, 2, 3], (1, 8, 8), steps=4, seed=5, batch_size=2)
    torch.testing.assert_close(a, d, atol=1e-5, rtol=0)


def test_concept_rows_train_apart_and_load_side_by_side(digits, tmp_path):
    x, y = digits
    base = unet().eval()
    for p in base.parameters():
        p.requires_grad_(False)
    table = base.class_embedding.weight.detach().clone()
    probe_x, probe_t = torch.randn(4, 1, 8, 8), torch.full((4,), 300)
    labels = torch.tensor([7, 8, 1, 7])
    ref = D.predict_noise(base, probe_x, probe_t, labels).detach()

    files = {}
    for c in (7, 8):
        rows = D.Concepts(base, [c], init_from=[0, 1, 2])
        assert torch.allclose(rows.rows[0][0], table[[0, 1, 2]].mean(0))
        imgs = x[y == c][:32]
        D.train(base, imgs, torch.full((32,), c), steps=5, batch_size=16, concepts=rows, concept_lr=1e-2)
        assert not base.training  # train() puts the mode back
        assert not torch.allclose(rows.rows[0][0], table[[0, 1, 2]].mean(0))  # the row trained
        files[c] = rows.save(tmp_path / f"c{c}.safetensors")
        rows.remove()
    assert torch.equal(base.class_embedding.weight, table)  # the base table was never written
    assert torch.equal(D.predict_noise(base, probe_x, probe_t, labels), ref)  # hooks gone

    both = D.Concepts.load(base, files[7], files[8])
    out = D.predict_noise(base, probe_x, probe_t, labels)
    assert not torch.allclose(out[[0, 1, 3]], ref[[0, 1, 3]])  # labels 7, 8 read the trained rows
    assert torch.allclose(out[2], ref[2])  # label 1 reads the base row
    e = base.class_embedding(torch.tensor([7, 8]))
    assert torch.equal(e[0], both.rows[0][0]) and torch.equal(e[1], both.rows[0][1])
    both.remove()
    with pytest.raises(ValueError, match="c7.safetensors.*label 7|label 7"):
        D.Concepts.load(base, files[7], files[7])
    with pytest.raises(ValueError, match="class ids in"):
        D.Concepts(base, [10])
    # a file that does not fit is refused before anything is hooked
    from safetensors.torch import load_file, save_file

    bad = load_file(files[8])
    bad["rows.other"] = bad.pop("rows.class_embedding")
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="bad.safetensors: no rows for table 'class_embedding'"):
        D.Concepts.load(base, files[7], tmp_path / "bad.safetensors")
    assert not base.class_embedding._forward_hooks
    assert torch.equal(D.predict_noise(base, probe_x, probe_t, labels), ref)


def test_the_loop_trains_an_adapter_and_runs_its_controller(digits):
    x, y = digits
    model = unet()
    dt.attach(model, dt.AdaLoRA(init_r=4, target_r=2, targets="all", exclude="conv_in", t_init=1, t_final=1,
                                delta_t=1))
    n_layers = len(dt.deltas(model, "default"))
    h = D.train(model, x[:64], y[:64], steps=6, batch_size=16, lr=1e-3)
    assert len(h.losses) == 6 and model._deltatune.step == 6  # dt.begin / dt.step ran without hand-written calls
    metrics = dt.controller_metrics(model)
    rank = next(v for k, v in metrics.items() if k.endswith("rank"))
    assert rank == 2 * n_layers  # the budget fell from init_r = 4 to target_r = 2 per layer by the last step


def test_on_step_sees_every_step_and_does_not_change_the_training(digits):
    x, y = digits
    calls = []

    def look(n):  # sampling in between (eval mode, its own generator) must not change what trains
        calls.append(n)
        D.sample(model, [0, 1], (1, 8, 8), steps=2, seed=n)

    runs = []
    for hook in (None, look):
        model = unet()
        runs.append(D.train(model, x[:64], y[:64], steps=4, batch_size=16, lr=1e-3, on_step=hook).losses)
        assert model.training
    assert calls == [1, 2, 3, 4]
    assert runs[0] == runs[1]


def test_ema_tracks_and_swaps_back():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = D.EMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()  # warm-up: beta_1 = min(0.5, 2 / 11)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 2.0 * (1 - 2 / 11)))
    for _ in range(20):
        ema.update()
    assert torch.allclose(ema.shadow[0], torch.full((3,), 2.0), atol=1e-5)
    with torch.no_grad():
        ema.shadow[0].fill_(1.0)
    with ema.applied():
        assert torch.allclose(p, torch.full((3,), 1.0))
    assert torch.allclose(p, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="decay"):
        D.EMA([p], decay=1.0)


def test_sample_grids_are_written_as_png(digits, tmp_path):
    from PIL import Image

    x, y = digits
    path = D.save_grid(x[:10], tmp_path / "g.png", nrow=5, scale=1)
    img = Image.open(path)
    assert img.size == (5 * 9 + 1, 2 * 9 + 1)
    g = D.grid(x[:2], nrow=2)
    assert torch.equal(g[:, 1:9, 1:9], ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    model = unet()
    h = D.train(model, x[:32], y[:32], steps=2, batch_size=16, sample_every=2, sample_dir=tmp_path,
                sample_labels=[3], sample_steps=2, ema_decay=0.99)
    assert len(h.grids) == 1 and h.grids[0].is_file() and h.ema.updates == 2
    trained = [p.detach().clone() for p in h.ema.params]
    assert any(not torch.equal(s, p) for s, p in zip(h.ema.shadow, trained))  # the average lags the weights
    plain = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                  layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"))
    h = D.train(plain, x[:32], None, steps=1, batch_size=16, sample_every=1, sample_dir=tmp_path / "uncond",
                sample_steps=2)  # an unconditional model: grids of 8 unconditional samples
    assert Image.open(h.grids[0]).size == (2 * (8 * 9 + 1), 2 * (1 * 9 + 1))


def test_a_dit_that_predicts_its_variance_gives_eps_channels():
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    x = torch.randn(2, 4, 8, 8)
    eps = D.predict_noise(dit, x, torch.tensor([10, 500]), torch.tensor([1, 2]))
    full = dit(x, torch.tensor([10, 500]), class_labels=torch.tensor([1, 2])).sample
    assert eps.shape == x.shape and torch.equal(eps, full[:, :4])
    assert len(D.class_tables(dit)) == 1
    D.Concepts(dit, [9]).remove()
    with pytest.raises(ValueError, match=r"class ids in \[0, 10\)"):  # row 10 is the unconditional (null) class
        D.Concepts(dit, [10])


def test_bad_input_is_refused_with_a_clear_error(digits):
    x, y = digits
    model = unet()
    with pytest.raises(ValueError, match="NaN"):
        D.train(model, torch.full((4, 1, 8, 8), float("nan")), y[:4], steps=1)
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        D.train(model, x[:4], y[:3], steps=1)
    with pytest.raises(ValueError, match="steps"):
        D.train(model, x[:4], y[:4], steps=0)
    plain = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                  layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="no class-embedding table"):
        D.Concepts(plain, [1])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        D.train(model, x[:4], y[:4], steps=1)
