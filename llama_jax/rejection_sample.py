"""Rejection sampling: K responses per prompt, scored, the best kept (and the worst, for DPO pairs).

    python -m llama_jax.rejection_sample --ckpt POLICY --prompts prompts.jsonl --out best.jsonl \\
        (--reward-model RM | --score module:function) [--k 10] [--pairs] [--batch-prompts 8]

Prompts are JSONL records with `prompt` (a string or messages) or `messages` (trailing assistant
turns dropped), and an optional `id`. For each, K responses are sampled with `generate` (the
jitted KV-cache decoder; `--batch-prompts` prompts x K rows per call), scored by a reward model
or by `fn(prompt_record, response_text) -> float`, and one line is appended to --out:

    {"id", "prompt": [messages], "chosen": best reply, "chosen_score",
     "messages": prompt + [best reply] (an SFT conversation), "scores": all K scores,
     "finished": whether each sample ended with a stop token,
     with --pairs: "rejected": worst reply, "rejected_score" (a DPO pair; left out when every
     sample scored the same)}

Responses that end without a stop token (cut at --max-new-tokens) are kept only when no sample
of the prompt finished. The output is written batch by batch and flushed: a run that stops can be
started again with the same command and goes on with the prompts not yet in --out. Bad input
stops with one sentence and exit status 2.
"""

from __future__ import annotations

import sys

from llama_jax.posttrain.rejection import RejectionSamplingError, parser, run
from llama_jax.posttrain.reward import ScoringError


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.config import ConfigError
    from llama_jax.convert import ConversionError
    from llama_jax.generate import GenerationError

    try:
        counts = run(args)
    except (
        RejectionSamplingError,
        ScoringError,
        GenerationError,
        CheckpointError,
        ConversionError,
        ConfigError,
        FileNotFoundError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(
            f"wrote {counts['written']} records to {args.out} ({counts['skipped_done']} prompts were "
            f"already there, {counts['skipped_long']} too long, {counts['skipped_bad']} unusable)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
