"""Continuous batching: many requests decoded together in a fixed number of slots.

    engine = Engine(params, cfg, slots=16, max_len=2048, queue_size=64)
    engine.start()                                  # compiles every shape, then serves
    request = engine.submit(Request(prompt_ids, max_tokens=64, on_token=..., on_finish=...))
    engine.cancel(request)                          # e.g. the client went away
    engine.stop()

The slots are the rows of one preallocated KV cache (`model.KVCache` with `wraps=True`, sharded
by the logical axis rules like any cache). One thread owns the device: between decode steps it
gives free slots to waiting requests, then runs one decode step for every row at once, so a short
request never waits for a long one and a finished one frees its row at the next step.

* A new request is prefilled alone, left-padded to the smallest length bucket that holds it (one
  compiled prefill per bucket), and its keys and values are copied into its row so that they end
  at the cache's shared write index. The row's segment ids mark its own slots; the decode step's
  queries see only those, wherever the ring has put them.
* The decode step runs the first R slots only, R the smallest power of two (or all the slots)
  that covers every busy one; new requests take the lowest free slot, so a lightly loaded server
  does not compute its idle rows. One compiled step per R; every compilation happens in
  `warm_up()`, before the server listens.
* Each request samples with its own temperature, top-k, top-p and seed: the key of its n-th token
  is `fold_in(key(seed), n)`, so its tokens do not depend on which other requests share the step.
* Requests beyond the free slots wait in a queue of `queue_size`; beyond it `submit` raises
  `QueueFull` (the server's HTTP 429).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import DEFAULT_RULES, MeshConfig, ModelConfig
from llama_jax.model import KVCache, Llama
from llama_jax.quantize import unstack_layers
from llama_jax.sharding import activation_sharding, make_mesh, tree_shardings

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


class RequestError(ValueError):
    """A request the engine cannot take; the message is one sentence for the client."""


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate. `on_token(token)` and `on_finish(reason)` are called from the
    engine's thread; `reason` is "stop" (a stop token, which is not passed to on_token), "length"
    (max_tokens reached), "cancelled" or "error"."""

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: Sequence[int] = ()
    on_token: Callable[[int], None] = lambda token: None
    on_finish: Callable[[str], None] = lambda reason: None
    cancelled: bool = False
    generated: int = 0


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Prefill lengths: powers of two from `smallest`, and `max_len` itself."""
    buckets, length = [], smallest
    while length < max_len:
        buckets.append(length)
        length *= 2
    return (*buckets, max_len)


def sample_rows(logits, keys, temperature, top_k, top_p):
    """Next tokens [B] from logits [B, V], each row with its own key and settings: greedy where
    the temperature is 0, else sampling after a top-k cut (0: none) and a top-p cut (1: none)."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    scaled = jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)
    ordered = jnp.where((top_k[:, None] > 0) & (ordered < kth), -jnp.inf, ordered)
    # Keep the smallest set of most likely tokens whose probability reaches top_p.
    cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
    cutoff_index = jnp.clip(jnp.sum(cumulative < top_p[:, None], axis=-1, keepdims=True), 0, vocab - 1)
    cutoff = jnp.take_along_axis(ordered, cutoff_index, axis=-1)
    scaled = jnp.where((top_p[:, None] < 1.0) & (scaled < cutoff), -jnp.inf, scaled)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled)
    return jnp.where(temperature == 0, greedy, sampled.astype(jnp.int32))


def _row_keys(seeds, counts):
    return jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(seeds, counts)


def _prefill(params, cache, tokens, positions, segment_ids, slot, temperature, top_k, top_p, seed, *, cfg):
    """Prefill one request [1, bucket] and copy its keys and values into row `slot` of the
    serving cache so that they end just before the cache's write index. Returns (first token [1],
    cache)."""
    bucket = tokens.shape[1]
    small = KVCache.empty(cfg, 1, bucket, cache.keys.dtype)
    logits, small = Llama(cfg).apply(
        {"params": params}, tokens, small, positions, segment_ids, method=Llama.decode
    )
    token = sample_rows(logits[:, -1], _row_keys(seed, jnp.zeros_like(seed)), temperature, top_k, top_p)

    max_len = cache.max_len

    def placed(x, axis):  # x's length axis padded at the front to max_len, then rolled to end at index
        pad = [(0, 0)] * x.ndim
        pad[axis] = (max_len - bucket, 0)
        return jnp.roll(jnp.pad(x, pad), cache.index, axis=axis)

    cache = cache.replace(
        keys=cache.keys.at[:, slot].set(placed(small.keys[:, 0], 2)),  # [layers, K, length, D]
        values=cache.values.at[:, slot].set(placed(small.values[:, 0], 2)),
        segment_ids=cache.segment_ids.at[slot].set(placed(small.segment_ids[0], 0)),
    )
    return token, cache


def _decode(params, cache, last, positions, live, temperature, top_k, top_p, seeds, counts, *, cfg):
    """One token for each of the first R slots (R: the length of `last`): (tokens [R], cache).
    Free slots among them (live 0) run as padding; the slots after them are not computed (the
    model reads and writes the cache's first R rows only)."""
    logits, cache = Llama(cfg).apply(
        {"params": params}, last[:, None], cache, positions[:, None], live[:, None], method=Llama.decode
    )
    return sample_rows(logits[:, -1], _row_keys(seeds, counts), temperature, top_k, top_p), cache


@dataclasses.dataclass
class _Slot:
    request: Request
    last: int  # the newest token, the next step's input
    position: int  # its position in the sequence


class Engine:
    """The slots, the waiting queue and the thread that runs them (see the module's docstring)."""

    def __init__(
        self,
        params,
        cfg: ModelConfig,
        *,
        slots: int = 8,
        max_len: int | None = None,
        queue_size: int = 64,
        buckets: Sequence[int] | None = None,
        mesh=None,
        rules=None,
    ):
        max_len = cfg.max_seq_len if max_len is None else max_len
        if cfg.scan_layers:  # one token at a time runs faster with the layers unrolled
            params, cfg = unstack_layers(params, cfg), cfg.replace(scan_layers=False)
        if slots < 1 or queue_size < 0:
            raise RequestError("The server needs at least one slot and a queue size of at least 0.")
        if not 2 <= max_len <= cfg.max_seq_len:
            raise RequestError(
                f"The cache length must be between 2 and the model's context of {cfg.max_seq_len}."
            )
        self.cfg, self.params, self.max_len = cfg, params, max_len
        self.slots, self.queue_size = slots, queue_size
        self.buckets = tuple(sorted({min(b, max_len) for b in (buckets or default_buckets(max_len))}))
        if self.buckets[-1] < max_len:
            self.buckets = (*self.buckets, max_len)
        self.mesh = mesh or make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
        self.rules = rules or DEFAULT_RULES
        self._slots: list[_Slot | None] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for /health and tests)
        self.row_buckets = tuple(sorted({min(2**i, slots) for i in range(slots.bit_length() + 1)}))

        cache = jax.eval_shape(lambda: KVCache.empty(cfg, slots, max_len).replace(wraps=True))
        axes = KVCache.logical_axes().replace(wraps=True)
        self._cache_sharding = tree_shardings(cache, axes, self.mesh, self.rules)
        with self._context():
            self._cache = jax.jit(
                lambda: KVCache.empty(cfg, slots, max_len).replace(wraps=True),
                out_shardings=self._cache_sharding,
            )()
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        outs = (replicated, self._cache_sharding)
        self._prefill_fn = jax.jit(lambda *a: _prefill(*a, cfg=cfg), out_shardings=outs, donate_argnums=(1,))
        self._decode_fn = jax.jit(lambda *a: _decode(*a, cfg=cfg), out_shardings=outs, donate_argnums=(1,))

    def _context(self):
        return activation_sharding(self.mesh, self.rules)

    # ------------------------------------------------------------------ compiled steps

    def _run_prefill(self, slot: int, request: Request) -> int:
        length = len(request.prompt)
        bucket = next(b for b in self.buckets if b >= length)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, bucket - length :] = request.prompt
        segment_ids = (np.arange(bucket) >= bucket - length).astype(np.int32)[None]
        positions = np.maximum(np.arange(bucket) - (bucket - length), 0).astype(np.int32)[None]
        with self._context():
            token, self._cache = self._prefill_fn(
                self.params,
                self._cache,
                tokens,
                positions,
                segment_ids,
                np.int32(slot),
                np.array([request.temperature], np.float32),
                np.array([request.top_k], np.int32),
                np.array([request.top_p], np.float32),
                np.array([request.seed], np.uint32),
            )
        return int(np.asarray(token)[0])

    def decode_rows(self, busy: int) -> int:
        """The slots a decode step computes when the last busy slot is `busy - 1`."""
        return next(r for r in self.row_buckets if r >= busy)

    def _run_decode(self, count: int | None = None) -> np.ndarray:
        """One decode step over the first `count` slots (default: as many as the busy ones need)."""
        if count is None:
            last_busy = max((i for i, s in enumerate(self._slots) if s is not None), default=0)
            count = self.decode_rows(last_busy + 1)
        rows = self._slots[:count]
        live = np.array([s is not None for s in rows], np.int32)

        def column(get, dtype, empty=0):
            return np.array([get(s) if s is not None else empty for s in rows], dtype)

        with self._context():
            tokens, self._cache = self._decode_fn(
                self.params,
                self._cache,
                column(lambda s: s.last, np.int32),
                column(lambda s: s.position, np.int32),
                live,
                column(lambda s: s.request.temperature, np.float32),
                column(lambda s: s.request.top_k, np.int32),
                column(lambda s: s.request.top_p, np.float32, 1.0),
                column(lambda s: s.request.seed, np.uint32),
                column(lambda s: s.request.generated, np.int32),
            )
        self.steps += 1
        return np.asarray(tokens)

    def warm_up(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile every prefill bucket and the decode step (on free slots: nothing is kept);
        `progress(name)` after each."""
        for bucket in self.buckets:
            self._run_prefill(0, Request(prompt=[0] * bucket, max_tokens=1))
            if progress:
                progress(f"prefill {bucket}")
        for rows in self.row_buckets:
            self._run_decode(rows)
            if progress:
                progress(f"decode {rows}")

    # ------------------------------------------------------------------ requests

    def check(self, request: Request) -> None:
        """Raise RequestError if `request` can never be served."""
        if not request.prompt:
            raise RequestError("The prompt is empty.")
        if request.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1.")
        if len(request.prompt) + request.max_tokens > self.max_len:
            raise RequestError(
                f"The prompt ({len(request.prompt)} tokens) plus max_tokens ({request.max_tokens}) "
                f"exceed the server's context of {self.max_len} tokens."
            )
        if max(request.prompt) >= self.cfg.vocab_size or min(request.prompt) < 0:
            raise RequestError(f"A prompt token is outside the vocabulary of {self.cfg.vocab_size}.")

    def submit(self, *requests: Request) -> None:
        """Queue the requests (all or none); QueueFull if free slots and queue cannot hold them."""
        for request in requests:
            self.check(request)
        with self._cond:
            if self._stopping:
                raise QueueFull("The server is shutting down.")
            free = self._slots.count(None)
            if len(self._waiting) + len(requests) > self.queue_size + free:
                raise QueueFull(
                    f"All {self.slots} slots are busy and the queue of {self.queue_size} is full."
                )
            self._waiting.extend(requests)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop generating for `request`; its slot is freed before the next decode step."""
        with self._cond:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                request.on_finish("cancelled")
            self._cond.notify()

    def load(self) -> dict[str, int]:
        """How busy the engine is: slots, active, waiting, queue_size."""
        with self._cond:
            active = sum(s is not None for s in self._slots)
            return {
                "slots": self.slots,
                "active": active,
                "waiting": len(self._waiting),
                "queue_size": self.queue_size,
            }

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llama_jax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for request in list(self._waiting) + [s.request for s in self._slots if s is not None]:
            request.on_finish("cancelled")

    def _finish(self, index: int, reason: str) -> None:
        slot = self._slots[index]
        self._slots[index] = None
        if slot is not None:
            slot.request.on_finish(reason)

    def _emit(self, index: int, token: int) -> None:
        """Record the token of slot `index`'s request; free the slot if it is done."""
        slot = self._slots[index]
        request = slot.request
        if token in request.stop_ids:
            return self._finish(index, "stop")
        request.generated += 1
        request.on_token(token)
        if request.cancelled:
            return self._finish(index, "cancelled")
        if request.generated >= request.max_tokens:
            return self._finish(index, "length")
        slot.last, slot.position = token, slot.position + 1

    def _loop(self) -> None:
        while True:
            with self._cond:
                for index, slot in enumerate(self._slots):
                    if slot is not None and slot.request.cancelled:
                        self._finish(index, "cancelled")
                while not self._stopping and not self._waiting and all(s is None for s in self._slots):
                    self._cond.wait()
                if self._stopping:
                    return
                admitted = []
                for index in range(self.slots):
                    if self._slots[index] is None and self._waiting:
                        request = self._waiting.popleft()
                        self._slots[index] = _Slot(request, last=0, position=len(request.prompt) - 1)
                        admitted.append(index)
            try:
                for index in admitted:
                    self._emit(index, self._run_prefill(index, self._slots[index].request))
                if any(s is not None for s in self._slots):
                    tokens = self._run_decode()
                    for index, slot in enumerate(self._slots[: len(tokens)]):
                        if slot is not None:
                            self._emit(index, int(tokens[index]))
            except Exception:  # a device error ends the requests it touched, not the server
                log.exception("The engine's step failed; its requests end with an error.")
                with self._cond:
                    for index in range(self.slots):
                        self._finish(index, "error")
