"""The built-in demo model: a small XVERSE-architecture model genuinely trained on the project's
own multilingual calibration text (train split) by `python -m xvq.demo.train`; committed under
xvq/demo/model so the demo and the tests have a model whose perplexity means something."""
from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent / "model"
