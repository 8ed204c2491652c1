"""PPO stage: the SFT and RM artifacts in, the policy artifact out (rlhf_ablate/ppo/loop.py does the work)."""

from __future__ import annotations

from ..ppo.loop import train_ppo

__all__ = ["train_ppo"]
