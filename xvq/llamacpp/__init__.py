"""xvq's one layer over llama.cpp, below every stage: the only package that imports `llama_cpp`
or `ctypes`.

- `runtime`: load a GGUF (threads, logging and GPU offload decided here), tokenize, batched
  decode with logits for chosen positions, vocabulary-only loading, generation.
- `tap`: the compute-graph tap (cb_eval) the importance matrix is measured through.
- `quantizer`: llama.cpp's quantizer with an in-memory importance matrix.
- `gguf_file`: GGUF headers, split shards, tensor sizes.
- `quant_types`: llama.cpp's file types and what its quantizer writes for every tensor.
"""
from xvq.llamacpp.gguf_file import GgufHeader, other_shards, read_header, read_model_header, tensor_nbytes, type_bpw
from xvq.llamacpp.quant_types import QuantType, parse_ggml_type, parse_type, quant_types, tensor_types
from xvq.llamacpp.quantizer import quantize_model
from xvq.llamacpp.runtime import (Context, Gguf, chat_model, default_threads, loads, quiet, resolve_gpu_layers,
                                  set_verbose, supports_gpu_offload)
from xvq.llamacpp.tap import MatMul, MatMulTap

__all__ = ["Context", "Gguf", "GgufHeader", "MatMul", "MatMulTap", "QuantType", "chat_model",
           "default_threads", "loads", "other_shards", "parse_ggml_type", "parse_type", "quant_types",
           "quantize_model", "quiet", "read_header", "read_model_header", "resolve_gpu_layers", "set_verbose",
           "supports_gpu_offload", "tensor_nbytes", "tensor_types", "type_bpw"]
