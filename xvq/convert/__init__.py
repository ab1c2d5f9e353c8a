"""Stage 1: Hugging Face checkpoint → GGUF."""
from xvq.convert.convert import convert  # noqa: F401
