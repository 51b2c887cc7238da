"""The OpenAI-compatible server, as a real process on 127.0.0.1, driven by the official `openai`
client and by raw HTTP: answers equal generate()'s, concurrency, disconnects, bad input, 429."""

import asyncio
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import openai
import pytest

from llama_jax.chat_template import encode_chat
from llama_jax.checkpoint import save_params
from llama_jax.config import ModelConfig, SamplingConfig
from llama_jax.data.synthetic import write_tiktoken_model
from llama_jax.generate import generate
from llama_jax.model import init_params
from llama_jax.tokenizer import load_tokenizer

CFG = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=556,  # 300 ranks + Llama 3's 256 special tokens
    max_seq_len=2048,
    init_std=0.3,
)
SLOTS, QUEUE, NAME = 4, 12, "tiny"  # 16 requests at once fit, a 17th is refused
REFERENCE_BUDGET = 24  # every reference generate() shares one shape: this budget, prompts padded to 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, params, tokenizer) of a server process on a random 2-layer model."""
    root = tmp_path_factory.mktemp("serve")
    params = init_params(CFG, jax.random.key(0))
    save_params(root / "ckpt", params, CFG)
    tokenizer_path = write_tiktoken_model(str(root / "tok"))
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    log = open(root / "server.log", "w")
    command = [
        sys.executable,
        "-m",
        "llama_jax.serve",
        "--ckpt",
        str(root / "ckpt"),
        "--tokenizer",
        tokenizer_path,
    ]
    command += [
        "--port",
        str(port),
        "--slots",
        str(SLOTS),
        "--queue",
        str(QUEUE),
        "--name",
        NAME,
        "--buckets",
        "64",
    ]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        assert process.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.5)
    yield url, params, load_tokenizer(tokenizer_path)
    process.terminate()
    process.wait(30)
    log.close()


def expected(server, prompt_ids, max_tokens=REFERENCE_BUDGET):
    """(text, token count) that greedy generate() gives for the prompt alone."""
    _, params, tokenizer = server
    tokens = generate(
        params,
        CFG,
        [prompt_ids],
        SamplingConfig(REFERENCE_BUDGET),
        stop_tokens=tokenizer.stop_ids,
        prompt_bucket=64,
    )[0][:max_tokens]
    tokens = [t for t in tokens if t not in tokenizer.stop_ids]
    return tokenizer.decode(tokens), len(tokens)


def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


PROMPTS = ["The quick brown fox", "Once upon a time", "hello", "A B C D E F G", "tokens and more tokens"]


def test_openai_client_completion_equals_generate(server):
    tokenizer = server[2]
    for prompt in PROMPTS[:3]:
        ids = tokenizer.encode(prompt, bos=True)
        text, count = expected(server, ids, 20)
        response = client(server).completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
        assert response.choices[0].text == text
        assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == count
        assert response.choices[0].finish_reason == ("length" if count == 20 else "stop")


def test_openai_client_chat_and_streams_equal_generate(server):
    tokenizer = server[2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fox?"}]
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True).ids
    text, count = expected(server, ids, 16)
    chat = client(server).chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == text and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ids) and chat.usage.completion_tokens == count

    chunks = list(
        client(server).chat.completions.create(
            model=NAME, messages=messages, max_tokens=16, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == count

    prompt = PROMPTS[3]
    text, count = expected(server, tokenizer.encode(prompt, bos=True), 24)
    stream = client(server).completions.create(
        model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == count


def test_stop_strings_n_and_seed(server):
    tokenizer = server[2]
    ids = tokenizer.encode(PROMPTS[1], bos=True)
    text, _ = expected(server, ids, 24)
    stop = text[5:8]
    cut = client(server).completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"

    def sample(seed):
        response = client(server).completions.create(
            model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=1.0, n=3, seed=seed
        )
        assert [c.index for c in response.choices] == [0, 1, 2]
        return [c.text for c in response.choices]

    first = sample(11)
    assert sample(11) == first and sample(12) != first and len(set(first)) > 1


def test_sixteen_concurrent_clients_each_get_their_own_answer(server):
    tokenizer = server[2]
    prompts = [f"{PROMPTS[i % 5]} {i}" for i in range(16)]
    wanted = [expected(server, tokenizer.encode(p, bos=True), 8 + i)[0] for i, p in enumerate(prompts)]

    def ask(i):
        if i % 2:
            stream = client(server).completions.create(
                model=NAME, prompt=prompts[i], max_tokens=8 + i, temperature=0, stream=True
            )
            return "".join(c.choices[0].text for c in stream if c.choices)
        return (
            client(server)
            .completions.create(model=NAME, prompt=prompts[i], max_tokens=8 + i, temperature=0)
            .choices[0]
            .text
        )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == wanted


def _health(server):
    return httpx.get(server[0] + "/health").json()


def _wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while (health := _health(server))["active"] or health["waiting"]:
        assert time.time() < deadline, health
        time.sleep(0.05)
    return health


def test_disconnect_mid_stream_frees_the_slot_and_short_requests_do_not_wait(server):
    before = _wait_idle(server)["steps"]
    body = {
        "model": NAME,
        "prompt": "a long one",
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        # While it runs, a short request comes and goes.
        short = client(server).completions.create(model=NAME, prompt="short", max_tokens=3, temperature=0)
        assert short.choices[0].finish_reason in ("length", "stop")
        assert _health(server)["active"] >= 1
    # The client has gone: its slot is freed long before its 2000 tokens.
    after = _wait_idle(server)["steps"]
    assert after - before < 1000


def test_bad_input_is_a_json_4xx_while_others_are_served(server):
    tokenizer = server[2]
    prompt = PROMPTS[4]
    text, _ = expected(server, tokenizer.encode(prompt, bos=True), 24)
    greedy = {"model": NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0}
    bad = [
        (b"{not json", 400),
        ({"prompt": 5, "model": NAME}, 400),
        ({"prompt": "hi", "max_tokens": "many"}, 400),
        ({"prompt": "hi", "max_tokens": 100000}, 400),
        ({"prompt": ""}, 400),
        ({"prompt": "word " * 2100}, 400),
        ({"prompt": "hi", "n": 0}, 400),
        ({"prompt": "hi", "n": 1000}, 400),
        ({"prompt": "hi", "temperature": -1}, 400),
        ({"prompt": "hi", "temperature": 7}, 400),
        ({"prompt": "hi", "top_p": 0}, 400),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400),
        ({"prompt": "hi", "logprobs": 5}, 400),
        ({"prompt": "hi", "frobnicate": True}, 400),
        ({"prompt": "hi", "model": "other"}, 404),
        ({"prompt": [1, 99999]}, 400),
    ]
    bad_chat = [
        ({"messages": []}, 400),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400),
        ({"messages": "hi"}, 400),
    ]
    # Bad requests fired among good ones: each good one gets its answer, each bad one its error.
    results = {}

    def send(key, path, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        response = httpx.post(
            server[0] + path, content=data, headers={"content-type": "application/json"}, timeout=60
        )
        results[key] = response

    threads = [threading.Thread(target=send, args=(("good", i), "/v1/completions", greedy)) for i in range(3)]
    threads += [
        threading.Thread(target=send, args=(("bad", i), "/v1/completions", p)) for i, (p, _) in enumerate(bad)
    ]
    threads += [
        threading.Thread(target=send, args=(("chat", i), "/v1/chat/completions", p))
        for i, (p, _) in enumerate(bad_chat)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(3):
        assert results["good", i].json()["choices"][0]["text"] == text
    for kind, cases in (("bad", bad), ("chat", bad_chat)):
        for i, (payload, status) in enumerate(cases):
            response = results[kind, i]
            assert response.status_code == status, (payload, response.text)
            error = response.json()["error"]
            assert error["message"].endswith(".") and "\n" not in error["message"] and error["type"]


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [NAME]
    health = _health(server)
    assert health["status"] == "ok" and health["slots"] == SLOTS and health["queue_size"] == QUEUE


def test_beyond_the_queue_is_429(server):
    """In process, on an engine that is not running (so nothing drains): the slots and the queue
    take 16 sequences; the 17th request is refused with 429 and an OpenAI rate-limit error."""
    from llama_jax.serve import make_app
    from llama_jax.serving import Engine

    engine = Engine(server[1], CFG, slots=SLOTS, max_len=128, queue_size=QUEUE, buckets=(64,))
    app = make_app(engine, server[2], NAME)
    body = {"model": NAME, "prompt": "hi", "max_tokens": 4, "n": SLOTS}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            waiting = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(4)]
            while engine.load()["waiting"] < SLOTS + QUEUE:
                await asyncio.sleep(0.01)
            refused = await http.post("/v1/completions", json=dict(body, n=1))
            engine.stop()  # ends the waiting ones
            return refused, await asyncio.gather(*waiting)

    refused, ended = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert all(r.status_code == 200 for r in ended)


def test_llama_3_1_tool_calls_both_ways(server):
    """A reply in either of Llama 3.1's call formats becomes an OpenAI tool call; an OpenAI
    assistant tool call and the tool's result go back into the prompt in Llama 3.1's format."""
    from llama_jax.serve import ChatBody, _llama_messages, _tool_call

    assert _tool_call('{"name": "get_weather", "parameters": {"city": "Paris"}}') == {
        "name": "get_weather",
        "arguments": json.dumps({"city": "Paris"}),
    }
    assert _tool_call('brave_search.call(query="llama 3.1")') == {
        "name": "brave_search",
        "arguments": json.dumps({"query": "llama 3.1"}),
    }
    assert _tool_call("It is sunny.") is None

    tokenizer = server[2]
    body = ChatBody(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    )
    messages = _llama_messages(body)
    assert messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True).ids
    python_tag, eom = tokenizer.special_tokens["<|python_tag|>"], tokenizer.special_tokens["<|eom_id|>"]
    call = ids.index(python_tag)
    assert json.loads(tokenizer.decode(ids[call + 1 : ids.index(eom)])) == {
        "name": "get_weather",
        "parameters": {"city": "Paris"},
    }
    assert "ipython" in tokenizer.decode(ids[ids.index(eom) :])  # the result's header
