"""Results tables and plots from the records on disk (`python -m runners.report`, runners/report/cli.py).

runs: finding the records and laying them out per run; statistics: means and standard errors over seeds;
tables: markdown / LaTeX / cost tables and the failures; plots: PNGs; cli: the report text and the command.
The names below are the report's API (tests, notebooks).
"""
from runners.report.cli import compare_text, main, render
from runners.report.plots import plot
from runners.report.runs import Runs, group_columns, load_runs, metric_names, runs_frame, setting_id
from runners.report.statistics import baseline_marks, combined_se, summarize
from runners.report.tables import cost_table, display_table, root_cause, to_latex, to_markdown

__all__ = ["Runs", "baseline_marks", "combined_se", "compare_text", "cost_table", "display_table", "group_columns",
           "load_runs", "main", "metric_names", "plot", "render", "root_cause", "runs_frame", "setting_id", "summarize",
           "to_latex", "to_markdown"]
