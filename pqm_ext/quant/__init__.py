"""Block-wise weight quantisation (bitsandbytes NF4/FP4, and a uniform int-k baseline) of ESPnet models."""
from pqm_ext.quant.cache import dequant_cache, set_dequant_cache
from pqm_ext.quant.checkpoint import (architecture_fingerprint, load_quantized, read_metadata,
                                      save_quantized)
from pqm_ext.quant.config import QuantConfig
from pqm_ext.quant.quantize import quantize_model, select_layers
from pqm_ext.quant.report import SizeReport, size_report, write_size_report

__all__ = ["QuantConfig", "quantize_model", "select_layers", "size_report", "SizeReport", "write_size_report", "save_quantized",
           "load_quantized", "read_metadata", "architecture_fingerprint", "dequant_cache", "set_dequant_cache"]
