"""Methods: one file per family (config dataclass, initializer, controller)."""
from .adaptive import AdaLoRA, IncreLoRA, SoRA
from .base import Controller, Method, methods
from .lora import LoRA, MiLoRA, OLoRA, PiSSA

__all__ = ["AdaLoRA", "Controller", "IncreLoRA", "LoRA", "Method", "MiLoRA", "OLoRA", "PiSSA", "SoRA", "methods"]
