"""Methods: one file per family (config dataclass, initializer, controller)."""
from .adalora import AdaLoRA
from .base import Controller, Method, StepInfo, methods
from .increlora import IncreLoRA
from .kind import KIND
from .lora import EVA, CorDA, LoRA, MiLoRA, OLoRA, PiSSA
from .oft import OFT
from .orthogonal import NOLA, OrthogonalAdaptation, VeRA
from .s2ft import S2FT
from .sorsa import SORSA
from .sora import SoRA
from .sparse import LTSFT, SpIEL

__all__ = ["AdaLoRA", "Controller", "CorDA", "EVA", "IncreLoRA", "KIND", "LTSFT", "LoRA", "Method", "MiLoRA", "NOLA", "OFT", "OLoRA",
           "OrthogonalAdaptation", "PiSSA", "S2FT", "SORSA", "SoRA", "SpIEL", "StepInfo", "VeRA", "methods"]
