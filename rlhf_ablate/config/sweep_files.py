"""Where a sweep file is found: the bundled sweeps and the rule that turns what the user typed into one file.

The bundled sweeps are ``rlhf_ablate/sweeps/*.yaml``, package data, so a ``pip install`` (not only a clone) has
them (issue 19). ``python -m rlhf_ablate sweep X`` (and ``trial``, ``slurm``, ``rlhf_ablate.run_sweep``) reads:

1. ``X`` itself when it is a file (a path as given, relative to the working directory);
2. for a bare name (``lora_rank.yaml`` or ``lora_rank``, no directory part): ``./sweeps/X``, then the bundled ``X``;
3. for ``sweeps/NAME`` (the README's command, typed in a clone or anywhere) that is not a file here: the bundled
   ``NAME``.

A name without a suffix also tries ``.yaml`` and ``.yml``. The caller says which file was used when it was not
``X`` as typed (:attr:`SweepFile.note`); a miss is a ConfigError that lists the bundled sweeps. An ``include:``
resolves beside the including file, and a bare name that is not there is the bundled sweep of that name
(:func:`resolve_include`), so a user's sweep can build on a bundled one after a pip install.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .fields import read_yaml_file

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "sweeps"
SUFFIXES = (".yaml", ".yml")
LOCAL_DIR = "sweeps"  # ./sweeps/, looked at first for a bare name


@dataclass(frozen=True)
class SweepFile:
    path: Path
    how: str  # "given" (X as typed), "local" (./sweeps/X) or "bundled"
    typed: str

    @property
    def note(self) -> Optional[str]:
        """One line that says which file a name was resolved to; None when the file is the one typed."""
        if self.how == "given":
            return None
        where = "bundled sweep" if self.how == "bundled" else "from ./sweeps/"
        return f"sweep file: {self.path} ({where}; you typed {self.typed})"


def bundled_sweeps() -> dict[str, Path]:
    """Name (file stem) -> path of every bundled sweep, sorted by name."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.yaml"))}


def describe(path: Path) -> str:
    """The sweep file's one-line ``description:`` (its own, not an included file's); '' when it has none."""
    raw = read_yaml_file(Path(path), "sweep file")
    desc = raw.get("description") if isinstance(raw, dict) else None
    return " ".join(str(desc).split()) if desc else ""


def _names(name: str) -> list[str]:
    return [name] if name.endswith(SUFFIXES) else [name + s for s in SUFFIXES] + [name]


def _first_file(folder: Path, name: str) -> Optional[Path]:
    return next((folder / n for n in _names(name) if (folder / n).is_file()), None)


def resolve_sweep_file(typed: str | Path, cwd: Optional[Path] = None) -> SweepFile:
    """The file ``typed`` means, by the rule of this module's docstring (a relative path is relative to ``cwd``,
    default the working directory). Raises ConfigError on a miss."""
    typed_s = str(typed)
    cwd = Path.cwd() if cwd is None else Path(cwd)
    p = Path(typed_s).expanduser()
    as_given = p if p.is_absolute() else cwd / p
    if as_given.is_file():
        return SweepFile(Path(typed_s).expanduser(), "given", typed_s)
    parts = Path(typed_s).parts
    if len(parts) == 1 and typed_s not in (".", ".."):
        local = _first_file(cwd / LOCAL_DIR, typed_s)
        if local is not None:
            return SweepFile(Path(LOCAL_DIR) / local.name, "local", typed_s)
        bundled = _first_file(BUNDLED_DIR, typed_s)
        if bundled is not None:
            return SweepFile(bundled, "bundled", typed_s)
    elif len(parts) == 2 and parts[0] == LOCAL_DIR:
        bundled = _first_file(BUNDLED_DIR, parts[1])
        if bundled is not None:
            return SweepFile(bundled, "bundled", typed_s)
    if as_given.is_dir():
        raise ConfigError(f"sweep file {typed_s} is a directory; give the path of a sweep YAML file or the name of a "
                          f"bundled sweep ({', '.join(bundled_sweeps())}).")
    looked = (f"as a path, in ./{LOCAL_DIR}/ or among the bundled sweeps" if len(parts) == 1
              else "as a path" + (" or among the bundled sweeps" if parts[0] == LOCAL_DIR else ""))
    raise ConfigError(f"sweep file {typed_s} does not exist ({looked}). Bundled sweeps: "
                      f"{', '.join(bundled_sweeps())}; run one by name (python -m rlhf_ablate sweep lora_rank), "
                      f"or list them with their descriptions: python -m rlhf_ablate sweeps.")


def resolve_include(including: Path, inc: str) -> Path:
    """An ``include:`` of ``including``: beside it; a bare name that is not there is the bundled sweep of that name
    (so ``include: kl_coef.yaml`` works in any directory). Otherwise the path beside it (which then fails to read,
    naming that path)."""
    beside = (including.parent / Path(inc).expanduser()).resolve()
    if not beside.is_file() and len(Path(inc).parts) == 1:
        bundled = _first_file(BUNDLED_DIR, inc)
        if bundled is not None:
            return bundled.resolve()
    return beside


def list_bundled() -> str:
    """The text of ``python -m rlhf_ablate sweeps``: each bundled sweep's name and description."""
    sweeps = bundled_sweeps()
    width = max(len(n) for n in sweeps)
    lines = [f"{name:<{width}}  {describe(path)}" for name, path in sweeps.items()]
    lines.append(f"\nRun one by name: python -m rlhf_ablate sweep NAME (./{LOCAL_DIR}/NAME.yaml comes first when it "
                 f"exists). Files: {BUNDLED_DIR}")
    return "\n".join(lines)
