"""Quantized frozen bases (QLoRA-style): layer kinds for bitsandbytes' 4-bit (NF4 / FP4) and 8-bit linears.

A quantized linear keeps its weight packed (``Params4bit``: uint8 blocks plus a quantization state; ``Int8Params``:
int8 rows with one scale each) and computes ``y = x deq(W_q)^T + b`` in its own ``forward``. As a layer kind:

- the linear layout is the *dequantized* weight ``deq(W_q)`` (out x in, in the dtype it was quantized from), read
  when a delta needs it (initializations such as PiSSA or KIND that take an SVD of ``W``, OFT's rotation of the
  base, export against a base); adapters train in float32 (the usual bf16 base + fp32 adapter setup);
- the forward is the module's own (its quantized kernel) plus each delta's contribution, so every structure that
  adds ``dW x`` trains on it: low-rank (LoRA and its family), gated SVD, frozen bases, S2FT blocks, sparse entries,
  KIND; OFT runs too, on the dequantized weight (one dequantization per call: slow, and it never uses the
  quantized kernel);
- the base is never modified: merging is refused (writing ``W + dW`` back would re-quantize it, with an output
  error of the order of the quantization error itself; merge into the unquantized base instead: ``dt.save`` the
  adapter and ``dt.load`` it onto the original model). Adapter files are the ordinary ones: the update of a
  weight, valid on the unquantized base, whose quantization the adapter was trained against.

The same holds for torchao's int8 weight-only linears (an ``nn.Linear`` whose weight is a torchao tensor subclass,
``quantize_(model, Int8WeightOnlyConfig())``), HQQ's ``HQQLinear`` and optimum-quanto's ``QLinear`` (after
``quantize`` + ``freeze``); each dequantizes with its package's own ``dequantize()``.

All these packages are optional dependencies: the kinds match by type name (nothing is imported until such a module
is met). Registered ahead of ``linear`` (most of these modules are ``nn.Linear`` subclasses or instances).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import LayerKind, register_kind

MERGE_REFUSAL = ("{title} holds a quantized weight: merging would re-quantize W + dW (an output error as large as the "
                 "quantization error) and change the base; merge into the unquantized model instead (dt.save the "
                 "adapter, dt.load it onto the original weights, dt.merge there)")


def _is(m: nn.Module, name: str, package: str = "bitsandbytes") -> bool:
    """``m`` is a ``package`` class named ``name`` or a subclass of one (matched by name: nothing is imported)."""
    t = type(m)
    return t.__module__.startswith(package) and any(c.__name__ == name for c in t.__mro__)


def dequantize_4bit(m: nn.Module) -> torch.Tensor:
    """``deq(W_q)`` (out x in) of a bitsandbytes ``Linear4bit``."""
    import bitsandbytes.functional as bnbf

    w = m.weight
    if getattr(w, "quant_state", None) is None:  # not quantized yet (before .to(device) / .cuda())
        return w.data
    return bnbf.dequantize_4bit(w.data, w.quant_state)


def dequantize_8bit(m: nn.Module) -> torch.Tensor:
    """``deq(W_q) = CB * SCB / 127`` (out x in, float32) of a bitsandbytes ``Linear8bitLt`` (row-wise int8)."""
    w = m.weight
    scale = getattr(w, "SCB", None)
    if scale is None:  # after the first forward bitsandbytes keeps the scales in the module's matmul state
        scale = getattr(getattr(m, "state", None), "SCB", None)
    if w.dtype != torch.int8:  # not quantized (fp16 weights kept)
        return w.data
    if scale is None:
        raise ValueError(f"a {type(m).__name__} with int8 weights but no row scales (SCB): cannot dequantize it")
    return w.data.float() * (scale.float()[:, None] / 127.0)


def _torchao(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m.weight).__module__.startswith("torchao")


def dequantize_weight(m: nn.Module) -> torch.Tensor:
    """``deq(W_q)`` (out x in) of a torchao- or quanto-quantized linear: the weight tensor subclass's own
    ``dequantize()`` (a quanto layer not yet frozen still holds float weights)."""
    w = m.weight
    return w.dequantize() if hasattr(w, "dequantize") else w.data


for name, title, match, deq in (("torchao_linear", "torchao quantized Linear", _torchao, dequantize_weight),
                                ("hqq_linear", "HQQ HQQLinear", lambda m: _is(m, "HQQLinear", "hqq"),
                                 lambda m: m.dequantize()),
                                ("quanto_qlinear", "optimum-quanto QLinear",
                                 lambda m: _is(m, "QLinear", "optimum.quanto"), dequantize_weight)):
    register_kind(LayerKind(name, matches=match, weight=deq, title=title,
                            merge_refusal=lambda m, title=title: MERGE_REFUSAL.format(title=title)), before="linear")


for title, cls, deq in (("bitsandbytes Linear4bit", "Linear4bit", dequantize_4bit),
                        ("bitsandbytes Linear8bitLt", "Linear8bitLt", dequantize_8bit)):
    register_kind(LayerKind(
        f"bnb_{cls.lower()}", matches=lambda m, cls=cls: _is(m, cls), weight=deq, title=title,
        merge_refusal=lambda m, title=title: MERGE_REFUSAL.format(title=title)), before="linear")
