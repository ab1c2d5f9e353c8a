"""Stage 3: quantization. GGUF k-/i-quants through llama.cpp's own quantizer with an importance
matrix measured by xvq (xvq.quantize.gguf, xvq.quantize.imatrix); mixes sized for a target with
per-tensor types chosen by measured sensitivity (xvq.quantize.mix); GPTQ (xvq.quantize.gptq)."""
from xvq.quantize.gguf import (DEFAULT_CALIB_TOKENS, ImatrixSettings, QuantizeSettings, effective_tensor_types,
                               layout_for, make_ggufs, quantize, quantize_file, read_source)
from xvq.quantize.gptq import GptqSettings, quantize_gptq
from xvq.quantize.imatrix import Imatrix, compute_imatrix
from xvq.quantize.mix import build_tier

__all__ = ["DEFAULT_CALIB_TOKENS", "GptqSettings", "Imatrix", "ImatrixSettings", "QuantizeSettings", "build_tier", "compute_imatrix",
           "effective_tensor_types", "layout_for", "make_ggufs", "quantize", "quantize_file", "quantize_gptq",
           "read_source"]
