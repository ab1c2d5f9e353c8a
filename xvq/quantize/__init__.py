"""Stage 3: quantization. GGUF k-/i-quants through llama.cpp's own quantizer with an importance
matrix measured by xvq (xvq.quantize.gguf, xvq.quantize.imatrix); GPTQ (xvq.quantize.gptq)."""
