"""The one configuration object of flatquant; the CLI is generated from its fields."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .transforms import INITS, PARAMETRISATIONS

METHODS = ("flatquant", "rotation", "rtn")
AUTOCAST_DTYPES = ("bfloat16", "float16", "float32")
WEIGHT_METHODS = ("rtn", "gptq")
BIT_KEYS = ("w_bits", "a_bits", "k_bits", "v_bits")
# Options that act only after calibration (weight rounding): a calibration is shared across their values.
ROUNDING_FIELDS = {"weight_method": "rtn", "gptq_damping": 0.01, "gptq_act_order": False}
LOSSES = ("mse", "log-mse", "token-mse")
CALIB_INPUTS = ("fp", "quantized")


@dataclass
class FlatQuantConfig:
    """Every option of calibration and fake quantization. Bits of 16 switch a quantizer off."""

    # --- what is quantized ---
    w_bits: int = field(default=4, metadata={"help": "weight bits (2-16; 16 = off)"})
    a_bits: int = field(default=4, metadata={"help": "activation bits of every linear input (2-16)"})
    k_bits: int = field(default=4, metadata={"help": "K-cache bits (2-16)"})
    v_bits: int = field(default=4, metadata={"help": "V-cache bits (2-16)"})
    w_symmetric: bool = field(default=True, metadata={"help": "symmetric weight quantization"})
    a_symmetric: bool = field(default=True, metadata={"help": "symmetric activation quantization"})
    kv_symmetric: bool = field(default=False, metadata={"help": "symmetric KV-cache quantization"})
    w_group_size: int | None = field(default=None, metadata={"help": "weight group size (None: per channel)"})
    weight_method: str = field(default="rtn", metadata={"help": f"weight rounding, one of {WEIGHT_METHODS}"})
    gptq_damping: float = field(default=0.01, metadata={"help": "GPTQ: damping as a fraction of the mean diag(H)"})
    gptq_act_order: bool = field(default=False, metadata={"help": "GPTQ: columns in order of decreasing diag(H)"})
    overrides: dict[str, dict[str, int]] = field(
        default_factory=dict,
        metadata={
            "help": "bits per module name pattern (a substring of e.g. 'model.layers.0.mlp.down_proj'), "
            "later patterns win; CLI: --override PATTERN:w8a8 (keys w, a, k, v, kv)"
        },
    )
    # --- method ---
    method: str = field(
        default="flatquant",
        metadata={"help": "flatquant (learned), rotation (fixed, QuaRot-style) or rtn (no transform)"},
    )
    learnable_weight_clip: bool = field(default=True, metadata={"help": "learn weight clipping (LWC)"})
    learnable_act_clip: bool = field(default=True, metadata={"help": "learn activation clipping (LAC)"})
    smooth: bool = field(default=True, metadata={"help": "learn per-channel scaling"})
    smooth_alpha: float = field(default=0.3, metadata={"help": "migration strength of the scaling init"})
    parametrisation: str = field(default="svd", metadata={"help": f"transform factors: {PARAMETRISATIONS}"})
    transform_init: str = field(default="random", metadata={"help": f"transform start: {INITS}"})
    # --- calibration ---
    nsamples: int = field(default=128, metadata={"help": "number of calibration windows"})
    seqlen: int = field(default=2048, metadata={"help": "tokens per calibration window"})
    epochs: int = field(default=15, metadata={"help": "epochs per block (0: no training)"})
    batch_size: int = field(default=4, metadata={"help": "windows per optimiser step"})
    lr: float = field(default=5e-3, metadata={"help": "learning rate of transforms and scalings"})
    clip_lr: float = field(default=5e-2, metadata={"help": "learning rate of the clipping logits"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    loss: str = field(
        default="mse",
        metadata={
            "help": f"block objective {LOSSES}; log-mse divides each step's MSE by its detached value; "
            "token-mse averages each token's squared error relative to its target's squared norm"
        },
    )
    calib_inputs: str = field(
        default="fp",
        metadata={
            "help": f"block inputs during training {CALIB_INPUTS}: fp = the full-precision model's (method.md), "
            "quantized = the outputs of the blocks calibrated before it (targets stay full precision)"
        },
    )
    autocast_dtype: str = field(default="bfloat16", metadata={"help": f"training precision {AUTOCAST_DTYPES}"})
    seed: int = field(default=0, metadata={"help": "seed of windows and transform inits"})

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "k_bits", "v_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 2 <= bits <= 16:
                raise ValueError(f"{name}={bits!r} is out of range: allowed integers 2..16 (16 = off)")
        choices = {
            "method": METHODS,
            "weight_method": WEIGHT_METHODS,
            "parametrisation": PARAMETRISATIONS,
            "transform_init": INITS,
            "autocast_dtype": AUTOCAST_DTYPES,
            "loss": LOSSES,
            "calib_inputs": CALIB_INPUTS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if not 0.0 < self.gptq_damping < 1.0:
            raise ValueError(f"gptq_damping={self.gptq_damping} must lie in (0, 1)")
        _check_overrides(self.overrides)
        if self.w_group_size is not None and self.w_group_size < 1:
            raise ValueError(f"w_group_size={self.w_group_size} must be a positive integer or None")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.epochs < 0:
            raise ValueError(f"epochs={self.epochs} must be >= 0")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha={self.smooth_alpha} must lie in [0, 1]")

    @property
    def uses_transforms(self) -> bool:
        return self.method in ("flatquant", "rotation")

    @property
    def trains(self) -> bool:
        """Whether calibration trains anything (only FlatQuant with epochs > 0)."""
        return self.method == "flatquant" and self.epochs > 0

    @property
    def effective_init(self) -> str:
        return "hadamard" if self.method == "rotation" else self.transform_init

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def calibration_dict(self) -> dict:
        """The options calibration depends on: the weight-rounding options take their defaults (so RTN and
        GPTQ share one calibration) and empty overrides are left out (as before overrides existed)."""
        d = {**self.to_dict(), **ROUNDING_FIELDS}
        for name in set(ROUNDING_FIELDS) - {"weight_method"}:
            del d[name]
        if not d["overrides"]:
            del d["overrides"]
        if d["calib_inputs"] == "fp":  # the default leaves the fingerprints of earlier states unchanged
            del d["calib_inputs"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> FlatQuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> FlatQuantConfig:
        return dataclasses.replace(self, **changes)


def _check_overrides(overrides) -> None:
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides={overrides!r} must be a dict {{pattern: {{'w_bits': 8, ...}}}}")
    for pattern, bits in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"override pattern {pattern!r} must be a non-empty module name substring")
        if not isinstance(bits, dict) or not bits:
            raise ValueError(f"override {pattern!r}: {bits!r} must be a non-empty dict with keys from {BIT_KEYS}")
        for key, value in bits.items():
            if key not in BIT_KEYS:
                raise ValueError(f"override {pattern!r}: key {key!r} is not one of {BIT_KEYS}")
            if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 16:
                raise ValueError(f"override {pattern!r}: {key}={value!r} is out of range: allowed integers 2..16")


def describe_overrides(overrides: dict[str, dict[str, int]]) -> str | None:
    """A short text such as ``down_proj: W8A8; layers.0.: W8`` (None without overrides)."""
    if not overrides:
        return None
    short = {"w_bits": "W", "a_bits": "A", "k_bits": "K", "v_bits": "V"}
    parts = [f"{p}: " + "".join(f"{short[k]}{v}" for k, v in bits.items()) for p, bits in overrides.items()]
    return "; ".join(parts)


PRESETS: dict[str, dict] = {
    # method.md section 4: 128 x 2048 windows, 15 epochs, batch 4, bf16 autocast.
    "paper": {},
    # A few minutes on two CPU cores: short windows, few samples, two epochs, float32; with only eight steps per
    # block a four times larger rate and per-token asymmetric activations (SmolLM2, 2 seeds: wiki / c4 PPL
    # 45.3 / 132.7 and 43.8 / 112.8 against 57.2 / 193.3 and 62.5 / 176.8 with the paper's rate, symmetric).
    "quick": {
        "nsamples": 16,
        "seqlen": 512,
        "epochs": 2,
        "batch_size": 4,
        "autocast_dtype": "float32",
        "lr": 0.02,
        "a_symmetric": False,
    },
    # The most accurate W4A4KV4 measured on SmolLM2 (README): twice the paper's rate, four times its epochs,
    # per-token asymmetric activations; about four times the paper preset's calibration time (60 epochs over
    # six seeds: c4 0.2 and wiki 0.15 PPL below 30 epochs on average).
    "accurate": {"lr": 0.01, "a_symmetric": False, "epochs": 60},
}


# The calibration text a preset calibrates on when none is named (flatquant.data names). ``accurate`` mixes the
# Wikipedia summaries with exllamav2's short stories and technical writing in thirds: on SmolLM2 (NVIDIA H100,
# eight seeds, README) c4 0.50 PPL lower than the summaries alone in a same-run comparison of four seeds (0.40
# over all eight), wiki unchanged.
PRESET_CALIBRATION: dict[str, str] = {"accurate": "wiki-summaries+technical+tiny"}


def calibration_for(preset_name: str) -> str:
    """The default calibration text of a preset: its own mixture, else the summaries (DEFAULT_CALIBRATION)."""
    from .data import DEFAULT_CALIBRATION

    return PRESET_CALIBRATION.get(preset_name, DEFAULT_CALIBRATION)


def preset(name: str, **overrides) -> FlatQuantConfig:
    """A named preset with field overrides, e.g. ``preset("quick", w_bits=8)``."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not one of {sorted(PRESETS)}")
    return FlatQuantConfig(**{**PRESETS[name], **overrides})
