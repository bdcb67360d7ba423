"""Tokenization: SFT and preference records -> token-id examples, bad records counted.

SFT:        {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}
            (the last message must be the assistant's; the rest is the prompt)
preference: {"prompt": str, "chosen": str, "rejected": str}
The prompt is wrapped in the tokenizer's chat template (unless `chat=False`); the response
is followed by the tokenizer's EOS id. Only response tokens (and the EOS) are trained.
Bad records (missing fields, empty response, longer than the sequence length) are counted
in a `DataReport` and skipped, never a crash mid-epoch.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Optional

import numpy as np

from fr_jax.runtime.errors import DataError


def encode_prompt(tokenizer, prompt, chat: bool) -> List[int]:
    """Token ids of a prompt (a string, or a list of chat messages); with `chat`, rendered
    by the tokenizer's chat template followed by the assistant header."""
    if not chat:
        if not isinstance(prompt, str):
            prompt = "\n".join(m["content"] for m in prompt)
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat formatting is on but this tokenizer has no chat template; use an "
                        "instruct checkpoint's tokenizer or turn chat formatting off")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def _response_ids(tokenizer, text: str) -> List[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


@dataclasses.dataclass
class DataReport:
    """How many records were kept, and why (and where) the others were skipped."""

    kept: int = 0
    skipped: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    where: Dict[str, List[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))

    def skip(self, reason: str, where: Optional[str] = None):
        self.skipped[reason] += 1
        if where:
            self.where[reason].append(where)

    def __str__(self):
        def one(k):
            shown = self.where.get(k, [])[:3]
            more = "" if len(self.where.get(k, [])) <= 3 else ", ..."
            return f"{k}: {self.skipped[k]}" + (f" at {', '.join(shown)}{more}" if shown else "")
        why = ", ".join(one(k) for k in sorted(self.skipped)) or "none"
        return f"{self.kept} examples kept; skipped {sum(self.skipped.values())} ({why})"

    def to_json(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped),
                "where": {k: list(v) for k, v in self.where.items()}}

    @classmethod
    def merged(cls, reports: List[dict]) -> "DataReport":
        """One report from several `to_json()`s (parts of one file), places in file order."""
        out = cls()
        for r in reports:
            out.kept += r["kept"]
            for k, v in r["skipped"].items():
                out.skipped[k] += v
            for k, v in r["where"].items():
                out.where[k].extend(v)
        for v in out.where.values():
            v.sort(key=_place_key)
        return out


def _place_key(where: str):
    """"file:12" / "file[12]" -> (file, 12): places sorted as they lie in the file."""
    head, sep, tail = where.rstrip("]").rpartition(":" if not where.endswith("]") else "[")
    return (head, int(tail)) if sep and tail.isdigit() else (where, -1)


@dataclasses.dataclass
class SFTExample:
    ids: np.ndarray  # [n] prompt + response token ids
    response: np.ndarray  # [n] 1 where ids[j] is a response token (trained as a target)
    # Optional precomputed expert signals for the n-1 targets ids[1:] (see train.py):
    signal_logprob: Optional[np.ndarray] = None  # [n-1, experts] log p_i(target)
    signal_top1: Optional[np.ndarray] = None  # [n-1, experts] each expert's top-1 token


@dataclasses.dataclass
class PrefExample:
    prompt: np.ndarray
    chosen: np.ndarray  # response ids (EOS included)
    rejected: np.ndarray
    # Optional precomputed CDPO reference (see fr_jax.loop.frozen_outputs): the stage-1
    # router's sequence log-prob of (chosen, rejected) [2], and its routing logits over each
    # side's n-1 targets ([n_c - 1, experts], [n_r - 1, experts]).
    ref_logprob: Optional[np.ndarray] = None
    ref_route: Optional[tuple] = None


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in x)


def _prompt_and_response(rec):
    """(prompt, response, None) of an SFT record, or (None, None, the reason to skip it)."""
    if rec.get("messages") is not None:
        msgs = rec["messages"]
        if not _is_messages(msgs):
            return None, None, "bad_messages"  # not a list of {"role": str, "content": str}
        if msgs[-1]["role"] != "assistant":
            return None, None, "last_message_not_assistant"
        if len(msgs) == 1:
            return None, None, "missing_prompt"
        return msgs[:-1], msgs[-1]["content"], None
    if rec.get("prompt") is None:
        return None, None, "missing_prompt"
    if not isinstance(rec["prompt"], str) and not _is_messages(rec["prompt"]):
        return None, None, "prompt_not_text"
    resp = rec.get("response", rec.get("completion"))
    if resp is None:
        return None, None, "missing_response"
    if not isinstance(resp, str):
        return None, None, "response_not_text"
    return rec["prompt"], resp, None


def _where(records, i: int) -> Optional[str]:
    where = getattr(records, "where", None)
    return where[i] if where else None


def _start_report(records) -> DataReport:
    report = DataReport()
    for where, reason in getattr(records, "bad", ()):
        report.skip(reason, where)
    return report


def tokenize_sft(records, tokenizer, seq_len: int, chat: bool = True):
    """SFT records -> ([SFTExample], DataReport). A sequence must fit seq_len + 1 tokens
    (inputs and shifted targets are seq_len each). A record that is not usable (wrong
    types, missing fields, empty response, too long) is skipped and counted, with its
    file:line when `records` is a `Records`."""
    report, out = _start_report(records), []
    for i, rec in enumerate(records):
        prompt, resp, err = _prompt_and_response(rec)
        if err is None and not resp.strip():
            err = "empty_response"
        if err:
            report.skip(err, _where(records, i))
            continue
        p, r = encode_prompt(tokenizer, prompt, chat), _response_ids(tokenizer, resp)
        if len(p) + len(r) > seq_len + 1:
            report.skip("too_long", _where(records, i))
            continue
        out.append(SFTExample(np.asarray(p + r, np.int32),
                              np.asarray([0] * len(p) + [1] * len(r), np.int32)))
        report.kept += 1
    return out, report


def tokenize_pref(records, tokenizer, seq_len: int, chat: bool = True):
    """Preference records -> ([PrefExample], DataReport), skipping (and counting) what
    tokenize_sft does."""
    report, out = _start_report(records), []
    for i, rec in enumerate(records):
        missing = [k for k in ("prompt", "chosen", "rejected") if rec.get(k) is None]
        if missing:
            report.skip("missing_" + missing[0], _where(records, i))
            continue
        if not isinstance(rec["prompt"], str) and not _is_messages(rec["prompt"]):
            report.skip("prompt_not_text", _where(records, i))
            continue
        if not isinstance(rec["chosen"], str) or not isinstance(rec["rejected"], str):
            report.skip("response_not_text", _where(records, i))
            continue
        if not rec["chosen"].strip() or not rec["rejected"].strip():
            report.skip("empty_response", _where(records, i))
            continue
        p = encode_prompt(tokenizer, rec["prompt"], chat)
        c, r = _response_ids(tokenizer, rec["chosen"]), _response_ids(tokenizer, rec["rejected"])
        if len(p) + max(len(c), len(r)) > seq_len + 1:
            report.skip("too_long", _where(records, i))
            continue
        out.append(PrefExample(*(np.asarray(x, np.int32) for x in (p, c, r))))
        report.kept += 1
    return out, report
