"""GGUF files sized for a target, with per-tensor types chosen by measured sensitivity
(docs/mix.md), one module per job:

- `target`: --target-size / --target-bpw / --fit, the bytes they leave, the targets refused.
- `candidates`: the tensors, the llama.cpp types each can take, each type's imatrix-weighted
  error by ggml's own kernels.
- `sensitivity`: gains (KLD per unit of error) from single-tensor ablations inside one loaded
  model (xvq.llamacpp.ablation), all tensors when the token budget allows, else a checked fit.
- `solve`: the knapsack, minimum predicted KLD under the byte budget.
- `write`: the whole step and the file llama.cpp's quantizer writes.
"""
from xvq.quantize.mix.candidates import (ALIGN, CANDIDATES, ROW32_CANDIDATES, SAMPLE_ROWS, TensorChoice,
                                         candidate_types, measure_errors, model_tensors, padded, sample_rows,
                                         tensor_bytes, weighted_errors)
from xvq.quantize.mix.sensitivity import (CALIBRATION_TYPE, KLD_CHUNKS, MAX_TOKENS, MIN_TOKENS, Evaluator, Plan,
                                          ablate, ablation_plan, calibration_chunks, calibration_type, fit_gains,
                                          kld, make_evaluator, quantization_delta)
from xvq.quantize.mix.solve import solve
from xvq.quantize.mix.target import (Target, check_below_source, check_reachable, largest, parse_target, smallest,
                                     tensor_budget)
from xvq.quantize.mix.write import (FTYPE_BY_BPW, KEY_MEASURED, KEY_PREDICTED, KEY_TARGET, KEY_TYPES, Mix,
                                    build_tier, bytes_written_so_far, choose_and_write, data_offset,
                                    estimated_header, header_estimate, patch_float, quantize_mix, summary,
                                    write_report)

__all__ = ["ALIGN", "CALIBRATION_TYPE", "CANDIDATES", "FTYPE_BY_BPW", "KEY_MEASURED", "KEY_PREDICTED", "KEY_TARGET",
           "KEY_TYPES", "KLD_CHUNKS", "MAX_TOKENS", "MIN_TOKENS", "ROW32_CANDIDATES", "SAMPLE_ROWS", "Evaluator",
           "Mix", "Plan", "Target", "TensorChoice", "ablate", "ablation_plan", "build_tier", "bytes_written_so_far",
           "calibration_chunks", "calibration_type", "candidate_types", "check_below_source", "check_reachable",
           "choose_and_write", "data_offset", "estimated_header", "fit_gains", "header_estimate", "kld", "largest",
           "make_evaluator", "measure_errors", "model_tensors", "padded", "parse_target", "patch_float",
           "quantization_delta", "quantize_mix", "sample_rows", "smallest", "solve", "summary", "tensor_budget",
           "tensor_bytes", "weighted_errors", "write_report"]
