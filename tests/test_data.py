"""Data pipeline: formats, bad records, prompt masking, packing, deterministic resume."""

import json

import datasets
import numpy as np
import pytest

from fr_jax.corpus import Batcher, DataError, load_records, tokenize_pref, tokenize_sft
from fr_jax.toy.tiny import build_tokenizer

TOK = build_tokenizer()
RECORDS = [
    {"prompt": "What is 12 plus 30?", "response": "The answer is 42."},
    {"messages": [{"role": "user", "content": "def add(a, b):"},
                  {"role": "assistant", "content": "return a + b"}]},
    {"prompt": "no answer here"},  # missing response
    {"prompt": "empty", "response": "   "},  # empty response
    {"prompt": "long " * 80, "response": "x"},  # too long
    {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
] + [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(20)]


def test_formats_load_the_same_records(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.parquet", "saved"):
        assert list(load_records(str(tmp_path / name))) == rows
    with pytest.raises(DataError, match="not found .*jsonl"):
        load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        load_records(str(tmp_path / "d.csv"))


def test_bad_records_are_counted_and_prompt_is_masked():
    examples, report = tokenize_sft(RECORDS, TOK, seq_len=64)
    assert report.kept == 22
    assert dict(report.skipped) == {"missing_response": 1, "empty_response": 1, "too_long": 1,
                                    "last_message_not_assistant": 1}
    assert "skipped 4" in str(report)
    ex = examples[0]
    prompt_len = int((ex.response == 0).sum())
    rendered = TOK.decode(ex.ids[:prompt_len])
    assert rendered.endswith("assistant: ") and "12 plus 30" in rendered  # chat template
    assert TOK.decode(ex.ids[prompt_len:], skip_special_tokens=True) == "The answer is 42."
    assert ex.ids[-1] == TOK.eos_token_id and ex.response[-1] == 1


def test_packing_fixed_shapes_and_targets():
    examples, _ = tokenize_sft(RECORDS, TOK, seq_len=160)
    batch = Batcher(examples, batch_size=3, seq_len=160, seed=0).next()
    assert all(v.shape == (3, 160) for v in batch.values())
    assert batch["segment_ids"].max() > 1  # several examples share a row
    seg = batch["segment_ids"][0]
    for s in range(1, seg.max() + 1):
        pos = batch["positions"][0][seg == s]
        np.testing.assert_array_equal(pos, np.arange(len(pos)))  # positions restart per example
    real = seg > 0
    # targets are the next input token inside a segment
    same = real[:-1] & (seg[:-1] == seg[1:])
    np.testing.assert_array_equal(batch["targets"][0][:-1][same], batch["tokens"][0][1:][same])
    assert (batch["loss_mask"][~(batch["segment_ids"] > 0)] == 0).all()


@pytest.mark.parametrize("pack", [True, False])
def test_epoch_sees_every_example_once_and_resume_continues_exactly(pack):
    examples, _ = tokenize_sft(RECORDS, TOK, seq_len=64)
    a = Batcher(examples, batch_size=2, seq_len=64, seed=3, pack=pack)
    seen = []
    while a.epoch == 0:
        state = a.state()
        if state["index"] >= len(examples):
            break
        before = a.index
        a.next()
        seen.extend(a._order[before:a.index].tolist())
    assert sorted(seen) == list(range(len(examples)))

    b = Batcher(examples, batch_size=2, seq_len=64, seed=3, pack=pack)
    for _ in range(3):
        b.next()
    saved = b.state()
    expected = [b.next() for _ in range(4)]  # crosses into epoch 1
    c = Batcher(examples, batch_size=2, seq_len=64, seed=3, pack=pack)
    c.restore(saved)
    for want in expected:
        got = c.next()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_preference_pairs():
    recs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": "x", "chosen": "", "rejected": "y"}, {"prompt": "x", "chosen": "y"}]
    examples, report = tokenize_pref(recs, TOK, seq_len=32)
    assert report.kept == 1 and dict(report.skipped) == {"empty_response": 1,
                                                         "missing_rejected": 1}
    batch = Batcher(examples, batch_size=2, seq_len=32, seed=0, kind="pref").next()
    c, r = batch["chosen"], batch["rejected"]
    assert c["tokens"].shape == (2, 32) and c["loss_mask"][1].sum() == 0  # second row padding
    n_prompt = len(examples[0].prompt)
    np.testing.assert_array_equal(c["tokens"][0, :n_prompt], r["tokens"][0, :n_prompt])
    assert c["loss_mask"][0].sum() == len(examples[0].chosen)


def test_every_record_is_read_as_the_text_it_is_and_bad_ones_are_counted_where_they_are(
        tmp_path):
    """Issue 16: one record with a number for a response used to make the JSON loader type
    the whole column, dropping good answers that look like numbers or lists; one line that is
    not JSON was fatal. Now every line is read as written and each bad one is skipped,
    counted and located."""
    good = [{"prompt": f"add {i}+{i}", "response": str(2 * i)} for i in range(97)]
    good += [{"prompt": "wrap 108", "response": "[108]"},
             {"messages": [{"role": "user", "content": "rev ab"},
                           {"role": "assistant", "content": "ba"}]},
             {"prompt": "say null", "response": "null"}]
    lines = [json.dumps(r) for r in good]
    lines.insert(10, json.dumps({"prompt": "add 1+2", "response": 3}))  # line 11
    lines.insert(20, "this line is not JSON")  # line 21
    lines.insert(30, json.dumps({"messages": "hello"}))  # line 31
    lines.insert(40, json.dumps(["a", "list"]))  # line 41
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:21: not valid JSON"):
        load_records(str(path))  # strict (benchmark files): the first bad line, located
    records = load_records(str(path), strict=False)
    answers = {r.get("prompt"): r.get("response") for r in records}
    assert answers["add 31+31"] == "62" and answers["wrap 108"] == "[108]"
    assert answers["say null"] == "null" and records[0] == good[0]
    examples, report = tokenize_sft(records, TOK, seq_len=64)
    assert report.kept == 100 and len(examples) == 100
    assert dict(report.skipped) == {"response_not_text": 1, "bad_json": 1, "bad_messages": 1,
                                    "not_an_object": 1}
    assert report.where["response_not_text"] == [f"{path}:11"]
    assert report.where["bad_json"] == [f"{path}:21"]
    assert report.where["bad_messages"] == [f"{path}:31"]
    assert f"{path}:41" in str(report)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_records(str(empty))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        load_records(str(tmp_path / "blank.jsonl"), strict=False)
    (tmp_path / "array.json").write_text(json.dumps(good[:3] + [{"prompt": "x", "response": 1}]))
    arr = load_records(str(tmp_path / "array.json"), strict=False)
    _, rep = tokenize_sft(arr, TOK, seq_len=64)
    assert rep.kept == 3 and rep.where["response_not_text"] == [f"{tmp_path / 'array.json'}[3]"]


def test_preference_records_with_wrong_types_are_skipped():
    recs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": "2+2?", "chosen": 4, "rejected": "5"},
            {"prompt": 7, "chosen": "4", "rejected": "5"}]
    _, report = tokenize_pref(recs, TOK, seq_len=32)
    assert report.kept == 1
    assert dict(report.skipped) == {"response_not_text": 1, "prompt_not_text": 1}
