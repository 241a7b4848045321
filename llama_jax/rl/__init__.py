"""Reinforcement learning from a reward, as Llama 2 did it (PPO) and as GRPO does it: train.py --stage
ppo / grpo. `prompts` reads the prompt set, `losses` holds the textbook formulas (GAE, the clipped
surrogate, the clipped value loss, group-relative advantages), `setup` the models, state layout and
jitted programs, `rollout` samples and scores a batch, `loop` is the run."""
