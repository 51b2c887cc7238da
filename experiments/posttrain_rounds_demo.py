"""Llama 3's post-training loop on a CPU: posttrain_demo.py's addition task run as three rounds of
rejection sampling, SFT and DPO (`python -m llama_jax.posttrain.rounds`), with DPO variants
averaged, then GRPO against PPO from the same SFT model, for two seeds.

    python experiments/posttrain_rounds_demo.py [--seeds 0 1] [--workdir runs/posttrain_rounds_demo] [--smoke]

The task, data, model and checker are posttrain_demo.py's (two-digit addition as a chat; the gold
replies round 70% of three-digit sums down to their tens; exact match scores 1). Per seed
(WORKDIR/seedS):

    base    posttrain_demo's base stage (150 steps on the gold chats): the "pretrained" model
    rounds  the loop, three rounds from base: rejection sampling of 8 replies per rl problem from
            the previous round's best model (round 1: base), the correct ones kept; SFT of base on
            the gold chats plus every round's kept replies (three to one, --samples-weight); DPO from that
            SFT model on best/worst pairs of 4 samples, trained twice (two learning rates and
            seeds) and averaged, the average kept only where its held-out accuracy is at least
            the better variant's; the model with the best held-out accuracy goes on: the round's SFT or
            DPO model, or the one it sampled from where neither beats it
    ppo     PPO from round 1's SFT model, posttrain_demo's settings (100 iterations x 64 prompts)
    grpo    GRPO from the same model with the same number of responses (100 iterations x 8
            prompts x a group of 8)

Held-out accuracy is greedy decoding on the 500 held-out problems, scored by the checker (the
loop's held-out score). Tables of accuracy per round, of the averaged models against their
members, and of GRPO against PPO (accuracy and wall time) are printed and written to
WORKDIR/summary.json. Every step resumes: the same command after an interruption goes on.
--smoke runs it all at a toy scale in a few minutes (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "posttrain_demo", Path(__file__).with_name("posttrain_demo.py")
)
demo = importlib.util.module_from_spec(_spec)
sys.modules["posttrain_demo"] = demo  # its dataclasses look their module up while being defined
_spec.loader.exec_module(demo)

ROUNDS = 3
DPO_VARIANTS = ((1.0, 0), (0.6, 100))  # (x the DPO learning rate, + the seed) of each variant


def loop_experiment(seed: int, scale, data: dict, seed_dir: Path, samples_weight: float):
    """The rounds' experiment: posttrain_demo's SFT settings, its DPO settings as the DPO step's
    overrides, the checker as scorer."""
    from llama_jax.config import RoundsConfig

    sft = demo.stage_experiment("sft", seed, scale, data, seed_dir)
    dpo = demo.stage_experiment("dpo", seed, scale, data, seed_dir)
    dpo_overrides = (
        f"train.steps={dpo.train.steps}",
        f"train.batch_size={dpo.train.batch_size}",
        f"optim.warmup_steps={dpo.optim.warmup_steps}",
        f"optim.final_lr_ratio={dpo.optim.final_lr_ratio}",
    )
    variants = tuple(
        f"optim.peak_lr={dpo.optim.peak_lr * factor:g} train.seed={seed + offset}"
        for factor, offset in DPO_VARIANTS
    )
    return sft.replace(
        name=f"posttrain_rounds_demo_seed{seed}",
        posttrain=dpo.posttrain,  # DPO's beta, NLL coefficient and held-out fraction; stages set per step
        rounds=RoundsConfig(
            rounds=ROUNDS,
            prompts=(data["rl"],),
            eval_prompts=(data["holdout"],),
            score_fn=f"{Path(demo.__file__).resolve()}:score",
            k=scale.rs_k,
            dpo_k=4,
            temperature=1.0,
            max_new_tokens=scale.max_new_tokens,
            min_score=1.0,  # the checker's "correct"
            samples_weight=samples_weight,
            dpo=dpo_overrides,
            dpo_variants=variants,
        ),
    )


def run_loop(seed: int, scale, data: dict, seed_dir: Path, samples_weight: float, log) -> dict:
    from llama_jax.posttrain.rounds import Loop

    start = time.time()
    summary = Loop(
        loop_experiment(seed, scale, data, seed_dir, samples_weight), seed_dir / "rounds", quiet=True
    ).run()
    log(f"seed {seed}: {ROUNDS} rounds done ({time.time() - start:.0f} s this invocation)")
    return summary


def rl_experiment(stage: str, seed: int, scale, data: dict, seed_dir: Path, start: Path):
    """posttrain_demo's PPO from `start`; GRPO with the same responses per iteration."""

    exp = demo.stage_experiment("ppo", seed, scale, data, seed_dir)
    exp = exp.replace(name=f"posttrain_rounds_demo_{stage}_seed{seed}", init_from=str(start))
    if stage == "grpo":
        group = 8
        posttrain = dataclasses.replace(exp.posttrain, stage="grpo", group_size=group)
        exp = exp.replace(
            posttrain=posttrain,
            train=dataclasses.replace(exp.train, batch_size=exp.train.batch_size // group),
        )
    return exp


def run_rl(stage: str, seed: int, scale, data: dict, seed_dir: Path, start: Path, log) -> dict:
    from llama_jax import train as train_lib

    workdir = seed_dir / stage
    marker = workdir / "demo_done.json"
    if not marker.exists():
        began = time.time()
        train_lib.train(rl_experiment(stage, seed, scale, data, seed_dir, start), workdir, quiet=True)
        marker.write_text(json.dumps({"seconds": time.time() - began}))
    seconds = json.loads(marker.read_text())["seconds"]
    accuracy = demo.accuracy(stage, seed, scale, data, seed_dir)["all"]
    log(
        f"seed {seed}: {stage} from round 1's SFT: held-out accuracy {accuracy:.1%}, {seconds:.0f} s of training"
    )
    return {"accuracy": accuracy, "seconds": seconds}


# --- tables ------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{value:.1%}"


def rounds_table(results: dict[int, dict], seeds: list[int]) -> str:
    """Held-out accuracy of each round's best model, per seed, with the gain over the round before
    and the spread between seeds."""
    head = ["model"] + [f"seed {s}" for s in seeds] + ["mean", "gain", "spread", "gain > spread"]
    lines = [head]
    first = [results[s]["rounds"]["rounds"][0]["policy_heldout"] for s in seeds]
    previous = first
    lines.append(
        ["base (round 1 samples from it)"]
        + [_pct(v) for v in first]
        + [_pct(statistics.mean(first)), "", _pct(max(first) - min(first)), ""]
    )
    for r in range(ROUNDS):
        rows = [results[s]["rounds"]["rounds"][r] for s in seeds]
        values = [row["best_heldout"] for row in rows]
        gains = [v - p for v, p in zip(values, previous)]
        spread = max(max(values) - min(values), max(previous) - min(previous))
        gain = statistics.mean(values) - statistics.mean(previous)
        names = "/".join(sorted({row["best"].replace("previous", "kept") for row in rows}))
        lines.append(
            [f"round {r + 1} best ({names})"]
            + [_pct(v) for v in values]
            + [
                _pct(statistics.mean(values)),
                f"{gain:+.1%}",
                _pct(spread),
                "yes" if gain > spread and min(gains) > 0 else "no",
            ]
        )
        previous = values
    return demo.markdown_table(lines)


def steps_table(results: dict[int, dict], seeds: list[int]) -> str:
    """Every round's SFT and DPO models, per seed: what the loop chose from."""
    lines = [
        ["round", "seed", "kept / prompts", "SFT", "DPO pairs", "DPO v0", "DPO v1", "DPO average", "goes on"]
    ]
    for r in range(ROUNDS):
        for s in seeds:
            row = results[s]["rounds"]["rounds"][r]
            dpo = row.get("dpo", {})
            variants = dpo.get("variants", {})
            lines.append(
                [
                    str(r + 1),
                    str(s),
                    f"{row['samples']['kept']} / {row['samples']['prompts']}",
                    _pct(row["sft"]["heldout"]),
                    str(row["pairs"]),
                    _pct(variants["dpo_v0"]) if variants else "",
                    _pct(variants["dpo_v1"]) if variants else "",
                    _pct(dpo["average"]) if dpo else "no pairs",
                    {"previous": "the model it sampled from"}.get(row["best"], row["best"])
                    + (f" ({dpo['chosen']})" if row["best"] == "dpo" else ""),
                ]
            )
    return demo.markdown_table(lines)


def rl_table(results: dict[int, dict], seeds: list[int]) -> str:
    lines = [
        ["stage (from round 1's SFT)"]
        + [f"seed {s}" for s in seeds]
        + ["mean accuracy", "mean training time"]
    ]
    for stage in ("ppo", "grpo"):
        acc = [results[s][stage]["accuracy"] for s in seeds]
        secs = [results[s][stage]["seconds"] for s in seeds]
        lines.append(
            [stage] + [_pct(a) for a in acc] + [_pct(statistics.mean(acc)), f"{statistics.mean(secs):.0f} s"]
        )
    return demo.markdown_table(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workdir", default="runs/posttrain_rounds_demo")
    parser.add_argument(
        "--samples-weight",
        type=float,
        default=3.0,
        help="the kept replies' weight in each round's SFT mixture, the gold chats' being 1 (3: they "
        "make three quarters of it, so the annotator's rounding stops dominating)",
    )
    parser.add_argument("--smoke", action="store_true", help="toy scale, a few minutes: proves it runs")
    args = parser.parse_args(argv)
    scale = demo.SMOKE if args.smoke else demo.FULL
    root = Path(args.workdir)
    wanted = {"smoke": args.smoke, "samples_weight": args.samples_weight, **dataclasses.asdict(scale)}
    if not demo.claim_workdir(root, wanted):
        return 2
    start, log = time.time(), demo.timed_log()

    data = demo.make_data(root / "data", scale)
    results = {}
    for seed in args.seeds:
        seed_dir = root / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        demo.run_stage("base", seed, scale, data, seed_dir, log)
        result = {"rounds": run_loop(seed, scale, data, seed_dir, args.samples_weight, log)}
        sft1 = Path(result["rounds"]["rounds"][0]["sft"]["path"])
        for stage in ("ppo", "grpo"):
            result[stage] = run_rl(stage, seed, scale, data, seed_dir, sft1, log)
        results[seed] = result
    tables = {
        "rounds": rounds_table(results, args.seeds),
        "steps": steps_table(results, args.seeds),
        "grpo_vs_ppo": rl_table(results, args.seeds),
    }
    scale_name = "smoke scale" if args.smoke else "full scale"
    print(f"\nHeld-out accuracy ({scale.holdout} problems, greedy) of each round's best model, {scale_name}:")
    print(tables["rounds"])
    print("\nEach round's models (held-out accuracy) and the averaged DPO variants:")
    print(tables["steps"])
    print("\nGRPO against PPO from the same SFT model:")
    print(tables["grpo_vs_ppo"])
    summary = {
        "scale": wanted,
        "seeds": args.seeds,
        "results": {str(s): {k: v for k, v in r.items()} for s, r in results.items()},
        "tables": tables,
        "wall_seconds_this_invocation": time.time() - start,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {root / 'summary.json'} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
