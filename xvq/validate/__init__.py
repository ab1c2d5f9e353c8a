"""Validate: score every artifact (GGUF, GPTQ) against the bf16 reference, one report, a release gate.

    from xvq.validate import validate, load_report
    report = validate("XVERSE-13B-Chat", ["q4_k_m.gguf", "XVERSE-13B-Chat-GPTQ-Int4"], report_dir="out/x/validate")
    report.passed, report.failures()
"""
from xvq.validate.core import Report, ValidateSettings, validate
from xvq.validate.report import SCHEMA_VERSION, load_report, markdown

__all__ = ["Report", "SCHEMA_VERSION", "ValidateSettings", "load_report", "markdown", "validate"]
