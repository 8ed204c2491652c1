"""``python -m rlhf_ablate {sweep,sweeps,doctor,trial,slurm,data,report,chat}``: the only module that knows about argparse.

Every command exits 2 with a one-paragraph message on bad input (any RlhfAblateError, an unreadable or unwritable
path) and writes nothing partial: no traceback, at most MAX_ERROR_LINES lines, the key, file or row named.
Heavy imports (torch, ray) happen inside the commands, so ``--help`` answers at once.

Before any GPU-second is spent, ``sweep --dry-run``, ``sweep`` and ``trial`` run the same pre-flight checks
(:func:`preflight`): every distinct data source exists and its first rows parse, every distinct base model resolves
(failing within seconds when the hub cannot be reached). ``trial`` also reads its data in full before it starts
the tracker, and says why a trial failed: error class, stage, message and the path to the traceback (exit 1).

``sweep``, ``trial`` and ``slurm`` take a path or the name of a sweep (``lora_rank`` or ``lora_rank.yaml``: from
./sweeps/ first, then the bundled sweeps; rlhf_ablate/config/sweep_files.py) and say on stderr which file a name
was resolved to; ``sweeps`` lists the bundled ones.
"""

from __future__ import annotations

import argparse, contextlib, json, os, sys, textwrap  # noqa: E401 - the standard library, one line
from pathlib import Path
from typing import Any, Iterator

from .errors import RlhfAblateError
from .rundir import result_path, run_dir_for

MAX_ERROR_LINES = 6


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_file", help="sweep YAML path, or a sweep's name (lora_rank or lora_rank.yaml: ./sweeps/ "
                                      "first, then the bundled sweeps; list them with `sweeps`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides added to the sweep's base, e.g. model.base_model=meta-llama/Llama-3.2-1B")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<sweep name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_ablate",
        description="RLHF hyperparameter ablations: SFT -> reward model -> PPO/DPO per trial, Ray Tune or SLURM "
                    "to run the grid, and comparison tables with confidence intervals.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("sweep", help="run every trial of a sweep file with Ray Tune")
    _add_sweep_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the trial table and start nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped sweep (rerunning the same command does the same: finished trials are "
                        "never rerun)")
    p.add_argument("--max-concurrent", type=int, default=None, help="at most N trials at once")
    p.add_argument("--no-cache", action="store_true", help="recompute every stage instead of reusing artifacts")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local Ray)")
    p.add_argument("--no-report", action="store_true", help="do not write RUN_DIR/report at the end")

    sub.add_parser("sweeps", help="list the bundled sweeps with their descriptions")

    p = sub.add_parser("doctor", help="before a long sweep: versions, bf16/4-bit, one micro-batch of every phase of "
                                      "its largest trial, decode tokens/s, a device-hours forecast (minutes)")
    p.add_argument("sweep_file", nargs="?", default="kl_coef", help="sweep YAML path or name (default: kl_coef)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for `sweep`")

    p = sub.add_parser("trial", help="run one trial, or one trial group, of a sweep (what a SLURM array task runs)")
    _add_sweep_args(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, help="trial index, 0-based, as in `sweep --dry-run`")
    which.add_argument("--group", type=int, help="trial group index, 0-based (g<n> in `sweep --dry-run`): run its "
                                                 "members one after another, their PPO stages trained together")
    p.add_argument("--group-size", type=int, default=None, help="with --group: K as `slurm` resolved "
                                                                "resources.group_size (auto) when it wrote the array")
    p.add_argument("--no-cache", action="store_true", help="recompute every stage")

    p = sub.add_parser("slurm", help="write (and with --submit, submit) the sbatch array and report jobs")
    _add_sweep_args(p)
    p.add_argument("--submit", action="store_true", help="submit with sbatch and print the job ids")
    for opt in ("partition", "account", "time", "qos"):
        p.add_argument(f"--{opt}", default=None, help=f"SLURM {opt} (overrides the sweep's slurm.{opt})")
    p.add_argument("--max-concurrent", type=int, default=None, help="array throttle %%K")

    _add_data_parser(sub)

    p = sub.add_parser("chat", help="talk to a trial's model (base, SFT or the aligned policy), as eval generates")
    p.add_argument("run_dir", type=Path, help="the sweep's run directory, e.g. runs/lora_rank")
    p.add_argument("--trial", required=True, help="trial id (or a unique prefix), as in the summary table")
    p.add_argument("--stage", default=None,
                   help="which model: base, sft or a method of the stage graph (rlhf_ablate/run/graph.py: "
                        "policy_stages; default: the trial's method). A stage the trial does not have is refused "
                        "with the list of those it has.")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit (for scripts)")
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' warnings, log lines and progress bars (hidden by default)")

    p = sub.add_parser("report", help="tables, plots and report.md from RUN_DIR/trials/*/result.json")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="report directory (default: RUN_DIR/report)")
    return parser


def _add_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="Data versions: EDA numbers (stats) or cleaned files (prepare).")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{stats,prepare}")
    for name, help_ in (("stats", "Counts, lengths, length-by-rank, duplicates and the cleaning report."),
                        ("prepare", "Write a cleaned version in KoChatGPT JSONL format plus cleaning_report.json.")):
        s = sub.add_parser(name, help=help_)
        # Unset options keep data.*'s defaults (rlhf_ablate/config/schema.py: DataConfig, their one home).
        s.add_argument("--source", default=None, help="'ko_sample' (the default), a directory of data files, a data "
                       "file (JSON, Parquet, CSV), a save_to_disk directory or a Hub dataset id.")
        s.add_argument("--version", default="v2" if name == "prepare" else "v1", help="v1, v2 or a custom name.")
        s.add_argument("--format", default=None, help="auto (the default), kochatgpt, aihub, hf_pref, hh or messages.")
        s.add_argument("--columns", default=None, metavar="OURS=YOURS,...",
                       help="Map your column names onto ours, e.g. prompt=instruction,completion=output.")
        s.add_argument("--skip-bad-rows", action="store_true", help="Skip and count malformed rows.")
        s.add_argument("--filters", default=None,
                       help="Comma-separated filters defining --version as a custom version, e.g. nfc,dedup_exact.")
        for kind in ("sft", "rm", "ppo", "eval"):
            s.add_argument(f"--{kind}-file", default=None, help=f"{kind} file relative to --source (or a split).")
        s.add_argument("--split-seed", type=int, default=None, help="Seed of the stable RM train/eval split "
                       "(default: data.split_seed's).")
        s.add_argument("--eval-fraction", type=float, default=None, help="Fraction of RM groups held out "
                       "(default: data.eval_fraction's).")
        if name == "stats":
            s.add_argument("--json", action="store_true", help="Print the numbers as JSON.")
        else:
            s.add_argument("--out", required=True, help="Output directory (written atomically).")
            s.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    return p


def _data_config(args: argparse.Namespace) -> Any:
    from .config import build_trial_config

    custom = {}
    if args.filters:
        custom[args.version] = [f.strip() for f in args.filters.split(",") if f.strip()]
    given = {"source": args.source, "format": args.format, "split_seed": args.split_seed,
             "eval_fraction": args.eval_fraction}
    d = {"version": args.version, "custom_versions": custom, "skip_bad_rows": args.skip_bad_rows,
         **{k: v for k, v in given.items() if v is not None}}
    if args.columns:
        pairs = [x.split("=", 1) for x in args.columns.split(",") if x.strip()]
        if any(len(p) != 2 for p in pairs):
            from .errors import ConfigError

            raise ConfigError(f"--columns {args.columns!r} must look like ours=yours,..., e.g. "
                              f"prompt=instruction,completion=output.")
        d["columns"] = {k.strip(): v.strip() for k, v in pairs}
    for kind in ("sft", "rm", "ppo", "eval"):
        if getattr(args, f"{kind}_file"):
            d[f"{kind}_file"] = getattr(args, f"{kind}_file")
    return build_trial_config({"data": d}, "<command line>").data  # same validation as a sweep file


def cmd_data(args: argparse.Namespace) -> int:
    from .data import load_data
    from .data.prepare import prepare
    from .data.stats import compute_stats, format_stats

    cfg = _data_config(args)
    if args.data_command == "stats":
        s = compute_stats(load_data(cfg))
        print(json.dumps(s, ensure_ascii=False, indent=2) if args.json else format_stats(s))
        return 0
    out = prepare(cfg, Path(args.out), overwrite=args.overwrite)
    print(f"wrote {cfg.version} of {cfg.source} to {out}")
    from .data.stats import format_dropped
    from .files import read_json

    print(format_dropped(read_json(out / "cleaning_report.json")))
    return 0


def preflight(spec: Any, trials: list, rows: int | None = 20) -> list[str]:
    """What can be checked before any GPU-second: each distinct data source exists and parses (its first `rows`
    rows for a dry run, rlhf_ablate/data/sources.py: check_source; every row before a real sweep, `rows=None`),
    each distinct base model resolves (rlhf_ablate/models/loading.py: check_base, a few seconds at most without
    network), PPO's gold probe has its prompts (run/trial.py). Raises the first problem; one line per check."""
    from .data import check_source, read_sources
    from .files import canonical_json
    from .run.trial import probe_prompt_checks

    lines: list[str] = []
    seen: set[str] = set()
    for t in trials:
        d = t.config.data
        key = canonical_json([d.source, d.format, d.columns, d.sft_file, d.rm_file, d.ppo_file, d.eval_file,
                              d.skip_bad_rows])
        if key not in seen:
            seen.add(key)
            if rows is None:  # parse every row (no cleaning): a bad row anywhere stops the sweep before it starts
                results, notes = read_sources(d)
                lines.append(f"data {d.source}: " + "; ".join(f"{k} {notes.get(k, r.path)} ({r.rows} rows)"
                                                               for k, r in results.items() if r is not None))
            else:
                lines.append(f"data {d.source}: {check_source(d, rows)}")
    lines.extend(probe_prompt_checks(trials))
    models = {}
    for t in trials:
        models.setdefault((t.config.model.base_model, t.config.model.revision), t.config.model)
    from .config import BUILTIN_MODELS

    if any(m.base_model not in BUILTIN_MODELS for m in models.values()):
        from .models.loading import check_base

        for m in models.values():
            lines.append(f"model {m.base_model}: {check_base(m)}")
    else:
        lines.extend(f"model {m.base_model}: built-in" for m in models.values())
    return lines


def resolve_sweep_arg(args: argparse.Namespace) -> None:
    """Turn ``args.sweep_file`` (a path or a sweep's name) into the file it means, and say which one on stderr
    when that is not the path as typed (rlhf_ablate/config/sweep_files.py)."""
    from .config.sweep_files import resolve_sweep_file

    found = resolve_sweep_file(args.sweep_file)
    if found.note:
        print(found.note, file=sys.stderr)
    args.sweep_file = str(found.path)


def cmd_sweeps(args: argparse.Namespace) -> int:
    from .config.sweep_files import list_bundled

    print(list_bundled())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .config import parse_cli_overrides
    from .config.sweep import expand, load_sweep

    resolve_sweep_arg(args)
    spec = load_sweep(args.sweep_file, parse_cli_overrides(args.overrides))
    trials = expand(spec)
    checks = preflight(spec, trials, rows=20 if args.dry_run else None)
    if args.dry_run:
        from .launch.resources import dry_run_columns
        from .run.forecast import forecast_column

        print(f"sweep {spec.name} (version {spec.version}): {len(trials)} trials"
              + (f"; Optuna samples {spec.search.num_samples} more from {sorted(spec.search.space)}"
                 if spec.search.type == "optuna" else ""))
        print(trial_table(trials, {**dry_run_columns(spec, trials), **forecast_column(spec, trials)}))
        for line in checks:
            print(f"checked {line}")
        print(f"run directory: {run_dir_for(spec, args.out)}  (nothing started: --dry-run)")
        return 0
    from .launch.tune import run_sweep

    return run_sweep(spec, run_dir_for(spec, args.out), resume=args.resume, max_concurrent=args.max_concurrent,
                     use_cache=not args.no_cache, address=args.address or os.environ.get("RAY_ADDRESS"),
                     report=not args.no_report)


def cmd_doctor(args: argparse.Namespace) -> int:
    import tempfile

    from .config import parse_cli_overrides
    from .config.sweep import expand, load_sweep
    from .run.doctor import run_doctor

    resolve_sweep_arg(args)
    spec = load_sweep(args.sweep_file, parse_cli_overrides(args.overrides))
    trials = expand(spec)
    preflight(spec, trials)
    with tempfile.TemporaryDirectory(prefix="rlhf_ablate_doctor_") as work:
        return run_doctor(spec, trials, Path(work))


def cmd_trial(args: argparse.Namespace) -> int:
    from .config import parse_cli_overrides
    from .config.sweep import expand, load_sweep
    from .launch.slurm import run_tasks, task_trials
    from .rundir import FINISHED, read_result

    resolve_sweep_arg(args)
    spec = load_sweep(args.sweep_file, parse_cli_overrides(args.overrides))
    spec, members = task_trials(spec, expand(spec), index=args.index, group=args.group, group_size=args.group_size,
                                source=args.sweep_file)
    run_dir = run_dir_for(spec, args.out)
    members = [t for t in members if (read_result(run_dir, t.trial_id) or {}).get("status") not in FINISHED]
    if not members:
        return 0  # resume, or a requeued SLURM task: nothing to check or rerun
    preflight(spec, members)
    from .data import load_data

    data = load_data(members[0].config.data)  # all of it: a bad row anywhere is bad input (exit 2), not a failure
    failed = 0
    for t, result in zip(members, run_tasks(spec, members, run_dir, use_cache=not args.no_cache, data=data)):
        if result.get("status") not in ("ok", "stopped"):
            failed += 1
            _print_failure(run_dir, t, result.get("error") or {})
    return 1 if failed else 0


def _print_failure(run_dir: Path, trial: Any, err: dict) -> None:
    tb = result_path(run_dir, trial.trial_id).parent / "error.txt"
    msg = " ".join(str(err.get("message", "")).split())
    msg = msg if len(msg) <= 400 else msg[:399] + "…"
    print(f"trial {trial.index} ({trial.trial_id}) failed at stage {err.get('stage', '?')}: "
          f"{err.get('type', 'Error')}: {msg}", file=sys.stderr)
    print(f"traceback: {tb}" if tb.is_file() else f"result: {result_path(run_dir, trial.trial_id)}", file=sys.stderr)


def cmd_slurm(args: argparse.Namespace) -> int:
    from .launch.slurm import slurm_command

    resolve_sweep_arg(args)
    return slurm_command(args.sweep_file, args.overrides, out=args.out, submit_jobs=args.submit,
                         partition=args.partition, account=args.account, qos=args.qos, time_limit=args.time,
                         max_concurrent=args.max_concurrent)


# Libraries whose log records chat hides without --verbose (their warnings go through `warnings`, also hidden).
NOISY_LOGGERS = ("transformers", "peft", "accelerate", "bitsandbytes", "torch", "huggingface_hub", "datasets", "trl",
                 "kiwipiepy")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep third-party noise out of what chat prints (issue 19): the weight-loading bar and hub download bars,
    Python warnings (bitsandbytes' missing kernels, peft, torch) and the libraries' log records below ERROR. Only
    the answer goes to stdout; our own messages and errors are unaffected. ``chat --verbose`` skips this. Everything
    is restored on exit, so an in-process caller (a test, a notebook) keeps its warnings and bars."""
    import logging
    import warnings

    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1",  # read when huggingface_hub is imported
           "TRANSFORMERS_VERBOSITY": "error",  # read when transformers configures its logger
           "TQDM_DISABLE": "1"}  # any other tqdm bar
    saved_env = {k: os.environ.get(k) for k in env}
    loggers = {name: logging.getLogger(name) for name in NOISY_LOGGERS}
    saved_levels = {name: lg.level for name, lg in loggers.items()}
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars_off, hf_bars_on, hf_level = (are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled(),
                                          hf_logging.get_verbosity())
    os.environ.update(env)
    for lg in loggers.values():
        lg.setLevel(logging.ERROR)
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, lg in loggers.items():
            lg.setLevel(saved_levels[name])
        if not hub_bars_off:
            enable_progress_bars()
        hf_logging.set_verbosity(hf_level)
        if hf_bars_on:
            hf_logging.enable_progress_bar()


def cmd_chat(args: argparse.Namespace) -> int:
    with contextlib.nullcontext() if args.verbose else quiet_libraries():
        return _chat(args)


def _chat(args: argparse.Namespace) -> int:
    from .run.chat import answer, find_trial, load_stage

    result = find_trial(args.run_dir, args.trial)
    model, tok, cfg, stage = load_stage(args.run_dir, result, args.stage)
    if args.prompt is not None:
        answer(model, tok, cfg, args.prompt, sys.stdout)
        return 0
    print(f"trial {result['trial_id']}, {stage} model. Type a question; an empty line or Ctrl-D ends.",
          file=sys.stderr)
    while True:
        try:
            line = input("질문> ").strip()
        except EOFError:
            break
        if not line or line in ("exit", "quit"):
            break
        answer(model, tok, cfg, line, sys.stdout)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.cli import main as report_main

    argv = [str(args.run_dir)] + (["--out", str(args.out)] if args.out else [])
    return report_main(["report", *argv])


def _bad_input(text: str) -> int:
    """One paragraph on stderr, exit 2. Never more than MAX_ERROR_LINES lines (a long message is cut, not a wall)."""
    lines = textwrap.wrap(" ".join(text.split()), width=110, break_long_words=False, break_on_hyphens=False)
    if len(lines) > MAX_ERROR_LINES:
        lines = lines[:MAX_ERROR_LINES]
        lines[-1] = lines[-1][:105] + " …"
    print("error: " + "\n".join(lines), file=sys.stderr)
    return 2


def trial_table(trials: list, extra: dict[str, list[str]] | None = None) -> str:
    """Plain-text table for ``sweep --dry-run``: index, id, seed, axis values (and any extra columns)."""
    names = list(dict.fromkeys(k for t in trials for k in t.axes))
    header = ["#", "trial_id", "seed"] + names + list(extra or {})
    rows = [[str(t.index), t.trial_id, str(t.seed)] + [str(t.axes.get(n, "")) for n in names]
            + [col[i] for col in (extra or {}).values()] for i, t in enumerate(trials)]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may come after options too (`trial S.yaml --index 1 ppo.kl_coef=0.1`); argparse alone
    # would take them only before the first option.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"sweep": cmd_sweep, "sweeps": cmd_sweeps, "trial": cmd_trial, "slurm": cmd_slurm,
                "report": cmd_report, "data": cmd_data, "chat": cmd_chat, "doctor": cmd_doctor}
    try:
        if args.command != "data":
            from .run import graph  # noqa: F401 - every method of the stage graph, plugins' too, is known from here
        return handlers[args.command](args)
    except RlhfAblateError as e:
        return _bad_input(str(e))
    except OSError as e:  # a path we cannot read or write (permissions, a full disk): the user's to fix
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return _bad_input(f"{e.strerror or e}{where}.")
    except KeyboardInterrupt:
        print("interrupted: finished trials and stages are kept; rerun the same command to continue.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
