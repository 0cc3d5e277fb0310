"""flatquant: W4A4KV4 post-training quantization with learned Kronecker transforms (FlatQuant)."""

from .arch import ArchSpec, register_architecture, supported_architectures
from .calibrate import CalibrationResult
from .checkpoint import apply_calibration, load_quantized, save_quantized, write_calibration
from .config import FlatQuantConfig, preset
from .distributed import DistributedCalibrationError, calibrate_distributed, is_main_process
from .kvcache import GenerationSession, GraphedDecoder, GraphedPrefill, Int4KVCache, generate
from .packed import load_packed, pack
from .pipeline import merge_model, quantize, round_weights
from .streaming import StreamingModel

__all__ = [
    "apply_calibration",
    "ArchSpec",
    "calibrate_distributed",
    "CalibrationResult",
    "DistributedCalibrationError",
    "FlatQuantConfig",
    "generate",
    "GenerationSession",
    "GraphedDecoder",
    "GraphedPrefill",
    "is_main_process",
    "Int4KVCache",
    "load_packed",
    "load_quantized",
    "merge_model",
    "pack",
    "preset",
    "quantize",
    "register_architecture",
    "round_weights",
    "save_quantized",
    "StreamingModel",
    "supported_architectures",
    "write_calibration",
]
__version__ = "0.1.0"
