"""Text generation with a KV cache: one jitted prefill, then a decode loop on the device.

    python -m llama_jax.generate (--ckpt DIR | --hf DIR) [--tokenizer FILE_OR_DIR] --prompt "..." | --chat
                                 [--template llama2|llama3|hf] [--quant int8|fp8]

    generate(params, cfg, prompts, SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9),
             stop_tokens=(), seed=0, on_token=None, prompt_bucket=1) -> list[list[int]]

This is the one sampler: the CLI, PPO's rollouts, rejection sampling and the sample at the end of a
training run all call `generate` with a `config.SamplingConfig`.

Prompts of different lengths are left-padded to a common length (rounded up to a multiple of
`prompt_bucket`, so that callers with many batches compile few shapes); the padding has segment
id 0, so no token attends to it, and positions count from each prompt's own start. The decode loop is a
`lax.while_loop` (no Python dispatch per token) that stops when every row has emitted a stop
token. `on_token(step, tokens)` streams each new column of tokens to the host as it is made.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from llama_jax.chat_template import check_template, close_reply, next_turn_prompt
from llama_jax.config import ModelConfig, SamplingConfig
from llama_jax.model import KVCache, Llama
from llama_jax.quantize import MODES as QUANT_MODES
from llama_jax.quantize import quantize_params


class GenerationError(ValueError):
    """A request that cannot be served; the message is one sentence for the user."""


def sample_logits(logits, rng, temperature: float, top_k: int, top_p: float):
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else top-k / top-p sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "stream")
)
def _generate(
    params,
    tokens,
    positions,
    segment_ids,
    prompt_lengths,
    stop_tokens,
    rng,
    *,
    cfg,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    stream,
):
    batch, prompt_len = tokens.shape
    model = Llama(cfg)
    cache = KVCache.empty(cfg, batch, prompt_len + max_new_tokens)
    logits, cache = model.apply(
        {"params": params}, tokens, cache, positions, segment_ids, method=Llama.decode
    )

    def is_stop(token):
        return jnp.any(token[:, None] == stop_tokens[None, :], axis=-1)

    rng, key = jax.random.split(rng)
    first = sample_logits(logits[:, -1], key, temperature, top_k, top_p)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    if stream:
        io_callback(_STREAM, None, 0, first, ordered=True)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, out, done, rng, last = state
        position = (prompt_lengths + step - 1)[:, None]
        logits, cache = model.apply(
            {"params": params},
            last[:, None],
            cache,
            position,
            jnp.ones_like(last)[:, None],
            method=Llama.decode,
        )
        rng, key = jax.random.split(rng)
        token = sample_logits(logits[:, -1], key, temperature, top_k, top_p)
        token = jnp.where(done, 0, token)  # finished rows only pad
        if stream:
            io_callback(_STREAM, None, step, token, ordered=True)
        return step + 1, cache, out.at[:, step].set(token), done | is_stop(token), rng, token

    state = (jnp.int32(1), cache, out, is_stop(first), rng, first)
    _, _, out, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out


# The host-side sink of streamed tokens; set for the duration of one generate() call.
_stream_sink: list[Callable | None] = [None]


def _STREAM(step, tokens):  # noqa: N802 - called from the device through io_callback
    if _stream_sink[0] is not None:
        _stream_sink[0](int(step), np.asarray(tokens))


def generate(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    on_token: Callable[[int, np.ndarray], None] | None = None,
    prompt_bucket: int = 1,
) -> list[list[int]]:
    """New tokens for each prompt (up to and including a stop token, if one comes)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("Every prompt needs at least one token.")
    max_new_tokens, temperature = sampling.max_new_tokens, sampling.temperature
    top_k, top_p = sampling.top_k, sampling.top_p
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    lengths = np.array([len(p) for p in prompts], np.int32)
    prompt_len = int(lengths.max())
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise GenerationError(
            f"The prompt ({prompt_len} tokens) plus {max_new_tokens} new tokens "
            f"exceed the model's context of {cfg.max_seq_len} tokens."
        )
    if not 0.0 < top_p <= 1.0 or temperature < 0 or top_k < 0:
        raise GenerationError("Sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1.")
    batch = len(prompts)
    prompt_len = min(-(-prompt_len // prompt_bucket) * prompt_bucket, cfg.max_seq_len - max_new_tokens)
    tokens = np.zeros((batch, prompt_len), np.int32)
    segment_ids = np.zeros((batch, prompt_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt) :] = prompt
        segment_ids[row, prompt_len - len(prompt) :] = 1
    positions = np.maximum(np.arange(prompt_len)[None] - (prompt_len - lengths)[:, None], 0)
    stops = np.asarray(list(stop_tokens) or [-1], np.int32)
    _stream_sink[0] = on_token
    try:
        out = _generate(
            params,
            tokens,
            positions.astype(np.int32),
            segment_ids,
            lengths,
            stops,
            jax.random.key(seed),
            cfg=cfg,
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
            stream=on_token is not None,
        )
        out = np.asarray(out)
    finally:
        _stream_sink[0] = None
    results = []
    stop_set = set(int(t) for t in stop_tokens)
    for row in out.tolist():
        for i, token in enumerate(row):
            if token in stop_set:
                row = row[: i + 1]
                break
        results.append(row)
    return results


class _Printer:
    """Prints a streamed row as text: decodes everything so far and prints only what is new
    (token-by-token decoding would lose SentencePiece's spaces and split UTF-8 characters)."""

    def __init__(self, tokenizer, stop_tokens):
        self.tokenizer, self.stop = tokenizer, set(stop_tokens)
        self.tokens: list[int] = []
        self.printed = ""
        self.finished = False

    def __call__(self, step, tokens):
        token = int(tokens[0])
        if self.finished or token in self.stop:
            self.finished = True
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(self.printed) :], end="", flush=True)
            self.printed = text


def load_model(ckpt: str | None, hf: str | None, tokenizer_path: str | None = None):
    """(cfg, params, tokenizer) for the CLIs: a llama_jax checkpoint or HF directory, and its
    tokenizer (a file or a directory; default: the HF directory's `tokenizer.model`,
    `original/tokenizer.model` or `tokenizer.json`), checked to belong together."""
    from llama_jax.convert import load_hf
    from llama_jax.init_from import load_model as load_checkpoint  # a LoRA run comes merged
    from llama_jax.tokenizer import load_tokenizer

    # The model first: a wrong model path is the error to report, not the tokenizer it implies.
    for flag, path in (("--ckpt", ckpt), ("--hf", hf)):
        if path is not None and not Path(path).exists():
            raise GenerationError(f"{flag} {path} does not exist.")
    if hf and not (Path(hf) / "config.json").is_file():
        raise GenerationError(f"--hf {hf} is not a Hugging Face model directory: it has no config.json.")
    tokenizer_path = tokenizer_path or hf
    if tokenizer_path is None or not Path(tokenizer_path).exists():
        raise GenerationError("No tokenizer: pass --tokenizer path/to/tokenizer.model (or tokenizer.json).")
    tokenizer = load_tokenizer(tokenizer_path)
    cfg, params = load_hf(hf) if hf else load_checkpoint(ckpt)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GenerationError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {cfg.vocab_size}: they do not belong together."
        )
    return cfg, params, tokenizer


def sampling_from_flags(args) -> SamplingConfig:
    """The SamplingConfig of --max-new-tokens, --temperature, --top-k and --top-p; a value out of
    range is one sentence naming the flag."""
    try:
        return SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        name, _, rest = str(err).partition(" ")
        raise GenerationError(f"--{name.replace('_', '-')} {rest}") from None


def _chat(params, cfg, tokenizer, args, sampling: SamplingConfig) -> None:
    """Each turn's prompt is the previous prompt and reply token for token (the reply as the model
    produced it, not re-encoded from its text, so that e.g. a tool call's <|python_tag|> and
    <|eom_id|> come back as they were), then the new user message in the template's format."""
    check_template(tokenizer, args.template)  # before the first question, not after it
    messages = [{"role": "system", "content": args.system}] if args.system else []
    kept_ids: list[int] = []
    print("Chat; end with Ctrl-D.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        messages.append({"role": "user", "content": user})
        prompt = next_turn_prompt(tokenizer, messages, kept_ids, template=args.template)
        printer = _Printer(tokenizer, tokenizer.stop_ids)
        reply = generate(
            params,
            cfg,
            [prompt],
            sampling,
            stop_tokens=tokenizer.stop_ids,
            seed=args.seed,
            on_token=printer,
        )[0]
        print()
        text = tokenizer.decode([t for t in reply if t not in set(tokenizer.stop_ids)])
        messages.append({"role": "assistant", "content": text})
        kept_ids = prompt + close_reply(tokenizer, messages, reply, template=args.template)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.generate",
        description="Generate text from a llama_jax or Hugging Face model.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a llama_jax parameters checkpoint or training workdir")
    source.add_argument("--hf", help="a Hugging Face model directory (config.json + safetensors)")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.model, tokenizer.json or a directory holding one (default: --hf's directory)",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="text to continue")
    mode.add_argument("--chat", action="store_true", help="interactive chat in the model's format")
    parser.add_argument("--system", default="", help="a system message for --chat")
    parser.add_argument(
        "--template",
        choices=("llama2", "llama3", "hf"),
        default=None,
        help="chat format (default: the tokenizer family's; hf: the tokenizer's own Jinja chat_template)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quant",
        choices=QUANT_MODES,
        default=None,
        help="quantize the weights for inference (see llama_jax.quantize)",
    )
    args = parser.parse_args(argv)

    from llama_jax.checkpoint import CheckpointError
    from llama_jax.convert import ConversionError

    try:
        if not args.chat and (args.system or args.template):
            flag = "--system" if args.system else "--template"
            raise GenerationError(f"{flag} goes with --chat; --prompt continues plain text.")
        sampling = sampling_from_flags(args)
        cfg, params, tokenizer = load_model(args.ckpt, args.hf, args.tokenizer)
        if args.quant:
            cfg, params = quantize_params(params, cfg, args.quant)
        if args.chat:
            _chat(params, cfg, tokenizer, args, sampling)
            return 0
        prompt = tokenizer.encode(args.prompt, bos=True)
        print(args.prompt, end="", flush=True)
        generate(
            params,
            cfg,
            [prompt],
            sampling,
            stop_tokens=tokenizer.stop_ids,
            seed=args.seed,
            on_token=_Printer(tokenizer, tokenizer.stop_ids),
        )
        print()
    except (GenerationError, CheckpointError, ConversionError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
