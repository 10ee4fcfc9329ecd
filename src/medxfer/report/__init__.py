"""Reports derived from the run records: figures, tables, overlays and one self-contained HTML file.

``write_report(results_dir)`` is the entry point (``medxfer report RESULTS_DIR``).
"""

from medxfer.report.html import findings, write_report
from medxfer.report.tables import downstream_table, load_robustness, paired_comparison, paired_test, summary_table

__all__ = ["write_report", "findings", "downstream_table", "load_robustness", "paired_comparison", "paired_test",
           "summary_table"]
