#!/usr/bin/env python
"""KIND learngene transfer vs PEFT, full fine-tuning and training from scratch on new classes (issue 18, item 4).

**Data, judge, base**: those of ``bench_diffusion.py`` (imported, not copied): 16 x 16 real MNIST digits, classes
0-5 *seen*, classes 6-9 *new*; the CNN judge; the class-conditional diffusers ``UNet2DModel`` with its DDPM
pretraining recipe (cosine schedule, EMA 0.999) and its cache.

**Two pretrained models**, same architecture, data (the training split of the seen classes), steps, batch,
learning rate, seed and EMA:

- (a) ``base``: the UNet trained normally (``bench_diffusion.base_model``, shared cache);
- (b) ``kind``: the same random-init UNet made decomposable by ``dt.KIND`` (every adapted weight replaced by the
  SVD components ``(u_i, sigma_i, v_i)`` of its own init; ``--kind-learngenes`` always-on components and
  ``--kind-tailors`` components per seen class, hard-gated by the ``class_labels`` of each sample), trained on
  the same data.

**Learning the new classes**, on ``--shots`` training images of each of the 4 new classes together, ``--steps``
steps of batch ``--batch`` for every arm (same data order, same noise draws):

- ``lora``: (a) frozen + ``dt.LoRA`` on every conv and linear layer except ``conv_in`` and the time MLP, rank
  matched to the trainable parameters of ``kind`` (``--match kind``; ``--lora-r`` without it);
- ``full``: (a) with every weight trainable;
- ``scratch``: the same architecture, random init, every weight trainable;
- ``kind``: (b) after ``dt.kind_transfer``: learngenes kept frozen, fresh tailors for the new classes
  (``--kind-new-tailors`` per class), the rest of the network frozen.

In every arm the new classes' class-embedding rows train too, at ``--row-lr`` (``deltatune.diffusion.Concepts``
on the pretrained models, which start from the never-trained rows of labels 6-9; the table itself for ``full``
and ``scratch``; a new 4-row table for ``kind``, whose gate numbers the new classes 0-3). Full fine-tuning and
scratch train what they train (their counts are reported, not matched).

**Evaluation** every ``--eval-every`` steps (and before the first): ``--samples`` seeded DDIM samples
(``--sample-steps``) per new class; *accuracy* = share the judge classifies as the intended class; *FD* =
Frechet distance of the judge's 64-d features to the class's real images not used for training (lower is
better); both averaged over the 4 classes. Step time: every arm (and the frozen ``floor``: (a) with no weight
trainable and the input requiring grad) in one process, interleaved in rotating rounds (DESIGN.md protocol);
ratios of per-step medians to ``lora`` with the interquartile range of the per-round ratios.

Outputs in ``--out`` (default ``benchmarks/results/kind``): ``results.json``, ``curves.png`` (accuracy and FD vs
step per arm), ``samples-<arm>.png`` (final samples: one row of 8 per new class); the section goes to BENCHMARKS.md.
``--sweep N`` picks each arm's learning rate among ``--lrs-<arm>`` by the held-out noise loss after ``N`` steps;
``--resume`` keeps the arms of an earlier ``results.json`` in ``--out`` with the same settings (and LoRA rank).
``--quick``: a few steps of everything (a smoke test; the numbers mean nothing).

Cost: the decomposed model runs every adapted layer as the frozen base plus two factored products of full rank
(the anchor cancels the base), so a KIND pretraining step costs about 3x a normal one on CPU and a transfer step
about 2x a LoRA step (the timing table): the default 2,000 KIND pretraining steps take about 40 minutes on one
core here (the whole default run about 1.5 h).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bench_diffusion as BD  # noqa: E402
import common  # noqa: E402
import deltatune as dt  # noqa: E402
from deltatune import diffusion as D  # noqa: E402
from deltatune.zoo import cache_dir  # noqa: E402
from diffusion_speed import ratio  # noqa: E402

SEEN = BD.SEEN
NEW = BD.CONCEPTS
ARMS = ("lora", "full", "scratch", "kind")
#: LoRA's and KIND's targets: bench_diffusion's (every conv and linear but the input conv and the time MLP) less the
#: output conv (1 x 288 in linear layout: one singular component, too few for KIND's tailors)
TARGETS = dict(targets="all", exclude=BD.EXCLUDE + "|conv_out")
FROM = {"lora": "(a) normal", "full": "(a) normal", "scratch": "random init", "kind": "(b) KIND"}


splits = functools.lru_cache(maxsize=1)(BD.splits)  # read once per process (the smoke tests call main often)


def kind_available() -> bool:
    return hasattr(dt, "KIND") and hasattr(dt, "kind_transfer")


def need_kind() -> None:
    if not kind_available():
        raise NotImplementedError("the KIND arm needs dt.KIND and dt.kind_transfer (issue 18), which this deltatune "
                                  "does not have yet; run the other arms with --arms lora full scratch")


# -- (b): the KIND model pretrained on the seen classes --------------------------------------------------------------
def kind_method(args, n_classes: int):
    return dt.KIND(n_classes=n_classes, n_learngenes=args.kind_learngenes, n_tailors=args.kind_tailors,
                   init="svd", gate="hard", condition="class_labels", **TARGETS)


def learngenes(args) -> str:
    return "rank - tailors" if args.kind_learngenes is None else str(args.kind_learngenes)


def kind_pretrain_params(model: nn.Module) -> list[nn.Parameter]:
    """Pretraining (b) trains everything a normal pretraining trains, with the decomposed weights replaced by their
    components: every parameter but the (replaced) base weights of the adapted layers."""
    replaced = {id(m.base.weight) for m in model.modules() if isinstance(m, dt.AdaptedLayer)}
    out = []
    for p in model.parameters():
        if id(p) not in replaced:
            p.requires_grad_(True)
            out.append(p)
    return out


def kind_base(parts, cache: Path, args, grids: Path):
    need_kind()
    path = cache / (f"kind-g{args.kind_learngenes}-t{args.kind_tailors}-s{args.base_steps}-b{args.base_batch}"
                    f"-lr{args.base_lr}.pt")
    torch.manual_seed(0)  # the same init as (a)
    model = BD.unet()
    dt.attach(model, kind_method(args, len(SEEN)), name="kind")
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval(), None
    x, y = BD.stack(parts, SEEN, 0)
    t0 = time.time()
    h = D.train(model, x, y, steps=args.base_steps, batch_size=args.base_batch, lr=args.base_lr,
                params=kind_pretrain_params(model), ema_decay=0.999, seed=0, desc="kind-base",
                sample_every=max(args.base_steps // 4, 1), sample_dir=grids, sample_labels=SEEN,
                sample_steps=args.sample_steps)
    h.ema.copy_to()
    torch.save(model.state_dict(), path)
    print(f"kind base: {args.base_steps} steps in {time.time() - t0:.0f} s, loss {mean(h.losses[:50]):.4f} -> "
          f"{mean(h.losses[-50:]):.4f}", file=sys.stderr, flush=True)
    return model.eval(), h


# -- the arms -------------------------------------------------------------------------------------------------------
@dataclass
class Arm:
    """One way of learning the new classes: the model, its trained parameters (at the arm's learning rate), the
    module holding the new classes' embedding rows (at ``--row-lr``) and the model's label of each new class."""
    name: str
    model: nn.Module
    params: list
    rows: nn.Module
    labels: list[int]
    config: str

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def row_params(self) -> int:  # only the new classes' rows receive gradients
        return len(NEW) * self.rows_width

    @property
    def rows_width(self) -> int:
        return next(iter(self.rows.parameters())).shape[-1]


def lora_method(r: int):
    return dt.LoRA(r=r, alpha=r, **TARGETS)


def body_params(model: nn.Module) -> list:
    """Every parameter but the class-embedding table, all made trainable."""
    model.requires_grad_(True)
    return [p for n, p in model.named_parameters() if not n.startswith("class_embedding")]


def kind_transfer_params(model: nn.Module) -> list:
    """What learngene transfer trains (besides the new rows): the new tailors, nothing else."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("class_embedding")}
    stray = [n for n in params if "_T" not in n.rpartition(".")[2]]
    if stray:
        raise RuntimeError(f"after dt.kind_transfer, {stray[:3]} train too: expected the tailors only")
    return list(params.values())


def build_arm(name: str, base, kind_pre, args, lora_r: int) -> Arm:
    if name == "lora":
        m = copy.deepcopy(base)
        dt.attach(m, lora_method(lora_r), name="new")
        return Arm(name, m, [p for p in m.parameters() if p.requires_grad], D.Concepts(m, NEW), list(NEW),
                   f"r={lora_r}")
    if name in ("full", "scratch"):
        if name == "full":
            m = copy.deepcopy(base)
        else:
            torch.manual_seed(args.seed)
            m = BD.unet()
        return Arm(name, m, body_params(m), m.class_embedding, list(NEW), "all weights")
    if name == "kind":
        need_kind()
        m = copy.deepcopy(kind_pre).requires_grad_(False)
        dt.kind_transfer(m, n_classes=len(NEW), n_tailors=args.kind_new_tailors, learngenes="frozen", seed=args.seed)
        torch.manual_seed(args.seed)
        m.class_embedding = nn.Embedding(len(NEW), base.class_embedding.embedding_dim)  # the gate's ids 0..3
        params = kind_transfer_params(m)
        return Arm(name, m, params, m.class_embedding, list(range(len(NEW))),
                   f"{learngenes(args)} learngenes (frozen), {args.kind_tailors} tailors per seen class -> "
                   f"{args.kind_new_tailors} new per new class")
    raise ValueError(f"unknown arm {name!r}; choose from {ARMS}")


def kind_trainable(base, kind_pre, args) -> int:
    return build_arm("kind", base, kind_pre, args, 1).trainable


def matched_lora_rank(base, target: int) -> int:
    """The LoRA rank whose adapter parameter count is closest to ``target`` (the count is linear in the rank: the
    rank-1 count gives the guess, its neighbours are checked)."""
    guess = max(1, round(target / BD.adapter_params(base, lora_method(1))))
    return min(range(max(1, guess - 1), guess + 2), key=lambda r: abs(BD.adapter_params(base, lora_method(r)) - target))


# -- evaluation -----------------------------------------------------------------------------------------------------
def evaluate(arm: Arm, j, real: dict, args, sched) -> dict:
    """Accuracy and FD of ``--samples`` seeded samples per new class; ``real``: the judge's features of each
    class's real images not used for training."""
    per = {}
    for c, label in zip(NEW, arm.labels):
        imgs = D.sample(arm.model, [label] * args.samples, (1, BD.SIZE, BD.SIZE), steps=args.sample_steps,
                        scheduler=sched, seed=1000 + c)
        s = BD.score(j, imgs, c, real_features=real[c])
        per[c] = {"accuracy": s["identity"], "fd": s["fd"]}
    return {"accuracy": mean(v["accuracy"] for v in per.values()), "fd": mean(v["fd"] for v in per.values()),
            "per_class": per}


def seen_scores(model, j, parts, args, sched) -> dict:
    """The pretrained model on its own (seen) classes, against their test split."""
    per = {}
    for c in SEEN:
        imgs = D.sample(model, [c] * args.samples, (1, BD.SIZE, BD.SIZE), steps=args.sample_steps, scheduler=sched,
                        seed=c)
        s = BD.score(j, imgs, c, parts[c][1])
        per[c] = {"accuracy": s["identity"], "fd": s["fd"]}
    return {"accuracy": mean(v["accuracy"] for v in per.values()), "fd": mean(v["fd"] for v in per.values()),
            "per_class": per}


def train_arm(arm: Arm, x, y_new, lr: float, j, real, args, sched) -> dict:
    """Train ``arm`` on the new classes, evaluating before the first step and every ``--eval-every`` steps."""
    y = torch.tensor([arm.labels[NEW.index(int(c))] for c in y_new])
    curve, eval_s = [], [0.0]

    def look(n: int) -> None:
        if n % args.eval_every and n != args.steps:
            return
        t0 = time.perf_counter()
        curve.append({"step": n, **evaluate(arm, j, real, args, sched)})
        eval_s[0] += time.perf_counter() - t0
        print(f"  {arm.name} step {n}: accuracy {curve[-1]['accuracy']:.3f}, FD {curve[-1]['fd']:.2f}",
              file=sys.stderr, flush=True)

    look(0)
    eval_s[0] = 0.0
    t0 = time.perf_counter()
    h = D.train(arm.model, x, y, steps=args.steps, batch_size=args.batch, lr=lr, scheduler=sched, params=arm.params,
                concepts=arm.rows, concept_lr=args.row_lr, seed=args.seed, on_step=look, desc=arm.name)
    wall = time.perf_counter() - t0 - eval_s[0]  # training only
    return {"curve": curve, "loss_first": mean(h.losses[:20]), "loss_last": mean(h.losses[-20:]),
            "train_s": wall, "lr": lr}


def final_samples(arm: Arm, args, sched) -> torch.Tensor:
    """8 samples per new class (one row each) from the trained arm."""
    return torch.cat([D.sample(arm.model, [lab] * 8, (1, BD.SIZE, BD.SIZE), steps=args.sample_steps,
                               scheduler=sched, seed=2000 + c) for c, lab in zip(NEW, arm.labels)])


def choose_lr(name: str, base, kind_pre, args, lora_r: int, x, y_new, held: dict, sched) -> tuple[float, dict | None]:
    """The arm's learning rate: ``--lr-<arm>``, or with ``--sweep N`` the candidate of ``--lrs-<arm>`` whose model
    after ``N`` steps has the lowest noise-prediction loss on the new classes' held-out images (fixed timesteps and
    noise: ``bench_diffusion.heldout_loss``), each candidate from a fresh copy."""
    fixed = getattr(args, f"lr_{name}")
    if not args.sweep:
        return fixed, None
    losses = {}
    for lr in getattr(args, f"lrs_{name}"):
        arm = build_arm(name, base, kind_pre, args, lora_r)
        y = torch.tensor([arm.labels[NEW.index(int(c))] for c in y_new])
        D.train(arm.model, x, y, steps=args.sweep, batch_size=args.batch, lr=lr, scheduler=sched,
                params=arm.params, concepts=arm.rows, concept_lr=args.row_lr, seed=args.seed, desc=f"{name} lr {lr:g}")
        losses[lr] = mean(BD.heldout_loss(arm.model, held[c], lab, sched) for c, lab in zip(NEW, arm.labels))
    return min(losses, key=losses.get), losses


def lr_options(name: str, args) -> dict:
    """What decides the arm's learning rate: the fixed ``--lr-<arm>``, or the sweep's steps and candidates."""
    how = {"sweep": args.sweep, "candidates": getattr(args, f"lrs_{name}")} if args.sweep else \
        {"lr": getattr(args, f"lr_{name}")}
    return json.loads(json.dumps(how))


#: settings that do not decide what the arms learn (timing), or that are compared per arm (the sweep: lr_options; the
#: KIND sizes and the matching: the kind and lora arms' config)
NOT_SHARED = ("rounds", "time_steps", "threads", "sweep", "kind_learngenes", "kind_tailors", "kind_new_tailors",
              "match")


def resumable(out: Path, results: dict, args) -> dict:
    """The arms of an earlier ``results.json`` in ``out`` run with the same settings but for ``NOT_SHARED``
    (``--resume``; the caller also compares each arm's config and learning-rate options)."""
    path = out / "results.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    strip = lambda d: {k: v for k, v in d.items() if k not in NOT_SHARED}  # noqa: E731
    if strip(old.get("settings", {})) != strip(json.loads(json.dumps(results["settings"]))):
        print(f"--resume: {path} was run with other settings; every arm runs again", file=sys.stderr, flush=True)
        return {}
    return old.get("arms", {})


# -- step time ------------------------------------------------------------------------------------------------------
def timing(arms: dict, base, x, y_new, args, sched) -> dict:
    """Per-step medians of every arm and the frozen floor, interleaved in rotating rounds; ratios to ``lora``."""
    g = torch.Generator().manual_seed(5)
    idx = torch.randperm(len(x), generator=g)[:args.batch]
    variants = []
    floor = copy.deepcopy(base).requires_grad_(False)
    variants.append(common.Variant("floor", floor, None, 0))
    for name, arm in arms.items():
        groups = [{"params": arm.params}, {"params": list(arm.rows.parameters()), "lr": args.row_lr}]
        opt = torch.optim.AdamW(groups, lr=1e-4)
        variants.append(common.Variant(name, arm.model, opt, arm.trainable))
    labels = {name: torch.tensor([arm.labels[NEW.index(int(c))] for c in y_new[idx]]) for name, arm in arms.items()}
    labels["floor"] = y_new[idx]

    def step(v):
        v.model.train()
        gen = torch.Generator().manual_seed(9)
        x0 = x[idx].clone().requires_grad_(v.opt is None)  # the floor: the input's gradient runs the backward
        t0 = time.perf_counter()
        common.backward_step(v, D.noise_loss(v.model, sched, x0, labels[v.name], generator=gen))
        return time.perf_counter() - t0

    common.rotating_rounds(variants, args.rounds,
                           lambda v, r: v.times.append([step(v) for _ in range(args.time_steps)]),
                           warmup=lambda v: step(v))
    out = {}
    by = {v.name: v for v in variants}
    for v in variants:
        row = {"median_s": statistics.median(t for ts in v.times for t in ts)}
        if "lora" in by:
            row["vs_lora"] = ratio(v.times, by["lora"].times)
        row["vs_floor"] = ratio(v.times, by["floor"].times)
        out[v.name] = row
    return out


# -- the experiment -------------------------------------------------------------------------------------------------
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    cache, out = Path(args.cache), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if "kind" in args.arms:
        need_kind()
    parts = splits()
    j, judge_acc = BD.judge(parts, cache, args.judge_epochs)
    print(f"judge test accuracy {judge_acc:.4f}", file=sys.stderr, flush=True)
    sched = D.ddpm_scheduler()
    base, _ = BD.base_model(parts, cache, args.base_steps, args.base_batch, args.base_lr, out / "base-grids",
                            args.sample_steps)
    base.requires_grad_(False)
    kind_pre = None
    if "kind" in args.arms:
        kind_pre, _ = kind_base(parts, cache, args, out / "base-grids")
        kind_pre.requires_grad_(False)
    results = {"judge_accuracy": judge_acc, "settings": settings(args), "pretrained": {}, "arms": {}}
    results["pretrained"]["base"] = seen_scores(base, j, parts, args, sched)
    if kind_pre is not None:
        results["pretrained"]["kind"] = seen_scores(kind_pre, j, parts, args, sched)
    pre = {k: (round(v["accuracy"], 3), round(v["fd"], 2)) for k, v in results["pretrained"].items()}
    print(f"pretrained on the seen classes (accuracy, FD): {pre}", file=sys.stderr, flush=True)

    target = kind_trainable(base, kind_pre, args) if kind_pre is not None and args.match == "kind" else None
    lora_r = matched_lora_rank(base, target) if target is not None else args.lora_r
    results["lora_r"], results["kind_trainable"] = lora_r, target

    x, y_new = BD.stack(parts, NEW, 0, args.shots)
    with torch.no_grad():
        real = {c: j.features(BD.real_of(parts, c, args)) for c in NEW}
    held = {c: parts[c][0][args.shots:args.shots + 128] for c in NEW}  # the learning-rate sweep's images
    earlier = resumable(out, results, args) if args.resume else {}
    for name in args.arms:
        arm = build_arm(name, base, kind_pre, args, lora_r)
        options = lr_options(name, args)
        if name in earlier and (earlier[name]["config"], earlier[name].get("lr_options")) == (arm.config, options):
            results["arms"][name] = earlier[name]
            print(f"{name}: kept from {out / 'results.json'} (--resume)", file=sys.stderr, flush=True)
            continue
        lr, sweep = choose_lr(name, base, kind_pre, args, lora_r, x, y_new, held, sched)
        print(f"{name}: {arm.trainable:,} trainable + {arm.row_params} row parameters ({arm.config}), lr "
              f"{lr:g} {sweep or ''}", file=sys.stderr, flush=True)
        r = train_arm(arm, x, y_new, lr, j, real, args, sched)
        r.update({"from": FROM[name], "trainable": arm.trainable, "row_params": arm.row_params,
                  "config": arm.config, "lr_sweep": sweep, "lr_options": options})
        results["arms"][name] = r
        D.save_grid(final_samples(arm, args, sched), out / f"samples-{name}.png", nrow=8, scale=3)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    arms = {name: build_arm(name, base, kind_pre, args, lora_r) for name in args.arms}
    results["timing"] = timing(arms, base, x, y_new, args, sched)
    print(f"timing: {results['timing']}", file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def settings(args) -> dict:
    keys = ("shots", "steps", "batch", "eval_every", "samples", "sample_steps", "row_lr", "base_steps", "base_batch",
            "base_lr", "kind_learngenes", "kind_tailors", "kind_new_tailors", "rounds", "time_steps", "threads",
            "seed", "match", "sweep")
    return {k: getattr(args, k) for k in keys}


# -- report ---------------------------------------------------------------------------------------------------------
def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def ordering(results: dict) -> list[str]:
    """What the final evaluation says, in words: the orderings by FD and accuracy, and the paper's claim."""
    arms = results["arms"]
    final = {a: r["curve"][-1] for a, r in arms.items()}
    step = next(iter(final.values()))["step"] if final else 0
    by_fd = sorted(final, key=lambda a: final[a]["fd"])
    by_acc = sorted(final, key=lambda a: -final[a]["accuracy"])
    lines = [f"- ordering after {step} steps, by FD (best first): " + " < ".join(
                 f"{a} ({final[a]['fd']:.1f})" for a in by_fd),
             "- by accuracy (best first): " + " > ".join(f"{a} ({final[a]['accuracy']:.2f})" for a in by_acc)]
    if "kind" in final and "lora" in final:
        k, lo = final["kind"], final["lora"]
        holds = k["fd"] < lo["fd"]
        best_k, best_l = min(p["fd"] for p in arms["kind"]["curve"]), min(p["fd"] for p in arms["lora"]["curve"])
        lines.append(f"- the paper's claim (learngene transfer reaches better fidelity than PEFT on a conventionally "
                     f"pretrained model at the same budget) **{'holds' if holds else 'does not hold'}** in this run "
                     f"(one seed): final "
                     f"FD kind {k['fd']:.1f} vs lora {lo['fd']:.1f} (best along the curve: {best_k:.1f} vs "
                     f"{best_l:.1f}); accuracy {k['accuracy']:.2f} vs {lo['accuracy']:.2f}")
    else:
        lines.append("- the paper's claim (KIND vs LoRA) is not tested in this run: the KIND arm did not run")
    return lines


def report(results: dict, args) -> str:
    s = results["settings"]
    lines = [common.header("KIND (issue 18): learngene transfer vs LoRA, full fine-tuning and scratch on new "
                           "classes"), ""]
    pre = results["pretrained"]
    lines.append(f"- judge (CNN) test accuracy on real digits: {results['judge_accuracy']:.3f}")
    lines.append("- pretrained on the seen classes 0-5 (own classes, vs their test split): " + "; ".join(
        f"{'(a) normal' if k == 'base' else '(b) KIND'} accuracy {v['accuracy']:.3f}, FD {v['fd']:.2f}"
        for k, v in pre.items()) + f" ({s['base_steps']} steps of batch {s['base_batch']}, lr {s['base_lr']:g}, "
        f"EMA 0.999; KIND: {s['kind_learngenes'] or 'rank - tailors'} learngenes, {s['kind_tailors']} tailors "
        "per class)")
    lines.append(f"- new classes {NEW[0]}-{NEW[-1]}: {s['shots']} training images each, {s['steps']} steps of batch "
                 f"{s['batch']} per arm; rows at lr {s['row_lr']:g}; evaluated every {s['eval_every']} steps on "
                 f"{s['samples']} DDIM ({s['sample_steps']} steps) samples per class")
    lora_note = (f"LoRA rank {results['lora_r']} matched to KIND's {results['kind_trainable']:,} trainable"
                 if results.get("kind_trainable") else f"LoRA rank {results['lora_r']} (not matched: no KIND arm)")
    how = (f"learning rates chosen per arm by the held-out noise loss after {s['sweep']} steps (candidates in "
           "results.json)" if s.get("sweep") else "learning rates fixed per arm, not tuned")
    lines.append(f"- {lora_note}; full fine-tuning and scratch train every weight (their counts are what they are); "
                 f"{how}")
    lines.append("")
    tim = results.get("timing", {})
    rows = []
    for a, r in results["arms"].items():
        t = tim.get(a, {})
        vs = t.get("vs_lora")
        fl = t.get("vs_floor")
        final = r["curve"][-1]
        rows.append([a, r["from"], f"{r['trainable']:,} + {r['row_params']}", r["config"], f"{r['lr']:g}",
                     f"**{vs[0]:.2f}** [{vs[1]:.2f}, {vs[2]:.2f}]" if vs else "-",
                     f"{fl[0]:.2f}" if fl else "-", f"{t['median_s']:.3f} s" if t else "-",
                     f"{final['accuracy']:.3f}", f"{final['fd']:.2f}", f"{min(p['fd'] for p in r['curve']):.2f}",
                     f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"])
    lines.append(common.md_table(["arm", "from", "trainable (+ rows)", "config", "lr", "step / LoRA step",
                                  "step / floor", "median step", "final accuracy", "final FD", "best FD",
                                  "train loss"], rows))
    lines.append("")
    steps = [p["step"] for p in next(iter(results["arms"].values()))["curve"]] if results["arms"] else []
    crow = [[a] + [f"{p['accuracy']:.2f} / {p['fd']:.1f}" for p in r["curve"]] for a, r in results["arms"].items()]
    lines.append("Accuracy / FD of the new classes' samples vs training steps (`curves.png`):")
    lines.append("")
    lines.append(common.md_table(["arm"] + [f"step {n}" for n in steps], crow))
    lines.append("")
    lines += ordering(results)
    return "\n".join(lines)


def plot(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for a, r in results["arms"].items():
        steps = [p["step"] for p in r["curve"]]
        axes[0].plot(steps, [p["accuracy"] for p in r["curve"]], marker="o", label=f"{a} ({r['trainable']:,})")
        axes[1].plot(steps, [p["fd"] for p in r["curve"]], marker="o", label=a)
    axes[0].set_ylabel("judge accuracy on the new classes")
    axes[1].set_ylabel("Frechet feature distance (lower is better)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("training steps")
    axes[0].legend(fontsize=7, title="arm (trainable)", title_fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--cache", default=None, help="default: bench_diffusion.py's (--quick: <--out>/cache)")
    p.add_argument("--out", default=None, help="default benchmarks/results/kind (--quick: bench-kind-quick)")
    p.add_argument("--shots", type=int, default=100, help="training images per new class")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--row-lr", type=float, default=1e-2)
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--lr-full", type=float, default=3e-4)
    p.add_argument("--lr-scratch", type=float, default=2e-3)
    p.add_argument("--lr-kind", type=float, default=3e-3)
    p.add_argument("--sweep", type=int, default=0, help="steps per learning-rate candidate (0: fixed --lr-<arm>)")
    p.add_argument("--lrs-lora", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--lrs-full", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--lrs-scratch", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    p.add_argument("--lrs-kind", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--resume", action="store_true", help="keep the arms of --out's results.json run with the same "
                   "settings")
    p.add_argument("--lora-r", type=int, default=4, help="without --match kind (or without the KIND arm)")
    p.add_argument("--match", choices=["kind", "none"], default="kind",
                   help="kind: the LoRA rank whose parameter count is closest to the KIND arm's trainable ones")
    p.add_argument("--kind-learngenes", type=int, default=None,
                   help="default: every component that is not a tailor (the whole weight is decomposed)")
    p.add_argument("--kind-tailors", type=int, default=2, help="per seen class, in pretraining (b)")
    p.add_argument("--kind-new-tailors", type=int, default=2, help="per new class, in the transfer")
    p.add_argument("--base-steps", type=int, default=2000)
    p.add_argument("--base-batch", type=int, default=48)
    p.add_argument("--base-lr", type=float, default=2e-3)
    p.add_argument("--judge-epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6, help="timing rounds")
    p.add_argument("--time-steps", type=int, default=3, help="timed steps per arm and round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from --out's results.json")
    p.add_argument("--no-publish", action="store_true", help="do not write BENCHMARKS.md")
    return p


#: --quick: the defaults it changes (options given explicitly still win)
QUICK = dict(base_steps=20, judge_epochs=1, steps=4, eval_every=2, samples=8, sample_steps=2, shots=16, rounds=2,
             time_steps=1)


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
        args.out = args.out or "bench-kind-quick"
        args.cache = args.cache or str(Path(args.out) / "cache")
    args.cache = args.cache or str(cache_dir() / "bench_diffusion")
    args.out = args.out or str(common.REPO / "benchmarks" / "results" / "kind")
    if args.report_only:
        torch.set_num_threads(args.threads)  # the header's machine line names the run's threads
        results = json.loads((Path(args.out) / "results.json").read_text())
        sys.argv = [a for a in sys.argv if a != "--report-only"]  # the header names the command of the run
    else:
        results = run(args)
    plot(results, Path(args.out))
    body = report(results, args)
    if args.quick or args.no_publish:
        print(body)
    else:
        common.publish("kind-transfer", body)
    return results


if __name__ == "__main__":
    main()
