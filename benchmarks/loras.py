"""The same random LoRA adapters in deltatune and in PEFT (for merge and serving comparisons)."""
from __future__ import annotations

import torch

import deltatune as dt


def random_factors(shapes: dict[str, tuple[int, int]], seed: int, r: int) -> dict:
    """``{module: (B, A)}`` with ``A ~ N(0, 1/in)`` (r x in) and ``B ~ N(0, 0.02^2)`` (out x r), from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(o, r, generator=g) * 0.02, torch.randn(r, n, generator=g) / n**0.5)
            for m, (o, n) in sorted(shapes.items())}


def ours_loras(model, ranks: list[int], targets, seed: int = 0):
    """Adapters ``a0, a1, ...`` of ``ranks`` (alpha = 2r) with :func:`random_factors` (seed ``seed + k``); returns
    ``(model, {module: (out, in)})``."""
    for k, r in enumerate(ranks):
        dt.attach(model, dt.LoRA(r=r, alpha=2 * r, targets=targets), name=f"a{k}", activate=False)
    shapes = {m: (d.out_features, d.in_features) for m, d in dt.deltas(model, "a0").items()}
    with torch.no_grad():
        for k, r in enumerate(ranks):
            for m, (B, A) in random_factors(shapes, seed + k, r).items():
                d = dt.deltas(model, f"a{k}")[m]
                d.B.copy_(B)
                d.A.copy_(A)
    return model, shapes


def peft_layers(model) -> dict:
    """``{module name (as deltatune names it): PEFT LoraLayer}``."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def peft_loras(model, ranks: list[int], targets, seed: int = 0):
    """The same adapters as :func:`ours_loras` in PEFT; returns ``(peft model, shapes)``."""
    from peft import LoraConfig, get_peft_model

    configs = [LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0) for r in ranks]
    model = get_peft_model(model, configs[0], adapter_name="a0")
    for k in range(1, len(ranks)):
        model.add_adapter(f"a{k}", configs[k])
    layers = peft_layers(model)
    shapes = {m: (layer.out_features, layer.in_features) for m, layer in layers.items()}
    with torch.no_grad():
        for k, r in enumerate(ranks):
            for m, (B, A) in random_factors(shapes, seed + k, r).items():
                layers[m].lora_B[f"a{k}"].weight.copy_(B)
                layers[m].lora_A[f"a{k}"].weight.copy_(A)
    return model.eval(), shapes
