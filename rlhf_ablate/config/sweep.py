"""Sweep files declare; a pure function expands.

A sweep file (YAML, read with a ``yaml.SafeLoader`` that refuses duplicate keys)::

    name: kl_coef                # run directory name: runs/<name>
    version: 1                   # bump when you change the file's meaning
    include: base.yaml           # optional: shared bases, merged first (lm-eval-harness style); beside this
                                 # file, else a bundled sweep of that name (config/sweep_files.py)
    base:                        # dotted-key overrides of the TrialConfig defaults
      model.base_model: tiny-llama
    axes:                        # the grid
      ppo.kl_coef: [0.01, 0.1, 1.0]
      lora_rank:                 # a tied axis: its keys move together
        keys: [sft.lora_rank, rm.lora_rank]
        values: [0, 8, 16]       # or per-key lists: [[0, 0], [8, 8]]
    seeds: [0, 1, 2]
    overrides:                   # per-value overrides, applied after the axes
      - when: {sft.lora_rank: 0}
        set: {model.quantization: none}
    search: {type: grid}         # or {type: optuna, metric: ppo/reward_mean, mode: max, num_samples: 8, space: ...}
    scheduler: {type: none}      # or {type: asha, metric: ppo/objective/scores, mode: max, grace_period: 2}
    resources: {gpu: auto, cpu: 2}
    tracking: {wandb: offline, project: rlhf_ablate}
    slurm: {partition: gpu, time: "04:00:00", max_concurrent: 4}
    analysis:                    # how the report tests (issue 18; docs/architecture.md, "Statistics in the tables")
      primary: {rm: kendall_tau, sft: rougeL, aligned: rougeL}   # the question each table answers
      family: table              # or report: the 5% holds for the whole report, not for each table

``expand(spec)`` turns this into complete, validated :class:`Trial` objects with stable ids, and rejects
infeasible combinations and duplicate trials before anything starts.

The module is one coherent job, hence its length: the sweep file's sections, reading them (includes, the checks
that name the key and file) and expanding them into trials.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from ..errors import ConfigError
from ..metrics.registry import all_metric_names, known_metric
from .fields import build_dataclass, flatten, read_yaml_file, suggest
from .schema import SEED_MAX, TrialConfig, all_keys, apply_overrides, build_trial_config
from .sections import check_resources, ResourceSpec, SchedulerSpec, SearchSpec, SlurmSpec, TrackingSpec
from .sweep_files import resolve_include


@dataclass(frozen=True)
class AnalysisSpec:
    """How the report tests (analysis/settings.py reads it back from the sweep file named in sweep.json)."""
    primary: dict = field(default_factory=dict)  # table (rm, sft, aligned) -> metric suffix; unset: the defaults
    family: Literal["table", "report"] = "table"  # per-table 5% for each primary question, or 5% for the report


ANALYSIS_TABLES = ("rm", "sft", "aligned")  # aligned: the table of the alignment method(s), whichever ran

SWEEP_KEYS = ("name", "version", "description", "include", "base", "axes", "seeds", "overrides", "search",
              "scheduler", "resources", "tracking", "slurm", "cache_dir", "max_concurrent", "analysis")


@dataclass(frozen=True)
class Axis:
    name: str
    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]  # one tuple per value, one entry per key


@dataclass(frozen=True)
class Override:
    when: dict
    set: dict


@dataclass(frozen=True)
class SweepSpec:
    name: str
    version: int
    path: str
    base: dict
    axes: tuple[Axis, ...]
    seeds: tuple[int, ...]
    overrides: tuple[Override, ...]
    search: SearchSpec
    scheduler: SchedulerSpec
    resources: ResourceSpec
    tracking: TrackingSpec
    slurm: SlurmSpec
    cache_dir: Optional[str] = None
    max_concurrent: int = 0  # 0 = as many as resources allow
    description: str = ""
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)

    def trial(self, values: Mapping[str, Any], seed: int, index: int, axes: Mapping[str, Any]) -> "Trial":
        """One trial from the base, axis values (dotted keys), seed and the conditional overrides."""
        src = f"{self.path}: trial {index} ({_fmt_axes(axes, seed)})"
        d = apply_overrides(apply_overrides(default_dict(), self.base, self.path), values, src)
        d["seed"] = seed
        flat = flatten(d)
        for ov in self.overrides:
            if all(_same(flat.get(k), v) for k, v in ov.when.items()):
                d = apply_overrides(d, ov.set, src)
        cfg = build_trial_config(d, src)
        return Trial(index=index, config=cfg, axes=dict(axes), seed=seed)


@dataclass(frozen=True)
class Trial:
    index: int
    config: TrialConfig
    axes: dict
    seed: int

    @property
    def trial_id(self) -> str:
        return self.config.trial_id


def default_dict() -> dict:
    return TrialConfig().to_dict()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b))
    return a == b


def _fmt_axes(axes: Mapping[str, Any], seed: int) -> str:
    return ", ".join([f"{k}={v}" for k, v in axes.items()] + [f"seed={seed}"])


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------

def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    raw = read_yaml_file(path, "sweep file" if not chain else "included file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file must be a mapping with at least `name` and `axes`.")
    for k in raw:
        if k not in SWEEP_KEYS:
            raise ConfigError(f"{path}: unknown top-level key '{k}'.{suggest(str(k), list(SWEEP_KEYS))} "
                              f"Top-level keys: {', '.join(SWEEP_KEYS)}. Trial settings go under `base:` as "
                              f"dotted keys.")
    includes = raw.pop("include", None)
    if includes is None:
        return raw
    incs = [includes] if isinstance(includes, str) else includes
    if not isinstance(incs, list) or not all(isinstance(i, str) and i.strip() for i in incs):
        raise ConfigError(f"{path}: 'include' must be a file name or a list of file names (relative to the sweep "
                          f"file, or a bundled sweep's name), got {includes!r}.")
    merged: dict = {}
    for inc in incs:
        p = resolve_include(path, inc)
        if p in chain:
            raise ConfigError(f"{path}: include cycle through {p}.")
        merged = _merge(merged, _read_yaml(p, chain + (path.resolve(),)))
    return _merge(merged, raw)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if (k in ("base", "search", "scheduler", "resources", "tracking", "slurm", "analysis") and isinstance(v, dict)
                and isinstance(out.get(k, {}), dict)):
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


def read_sweep(path: str | Path) -> dict:
    """The raw mapping of a sweep file, its includes merged: what :func:`load_sweep` validates (the notebook API
    replaces top-level keys in it, rlhf_ablate/api.py)."""
    return _read_yaml(Path(path))


def load_sweep(path: str | Path, cli_overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep file. ``cli_overrides`` (dotted keys) are added to ``base``."""
    path = Path(path)
    raw = _read_yaml(path)
    return parse_sweep(raw, str(path), cli_overrides)


# The run directory is runs/<name>: a plain directory name (letters, digits, '_', '-', '.'; not starting with '.'
# or '-'), so `name: ..` or `name: /tmp` cannot turn the current or another directory into the run directory.
_PLAIN_NAME = re.compile(r"\w[\w.\-]{0,99}")


def parse_sweep(raw: Mapping[str, Any], source: str, cli_overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    name = raw.get("name")
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ConfigError(f"{source}: 'name' must be a plain directory name (letters, digits, '_', '-' and '.', "
                          f"not starting with '.' or '-', at most 100 characters): the run directory is "
                          f"runs/<name>. Got {name!r}.")
    version = raw.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**31:
        raise ConfigError(f"{source}: 'version' must be a non-negative integer, got {version!r}.")
    if not isinstance(raw.get("base") or {}, Mapping):
        raise ConfigError(f"{source}: 'base' must be a mapping of dotted keys (key: value lines, e.g. "
                          f"ppo.kl_coef: 0.05), got a {type(raw.get('base')).__name__}.")
    base = dict(raw.get("base") or {})
    base.update(cli_overrides or {})
    if "seed" in base:  # it would be replaced by each of `seeds` without a word
        raise ConfigError(f"{source}: base: 'seed' is set by the top-level `seeds:` list (one trial per seed); "
                          f"remove it from base and write seeds: [{base['seed']}].")
    # Validate the base alone first (keys and types), so a typo is reported against `base`, not against trial 0.
    build_dataclass(TrialConfig, apply_overrides(default_dict(), base, f"{source}: base"), f"{source}: base")

    axes = _parse_axes(raw.get("axes") or {}, source)
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise ConfigError(f"{source}: 'seeds' must be a non-empty list of integers, got {seeds!r}.")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: 'seeds' lists a seed twice: {seeds}.")
    out_of_range = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if out_of_range:
        raise ConfigError(f"{source}: 'seeds' must lie in [0, 2**32 - 1] (numpy's seed range), got "
                          f"{out_of_range[0]}.")

    overrides = []
    if not isinstance(raw.get("overrides") or [], list):
        raise ConfigError(f"{source}: 'overrides' must be a list of {{when: {{...}}, set: {{...}}}} entries.")
    for i, ov in enumerate(raw.get("overrides") or []):
        if not isinstance(ov, Mapping) or set(ov) != {"when", "set"}:
            raise ConfigError(f"{source}: overrides[{i}] must have exactly the keys `when` and `set`, got "
                              f"{ov!r}.")
        for part in ("when", "set"):
            if not isinstance(ov[part], Mapping) or not ov[part]:
                raise ConfigError(f"{source}: overrides[{i}].{part} must be a non-empty mapping of dotted keys.")
            for k in ov[part]:
                if k not in all_keys():
                    raise ConfigError(f"{source}: overrides[{i}].{part}: unknown key '{k}'.{suggest(str(k), all_keys())}")
        overrides.append(Override(when=dict(ov["when"]), set=dict(ov["set"])))

    search = build_dataclass(SearchSpec, raw.get("search") or {}, source, "search.")
    scheduler = _one_objective(search, raw.get("scheduler") or {}, source)
    resources = build_dataclass(ResourceSpec, raw.get("resources") or {}, source, "resources.")
    tracking = build_dataclass(TrackingSpec, raw.get("tracking") or {}, source, "tracking.")
    slurm = build_dataclass(SlurmSpec, raw.get("slurm") or {}, source, "slurm.")
    _validate_sections(search, scheduler, resources, slurm, axes, source)
    max_concurrent = raw.get("max_concurrent", 0)
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or not 0 <= max_concurrent < 2**31:
        raise ConfigError(f"{source}: 'max_concurrent' must be an integer >= 0, got {max_concurrent!r}.")
    cache_dir = raw.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, str):
        raise ConfigError(f"{source}: 'cache_dir' must be a path string, got {cache_dir!r}.")
    spec = SweepSpec(name=name, version=version, path=source, base=base, axes=tuple(axes), seeds=tuple(seeds),
                     overrides=tuple(overrides), search=search, scheduler=scheduler, resources=resources,
                     tracking=tracking, slurm=slurm, cache_dir=cache_dir, max_concurrent=max_concurrent,
                     description=str(raw.get("description") or ""),
                     analysis=parse_analysis(raw.get("analysis") or {}, source))
    expand(spec)  # validate every trial now, so a bad combination fails at load time
    return spec


def parse_analysis(raw: Any, source: str) -> AnalysisSpec:
    """The ``analysis:`` block. A primary metric must be one the table shows and tests (it has a better
    direction); an unknown table or metric names the ones that exist."""
    from ..metrics.registry import stage_specs

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: 'analysis' must be a mapping with `primary` and/or `family`, got {raw!r}.")
    spec = build_dataclass(AnalysisSpec, dict(raw), source, "analysis.")
    if not isinstance(spec.primary, Mapping):
        raise ConfigError(f"{source}: analysis.primary must map a table ({', '.join(ANALYSIS_TABLES)}) to a metric, "
                          f"e.g. {{rm: pairwise_accuracy}}; got {spec.primary!r}.")
    for table, metric in spec.primary.items():
        if table not in ANALYSIS_TABLES:
            raise ConfigError(f"{source}: analysis.primary: unknown table '{table}'.{suggest(str(table), list(ANALYSIS_TABLES))} "
                              f"Tables: {', '.join(ANALYSIS_TABLES)} (aligned: the alignment method's eval table).")
        stage = "rm" if table == "rm" else "sft" if table == "sft" else "ppo"
        names = [m.suffix for m in stage_specs(stage) if m.tested]
        if metric not in names:
            raise ConfigError(f"{source}: analysis.primary.{table}: {metric!r} is not a tested metric of that table."
                              f"{suggest(str(metric), names)} Choose one of: {', '.join(names)}.")
    return spec


PER_STEP_PREFIXES = ("ppo/objective/", "ppo/policy/", "ppo/val/", "ppo/loss/")  # reported at every PPO step


def _one_objective(search: SearchSpec, raw: Any, source: str) -> SchedulerSpec:
    """One sweep, one objective. With an Optuna search the scheduler follows ``search.mode``, and follows
    ``search.metric`` too when that metric is reported at every PPO step. An eval metric (``ppo/reward_mean``) is
    known only at the end of a trial, so ASHA then ranks by a per-step proxy (``scheduler.metric``, by default
    ``ppo/objective/scores``). A scheduler that disagrees with the search is an error."""
    raw = dict(raw) if isinstance(raw, Mapping) else raw
    if isinstance(raw, dict) and search.type == "optuna":
        per_step = search.metric.startswith(PER_STEP_PREFIXES)
        for k in ("metric", "mode") if per_step else ("mode",):
            mine, theirs = raw.get(k), getattr(search, k)
            if mine is not None and mine != theirs:
                raise ConfigError(f"{source}: scheduler.{k} is {mine!r} but search.{k} is {theirs!r}: a sweep has "
                                  f"one objective. Drop scheduler.{k} (it follows search.{k}).")
            raw[k] = theirs
    return build_dataclass(SchedulerSpec, raw, source, "scheduler.")


def _check_metric(key: str, name: str, source: str) -> None:
    """A metric a sweep optimises or schedules by must be one a trial reports (rlhf_ablate/metrics/registry.py);
    a misspelled one would be missing from every result, and ASHA would never stop anything."""
    if not known_metric(name):
        hint = suggest(name, all_metric_names()) or (" Metrics look like ppo/reward_mean, rm/kendall_tau, "
                                                 "ppo/objective/scores.")
        raise ConfigError(f"{source}: {key} {name!r} is not a metric a trial reports.{hint}")


def _parse_axes(raw: Any, source: str) -> list[Axis]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: 'axes' must be a mapping: dotted key -> list of values, or name -> "
                          f"{{keys: [...], values: [...]}} for tied axes.")
    valid = all_keys()
    axes = []
    seen_keys: set[str] = set()
    for name, spec in raw.items():
        if isinstance(spec, Mapping):
            extra = set(spec) - {"keys", "values"}
            if extra or "keys" not in spec or "values" not in spec:
                raise ConfigError(f"{source}: axes.{name} must have exactly `keys` and `values` "
                                  f"(got {sorted(spec)}).")
            keys, values = spec["keys"], spec["values"]
            if isinstance(keys, str):
                keys = [keys]
        else:
            keys, values = [name], spec
        if not isinstance(keys, list) or not keys:
            raise ConfigError(f"{source}: axes.{name}.keys must be a non-empty list of dotted keys.")
        for k in keys:
            if k == "seed":
                raise ConfigError(f"{source}: axes.{name}: use the top-level `seeds:` list for seeds, not an axis.")
            if k not in valid:
                raise ConfigError(f"{source}: axes.{name}: unknown key '{k}'.{suggest(str(k), valid)}")
            if k in seen_keys:
                raise ConfigError(f"{source}: axes.{name}: key '{k}' is already swept by another axis.")
            seen_keys.add(k)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: axes.{name} is empty: give at least one value.")
        rows = []
        for i, v in enumerate(values):
            if len(keys) > 1 and isinstance(v, list):
                if len(v) != len(keys):
                    raise ConfigError(f"{source}: axes.{name}.values[{i}] has {len(v)} entries for "
                                      f"{len(keys)} keys {keys}.")
                rows.append(tuple(v))
            else:
                rows.append(tuple([v] * len(keys)))
        if len(set(map(repr, rows))) != len(rows):
            raise ConfigError(f"{source}: axes.{name} lists a value twice: {values}.")
        axes.append(Axis(name=str(name), keys=tuple(keys), values=tuple(rows)))
    return axes


def _validate_sections(search: SearchSpec, scheduler: SchedulerSpec, resources: ResourceSpec, slurm: SlurmSpec,
                       axes: list[Axis], source: str) -> None:
    if search.type == "optuna":
        _check_metric("search.metric", search.metric, source)
    if scheduler.type == "asha":
        _check_metric("scheduler.metric", scheduler.metric, source)
        if not scheduler.metric.startswith(PER_STEP_PREFIXES):
            raise ConfigError(f"{source}: scheduler.metric {scheduler.metric!r} is reported only when a trial "
                              f"ends, so ASHA could never compare trials while they run; use a per-step PPO metric "
                              f"such as ppo/objective/scores or ppo/objective/kl.")
    if search.type == "optuna":
        if not search.space:
            raise ConfigError(f"{source}: search.type=optuna needs search.space, e.g. "
                              f"{{ppo.kl_coef: {{loguniform: [0.001, 1.0]}}}}.")
        if search.num_samples < 1:
            raise ConfigError(f"{source}: search.num_samples must be >= 1.")
        for k, dist in search.space.items():
            if k not in all_keys():
                raise ConfigError(f"{source}: search.space: unknown key '{k}'.{suggest(str(k), all_keys())}")
            if any(k in ax.keys for ax in axes):
                raise ConfigError(f"{source}: search.space.{k} is also a grid axis; sweep it one way only.")
            if (not isinstance(dist, Mapping) or len(dist) != 1
                    or next(iter(dist)) not in ("loguniform", "uniform", "int", "choice")):
                raise ConfigError(f"{source}: search.space.{k} must be one of {{loguniform: [lo, hi]}}, "
                                  f"{{uniform: [lo, hi]}}, {{int: [lo, hi]}}, {{choice: [a, b, ...]}}.")
            kind, arg = next(iter(dist.items()))
            if kind != "choice" and isinstance(arg, list) and not all(
                    isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in arg):
                raise ConfigError(f"{source}: search.space.{k}.{kind} needs finite numbers [low, high], got {arg!r}.")
            if not isinstance(arg, list) or (kind != "choice" and (len(arg) != 2 or not arg[0] < arg[1])):
                raise ConfigError(f"{source}: search.space.{k}.{kind} needs [low, high] with low < high, "
                                  f"got {arg!r}.")
            if kind == "loguniform" and arg[0] <= 0:
                raise ConfigError(f"{source}: search.space.{k}.loguniform needs low > 0, got {arg[0]}.")
    if search.num_samples > 100000:
        raise ConfigError(f"{source}: search.num_samples must be at most 100000, got {search.num_samples}.")
    if search.max_concurrent < 1:
        raise ConfigError(f"{source}: search.max_concurrent must be >= 1.")
    if scheduler.type == "asha" and (scheduler.grace_period < 1 or scheduler.reduction_factor < 2):
        raise ConfigError(f"{source}: scheduler.grace_period must be >= 1 and scheduler.reduction_factor >= 2.")
    check_resources(resources, source)
    if slurm.max_concurrent < 1:
        raise ConfigError(f"{source}: slurm.max_concurrent must be >= 1, got {slurm.max_concurrent}.")


# ---------------------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------------------

def expand(spec: SweepSpec) -> list[Trial]:
    """The grid (axes x seeds) as validated trials, in a stable order: seed-major, so that a partial sweep has
    every axis value at the first seed before it starts the second.

    For an Optuna search the trials are sampled at run time; ``expand`` then checks the space's corners and
    returns the base configuration once per seed (the trials Optuna will refine)."""
    trials: list[Trial] = []
    combos = list(itertools.product(*[ax.values for ax in spec.axes])) if spec.axes else [()]
    for seed in spec.seeds:
        for combo in combos:
            values: dict[str, Any] = {}
            axes: dict[str, Any] = {}
            for ax, row in zip(spec.axes, combo):
                values.update(dict(zip(ax.keys, row)))
                axes[ax.name] = row[0] if len(set(map(repr, row))) == 1 else list(row)
            trials.append(spec.trial(values, seed, len(trials), axes))
    if spec.search.type == "optuna":
        for k, dist in spec.search.space.items():
            kind, arg = next(iter(dist.items()))
            for v in (arg if kind == "choice" else arg[:2]):
                spec.trial({k: v}, spec.seeds[0], 0, {k: v})  # raises ConfigError if a corner is invalid
    seen: dict[str, Trial] = {}
    for t in trials:
        if t.trial_id in seen:
            other = seen[t.trial_id]
            raise ConfigError(
                f"{spec.path}: duplicate trials: ({_fmt_axes(other.axes, other.seed)}) and "
                f"({_fmt_axes(t.axes, t.seed)}) give the same configuration (id {t.trial_id}). An override or a "
                f"tied axis makes two grid points identical; remove one of the values.")
        seen[t.trial_id] = t
    return trials
