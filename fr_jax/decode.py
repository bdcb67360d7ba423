"""`python -m fr_jax.decode`: decode prompts with any decode mode, show who wrote each token.

    python -m fr_jax.decode                                  # the bundled toy world
    python -m fr_jax.decode --config=configs/llama3.py --config.router.path=/ckpt/router \\
        --config.experts.paths=/ckpt/math,/ckpt/code --prompt="Hi" --mode=fusionroute

Prints each answer with its per-token routing trace; writes JSONL (--output) and an HTML
trace page (--trace_html) when asked.
"""

from __future__ import annotations

import json
import sys

import jax

from fr_jax import cli
from fr_jax.corpus import encode_prompt, prompt_lines
from fr_jax.inference import trace
from fr_jax.inference import DecodeResult, answer_slots
from fr_jax.inference.lineup import lineup_from_config
from fr_jax.inference.sampling import Sampling
from fr_jax.inference.speculative import acceptance, describe, speculation_off
from fr_jax.routing.modes import Mode
from fr_jax.runtime import distributed
from fr_jax.runtime.errors import CacheOverflowError, DataError
from fr_jax.runtime.paths import check_output, write_atomic

COMMAND = cli.Command("decode", "tiny.py", (
    cli.Flag("prompt", "decode.prompts", "prompt text, repeat for a batch", "multi"),
    cli.Flag("mode", "decode.mode", "decode mode"),
    cli.Flag("prompts_file", "decode.prompts_file", "JSONL prompts"),
    cli.Flag("output", "decode.output", "JSONL output"),
    cli.Flag("trace_html", "decode.trace_html", "HTML routing trace"),
),
    sections=("decode", "router", "experts"), doc="docs/decoding.md")


def fit_prompts(ids, d):
    """Token-id prompts checked against decode.cache_len (truncated on the left when
    decode.truncate_prompt)."""
    if not d.cache_len:
        return ids
    room = d.cache_len - answer_slots(d.max_new_tokens, d.chunk, d.speculate)
    too_long = [i for i, x in enumerate(ids) if len(x) > room]
    if too_long and not d.truncate_prompt:
        raise CacheOverflowError(
            f"prompt {too_long[0]} has {len(ids[too_long[0]])} tokens but the cache "
            f"({d.cache_len} slots) leaves room for {room} after {d.max_new_tokens} new "
            "tokens; raise decode.cache_len, lower decode.max_new_tokens, or set "
            "decode.truncate_prompt=True to keep each prompt's last tokens")
    if room < 1:
        raise CacheOverflowError(f"decode.cache_len={d.cache_len} cannot hold "
                                 f"{d.max_new_tokens} new tokens")
    return [x[-room:] for x in ids]


def warn_past_positions(ids, max_new_tokens: int, lineup):
    """Warns (stderr) when a row can run past the models' max_position_embeddings: the
    positions beyond it were never trained, so the answer degrades without an error."""
    limit = lineup.max_positions
    longest = max(range(len(ids)), key=lambda i: len(ids[i]), default=None)
    if limit and longest is not None and len(ids[longest]) + max_new_tokens > limit:
        print(f"warning: prompt {longest} has {len(ids[longest])} tokens; with "
              f"{max_new_tokens} new ones it runs past the models' max_position_embeddings "
              f"({limit}), where they were never trained: expect degraded answers (shorten "
              "the prompt or lower decode.max_new_tokens)", file=sys.stderr)


def labelled_prompts(d):
    """(where, prompt) of the prompts to decode -- file:line of decode.prompts_file, else
    the n-th --prompt -- read and checked before any model loads."""
    if d.prompts_file:
        return prompt_lines(d.prompts_file)
    if not d.prompts:
        raise DataError("no prompts: give --prompt=TEXT (repeatable) or --prompts_file=FILE")
    out = [(f"--prompt number {i + 1}", p) for i, p in enumerate(d.prompts)]
    for where, p in out:
        if not p.strip():
            raise DataError(f"{where} is empty; give it some text or leave it out")
    return out


def decode_prompts(config, fv=None) -> DecodeResult:
    """Decodes the configured prompts with the configured mode; prints the coloured trace,
    writes JSONL / HTML if asked. Returns the DecodeResult."""
    d = config.decode
    inputs = [d.prompts_file, config.router.path, *config.experts.paths]
    for path, what in ((d.output, "decode.output"), (d.trace_html, "decode.trace_html")):
        if path:
            check_output(path, what, inputs, kind="file")
    where, prompts = zip(*labelled_prompts(d))
    bundled = cli.use_bundled_world(config)
    mode = Mode.parse(d.mode, len(config.experts.paths) or None)
    lineup = lineup_from_config(config, [mode.name])
    tok = lineup.tokenizer
    ids = [encode_prompt(tok, p, d.chat) for p in prompts]
    for w, x in zip(where, ids):
        if not x:
            raise DataError(f"{w}: the prompt encodes to no tokens with this tokenizer; "
                            "write text it has tokens for")
    ids = fit_prompts(ids, d)
    warn_past_positions(ids, d.max_new_tokens, lineup)
    decoder, params = lineup.decoder(mode.name, Sampling(d.temperature, d.top_k, d.top_p),
                                     d.chunk)
    platform = jax.devices()[0].platform
    mesh = dict(lineup.mesh.shape)
    main = distributed.is_main()  # every process decodes; process 0 alone reports
    names = [mode.model] if mode.standalone else list(lineup.expert_names)
    if main and mode.standalone:
        print(f"mode {mode.name}: one stand-alone model; mesh {mesh} on {platform}")
    elif main:
        router = "(the bundled toy world)" if bundled else config.router.path
        print(f"mode {mode.name}: router {router}; experts {', '.join(names)}; mesh {mesh} "
              f"on {platform}")
    res = decoder.generate(params, ids, d.max_new_tokens, lineup.eos_ids, lineup.pad_id,
                           seed=d.seed, cache_len=d.cache_len or None)
    if main:
        show(res, prompts, tok, names, mode, d)
    return res


def show(res: DecodeResult, prompts, tok, names, mode: Mode, d):
    """Each answer with its routing trace (coloured on a terminal), the per-expert
    summary, and the JSONL / HTML files decode.output / decode.trace_html ask for."""
    colour = sys.stdout.isatty()
    records, html_rows, chosen_rows = [], [], []
    for row, prompt in enumerate(prompts):
        new, chosen = res.row(row)
        pieces = [tok.decode([t]) for t in new]
        chosen_rows.append(chosen)
        print(f"\n[{row}] {prompt}")
        print(trace.render_terminal(pieces, chosen, names) if colour
              else trace.render_text(pieces, chosen, names))
        records.append({"prompt": prompt, "mode": mode.name,
                        "text": tok.decode(new, skip_special_tokens=True), "token_ids": new,
                        "experts": chosen, "expert_names": names})
        html_rows.append({"prompt": prompt, "pieces": pieces, "chosen": chosen,
                          "probs": res.route_probs[row, :len(new)].round(3).tolist()
                          if mode.uses_router else None})
    if colour:
        print("\n" + trace.legend_terminal(names))
    n_tok = int(res.lengths.sum())
    print(trace.summary(chosen_rows, names, n_tok, res.seconds_decode + res.seconds_prefill))
    if res.speculate:
        print(describe(acceptance(res.spec_passes, res.spec_accepted, res.speculate)))
        for row, r in enumerate(records):
            r["speculation"] = acceptance(res.spec_passes[row], res.spec_accepted[row],
                                          res.speculate)
    elif d.speculate:
        print(speculation_off(mode.name))
    if d.output:
        write_atomic(d.output, "".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} records to {d.output}")
    if d.trace_html:
        write_atomic(d.trace_html, trace.render_html(html_rows, names, mode=mode.name))
        print(f"wrote routing trace to {d.trace_html}")


def main(argv=None):
    return cli.main(COMMAND, decode_prompts, argv)


if __name__ == "__main__":
    main()
