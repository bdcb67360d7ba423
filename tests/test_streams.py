"""Data streams (fr_jax/corpus/streams.py): how a stage's file is split between processes,
checked in one process by building the layouts of several. The processes' rows put
together are the batches one process reads; positions gathered from them resume anywhere;
a process reads only its streams' entries; the precompute spread over row blocks gives
each example what the plain path gives it."""

import json

import numpy as np
import pytest

from fr_jax.corpus import Batcher, DataError, SFTExample, load_records, tokenize_sft
from fr_jax.corpus.streams import Layout, StreamBatcher, auto_streams, split_entries
from fr_jax.runtime import sharding as sh
from fr_jax.toy.tiny import build_tokenizer

TOK = build_tokenizer()


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(4, 14))
        ids = rng.integers(3, 90, k).astype(np.int32)
        out.append(SFTExample(ids, (np.arange(k) >= k // 2).astype(np.int32)))
    return out


def _blocks(holders):
    """Two rows per block, held by the given processes."""
    return tuple((2 * k, 2 * k + 2, frozenset(h)) for k, h in enumerate(holders))


def test_entries_are_dealt_once_and_one_stream_keeps_the_plain_order():
    train, held = split_entries(103, 4, 0.1, seed=5)
    everything = np.concatenate(train + held)
    assert sorted(everything.tolist()) == list(range(103))
    assert sum(len(h) for h in held) == 10
    assert max(len(t) for t in train) - min(len(t) for t in train) <= 1
    # One stream: the held-out entries and the training order of the plain split.
    (t1,), (h1,) = split_entries(103, 1, 0.1, seed=5)
    order = np.random.default_rng([5, 12345]).permutation(103)
    assert t1.tolist() == order[10:].tolist() and h1.tolist() == order[:10].tolist()
    assert [len(x) for x in split_entries(1, 2, 0.5, 0)[1]] == [0, 0]  # nothing to hold out


def test_the_default_stream_count_is_one_per_host_row_range():
    assert auto_streams(_blocks([{0}] * 4), 8) == 1
    assert auto_streams(_blocks([{0}, {0}, {1}, {1}]), 8) == 2
    assert auto_streams(_blocks([{0, 1}] * 4), 8) == 1  # tensor axis across the hosts
    assert auto_streams(_blocks([{0}, {1}, {1}]), 6) == 1  # unequal runs
    with pytest.raises(DataError, match="data.streams=3 does not divide"):
        Layout(3, 8, _blocks([{0}] * 4))


def test_one_stream_gives_the_plain_batches_and_resumes_from_their_old_position():
    ex = _examples(40)
    layout = Layout(1, 4, _blocks([{0}, {0}]))
    sb, plain = StreamBatcher(layout, {0: ex}, 32, seed=3), Batcher(ex, 4, 32, seed=3)
    for _ in range(15):  # across epochs
        a, b = sb.next(), plain.next()
        for k in b:
            np.testing.assert_array_equal(a[k], b[k])
    again = StreamBatcher(layout, {0: ex}, 32, seed=3)
    again.restore(plain.state())  # a checkpoint written before streams
    np.testing.assert_array_equal(again.next()["tokens"], plain.next()["tokens"])


def test_the_processes_rows_together_are_one_process_batches_and_resume_on_either():
    """Four streams on two hosts (rows 0-3 on process 0, 4-7 on process 1) against the
    same four streams read by one process: equal batches; the positions gathered from
    the two resume one process, and one process's resume the two."""
    ex = _examples(90, seed=1)
    train, _ = split_entries(len(ex), 4, 0.0, seed=2)
    streams = {s: [ex[i] for i in train[s]] for s in range(4)}
    holders = [{0}, {0}, {1}, {1}]
    two = [Layout(4, 8, _blocks(holders), p) for p in (0, 1)]
    one = Layout(4, 8, _blocks([{0}] * 4), 0)
    assert [l.mine() for l in two] == [[0, 1], [2, 3]] and one.mine() == [0, 1, 2, 3]
    parts = [StreamBatcher(l, {s: streams[s] for s in l.mine()}, 24, seed=7) for l in two]
    whole = StreamBatcher(one, streams, 24, seed=7)

    def joined():
        a, b = (p.next() for p in parts)
        return {k: np.concatenate([a[k][:4], b[k][4:]]) for k in a}

    for _ in range(9):
        x, y = joined(), whole.next()
        for k in y:
            np.testing.assert_array_equal(x[k], y[k])
        assert sum(p.tokens(x) for p in parts) == whole.tokens(y) == (y["segment_ids"] > 0).sum()
    state = StreamBatcher.state(4, [json.loads(json.dumps(p.positions())) for p in parts])
    assert state == StreamBatcher.state(4, [whole.positions()])
    e, i = state["positions"][3]
    assert StreamBatcher.describe(state).endswith(f"; 3: epoch {e}, example {i}")
    resumed = StreamBatcher(one, streams, 24, seed=7)
    resumed.restore(state)
    for p in parts:
        p.restore(StreamBatcher.state(4, [whole.positions()]))
    for _ in range(3):
        x, y, z = joined(), whole.next(), resumed.next()
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(z["tokens"], y["tokens"])
    with pytest.raises(DataError, match="no process reads data stream 2"):
        StreamBatcher.state(4, [parts[0].positions()])


def test_the_once_per_stage_work_gives_every_holder_all_of_its_streams():
    """Per stream, each set of holders computes every example once."""
    cases = [(Layout(4, 8, _blocks([{0}, {0}, {1}, {1}]), p), [4, 4]) for p in (0, 1)]
    cases += [(Layout(1, 8, _blocks([{0}, {0}, {1}, {1}]), p), [2, 2]) for p in (0, 1)]
    cases += [(Layout(2, 8, _blocks([{0, 1}] * 4), p), [4, 4]) for p in (0, 1)]
    cases += [(Layout(2, 8, _blocks([{0}] * 4), 0), [4, 4])]
    sizes = {0: 11, 1: 7, 2: 5, 3: 9}
    for layout, _ in cases:
        work = layout.work({s: sizes[s] for s in layout.mine()})
        assert set(work) == {k for k, b in enumerate(layout.blocks) if layout.process in b[2]}
        done = [x for items in work.values() for x in items]
        for s in layout.mine():
            assert sorted(i for t, i in done if t == s) == list(range(sizes[s])), (layout, s)


def test_a_process_reads_only_its_streams_entries(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(30)]
    lines[7] = "{not json"
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines[:15]) + "\n\n" + "\n".join(lines[15:]) + "\n")
    train, held = split_entries(30, 3, 0.2, seed=0)
    mine = np.concatenate([train[1], held[1]])
    recs = load_records(str(path), strict=False, select=lambda n: mine)
    assert recs.n_entries == 30 and len(recs) + len(recs.bad) == len(mine)
    assert sorted(recs.entries + recs.bad_entries) == sorted(mine.tolist())
    for r, e, where in zip(recs, recs.entries, recs.where):
        assert r["prompt"] == f"q{e}"  # entry 15 onwards sits one line lower (a blank line)
        assert where == f"{path}:{e + 1 + (e >= 15)}"
    assert bool(recs.bad) == (7 in mine)
    part = recs.subset(train[1])
    assert part.entries == [e for e in train[1].tolist() if e != 7]
    examples, report = tokenize_sft(part, TOK, 64, chat=False)
    assert report.kept == len(examples) == len(part)


def test_stage_data_holds_this_process_streams_and_counts_what_it_read(tmp_path):
    from ml_collections import ConfigDict

    from fr_jax.loop.inputs import load_stage_data

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n"
                            for i in range(40)))
    dc = ConfigDict(dict(eval_fraction=0.1, seed=1, seq_len=64, chat=False))
    layout = Layout(2, 8, _blocks([{0}, {0}, {1}, {1}]), 0)
    data = load_stage_data(str(path), "sft", TOK, dc, layout)
    assert set(data.train) == {0} and data.n_entries == 40 and data.n_read == 20
    assert len(data.train[0]) + len(data.held[0]) == 20 and len(data.held[0]) == 2
    assert data.report.kept == 20  # one process here: only its stream is counted
    both = load_stage_data(str(path), "sft", TOK, dc, Layout(2, 8, _blocks([{0}] * 4), 0))
    assert both.n_read == 40 and both.n_train == 36 and both.n_held == 4
    first = [e.ids.tolist() for e in both.train[0]]
    assert first == [e.ids.tolist() for e in data.train[0]]


def test_precompute_over_row_blocks_gives_each_example_the_plain_signals(tmp_path):
    """Streams on an 8-device data axis (two blocks each, one process): every example's
    expert signals equal the single-stream precompute's, and each stream has a cache."""
    from fr_jax.loop import precompute_signals
    from fixtures import build_world

    _, _, experts, e_list = build_world("llama", n_experts=2)
    e_params = experts.combine(e_list)
    ex = _examples(37, seed=4)
    plain = precompute_signals([SFTExample(e.ids, e.response) for e in ex], experts, e_params,
                               97, 24, batch_size=8, progress=False)
    mesh = sh.make_mesh({"data": 8})
    layout = Layout(4, 16, tuple(sh.row_holders(mesh, 16)), 0)
    train, _ = split_entries(len(ex), 4, 0.0, 0)
    streams = {s: [SFTExample(ex[i].ids, ex[i].response) for i in train[s]] for s in range(4)}
    cache = tmp_path / "signals.npz"
    out = precompute_signals(streams, experts, e_params, 97, 24, batch_size=8,
                             cache_file=str(cache), progress=False, mesh=mesh, layout=layout)
    for s in range(4):
        for i, e in zip(train[s], out[s]):
            np.testing.assert_allclose(e.signal_logprob, plain[i].signal_logprob, atol=1e-5)
            np.testing.assert_array_equal(e.signal_top1, plain[i].signal_top1)
        assert (tmp_path / f"signals.stream{s}of4.npz").is_file()
    again = precompute_signals({s: [SFTExample(e.ids, e.response) for e in v]
                                for s, v in streams.items()}, None, e_params, 97, 24,
                               batch_size=8, cache_file=str(cache), progress=False, mesh=mesh,
                               layout=layout)  # no experts: read from the caches
    np.testing.assert_array_equal(again[2][1].signal_top1, out[2][1].signal_top1)
