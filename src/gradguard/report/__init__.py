"""Reports from records alone: matplotlib figures and a self-contained HTML page.

``build_report(rows_or_jsonl_path, out_path)`` writes the HTML report; ``write_figures(rows,
out_dir)`` writes the PNG figures. Both need matplotlib (``pip install gradguard[report]``).
"""

from gradguard.report.figures import write_figures as write_figures
from gradguard.report.html import build_report as build_report
from gradguard.report.html import render_html as render_html
