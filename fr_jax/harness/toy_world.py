"""The embedded multi-domain world: three skill domains with exact answers and a mixed one.

Shaped like the paper's setting (math / code / instruction following), at a size a 2-core CPU
trains in minutes. Every task is a one-line prompt with one exact answer:

| domain  | prompt              | answer     | skill                                      |
| ------- | ------------------- | ---------- | ------------------------------------------ |
| `math`  | `add 37+18`         | `55`       | addition with carries                      |
| `code`  | `rev kqzt`          | `tzqk`     | string programs: `rev` (reverse), `rot`    |
|         | `rot kqzt`          | `qztk`     | (rotate left by one)                       |
| `instr` | `caps mild`         | `MILD`     | formatting: `caps`, `wrap` (`[mild]`),     |
|         | `twice mild`        | `mild mild`| `twice` (the word, a space, the word)      |
| `mixed` | `wrap add 37+18`    | `[55]`     | a format applied to a math or code result: |
|         | `twice rev kqzt`    | `tzqk tzqk`| the skills of two domains in one answer    |

No expert is trained on `mixed`: inside one mixed answer the math (or code) expert knows the
digits (letters) but not the format around them, the instruction expert the format but not
the digits, and the steps where the two meet (the second copy of a `twice`, the closing
bracket after a computed value) are states no expert has been trained on -- the global
coverage failure method.md describes. The router sees mixed examples in its training data.

The tokenizer is a character-level `tokenizers` model saved in HF format, so the toy models go
through the same import, decode and training code as real checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import string
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from fr_jax.harness.scoring import exact_match
from fr_jax.runtime.paths import write_atomic

DOMAINS = ("math", "code", "instr")  # the experts' domains, in expert order
EVAL_DOMAINS = DOMAINS + ("mixed",)
GENERAL = "say"  # the base model's pretraining task: repeat a string (no domain skill)
PAD, BOS, EOS, UNK = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|unk|>"
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " +[]:\n"

# Prompt, then a newline, then the answer and EOS: the chat format of the toy family.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ m['content'] }}{{ eos_token }}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}")


def build_tokenizer():
    """One token per character (plus BOS/EOS/PAD/UNK), as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK] + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------------------- tasks
@dataclasses.dataclass(frozen=True)
class Task:
    domain: str
    prompt: str
    answer: str

    def record(self) -> dict:
        return {"domain": self.domain, "prompt": self.prompt, "response": self.answer}


def _word(rng, lo=3, hi=5) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), rng.integers(lo, hi + 1)))


def _math(rng) -> Tuple[str, str]:
    a, b = rng.integers(10, 100), rng.integers(2, 50)
    return f"add {a}+{b}", str(a + b)


# Every prompt may open with a filler word, as instructions are phrased in many ways; the
# experts thereby learn to find their task behind words they do not know.
_PHRASES = ("", "please ", "now ", "then ")

_CODE = {"rev": lambda w: w[::-1], "rot": lambda w: w[1:] + w[:1]}
_INSTR = {"caps": str.upper, "wrap": lambda w: f"[{w}]", "twice": lambda w: f"{w} {w}"}
_MIXED_FORMATS = ("wrap", "twice")  # formats that keep a computed value visible


def _code(rng) -> Tuple[str, str]:
    op, w = rng.choice(sorted(_CODE)), _word(rng)
    return f"{op} {w}", _CODE[op](w)


def _instr(rng) -> Tuple[str, str]:
    op, w = rng.choice(sorted(_INSTR)), _word(rng)
    return f"{op} {w}", _INSTR[op](w)


def _say(rng) -> Tuple[str, str]:
    w = "".join(rng.choice(list(string.ascii_lowercase + string.digits), rng.integers(2, 7)))
    return f"say {w}", w


def _mixed(rng) -> Tuple[str, str]:
    inner_prompt, inner = (_math if rng.random() < 0.5 else _code)(rng)
    fmt = rng.choice(_MIXED_FORMATS)
    return f"{fmt} {inner_prompt}", _INSTR[fmt](inner)


GENERATORS: Dict[str, Callable] = {"math": _math, "code": _code, "instr": _instr,
                                   "mixed": _mixed, GENERAL: _say}


def make_tasks(domain: str, n: int, seed: int, exclude: Sequence[str] = ()) -> List[Task]:
    """`n` distinct tasks of `domain`, none of whose prompts is in `exclude`. Prompts are
    compared without their filler word: a held-out problem stays held out in any phrasing."""
    rng = np.random.default_rng([seed, list(GENERATORS).index(domain)])
    seen, out = {_core(p) for p in exclude}, []
    tries = 0
    while len(out) < n:
        core, answer = GENERATORS[domain](rng)
        prompt = _PHRASES[rng.integers(len(_PHRASES))] + core
        tries += 1
        if tries > 100 * n:
            raise ValueError(f"cannot draw {n} distinct {domain} tasks")
        if core in seen:
            continue
        seen.add(core)
        out.append(Task(domain, prompt, answer))
    return out


def _core(prompt: str) -> str:
    for p in _PHRASES:
        if p and prompt.startswith(p):
            return prompt[len(p):]
    return prompt


score = exact_match  # every domain is judged by exact match after trimming whitespace


@dataclasses.dataclass
class WorldData:
    """Held-out test tasks per domain and the training pools, split without overlap."""

    test: Dict[str, List[Task]]
    train: Dict[str, List[Task]]


def make_world_data(n_train: int, n_test: int, seed: int) -> WorldData:
    """Test sets are drawn first (seeded), training pools exclude their prompts."""
    test = {d: make_tasks(d, n_test, seed + 1) for d in EVAL_DOMAINS}
    train = {d: make_tasks(d, n_train, seed + 2, exclude=[t.prompt for t in test[d]])
             for d in EVAL_DOMAINS}
    train[GENERAL] = make_tasks(GENERAL, n_train, seed + 2)
    return WorldData(test, train)


def mixture(pools: Dict[str, List[Task]], weights: Dict[str, float], n: int,
            seed: int) -> List[Task]:
    """`n` tasks drawn from the pools in proportion to `weights` (cycling through a pool when
    it is shorter than its share), shuffled."""
    rng = np.random.default_rng(seed)
    total = sum(weights.values())
    out = []
    for d, w in weights.items():
        k = int(round(n * w / total))
        pool = pools[d]
        order = rng.permutation(len(pool))
        out += [pool[order[i % len(pool)]] for i in range(k)]
    rng.shuffle(out)
    return out


def write_jsonl(path: str, rows: Sequence[dict]):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def labelled_records(pool: List[Task], n: int, seed: int) -> List[dict]:
    """n training tasks of the four domains as labelled prompts (prompt, answer, domain)."""
    rng = np.random.default_rng(seed + 50)
    return [{"prompt": pool[i].prompt, "answer": pool[i].answer, "domain": pool[i].domain}
            for i in rng.permutation(len(pool))[:n]]
