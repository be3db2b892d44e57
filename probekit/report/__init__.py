"""Tables, plots and the report directory built from a sweep's results.

``build_report(RES, REP)`` writes ``REP/summary.json``, ``REP/report.md``, one CSV per table and
PNG plots; see :mod:`probekit.report.build`.
"""

from probekit.entry import entry_package
from probekit.report.build import build_report
from probekit.report.tables import Headline, Results, choose_headline, load_results

__all__ = ["Headline", "Results", "build_report", "choose_headline", "load_results"]

entry_package(__name__, "probekit.report.compare", "report")  # probekit.report(...) calls probekit.report.compare.report
