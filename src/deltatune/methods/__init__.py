"""Methods: one file per family (config dataclass, initializer, controller)."""
from .adaptive import AdaLoRA, IncreLoRA, SoRA
from .base import Controller, Method, methods
from .lora import EVA, CorDA, LoRA, MiLoRA, OLoRA, PiSSA
from .oft import OFT
from .orthogonal import NOLA, OrthogonalAdaptation, VeRA
from .s2ft import S2FT
from .sorsa import SORSA
from .sparse import LTSFT, SpIEL

__all__ = ["AdaLoRA", "Controller", "CorDA", "EVA", "IncreLoRA", "LTSFT", "LoRA", "Method", "MiLoRA", "NOLA", "OFT", "OLoRA",
           "OrthogonalAdaptation", "PiSSA", "S2FT", "SORSA", "SoRA", "SpIEL", "VeRA", "methods"]
