"""Full fine-tuning against LoRA on a CPU: the SFT and DPO stages of posttrain_demo.py, on the same
task, data and seeds, once training every parameter and once training rank-8 adapters on all seven
matrices of every layer, side by side.

    python experiments/lora_demo.py [--seeds 0 1] [--workdir runs/lora_demo] [--smoke]

Per seed (WORKDIR/seedS): `base` as in posttrain_demo.py (trained in full: it stands in for the
pretrained model), then `sft_full` and `sft_lora`, both from base on the gold chats; rejection
sampling from sft_full (K replies per problem, the checker's best and worst make a DPO pair), and
`dpo_full` and `dpo_lora`, both from sft_full on those pairs. Each pair of runs differs only in
what trains. A LoRA stage's adapters (WORKDIR/.../adapter, PEFT's layout) are folded into its
base with `python -m llama_jax.convert --merge-lora` (`sft_lora_merged`, `dpo_lora_merged`),
which is what is evaluated. The
table: held-out accuracy (greedy, the mean over seeds), parameters trained, optimizer-state bytes
and the median step time of each stage. Every step resumes as posttrain_demo.py's do.
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

MODES = ("full", "lora")
STAGES = ("sft", "dpo")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
LORA_RANK = 8
# Adapters start at zero and have few parameters: they take a larger step than full fine-tuning.
LORA_LR_FACTOR = {"sft": 5.0, "dpo": 4.0}


def lora_stage_experiment(stage: str, mode: str, seed: int, scale, data: dict, seed_dir: Path):
    from llama_jax.config import LoraConfig
    from llama_jax.data.config import SourceConfig

    exp = demo.stage_experiment(stage, seed, scale, data, seed_dir)
    # Both SFTs start from base; both DPOs from the full SFT, on the same sampled pairs: each
    # comparison differs in what trains, nothing else.
    start = {"sft": seed_dir / "base", "dpo": seed_dir / "sft_full"}
    exp = exp.replace(name=f"lora_demo_{stage}_{mode}_seed{seed}", init_from=str(start[stage]))
    if stage == "dpo":
        pairs = SourceConfig(str(seed_dir / "rs_pairs_full.jsonl"))
        exp = exp.replace(data=dataclasses.replace(exp.data, sources=(pairs,)))
    if mode == "lora":
        optim = dataclasses.replace(exp.optim, peak_lr=exp.optim.peak_lr * LORA_LR_FACTOR[stage])
        exp = exp.replace(
            lora=LoraConfig(rank=LORA_RANK, alpha=2.0 * LORA_RANK, targets=LORA_TARGETS), optim=optim
        )
    return exp


def state_sizes(exp) -> dict:
    """Parameters trained and optimizer-state bytes of the stage's TrainState, from its shapes."""
    import jax

    from llama_jax.optim import make_optimizer
    from llama_jax.sharding import make_mesh
    from llama_jax.train import stage_of

    stage = stage_of(exp)
    mesh = make_mesh(exp.mesh, jax.devices()[:1])
    optimizer, _ = make_optimizer(exp.optim, exp.train.steps)
    state = stage.abstract_state(exp, optimizer, mesh)
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
    return {"trained_parameters": int(trained), "optimizer_state_bytes": int(opt_bytes)}


def median_step_time(workdir: Path) -> float:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    return statistics.median(times[1:] or times)  # the first window includes the compile


def train_stage(exp, workdir: Path, log) -> None:
    from llama_jax import train as train_lib

    if demo.finished(workdir):
        return
    start = time.time()
    train_lib.train(exp, workdir, quiet=True)
    (workdir / "demo_done.json").write_text(json.dumps({"seconds": time.time() - start}))
    log(f"{exp.name} trained in {time.time() - start:.0f} s")


def merge(base: Path, adapter: Path, out: Path) -> None:
    """`python -m llama_jax.convert --from llama_jax BASE --to llama_jax OUT --merge-lora ADAPTER`."""
    from llama_jax.convert.cli import main as convert

    if (out / "model_config.json").exists():
        return
    args = ["--from", "llama_jax", str(base), "--to", "llama_jax", str(out), "--merge-lora", str(adapter)]
    if convert(args) != 0:
        raise SystemExit(f"merging {adapter} into {base} failed (see above).")


def pairs_from(ckpt: Path, out: Path, seed: int, scale, data: dict) -> int:
    records = demo.sample(
        ckpt,
        data["rl"],
        out.with_name(out.stem.replace("pairs", "samples") + ".jsonl"),
        k=scale.rs_k,
        temperature=1.0,
        pairs=True,
        seed=seed,
        scale=scale,
        tokenizer=data["tokenizer"],
    )
    usable = [r for r in records if "rejected" in r]
    if scale.smoke and len(usable) < 2 * scale.dpo_batch:  # as posttrain_demo.py: the answer as chosen
        answers = {q["id"]: q["answer"] for q in map(json.loads, Path(data["rl"]).read_text().splitlines())}
        usable += [
            {
                **r,
                "chosen": str(answers[r["id"]]),
                "chosen_score": 1.0,
                "rejected": r["chosen"],
                "rejected_score": 0.0,
            }
            for r in records
            if "rejected" not in r
        ][: 2 * scale.dpo_batch - len(usable)]
    demo.write_jsonl(out, usable)
    return len(usable)


def run_seed(seed: int, scale, data: dict, root: Path, log) -> dict:
    seed_dir = root / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    demo.run_stage("base", seed, scale, data, seed_dir, log)
    result = {}
    for mode in MODES:
        for stage in STAGES:
            exp = lora_stage_experiment(stage, mode, seed, scale, data, seed_dir)
            if stage == "dpo" and mode == "full" and not demo.finished(seed_dir / "dpo_full"):
                n = pairs_from(seed_dir / "sft_full", seed_dir / "rs_pairs_full.jsonl", seed, scale, data)
                log(f"seed {seed}: {n} DPO pairs sampled from sft_full")
            workdir = seed_dir / f"{stage}_{mode}"
            train_stage(exp, workdir, log)
            evaluated = f"{stage}_{mode}"
            if mode == "lora":
                merge(Path(exp.init_from), workdir / "adapter", seed_dir / f"{stage}_lora_merged")
                evaluated = f"{stage}_lora_merged"
            accuracy = demo.accuracy(evaluated, seed, scale, data, seed_dir)["all"]
            result[f"{stage}_{mode}"] = {
                "accuracy": accuracy,
                "step_time_s": median_step_time(workdir),
                **state_sizes(exp),
            }
            log(f"seed {seed}: {stage} ({mode}) held-out accuracy {accuracy:.1%}")
    return result


def table(results: dict[int, dict], seeds: list[int]) -> str:
    head = [
        "stage",
        "trained",
        "accuracy",
        *[f"seed {s}" for s in seeds],
        "parameters trained",
        "optimizer state",
        "step time",
    ]
    lines = [head]
    for stage in STAGES:
        for mode in MODES:
            cells = [results[s][f"{stage}_{mode}"] for s in seeds]
            mean = sum(c["accuracy"] for c in cells) / len(cells)
            lines.append(
                [
                    stage,
                    "every parameter" if mode == "full" else f"LoRA rank {LORA_RANK}",
                    f"{mean:.1%}",
                    *[f"{c['accuracy']:.1%}" for c in cells],
                    f"{cells[0]['trained_parameters']:,}",
                    f"{cells[0]['optimizer_state_bytes'] / 1024:,.0f} KiB",
                    f"{statistics.median(c['step_time_s'] for c in cells) * 1e3:.0f} ms",
                ]
            )
    return demo.markdown_table(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workdir", default="runs/lora_demo")
    parser.add_argument("--smoke", action="store_true", help="toy scale, a couple of minutes: proves it runs")
    args = parser.parse_args(argv)
    scale = demo.SMOKE if args.smoke else demo.FULL
    root = Path(args.workdir)
    wanted = {"smoke": args.smoke, "lora_rank": LORA_RANK, **dataclasses.asdict(scale)}
    if not demo.claim_workdir(root, wanted):
        return 2
    log = demo.timed_log()

    data = demo.make_data(root / "data", scale)
    results = {seed: run_seed(seed, scale, data, root, log) for seed in args.seeds}
    text = table(results, args.seeds)
    print(f"\nHeld-out accuracy ({scale.holdout} problems, greedy) and cost per stage:")
    print(text)
    summary = {
        "scale": wanted,
        "seeds": args.seeds,
        "results": {str(s): r for s, r in results.items()},
        "table": text,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {root / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
