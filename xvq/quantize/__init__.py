"""Stage 3: quantization. GGUF k-/i-quants through llama.cpp's own quantizer with an importance
matrix measured by xvq (xvq.quantize.gguf, xvq.quantize.imatrix); GPTQ (xvq.quantize.gptq)."""
from xvq.quantize.gguf import (DEFAULT_CALIB_TOKENS, effective_tensor_types, layout_for, make_ggufs, quantize,
                               quantize_file, read_source, source_gguf)
from xvq.quantize.gptq import GptqSettings, quantize_gptq
from xvq.quantize.imatrix import Imatrix, compute_imatrix

__all__ = ["DEFAULT_CALIB_TOKENS", "GptqSettings", "Imatrix", "compute_imatrix", "effective_tensor_types",
           "layout_for", "make_ggufs", "quantize", "quantize_file", "quantize_gptq", "read_source",
           "source_gguf"]
