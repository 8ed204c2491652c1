"""The Python API for notebooks: run a sweep and get its results back as an object, not an exit code.

    import rlhf_ablate

    res = rlhf_ablate.run_sweep("kl_coef", seeds=[0], ppo__total_episodes=64)   # a bundled sweep, or a path
    df = res.to_pandas()          # one row per trial: trial_id, index, seed, status, axes, metrics, error
    res.report()                  # tables, plots and report.md under RUN_DIR/report/

    res = rlhf_ablate.load_run("runs/kl_coef")    # the same object for a finished run (= analysis.load_run)

``run_sweep`` runs exactly what ``python -m rlhf_ablate sweep`` runs (rlhf_ablate/launch/tune.py: Ray Tune, stage
cache, resume, failure records) and returns :class:`analysis.results.RunResults`, read back from the result files
like every report, so a notebook sees what the tables see. Bad input raises :class:`rlhf_ablate.errors.ConfigError`
with the same one-paragraph message the CLI prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, TextIO, Union

from .errors import ConfigError


def run_sweep(sweep: Union[str, Path, Mapping[str, Any]], *, out: Optional[Union[str, Path]] = None,
              resume: bool = False, max_concurrent: Optional[int] = None, use_cache: bool = True,
              address: Optional[str] = None, report: bool = True, stream: Optional[TextIO] = None,
              **overrides: Any) -> Any:
    """Run (or continue) a sweep and return its :class:`~analysis.results.RunResults`.

    ``sweep``: a sweep file's path, a sweep's name (``"kl_coef"``: ./sweeps/ first, then the bundled sweeps, as on
    the command line), or its content as a dict (the same keys as the YAML). ``overrides``:

    - dotted trial keys, added to the sweep's ``base`` like ``KEY=VALUE`` on the command line; write the dot as a
      double underscore (``ppo__kl_coef=0.05``) or unpack a dict (``**{"ppo.kl_coef": 0.05}``);
    - top-level sweep keys (``seeds=[0]``, ``name="kl_small"``, ``axes={...}``, ``tracking={"wandb":
      "disabled"}``), which replace the file's value.

    The other arguments are those of the ``sweep`` command (``out`` = ``--out``, default ``runs/<name>``; ``address``
    defaults to ``$RAY_ADDRESS``). Failed trials do not raise: their rows say ``failed`` and why."""
    import os
    import sys

    from analysis.report import open_run as load_run
    from .config.sweep import SWEEP_KEYS, parse_sweep, read_sweep
    from .launch.tune import run_sweep as drive
    from .rundir import run_dir_for

    trial_keys, sweep_keys = _split_overrides(overrides, SWEEP_KEYS)
    if isinstance(sweep, Mapping):
        if "include" in sweep:
            raise ConfigError("run_sweep: `include` works in sweep files only (paths are relative to the file); "
                              "pass the file's path, or merge the base into the dict yourself.")
        raw, source = dict(sweep), "<run_sweep dict>"
    else:
        from .config.sweep_files import resolve_sweep_file

        found = resolve_sweep_file(sweep)  # a path, or a sweep's name: ./sweeps/ first, then the bundled ones
        if found.note:
            print(found.note, file=stream or sys.stderr)
        raw, source = read_sweep(found.path), str(found.path)
    raw.update(sweep_keys)
    spec = parse_sweep(raw, source, trial_keys)
    run_dir = run_dir_for(spec, Path(out) if out is not None else None)
    drive(spec, run_dir, resume=resume, max_concurrent=max_concurrent, use_cache=use_cache,
          address=address or os.environ.get("RAY_ADDRESS"), report=report, stream=stream)
    return load_run(run_dir)


def load_run(run_dir: Union[str, Path]) -> Any:
    """The results of a run directory (``analysis.load_run``): the object :func:`run_sweep` returns."""
    from analysis.report import open_run as load

    return load(run_dir)


def _split_overrides(overrides: Mapping[str, Any], sweep_keys: tuple[str, ...]) -> tuple[dict, dict]:
    from .config import all_keys, suggest

    trial, sweep = {}, {}
    for key, value in overrides.items():
        dotted = key.replace("__", ".")
        if dotted in sweep_keys and dotted != "include":
            sweep[dotted] = value
        elif dotted in all_keys():
            trial[dotted] = value
        else:
            top = ", ".join(k for k in sweep_keys if k != "include")
            raise ConfigError(f"run_sweep: unknown override '{key}'.{suggest(dotted, [*all_keys(), *sweep_keys])} "
                              f"Trial settings are dotted keys (ppo__kl_coef=0.05 or **{{'ppo.kl_coef': 0.05}}); "
                              f"sweep settings are top-level keys ({top}).")
    return trial, sweep
