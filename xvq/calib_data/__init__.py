"""The multilingual calibration set: built-in text in XVERSE's 41 languages plus code, a fixed
held-out split for validation, and sampling by XVERSE-65B's language shares to a token budget."""
from xvq.calib_data.calibration import Calibration, calibration
from xvq.calib_data.corpus import ALL_LANGS, CODE, LANGUAGES, corpus_texts, heldout_texts, records
from xvq.calib_data.sample import DEFAULT_TOKENS, CalibSample, LangStat, load_extra_files, sample
from xvq.calib_data.shares import target_shares
from xvq.calib_data.tokens import TokenCounter, estimate_tokens

__all__ = ["ALL_LANGS", "CODE", "LANGUAGES", "DEFAULT_TOKENS", "CalibSample", "Calibration", "calibration", "LangStat", "TokenCounter",
           "corpus_texts", "estimate_tokens", "heldout_texts", "load_extra_files", "records", "sample",
           "target_shares"]
