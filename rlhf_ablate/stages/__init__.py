"""Pipeline stages. Each is a function (config, upstream artifact dirs) -> an artifact directory it fills.

- sft.train_sft: TRL SFTTrainer, prompt masked; saves the merged SFT model (the PPO reference)
- rm.train_rm: TRL RewardTrainer on every pair of the ranked groups; evaluates rm/* on held-out groups
- ppo.train_ppo: our PPO on one shared base (policy, value, reward adapters; reference = adapters off)
- dpo.train_dpo: TRL DPOTrainer on the same pairs
- evaluate.evaluate_policy: generations on held-out prompts, Korean text metrics, RM reward, KL to the reference
"""
