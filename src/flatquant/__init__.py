"""flatquant: W4A4KV4 post-training quantization with learned Kronecker transforms (FlatQuant)."""

from .arch import ArchSpec, register_architecture, supported_architectures
from .calibrate import CalibrationResult
from .checkpoint import load_quantized, save_quantized
from .config import FlatQuantConfig, preset
from .kvcache import Int4KVCache
from .packed import load_packed, pack
from .pipeline import merge_model, quantize

__all__ = [
    "ArchSpec",
    "CalibrationResult",
    "FlatQuantConfig",
    "Int4KVCache",
    "load_packed",
    "load_quantized",
    "merge_model",
    "pack",
    "preset",
    "quantize",
    "register_architecture",
    "save_quantized",
    "supported_architectures",
]
__version__ = "0.1.0"
