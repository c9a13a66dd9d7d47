"""RL-CAI's reinforcement learning library: PPO against the preference model.

- :mod:`cai_dpo.rl.ppo_math` — the pure PPO arithmetic (masked statistics, whitening, GAE,
  clipped losses, KL penalty and controller);
- :mod:`cai_dpo.rl.rollout` — the batches of sampled responses and the pretraining mix;
- :mod:`cai_dpo.rl.ppo_trainer` — :class:`~cai_dpo.rl.ppo_trainer.CaiPPOTrainer`, the update loop;
- :mod:`cai_dpo.rl.reward` — the preference model's scorer.

The stage that loads the models and runs PPO (or RLOO) is :mod:`cai_dpo.stages.ppo`.
"""
