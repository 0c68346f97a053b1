"""Quantised inference with bitsandbytes: the config, the quantised modules, quantize_model, and quantised files.

``cli`` (``moe-lightning quantize``) is left out here: it loads models through the engine, which reads quantised
files through this package.
"""

from moe_lightning.inference.quantization.config import QuantizationConfig
from moe_lightning.inference.quantization.experts import QuantizedExperts
from moe_lightning.inference.quantization.export import is_quantized_file, load_quantized, save_quantized
from moe_lightning.inference.quantization.formats import FLOAT_FORMAT, format_config
from moe_lightning.inference.quantization.linear import QuantizedLinear
from moe_lightning.inference.quantization.mixed import MixedPrecisionExperts
from moe_lightning.inference.quantization.quantize import (
    expert_weight_bytes,
    quantize_experts_by_format,
    quantize_model,
    weight_bytes,
)

__all__ = [
    "FLOAT_FORMAT", "MixedPrecisionExperts", "QuantizationConfig", "QuantizedExperts", "QuantizedLinear",
    "expert_weight_bytes", "format_config", "is_quantized_file", "load_quantized", "quantize_experts_by_format",
    "quantize_model", "save_quantized", "weight_bytes",
]
