"""The frozen models' programs a stage runs once before its steps, jitted like the step:
the experts' stage-1 signals and CDPO's reference log-probs (fr_jax.loop.frozen_outputs runs
them over the data and caches what they return)."""

from __future__ import annotations

import jax

from fr_jax.routing.experts import Experts
from fr_jax.routing.router import Router
from fr_jax.runtime import sharding as sh
from fr_jax.steps.objectives import SFT_FIELDS, make_signals_fn, reference_outputs


def signals_program(experts: Experts, vocab: int, block: int, mesh, seq_len: int,
                    batch_size: int):
    """make_signals_fn jitted: expert params sharded by the rules (as loaded), the batch's
    rows over data/fsdp, traced on `mesh` (activation pins); no mesh: one device."""
    fn = make_signals_fn(experts, vocab, block)
    if mesh is None:
        return jax.jit(fn)
    b_sh = sh.batch_sharding(mesh, (batch_size, seq_len))
    return jax.jit(sh.traced_on(fn, mesh),
                   in_shardings=(sh.param_shardings(experts, mesh),
                                 {k: b_sh for k in SFT_FIELDS}),
                   out_shardings=sh.NamedSharding(mesh, sh.P(None, *b_sh.spec)))


def reference_program(router: Router, experts: Experts, vocab: int, block: int, mesh,
                      seq_len: int, batch_size: int):
    """(stage-1 router params, expert params, side rows) -> (ref_logprob [B],
    ref_route_logits [B, T, n]) jitted like signals_program: the CDPO reference, once."""
    def fn(ref_params, e_params, side):
        e_hidden = experts.hidden(e_params, side["tokens"], side["positions"],
                                  side["segment_ids"])
        return reference_outputs(router, experts, vocab, block, ref_params, e_params, e_hidden, side)
    if mesh is None:
        return jax.jit(fn)
    b_sh = sh.batch_sharding(mesh, (batch_size, seq_len))
    return jax.jit(sh.traced_on(fn, mesh),
                   in_shardings=(sh.param_shardings(router, mesh),
                                 sh.param_shardings(experts, mesh),
                                 {k: b_sh for k in SFT_FIELDS}),
                   out_shardings=(sh.batch_sharding(mesh, (batch_size,)), b_sh))
