"""Stage 1 (after the calibration set): Hugging Face checkpoint → GGUF, the layout's stamped f16
that later stages start from, and the tokenizer parity of a converted vocabulary."""
from xvq.convert.convert import convert
from xvq.convert.layout_f16 import layout_f16, source_gguf
from xvq.convert.tokparity import chunks as parity_chunks
from xvq.convert.tokparity import compare_tokenization, compare_tokenizers, hf_tokenizer, parity_sample
from xvq.convert.writer import planned_tensors

__all__ = ["compare_tokenization", "compare_tokenizers", "convert", "hf_tokenizer", "layout_f16", "parity_chunks",
           "parity_sample", "planned_tensors", "source_gguf"]
