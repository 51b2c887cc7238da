"""llama3_8b_rounds: Llama 3's post-training loop on Llama 3 8B (docs/reference.md, "Post-training",
"Rounds"): six rounds, each a reward model on the preference data so far, rejection sampling
(K = 10) from the previous round's best model, SFT of the pretrained model on the experiment's
chats plus every round's kept samples (lr 1e-5), and DPO from that SFT model (beta 0.1, lr 1e-5,
0.2 x NLL) on pairs sampled from it. The SFT, RM and DPO settings are the llama3_8b_sft, _rm and
_dpo recipes'; the number of samples, the prompt and preference files and the DPO sample count
are placeholders and our choice.

    python -m llama_jax.posttrain.rounds --exp=llama3_8b_rounds init_from=Meta-Llama-3-8B \\
        data.sources.0.path=chats.jsonl 'rounds.prompts=[prompts.jsonl]' \\
        'rounds.preferences=[prefs_round1.jsonl,prefs_round2.jsonl]'
"""

import dataclasses

from llama_jax.config import RoundsConfig, load_experiment


def experiment():
    sft = load_experiment("llama3_8b_sft")
    return sft.replace(
        name="llama3_8b_rounds",
        # The settings the steps share (DPO's and the reward model's); each step sets its stage.
        posttrain=dataclasses.replace(
            sft.posttrain, beta=0.1, nll_coef=0.2, use_margin=False, eval_fraction=0.05
        ),
        description="Llama 3's post-training loop: 6 rounds of RM, rejection sampling, SFT and DPO.",
        rounds=RoundsConfig(
            rounds=6,
            prompts=("data/prompts.jsonl",),
            preferences=("data/preferences.jsonl",),
            k=10,
            dpo_k=4,
            temperature=1.0,
            max_new_tokens=1024,
            rm=("train.steps=1000", "train.batch_size=512", "train.seq_len=4096", "optim.warmup_steps=30"),
            dpo=("train.steps=2000", "train.batch_size=64", "train.seq_len=4096", "optim.warmup_steps=50"),
        ),
    )
