"""What the frozen models contribute, computed once before a stage instead of in every
step: the experts' stage-1 signals and CDPO's reference log-probs (fr_jax.steps.precompute's
programs) over the stage's data, cached on disk."""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fr_jax.corpus import empty_rows, pack_batch, place_sequence, place_side
from fr_jax.corpus.streams import Layout
from fr_jax.routing.experts import Experts
from fr_jax.routing.router import Router
from fr_jax.runtime import distributed
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.paths import replacing
from fr_jax.steps.objectives import SFT_FIELDS
from fr_jax.steps.precompute import reference_program, signals_program

log = logging.getLogger("fr_jax.train")


def _stream_cache(cache_file: Optional[str], s: int, n_streams: int) -> Optional[str]:
    """Stream s's cache file: `cache_file` itself for a single stream, else one file per
    stream beside it (name.stream<s>of<n>.npz), each written by the stream's first
    reader."""
    if not cache_file or n_streams == 1:
        return cache_file
    root, ext = os.path.splitext(cache_file)
    return f"{root}.stream{s}of{n_streams}{ext or '.npz'}"


def _write_cache(cache_file: Optional[str], **arrays):
    """Writes a precompute cache (.npz) atomically."""
    if not cache_file:
        return
    with replacing(cache_file, ".partial.npz") as tmp:
        np.savez(tmp, **arrays)


def _read_cache(cache_file: Optional[str], lengths, ids_sum: int, fingerprint, what: str):
    """The arrays of `cache_file` when it holds this data's results for these params, else
    None (a stale file is named in the log)."""
    if not cache_file or not os.path.isfile(cache_file):
        return None
    z = dict(np.load(cache_file))
    if not (z["lengths"].shape == lengths.shape and (z["lengths"] == lengths).all()
            and z["ids_sum"] == ids_sum and "fingerprint" in z
            and z["fingerprint"].shape == fingerprint.shape
            and (z["fingerprint"] == fingerprint).all()):
        log.warning("%s does not match the current data or %s; recomputing", cache_file, what)
        return None
    return z


def _cached(cache_file, layout, keys, fingerprint, what):
    """{stream: cache arrays} for this process's streams when every process finds all of
    its streams' caches matching, else None: then every process computes (the computation
    is one SPMD program, run by all or by none; a process without the file -- a
    host-local workdir on another host -- makes all of them compute)."""
    found = {s: _read_cache(_stream_cache(cache_file, s, layout.n_streams), *keys[s],
                            fingerprint, what) for s in keys}
    ok = all(z is not None for z in found.values())
    return found if distributed.all_agree(ok) else None


def _put(mesh, rows):
    """Host rows -> the program's inputs: global arrays sharded by rows on a mesh (each
    process placing its own devices' rows)."""
    if mesh is None:
        return rows
    return {k: distributed.to_global(v, sh.batch_sharding(mesh, v.shape)) for k, v in rows.items()}


def _single(examples, mesh, batch_size):
    """A list of examples as the one stream of a layout whose batches are `batch_size`
    rows on `mesh` (one device without a mesh)."""
    blocks = (tuple(sh.row_holders(mesh, batch_size)) if mesh is not None
              else ((0, batch_size, frozenset({jax.process_index()})),))
    return {0: examples}, Layout(1, batch_size, blocks, jax.process_index())


def _rows_for(layout: Layout, mesh, batch_size: int) -> int:
    """The rows of a precompute batch: `batch_size` when its row blocks lie on the
    processes as a training batch's do (the work is assigned per block), else the
    training batch's."""
    if mesh is None:
        return batch_size
    same = [b[2] for b in sh.row_holders(mesh, batch_size)] == [b[2] for b in layout.blocks]
    return batch_size if same else layout.batch_size


def _plan(lengths, rows: int, seq_len: int, pack: bool):
    """Batches of (item, row, start, segment) placing all items of `lengths` tokens in
    `rows` rows of seq_len by the training batches' packing rule (`pack_batch`)."""
    batches, i = [], 0
    while i < len(lengths):
        batch = pack_batch(lambda j: lengths[i + j], len(lengths) - i, rows, seq_len, pack)
        if not batch:  # tokenization keeps rows <= seq_len
            raise ValueError(f"an example of {lengths[i]} tokens is longer than "
                             f"seq_len={seq_len}")
        batches.append([(i + j, r, start, segment) for j, r, start, segment in batch])
        i += len(batch)
    return batches


def _blocks_run(layout: Layout, streams: Dict[int, list], rows: int, seq_len: int,
                length, pack: bool, progress: bool, desc: str):
    """{block: its placements [(stream, example, row in the batch, start, segment)]}
    for every global batch of a once-per-stage computation over this process's examples,
    spread over the row blocks by `layout.work` (every process runs the same number of
    batches: the most any block needs)."""
    per_block = rows // len(layout.blocks)
    work = layout.work({s: len(ex) for s, ex in streams.items()})
    plans = {k: _plan([length(streams[s][i]) for s, i in items], per_block, seq_len, pack)
             for k, items in work.items()}
    n = max(distributed.gather(max([len(p) for p in plans.values()] + [0])))
    for t in tqdm(range(n), desc=desc, disable=not progress or not distributed.is_main()):
        yield {k: [(*work[k][j], k * per_block + r, start, seg) for j, r, start, seg in plan[t]]
               for k, plan in plans.items() if t < len(plan)}


def precompute_signals(examples, experts: Experts, e_params, vocab: int, seq_len: int,
                       batch_size: int, cache_file: Optional[str] = None, progress=True,
                       mesh=None, block: int = 0, layout: Optional[Layout] = None,
                       observe=None):
    """Attaches the frozen experts' per-target signals to every SFT example, reading them
    from `cache_file` (.npz) when it matches the data and the experts' params, else
    computing and writing it. Reused across epochs, restarts and runs that share experts
    and data (`train.sft.signals_cache`): the experts then never run inside the training
    step. Rows are packed, as in training: the experts' forward passes are most of the
    precompute's time, and padding would multiply them.

    `examples`: a list, or with `layout` {stream: examples} of this process's streams
    (fr_jax.corpus.streams): each process then computes only its own examples, on its own
    devices' rows, and one cache file per stream is kept."""
    single = layout is None
    streams, layout = _single(examples, mesh, batch_size) if single else (examples, layout)
    keys = {s: (np.array([len(e.ids) - 1 for e in ex], dtype=np.int64),
                sum(int(e.ids.sum()) for e in ex)) for s, ex in streams.items()}
    fingerprint = params_fingerprint(e_params)
    found = _cached(cache_file, layout, keys, fingerprint, "experts")
    if found is None:
        rows = _rows_for(layout, mesh, batch_size)
        fn = signals_program(experts, vocab, block, mesh, seq_len, rows)
        for placed in _blocks_run(layout, streams, rows, seq_len, lambda e: len(e.ids) - 1,
                                  True, progress, "expert signals"):
            host = empty_rows(rows, seq_len)
            for items in placed.values():
                for s, i, r, start, segment in items:
                    e = streams[s][i]
                    place_sequence(host, r, start, e.ids, e.response, segment)
            args = (e_params, _put(mesh, {k: host[k] for k in SFT_FIELDS}))
            if observe is not None:
                observe("signals", fn, args)
                observe = None
            lp, top1 = (distributed.local_view(x) for x in fn(*args))
            for items in placed.values():
                for s, i, r, start, _ in items:  # lp, top1: [experts, rows, seq]
                    e = streams[s][i]
                    span = slice(start, start + len(e.ids) - 1)
                    e.signal_logprob = np.ascontiguousarray(lp[:, r, span].T)
                    e.signal_top1 = np.ascontiguousarray(top1[:, r, span].T)
        for s, ex in streams.items():
            if layout.leads(s):
                n = experts.n
                _write_cache(_stream_cache(cache_file, s, layout.n_streams), lengths=keys[s][0],
                             ids_sum=keys[s][1], fingerprint=fingerprint,
                             logprob=np.concatenate([e.signal_logprob for e in ex] +
                                                    [np.zeros((0, n), np.float32)]),
                             top1=np.concatenate([e.signal_top1 for e in ex] +
                                                 [np.zeros((0, n), np.int32)]))
    else:
        for s, ex in streams.items():
            offsets = np.r_[0, np.cumsum(keys[s][0])]
            for i, e in enumerate(ex):
                e.signal_logprob = found[s]["logprob"][offsets[i]:offsets[i + 1]]
                e.signal_top1 = found[s]["top1"][offsets[i]:offsets[i + 1]]
    return streams[0] if single else streams


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
                         block: int = 0, layout: Optional[Layout] = None, observe=None):
    """Attaches the stage-1 router's CDPO reference (sequence log-prob of each side and its
    routing logits) to every preference pair, from `cache_file` (.npz) when it matches the
    data and the router's params, else computed and written. The step then holds neither
    the reference router nor its forward pass. `examples` and `layout`: as in
    `precompute_signals` (one pair per row)."""
    sides = ("chosen", "rejected")
    single = layout is None
    streams, layout = _single(examples, mesh, batch_size) if single else (examples, layout)
    keys = {s: (np.array([[len(e.prompt) + len(getattr(e, side)) - 1 for side in sides]
                          for e in ex], dtype=np.int64).reshape(-1, 2),
                sum(int(e.prompt.sum() + e.chosen.sum() + e.rejected.sum()) for e in ex))
            for s, ex in streams.items()}
    fingerprint = params_fingerprint(ref_params)
    found = _cached(cache_file, layout, keys, fingerprint, "stage-1 router")
    if found is None:
        rows = _rows_for(layout, mesh, batch_size)
        fn = reference_program(router, experts, vocab, block, mesh, seq_len, rows)
        longest = lambda e: len(e.prompt) + max(len(e.chosen), len(e.rejected)) - 1
        for placed in _blocks_run(layout, streams, rows, seq_len, longest, False, progress,
                                  "CDPO reference"):
            items = [x for block_items in placed.values() for x in block_items]
            out = []
            for side in sides:
                host = empty_rows(rows, seq_len)
                for s, i, r, _, _ in items:
                    place_side(host, r, streams[s][i], side)
                args = (ref_params, e_params, _put(mesh, {k: host[k] for k in SFT_FIELDS}))
                if observe is not None:
                    observe("reference", fn, args)
                    observe = None
                out.append([distributed.local_view(x) for x in fn(*args)])
            for s, i, r, _, _ in items:
                e, n = streams[s][i], keys[s][0][i]
                e.ref_logprob = np.array([out[j][0][r] for j in range(2)], np.float32)
                e.ref_route = tuple(np.asarray(out[j][1][r, :n[j]], np.float32)
                                    for j in range(2))
        for s, ex in streams.items():
            if layout.leads(s):
                _write_cache(_stream_cache(cache_file, s, layout.n_streams),
                             lengths=keys[s][0], ids_sum=keys[s][1], fingerprint=fingerprint,
                             logprob=np.array([e.ref_logprob for e in ex],
                                              np.float32).reshape(-1, 2),
                             route=np.concatenate([r for e in ex for r in e.ref_route] +
                                                  [np.zeros((0, router.n_experts),
                                                            np.float32)]))
    else:
        for s, ex in streams.items():
            z, lengths = found[s], keys[s][0]
            offsets = np.r_[0, np.cumsum(lengths.ravel())]
            for i, e in enumerate(ex):
                e.ref_logprob = z["logprob"][i]
                e.ref_route = tuple(z["route"][offsets[2 * i + j]:offsets[2 * i + j + 1]]
                                    for j in range(2))
    return streams[0] if single else streams
