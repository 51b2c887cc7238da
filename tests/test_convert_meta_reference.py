"""`save_meta` shards run in Meta's published reference code: `llama_models.llama3.model.Transformer`
with fairscale model parallelism over torch.distributed (gloo, CPU), one process per shard, loads
them through Meta's own `maybe_reshard_state_dict` and gives our logits.

Run as a script, this file is one such process (rank, world size, checkpoint, tokens, output,
rendezvous file); it imports only torch, fairscale and llama_models, so JAX and llama_jax are
imported inside the tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TOLERANCE = 1e-4


def meta_reference_logits(
    rank: int, world_size: int, checkpoint: Path, tokens: Path, out: Path, rendezvous: Path
):
    """One model-parallel rank of Meta's Llama 3 Transformer on `checkpoint`; rank 0 saves the
    (gathered) logits of `tokens` to `out`."""
    import datetime

    import torch
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel
    from llama_models.checkpoint import maybe_reshard_state_dict
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),  # a rank whose peer failed gives up soon
    )
    initialize_model_parallel(world_size)
    batch = torch.from_numpy(np.load(tokens)).long()
    params = json.loads((checkpoint / "params.json").read_text())
    args = ModelArgs(max_seq_len=batch.shape[1], max_batch_size=batch.shape[0], **params)
    state = maybe_reshard_state_dict(sorted(checkpoint.glob("*.pth")), n_kv_heads=args.n_kv_heads)
    torch.set_default_dtype(torch.float32)  # maybe_reshard_state_dict leaves bfloat16 the default
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    logits = model(batch, start_pos=0)
    if rank == 0:
        np.save(out, logits.float().numpy())
    dist.destroy_process_group()


def run_meta_reference(checkpoint: Path, tokens: np.ndarray, world_size: int, tmp_path: Path) -> np.ndarray:
    """Meta's logits for `tokens`, from `world_size` processes of this file."""
    np.save(tmp_path / "tokens.npy", tokens)
    out, rendezvous = tmp_path / "meta_logits.npy", tmp_path / "rendezvous"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(world_size), str(checkpoint)]
            + [str(tmp_path / "tokens.npy"), str(out), str(rendezvous)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world_size)
    ]
    try:
        outputs = [process.communicate(timeout=180)[0] for process in ranks]
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    for rank, (process, output) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, f"rank {rank} of Meta's model failed:\n{output}"
    return np.load(out)


def random_llama3(scaling: bool):
    """A Llama 3 style model (GQA, RoPE base 500000, FFN width that needs a multiplier in
    params.json) with random weights and random norm weights."""
    import jax

    from llama_jax.config import ModelConfig, RopeScaling
    from llama_jax.model import init_params

    cfg = ModelConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=160,
        vocab_size=128,
        max_seq_len=128,
        rope_theta=500000.0,
        rope_scaling=RopeScaling() if scaling else None,
    )
    rng = np.random.default_rng(1)

    def random(path, leaf):  # norms around 1, so that a swapped or missing one shows
        if any("norm" in str(getattr(key, "key", "")) for key in path):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
    return cfg, jax.tree_util.tree_map_with_path(random, shapes)


@pytest.mark.parametrize("shards, scaling", [(1, False), (2, True)])
def test_meta_reference_code_gives_our_logits(tmp_path, shards, scaling):
    import jax

    from llama_jax.convert import load_meta, save_meta
    from llama_jax.model import Llama

    cfg, params = random_llama3(scaling)
    checkpoint = save_meta(params, cfg, tmp_path / "meta", shards=shards, dtype="float32")
    meta_params = json.loads((checkpoint / "params.json").read_text())
    assert meta_params["ffn_dim_multiplier"] and meta_params.get("use_scaled_rope", False) == scaling
    assert len(list(checkpoint.glob("consolidated.*.pth"))) == shards

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 64), dtype=np.int32)
    theirs = run_meta_reference(checkpoint, tokens, shards, tmp_path)
    ours = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, tokens))
    error = np.abs(ours - theirs).max()
    print(f"{shards} shard(s), use_scaled_rope={scaling}: max abs logit error vs Meta's code {error:.2e}")
    assert error < TOLERANCE
    if scaling:  # the comparison can tell: without the scaling the logits are off
        unscaled = jax.jit(Llama(cfg.replace(rope_scaling=None)).apply)({"params": params}, tokens)
        assert np.abs(np.asarray(unscaled) - theirs).max() > 100 * TOLERANCE
    read_cfg, read_params = load_meta(checkpoint, max_seq_len=cfg.max_seq_len)
    assert read_cfg == cfg
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(read_params), jax.tree.leaves(params)))


if __name__ == "__main__":
    rank, world_size, *paths = sys.argv[1:]
    meta_reference_logits(int(rank), int(world_size), *map(Path, paths))
