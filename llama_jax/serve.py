"""An OpenAI-compatible HTTP server for llama_jax and Hugging Face models.

    python -m llama_jax.serve (--ckpt DIR | --hf DIR) [--tokenizer F] [--quant int8|fp8]
                              [--port 8000] [--slots 8] [--max-len N] [--queue 64]

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer family's chat format;
Llama 3.1 tool calls), GET /v1/models, GET /health. `stream: true` answers with server-sent events
as OpenAI's API does; every response carries usage counts (a stream in its last chunk). Requests
are decoded together by continuous batching (serving.py): beyond the slots they wait in a bounded
queue, beyond the queue they get HTTP 429. A request the server cannot take gets an OpenAI-style
JSON error with a 4xx status; the other requests go on.

The app is FastAPI on uvicorn; `make_app(engine, tokenizer, name)` builds it for any engine.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import functools
import json
import secrets
import sys
import time
from typing import Any, Literal, Union

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llama_jax.chat_template import PYTHON_TAG, ChatTemplateError, encode_chat
from llama_jax.serving import Engine, QueueFull, Request, RequestError

MAX_STOP_STRINGS = 4
DEFAULT_MAX_LEN = 8192  # tokens per slot unless --max-len says otherwise


class ApiError(Exception):
    """An error answered as OpenAI's API answers it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


# ---------------------------------------------------------------------- request bodies


# OpenAI's fields that change nothing here (accepted and ignored), and those this server does not
# implement (refused unless they hold OpenAI's default, rather than silently answering otherwise).
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice")
UNSUPPORTED_FIELDS = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # not OpenAI's; vLLM's extension
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)
    n: int = Field(default=1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    tool_choice: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    response_format: Any = None

    def check_supported(self) -> None:
        for field, defaults in UNSUPPORTED_FIELDS.items():
            value = getattr(self, field)
            if not any(value == d and type(value) is type(d) for d in defaults):
                raise ApiError(400, f"'{field}' is not supported by this server.", field)
        if self.tool_choice not in (None, "auto", "none"):
            raise ApiError(400, "Only tool_choice 'auto' and 'none' are supported.", "tool_choice")


class CompletionBody(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "ipython"]
    content: Union[str, list[dict[str, Any]], None] = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------------- text of a choice


class _Choice:
    """One generated sequence: its tokens, its text so far, and what of it has been sent.

    Text is decoded from all tokens so far (token-by-token decoding would lose SentencePiece's
    spaces and split UTF-8 characters). Text that could be the start of a stop string is held
    back until the next tokens show it is not."""

    def __init__(self, index: int, tokenizer, stops: list[str]):
        self.index, self.tokenizer, self.stops = index, tokenizer, stops
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.finish_reason: str | None = None
        self.stopped_by_string = False

    def add(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        for stop in self.stops:
            at = text.find(stop, max(self.sent - len(stop), 0))
            if at != -1:
                text, self.stopped_by_string = text[:at], True
        self.text = text

    def ready_text(self) -> str:
        """New text that is safe to send now."""
        end = len(self.text)
        if self.finish_reason is None:
            if self.text.endswith("\ufffd"):  # the rest of a multi-byte character is coming
                return ""
            for stop in self.stops:  # hold back a possible beginning of a stop string
                for cut in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:cut]):
                        end = min(end, len(self.text) - cut)
                        break
        new = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return new


def _stop_strings(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(400, f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings.", "stop")
    return stops


# ---------------------------------------------------------------------- tool calls (Llama 3.1)


def _tool_call(text: str) -> dict | None:
    """An OpenAI tool call from a Llama 3.1 call: JSON {"name", "parameters"} (custom tools) or
    `tool.call(key=value, ...)` (built-in tools); None if the text is neither."""
    text = text.strip()
    try:
        call = json.loads(text)
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = call.get("parameters", call.get("arguments", {}))
            return {"name": call["name"], "arguments": json.dumps(arguments)}
    except json.JSONDecodeError:
        pass
    try:
        node = ast.parse(text, mode="eval").body
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
        ):
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            return {"name": node.func.value.id, "arguments": json.dumps(arguments)}
    except (SyntaxError, ValueError):
        pass
    return None


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, "Only text content parts are supported.", "messages")
        parts.append(part["text"])
    return "".join(parts)


def _llama_messages(body: ChatBody) -> list[dict]:
    """OpenAI messages as Llama 3.1 reads them: an assistant's tool_calls become its
    `<|python_tag|>` JSON call, `tools` become a system message listing them."""
    messages = []
    for message in body.messages:
        content = _content_text(message.content)
        if message.role == "assistant" and message.tool_calls:
            function = message.tool_calls[0].get("function") or {}
            try:
                parameters = json.loads(function.get("arguments") or "{}")
            except json.JSONDecodeError:
                raise ApiError(400, "A tool call's arguments are not JSON.", "messages") from None
            content = PYTHON_TAG + json.dumps({"name": function.get("name"), "parameters": parameters})
        messages.append({"role": message.role, "content": content})
    if body.tools:
        listing = "\n\n".join(json.dumps(tool.get("function", tool)) for tool in body.tools)
        system = (
            "Environment: ipython\n\nYou have access to the following functions. To call one, "
            'respond with JSON of the form {"name": function name, "parameters": {argument name: '
            "value}} and nothing else.\n\n" + listing
        )
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": system + "\n\n" + messages[0]["content"]}
        else:
            messages.insert(0, {"role": "system", "content": system})
    return messages


# ---------------------------------------------------------------------- the app


def _sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _invalid_body_error(err: RequestValidationError) -> ApiError:
    """FastAPI's validation error as one OpenAI-style sentence."""
    first = err.errors()[0] if err.errors() else {}
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, "The request body is not valid JSON.")
    if first.get("type") == "extra_forbidden":
        return ApiError(
            400, f"Unrecognized request argument: {'.'.join(where)}.", where[-1] if where else None
        )
    message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}."
    return ApiError(400, message, where[0] if where else None)


class _Generation:
    """The choices of one API request, their engine requests, and the events the engine thread
    sends back for them."""

    def __init__(self, kind: str, name: str, prompts: list[list[int]]):
        self.kind, self.name, self.prompts = kind, name, prompts
        self.ident, self.created = f"{kind}-{secrets.token_hex(12)}", int(time.time())
        self.choices: list[_Choice] = []
        self.requests: list[Request] = []
        self.events: asyncio.Queue = asyncio.Queue()

    def envelope(self, obj: str, choices: list, with_usage: bool = False) -> dict:
        out = {
            "id": self.ident,
            "object": obj,
            "created": self.created,
            "model": self.name,
            "choices": choices,
        }
        if with_usage:
            out["usage"] = self.usage()
        return out

    def usage(self) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(len(c.tokens) for c in self.choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def updates(self, http: HttpRequest, engine: Engine):
        """Each choice as it gains text or finishes, until all have finished (or the client left).
        The engine's requests are cancelled on the way out: a no-op for finished ones, the freeing
        of their slots for the rest."""
        unfinished = len(self.choices)
        try:
            while unfinished:
                try:
                    choice, kind, value = await asyncio.wait_for(self.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if choice.finish_reason is not None:
                    continue  # e.g. the engine's "cancelled" after a stop string ended it here
                if kind == "token":
                    choice.add(value)
                    if choice.stopped_by_string:
                        choice.finish_reason = "stop"
                        engine.cancel(self.requests[choice.index])
                else:
                    choice.finish_reason = value
                if choice.finish_reason is not None:
                    unfinished -= 1
                if choice.finish_reason == "error":
                    raise ApiError(500, "The model failed while generating.", None, "server_error")
                yield choice
        finally:
            for request in self.requests:
                engine.cancel(request)


class _Server:
    """What the endpoints share: the engine, the tokenizer and the model's name."""

    def __init__(self, engine: Engine, tokenizer, name: str, template: str | None):
        self.engine, self.tokenizer, self.name, self.template = engine, tokenizer, name, template
        self.python_tag = tokenizer.special_tokens.get(PYTHON_TAG)

    def check(self, body: _Sampling) -> None:
        body.check_supported()
        if body.model is not None and body.model != self.name:
            raise ApiError(
                404,
                f"The model '{body.model}' does not exist; this server has '{self.name}'.",
                "model",
                "not_found_error",
            )

    def max_tokens(self, body: _Sampling, prompt: list[int], default: int | None) -> int:
        max_len = self.engine.max_len
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if limit is None:
            limit = default if default is not None else max_len - len(prompt)
        if len(prompt) >= max_len:
            raise ApiError(
                400, f"The prompt has {len(prompt)} tokens; the server's context is {max_len}.", "messages"
            )
        if len(prompt) + limit > max_len:
            raise ApiError(
                400,
                f"The prompt ({len(prompt)} tokens) plus max_tokens ({limit}) exceed the server's "
                f"context of {max_len} tokens.",
                "max_tokens",
            )
        return limit

    def completion_prompts(self, raw) -> list[list[int]]:
        """Token ids of `prompt`: a string, a list of strings, ids, or a list of id lists."""
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)) or not raw:
            raw = [raw]
        vocab = self.engine.cfg.vocab_size
        prompts = []
        for prompt in raw:
            if not prompt:
                raise ApiError(400, "The prompt is empty.", "prompt")
            if isinstance(prompt, str):
                prompts.append(self.tokenizer.encode(prompt, bos=True))
            elif any(t < 0 or t >= vocab for t in prompt):
                raise ApiError(400, f"A prompt token is outside the vocabulary of {vocab}.", "prompt")
            else:
                prompts.append(list(prompt))
        return prompts

    def start(self, kind: str, body: _Sampling, prompts: list[list[int]], max_tokens: int) -> _Generation:
        """Queue n choices per prompt with the engine (429 if it is full)."""
        if body.n > self.engine.slots:
            raise ApiError(400, f"n is at most {self.engine.slots} (the server's slots).", "n")
        stops = _stop_strings(body.stop)
        loop = asyncio.get_running_loop()
        generation = _Generation(kind, self.name, prompts)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        for prompt in prompts:
            for _ in range(body.n):
                choice = _Choice(len(generation.choices), self.tokenizer, stops)

                def send(kind, value, choice=choice):  # called from the engine's thread
                    loop.call_soon_threadsafe(generation.events.put_nowait, (choice, kind, value))

                generation.choices.append(choice)
                generation.requests.append(
                    Request(
                        prompt,
                        max_tokens,
                        temperature=body.temperature,
                        top_k=body.top_k,
                        top_p=body.top_p,
                        seed=(seed + choice.index) % 2**32,
                        stop_ids=() if body.ignore_eos else self.tokenizer.stop_ids,
                        on_token=functools.partial(send, "token"),
                        on_finish=functools.partial(send, "finish"),
                    )
                )
        try:
            self.engine.submit(*generation.requests)
        except QueueFull as err:
            raise ApiError(429, str(err), None, "rate_limit_error") from None
        except RequestError as err:
            raise ApiError(400, str(err)) from None
        return generation

    def is_tool_call(self, body: ChatBody, choice: _Choice) -> bool:
        return bool(choice.tokens) and (
            choice.tokens[0] == self.python_tag or bool(body.tools and choice.text.lstrip().startswith("{"))
        )

    def message(self, body: ChatBody, choice: _Choice) -> tuple[dict, str]:
        """The assistant message of a finished choice (a tool call where the reply is one) and its
        finish reason."""
        if self.is_tool_call(body, choice):
            call = _tool_call(self.tokenizer.decode([t for t in choice.tokens if t != self.python_tag]))
            if call is not None:
                tool = {"id": f"call_{secrets.token_hex(8)}", "type": "function", "function": call}
                return {"role": "assistant", "content": None, "tool_calls": [tool]}, "tool_calls"
        return {"role": "assistant", "content": choice.text}, choice.finish_reason

    async def completion_stream(self, http, generation: _Generation):
        async for choice in generation.updates(http, self.engine):
            text = choice.ready_text()
            if text or choice.finish_reason:
                item = {
                    "index": choice.index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                }
                yield _sse(generation.envelope("text_completion", [item]))
        yield _sse(generation.envelope("text_completion", [], with_usage=True))
        yield "data: [DONE]\n\n"

    async def chat_stream(self, http, body: ChatBody, generation: _Generation):
        def chunk(index, delta, finish_reason):
            item = {"index": index, "delta": delta, "finish_reason": finish_reason}
            return _sse(generation.envelope("chat.completion.chunk", [item]))

        for choice in generation.choices:
            yield chunk(choice.index, {"role": "assistant", "content": ""}, None)
        async for choice in generation.updates(http, self.engine):
            if self.is_tool_call(body, choice) or (body.tools and not choice.text.strip()):
                if choice.finish_reason is None:
                    continue  # a tool call is sent whole, once it has ended
                message, reason = self.message(body, choice)
                delta = {k: v for k, v in message.items() if k != "role"}
                if "tool_calls" in delta:
                    delta["tool_calls"] = [dict(delta["tool_calls"][0], index=0)]
                yield chunk(choice.index, delta, reason)
                continue
            text = choice.ready_text()
            if text or choice.finish_reason:
                yield chunk(choice.index, {"content": text} if text else {}, choice.finish_reason)
        yield _sse(generation.envelope("chat.completion.chunk", [], with_usage=True))
        yield "data: [DONE]\n\n"


def make_app(engine: Engine, tokenizer, name: str, template: str | None = None) -> FastAPI:
    app = FastAPI(title="llama_jax", docs_url=None, redoc_url=None)
    server = _Server(engine, tokenizer, name, template)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, err: RequestValidationError):
        return await api_error(_, _invalid_body_error(err))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "steps": engine.steps, **engine.load()}

    @app.get("/v1/models")
    async def models():
        card = {"id": name, "object": "model", "created": created, "owned_by": "llama_jax"}
        return {"object": "list", "data": [dict(card, max_model_len=engine.max_len)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        server.check(body)
        prompts = server.completion_prompts(body.prompt)
        max_tokens = max(server.max_tokens(body, p, 16) for p in prompts)
        generation = server.start("cmpl", body, prompts, max_tokens)
        if body.stream:
            return StreamingResponse(
                server.completion_stream(http, generation), media_type="text/event-stream"
            )
        async for _ in generation.updates(http, engine):
            pass
        items = [
            {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for c in generation.choices
        ]
        return generation.envelope("text_completion", items, with_usage=True)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HttpRequest):
        server.check(body)
        try:
            messages = _llama_messages(body)
            prompt = encode_chat(tokenizer, messages, template=template, add_generation_prompt=True).ids
        except ChatTemplateError as err:
            raise ApiError(400, str(err), "messages") from None
        generation = server.start("chatcmpl", body, [prompt], server.max_tokens(body, prompt, None))
        if body.stream:
            return StreamingResponse(
                server.chat_stream(http, body, generation), media_type="text/event-stream"
            )
        async for _ in generation.updates(http, engine):
            pass
        items = []
        for choice in generation.choices:
            message, reason = server.message(body, choice)
            items.append(
                {"index": choice.index, "message": message, "logprobs": None, "finish_reason": reason}
            )
        return generation.envelope("chat.completion", items, with_usage=True)

    return app


# ---------------------------------------------------------------------- the CLI


def _load(args) -> tuple[Engine, object, str]:
    """(engine, tokenizer, the model's API name) from the command line; errors are one sentence."""
    from pathlib import Path

    import jax

    from llama_jax.config import MeshConfig
    from llama_jax.generate import load_model
    from llama_jax.model import param_logical_axes
    from llama_jax.quantize import quantize_params, unstack_layers
    from llama_jax.sharding import make_mesh, tree_shardings

    if not 1 <= args.port <= 65535:
        raise RequestError(f"--port must be between 1 and 65535, got {args.port}.")
    try:
        buckets = [int(b) for b in args.buckets.split(",")] if args.buckets else None
    except ValueError:
        raise RequestError(f"--buckets takes lengths separated by commas, got {args.buckets!r}.") from None
    if buckets and min(buckets) < 1:
        raise RequestError("--buckets must be positive lengths.")
    # Before the model loads (the engine checks them again against the model's context).
    if args.max_len is not None and args.max_len < 2:
        raise RequestError(f"--max-len must be at least 2 tokens, got {args.max_len}.")
    if args.slots < 1 or args.queue < 0:
        raise RequestError("--slots must be at least 1 and --queue at least 0.")
    cfg, params, tokenizer = load_model(args.ckpt, args.hf, args.tokenizer)
    # Layers unrolled (as the engine runs them), before placing, so only one copy is kept.
    params, cfg = unstack_layers(params, cfg), cfg.replace(scan_layers=False)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=args.tensor))
    params = jax.device_put(params, tree_shardings(params, param_logical_axes(cfg), mesh))
    if args.quant:
        cfg, params = quantize_params(params, cfg, args.quant)
    engine = Engine(
        params,
        cfg,
        slots=args.slots,
        # Every slot holds max_len tokens of cache: Llama 3.1's whole 128K context in 8 slots
        # would be over 100 GB for the 8B model, so longer slots are asked for, not assumed.
        max_len=min(cfg.max_seq_len, DEFAULT_MAX_LEN) if args.max_len is None else args.max_len,
        queue_size=args.queue,
        buckets=buckets,
        mesh=mesh,
    )
    return engine, tokenizer, args.name or Path(args.ckpt or args.hf).resolve().name


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.serve", description="Serve a model with an OpenAI-compatible HTTP API."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a llama_jax parameters checkpoint or training workdir")
    source.add_argument("--hf", help="a Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or a directory holding one")
    parser.add_argument(
        "--quant", choices=("int8", "fp8"), default=None, help="quantize the weights for serving"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--name", default=None, help="the model's id in the API (default: the directory's name)"
    )
    parser.add_argument("--slots", type=int, default=8, help="requests decoded at once")
    parser.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot")
    parser.add_argument(
        "--max-len",
        type=int,
        default=None,
        help=f"tokens per slot (default: the model's context, at most {DEFAULT_MAX_LEN})",
    )
    parser.add_argument(
        "--buckets",
        default=None,
        help="prompt lengths compiled for prefill, e.g. 128,512,2048 (default: powers of two)",
    )
    parser.add_argument(
        "--tensor", type=int, default=1, help="devices that split each layer (tensor parallelism)"
    )
    parser.add_argument(
        "--template",
        choices=("llama2", "llama3", "hf"),
        default=None,
        help="chat format (default: the tokenizer's family's)",
    )
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    from llama_jax.checkpoint import CheckpointError
    from llama_jax.convert import ConversionError
    from llama_jax.generate import GenerationError
    from llama_jax.sharding import MeshError

    try:
        engine, tokenizer, name = _load(args)
        app = make_app(engine, tokenizer, name, args.template)
    except (
        RequestError,
        GenerationError,
        CheckpointError,
        ConversionError,
        MeshError,
        ValueError,
        FileNotFoundError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import uvicorn
    from tqdm import tqdm

    with tqdm(
        total=len(engine.buckets) + len(engine.row_buckets), desc="compiling", unit="shape", file=sys.stderr
    ) as bar:
        engine.warm_up(lambda what: (bar.set_postfix_str(what), bar.update(1)))
    engine.start()
    print(
        f"Serving {name} on http://{args.host}:{args.port}/v1 ({args.slots} slots)",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except (OSError, SystemExit) as err:
        print(f"error: cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
