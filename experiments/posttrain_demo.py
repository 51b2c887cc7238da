"""Post-training on a CPU: a tiny Llama learns addition written as a chat, then SFT, rejection
sampling + DPO and (separately) PPO, with held-out accuracy after each stage, for two seeds.

    python experiments/posttrain_demo.py [--seeds 0 1] [--workdir runs/posttrain_demo] [--smoke]

The task: "What is 47 + 85?" -> "132", two-digit operands. Answers are checkable, so the
reward is exact match (`score` below, 0 or 1) and accuracy is the mean score of greedy replies on
held-out problems no stage trains on. The demonstrations are imperfect, as human ones are: a
sloppy annotator rounds a three-digit sum down to its tens 70% of the time (47 + 85 -> "130"), so
a model that imitates them well answers most such problems wrongly, while sampling still finds
the right sum often enough for a checker-driven stage to learn from. That is the gap Llama 2's
post-training exploits: rejection sampling, DPO and PPO can beat the data SFT imitates. The
problems (the same for every seed) are three disjoint sets:

    gold      problems with the annotator's replies: the data of the base and SFT stages
    rl        problems without answers, only the checker: rejection sampling and PPO
    holdout   the accuracy measurement (greedy decoding, `rejection_sample --k 1 --temperature 0`)

The stages, per seed (WORKDIR/seedS/STAGE, each a training workdir):

    base  a model trained from scratch for a few steps on the gold chats: it knows the format,
          not yet the sums (stands in for a pretrained model)
    sft   from base: more steps on the gold chats (a constant learning rate: with a decaying one
          some seeds stall on the plateau before the model learns to add)
    dpo   rejection sampling from sft: K replies per rl problem at temperature 1, scored by
          `score`; the best and the worst of each problem where they differ (a correct and a
          wrong answer) are a DPO pair; DPO from sft on those pairs (with the NLL term on the
          chosen reply, as Llama 3)
    ppo   PPO from sft on the rl problems with `score` as the reward (no reward model)

A table of held-out accuracy (stage x seed, the mean, the gain over the stage it starts from
and the spread between seeds) is printed and written to WORKDIR/summary.json. Every step is
resumable: a stage, a sampling run or an evaluation that finished is not done again, so
running the same command after an interruption goes on where it stopped.
--smoke runs the whole chain at a toy scale in a couple of minutes (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

STAGES = ("base", "sft", "dpo", "ppo")
STARTS_FROM = {"sft": "base", "dpo": "sft", "ppo": "sft"}


def score(prompt: dict, response: str) -> float:
    """1.0 when the reply is exactly the sum, else 0.0."""
    return float(response.strip() == str(prompt["answer"]))


@dataclasses.dataclass(frozen=True)
class Scale:
    # The problems.
    gold: int = 5000
    rl: int = 2000
    holdout: int = 500
    sloppy: float = 0.7  # the share of three-digit sums that the gold replies round down
    # The model.
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 192
    vocab_size: int = 300
    seq_len: int = 64  # packed SFT sequences; a chat is about 20 tokens
    # Stages: steps, batch (sequences / pairs / prompts), peak learning rate.
    base_steps: int = 150
    sft_steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    rs_k: int = 8
    dpo_steps: int = 200
    dpo_batch: int = 32
    dpo_lr: float = 5e-4
    ppo_steps: int = 100
    ppo_batch: int = 64
    ppo_minibatch: int = 32
    ppo_lr: float = 3e-4
    max_new_tokens: int = 8
    smoke: bool = False


FULL = Scale()
SMOKE = Scale(
    smoke=True,
    gold=400,
    rl=64,
    holdout=64,
    dim=32,
    n_layers=1,
    n_heads=2,
    ffn_dim=64,
    base_steps=10,
    sft_steps=20,
    batch_size=16,
    rs_k=4,
    dpo_steps=4,
    dpo_batch=8,
    ppo_steps=2,
    ppo_batch=16,
    ppo_minibatch=8,
)


# --- data --------------------------------------------------------------------------------------


def problems(total: int, seed: int = 1234) -> list[tuple[int, int]]:
    """`total` distinct (a, b), each of two digits, in a seeded order (8,100 pairs exist)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seen, out = set(), []
    while len(out) < total:
        a, b = (int(x) for x in rng.integers(10, 100, 2))
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def three_digit(a: int, b: int) -> bool:
    return a + b >= 100


def demonstrations(pairs: list[tuple[int, int]], scale: Scale) -> list[int]:
    """The gold chats' replies, as a sloppy annotator writes them: a sum of three digits is
    rounded down to its tens (47 + 85 -> 130) with probability `scale.sloppy`, else it is right."""
    import numpy as np

    rounds = np.random.default_rng(99).random(len(pairs)) < scale.sloppy
    return [a + b - (a + b) % 10 * int(three_digit(a, b) and r) for (a, b), r in zip(pairs, rounds)]


def write_jsonl(path: Path, records) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def make_data(root: Path, scale: Scale) -> dict[str, str]:
    """The task's files under root (written once) and a SentencePiece tokenizer trained on them."""
    from llama_jax.tokenizer import train_sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    paths = {name: root / f"{name}.jsonl" for name in ("gold", "rl", "holdout")}
    paths["tokenizer"] = root / "tokenizer.model"
    if not all(p.exists() for p in paths.values()):
        every = problems(scale.gold + scale.rl + scale.holdout)
        splits = {
            "gold": every[: scale.gold],
            "rl": every[scale.gold : scale.gold + scale.rl],
            "holdout": every[scale.gold + scale.rl :],
        }
        write_jsonl(
            paths["gold"],
            (
                {
                    "messages": [
                        {"role": "user", "content": question(a, b)},
                        {"role": "assistant", "content": str(reply)},
                    ]
                }
                for (a, b), reply in zip(splits["gold"], demonstrations(splits["gold"], scale))
            ),
        )
        for name in ("rl", "holdout"):
            write_jsonl(
                paths[name],
                (
                    {"id": f"{name}{i}", "prompt": question(a, b), "answer": a + b}
                    for i, (a, b) in enumerate(splits[name])
                ),
            )
        # The tokenizer: Llama's SentencePiece settings (digits split), on the chats as text.
        corpus = root / "corpus.txt"
        corpus.write_text("".join(f"[INST] {question(a, b)} [/INST] {a + b}\n" for a, b in every))
        trained = train_sentencepiece([str(corpus)], str(root / "sp"), scale.vocab_size, quiet=True)
        Path(trained).replace(paths["tokenizer"])
    return {name: str(p) for name, p in paths.items()}


# --- stages ------------------------------------------------------------------------------------


def stage_experiment(stage: str, seed: int, scale: Scale, data: dict[str, str], seed_dir: Path):
    from llama_jax.config import (
        CheckpointConfig,
        Experiment,
        MeshConfig,
        ModelConfig,
        OptimConfig,
        PosttrainConfig,
        PPOConfig,
        TrainConfig,
    )
    from llama_jax.data.config import DataConfig, SourceConfig
    from llama_jax.posttrain.data import sft_source

    model = ModelConfig(
        dim=scale.dim,
        n_layers=scale.n_layers,
        n_heads=scale.n_heads,
        n_kv_heads=scale.n_heads,
        head_dim=scale.dim // scale.n_heads,
        ffn_dim=scale.ffn_dim,
        vocab_size=scale.vocab_size,
        max_seq_len=scale.seq_len,
        compute_dtype="float32",
    )
    steps, batch, lr, posttrain = {
        "base": (scale.base_steps, scale.batch_size, scale.lr, PosttrainConfig(stage="sft")),
        "sft": (
            scale.sft_steps,
            scale.batch_size,
            scale.lr,
            PosttrainConfig(stage="sft"),
        ),
        "dpo": (
            scale.dpo_steps,
            scale.dpo_batch,
            scale.dpo_lr,
            PosttrainConfig(stage="dpo", beta=0.1, nll_coef=0.2, eval_fraction=0.05),
        ),
        "ppo": (
            scale.ppo_steps,
            scale.ppo_batch,
            scale.ppo_lr,
            PosttrainConfig(
                stage="ppo",
                score_fn=f"{Path(__file__).resolve()}:score",
                ppo=PPOConfig(
                    max_new_tokens=scale.max_new_tokens,
                    temperature=1.0,
                    minibatch_size=scale.ppo_minibatch,
                    epochs=1,
                    kl_coef=0.01,
                    eval_prompts=0,
                ),
            ),
        ),
    }[stage]
    source = {
        "base": sft_source(data["gold"]),
        "sft": sft_source(data["gold"]),
        "dpo": SourceConfig(str(seed_dir / "rs_pairs.jsonl")),
        "ppo": SourceConfig(data["rl"], field="prompt"),
    }[stage]
    return Experiment(
        name=f"posttrain_demo_{stage}_seed{seed}",
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optim=OptimConfig(
            peak_lr=lr,
            warmup_steps=max(1, steps // 10),
            final_lr_ratio=1.0 if stage == "sft" else 0.1,
            b1=0.9,
            b2=0.95,
            weight_decay=0.1,
            clip_norm=1.0,
        ),
        train=TrainConfig(
            steps=steps,
            batch_size=batch,
            seq_len=scale.seq_len,
            log_every=10,
            eval_every=10**9,
            eval_batches=1,
            seed=seed,
            sample_tokens=0,
        ),
        checkpoint=CheckpointConfig(every_steps=0, keep_last=1),
        data=DataConfig(sources=(source,), tokenizer_path=data["tokenizer"], seed=seed),
        eval_data=None,
        posttrain=posttrain,
        # Each stage starts from the one before it: base -> sft -> dpo and ppo.
        init_from={
            "base": "",
            "sft": str(seed_dir / "base"),
            "dpo": str(seed_dir / "sft"),
            "ppo": str(seed_dir / "sft"),
        }[stage],
        target="cpu",
        description=f"posttrain_demo: the {stage} stage, seed {seed}",
    )


def finished(path: Path) -> bool:
    return (path / "demo_done.json").exists()


def run_stage(stage: str, seed: int, scale: Scale, data: dict[str, str], seed_dir: Path, log) -> float:
    """Trains the stage (unless done); returns its seconds (0.0 when it was done before)."""
    from llama_jax import train as train_lib

    workdir = seed_dir / stage
    if finished(workdir):
        return 0.0
    start = time.time()
    train_lib.train(stage_experiment(stage, seed, scale, data, seed_dir), workdir, quiet=True)
    seconds = time.time() - start
    (workdir / "demo_done.json").write_text(json.dumps({"seconds": seconds}))
    log(f"seed {seed}: {stage} trained in {seconds:.0f} s")
    return seconds


def sample(
    ckpt: Path,
    prompts: str,
    out: Path,
    *,
    k: int,
    temperature: float,
    pairs: bool,
    seed: int,
    scale: Scale,
    tokenizer: str,
) -> list[dict]:
    """rejection_sample's records for every prompt (resuming a partial `out`)."""
    from llama_jax import rejection_sample

    marker = out.with_suffix(".done")
    if not marker.exists():
        args = [
            "--ckpt",
            str(ckpt),
            "--tokenizer",
            tokenizer,
            "--prompts",
            prompts,
            "--out",
            str(out),
            "--score",
            f"{Path(__file__).resolve()}:score",
            "--k",
            str(k),
            "--temperature",
            str(temperature),
            "--max-new-tokens",
            str(scale.max_new_tokens),
            "--batch-prompts",
            str(max(1, 256 // k)),
            "--seed",
            str(seed),
            "--quiet",
        ]
        if pairs:
            args.append("--pairs")
        if rejection_sample.main(args) != 0:
            raise SystemExit(f"rejection sampling from {ckpt} failed (see above).")
        marker.touch()
    return [json.loads(line) for line in out.read_text().splitlines()]


def accuracy(stage: str, seed: int, scale: Scale, data: dict[str, str], seed_dir: Path) -> dict[str, float]:
    """Held-out greedy accuracy: over all problems, and over those whose sum has three digits
    (the ones the annotator rounds) and two digits."""
    records = sample(
        seed_dir / stage,
        data["holdout"],
        seed_dir / f"eval_{stage}.jsonl",
        k=1,
        temperature=0.0,
        pairs=False,
        seed=seed,
        scale=scale,
        tokenizer=data["tokenizer"],
    )
    answers = {q["id"]: q["answer"] for q in map(json.loads, Path(data["holdout"]).read_text().splitlines())}
    groups = {
        "all": records,
        "three_digit_sums": [r for r in records if answers[r["id"]] >= 100],
        "two_digit_sums": [r for r in records if answers[r["id"]] < 100],
    }
    return {
        name: sum(r["chosen_score"] for r in group) / max(1, len(group)) for name, group in groups.items()
    }


def run_seed(seed: int, scale: Scale, data: dict[str, str], root: Path, log) -> dict:
    seed_dir = root / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    result = {"accuracy": {}, "accuracy_by_sum": {}, "seconds": {}}
    for stage in STAGES:
        start = time.time()
        if stage == "dpo" and not finished(seed_dir / "dpo"):
            records = sample(
                seed_dir / "sft",
                data["rl"],
                seed_dir / "rs.jsonl",
                k=scale.rs_k,
                temperature=1.0,
                pairs=True,
                seed=seed,
                scale=scale,
                tokenizer=data["tokenizer"],
            )
            usable = [r for r in records if "rejected" in r]
            sampled_pairs = len(usable)
            if scale.smoke and len(usable) < 2 * scale.dpo_batch:
                # At smoke scale the model gets nothing right, so no sample makes a pair: the
                # checker's answer stands in as the chosen reply so that DPO runs at all.
                answers = {
                    q["id"]: q["answer"] for q in map(json.loads, Path(data["rl"]).read_text().splitlines())
                }
                usable += [
                    {
                        **r,
                        "chosen": str(answers[r["id"]]),
                        "chosen_score": 1.0,
                        "rejected": r["chosen"],
                        "rejected_score": r["chosen_score"],
                    }
                    for r in records
                    if "rejected" not in r
                ][: 2 * scale.dpo_batch - len(usable)]
            result["rejection_sampling"] = {
                "prompts": len(records),
                "pairs": len(usable),
                "pairs_from_samples": sampled_pairs,
                "best_of_k_accuracy": sum(r["chosen_score"] for r in records) / len(records),
                "sample_accuracy": sum(sum(r["scores"]) / len(r["scores"]) for r in records) / len(records),
            }
            (seed_dir / "rs_stats.json").write_text(json.dumps(result["rejection_sampling"]))
            write_jsonl(seed_dir / "rs_pairs.jsonl", usable)
            log(
                f"seed {seed}: rejection sampling: {sampled_pairs} pairs from {len(records)} problems "
                f"(best of {scale.rs_k} correct on {result['rejection_sampling']['best_of_k_accuracy']:.1%})"
            )
        elif (seed_dir / "rs_stats.json").exists():
            result["rejection_sampling"] = json.loads((seed_dir / "rs_stats.json").read_text())
        run_stage(stage, seed, scale, data, seed_dir, log)
        result["accuracy_by_sum"][stage] = accuracy(stage, seed, scale, data, seed_dir)
        result["accuracy"][stage] = result["accuracy_by_sum"][stage]["all"]
        done = json.loads((seed_dir / stage / "demo_done.json").read_text())
        if "seconds_total" not in done:  # training + sampling + evaluation, as first run
            done["seconds_total"] = time.time() - start
            (seed_dir / stage / "demo_done.json").write_text(json.dumps(done))
        result["seconds"][stage] = done["seconds_total"]
        split = result["accuracy_by_sum"][stage]
        log(
            f"seed {seed}: {stage} held-out accuracy {split['all']:.1%} (three-digit sums "
            f"{split['three_digit_sums']:.1%}, two-digit sums {split['two_digit_sums']:.1%})"
        )
    return result


# --- the table ---------------------------------------------------------------------------------


def summarize(results: dict[int, dict]) -> dict:
    seeds = sorted(results)
    rows = {}
    for stage in STAGES:
        values = [results[s]["accuracy"][stage] for s in seeds]
        rows[stage] = {
            "per_seed": dict(zip(map(str, seeds), values)),
            "mean": sum(values) / len(values),
            "spread": max(values) - min(values),
        }
    for stage, base in STARTS_FROM.items():
        gain = rows[stage]["mean"] - rows[base]["mean"]
        noise = max(rows[stage]["spread"], rows[base]["spread"])
        paired = [results[s]["accuracy"][stage] - results[s]["accuracy"][base] for s in seeds]
        rows[stage].update(
            starts_from=base,
            gain=gain,
            noise=noise,
            gain_per_seed=paired,
            gain_exceeds_noise=bool(gain > noise and min(paired) > 0),
        )
    return rows


def table(rows: dict, seeds: list[int]) -> str:
    head = ["stage"] + [f"seed {s}" for s in seeds] + ["mean", "gain", "noise", "gain > noise"]
    lines = [head]
    for stage in STAGES:
        row = rows[stage]
        cells = [stage] + [f"{row['per_seed'][str(s)]:.1%}" for s in seeds] + [f"{row['mean']:.1%}"]
        if "gain" in row:
            cells += [
                f"{row['gain']:+.1%} vs {row['starts_from']}",
                f"{row['noise']:.1%}",
                "yes" if row["gain_exceeds_noise"] else "NO",
            ]
        else:
            cells += ["", "", ""]
        lines.append(cells)
    return markdown_table(lines)


def markdown_table(lines: list[list[str]]) -> str:
    """Rows of cells (the first the header) as a Markdown table with aligned columns."""
    from llama_jax.posttrain.rounds import markdown_table as render

    return render(lines)


def claim_workdir(root: Path, wanted: dict) -> bool:
    """Records the run's scale in ROOT/scale.json; False, after one sentence, where ROOT holds a
    run of another scale (its steps would resume with the wrong settings)."""
    root.mkdir(parents=True, exist_ok=True)
    recorded = root / "scale.json"
    if recorded.exists() and json.loads(recorded.read_text()) != wanted:
        print(f"error: {root} holds a run of another scale; choose another --workdir.", file=sys.stderr)
        return False
    recorded.write_text(json.dumps(wanted, indent=1))
    return True


def timed_log():
    """print with the seconds since this call in front."""
    start = time.time()

    def log(message):
        return print(f"[{time.time() - start:6.0f} s] {message}", flush=True)

    return log


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workdir", default="runs/posttrain_demo")
    parser.add_argument("--smoke", action="store_true", help="toy scale, a couple of minutes: proves it runs")
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else FULL
    root = Path(args.workdir)
    wanted = {"smoke": args.smoke, **dataclasses.asdict(scale)}
    if not claim_workdir(root, wanted):
        return 2
    start, log = time.time(), timed_log()

    data = make_data(root / "data", scale)
    results = {seed: run_seed(seed, scale, data, root, log) for seed in args.seeds}
    rows = summarize(results)
    text = table(rows, args.seeds)
    print(
        f"\nHeld-out accuracy ({scale.holdout} problems, greedy), {'smoke scale' if args.smoke else 'full scale'}:"
    )
    print(text)
    summary = {
        "scale": wanted,
        "seeds": args.seeds,
        "stages": rows,
        "rejection_sampling": {str(s): results[s].get("rejection_sampling") for s in args.seeds},
        "accuracy_by_sum": {str(s): results[s]["accuracy_by_sum"] for s in args.seeds},
        "seconds": {str(s): results[s]["seconds"] for s in args.seeds},
        "wall_seconds_this_invocation": time.time() - start,
        "table": text,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {root / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
