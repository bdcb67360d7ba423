"""Sample decodes during training: a few held-out prompts answered by FusionRoute with the
router being trained, logged to TensorBoard as text with each token's expert.

The decoder and its shapes are defined here once: the training loop runs them and
`fr_jax.plan` compiles the same program. A sample decode runs on the decoding mesh, with
copies of the router and the experts in the decoding layout made for it and deleted after
it: in the training layout (FSDP) a token loop gathers the weights, which held 6.6 GiB of
expert weights per v5e chip for Llama-3.1-8B experts.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from fr_jax.inference import FusedDecoder, decode_slots
from fr_jax.inference.trace import render_text
from fr_jax.routing.modes import Mode
from fr_jax.runtime import distributed
from fr_jax.runtime import sharding as sh

PROMPTS = 2  # held-out prompts answered at each sample
NEW_TOKENS = 32  # tokens generated for each
CHUNK = 8  # decode steps per compiled chunk


def cache_len(width: int) -> int:
    """Cache slots of a sample decode of prompts padded to `width`."""
    return width + decode_slots(NEW_TOKENS, CHUNK)


def sample_decoder(router, experts, vocab: int, mesh) -> FusedDecoder:
    """Greedy FusionRoute of the trained router over the frozen experts on `mesh` (the
    decoding mesh)."""
    return FusedDecoder(Mode.parse("fusionroute", experts.n), router, experts, vocab=vocab,
                        chunk=CHUNK, mesh=mesh)


def layouts(decoder: FusedDecoder):
    """The router's and the experts' param shardings on the decoder's mesh."""
    return (sh.param_shardings(decoder.router, decoder.mesh),
            sh.param_shardings(decoder.experts, decoder.mesh))


def first_prompts(examples) -> list:
    """The prompts of the first PROMPTS examples, the same on every process (process 0's:
    each process reads its own data streams)."""
    mine = [(e.prompt if hasattr(e, "prompt") else e.ids[e.response == 0]).tolist()
            for e in examples[:PROMPTS]]
    return next((p for p in distributed.gather(mine) if p), [])


def make_sampler(lineup, prompts: Sequence[Sequence[int]], width: int, mesh):
    """sample(router params, experts' Parked holder, observe=None) -> Markdown text: greedy
    FusionRoute answers of `lineup`'s models to `prompts`, each token tagged with the expert
    that produced it. Every process runs it (one program over the mesh). Prompts are
    left-padded to `width` (the data's sequence length, which bounds them): the shapes
    `fr_jax.plan` compiles. `observe(prefill, args)` sees the prefill's first call."""
    decoder = sample_decoder(lineup.router, lineup.experts, len(lineup.tokenizer), mesh)
    router_sh, experts_sh = layouts(decoder)
    # jnp.copy: new buffers even where a leaf's layouts agree (jit would hand the input
    # back, and deleting the copy would delete the train state's leaf)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=router_sh)
    tok = lineup.tokenizer
    slots = cache_len(width)

    def sample(router_params, experts, observe: Optional[Callable] = None) -> str:
        params = {"router": copy(router_params), "experts": experts.copy_to(experts_sh)}
        try:
            if observe is not None:
                (prefill, args), _ = decoder.compiled_programs(params, len(prompts), width,
                                                               slots)
                observe(prefill, args)
            res = decoder.generate(params, prompts, NEW_TOKENS, lineup.eos_ids, lineup.pad_id,
                                   width=width, cache_len=slots)
        finally:
            for x in jax.tree.leaves(params):
                x.delete()
        lines = []
        for row, p in enumerate(prompts):
            toks, chosen = res.row(row)
            pieces = [tok.decode([t]) for t in toks]
            lines.append(f"**{tok.decode(p)}**\n\n"
                         f"`{render_text(pieces, chosen, lineup.expert_names)}`")
        return "\n\n".join(lines)

    return sample
