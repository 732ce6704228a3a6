"""Methods: one file per family (config dataclass, initializer, controller)."""
from .adaptive import AdaLoRA, IncreLoRA, SoRA
from .base import Controller, Method, methods
from .lora import LoRA, MiLoRA, OLoRA, PiSSA
from .s2ft import S2FT
from .sparse import LTSFT, SpIEL

__all__ = ["AdaLoRA", "Controller", "IncreLoRA", "LTSFT", "LoRA", "Method", "MiLoRA", "OLoRA", "PiSSA", "S2FT", "SoRA", "SpIEL", "methods"]
