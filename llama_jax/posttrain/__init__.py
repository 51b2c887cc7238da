"""Post-training as in Llama 2 and Llama 3: SFT, reward model, rejection sampling, DPO and PPO.

    losses.py   the objectives as pure functions of arrays (Bradley-Terry, DPO, PPO's pieces)
    heads.py    the Llama backbone with a scalar head (reward model, value model)
    data.py     chat and preference JSONL -> token rows with the right loss masks
    steps.py    per-stage loss functions of (params, batch) for the training step in train.py
    reward.py   scoring responses with a reward model or a user's function (rejection sampling, PPO)
    stages.py   what a post-training run needs before its first step: tokenizer, data, the
                initial and reference parameters
    ppo.py      the PPO loop: rollouts with the KV-cache decoder, rewards, GAE, clipped updates

SFT, the reward model and DPO run in `llama_jax.train`'s loop (`--exp=llama3_8b_sft`, `..._rm`,
`..._dpo`), PPO in its own loop behind the same CLI (`--exp=llama3_8b_ppo`); rejection sampling is
`python -m llama_jax.rejection_sample`.
"""
