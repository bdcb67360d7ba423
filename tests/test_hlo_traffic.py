"""fr_jax.aot.hlo_traffic against programs whose HBM traffic is known, compiled by the TPU
compiler for one v5e chip: a matrix-vector product reads its weight once (XLA's own
bytes-accessed counts the on-chip prefetch as well), a one-row embedding lookup reads one
row, not the table, and a donated cache updated in place writes the update only. Its
collectives against a program on the 8-device CPU mesh and hand-written HLO (async pairs,
every replica-group form, loops and conditionals)."""

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fr_jax import aot as plan
from fr_jax.aot.hlo_traffic import (collective_seconds, collectives, group_size, hbm_bytes,
                                    ring_factor)

MiB = 1 << 20


@functools.lru_cache(maxsize=None)
def _chip():
    _, devices = plan.topology_devices("v5e-8")
    return Mesh(np.array(devices[:1]), ("x",))


def _traffic(fn, *shapes, donate=()):
    """(fr_jax.aot.hlo_traffic's bytes, XLA's bytes accessed) of fn compiled for one chip."""
    mesh = _chip()
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P())) for s, d in shapes]
    with tempfile.TemporaryDirectory() as dump:
        compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile(
            compiler_options={"xla_dump_to": dump})
        _, xla = plan._costs(compiled)
        files = [f for f in os.listdir(dump) if f.endswith("after_optimizations.txt")]
        model = hbm_bytes(open(os.path.join(dump, max(files, key=lambda f: os.path.getsize(
            os.path.join(dump, f))))).read(), trips=True)
    return model, xla


def test_matvec_reads_its_weight_once():
    weight = 4096 * 4096 * 2  # bf16, 32 MiB
    model, xla = _traffic(lambda w, x: x @ w, ((4096, 4096), jnp.bfloat16),
                          ((1, 4096), jnp.bfloat16))
    assert weight <= model <= 1.05 * weight, model / MiB
    assert xla >= model  # XLA's count is never below what crosses HBM


def test_embedding_lookup_reads_the_rows_it_gathers():
    table = 32000 * 1024 * 2
    model, _ = _traffic(lambda t, i: jnp.take(t, i, axis=0), ((32000, 1024), jnp.bfloat16),
                        ((1,), jnp.int32))
    assert model <= 64 * 1024, (model, table)  # one 2 KiB row (and the index), not 62.5 MiB


def test_in_place_cache_update_writes_the_update_only():
    cache = 8 * 2048 * 1024 * 2  # [layers, slots, width] bf16, 32 MiB
    model, _ = _traffic(
        lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (0, i, 0)),
        ((8, 2048, 1024), jnp.bfloat16), ((8, 1, 1024), jnp.bfloat16), ((), jnp.int32),
        donate=(0,))
    assert model <= 4 * 8 * 1024 * 2, (model, cache)  # the 16 KiB update, read and written


def test_a_loop_counts_as_many_times_as_it_runs():
    """A stacked weight sliced a layer per iteration (a scanned layer stack): the loop
    reads every layer once, however the compiler prefetches them."""
    stacked = 8 * 2048 * 2048 * 2

    def fn(w, x):
        return jax.lax.scan(lambda x, wl: ((x @ wl).astype(x.dtype), None), x, w)[0]

    model, _ = _traffic(fn, ((8, 2048, 2048), jnp.bfloat16), ((8, 2048), jnp.bfloat16))
    assert stacked <= model <= 1.1 * stacked, model / MiB


# ---------------------------------------------------------------------------- collectives
def _cpu_mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))


def test_a_psum_in_a_scan_counts_once_per_iteration():
    """On the 8-device CPU mesh, a psum over the 4-way axis in a scan of 3 steps and an
    all-gather over the 2-way axis after it: 3 all-reduces of the [8, 256] f32 shard in
    groups of 4 (each sends 2 x 3/4 of it), one all-gather of the [16, 256] result in
    groups of 2 (each sends half of it)."""
    mesh = _cpu_mesh()

    def body(x):
        x = jax.lax.scan(lambda c, _: (c + 0.5 * jax.lax.psum(c, "b"), None), x, None,
                         length=3)[0]
        return jax.lax.all_gather(x, "a", tiled=True)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("a", "b"), out_specs=P(None, "b"),
                              check_vma=False))
    x = jax.ShapeDtypeStruct((16, 1024), jnp.float32, sharding=NamedSharding(mesh, P("a", "b")))
    text = f.lower(x).compile().as_text()
    shard = 8 * 256 * 4
    stats = collectives(text, trips=True)
    assert stats["all-reduce"] == dict(count=3, bytes=3 * shard, wire=3 * shard * 2 * 3 / 4)
    assert stats["all-gather"] == dict(count=1, bytes=2 * shard, wire=shard)
    assert collectives(text)["all-reduce"]["count"] == 1  # without trips: the body once
    assert all(stats[k]["count"] == 0 for k in ("reduce-scatter", "all-to-all",
                                                 "collective-permute"))
    assert collective_seconds(stats, 1e9) == pytest.approx((9 * shard / 2 + shard) / 1e9)


def test_replica_group_forms():
    assert group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, dims", 8) == 4
    assert group_size("replica_groups=[2,4]<=[8], use_global_device_ids=true", 8) == 4
    assert group_size("replica_groups=[4,2]<=[2,4]T(1,0), channel_id=3", 8) == 2
    assert group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, x", 8) == 4
    assert group_size("replica_groups=mesh['axis_0'=8,'axis_1'=1,'axis_2'=1] "
                      "{'axis_0','axis_1'}, use_global_device_ids=true", 8) == 8
    assert group_size("replica_groups={}, to_apply=%add", 16) == 16


# Async pairs (counted at the start), an async-start wrapping a reduce-scatter, a permute,
# a loop with a `counter < constant` condition and a conditional (its costlier branch).
_ASYNC_HLO = """HloModule m, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%wrapped_rs (p: f32[64,128]) -> f32[16,128] {
  %p = f32[64,128]{1,0} parameter(0)
  ROOT %rs = f32[16,128]{1,0} reduce-scatter(%p), channel_id=5, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
}

%body (t: (s32[], bf16[4,128])) -> (s32[], bf16[4,128]) {
  %t = (s32[], bf16[4,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[4,128]{1,0} get-tuple-element(%t), index=1
  %ags = (bf16[4,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %agd = bf16[32,128]{1,0} all-gather-done(%ags)
  %ars = bf16[4,128]{1,0} all-reduce-start(%x), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %ard = bf16[4,128]{1,0} all-reduce-done(%ars)
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %out = (s32[], bf16[4,128]{1,0}) tuple(%j, %ard)
}

%cond (t: (s32[], bf16[4,128])) -> pred[] {
  %t = (s32[], bf16[4,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%small (q: f32[64,128]) -> f32[64,128] {
  %q = f32[64,128]{1,0} parameter(0)
  ROOT %cp = f32[64,128]{1,0} collective-permute(%q), channel_id=6, source_target_pairs={{0,1},{1,0}}
}

%big (r: f32[64,128]) -> f32[64,128] {
  %r = f32[64,128]{1,0} parameter(0)
  %cps = (f32[64,128]{1,0}, f32[64,128]{1,0}, u32[], u32[]) collective-permute-start(%r), channel_id=7, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[64,128]{1,0} collective-permute-done(%cps)
  ROOT %a2a = f32[64,128]{1,0} all-to-all(%cpd), channel_id=8, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
}

ENTRY %main (x: bf16[4,128], y: f32[64,128], k: s32[]) -> f32[16,128] {
  %x = bf16[4,128]{1,0} parameter(0)
  %y = f32[64,128]{1,0} parameter(1)
  %k = s32[] parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[4,128]{1,0}) tuple(%zero, %x)
  %loop = (s32[], bf16[4,128]{1,0}) while(%init), condition=%cond, body=%body
  %c = f32[64,128]{1,0} conditional(%k, %y, %y), branch_computations={%small, %big}
  %st = ((f32[64,128]{1,0}), f32[16,128]{1,0}, s32[]) async-start(%c), calls=%wrapped_rs
  ROOT %dn = f32[16,128]{1,0} async-done(%st)
}
"""


def test_async_pairs_iota_groups_loops_and_branches():
    stats = collectives(_ASYNC_HLO, trips=True)
    x, y = 4 * 128 * 2, 64 * 128 * 4
    assert stats["all-gather"] == dict(count=5, bytes=5 * 8 * x, wire=5 * 7 * x)
    assert stats["all-reduce"] == dict(count=5, bytes=5 * x, wire=5 * x)  # groups of 2
    assert stats["reduce-scatter"] == dict(count=1, bytes=y, wire=y * 3 / 4)
    # the branch that sends more: a permute and an all-to-all in groups of 4
    assert stats["collective-permute"] == dict(count=1, bytes=y, wire=y)
    assert stats["all-to-all"] == dict(count=1, bytes=y, wire=y * 3 / 4)
    assert ring_factor("all-reduce", 1) == 0 and ring_factor("collective-permute", 1) == 1


# The TPU compiler's fused forms: a reduce-scatter as an all-reduce of which a custom fusion
# returns one slice, and an all-gather held by its start, a compute fusion it progresses
# alongside and its done (the same collective: it counts once).
_FUSED_HLO = """HloModule m, is_scheduled=true, num_partitions=8

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

%all-reduce-scatter (input: bf16[2048,128]) -> bf16[256,128] {
  %input = bf16[2048,128]{1,0} parameter(0)
  %ar = bf16[2048,128]{1,0} all-reduce(%input), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %pid = u32[] partition-id()
  %c = u32[] constant(256)
  %m = u32[] multiply(%pid, %c)
  %z = u32[] constant(0)
  ROOT %ds = bf16[256,128]{1,0} dynamic-slice(%ar, %m, %z), dynamic_slice_sizes={256,128}
}

%start (p: bf16[16,128]) -> (bf16[16,128], bf16[128,128], u32[]) {
  %p = bf16[16,128]{1,0} parameter(0)
  %ag = bf16[128,128]{1,0} all-gather(%p), channel_id=8, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %cc = (bf16[16,128]{1,0}, bf16[128,128]{1,0}, u32[]) custom-call(%ag), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.1 (p: bf16[16,128], q: bf16[128,128]) -> (bf16[128,128], bf16[128,128]) {
  %p = bf16[16,128]{1,0} parameter(0)
  %q = bf16[128,128]{1,0} parameter(1)
  %ag = bf16[128,128]{1,0} all-gather(%p), channel_id=8, replica_groups=[1,8]<=[8], dimensions={0}
  %t = bf16[128,128]{1,0} tanh(%q)
  ROOT %out = (bf16[128,128]{1,0}, bf16[128,128]{1,0}) tuple(%t, %ag)
}

%done (p: bf16[16,128], q: bf16[128,128]) -> bf16[128,128] {
  %p = bf16[16,128]{1,0} parameter(0)
  %q = bf16[128,128]{1,0} parameter(1)
  %ag = bf16[128,128]{1,0} all-gather(%p), channel_id=8, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %cc = bf16[128,128]{1,0} custom-call(%p, %q, %ag), custom_call_target="AsyncCollectiveDone"
}

ENTRY %main (g: bf16[2048,128], w: bf16[16,128]) -> bf16[128,128] {
  %g = bf16[2048,128]{1,0} parameter(0)
  %w = bf16[16,128]{1,0} parameter(1)
  %rs = bf16[256,128]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter
  %s = (bf16[16,128]{1,0}, bf16[128,128]{1,0}, u32[]) fusion(%w), kind=kCustom, calls=%start
  %s1 = bf16[128,128]{1,0} get-tuple-element(%s), index=1
  %f = (bf16[128,128]{1,0}, bf16[128,128]{1,0}) fusion(%w, %s1), kind=kOutput, calls=%async_collective_fusion.1
  %f1 = bf16[128,128]{1,0} get-tuple-element(%f), index=1
  ROOT %d = bf16[128,128]{1,0} fusion(%w, %f1), kind=kCustom, calls=%done
}
"""


def test_the_tpu_compilers_fused_reduce_scatter_and_async_collective_fusions():
    stats = collectives(_FUSED_HLO, trips=True)
    grads, shard = 2048 * 128 * 2, 16 * 128 * 2
    assert stats["reduce-scatter"] == dict(count=1, bytes=grads, wire=grads * 7 / 8)
    assert stats["all-reduce"]["count"] == 0
    assert stats["all-gather"] == dict(count=1, bytes=8 * shard, wire=7 * shard)
