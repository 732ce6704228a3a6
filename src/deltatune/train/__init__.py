"""Training: data loading, a small trainer, a Hugging Face ``Trainer`` callback and YAML run configs.

    from deltatune.train import TrainArgs, train, run_config
    result = train(model, examples, TrainArgs(lr=5e-4, max_steps=100), task="classification")
    result = run_config("examples/sst2_lora.yaml")

``DeltatuneCallback`` needs ``transformers`` and is imported on first use.
"""
from .config import RunConfig, load_config, run_config
from .data import (
    Collator,
    encode_classification,
    encode_instruction,
    encode_instructions,
    format_prompt,
    label_map,
    pad_id_of,
    read_rows,
)
from .trainer import TrainArgs, eval_loader, evaluate, lr_factor, set_seed, train


def __getattr__(name):
    if name == "DeltatuneCallback":  # local: callback imports transformers, an optional dependency
        from .callback import DeltatuneCallback

        return DeltatuneCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Collator", "DeltatuneCallback", "RunConfig", "TrainArgs", "encode_classification", "encode_instruction",
    "encode_instructions", "eval_loader", "evaluate", "format_prompt", "label_map", "load_config", "lr_factor", "pad_id_of",
    "read_rows", "run_config", "set_seed", "train",
]
