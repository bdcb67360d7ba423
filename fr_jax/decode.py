"""Decoding: left-padded batched prefill, then a jitted `lax.scan` over tokens, in chunks.

    python -m fr_jax.decode                                  # embedded tiny default
    python -m fr_jax.decode --model=/ckpt/Llama-3.2-1B-Instruct --prompt="Hi" --chat

The scan runs `chunk` steps per call and the host stops once every row has emitted an
end-of-sequence id, so short answers do not pay for `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.models import CacheOverflowError, KVCache, Model


class DecodeState(NamedTuple):
    """The scan carry. token, done: [B]; cache: the model's KVCache."""

    token: jax.Array  # last emitted token, input of the next step
    done: jax.Array  # row has emitted an EOS id
    cache: KVCache


@dataclasses.dataclass
class DecodeResult:
    tokens: np.ndarray  # [B, n] generated ids (pad after a row's EOS)
    lengths: np.ndarray  # [B] generated tokens per row, EOS included
    prompt_lengths: np.ndarray  # [B]
    steps: int  # scan steps actually run
    seconds_prefill: float
    seconds_decode: float


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
    """Ragged prompts -> (tokens [B, T] int32, mask [B, T] bool), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = p
        mask[b, width - len(p):] = True
    return tokens, mask


class Decoder:
    """Greedy decoding of one model; the compiled prefill and chunk are reused across calls."""

    def __init__(self, model: Model, chunk: int = 16):
        self.model = model
        self.chunk = chunk
        self._prefill = jax.jit(model.prefill)
        self._chunk = jax.jit(self._run_chunk, donate_argnums=(1,))

    def _run_chunk(self, params, state: DecodeState, eos_ids, pad_id):
        def body(state, _):
            out, cache = self.model.step(params, state.token, state.cache)
            nxt = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)
            nxt = jnp.where(state.done, pad_id, nxt)
            done = state.done | jnp.isin(nxt, eos_ids)
            return DecodeState(nxt, done, cache), nxt

        return jax.lax.scan(body, state, None, length=self.chunk)

    def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_ids: Sequence[int], pad_id: int = 0,
                 cache_len: Optional[int] = None) -> DecodeResult:
        tokens, mask = left_pad(prompts, pad_id)
        b, t = tokens.shape
        # The cache must hold the prompt and every generated token (rounded up to a chunk).
        steps_cap = -(-max(max_new_tokens - 1, 0) // self.chunk) * self.chunk
        need = t + steps_cap
        cache_len = cache_len or need
        if need > cache_len:
            raise CacheOverflowError(
                f"prompt of {t} tokens + {max_new_tokens} new tokens (rounded to chunks of "
                f"{self.chunk}) need {need} cache slots but the cache has {cache_len}; "
                f"raise cache_len or shorten the prompt")
        eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)

        t0 = time.perf_counter()
        out, cache = self._prefill(params, jnp.asarray(tokens), self.model.init_cache(b, cache_len),
                                   jnp.asarray(mask))
        first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
        state = DecodeState(first, jnp.isin(first, eos), cache)
        first.block_until_ready()
        t1 = time.perf_counter()

        pieces, steps = [np.asarray(first)[:, None]], 0
        while steps + 1 < max_new_tokens and not bool(np.all(np.asarray(state.done))):
            state, toks = self._chunk(params, state, eos, pad_id)
            pieces.append(np.asarray(toks).T)
            steps += self.chunk
        t2 = time.perf_counter()

        gen = np.concatenate(pieces, axis=1)[:, :max_new_tokens]
        lengths = np.full((b,), gen.shape[1])
        for row in range(b):
            hits = np.flatnonzero(np.isin(gen[row], np.asarray(eos)))
            if hits.size:
                lengths[row] = hits[0] + 1
                gen[row, hits[0] + 1:] = pad_id
        return DecodeResult(gen, lengths, mask.sum(1), steps, t1 - t0, t2 - t1)


# ---------------------------------------------------------------------------- CLI
def encode_prompt(tokenizer, text: str, chat: bool) -> List[int]:
    """Token ids of a prompt; with `chat`, a single user turn in the tokenizer's chat
    template followed by the assistant header (the template supplies BOS)."""
    if not chat:
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("decode.chat=True but this tokenizer has no chat template; use an "
                         "instruct checkpoint's tokenizer or set --config.decode.chat=False")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def run(config) -> DecodeResult:
    """Decodes `config.decode.prompts` with the model at `config.model.path` and prints them."""
    from fr_jax.hf import load_hf, load_tokenizer
    from fr_jax.toy.tiny import ensure_tiny_checkpoint

    path = config.model.path or ensure_tiny_checkpoint()
    cfg, params = load_hf(path, dtype=config.model.dtype,
                          param_dtype=config.model.param_dtype or None)
    tok = load_tokenizer(path)
    if len(tok) > cfg.vocab_size:
        raise SystemExit(f"tokenizer in {path} has {len(tok)} tokens but the model's vocab is "
                         f"{cfg.vocab_size}: the tokenizer belongs to another model")
    prompts = list(config.decode.prompts)
    ids = [encode_prompt(tok, p, config.decode.chat) for p in prompts]
    eos = set(cfg.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    pad = tok.pad_token_id if tok.pad_token_id is not None else (cfg.pad_token_id or 0)

    print(f"model: {path} ({cfg.model_type}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
          f"{config.model.dtype}) on {jax.devices()[0].platform}")
    res = Decoder(Model(cfg), chunk=config.decode.chunk).generate(
        params, ids, config.decode.max_new_tokens, sorted(eos), pad,
        cache_len=config.decode.cache_len or None)
    for row, p in enumerate(prompts):
        new = res.tokens[row, :int(res.lengths[row])].tolist()
        print(f"\n[{row}] prompt: {p!r}")
        print(f"[{row}] output: {tok.decode(new, skip_special_tokens=True)!r}")
        print(f"[{row}] tokens: " + " ".join(f"{t}:{tok.convert_ids_to_tokens(t)!s}" for t in new))
    print(f"\nprefill {res.seconds_prefill * 1e3:.0f} ms (includes compile); decode {res.steps} "
          f"steps in {res.seconds_decode * 1e3:.0f} ms, {int(res.lengths.sum())} tokens generated")
    return res


def main(argv=None):
    from absl import flags

    from fr_jax.config import default_config_file, parse_flags

    def extra(fv):
        flags.DEFINE_multi_string("prompt", None, "prompt text, repeat for a batch "
                                  "(overrides config.decode.prompts)", flag_values=fv)

    argv = list(sys.argv[1:] if argv is None else argv)
    fv = parse_flags(["fr_jax.decode"] + argv, default_config_file("tiny.py"), extra)
    config = fv.config
    if fv.prompt:
        with config.unlocked():
            config.decode.prompts = tuple(fv.prompt)
    from fr_jax.hf import CheckpointError
    from fr_jax.models import ConfigError

    try:
        return run(config)
    except (CheckpointError, ConfigError, CacheOverflowError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
