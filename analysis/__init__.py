"""analysis: trial results (RUN_DIR/trials/*/result.json) -> comparison tables, plots and one report.

Entry points for other modules:
- ``write_report(run_dir, out=None, formats=("md","csv","tex","html"), plots=True) -> Report`` (analysis.report)
- ``build_report(run_dir) -> Report`` (tables only, nothing written)
- ``main(argv)`` / ``add_report_parser(subparsers)`` (analysis.cli)
Imports are lazy so ``import analysis`` stays cheap (no scipy or matplotlib until a report is built).
"""

__all__ = ["write_report", "build_report", "load_run"]


def __getattr__(name):
    if name in ("write_report", "build_report", "Report", "Run"):
        from . import report

        return getattr(report, name)
    if name == "load_run":  # the notebook object, with .report()
        from .report import open_run

        return open_run
    if name == "ReportError":
        from . import results

        return getattr(results, name)
    raise AttributeError(name)
