"""Layer kinds: the registry of the module types deltatune can adapt, and how each maps to the linear layout.

Every delta works on a weight in *linear layout* ``W`` (out x in) and a bias ``b`` (or none). A :class:`LayerKind`
says, for one family of modules:

- ``weight(m)``: ``W`` as a view that shares the module's storage (in-place merges write through);
- ``to_linear(t)`` / ``from_linear(t, like)``: a stored tensor (a checkpoint's or a file's) to and from that layout;
- ``add(m, delta, out, x)``: the output ``out`` of module ``m`` plus one delta's contribution, for inputs ``x`` as
  the module takes them;
- ``output(m, delta, x)``: one delta's contribution alone (for per-row serving and diagnostics);
- ``replace(m, delta, x)``: the output of a delta that computes the whole layer (a full replacement);
- ``stacked``: inputs are features on the last dimension, so mixed-adapter batches may apply stacked low-rank
  factors to them (:mod:`deltatune.serving`);
- ``fusable(m)``: the module computes exactly ``x W^T + b`` over the last dimension, so a delta may run it on a 2-D
  view in one fused node (:meth:`deltatune.deltas.Delta.fuse`); ``fuse(m, delta, x)``: the same for other kinds
  (a kernel of the kind's own, or ``None``); ``has_bias``: deltas may update the bias;
- ``family``: what ``"all-linear"`` (``"linear"``), ``"all-conv"`` (``"conv"``) and ``"all"`` (both) select;
- ``geometry(m)``: what file formats need of the module beyond the linear layout (a conv's ``kernel`` and
  ``groups``), recorded in adapter specs; ``lora_to_file(B, A, spec)`` / ``lora_from_file(B, A)``: LoRA factors
  ``dW = s B A`` (linear layout) to and from the shapes PEFT, diffusers and kohya files keep them in (identity
  for linear kinds; see :func:`conv_lora_to_file`); ``file_caveat(m)``: why those files' readers run the
  module's LoRA otherwise (a dilated conv's, see :func:`conv_file_caveat`), or ``None``.

Convolutions (``nn.Conv1d/2d/3d``, any kernel, stride, padding, ``padding_mode``, dilation and groups) have the
linear layout ``out x (in/groups * prod(kernel))``: the weight reshaped, as LyCORIS and PEFT lay it out. A delta
that is a product ``dW = s B A`` (:meth:`~deltatune.deltas.Delta.live_factors`) runs as LoCon, ``A`` a conv with
the base's geometry and ``B`` a 1x1 conv (grouped convs: ``A`` shared by the groups, ``B`` grouped), without
materializing ``dW``; any other structure runs as one conv with its ``dense()`` update. Transposed convolutions
are not adaptable. When a LoCon delta is the only one live on an ungrouped conv with frozen weights, the layer runs
as one autograd node (:func:`locon_conv`): the base kernel and ``A`` are one conv with ``out + r`` output channels.

Adding a kind (e.g. ``nn.Conv2d``) is one :func:`register_kind` call plus its tests; nothing else in the library
tests module types. This floor imports only torch.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

#: the attribute under which an adapted model keeps its adapter registry (see :mod:`deltatune.registry`)
REGISTRY_ATTR = "_deltatune"


@dataclass(frozen=True)
class LayerKind:
    """How one family of modules maps to the linear layout (see the module docstring)."""

    name: str
    matches: Callable[[nn.Module], bool]
    weight: Callable[[nn.Module], torch.Tensor]
    to_linear: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    from_linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda t, like: t
    add: Callable = lambda m, delta, out, x: delta.add_to(out, x, inplace=False)
    output: Callable = lambda m, delta, x: delta(x)
    replace: Callable = lambda m, delta, x: delta.replace(x, embedding=False)
    fusable: Callable[[nn.Module], bool] = lambda m: False
    #: ``fuse(m, delta, x)``: the output of ``m`` plus the contribution of ``delta`` (the only live one, ``m`` not
    #: hooked) as one fused autograd node, or ``None`` when the kind has no fused kernel for this case (the layer
    #: then runs ``m`` and :attr:`add`); kinds that are :attr:`fusable` use :meth:`deltatune.deltas.Delta.fuse`
    fuse: Callable = lambda m, delta, x: None
    has_bias: bool = True
    stacked: bool = True
    #: how errors name the kind (the module type users know)
    title: str = ""
    family: str = "linear"
    geometry: Callable[[nn.Module], dict] = lambda m: {}
    #: the keys ``geometry`` gives (a record made without the module, e.g. a combination, copies them over)
    geometry_keys: tuple[str, ...] = ()
    lora_to_file: Callable = lambda B, A, spec: (B, A)
    lora_from_file: Callable = lambda B, A: (B, A, {})
    #: ``file_caveat(m)``: why PEFT / diffusers / kohya readers run the LoRA of module ``m`` from a file otherwise
    #: than deltatune does (``None``: they run it the same); exports warn with it
    file_caveat: Callable[[nn.Module], str | None] = lambda m: None
    #: ``merge_refusal(m)``: why deltas cannot be merged into module ``m``'s weight (a quantized weight, which
    #: :attr:`weight` can only give as a dequantized copy), or ``None``: they can
    merge_refusal: Callable[[nn.Module], str | None] = lambda m: None


_KINDS: list[LayerKind] = []


def register_kind(kind: LayerKind, before: str | None = None) -> LayerKind:
    """Make modules that ``kind.matches`` adaptable (the first registered kind that matches wins; ``before``: ahead
    of the kind of that name, for a subclass family such as quantized ``nn.Linear`` subclasses)."""
    if any(k.name == kind.name for k in _KINDS):
        raise ValueError(f"a layer kind named {kind.name!r} is already registered")
    at = next((i for i, k in enumerate(_KINDS) if k.name == before), len(_KINDS))
    _KINDS.insert(at, kind)
    return kind


def kinds() -> tuple[LayerKind, ...]:
    return tuple(_KINDS)


def titles() -> list[str]:
    """The registered kinds as errors name them (``Linear``, ``Conv1D``, ``Embedding``, ...)."""
    return [k.title or k.name for k in _KINDS]


def find_kind(module: nn.Module) -> LayerKind | None:
    return next((k for k in _KINDS if k.matches(module)), None)


#: module types that look adaptable but are refused, with the reason errors give (see :func:`register_refusal`)
_REFUSED: dict[type, str] = {}


def register_refusal(cls: type, reason: str) -> None:
    """Refuse modules of type ``cls`` (and subclasses) with ``reason`` in the error, instead of the generic
    "cannot adapt"."""
    _REFUSED[cls] = reason


def refusal(module: nn.Module) -> str | None:
    """Why ``module`` is refused (a registered refusal), or ``None``."""
    return next((r for cls, r in _REFUSED.items() if isinstance(module, cls)), None)


def kind_of(module: nn.Module) -> LayerKind:
    """The registered kind of ``module``; ``TypeError`` naming the adaptable kinds (or the refusal) otherwise."""
    kind = find_kind(module)
    if kind is None:
        why = refusal(module)
        raise TypeError(f"deltatune cannot adapt {type(module).__name__}" + (f": {why}" if why else "") +
                        f"; adaptable: {', '.join(titles())}")
    return kind


def kind_named(name: str) -> LayerKind:
    """The kind called ``name`` (as stored in adapter files, e.g. ``"linear"``)."""
    for k in _KINDS:
        if k.name == name:
            return k
    raise ValueError(f"unknown layer kind {name!r}; known: {', '.join(k.name for k in _KINDS)}")


#: without a model or config: the layer kind of a weight (or a LoRA factor in file layout) by its number of
#: dimensions (a 3-, 4- or 5-D tensor is a convolution's, ``out x in/groups x kernel``; a transposed convolution's
#: would be misread, so give a config or kinds when there is one)
GUESSED_KINDS = {2: "linear", 3: "nn_conv1d", 4: "nn_conv2d", 5: "nn_conv3d"}


def adaptable(module: nn.Module) -> bool:
    return find_kind(module) is not None


def is_linear(module: nn.Module) -> bool:
    """A registered kind that ``"all-linear"`` selects (Linear, GPT-2 Conv1D)."""
    kind = find_kind(module)
    return kind is not None and kind.family == "linear"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as an (out x in) view that shares storage (in-place edits write through)."""
    return kind_of(module).weight(module)


def base_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a delta may update (``None`` for kinds without one, e.g. embeddings)."""
    return getattr(module, "bias", None) if kind_of(module).has_bias else None


# -- the built-in kinds ---------------------------------------------------------------------------------------------
def gpt2_conv1d_type() -> type | None:
    """transformers' GPT-2 ``Conv1D`` (a linear layer that stores its weight in x out), if transformers is installed."""
    try:
        # optional third-party dependency: transformers is not required by the core
        from transformers.pytorch_utils import Conv1D
    except Exception:
        return None
    return Conv1D


def _transpose(t: torch.Tensor, like=None) -> torch.Tensor:
    return t.t()


def _embedding_add(m, delta, out, x):
    return out + delta.embed(x).to(out.dtype)


register_kind(LayerKind(
    "linear", matches=lambda m: isinstance(m, nn.Linear), weight=lambda m: m.weight,
    fusable=lambda m: type(m) is nn.Linear, title="Linear"))  # subclasses (quantized layers, ...) may compute something else
register_kind(LayerKind(
    "conv1d", matches=lambda m: (t := gpt2_conv1d_type()) is not None and isinstance(m, t),
    weight=lambda m: m.weight.t(), to_linear=_transpose, from_linear=_transpose, fusable=lambda m: True,
    title="Conv1D"))
register_kind(LayerKind(
    "embedding", matches=lambda m: isinstance(m, nn.Embedding), weight=lambda m: m.weight.t(),
    to_linear=_transpose, from_linear=_transpose, add=_embedding_add, output=lambda m, delta, x: delta.embed(x),
    replace=lambda m, delta, x: delta.replace(x, embedding=True), has_bias=False, stacked=False, family="embedding",
    title="Embedding"))


# -- convolutions: pure functions of the module's geometry ---------------------------------------------------------
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: exactly these compute the plain conv (a subclass, e.g. a quantized conv, may compute something else)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_input(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """``(x, padding)`` for a conv with the geometry of ``m``: a non-zero ``padding_mode`` (reflect, replicate,
    circular) pads ``x`` first, as ``m`` itself does, and the conv then pads nothing."""
    if m.padding_mode == "zeros":
        return x, m.padding
    return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0


def conv_update(m: nn.Module, delta, x: torch.Tensor) -> torch.Tensor:
    """``dW * x``: one delta's contribution to conv ``m``'s output. LoCon when ``dW = s B A``: ``u = conv(x, A)``
    with ``m``'s kernel, stride, padding, dilation and groups (``A`` repeated per group), then ``B`` as a grouped
    1x1 conv; otherwise one conv with ``dense()`` reshaped to the kernel."""
    conv, kernel = _CONV[m.weight.dim() - 2], m.weight.shape[1:]
    xin, padding = conv_input(m, x)
    factors = delta.live_factors()
    if factors is None or factors[1].shape[0] == 0:  # no factors, or every component pruned (rank 0)
        dW = delta.dense().reshape(m.weight.shape)
        return conv(xin.to(dW.dtype), dW, None, m.stride, padding, m.dilation, m.groups)
    B, A, s = factors
    A_k = A.reshape(A.shape[0], *kernel)
    if m.groups > 1:  # each group of inputs goes through the same A
        A_k = A_k.repeat(m.groups, *([1] * len(kernel)))
    u = conv(delta.drop(xin), A_k, None, m.stride, padding, m.dilation, m.groups)
    if delta.routed:  # a gate per sample on the rank channels (repeated per group like A)
        g = delta.row_gate(u.shape[0]).to(u.dtype).repeat(1, m.groups)
        u = u * g.view(*g.shape, *([1] * (u.dim() - 2)))
    B_k = (B * s).reshape(B.shape[0], B.shape[1], *([1] * (len(kernel) - 1)))
    return conv(u, B_k, None, 1, 0, 1, m.groups)


def _int_list(v, dims: int) -> list[int]:
    return [v] * dims if isinstance(v, int) else list(v)


def _pointwise(kernel, stride, padding, dilation) -> bool:
    """A 1x1(x1) conv with unit stride and no padding (geometry as int lists): a matrix product over the channels
    at each position."""
    return all(v == 1 for v in (*kernel, *stride, *dilation)) and not any(padding)


class _LoConConv(torch.autograd.Function):
    """``y = conv(x, W) + b + s * B conv(x, A)`` for a frozen ``W, b``, with ``[W; A]`` as one conv of ``out + r``
    output channels (``x`` read once, one input gradient), ``B`` a batched matrix product over the positions, and
    the backward written out (``g = dL/dy``, ``u = conv(x, A)``, ``g_u = s B^T g``)::

        dL/dB = s sum_n g_n u_n^T      dL/dA = conv_weight_grad(g_u, x)      dL/dx = conv_input_grad([g; g_u], [W; A])

    Positions are flattened (``N x C x P``); a pointwise conv (1x1, unit stride, no padding) runs every product as
    a matrix product. Why, measured on 2 CPU threads (3x3 conv 128 -> 128 on 8 x 128 x 8 x 8, r = 8): the ``[W; A]``
    conv takes 642 us against 576 + 150 us for two convs, its input gradient 681 against 596 + 160 us, ``B`` as a
    batched matmul 10 / 31 us (forward / backward) against 92 / 202 us as a 1x1 conv, and a 1x1 conv 60 us as a
    matmul against 137 us as a conv. On one thread the conv kernels' fixed costs are smaller and the node only ties
    the separate kernels (BENCHMARKS.md, "Convolutions and diffusion (issue 17): speed")."""

    @staticmethod
    def forward(ctx, x, W, b, A, B, s, stride, padding, dilation):
        out_ch, r, n, dims = W.shape[0], A.shape[0], x.shape[0], x.dim() - 2
        stride, padding, dilation = (_int_list(v, dims) for v in (stride, padding, dilation))
        Wc = torch.cat([W.reshape(out_ch, -1), A])  # (out + r) x (in * prod(kernel)), linear layout
        bc = None if b is None else torch.cat([b, b.new_zeros(r)])
        pointwise = _pointwise(W.shape[2:], stride, padding, dilation)
        if pointwise:
            x3 = x.reshape(n, x.shape[1], math.prod(x.shape[2:]))
            y3 = torch.matmul(Wc, x3) if bc is None else torch.baddbmm(bc[:, None], Wc.expand(n, *Wc.shape), x3)
            spatial = x.shape[2:]
        else:
            y = _CONV[W.dim() - 2](x, Wc.view(out_ch + r, *W.shape[1:]), bc, stride, padding, dilation)
            y3, spatial = y.view(n, out_ch + r, math.prod(y.shape[2:])), y.shape[2:]
        u = y3[:, out_ch:].contiguous()  # saved on its own, so that the (out + r)-channel output can be freed
        out = torch.baddbmm(y3[:, :out_ch], B.expand(n, *B.shape), u, alpha=s)
        ctx.save_for_backward(x, W, A, B, u)  # not Wc: a copy of the base weight would live until the backward
        ctx.s, ctx.geometry, ctx.kernel, ctx.pointwise = s, (stride, padding, dilation), W.shape[1:], pointwise
        return out.view(n, out_ch, *spatial)

    @staticmethod
    def backward(ctx, g):
        x, W, A, B, u = ctx.saved_tensors
        need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
        n, out_ch, r = g.shape[0], g.shape[1], u.shape[1]
        Wc = torch.cat([W.reshape(out_ch, -1), A]) if need_x else None
        g3 = g.reshape(n, out_ch, math.prod(g.shape[2:]))
        gB = torch.bmm(g3, u.transpose(1, 2)).sum(0).mul_(ctx.s) if need_B else None
        gu = torch.matmul(B.t(), g3).mul_(ctx.s) if need_A or need_x else None
        gx = gA = None
        if ctx.pointwise:
            x3 = x.reshape(n, x.shape[1], math.prod(x.shape[2:]))
            gx = torch.matmul(Wc.t(), torch.cat([g3, gu], 1)).view(x.shape) if need_x else None
            gA = torch.bmm(gu, x3.transpose(1, 2)).sum(0) if need_A else None
        else:
            kernel, spatial = ctx.kernel, g.shape[2:]
            geometry = (*ctx.geometry, False, [0] * (x.dim() - 2), 1)  # not transposed, no output padding, 1 group
            if need_x:
                gc = torch.cat([g3, gu], 1).view(n, out_ch + r, *spatial)
                gx = torch.ops.aten.convolution_backward(gc, x, Wc.view(out_ch + r, *kernel), None, *geometry,
                                                         (True, False, False))[0]
            if need_A:
                Ak = A.view(r, *kernel)
                gA = torch.ops.aten.convolution_backward(gu.view(n, r, *spatial), x, Ak, None, *geometry,
                                                         (False, True, False))[1].reshape(r, -1)
        return gx, None, None, gA, gB, None, None, None, None


def locon_conv(m: nn.Module, delta, x: torch.Tensor) -> torch.Tensor | None:
    """The whole output of conv ``m`` plus a LoCon ``delta`` (``dW = s B A``) as one autograd node
    (:class:`_LoConConv`), or ``None`` where that node does not apply: other structures, input dropout, conv
    subclasses, grouped convs, trainable base weights, mixed dtypes or autocast, unbatched, non-contiguous or
    string-padded inputs (the layer then runs the base conv plus :func:`conv_update`)."""
    factors = delta.live_factors()
    W, b = m.weight, m.bias
    frozen = not W.requires_grad and (b is None or not b.requires_grad)
    if (factors is None or delta.routed or factors[1].shape[0] == 0 or type(m) not in _CONV_TYPES or m.groups != 1 or not frozen or x.dim() != W.dim()
            or not x.is_contiguous() or torch.is_autocast_enabled(x.device.type)):
        return None
    B, A, s = factors
    xin, padding = conv_input(m, x)
    if isinstance(padding, str) or delta.drop(xin) is not xin or not x.dtype == W.dtype == A.dtype == B.dtype:
        return None
    return _LoConConv.apply(xin, W, b, A, B, float(s), m.stride, padding, m.dilation)


def _conv_replace(m, delta, x):
    """A delta that replaces the module (its own trained weight and bias): the conv with ``W + dW``, ``b + db``."""
    xin, padding = conv_input(m, x)
    W = m.weight + delta.dense().reshape(m.weight.shape).to(m.weight.dtype)
    db = delta.dense_bias()
    b = m.bias if db is None else (db if m.bias is None else m.bias + db)
    return _CONV[m.weight.dim() - 2](xin, W, b, m.stride, padding, m.dilation, m.groups)


def conv_geometry(m: nn.Module) -> dict:
    return {"kernel": list(m.kernel_size), "groups": int(m.groups)}


def conv_lora_to_file(B: torch.Tensor, A: torch.Tensor, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv LoRA in PEFT's layout: ``lora_A`` a conv ``in -> R`` with the base's kernel, ``(R, in, *kernel)``, and
    ``lora_B`` a 1x1 conv ``R -> out`` with the base's groups, ``(out, R/groups, 1, ...)``.

    With ``groups = g > 1`` our ``A`` (r x in/g*k) acts on each group of inputs and output ``o`` of group ``j``
    reads its ``r`` channels: that is PEFT's layout at ``R = g r`` with a block-diagonal ``lora_A`` (block ``j``
    maps input group ``j`` to channels ``j r .. (j+1) r``, each block ``A``) and ``lora_B = B``, exactly."""
    if "kernel" not in spec:
        raise ValueError("the adapter does not record the convolution's kernel (saved by an older deltatune or made "
                         "from files): attach or load it on the model and save from there")
    kernel, g = spec["kernel"], int(spec.get("groups", 1))
    r = A.shape[0]
    A_k = A.reshape(r, -1, *kernel)
    A_file = torch.block_diag(*[A] * g).reshape(g * r, g * A_k.shape[1], *kernel) if g > 1 else A_k
    return B.reshape(B.shape[0], r, *([1] * len(kernel))), A_file


def conv_lora_from_file(B_file: torch.Tensor, A_file: torch.Tensor):
    """``(B, A, geometry)`` of a conv LoRA in PEFT's layout (:func:`conv_lora_to_file`). ``groups = R /
    B.shape[1]``; a grouped one must have a block-diagonal ``lora_A``. With equal blocks (what
    :func:`conv_lora_to_file` writes) it reads as rank ``r = R / g``: ``A`` the block, ``B = lora_B`` (so a round
    trip keeps the rank); with distinct blocks as rank ``R``: ``A`` stacks the blocks, ``B`` puts output ``o`` of
    group ``j`` on block ``j``'s rows. One whose ``lora_A`` mixes input groups is no update of the grouped conv's
    weight (PEFT cannot merge it either) and is refused."""
    if A_file.dim() < 3 or B_file.dim() != A_file.dim() or any(d != 1 for d in B_file.shape[2:]):
        raise ValueError(f"a conv LoRA needs lora_A (r, in, *kernel) and lora_B (out, r, 1, ...); the file has "
                         f"{tuple(A_file.shape)} and {tuple(B_file.shape)}")
    R, out, kernel = A_file.shape[0], B_file.shape[0], list(A_file.shape[2:])
    if B_file.shape[1] == 0 or R % B_file.shape[1] or out % (R // B_file.shape[1]):
        raise ValueError(f"lora_B {tuple(B_file.shape)} does not fit lora_A {tuple(A_file.shape)}")
    g = R // B_file.shape[1]
    B = B_file.reshape(out, -1)
    if g == 1:
        return B, A_file.reshape(R, -1), {"kernel": kernel, "groups": 1}
    r, in_g = R // g, A_file.shape[1] // g
    blocks = A_file.reshape(g, r, g, in_g, -1)
    off = blocks.clone()
    for j in range(g):
        off[j, :, j] = 0
    if off.abs().max() > 0:
        raise ValueError(f"a grouped-conv LoRA (groups={g}) whose lora_A mixes input groups is not an update of the "
                         "grouped conv's weight (PEFT cannot merge it either); deltatune cannot represent it")
    diagonal = torch.stack([blocks[j, :, j] for j in range(g)])  # (g, r, in_g, prod(kernel))
    if torch.equal(diagonal, diagonal[:1].expand_as(diagonal)):  # every group reads the same A
        return B, diagonal[0].reshape(r, -1), {"kernel": kernel, "groups": g}
    A = diagonal.reshape(R, -1)
    B_full = torch.block_diag(*B.reshape(g, out // g, r))  # output o of group j reads block j's rows only
    return B_full, A, {"kernel": kernel, "groups": g}


def conv_file_caveat(m: nn.Module) -> str | None:
    """PEFT (0.21) builds a conv LoRA's ``lora_A`` with the base's kernel, stride and padding only: a dilated conv's or
    one with a non-zero ``padding_mode`` runs unmerged with other outputs in PEFT, diffusers and kohya readers."""
    odd = ([f"dilation {tuple(m.dilation)}"] if any(d != 1 for d in m.dilation) else []) + \
        ([f"padding_mode {m.padding_mode!r}"] if m.padding_mode != "zeros" else [])
    return ", ".join(odd) or None


def _conv_kind(cls: type) -> LayerKind:
    """``nn_conv1d`` / ``nn_conv2d`` / ``nn_conv3d`` (``conv1d`` names GPT-2's Conv1D, a linear layer, in files)."""
    return LayerKind(
        "nn_" + cls.__name__.lower(), matches=lambda m: isinstance(m, cls),
        weight=lambda m: m.weight.view(m.weight.shape[0], -1),
        to_linear=lambda t: t.reshape(t.shape[0], -1), from_linear=lambda t, like: t.reshape(like.shape),
        add=lambda m, delta, out, x: out + conv_update(m, delta, x).to(out.dtype),
        output=conv_update, replace=_conv_replace, fuse=locon_conv, stacked=False, family="conv",
        title=cls.__name__, geometry=conv_geometry, geometry_keys=("kernel", "groups"),
        lora_to_file=conv_lora_to_file, lora_from_file=conv_lora_from_file, file_caveat=conv_file_caveat)


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_kind(_conv_kind(_cls))
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_refusal(_cls, "transposed convolutions are not supported (their weight is in x out/groups x kernel and "
                     "they scatter their input); exclude the module or target the convolutions around it")


# -- module trees with wrapped layers -------------------------------------------------------------------------------
class LayerWrapper(nn.Module):
    """Marker base class of a module that wraps an adaptable layer as ``.base`` (:class:`deltatune.adapted.
    AdaptedLayer`): code on this floor sees through it without importing the wrapper."""

    base: nn.Module


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / FSDP / DataParallel / torch.compile wrappers, and the transformers model
    inside a wrapper that exposes it as ``transformers_model`` (a ``SentenceTransformer``): adapters attach there,
    so their module names are the transformers model's own (what PEFT and sentence-transformers load)."""
    while not hasattr(model, REGISTRY_ATTR):
        inner = (getattr(model, "module", None) or getattr(model, "_orig_mod", None)
                 or getattr(model, "transformers_model", None))
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` as if no layer were wrapped (a wrapped layer shows as its base; deltas are hidden)."""
    hidden: list[str] = []
    for name, module in unwrap(model).named_modules():
        if any(name.startswith(h) for h in hidden):
            continue
        if isinstance(module, LayerWrapper):
            hidden.append(name + ".")
            yield name, module.base
        else:
            yield name, module


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of the model without its adapters (each shared tensor counted once)."""
    seen = {id(p): p.numel() for _, m in base_modules(model) for p in m.parameters(recurse=False)}
    return sum(seen.values())


class BaseView(nn.Module):
    """Shows :func:`base_modules` to code that calls ``named_modules`` (target resolution)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["_model"] = model

    def named_modules(self, *args, **kwargs):
        return base_modules(self._model)

    def get_output_embeddings(self):
        m = self._model
        out = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        return out.base if isinstance(out, LayerWrapper) else out


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


_GLOBAL_HOOKS = [getattr(nn_module, name) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                        "_global_backward_hooks", "_global_backward_pre_hooks")
                 if hasattr(nn_module, name)]  # the dicts torch.nn.modules.module.register_module_*_hook fill


def hooked(module: nn.Module) -> bool:
    """Whether calling the module runs hooks (its own, global module hooks, accelerate's device hooks)."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    return any(own) or any(_GLOBAL_HOOKS) or hasattr(module, "_hf_hook")
