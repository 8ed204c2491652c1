"""PPO, owned here (TRL removed PPOTrainer in 2026): the math (tensors in, tensors out), the roles on one shared
base, rollout batches and the loop. The stage wrapper is rlhf_ablate/stages/ppo.py."""
