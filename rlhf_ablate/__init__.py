"""rlhf_ablate: RLHF hyperparameter ablations (SFT -> reward model -> PPO/DPO) with trustworthy tables.

From a notebook: ``rlhf_ablate.run_sweep(path_or_dict, **overrides)`` and ``rlhf_ablate.load_run(run_dir)``
(rlhf_ablate/api.py). They are loaded on first use, so ``import rlhf_ablate`` stays cheap (no torch, no Ray).
"""

__version__ = "0.1.0"
__all__ = ["run_sweep", "load_run", "__version__"]


def __getattr__(name: str):
    if name in ("run_sweep", "load_run"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'rlhf_ablate' has no attribute {name!r}")
