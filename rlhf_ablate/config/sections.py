"""The sweep-level sections of a sweep file (``search``, ``scheduler``, ``resources``, ``tracking``, ``slurm``): their
shapes and defaults. rlhf_ablate/config/sweep.py reads and validates them.

They configure how trials run, not what a trial computes, so they are not part of the trial id: moving a sweep from
Ray to SLURM, or changing its W&B project, keeps every trial id and cache entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass(frozen=True)
class SearchSpec:
    type: Literal["grid", "optuna"] = "grid"
    metric: str = "ppo/reward_mean"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 8
    space: dict = field(default_factory=dict)  # dotted key -> {loguniform|uniform|int|choice: [...]}
    max_concurrent: int = 2


@dataclass(frozen=True)
class SchedulerSpec:
    type: Literal["none", "asha"] = "none"
    metric: str = "ppo/objective/scores"
    mode: Literal["max", "min"] = "max"
    grace_period: int = 2
    reduction_factor: int = 2
    max_t: int = 1000


@dataclass(frozen=True)
class ResourceSpec:
    gpu: Union[float, str] = "auto"  # "auto": fraction from the memory estimate (0 without GPUs); "probe": measured
    cpu: int = 1
    memory_gb: Optional[float] = None  # override the GPU memory estimate of a trial
    # PPO trials that share an SFT model and RM train together on one base, K at a time (rlhf_ablate/run/groups.py):
    # 1 (alone), a number, or "auto" (the largest K that fits the GPU)
    group_size: Union[int, str] = 1


def check_resources(resources: ResourceSpec, source: str) -> None:
    """The ``resources`` section's rules (ConfigError naming the key and the sweep file ``source``)."""
    from ..errors import ConfigError

    if isinstance(resources.gpu, str) and resources.gpu not in ("auto", "probe"):
        raise ConfigError(f"{source}: resources.gpu must be a number (GPUs per trial, fractions allowed), 'auto' or "
                          f"'probe', got {resources.gpu!r}.")
    if not isinstance(resources.gpu, str) and resources.gpu < 0:
        raise ConfigError(f"{source}: resources.gpu must be >= 0, got {resources.gpu}.")
    if resources.memory_gb is not None and resources.memory_gb <= 0:
        raise ConfigError(f"{source}: resources.memory_gb must be > 0 (GiB per trial), got {resources.memory_gb}.")
    g = resources.group_size
    if isinstance(g, bool) or not (g == "auto" or (isinstance(g, int) and g >= 1)):
        raise ConfigError(f"{source}: resources.group_size must be 'auto' or a whole number >= 1 (1: alone), got {g!r}.")
    if resources.cpu < 1:
        raise ConfigError(f"{source}: resources.cpu must be >= 1, got {resources.cpu}.")


@dataclass(frozen=True)
class TrackingSpec:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "rlhf_ablate"
    entity: Optional[str] = None


@dataclass(frozen=True)
class SlurmSpec:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"
    max_concurrent: int = 4
    cpus_per_task: Optional[int] = None
    gpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    extra: list = field(default_factory=list)  # extra "#SBATCH ..." lines, e.g. ["--constraint=a100"]
    setup: list = field(default_factory=list)  # shell lines run before the trial (module load, conda activate)


