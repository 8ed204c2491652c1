"""``python -m analysis report RUN_DIR [--out DIR] [--format md,csv,tex,html] [--no-plots]`` and
``python -m analysis plan RUN_DIR [--effect X]`` (seeds needed, from a pilot run; analysis/plan.py).

Also mounted as ``python -m rlhf_ablate report`` (rlhf_ablate/cli.py calls :func:`main` with ``["report", ...]``,
or mounts :func:`add_report_parser` and calls :func:`run_from_args`). Errors a user can fix (no run directory,
no result.json, unknown format) print one paragraph and exit 2, like every rlhf_ablate command.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from rlhf_ablate.errors import RlhfAblateError


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` command to an argparse subparsers object; the handler is ``args.report_handler``."""
    p = subparsers.add_parser("report", help="tables, plots and report.md from RUN_DIR/trials/*/result.json",
                              description="Build comparison tables (mean ± 95%% CI over seeds; the best value "
                                          "tested against every other, seeds as blocks), plots and report.md from "
                                          "a run directory.")
    p.add_argument("run_dir", type=Path, help="the sweep's run directory (holds trials/<trial_id>/result.json)")
    p.add_argument("--out", type=Path, default=None, help="report directory (default: RUN_DIR/report)")
    p.add_argument("--format", default="md,csv,tex,html",
                   help="comma-separated outputs among md, csv, tex, html (default: all four)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (PNG and SVG)")
    p.set_defaults(report_handler=run_from_args)
    return p


def run_from_args(args: argparse.Namespace) -> int:
    from .report import write_report

    formats = [f.strip() for f in str(args.format).split(",") if f.strip()]
    rep = write_report(args.run_dir, out=args.out, formats=formats, plots=not getattr(args, "no_plots", False))
    run = rep.run
    print(f"report: {rep.out_dir} ({len(rep.tables)} tables, {len(rep.plots)} plots; trials: "
          f"{len(run.ok_trials)} finished, {len(run.failed_trials)} failed, {len(run.pending)} pending; "
          f"{len(rep.problems)} problems)")
    return 0


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="seeds needed to separate a difference, from a pilot run",
                              description="From a pilot run: for each table's primary metric, the seeds needed to "
                                          "separate a difference (--effect, default the observed best-vs-runner-"
                                          "up gap) at 80%% power, and what they cost in compute.")
    p.add_argument("run_dir", type=Path, help="the pilot sweep's run directory")
    p.add_argument("--effect", type=float, default=None,
                   help="difference to detect, in the primary metric's units (default: the observed gap)")
    p.add_argument("--power", type=float, default=0.8, help="target power (default 0.8)")
    p.set_defaults(report_handler=_plan_from_args)
    return p


def _plan_from_args(args: argparse.Namespace) -> int:
    from .plan import plan

    if not 0 < args.power < 1:
        raise RlhfAblateError(f"--power must lie between 0 and 1, got {args.power}.")
    print(plan(args.run_dir, effect=args.effect, power=args.power), end="")
    return 0


def cli_report_runner(run_dir: Path, out_dir: Path) -> None:
    """``python -m analysis report RUN_DIR --out OUT --format csv --no-plots``, in-process and quiet: how the
    calibration (analysis/calibration.py, tests/test_calibration.py) runs its simulated sweeps."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["report", str(run_dir), "--out", str(out_dir), "--format", "csv", "--no-plots"])
    if rc != 0:
        raise RuntimeError(f"report failed on {run_dir} (exit {rc})")


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate", help="measure false-bold rates and power on simulated sweeps (minutes)",
                              description="Simulate null and real-difference sweeps and run each through this "
                                          "report; print the docs/metrics.md section of rates and power.")
    p.add_argument("--sims", type=int, default=500, help="null sweeps per cell (a tenth at one seed)")
    p.add_argument("--power-sims", type=int, default=500, help="sweeps per power cell")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(report_handler=_calibrate_from_args)
    return p


def _calibrate_from_args(args: argparse.Namespace) -> int:
    from .calibration import render_section

    print(render_section(args.sims, args.power_sims, args.seed, runner=cli_report_runner), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis",
                                     description="Turn rlhf_ablate trial results into tables, plots and a report.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_report_parser(sub)
    add_plan_parser(sub)
    add_calibrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from rlhf_ablate.run import graph  # noqa: F401 - the metrics of every method, plugins' too (run/graph.py)
        return args.report_handler(args)
    except RlhfAblateError as e:
        msg = textwrap.fill(str(e), width=110, break_long_words=False, break_on_hyphens=False)
        print(f"error: {msg}", file=sys.stderr)
        return 2
