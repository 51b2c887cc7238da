"""Ghost Attention on a CPU: does a system instruction hold over five turns, with and without
Ghost Attention's data? posttrain_demo.py's tiny model and addition chats, two seeds.

    python experiments/ghost_attention_demo.py [--seeds 0 1] [--workdir runs/ghost_attention_demo] [--smoke]

The instruction is "Answer in brackets." ("What is 47 + 85?" -> "[132]"). Per seed (WORKDIR/seedS):

    base      posttrain_demo's base stage (150 steps on its chats): knows the format
    without   SFT from base on a mixture that teaches the instruction where it stands next to
              the question (appended to the user message, in dialogs of one to five turns), in
              a system message on one-turn dialogs, and multi-turn dialogs with no instruction:
              a model that follows an instruction it is given in the turn, but has never seen a
              system instruction kept past turn 1
    gatt.jsonl `python -m llama_jax.ghost_attention` with `without`: dialogs of 2 to 5 turns whose
              replies are sampled with the instruction appended to every user message, written
              with the instruction once (the system message) and the loss on the last reply only
    with      SFT from base on the same mixture plus gatt.jsonl, the same steps

Both are then asked 200 held-out dialogs of five questions under the system instruction, greedily,
turn by turn, each reply in the context of its own earlier ones; the table is the share of replies
in brackets at turns 1 to 5. Every step resumes. --smoke: a toy scale (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
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

INSTRUCTION = "Answer in brackets."
TURNS = 5
BRACKETED = re.compile(r"^\[\d+\]$")


@dataclasses.dataclass(frozen=True)
class Sizes:
    one_turn_appended: int = 1000  # instruction appended to the question, reply in brackets
    multi_turn_appended: int = 1000  # 2-5 turns, the instruction appended to every question
    one_turn_system: int = 1000  # instruction as a system message, one turn, reply in brackets
    multi_turn_plain: int = 1000  # 2-5 turns, no instruction, plain replies
    gatt_dialogs: int = 1000  # dialogs sampled for Ghost Attention (2-5 turns)
    eval_dialogs: int = 200
    steps: int = 800
    batch_size: int = 32
    seq_len: int = 192  # a five-turn dialog with its system message is about 150 tokens


FULL = Sizes()
SMOKE = Sizes(
    one_turn_appended=32,
    multi_turn_appended=32,
    one_turn_system=32,
    multi_turn_plain=32,
    gatt_dialogs=32,
    eval_dialogs=16,
    steps=10,
    batch_size=8,
)


def _user(a: int, b: int) -> dict:
    return {"role": "user", "content": demo.question(a, b)}


def _reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


def make_data(root: Path, sizes: Sizes, scale) -> dict[str, str]:
    """The mixture, the Ghost Attention dialogs to sample and the held-out dialogs (written once)."""
    import numpy as np

    paths = {name: root / f"{name}.jsonl" for name in ("mixture", "gatt_input", "eval_dialogs")}
    if all(p.exists() for p in paths.values()):
        return {name: str(p) for name, p in paths.items()}
    every = demo.problems(scale.gold + scale.rl + scale.holdout)
    train, held = every[: scale.gold + scale.rl], every[scale.gold + scale.rl :]
    rng = np.random.default_rng(7)

    def pick(pool, n):
        return [pool[i] for i in rng.integers(0, len(pool), n)]

    mixture = []
    for a, b in pick(train, sizes.one_turn_appended):
        user = {"role": "user", "content": f"{demo.question(a, b)}\n\n{INSTRUCTION}"}
        mixture.append([user, _reply(f"[{a + b}]")])
    for _ in range(sizes.multi_turn_appended):
        turns = pick(train, int(rng.integers(2, TURNS + 1)))
        mixture.append(
            [
                m
                for a, b in turns
                for m in (
                    {**_user(a, b), "content": f"{demo.question(a, b)}\n\n{INSTRUCTION}"},
                    _reply(f"[{a + b}]"),
                )
            ]
        )
    for a, b in pick(train, sizes.one_turn_system):
        mixture.append([{"role": "system", "content": INSTRUCTION}, _user(a, b), _reply(f"[{a + b}]")])
    for _ in range(sizes.multi_turn_plain):
        turns = pick(train, int(rng.integers(2, TURNS + 1)))
        mixture.append([m for a, b in turns for m in (_user(a, b), _reply(str(a + b)))])
    gatt = [
        [{"role": "system", "content": INSTRUCTION}]
        + [_user(a, b) for a, b in pick(train, int(rng.integers(2, TURNS + 1)))]
        for _ in range(sizes.gatt_dialogs)
    ]
    evals = [
        [{"role": "system", "content": INSTRUCTION}]
        + [_user(a, b) for a, b in held[i * TURNS : (i + 1) * TURNS]]
        for i in range(min(sizes.eval_dialogs, len(held) // TURNS))
    ]
    root.mkdir(parents=True, exist_ok=True)
    for name, dialogs in (("mixture", mixture), ("gatt_input", gatt), ("eval_dialogs", evals)):
        demo.write_jsonl(paths[name], ({"messages": d} for d in dialogs))
    return {name: str(p) for name, p in paths.items()}


def sft_experiment(name: str, seed: int, scale, sizes: Sizes, data: dict, files: dict, seed_dir: Path):
    from llama_jax.data.config import sft_source

    exp = demo.stage_experiment(
        "sft", seed, scale, data, seed_dir
    )  # from base, posttrain_demo's SFT settings
    # Ghost Attention's dialogs join the mixture's file (one source: each document as likely).
    paths = (files["mixture"],) + ((str(seed_dir / "gatt.jsonl"),) if name == "with" else ())
    sources = [sft_source(paths)]
    return exp.replace(
        name=f"ghost_attention_demo_{name}_seed{seed}",
        model=dataclasses.replace(exp.model, max_seq_len=sizes.seq_len),
        train=dataclasses.replace(
            exp.train, steps=sizes.steps, batch_size=sizes.batch_size, seq_len=sizes.seq_len
        ),
        data=dataclasses.replace(exp.data, sources=tuple(sources)),
    )


def train_once(exp, workdir: Path, log) -> float:
    from llama_jax import train as train_lib

    marker = workdir / "demo_done.json"
    if not marker.exists():
        began = time.time()
        train_lib.train(exp, workdir, quiet=True)
        marker.write_text(json.dumps({"seconds": time.time() - began}))
        log(f"{workdir.name} trained in {time.time() - began:.0f} s")
    return json.loads(marker.read_text())["seconds"]


def sample_gatt(seed_dir: Path, files: dict, scale, seed: int, log) -> float:
    """Ghost Attention's data from `without`; returns the share of its trained replies in brackets."""
    from llama_jax import ghost_attention

    out = seed_dir / "gatt.jsonl"
    if not out.exists():
        args = ["--ckpt", str(seed_dir / "without"), "--dialogs", files["gatt_input"], "--out", str(out)]
        args += ["--max-new-tokens", str(scale.max_new_tokens), "--seed", str(seed), "--quiet"]
        if ghost_attention.main(args) != 0:
            raise SystemExit("Ghost Attention's sampling failed (see above).")
    trained = [json.loads(line)["messages"][-1]["content"] for line in out.read_text().splitlines()]
    share = sum(bool(BRACKETED.match(r)) for r in trained) / len(trained)
    log(f"seed {seed}: gatt.jsonl: {len(trained)} dialogs, {share:.1%} of their trained replies in brackets")
    return share


def follow_rates(ckpt: Path, dialogs_path: str, scale, tokenizer_path: str, out: Path) -> list[float]:
    """The share of replies in brackets at each turn, greedy, each dialog in its own replies' context."""
    if out.exists():
        return json.loads(out.read_text())
    from llama_jax.chat_template import default_template, encode_chat
    from llama_jax.config import SamplingConfig
    from llama_jax.generate import generate, load_model

    cfg, params, tokenizer = load_model(str(ckpt), None, tokenizer_path)
    template = default_template(tokenizer)
    stops = set(tokenizer.stop_ids)
    dialogs = [json.loads(line)["messages"] for line in Path(dialogs_path).read_text().splitlines()]
    context = [[d[0]] for d in dialogs]  # the system message
    followed = []
    for turn in range(TURNS):
        rows = []
        for messages, dialog in zip(context, dialogs):
            messages.append(dialog[1 + turn])
            rows.append(encode_chat(tokenizer, messages, template=template, add_generation_prompt=True).ids)
        samples = generate(
            params,
            cfg,
            rows,
            SamplingConfig(scale.max_new_tokens, 0.0),
            stop_tokens=tokenizer.stop_ids,
            prompt_bucket=32,
        )
        replies = [tokenizer.decode([t for t in s if t not in stops]).strip() for s in samples]
        for messages, reply in zip(context, replies):
            messages.append(_reply(reply))
        followed.append(sum(bool(BRACKETED.match(r)) for r in replies) / len(replies))
    out.write_text(json.dumps(followed))
    return followed


def table(results: dict[int, dict], seeds: list[int]) -> str:
    lines = [
        ["turn"]
        + [f"{m} GAtt, seed {s}" for m in ("without", "with") for s in seeds]
        + ["without (mean)", "with (mean)"]
    ]
    for turn in range(TURNS):
        cells = [str(turn + 1)]
        for model in ("without", "with"):
            cells += [f"{results[s][model][turn]:.1%}" for s in seeds]
        cells += [f"{statistics.mean(results[s][m][turn] for s in seeds):.1%}" for m in ("without", "with")]
        lines.append(cells)
    return demo.markdown_table(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workdir", default="runs/ghost_attention_demo")
    parser.add_argument("--smoke", action="store_true", help="toy scale, a couple of minutes: proves it runs")
    args = parser.parse_args(argv)
    scale, sizes = (demo.SMOKE, SMOKE) if args.smoke else (demo.FULL, FULL)
    root = Path(args.workdir)
    wanted = {"smoke": args.smoke, **dataclasses.asdict(scale), **dataclasses.asdict(sizes)}
    if not demo.claim_workdir(root, wanted):
        return 2
    start, log = time.time(), demo.timed_log()

    data = demo.make_data(root / "data", scale)
    files = make_data(root / "dialogs", sizes, scale)
    results = {}
    for seed in args.seeds:
        seed_dir = root / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        demo.run_stage("base", seed, scale, data, seed_dir, log)
        result = {}
        train_once(
            sft_experiment("without", seed, scale, sizes, data, files, seed_dir), seed_dir / "without", log
        )
        result["gatt_bracketed"] = sample_gatt(seed_dir, files, scale, seed, log)
        train_once(sft_experiment("with", seed, scale, sizes, data, files, seed_dir), seed_dir / "with", log)
        for model in ("without", "with"):
            result[model] = follow_rates(
                seed_dir / model,
                files["eval_dialogs"],
                scale,
                data["tokenizer"],
                seed_dir / f"follow_{model}.json",
            )
            log(
                f"seed {seed}: {model} GAtt: in brackets at turns 1-5: "
                + ", ".join(f"{r:.0%}" for r in result[model])
            )
        results[seed] = result
    text = table(results, args.seeds)
    print(
        f"\nReplies in brackets under the system instruction, turn by turn ({sizes.eval_dialogs} dialogs, greedy):"
    )
    print(text)
    summary = {
        "scale": wanted,
        "seeds": args.seeds,
        "results": {str(s): r for s, r in results.items()},
        "table": text,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {root / 'summary.json'} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
