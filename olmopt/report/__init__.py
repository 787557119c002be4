"""``olmopt report``: a self-contained HTML page (index.html + PNGs beside it) about one campaign.

Input is the JSON-ready dict of ``olmopt.search.annotate.campaign_report_data``; this package draws
and writes files only (no Optuna, no model files).
"""

from __future__ import annotations

from olmopt.report.card import add_donor_map
from olmopt.report.page import write_report
from olmopt.report.plots import donor_map_png

__all__ = ["add_donor_map", "donor_map_png", "write_report"]
