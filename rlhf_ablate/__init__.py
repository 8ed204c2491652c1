"""rlhf_ablate: RLHF hyperparameter ablations (SFT -> reward model -> PPO/DPO) with trustworthy tables."""

__version__ = "0.1.0"
