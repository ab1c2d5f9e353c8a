"""Validate: score every artifact (GGUF, GPTQ) against the bf16 reference, one report, a release gate.

    from xvq.validate import validate, load_report
    report = validate("XVERSE-13B-Chat", ["q4_k_m.gguf", "XVERSE-13B-Chat-GPTQ-Int4"], report_dir="out/x/validate")
    report.passed, report.failures()
"""
from xvq.validate.core import Report, validate
from xvq.validate.metrics import full_kld, log_sum_exp
from xvq.validate.report import SCHEMA_VERSION, load_report, markdown
from xvq.validate.tokparity import compare_tokenization, parity_sample

__all__ = ["Report", "SCHEMA_VERSION", "compare_tokenization", "full_kld", "load_report", "log_sum_exp", "markdown",
           "parity_sample", "validate"]
