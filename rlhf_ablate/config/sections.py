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


