"""Process-level settings that make a trial reproducible: seeds and the torch thread count."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_threads() -> None:
    """Respect OMP_NUM_THREADS (Ray sets 1 for a 1-CPU trial); otherwise let torch use the machine."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        torch.set_num_threads(int(n))
