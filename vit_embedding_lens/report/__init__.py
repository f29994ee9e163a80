"""The report of a run: tables as CSV, figures as PNG, and one ``index.html`` that shows them."""

from vit_embedding_lens.report.figures import save_figures
from vit_embedding_lens.report.html import write_index
from vit_embedding_lens.report.tables import format_headlines, headline_tables, write_tables
from vit_embedding_lens.report.write import write_report

__all__ = [
    "format_headlines",
    "headline_tables",
    "save_figures",
    "write_index",
    "write_report",
    "write_tables",
]
