"""flatquant: W4A4KV4 post-training quantization with learned Kronecker transforms (FlatQuant)."""

from .arch import ArchSpec, register_architecture, supported_architectures
from .calibrate import CalibrationResult
from .checkpoint import load_quantized, save_quantized
from .config import FlatQuantConfig, preset
from .pipeline import merge_model, quantize, round_weights

__all__ = [
    "ArchSpec",
    "CalibrationResult",
    "FlatQuantConfig",
    "load_quantized",
    "merge_model",
    "preset",
    "quantize",
    "register_architecture",
    "round_weights",
    "save_quantized",
    "supported_architectures",
]
__version__ = "0.1.0"
