"""Metrics: Korean-correct text metrics (:mod:`.text`), reward-model ranking metrics (:mod:`.reward`) and the
registry every table, test and doc reads (:mod:`.registry`). Pure functions of strings and numbers, no model."""

from .reward import rm_group_records, rm_metrics
from .text import CharTokenizer, KiwiTokenizer, MetricsError, TextMetrics, get_rouge_tokenizer, text_metrics

__all__ = ["CharTokenizer", "KiwiTokenizer", "MetricsError", "TextMetrics", "get_rouge_tokenizer",
           "rm_group_records", "rm_metrics", "text_metrics"]
