"""lm-evaluation-harness on llama_jax models: the `llama_jax` model type and the CLI behind
`python -m llama_jax.eval harness`.

    python -m llama_jax.eval harness (--ckpt DIR | --hf DIR) [--tokenizer F] --tasks a,b
        [--include-path DIR] [--num-fewshot K] [--limit N] [--batch-size B] [--no-bos] [--output FILE]

    import llama_jax.eval_harness  # registers "llama_jax" with the harness
    lm_eval.simple_evaluate(model="llama_jax", model_args="hf=DIR", tasks=[...])
    lm_eval.simple_evaluate(model=LlamaJaxLM(cfg, params, tokenizer), tasks=[...])

The three request types give what the harness's own Hugging Face model (`hf`) gives for the same
weights and tokenizer, because they tokenize the same way:

* loglikelihood (context, continuation): the context's trailing spaces move into the
  continuation; the continuation's tokens are those of context + continuation after the
  context's own; an empty context is BOS. Rows too long keep their last max_length + 1 tokens.
  The result is (summed log-probability, whether every continuation token is the argmax).
* loglikelihood_rolling (text): the text's tokens (with BOS, as `hf` encodes it: so BOS is
  predicted from BOS, a constant the harness also counts) after a BOS prefix, in disjoint windows
  of max_length predictions, the last one with a full context (the harness's window helpers).
* generate_until (context, gen_kwargs): greedy unless `do_sample` / `temperature` ask for
  sampling, at most `max_gen_toks` tokens after the context's last max_length - max_gen_toks;
  the text is cut at the first of the `until` strings. All tokens are generated before the cut:
  stop strings are looked for on the host, only stop tokens end the loop on the device.

`add_bos=False` (--no-bos) is the harness's `add_bos_token=False`: texts are encoded without BOS,
yet an empty context and the rolling windows still start from BOS, as they do in the harness.
Scoring batches and pads rows as `scoring.loglikelihoods` does.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from llama_jax.config import SamplingConfig
from llama_jax.generate import generate
from llama_jax.quantize import MODES as QUANT_MODES
from llama_jax.quantize import quantize_params
from llama_jax.scoring import EvalError, loglikelihoods

# Generation pads prompts up to a multiple of this, so that batches compile few shapes.
PROMPT_BUCKET = 32


@register_model("llama_jax")
class LlamaJaxLM(TemplateLM):
    """A llama_jax model as an lm-evaluation-harness `LM`."""

    backend = "causal"

    def __init__(
        self,
        cfg,
        params,
        tokenizer,
        batch_size: int = 8,
        max_length: int | None = None,
        add_bos: bool = True,
        max_gen_toks: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        max_length = cfg.max_seq_len if max_length is None else int(max_length)
        if not 2 <= max_length <= cfg.max_seq_len:
            raise EvalError(
                f"max_length must be between 2 and the model's context of {cfg.max_seq_len} tokens, "
                f"got {max_length}."
            )
        if int(batch_size) < 1:
            raise EvalError(f"The batch size must be at least 1, got {batch_size}.")
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.batch_size, self.max_length = int(batch_size), max_length
        self.add_bos, self.max_gen_toks, self.seed = bool(add_bos), int(max_gen_toks), int(seed)
        self._bos_text = next((t for t, i in tokenizer.special_tokens.items() if i == tokenizer.bos_id), None)
        self._special_ids = set(tokenizer.special_tokens.values())

    @classmethod
    def from_files(
        cls,
        ckpt: str | None = None,
        hf: str | None = None,
        tokenizer: str | None = None,
        quant: str | None = None,
        **kwargs,
    ) -> "LlamaJaxLM":
        """Loads a llama_jax checkpoint (`ckpt`) or Hugging Face directory (`hf`), as the CLIs do."""
        from llama_jax.generate import load_model

        if (ckpt is None) == (hf is None):
            raise EvalError("Pass exactly one of ckpt=DIR and hf=DIR.")
        if quant is not None and quant not in QUANT_MODES:
            raise EvalError(f"quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}.")
        # The harness's argument parser turns a path such as "7" into a number.
        ckpt, hf, tokenizer = (None if p is None else str(p) for p in (ckpt, hf, tokenizer))
        cfg, params, tok = load_model(ckpt, hf, tokenizer)
        if quant:
            cfg, params = quantize_params(params, cfg, quant)
        return cls(cfg, params, tok, **kwargs)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None) -> "LlamaJaxLM":
        args = dict(arg_dict)
        # The harness also passes its --batch_size ("auto" or a number; model_args win over it),
        # --max_batch_size and a torch device, which mean nothing here.
        batch_size = (additional_config or {}).get("batch_size")
        if batch_size is not None and str(batch_size).isdigit():
            args.setdefault("batch_size", int(batch_size))
        return cls.from_files(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None) -> "LlamaJaxLM":
        """`ckpt=DIR` or `hf=DIR`, and optionally tokenizer=, quant=, batch_size=, max_length=,
        add_bos=, max_gen_toks=, seed=."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As a Hugging Face tokenizer does: special-token text is read as those tokens, and a text
        # that already starts with BOS's text gets no second BOS.
        if add_special_tokens is None:
            add_special_tokens = self.add_bos and not (self._bos_text and string.startswith(self._bos_text))
        return self.tokenizer.encode(string, bos=add_special_tokens, allowed_special="all")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows = []
        for _, context_ids, continuation_ids in requests:
            ids = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1) :]
            rows.append((ids, min(len(continuation_ids), len(ids) - 1)))
        scores, greedy = loglikelihoods(
            self.params,
            self.cfg,
            rows,
            seq_len=self.max_length,
            batch_size=self.batch_size,
            progress=not disable_tqdm,
            with_greedy=True,
        )
        results = [(float(s), bool(g)) for s, g in zip(scores, greedy)]
        for (request, _, _), answer in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for owner, request in enumerate(requests):
            (text,) = request.args
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, predicted in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None, context, predicted))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Requests with the same settings share batches; longest first, as the harness sorts.
        groups = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        results: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="generating", disable=disable_tqdm)
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            if not 0 < max_gen_toks < self.max_length:
                raise EvalError(
                    f"max_gen_toks ({max_gen_toks}) must be less than the context of {self.max_length} tokens."
                )
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            sampling = SamplingConfig(
                max_new_tokens=max_gen_toks,
                temperature=temperature,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )
            prompts = {}
            for i in indices:
                ids = self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen_toks) :]
                prompts[i] = ids or [self.prefix_token_id]  # an empty prompt starts from BOS
            indices = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                # A full batch of rows every time (repeating the last), so that one shape compiles.
                rows = [prompts[i] for i in batch] + [prompts[batch[-1]]] * (self.batch_size - len(batch))
                outputs = generate(
                    self.params,
                    self.cfg,
                    rows,
                    sampling,
                    stop_tokens=sorted({self.tokenizer.eos_id, *self.tokenizer.stop_ids}),
                    seed=self.seed + start,
                    prompt_bucket=PROMPT_BUCKET,
                )
                for i, tokens in zip(batch, outputs):
                    text = self.tokenizer.decode([t for t in tokens if t not in self._special_ids])
                    results[i] = postprocess_generated_text(text, until, think_end_token=None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                progress.update(len(batch))
        progress.close()
        return results


def _known_tasks(names: list[str], include_path: str | None):
    """A TaskManager that knows every name in `names`. The harness's ~15,000 built-in tasks take
    a while to index, so tasks that are all under `include_path` are looked up there alone."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([name]) for name in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if not manager.match_tasks([name])]
    if unknown:
        where = "the harness's tasks" + (f" or those under {include_path}" if include_path else "")
        unread = _unreadable_task_files(include_path) if include_path else []
        because = f"; these task files could not be read: {'; '.join(unread)}" if unread else ""
        raise EvalError(f"Unknown task {', '.join(map(repr, unknown))}: it is not among {where}{because}.")
    return manager


def _unreadable_task_files(include_path: str) -> list[str]:
    """The task files under `include_path` that the harness's own loader (lm-eval is pinned) cannot
    read, each with where and why: the harness skips them without a word, so their tasks are
    merely "unknown"."""
    import yaml
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    unread = []
    for path in TaskIndex._iter_yaml_files(Path(include_path)):
        try:
            load_yaml(path, resolve_func=False)
        except yaml.reader.ReaderError:
            unread.append(f"{path} is not UTF-8 text")
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
            unread.append(f"{path}{where} {(getattr(err, 'problem', None) or str(err)).splitlines()[0]}")
        except (ValueError, OSError) as err:  # not a mapping, an include cycle, a missing include
            unread.append(f"{path}: {getattr(err, 'strerror', None) or err}")
    return unread


def run_cli(args) -> int:
    """`python -m llama_jax.eval harness`, its flags parsed by eval.harness_parser."""
    import lm_eval

    from llama_jax.checkpoint import CheckpointError
    from llama_jax.convert import ConversionError
    from llama_jax.generate import GenerationError

    try:
        for flag, path in (("--ckpt", args.ckpt), ("--hf", args.hf), ("--include-path", args.include_path)):
            if path is not None and not Path(path).exists():
                raise EvalError(f"{flag} {path} does not exist.")
        if args.batch_size < 1:
            raise EvalError(f"--batch-size must be at least 1, got {args.batch_size}.")
        names = [name.strip() for name in args.tasks.split(",") if name.strip()]
        if not names:
            raise EvalError("--tasks names no task.")
        limit = args.limit
        if limit is not None and limit <= 0:
            raise EvalError(f"--limit must be positive (a count, or a fraction below 1), got {limit:g}.")
        if limit is not None and limit >= 1:
            limit = int(limit)
        if args.output and not Path(args.output).resolve().parent.is_dir():
            raise EvalError(f"--output {args.output}: its directory does not exist.")
        # Tasks first, so that a misspelt name fails before the model loads.
        manager = _known_tasks(names, args.include_path)
        lm = LlamaJaxLM.from_files(
            args.ckpt,
            args.hf,
            args.tokenizer,
            args.quant,
            batch_size=args.batch_size,
            max_length=args.max_length,
            add_bos=not args.no_bos,
        )
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=args.num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=bool(args.output),
        )
    except (EvalError, CheckpointError, ConversionError, GenerationError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:  # a task whose dataset lives on the Hub, from a host without it
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(
            f"error: a task's dataset could not be downloaded ({first}); on a host without the Hugging "
            "Face Hub, point the task at local files (--include-path).",
            file=sys.stderr,
        )
        return 2
    print(lm_utils.make_table(results))
    if results.get("groups"):
        print(lm_utils.make_table(results, "groups"))
    if args.output:
        text = json.dumps(results, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False)
        try:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
        except OSError as err:
            print(f"error: cannot write {args.output}: {err.strerror or err}.", file=sys.stderr)
            return 2
    return 0
