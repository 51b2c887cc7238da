"""Ahead-of-time compilation of the real train step for TPU topologies, on this CPU host."""

import sys

import jax
import pytest

from llama_jax import collectives
from llama_jax.aot import compile_for_topology, format_report, main, parse_topology
from llama_jax.config import ConfigError, Experiment, apply_overrides

# libtpu (the `tpu` extra, in the README's test command) exists for Linux only.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="libtpu is published for Linux only")


@pytest.mark.parametrize(
    "name,chips,libtpu_name",
    [
        ("v5p-128", 64, "v5p:4x4x4"),
        ("v4-32", 16, "v4:2x2x4"),
        ("v5e-16", 16, "v5e:4x4"),
        ("v5litepod-8", 8, "v5e:2x4"),
        ("v6e-256", 256, "v6e:16x16"),
        ("v5p:2x2x1", 4, "v5p:2x2x1"),
    ],
)
def test_topology_names(name, chips, libtpu_name):
    topology = parse_topology(name)
    assert (topology.chips, topology.libtpu_name) == (chips, libtpu_name)


def test_unknown_topology_is_one_sentence(capsys):
    assert main(["--exp", "tiny", "--topology", "v9-8"]) == 2
    assert "Unknown TPU topology 'v9-8'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="Unknown slice size v5p-12"):
        parse_topology("v5p-12")


def test_the_dcn_axis_is_one_per_slice():
    from llama_jax.config import MeshConfig
    from llama_jax.sharding import MeshError, mesh_shape

    assert mesh_shape(MeshConfig(), 16, slices=2) == {
        "dcn": 2,
        "data": 1,
        "fsdp": 8,
        "context": 1,
        "tensor": 1,
    }
    assert mesh_shape(MeshConfig(tensor=4), 16)["fsdp"] == 4  # one slice: dcn 1
    with pytest.raises(MeshError, match="span 2 slices, so mesh.dcn must be 2"):
        mesh_shape(MeshConfig(dcn=4), 16, slices=2)


@pytest.mark.slow  # TPU compiles (about 15 s each): CI runs the slow set after the suite
def test_tiny_on_v5p_8_fits_and_is_sharded():
    exp = Experiment()
    cfg = exp.model
    report = compile_for_topology(exp, parse_topology("v5p-8"))
    assert report["devices"] == 4 and report["mesh"] == {
        "dcn": 1,
        "data": 1,
        "fsdp": 4,
        "context": 1,
        "tensor": 1,
    }
    assert report["fits"] and report["hbm_bytes"] == 95 * 2**30
    # The arguments are the TrainState (fp32 params + two Adam moments) split 4 ways, not
    # replicated; TPU tiling pads small dims (head_dim 32), so a quarter is a lower bound.
    state_bytes = 3 * 4 * exp.model.num_params()
    assert state_bytes / 4 <= report["argument_bytes"] < state_bytes / 2
    assert report["alias_bytes"] > 0.9 * report["argument_bytes"] - 1e6  # the state is donated
    assert report["compile_seconds"] > 0 and "estimated_step_seconds" not in report  # not asked for
    # Keeping the LM head's logits would cost the batch's fp32 logits, a quarter per chip.
    tokens = exp.train.batch_size * exp.train.seq_len
    assert report["logits_bytes"] == tokens * cfg.vocab_size * 4 / 4 and not report["keep_logits"]
    # "auto" attention compiles the Pallas splash kernel for the TPU, not the XLA fallback.
    assert report["attention"] == "splash"
    # The report names the logical-axis rules the step was compiled with (the experiment's).
    assert "rules: batch->dcn+data+fsdp, length->context, embed->fsdp, vocab->tensor" in format_report(report)
    # FSDP: every weight is gathered whole by all-gathers of the bf16 compute dtype (never an fp32
    # gather, nor an all-reduce of zero-padded buffers), and gradients go back reduce-scattered.
    found = report["collectives"]
    layer = cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim
    layer += 3 * cfg.dim * cfg.ffn_dim
    weights_bf16 = 2 * (layer + 2 * cfg.vocab_size * cfg.dim)  # one layer (the loop body), embedding, head
    assert set(found["all-gather"]["dtypes"]) == {"bf16"}
    assert found["all-gather"]["bytes"] >= weights_bf16 and found["all-gather"]["count"] >= 9
    assert found["reduce-scatter"]["count"] >= 3
    assert found.get("all-reduce", {"dtypes": {}})["dtypes"].get("f32", 0) < 1024  # scalars only
    assert "collectives per chip" in format_report(report) and "all-gather x" in format_report(report)
    xla = compile_for_topology(apply_overrides(exp, ["model.attention=xla"]), parse_topology("v5p-8"))
    assert xla["attention"] == "xla"


def _unrolled_cost(exp, topology):
    """(FLOPs, optimal seconds) the compiler counts for exp's step with every loop unrolled."""
    from llama_jax import aot

    exp = aot._on_tpu(exp)
    exp = exp.replace(model=exp.model.replace(scan_layers=False))
    return aot._cost(aot._lower(exp, exp, aot._devices(topology, 1))[1].compile())


@pytest.mark.slow  # six TPU compiles
def test_the_estimate_is_the_unrolled_step_extrapolated_and_prices_the_kernel():
    """estimate_step extrapolates one- and two-layer compiles: for 4 layers in 2 microbatches it
    gives what the compiler counts for the 4 layers unrolled and the batch at once. The splash
    kernel is invisible to the cost analysis: XLA attention counts what its blocks compute (9/16
    of the full square at 512 tokens) against the causal half that the estimate adds for it."""
    from llama_jax.aot import kernel_attention_flops
    from llama_jax.attention import causal_block_starts

    topology = parse_topology("v5p-8")
    settings = ["model.n_layers=4", "train.batch_size=8", "train.seq_len=512", "model.attention=xla"]
    exp = apply_overrides(Experiment(), settings + ["train.microbatches=2"])
    report = compile_for_topology(exp, topology, estimate=True)
    assert report["estimate_kernel_flops"] == 0  # XLA attention: the compiler counts it
    flops, seconds = _unrolled_cost(apply_overrides(Experiment(), settings), topology)
    assert report["estimate_compiler_flops"] == pytest.approx(flops, rel=0.01)
    # The compiler's time is not quite linear in depth (tiny's fourth layer costs it 14% more than
    # its second): the extrapolation comes within 6% here.
    assert report["estimate_compiler_seconds"] == pytest.approx(seconds, rel=0.1)
    assert report["estimated_step_seconds"] == report["estimate_compiler_seconds"]
    per_device = report["model_flops_per_step"] / 4
    assert report["estimated_mfu"] == pytest.approx(per_device / (seconds * 459e12), rel=0.1)
    assert "estimated step" in format_report(report) and "per layer" in format_report(report)

    one_layer = apply_overrides(Experiment(), ["model.n_layers=1", "train.batch_size=8", "train.seq_len=512"])
    splash = _unrolled_cost(one_layer, topology)[0]
    xla = _unrolled_cost(apply_overrides(one_layer, ["model.attention=xla"]), topology)[0]
    # XLA attention scores each block of queries against the keys up to its end: that share of
    # the full square, where the causal kernel's FLOPs are half of it.
    starts = causal_block_starts(512)
    computed = sum((end - start) * end for start, end in zip(starts, starts[1:] + [512])) / 512**2
    assert xla - splash == pytest.approx(2 * computed * kernel_attention_flops(one_layer, 4), rel=0.1)


@pytest.mark.slow  # a TPU compile
def test_two_slices_reduce_gradients_over_dcn_once_per_step():
    """Two v5p-8 slices: the batch splits over the dcn axis, FSDP stays inside each slice, and the
    gradients cross the data-center network once per step (after the microbatches, not in their
    loop): each chip's fp32 gradient shard, about a quarter of the parameters' bytes."""
    exp = apply_overrides(Experiment(), ["train.microbatches=2"])
    report = compile_for_topology(exp, parse_topology("v5p-8"), slices=2)
    assert report["devices"] == 8 and report["mesh"] == {
        "dcn": 2,
        "data": 1,
        "fsdp": 4,
        "context": 1,
        "tensor": 1,
    }
    over_dcn = report["collectives"]["all-reduce over DCN"]
    assert over_dcn["in_loops"] == 0 and set(over_dcn["dtypes"]) == {"f32"}
    shard = exp.model.num_params() * 4 / 4
    assert shard <= over_dcn["bytes"] <= 1.3 * shard
    assert all(
        not kind.endswith("over DCN") for kind in report["collectives"] if kind != "all-reduce over DCN"
    )
    assert "all-reduce over DCN x" in format_report(report)


@pytest.mark.slow  # TPU compiles (about 15 s each): CI runs the slow set after the suite
def test_a_step_that_cannot_fit_is_reported_not_raised():
    exp = apply_overrides(Experiment(), ["train.batch_size=8192", "train.seq_len=512"])
    report = compile_for_topology(exp, parse_topology("v5e-4"))
    assert report["fits"] is False and report["temp_bytes"] > report["hbm_bytes"]
    assert "RESOURCE_EXHAUSTED" in report["compiler_message"]
    assert jax.devices()[0].platform == "cpu"  # compiling for TPU left the host backend alone


def test_readme_table_covers_every_recipe_with_headroom():
    """The README's AOT table (written by `python -m llama_jax.aot --recipes`, whose `--check` CI
    runs against fresh compiles) has a row per recipe that matches the recipe's target, mesh,
    microbatches and remat, and leaves at least 10% of HBM free."""
    import re
    from pathlib import Path

    from llama_jax.aot import HEADROOM, phase_of, recipe_names, split_recipe
    from llama_jax.config import load_experiment
    from llama_jax.sharding import mesh_shape

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w -]+)` \| v\S+ \|.*$", readme, re.M)}
    names = recipe_names()
    # Every recipe, and the 128K phase of each Llama 3.1 recipe in phases.
    long = [n for n in names if "--phase" in n]
    assert len(names) == 17 and set(names) <= set(rows)  # with the two LoRA SFT recipes
    assert sorted(n.split()[0] for n in long) == ["llama3_1_405b", "llama3_1_70b", "llama3_1_8b"]
    for name in names:
        recipe, phase = split_recipe(name)
        exp = phase_of(load_experiment(recipe), phase)
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        topology = parse_topology(exp.target)
        mesh = mesh_shape(exp.mesh, topology.chips)
        context = f", context {mesh['context']}" if mesh["context"] > 1 else ""
        assert cells[1] == exp.target, name
        assert cells[2] == f"{mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}{context}", name
        assert (mesh["context"] > 1) == (name in long), name
        assert exp.train.seq_len == 131072 if name in long else exp.train.seq_len <= 8192, name
        logits = "kept" if exp.train.keep_logits else "recomputed"
        assert cells[3:7] == [str(exp.train.microbatches), exp.model.remat, "splash", logits], name
        used = int(re.search(r"\((\d+)%\)", cells[7]).group(1))
        assert used <= 100 * (1 - HEADROOM), name


HLO = """
%all-reduce-scatter.7 (input.1: bf16[256,768]) -> bf16[64,768] {
  %input.1 = bf16[256,768]{1,0} parameter(0)
  ROOT %all-reduce.1 = bf16[256,768]{1,0} all-reduce(%input.1), replica_groups={{0,1,2,3}}
}

ENTRY %main (p0: bf16[64,768]) -> f32[] {
  %ag = (bf16[64,768]{1,0}, bf16[256,768]{1,0}) all-gather-start(%p0), dimensions={0}
  %ag.2 = bf16[8,32,256]{2,1,0} all-gather(%x), dimensions={2}
  %rs = bf16[64,768]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.7, metadata={}
  %ar = (f32[4]{0}, bf16[16,16]{1,0}) all-reduce(%a, %b), to_apply=%add
  %cp = (f32[10]{0}, f32[10]{0}, u32[], u32[]) collective-permute-start(%c), source_target_pairs={{0,1}}
  %w = (s32[], f32[4]{0}) while(%t), condition=%cond.1, body=%body.1
  %send.3 = (f32[48,128]{1,0}, u32[], token[]) send(%g, %tok), channel_id=20, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv.3 = (f32[48,128]{1,0}, u32[], token[]) recv(%tok), channel_id=19, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %s = f32[] reduce(%y)
}

%body.1 (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar.2 = f32[4]{0} all-reduce(%q), to_apply=%add
  %send.4 = (bf16[8]{0}, u32[], token[]) send(%g, %tok), is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
}
"""


def test_collectives_are_read_by_kind_with_their_buffers():
    found = collectives.summary(HLO)
    assert found["all-gather"] == {
        "count": 2,
        "bytes": 256 * 768 * 2 + 8 * 32 * 256 * 2,
        "dtypes": {"bf16": 256 * 768 * 2 + 8 * 32 * 256 * 2},
        "in_loops": 0,
    }
    # The TPU's reduce-scatter fusion counts once, with its whole input; its inner all-reduce not at all.
    assert found["reduce-scatter"] == {
        "count": 1,
        "bytes": 256 * 768 * 2,
        "dtypes": {"bf16": 256 * 768 * 2},
        "in_loops": 0,
    }
    assert found["all-reduce"] == {
        "count": 2,
        "bytes": 16 + 512 + 16,
        "dtypes": {"f32": 32 + 512},
        "in_loops": 1,
    }
    assert found["collective-permute"]["bytes"] == 40
    # Multi-slice: the Megascale send is the transfer over DCN (its recv not counted again).
    assert found["all-reduce over DCN"] == {
        "count": 2,
        "bytes": 48 * 128 * 4 + 16,
        "dtypes": {"f32": 48 * 128 * 4, "bf16": 16},
        "in_loops": 1,
    }
    assert list(found) == [
        "all-gather",
        "reduce-scatter",
        "all-reduce",
        "collective-permute",
        "all-reduce over DCN",
    ]
    assert "all-reduce over DCN x2 (f32 0.0 MiB, bf16 0.0 MiB; 1 in loops)" in collectives.format_summary(
        found
    )
