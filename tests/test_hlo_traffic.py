"""fr_jax.hlo_traffic against programs whose HBM traffic is known, compiled by the TPU
compiler for one v5e chip: a matrix-vector product reads its weight once (XLA's own
bytes-accessed counts the on-chip prefetch as well), a one-row embedding lookup reads one
row, not the table, and a donated cache updated in place writes the update only."""

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fr_jax import planning as plan
from fr_jax.hlo_traffic import hbm_bytes

MiB = 1 << 20


@functools.lru_cache(maxsize=None)
def _chip():
    _, devices = plan.topology_devices("v5e-8")
    return Mesh(np.array(devices[:1]), ("x",))


def _traffic(fn, *shapes, donate=()):
    """(fr_jax.hlo_traffic's bytes, XLA's bytes accessed) of fn compiled for one chip."""
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
