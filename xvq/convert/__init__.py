"""Stage 1: Hugging Face checkpoint → GGUF."""
from xvq.convert.convert import convert
from xvq.convert.writer import planned_tensors

__all__ = ["convert", "planned_tensors"]
