"""Benchmarks of a trained model (`task=eval`): MMLU as the XGen-7B report's Tables 4 and 5 run it."""

from xgen.eval.mmlu import CATEGORIES, SUBCATEGORIES, evaluate, markdown_table

__all__ = ["CATEGORIES", "SUBCATEGORIES", "evaluate", "markdown_table"]
