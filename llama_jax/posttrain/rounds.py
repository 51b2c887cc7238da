"""Llama 3's post-training loop as one command: rounds of reward model, rejection sampling, SFT
and DPO, each round starting from the best model of the one before.

    python -m llama_jax.posttrain.rounds --exp NAME [--workdir DIR] [key=value ...]

The experiment's `rounds` (config.RoundsConfig) says what to sample and how to score it; its other
fields are the settings every step shares (model, optimizer, data, init_from), and `rounds.sft`,
`rounds.rm` and `rounds.dpo` are overrides for one step. Round r, in WORKDIR/round{r}:

    rm/               a reward model trained from init_from on the preference files 1..r
                      (no reward model without rounds.preferences: rounds.score_fn scores)
    rs.jsonl          rounds.k samples per prompt from the previous round's best model, scored;
    samples.jsonl     the best of each prompt where it finished and scored at least min_score
    sft/              SFT from init_from on the experiment's data plus the kept samples of
                      rounds 1..r (Llama 3 fine-tunes the pretrained model again every round)
    dpo_samples.jsonl rounds.dpo_k samples per prompt from the new SFT model; the best and the
                      worst of each prompt where they differ are a pair
    dpo/              DPO from the SFT model on those pairs
    eval_*.jsonl      greedy replies to rounds.eval_prompts, scored (by the checker, or by this
                      round's reward model): the held-out score that picks the model going on,
                      the round's SFT or DPO model or, where neither beats it, the one it
                      sampled from (a round never goes back)

With `rounds.sft_variants` (or `dpo_variants`) a step trains once per variant (sft_v0/, sft_v1/,
...), their parameters are averaged (sft_avg/), and the average goes on where its held-out score
is at least the best variant's, else the best variant does, as Llama 3 averages models at each
stage. Every step is resumable: a finished step is not run again, a killed training run resumes
from its last checkpoint and a killed sampling run from its last written prompt, so the same
command after an interruption continues where it stopped (and with a larger rounds.rounds, adds
rounds). WORKDIR/summary.json and summary.md hold the table of every round. Bad input is one
sentence and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

# The stages this loop trains register themselves on import.
import llama_jax.posttrain.stages  # noqa: F401
from llama_jax.averaging import AveragingError, write_average
from llama_jax.checkpoint import CheckpointError
from llama_jax.config import ConfigError, Experiment, PosttrainConfig, apply_overrides, load_experiment
from llama_jax.convert import ConversionError
from llama_jax.data.config import SourceConfig, sft_source
from llama_jax.data.training import DataError
from llama_jax.generate import GenerationError
from llama_jax.init_from import source_kind
from llama_jax.posttrain import rejection
from llama_jax.posttrain.inputs import recorded_tokenizer
from llama_jax.posttrain.reward import ScoringError, load_function
from llama_jax.run_lock import RunLockError
from llama_jax.sharding import MeshError
from llama_jax.trainer import DivergenceError, Trainer, get_stage

STEPS = ("rm", "sft", "dpo")


class RoundsError(ValueError):
    """Bad input to the loop; one sentence for the user."""


class Interrupted(RuntimeError):
    """A step's training stopped on request (SIGTERM, preemption) before its last step."""


def _write_json(path: Path, value) -> None:
    """Whole or not at all: a killed write leaves the old file (or none)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _write_jsonl(path: Path, records) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def choose_average(members: dict[str, float], average: float) -> str:
    """ "average" where its held-out score is at least every member's, else the best member (the
    first of equals)."""
    best = max(members, key=lambda name: members[name])
    return "average" if average >= members[best] else best


def best_of_round(scores: dict[str, float | None]) -> str:
    """The model that goes on from a round, among the one it sampled from ("previous") and its
    steps' in order: the highest held-out score, the later on a tie (DPO over SFT over the
    previous model: a round never goes back); without scores, the last step that ran."""
    names = list(scores)
    if any(score is None for score in scores.values()):
        return names[-1]
    return max(reversed(names), key=lambda name: scores[name])


def kept_samples(records: list[dict], min_score: float) -> list[dict]:
    """The SFT conversations of rejection sampling: each prompt's best reply, where one of the
    prompt's samples finished (a reply cut at max_new_tokens teaches the model to ramble) and it
    scored at least `min_score`."""
    return [
        {"messages": r["messages"], "id": r["id"], "score": r["chosen_score"]}
        for r in records
        if any(r["finished"]) and r["chosen_score"] >= min_score
    ]


def sample_stats(records: list[dict], kept: int) -> dict:
    n = max(1, len(records))
    return {
        "prompts": len(records),
        "kept": kept,
        "mean_score": sum(sum(r["scores"]) / len(r["scores"]) for r in records) / n,
        "best_score": sum(r["chosen_score"] for r in records) / n,
    }


def _with_absolute_paths(exp: Experiment) -> Experiment:
    """init_from and the loop's files as absolute paths: the rounds record them, and a loop may be
    resumed from another directory."""

    def absolute(path: str) -> str:
        return str(Path(path).absolute()) if path else path

    cfg = exp.rounds
    return exp.replace(
        init_from=absolute(exp.init_from),
        rounds=dataclasses.replace(
            cfg,
            first_policy=absolute(cfg.first_policy),
            prompts=tuple(map(absolute, cfg.prompts)),
            preferences=tuple(map(absolute, cfg.preferences)),
            eval_prompts=tuple(map(absolute, cfg.eval_prompts)),
        ),
    )


class Loop:
    """The rounds of one experiment in one workdir."""

    def __init__(self, exp: Experiment, workdir: str | Path, *, quiet: bool = False):
        if exp.rounds is None:
            raise RoundsError(
                f"The experiment {exp.name!r} has no `rounds` settings; a post-training loop needs them "
                "(config.RoundsConfig)."
            )
        exp = _with_absolute_paths(exp)  # the loop records paths and may resume from elsewhere
        self.exp, self.cfg, self.quiet = exp, exp.rounds, quiet
        self.workdir = Path(workdir).absolute()
        self.start = time.time()
        self._check_inputs()
        self.tokenizer = exp.data.tokenizer_path or recorded_tokenizer(self.first_policy) or ""
        if not self.tokenizer:
            raise RoundsError(
                "No tokenizer: set data.tokenizer_path, or start from a run or export that records one."
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_workdir()

    # --- input ---------------------------------------------------------------------------------

    @property
    def first_policy(self) -> str:
        return self.cfg.first_policy or self.exp.init_from

    def _check_inputs(self) -> None:
        cfg = self.cfg
        if not self.exp.init_from:
            raise RoundsError(
                "init_from is empty: the loop fine-tunes a pretrained model; name its run, export or "
                "Hugging Face directory."
            )
        if not cfg.prompts:
            raise RoundsError("rounds.prompts is empty: rejection sampling needs prompts.")
        if not (cfg.preferences or cfg.score_fn):
            raise RoundsError(
                "The loop has no scorer: give rounds.preferences (a reward model trained each round) "
                "or rounds.score_fn (a checker, module:function)."
            )
        if (cfg.sft_variants or cfg.dpo_variants) and not cfg.eval_prompts:
            raise RoundsError(
                "Averaging variants chooses by held-out score: give rounds.eval_prompts as well."
            )
        for what, paths in (
            ("rounds.prompts", cfg.prompts),
            ("rounds.preferences", cfg.preferences),
            ("rounds.eval_prompts", cfg.eval_prompts),
        ):
            for path in paths:
                if not Path(path).is_file():
                    raise RoundsError(f"{what} names {path}, which does not exist.")
        for what, path in (("init_from", self.exp.init_from), ("rounds.first_policy", cfg.first_policy)):
            if path and not Path(path).exists():
                raise RoundsError(f"{what} names {path}, which does not exist.")
        if source_kind(self.first_policy) == "meta":
            raise RoundsError(
                f"Round 1 samples from {self.first_policy}, a Meta directory, which the sampler does not "
                "read; convert it (python -m llama_jax.convert) or name the conversion in rounds.first_policy."
            )
        if cfg.score_fn:
            load_function(cfg.score_fn)  # a missing file or function is one sentence now
        for variant in cfg.sft_variants + cfg.dpo_variants:
            try:
                apply_overrides(self.exp, shlex.split(variant))
            except (ConfigError, ValueError) as err:  # ValueError: shlex's unclosed quote
                raise RoundsError(f"The variant {variant!r}: {err}") from None
        for step in STEPS:
            apply_overrides(self.exp, list(getattr(cfg, step)))  # ConfigError names a bad override

    def _check_workdir(self) -> None:
        """A workdir holds one loop: the same experiment (only rounds.rounds may grow)."""
        record = json.loads(json.dumps(dataclasses.asdict(self.exp), default=str))
        record["rounds"].pop("rounds")
        path = self.workdir / "experiment.json"
        previous = _read_json(path)
        if previous is not None and previous != record:
            differs = sorted(k for k in record.keys() | previous.keys() if record.get(k) != previous.get(k))
            raise RoundsError(
                f"{self.workdir} holds a loop of another experiment ({', '.join(differs)} differ); "
                "choose another --workdir."
            )
        _write_json(path, record)

    # --- steps ---------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.time() - self.start:6.0f} s] {message}", flush=True)

    def step_experiment(self, step: str, r: int, sources, init_from: str, extra=()) -> Experiment:
        exp = self.exp
        posttrain = dataclasses.replace(exp.posttrain or PosttrainConfig(), stage=step)
        step_exp = exp.replace(
            name=f"{exp.name}_round{r}_{step}",
            rounds=None,
            stage="",
            phases=(),
            posttrain=posttrain,
            init_from=init_from,
            data=dataclasses.replace(exp.data, sources=tuple(sources), tokenizer_path=self.tokenizer),
            # RM and DPO hold out posttrain.eval_fraction of their pairs; SFT evaluates on the
            # experiment's held-out chats, if it names any.
            eval_data=exp.eval_data if step == "sft" else None,
        )
        return apply_overrides(step_exp, list(getattr(self.cfg, step)) + list(extra))

    def train(self, exp: Experiment, workdir: Path) -> Path:
        """Trains (or resumes) unless finished before; the finished marker is written last."""
        marker = workdir / "round_step_done.json"
        if not marker.exists():
            began = time.time()
            self.log(f"training {workdir.relative_to(self.workdir)}")
            trainer = Trainer(exp, workdir, get_stage(exp.stage_name), quiet=True)
            last = trainer.run()
            step = int(last["state"].step)
            if trainer.stopped or step < exp.train.steps:
                raise Interrupted(
                    f"{workdir} stopped at step {step} of {exp.train.steps} (a stop was requested); "
                    "the same command resumes it."
                )
            metrics = {k: v for k, v in last.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            _write_json(marker, {"seconds": time.time() - began, "metrics": metrics})
        return workdir

    def sample(
        self, policy: str, prompts, out: Path, *, k: int, temperature: float, pairs: bool, scorer, seed: int
    ):
        """rejection_sample's records (resuming a partial `out`)."""
        done = out.with_name(out.name + ".done")
        if not done.exists():
            self.log(f"sampling {out.relative_to(self.workdir)} from {policy}")
            # The first policy may be a Hugging Face download; every later one is a llama_jax run.
            source = "--hf" if source_kind(policy) == "hf" else "--ckpt"
            args = [source, policy, "--tokenizer", self.tokenizer, "--prompts", *prompts, "--out", str(out)]
            args += [
                *scorer,
                "--k",
                str(k),
                "--temperature",
                str(temperature),
                "--top-p",
                str(self.cfg.top_p),
            ]
            args += ["--max-new-tokens", str(self.cfg.max_new_tokens), "--seed", str(seed), "--quiet"]
            args += ["--batch-prompts", str(max(1, 256 // k))]
            if pairs:
                args.append("--pairs")
            rejection.run_from_args(args)
            done.touch()
        return _read_jsonl(out)

    def heldout(self, model: str, out: Path, scorer) -> float | None:
        """The mean score of greedy replies to the held-out prompts; None without them."""
        if not self.cfg.eval_prompts:
            return None
        records = self.sample(
            model, self.cfg.eval_prompts, out, k=1, temperature=0.0, pairs=False, scorer=scorer, seed=0
        )
        if not records:
            raise RoundsError(
                "No held-out prompt fits the model's context with rounds.max_new_tokens; shorten them or "
                "the replies."
            )
        return sum(r["chosen_score"] for r in records) / len(records)

    def train_with_variants(
        self, step: str, r: int, sources, init_from: str, round_dir: Path, scorer
    ) -> dict:
        """The step's model: one run, or its variants' average or best variant (Llama 3's model
        averaging); with held-out scores."""
        variants = getattr(self.cfg, f"{step}_variants")
        if not variants:
            path = self.train(self.step_experiment(step, r, sources, init_from), round_dir / step)
            return {
                "path": str(path),
                "heldout": self.heldout(str(path), round_dir / f"eval_{step}.jsonl", scorer),
            }
        members = {}
        for i, variant in enumerate(variants):
            exp = self.step_experiment(step, r, sources, init_from, shlex.split(variant))
            path = self.train(exp, round_dir / f"{step}_v{i}")
            members[str(path)] = self.heldout(str(path), round_dir / f"eval_{step}_v{i}.jsonl", scorer)
        average = round_dir / f"{step}_avg"
        if not average.exists():
            self.log(f"averaging {len(members)} {step} variants into {average.relative_to(self.workdir)}")
            write_average(list(members), average, progress=False)
        average_score = self.heldout(str(average), round_dir / f"eval_{step}_avg.jsonl", scorer)
        chosen = choose_average(members, average_score)
        path = str(average) if chosen == "average" else chosen
        self.log(
            f"round {r} {step}: the average scores {average_score:.3f} against its variants' "
            f"{', '.join(f'{s:.3f}' for s in members.values())}; {Path(path).name} goes on"
        )
        return {
            "path": path,
            "heldout": max([average_score, *members.values()]),
            "variants": {Path(p).name: s for p, s in members.items()},
            "average": average_score,
            "chosen": Path(path).name,
        }

    # --- a round -------------------------------------------------------------------------------

    def _start_round(self, round_dir: Path, policy: str) -> None:
        """A round's steps are kept for the model it samples from: where an earlier run of the
        round started from another one (an earlier round chose differently), its work is moved
        aside to roundR.from-another-policy-N, not used and not deleted."""
        recorded = _read_json(round_dir / "policy.json")
        if recorded is not None and recorded["policy"] != policy:
            n = 1
            while round_dir.with_name(f"{round_dir.name}.from-another-policy-{n}").exists():
                n += 1
            aside = round_dir.rename(round_dir.with_name(f"{round_dir.name}.from-another-policy-{n}"))
            self.log(
                f"{round_dir.name} had started from {recorded['policy']}, not {policy}: moved to {aside.name}"
            )
        round_dir.mkdir(exist_ok=True)
        _write_json(round_dir / "policy.json", {"policy": policy})

    def run_round(self, r: int, policy: str) -> dict:
        cfg, round_dir = self.cfg, self.workdir / f"round{r}"
        self._start_round(round_dir, policy)
        result = {"round": r, "policy": policy}
        if cfg.preferences:
            files = list(cfg.preferences[:r])  # later rounds than files: every file
            rm_exp = self.step_experiment(
                "rm", r, [SourceConfig(tuple(files), field="prompt")], self.exp.init_from
            )
            rm = self.train(rm_exp, round_dir / "rm")
            result["rm"] = str(rm)
            scorer = ["--reward-model", str(rm)]
        else:
            scorer = ["--score", cfg.score_fn]
        # The held-out score: the checker where there is one, else this round's reward model.
        eval_scorer = ["--score", cfg.score_fn] if cfg.score_fn else scorer
        # The model sampled from, scored as this round's models are (a reward model changes by round).
        result["policy_heldout"] = self.heldout(policy, round_dir / "eval_policy.jsonl", eval_scorer)

        seed = self.exp.train.seed * 1000 + r
        records = self.sample(
            policy, cfg.prompts, round_dir / "rs.jsonl", k=cfg.k, temperature=cfg.temperature, pairs=False,
            scorer=scorer, seed=seed,
        )  # fmt: skip
        kept = kept_samples(records, cfg.min_score)
        if not (round_dir / "samples.jsonl").exists():
            _write_jsonl(round_dir / "samples.jsonl", kept)
        result["samples"] = sample_stats(records, len(kept))
        self.log(
            f"round {r}: {len(kept)} of {len(records)} prompts kept (mean sample score "
            f"{result['samples']['mean_score']:.3f}, best of {cfg.k} {result['samples']['best_score']:.3f})"
        )

        sample_files = [
            str(path)
            for path in (self.workdir / f"round{i}" / "samples.jsonl" for i in range(1, r + 1))
            if path.exists() and path.stat().st_size
        ]
        sources = list(self.exp.data.sources)
        if sample_files:
            sources.append(dataclasses.replace(sft_source(tuple(sample_files)), weight=cfg.samples_weight))
        result["sft"] = self.train_with_variants(
            "sft", r, sources, self.exp.init_from, round_dir, eval_scorer
        )

        pair_records = self.sample(
            result["sft"]["path"], cfg.prompts, round_dir / "dpo_samples.jsonl", k=cfg.dpo_k,
            temperature=cfg.temperature, pairs=True, scorer=scorer, seed=seed + 500,
        )  # fmt: skip
        pairs = [p for p in pair_records if "rejected" in p]
        result["pairs"] = len(pairs)
        if len(pairs) >= 2:  # DPO holds out a share of its pairs and trains on the rest
            if not (round_dir / "pairs.jsonl").exists():
                _write_jsonl(round_dir / "pairs.jsonl", pairs)
            source = SourceConfig(str(round_dir / "pairs.jsonl"), field="prompt")
            result["dpo"] = self.train_with_variants(
                "dpo", r, [source], result["sft"]["path"], round_dir, eval_scorer
            )
        else:
            self.log(
                f"round {r}: {len(pairs)} DPO pair(s) (every other prompt's samples scored the same); no DPO"
            )
        return result

    @staticmethod
    def choose_next(result: dict) -> None:
        """The round's model that goes on (`best`, `best_path`, `best_heldout`), the one it sampled
        from included: a round whose models score lower keeps its predecessor."""
        scores = {"previous": result["policy_heldout"]}
        scores.update({step: result[step]["heldout"] for step in ("sft", "dpo") if step in result})
        best = best_of_round(scores)
        result.update(
            best=best,
            best_path=result["policy"] if best == "previous" else result[best]["path"],
            best_heldout=scores[best],
        )

    def run(self) -> dict:
        policy = self.first_policy
        rounds = []
        for r in range(1, self.cfg.rounds + 1):
            marker = self.workdir / f"round{r}" / "round.json"
            result = _read_json(marker)
            if result is None or result["policy"] != policy:
                result = self.run_round(r, policy)
                _write_json(marker, result)
            self.choose_next(result)
            heldout = result["best_heldout"]
            self.log(
                f"round {r} done: {result['best']} goes on"
                + (f" (held-out score {heldout:.3f})" if heldout is not None else "")
            )
            rounds.append(result)
            policy = result["best_path"]
        summary = {"rounds": rounds, "final": policy, "table": table(rounds, self.cfg.k)}
        _write_json(self.workdir / "summary.json", summary)
        (self.workdir / "summary.md").write_text(summary["table"] + "\n")
        return summary


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def table(rounds: list[dict], k: int) -> str:
    """The rounds as a Markdown table."""
    head = [
        "round",
        "sampled from",
        "its held-out score",
        "kept / prompts",
        f"sample score (mean / best of {k})",
        "SFT held-out",
        "DPO pairs",
        "DPO held-out",
        "goes on",
    ]
    lines, previous = [head], None
    for result in rounds:
        samples = result["samples"]
        best = result["best"]
        lines.append(
            [
                str(result["round"]),
                "the first policy" if previous is None else f"round {previous['round']}'s",
                _score(result["policy_heldout"]),
                f"{samples['kept']} / {samples['prompts']}",
                f"{samples['mean_score']:.3f} / {samples['best_score']:.3f}",
                _score(result["sft"]["heldout"]),
                str(result["pairs"]),
                _score(result["dpo"]["heldout"]) if "dpo" in result else "no pairs",
                "the model it sampled from"
                if best == "previous"
                else best + (f" ({result[best]['chosen']})" if "chosen" in result[best] else ""),
            ]
        )
        previous = result
    return markdown_table(lines)


def markdown_table(lines: list[list[str]]) -> str:
    """Rows of cells (the first the header) as a Markdown table with aligned columns."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.posttrain.rounds",
        description="Llama 3's post-training loop: rounds of reward model, rejection sampling, SFT and DPO; "
        "resumable.",
        epilog="Overrides: any field, e.g. rounds.rounds=2 rounds.k=16 train.seed=1.",
    )
    parser.add_argument(
        "--exp", required=True, help="an experiment with `rounds` settings (name or .py path)"
    )
    parser.add_argument("--workdir", default=None, help="where every round goes (default runs/EXP)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        exp = apply_overrides(load_experiment(args.exp), args.overrides)
        loop = Loop(exp, args.workdir or Path("runs") / exp.name, quiet=args.quiet)
        summary = loop.run()
    except (
        RoundsError,
        ConfigError,
        ScoringError,
        rejection.RejectionSamplingError,
        GenerationError,
        CheckpointError,
        ConversionError,
        AveragingError,
        DataError,
        MeshError,
        RunLockError,
        OSError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DivergenceError, Interrupted) as err:  # not bad input: the run itself stopped
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summary["table"])
        print(f"The final model: {summary['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
