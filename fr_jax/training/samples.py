"""Sample decodes during training: a few held-out prompts answered by FusionRoute with the
router being trained, logged to TensorBoard as text with each token's expert.

The decoder and its shapes are defined here once: the training loop runs them and
`fr_jax.plan` compiles the same program (prompts padded to the data's sequence length).
"""

from __future__ import annotations

from fr_jax.decoding import FusedDecoder, decode_slots
from fr_jax.fusion import Mode
from fr_jax.trace import render_text

PROMPTS = 2  # held-out prompts answered at each sample
NEW_TOKENS = 32  # tokens generated for each
CHUNK = 8  # decode steps per compiled chunk


def cache_len(width: int) -> int:
    """Cache slots of a sample decode of prompts padded to `width`."""
    return width + decode_slots(NEW_TOKENS, CHUNK)


def sample_decoder(router, experts, vocab: int) -> FusedDecoder:
    """Greedy FusionRoute of the trained router over the frozen experts, on whatever
    devices their params live (no mesh of its own: it follows the train state's
    shardings)."""
    return FusedDecoder(Mode.parse("fusionroute", experts.n), router, experts, vocab=vocab,
                        chunk=CHUNK)


def make_sampler(lineup, examples, width: int):
    """(router params, experts' params) -> Markdown text: greedy FusionRoute answers of
    `lineup`'s models to the first held-out prompts of `examples`, each token tagged with
    the expert that produced it. Prompts are left-padded to `width` (the data's sequence
    length, which bounds them), the shape `fr_jax.plan` compiles."""
    prompts = [(e.prompt if hasattr(e, "prompt") else e.ids[e.response == 0]).tolist()
               for e in examples[:PROMPTS]]
    decoder = sample_decoder(lineup.router, lineup.experts, len(lineup.tokenizer))
    tok = lineup.tokenizer
    slots = cache_len(width)

    def sample(router_params, expert_params) -> str:
        res = decoder.generate({"router": router_params, "experts": expert_params}, prompts,
                               NEW_TOKENS, lineup.eos_ids, lineup.pad_id, width=width,
                               cache_len=slots)
        lines = []
        for row, p in enumerate(prompts):
            toks, chosen = res.row(row)
            pieces = [tok.decode([t]) for t in toks]
            lines.append(f"**{tok.decode(p)}**\n\n"
                         f"`{render_text(pieces, chosen, lineup.expert_names)}`")
        return "\n\n".join(lines)

    def first_program(router_params, expert_params):
        """(the decode's prefill, its arguments: these params, the rest abstract): what a
        test compares with the plan."""
        params = decoder.prepare({"router": router_params, "experts": expert_params})
        (prefill, args), _ = decoder.compiled_programs(params, len(prompts), width, slots)
        return prefill, args

    sample.first_program = first_program
    return sample
