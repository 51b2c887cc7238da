"""Post-training as in Llama 2 and Llama 3: SFT, reward model, rejection sampling, DPO and PPO;
and GRPO.

    losses.py   the objectives as pure functions of arrays (Bradley-Terry, DPO, PPO's pieces)
    data.py     chat and preference JSONL -> token rows with the right loss masks
    steps.py    the reward-model and DPO losses of a pair batch, for the step in steps.py
    reward.py   loading and scoring with a reward model or a user's function (rejection sampling, PPO)
    inputs.py   what a post-training run needs before its first step: tokenizer, data, the
                initial and reference parameters
    stages.py   the SFT, reward-model and DPO stages (trainer.Stage)
    ppo.py      the PPO stage: rollouts with the KV-cache sampler, rewards, GAE, clipped updates
    grpo.py     the GRPO stage: PPO's rollouts in groups per prompt, group-normalised scores, no
                value model, the KL to the reference as a loss term

Every stage runs in the one loop, `trainer.Trainer`, behind the same CLI (`--exp=llama3_8b_sft`,
`..._rm`, `..._dpo`, `..._ppo`); the reward and value models are `scalar_model.ScalarModel`;
rejection sampling is `python -m llama_jax.rejection_sample`.
"""
