"""Methods: one file per family (config dataclass, initializer, controller)."""
from .base import Controller, Method, methods
from .lora import LoRA, MiLoRA, OLoRA, PiSSA

__all__ = ["Controller", "LoRA", "Method", "MiLoRA", "OLoRA", "PiSSA", "methods"]
