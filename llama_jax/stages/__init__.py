"""The built-in stages that are not post-training: pretraining (`pretrain.py`). Post-training's
stages (SFT, reward model, DPO, PPO) live in `llama_jax.posttrain`."""
