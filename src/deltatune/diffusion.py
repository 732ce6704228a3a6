"""Diffusion models: noise-prediction training (DDPM), DDIM sampling, concept rows, EMA and PNG sample grids.

**Training** (Ho, Jain, Abbeel 2020). For an image ``x_0`` with label ``c``, a timestep ``t ~ U{0, ..., T-1}`` and
noise ``eps ~ N(0, I)``, the noised image is ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (the scheduler's
``add_noise``) and the loss is ``|| eps - eps_theta(x_t, t, c) ||^2`` averaged over pixels and batch.

**Sampling** (DDIM, Song, Meng, Ermon 2021, ``eta = 0``): from ``x_T ~ N(0, I)``, on a subsequence of timesteps,
``x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)`` and
``x_t' = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') eps_theta`` (diffusers' :class:`~diffusers.DDIMScheduler`, made
from the training scheduler's config so both share one noise schedule). Seeded: the same seed, labels and batch
size give the same images.

**Concepts** (:class:`Concepts`): a new concept is a new class label whose embedding row trains together with the
adapter, as a new token does in DreamBooth / Custom Diffusion. The rows live outside the base model (a forward
hook on each class-embedding table swaps them in), so the base stays untouched and concepts trained by different
people hold disjoint rows that can be put side by side with the merged adapters.

The models are diffusers' (``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``) or any module
called as ``model(x_t, t, class_labels=c)`` (``encoder_hidden_states=`` for cross-attention UNets) that returns a
tensor or an object with ``.sample``; a model that predicts a learned variance too (``2 C`` output channels, as
DiT does) has its first ``C`` channels read as ``eps``.

Controllers of adapted models (AdaLoRA's budget, SoRA's gates, ...) run without hand-written calls:
:func:`train` drives them with ``dt.begin`` / ``dt.after_backward`` / ``dt.step``.

Needs ``diffusers`` (``pip install 'deltatune[diffusion]'``) for the schedulers and Pillow for PNG grids.
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import control
from .files import read_tensors, write_tensors
from .layers import REGISTRY_ATTR, unwrap
from .util import progress


def _diffusers():
    try:
        import diffusers  # optional: deltatune.diffusion is the only module that needs it
    except ImportError as e:  # pragma: no cover
        raise ImportError("deltatune.diffusion needs diffusers: pip install 'deltatune[diffusion]'") from e
    return diffusers


def ddpm_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2", **kwargs):
    """The training noise schedule: diffusers' ``DDPMScheduler`` (cosine schedule by default, which suits small
    images better than the linear one)."""
    return _diffusers().DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                      **kwargs)


def ddim_scheduler(train_scheduler):
    """A DDIM sampler with the same noise schedule as ``train_scheduler``."""
    return _diffusers().DDIMScheduler.from_config(train_scheduler.config)


# -- the denoiser call ----------------------------------------------------------------------------------------------
def _takes(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def predict_noise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                  context: torch.Tensor | None = None) -> torch.Tensor:
    """``eps_theta(x_t, t, c)``: the model's noise prediction for ``x`` at timesteps ``t`` (one per image) with class
    ``labels`` and, for a cross-attention UNet, ``context`` (``encoder_hidden_states``)."""
    kwargs = {}
    if labels is not None:
        if not _takes(model, "class_labels"):
            raise TypeError(f"{type(model).__name__}.forward takes no class_labels: give a class-conditional model "
                            "(e.g. UNet2DModel(num_class_embeds=...)) or labels=None")
        kwargs["class_labels"] = labels
    if context is not None:
        kwargs["encoder_hidden_states"] = context
    elif _takes(model, "encoder_hidden_states") and _required(model, "encoder_hidden_states"):
        raise TypeError(f"{type(model).__name__} needs encoder_hidden_states: pass context=")
    out = model(x, t, **kwargs)
    eps = getattr(out, "sample", out)
    if isinstance(eps, tuple):
        eps = eps[0]
    if eps.shape[1] == 2 * x.shape[1]:  # a learned variance rides along (DiT): the first half is eps
        eps = eps[:, : x.shape[1]]
    return eps


def _required(model: nn.Module, name: str) -> bool:
    p = inspect.signature(model.forward).parameters[name]
    return p.default is inspect.Parameter.empty


def noise_loss(model: nn.Module, scheduler, x0: torch.Tensor, labels: torch.Tensor | None = None,
               context: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``E || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, c) ||^2`` for one batch (see the module
    docstring), with ``t`` and ``eps`` drawn from ``generator``."""
    T = scheduler.config.num_train_timesteps
    t = torch.randint(0, T, (x0.shape[0],), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    xt = scheduler.add_noise(x0, eps, t)
    return torch.nn.functional.mse_loss(predict_noise(model, xt, t, labels, context).float(), eps.float())


# -- EMA --------------------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of parameters, ``theta_ema <- beta_n theta_ema + (1 - beta_n) theta`` after the
    ``n``-th optimizer step, with the usual warm-up ``beta_n = min(decay, (1 + n) / (10 + n))`` (without it, 2,000
    steps at ``decay = 0.999`` would still hold 13 % of the initial weights); ``with ema.applied():`` runs the model with the averages (e.g. to sample) and puts the trained
    values back afterwards. For parameters of fixed shape (an adapter whose controller resizes it, e.g. AdaLoRA
    with ``resizable=True``, is refused at the next update)."""

    def __init__(self, params, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.params = [p for p in params]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        beta = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for i, (s, p) in enumerate(zip(self.shadow, self.params)):
            if s.shape != p.shape:
                raise RuntimeError(f"EMA: parameter {i} changed shape {tuple(s.shape)} -> {tuple(p.shape)} (a "
                                   "controller resized the adapter); use EMA on fixed-shape adapters only")
            s.lerp_(p.detach(), 1.0 - beta)

    @contextmanager
    def applied(self):
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield self
        finally:
            with torch.no_grad():
                for v, p in zip(saved, self.params):
                    p.copy_(v)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the averages into the parameters for good."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


# -- concepts: new trainable class-embedding rows --------------------------------------------------------------------
def class_tables(model: nn.Module) -> list[str]:
    """The names of the class-embedding tables of a diffusers model: ``class_embedding`` (UNets with
    ``num_class_embeds``) and DiT's label embedders (``...class_embedder.embedding_table``)."""
    return [n for n, m in unwrap(model).named_modules()
            if isinstance(m, nn.Embedding) and (n.endswith("class_embedding") or n.endswith("embedding_table"))]


def _classes(mods: dict, table: str) -> int:
    """How many class ids table ``table`` holds: its rows, less the classifier-free-guidance null row of a label
    embedder that has one (DiT's ``LabelEmbedding``: ``num_classes`` classes plus one "no class" row)."""
    parent = mods.get(table.rpartition(".")[0]) if "." in table else None
    n = mods[table].num_embeddings
    return min(n, int(getattr(parent, "num_classes", n)))


class Concepts(nn.Module):
    """New concepts as trainable rows ``e_c`` of the model's class-embedding tables: label ``c`` reads ``e_c`` from
    here instead of the base table (one row per table: a DiT has one table per block). The base weights are never
    written; ``remove()`` takes the hooks away. Rows start as a copy of the base row of ``c``, or as the mean of the
    base rows of ``init_from`` (a related, seen class: DreamBooth's "rare token" vs "class word" choice)."""

    def __init__(self, model: nn.Module, labels, tables: list[str] | None = None, init_from=None):
        super().__init__()
        base = unwrap(model)
        names = class_tables(base) if tables is None else list(tables)
        if not names:
            raise ValueError(f"{type(base).__name__} has no class-embedding table (nn.Embedding named "
                             "'class_embedding' or 'embedding_table'); name it with tables=[...]")
        mods = dict(base.named_modules())
        missing = [n for n in names if not isinstance(mods.get(n), nn.Embedding)]
        if missing:
            raise ValueError(f"Concepts: {missing[0]!r} is not an nn.Embedding of {type(base).__name__}")
        labels = [int(c) for c in ([labels] if isinstance(labels, int) else labels)]
        n = min(_classes(mods, name) for name in names)
        bad = [c for c in labels if not 0 <= c < n]
        if bad or len(set(labels)) != len(labels):
            raise ValueError(f"Concepts: labels must be distinct class ids in [0, {n}), got {labels}")
        self.tables = names
        self.register_buffer("labels", torch.tensor(labels, dtype=torch.long))
        self.rows = nn.ParameterList()
        for name in names:
            W = mods[name].weight.detach()
            init = W[labels] if init_from is None else W[list(init_from)].mean(0, keepdim=True).expand(len(labels), -1)
            self.rows.append(nn.Parameter(init.clone().float()))
        self._hooks = [mods[name].register_forward_hook(self._hook(i)) for i, name in enumerate(names)]

    def _hook(self, i: int):
        def swap(module, inputs, out):
            idx = inputs[0]
            match = idx.unsqueeze(-1) == self.labels.to(idx.device)  # (..., k)
            hit = match.any(-1, keepdim=True)
            rows = self.rows[i].to(out.dtype)[match.to(torch.long).argmax(-1)]
            return torch.where(hit, rows, out)
        return swap

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"labels": self.labels.clone()}
        out.update({f"rows.{name}": r.detach().clone() for name, r in zip(self.tables, self.rows)})
        return out

    def save(self, path: str | Path) -> Path:
        """The rows and labels as one safetensors file (written atomically)."""
        return write_tensors(path, self.tensors())

    @classmethod
    def load(cls, model: nn.Module, *paths: str | Path) -> "Concepts":
        """Concepts saved apart (by :meth:`save`), put side by side on ``model``: their labels must be disjoint."""
        parts = [(p, read_tensors(p)) for p in paths]
        labels, seen = [], {}
        for p, d in parts:
            if "labels" not in d:
                raise ValueError(f"{p}: not a concepts file (no 'labels' tensor)")
            for c in d["labels"].tolist():
                if c in seen:
                    raise ValueError(f"{p}: concept label {c} is also in {seen[c]}; concepts put together must "
                                     "hold distinct labels")
                seen[c] = p
                labels.append(c)
        tables = [k[len("rows."):] for k in parts[0][1] if k.startswith("rows.")]
        mods = dict(unwrap(model).named_modules())
        for p, d in parts:  # every file checked before anything is hooked
            n = len(d["labels"])
            for name in tables:
                table = mods.get(name)
                if not isinstance(table, nn.Embedding):
                    raise ValueError(f"{p}: rows for {name!r}, which is not a class-embedding table of "
                                     f"{type(unwrap(model)).__name__} (written for another model?)")
                if f"rows.{name}" not in d:
                    raise ValueError(f"{p}: no rows for table {name!r} (written for another model?)")
                if d[f"rows.{name}"].shape != (n, table.embedding_dim):
                    raise ValueError(f"{p}: rows for {name!r} have shape {tuple(d[f'rows.{name}'].shape)}, the "
                                     f"model's table needs ({n}, {table.embedding_dim})")
        made = cls(model, labels, tables=tables)
        with torch.no_grad():
            k = 0
            for p, d in parts:
                n = len(d["labels"])
                for i, name in enumerate(tables):
                    made.rows[i][k:k + n] = d[f"rows.{name}"]
                k += n
        return made


# -- training and sampling ------------------------------------------------------------------------------------------
@dataclass
class History:
    """What :func:`train` returns: the loss of every step and the EMA (if one was kept)."""
    losses: list[float] = field(default_factory=list)
    ema: EMA | None = None
    grids: list[Path] = field(default_factory=list)


def _adapted(model: nn.Module) -> bool:
    return hasattr(unwrap(model), REGISTRY_ATTR)


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None, *, steps: int,
          batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.0, scheduler=None,
          concepts: Concepts | None = None, concept_lr: float | None = None, params=None,
          ema_decay: float | None = None, grad_clip: float | None = 1.0, seed: int = 0,
          sample_every: int | None = None, sample_dir: str | Path | None = None, sample_labels=None,
          sample_steps: int = 25, on_step=None, desc: str = "diffusion") -> History:
    """Train ``model`` to predict noise on ``images`` (``N x C x H x W`` in ``[-1, 1]``) with class ``labels``
    (``N``, or ``None`` for an unconditional model), AdamW on ``params`` (default: the parameters that require
    grad, i.e. the active adapters after ``dt.attach``) plus the ``concepts`` rows (learning rate ``concept_lr``,
    default ``lr``). Adapter controllers run by themselves. ``ema_decay`` keeps an :class:`EMA` of the trained
    parameters (``History.ema``). With ``sample_every`` and ``sample_dir``, a PNG grid of ``sample_labels``
    (default: one of each label seen) is written every ``sample_every`` steps and at the end. ``on_step(n)`` is
    called after the ``n``-th optimizer step (``n`` from 1), e.g. to evaluate the model along the way; the model
    is put back in train mode afterwards, and the training randomness does not depend on what it does."""
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"train: steps must be a positive int, got {steps!r}")
    if images.dim() < 3 or not torch.is_floating_point(images):
        raise ValueError(f"train: images must be a float tensor N x C x ..., got {tuple(images.shape)} "
                         f"{images.dtype}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"train: {len(labels)} labels for {len(images)} images")
    if not torch.isfinite(images).all():
        raise ValueError("train: images hold NaN or inf")
    scheduler = scheduler or ddpm_scheduler()
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    groups = [{"params": params, "lr": lr}]
    if concepts is not None:
        groups.append({"params": list(concepts.parameters()), "lr": concept_lr or lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("train: nothing to train (no parameter requires grad; attach an adapter or pass params=)")
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    trained = [p for g in groups for p in g["params"]]
    ema = EMA(trained, ema_decay) if ema_decay is not None else None
    adapted = _adapted(model)
    if adapted:
        control.begin(model, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    history = History(ema=ema)
    if sample_labels is None and labels is not None:
        sample_labels = torch.unique(labels).tolist()
    was_training = model.training
    model.train()
    bar = progress(range(steps), desc)
    order = torch.randperm(len(images), generator=g)
    pos = 0
    for step in bar:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=g), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        x0 = images[idx].to(device)
        y = None if labels is None else labels[idx].to(device)
        loss = noise_loss(model, scheduler, x0, y, generator=g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train: the loss is {loss.item()} at step {step} (lower lr={lr}?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trained, grad_clip)
        if adapted:
            control.after_backward(model, opt)
        opt.step()
        if adapted:
            control.step(model, opt)
        if ema is not None:
            ema.update()
        history.losses.append(loss.item())
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{history.losses[-1]:.4f}")
        last = step + 1 == steps
        if sample_every and sample_dir is not None and ((step + 1) % sample_every == 0 or last):
            with (ema.applied() if ema is not None else _nothing()):
                imgs = sample(model, _repeat(sample_labels, 8), images.shape[1:], n=8, scheduler=scheduler,
                              steps=sample_steps, seed=seed)
            model.train()
            history.grids.append(save_grid(imgs, Path(sample_dir) / f"{desc}-step{step + 1:06d}.png", nrow=8))
        if on_step is not None:
            on_step(step + 1)
            model.train()
    model.train(was_training)
    return history


@contextmanager
def _nothing():
    yield


def _repeat(labels, n: int):
    if labels is None:
        return None
    return [c for c in labels for _ in range(n)]


@torch.no_grad()
def sample(model: nn.Module, labels, shape, *, n: int | None = None, scheduler=None, steps: int = 25,
           seed: int = 0, batch_size: int = 64, context: torch.Tensor | None = None,
           desc: str = "sampling") -> torch.Tensor:
    """DDIM samples (``eta = 0``) in ``[-1, 1]``: one image per entry of ``labels`` (class ids), or ``n``
    unconditional ones (``labels=None``), of ``shape`` (``C x H x W``). ``scheduler``: the training scheduler (its
    noise schedule), default :func:`ddpm_scheduler`. Seeded: the same seed, labels and ``batch_size`` give the
    same images."""
    if labels is None and n is None:
        raise ValueError("sample: give labels or n")
    train_sched = scheduler or ddpm_scheduler()
    ddim = train_sched if "DDIM" in type(train_sched).__name__ else ddim_scheduler(train_sched)
    ddim.set_timesteps(steps)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    total = len(labels) if labels is not None else n
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    chunks = range(0, total, batch_size)
    for start in (progress(chunks, desc) if len(chunks) > 1 else chunks):
        k = min(batch_size, total - start)
        x = torch.randn((k, *shape), generator=g).to(device, dtype)
        y = None if labels is None else labels[start:start + k].to(device)
        for t in ddim.timesteps:
            tt = torch.full((k,), int(t), device=device, dtype=torch.long)
            eps = predict_noise(model, x, tt, y, None if context is None else context[start:start + k])
            x = ddim.step(eps, t, x, eta=0.0).prev_sample
        out.append(x.float().clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out)


def grid(images: torch.Tensor, nrow: int = 8, pad: int = 1) -> torch.Tensor:
    """``N x C x H x W`` images in ``[-1, 1]`` tiled ``nrow`` to a row: a ``C x H' x W'`` uint8 tensor."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    canvas = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    pix = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = pix[i]
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 2) -> Path:
    """Write :func:`grid` of ``images`` as a PNG (each pixel ``scale`` x ``scale``) at ``path``."""
    from PIL import Image  # optional: Pillow comes with diffusers

    g = grid(images, nrow)
    if scale > 1:
        g = g.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    arr = g.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
