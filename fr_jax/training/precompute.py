"""What the frozen models contribute, computed once before a stage instead of in every
step: the experts' stage-1 signals and CDPO's reference log-probs, cached on disk."""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fr_jax import distributed
from fr_jax import sharding as sh
from fr_jax.data import Batcher, empty_rows, place_sequence
from fr_jax.experts import Experts
from fr_jax.router import Router
from fr_jax.training.objectives import SFT_FIELDS, make_signals_fn, reference_outputs

log = logging.getLogger("fr_jax.train")


def _in_order_batches(examples, batch_size: int, seq_len: int, kind: str, progress: bool,
                      desc: str):
    """(offset, chunk, rows) over `examples` in order, one unpacked row per example (row b =
    example offset + b; the last chunk is padded with repeats to a full batch)."""
    for lo in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress or not distributed.is_main()):
        chunk = examples[lo:lo + batch_size]
        rows = Batcher(chunk + chunk[:batch_size - len(chunk)], batch_size, seq_len, 0,
                       kind=kind, pack=False)
        rows._order = np.arange(len(rows.examples))  # keep the order: row b = example b
        yield lo, chunk, rows.next()


def _write_cache(cache_file: Optional[str], **arrays):
    """Writes a precompute cache (.npz) atomically, from process 0 only."""
    if not cache_file or jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
    tmp = cache_file + ".partial.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, cache_file)


def _matching_cache(cache_file: Optional[str], lengths, ids_sum: int, fingerprint,
                    what: str):
    """The cache's arrays when `cache_file` holds this data's results for these params on
    every process (else None: all of them compute it, as one program); a stale file is
    named in the log."""
    z = None
    if cache_file and os.path.isfile(cache_file):
        z = dict(np.load(cache_file))
        if not (z["lengths"].shape == lengths.shape and (z["lengths"] == lengths).all()
                and z["ids_sum"] == ids_sum and "fingerprint" in z
                and z["fingerprint"].shape == fingerprint.shape
                and (z["fingerprint"] == fingerprint).all()):
            log.warning("%s does not match the current data or %s; recomputing", cache_file,
                        what)
            z = None
    # A process without the file (a host-local workdir on another host) makes every
    # process compute: the computation is one SPMD program, run by all or by none.
    return z if distributed.all_agree(z is not None) else None


def _put(mesh, rows):
    """Host rows -> the program's inputs: global arrays sharded by rows on a mesh."""
    if mesh is None:
        return rows
    return {k: distributed.to_global(v, sh.batch_sharding(mesh, v.shape)) for k, v in rows.items()}


def _packed_batches(examples, batch_size: int, seq_len: int, progress: bool, desc: str):
    """(rows, placements) over `examples` in order, packed like training rows: each row
    holds consecutive examples as segments (positions restart, attention stays within a
    segment), so short examples do not pay for a whole row of padding. placements:
    (example index, row, start) of every example in the batch."""
    with tqdm(total=len(examples), desc=desc, disable=not progress or not distributed.is_main()) as bar:
        i = 0
        while i < len(examples):
            rows, placements = empty_rows(batch_size, seq_len), []
            for b in range(batch_size):
                start, segment = 0, 1
                while i < len(examples) and start + len(examples[i].ids) - 1 <= seq_len:
                    placements.append((i, b, start))
                    start = place_sequence(rows, b, start, examples[i].ids,
                                           examples[i].response, segment)
                    i, segment = i + 1, segment + 1
                if i < len(examples) and start == 0:  # tokenize_sft keeps rows <= seq_len
                    raise ValueError(f"example {i} is longer than seq_len={seq_len}")
            bar.update(len(placements))
            yield rows, placements


def precompute_signals(examples, experts: Experts, e_params, vocab: int, seq_len: int,
                       batch_size: int, cache_file: Optional[str] = None, progress=True,
                       mesh=None, block: int = 0):
    """Attaches the frozen experts' per-target signals to every SFT example, reading them
    from `cache_file` (.npz) when it matches the data and the experts' params, else
    computing and writing it. Reused across epochs, restarts and runs that share experts
    and data (`train.sft.signals_cache`): the experts then never run inside the training
    step. Rows are packed, as in training: the experts' forward passes are most of the
    precompute's time, and padding would multiply them."""
    lengths = np.array([len(e.ids) - 1 for e in examples])
    total = int(lengths.sum())
    ids_sum = sum(int(e.ids.sum()) for e in examples)
    fingerprint = params_fingerprint(e_params)
    z = _matching_cache(cache_file, lengths, ids_sum, fingerprint, "experts")
    if z is not None:
        offsets = np.r_[0, np.cumsum(lengths)]
        for i, e in enumerate(examples):
            e.signal_logprob = z["logprob"][offsets[i]:offsets[i + 1]]
            e.signal_top1 = z["top1"][offsets[i]:offsets[i + 1]]
        return examples
    fn = signals_program(experts, vocab, block, mesh, seq_len, batch_size)
    for rows, placements in _packed_batches(examples, batch_size, seq_len, progress,
                                            "expert signals"):
        lp, top1 = distributed.fetch(fn(e_params, _put(mesh, {k: rows[k] for k in SFT_FIELDS})))
        for i, b, start in placements:  # lp, top1: [experts, batch, seq]
            span = slice(start, start + lengths[i])
            examples[i].signal_logprob = np.ascontiguousarray(lp[:, b, span].T)
            examples[i].signal_top1 = np.ascontiguousarray(top1[:, b, span].T)
    _write_cache(cache_file, lengths=lengths, ids_sum=ids_sum, fingerprint=fingerprint,
                 logprob=np.concatenate([e.signal_logprob for e in examples]) if total else
                 np.zeros((0, experts.n), np.float32),
                 top1=np.concatenate([e.signal_top1 for e in examples]) if total else
                 np.zeros((0, experts.n), np.int32))
    return examples


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


def params_fingerprint(params) -> np.ndarray:
    """Sum and sum of squares of every leaf (float32, [2 x leaves]): what a cache computed
    from these params is keyed by."""
    f = jax.jit(lambda p: jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                                jnp.sum(jnp.square(x.astype(jnp.float32)))])
                                     for x in jax.tree.leaves(p)]))
    return distributed.fetch(f(params)).ravel()


def precompute_reference(examples, router: Router, ref_params, experts: Experts, e_params,
                         vocab: int, seq_len: int, batch_size: int,
                         cache_file: Optional[str] = None, progress=True, mesh=None,
                         block: int = 0):
    """Attaches the stage-1 router's CDPO reference (sequence log-prob of each side and its
    routing logits) to every preference pair, from `cache_file` (.npz) when it matches the
    data and the router's params, else computed and written. The step then holds neither
    the reference router nor its forward pass."""
    sides = ("chosen", "rejected")
    lengths = np.array([[len(e.prompt) + len(getattr(e, s)) - 1 for s in sides]
                        for e in examples]).reshape(-1, 2)
    ids_sum = sum(int(e.prompt.sum() + e.chosen.sum() + e.rejected.sum()) for e in examples)
    fingerprint = params_fingerprint(ref_params)

    def attach(logprob, route):
        offsets = np.r_[0, np.cumsum(lengths.ravel())]
        for i, e in enumerate(examples):
            e.ref_logprob = logprob[i]
            e.ref_route = tuple(route[offsets[2 * i + j]:offsets[2 * i + j + 1]]
                                for j in range(2))
        return examples

    z = _matching_cache(cache_file, lengths, ids_sum, fingerprint, "stage-1 router")
    if z is not None:
        return attach(z["logprob"], z["route"])
    fn = reference_program(router, experts, vocab, block, mesh, seq_len, batch_size)
    logprob = np.zeros((len(examples), 2), np.float32)
    routes = [[None, None] for _ in examples]
    for lo, chunk, batch in _in_order_batches(examples, batch_size, seq_len, "pref", progress,
                                              "CDPO reference"):
        for j, s in enumerate(sides):
            side = {k: batch[s][k] for k in SFT_FIELDS}
            lp, route = distributed.fetch(fn(ref_params, e_params, _put(mesh, side)))
            for b in range(len(chunk)):
                logprob[lo + b, j] = lp[b]
                routes[lo + b][j] = np.asarray(route[b, :lengths[lo + b, j]], np.float32)
    n = router.n_experts
    route = np.concatenate([r for pair in routes for r in pair]) if routes else \
        np.zeros((0, n), np.float32)
    _write_cache(cache_file, lengths=lengths, ids_sum=ids_sum, fingerprint=fingerprint,
                 logprob=logprob, route=route)
    return attach(logprob, route)
