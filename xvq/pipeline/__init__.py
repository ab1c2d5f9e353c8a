"""Where the stages meet: `xvq release` runs calib_data → convert → quantize → validate → release
(packaging) in that order. No stage imports this package or a later stage
(tests/test_architecture.py)."""
from xvq.pipeline.release import DEFAULT_GGUF_TYPES, DEFAULT_GPTQ_BITS, ReleaseResult, release

__all__ = ["DEFAULT_GGUF_TYPES", "DEFAULT_GPTQ_BITS", "ReleaseResult", "release"]
