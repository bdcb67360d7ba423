"""The frozen experts, run together.

Experts that share a config (the usual case: fine-tunes of one base) are one *stacked*
model: every param gains a leading `expert` axis and the model runs under `jax.vmap`, so
one compiled body serves all experts and the expert axis can be sharded over devices
(expert parallelism). Experts of different shapes fall back to a list of models run one
after the other. Both paths return logits stacked as [n, B, ..., vocab].

Logits are sliced to `vocab` (the tokenizer's size): checkpoints of one family may pad
their embedding tables differently.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.hf import Named, place, read_hf
from fr_jax.models import Model, ModelConfig


def _same_shape(cfgs: Sequence[ModelConfig]) -> bool:
    # eos/bos/pad ids and the like do not change the computation; everything else must match.
    strip = lambda c: c.replace(bos_token_id=None, eos_token_ids=(), pad_token_id=None)
    return all(strip(c) == strip(cfgs[0]) for c in cfgs[1:])


class Experts:
    def __init__(self, cfgs: Sequence[ModelConfig], vocab: Optional[int] = None,
                 stacked: Optional[bool] = None):
        if not cfgs:
            raise ValueError("at least one expert is needed")
        self.cfgs = tuple(cfgs)
        self.n = len(cfgs)
        self.vocab = vocab or min(c.vocab_size for c in cfgs)
        too_small = [i for i, c in enumerate(cfgs) if c.vocab_size < self.vocab]
        if too_small:
            raise ValueError(f"experts {too_small} have fewer logits than the vocabulary "
                             f"({self.vocab} tokens)")
        can_stack = _same_shape(cfgs)
        if stacked and not can_stack:
            raise ValueError("experts differ in shape; they cannot be stacked (use stacked=False)")
        self.stacked = can_stack if stacked is None else stacked
        self.models = [Model(c) for c in cfgs] if not self.stacked else [Model(cfgs[0])]

    def __repr__(self):
        kind = "stacked" if self.stacked else "list"
        return f"Experts(n={self.n}, {kind}, {self.cfgs[0].model_type})"

    # ------------------------------------------------------------------ params
    def combine(self, params_list: Sequence[dict]):
        """Per-expert params -> this group's params (stacked pytree or tuple)."""
        if self.stacked:
            return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)
        return tuple(params_list)

    def subset(self, index: int, params=None):
        """A one-expert group for expert `index` (run nothing else), and, when `params` are
        given, that expert's params in the group's layout (else None)."""
        sub = Experts([self.cfgs[index]], vocab=self.vocab, stacked=self.stacked)
        if params is None:
            return sub, None
        if self.stacked:
            return sub, jax.tree.map(lambda x: x[index:index + 1], params)
        return sub, (params[index],)

    def model(self, index: int) -> Model:
        """The Model that runs expert `index` (stacked experts share one)."""
        return self.models[0] if self.stacked else self.models[index]

    def params_of(self, params, index: int):
        """Expert `index`'s own params out of the group's (a static slice when stacked)."""
        if self.stacked:
            return jax.tree.map(lambda x: x[index], params)
        return params[index]

    def logical_axes(self):
        from jax.sharding import PartitionSpec as P
        if self.stacked:
            return jax.tree.map(lambda s: P("expert", *s), self.models[0].logical_axes(),
                                is_leaf=lambda x: isinstance(x, P))
        return tuple(m.logical_axes() for m in self.models)

    def param_shapes(self):
        if self.stacked:
            return jax.tree.map(lambda s: jax.ShapeDtypeStruct((self.n,) + s.shape, s.dtype),
                                self.models[0].param_shapes())
        return tuple(m.param_shapes() for m in self.models)

    # ------------------------------------------------------------------ caches
    def init_cache(self, batch_size: int, max_len: int, dtype=None):
        if self.stacked:
            one = self.models[0].init_cache(batch_size, max_len, dtype)
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n,) + x.shape), one)
        return tuple(m.init_cache(batch_size, max_len, dtype) for m in self.models)

    # ------------------------------------------------------------------ forward
    def extend(self, params, tokens, cache, mask=None, last_only: bool = False):
        """Appends tokens [B, T] to every expert -> (logits [n, B, T', vocab], cache)."""
        if self.stacked:
            model = self.models[0]
            fn = lambda p, c: model.extend(p, tokens, c, mask, last_only)
            if tokens.shape[1] > 1:
                # A prefill: one expert after the other, so one expert's activations
                # (attention scores over the prompt) are alive at a time, not n. The
                # stacked cache is the loop's carry, updated in place expert by expert
                # (as outputs of a map it would be a second whole stack).
                def one(stack, pe):
                    p, e = pe
                    c = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, e, 0, False),
                                     stack)
                    out, c = fn(p, c)
                    stack = jax.tree.map(
                        lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, e, 0), stack, c)
                    return stack, out
                cache, out = jax.lax.scan(one, cache, (params, jnp.arange(self.n)))
            else:
                out, cache = jax.vmap(fn)(params, cache)
            return out.logits[..., :self.vocab], cache
        outs, caches = [], []
        for model, p, c in zip(self.models, params, cache):
            out, c = model.extend(p, tokens, c, mask, last_only)
            outs.append(out.logits[..., :self.vocab])
            caches.append(c)
        return jnp.stack(outs), tuple(caches)

    def step(self, params, token, cache):
        """token [B] -> (logits [n, B, vocab], cache)."""
        logits, cache = self.extend(params, token[:, None], cache)
        return logits[:, :, 0], cache

    def forward(self, params, tokens, positions=None, segment_ids=None):
        """Cache-free logits [n, B, T, vocab] (references, small models).

        Training uses `map` instead, which never holds all experts' logits at once.
        """
        return self.map(params, lambda m, p: m.forward(p, tokens, positions, segment_ids)
                        .logits[..., :self.vocab], sequential=False)

    def map(self, params, fn, sequential: bool = True):
        """Stacks fn(model, one expert's params) over the experts -> [n, ...].

        `sequential` runs stacked experts one after the other (a scan): only one expert's
        activations are alive at a time, which is what training at real vocab sizes needs.
        """
        if self.stacked:
            model = self.models[0]
            if sequential:
                _, out = jax.lax.scan(lambda c, p: (c, fn(model, p)), None, params,
                                      unroll=self.n if model.cfg.scan_unroll else 1)
                return out
            return jax.vmap(lambda p: fn(model, p))(params)
        return jax.tree.map(lambda *xs: jnp.stack(xs),
                            *[fn(m, p) for m, p in zip(self.models, params)])

    def hidden(self, params, tokens, positions=None, segment_ids=None):
        """Every expert's final hidden states, a tuple of n [B, T, E] arrays, computed one
        expert at a time without logits (`selected_logits` forms them a block of positions
        at a time)."""
        fn = lambda m, p: m.forward(p, tokens, positions, segment_ids, with_logits=False).hidden
        if self.stacked:
            h = self.map(params, fn)
            return tuple(h[i] for i in range(self.n))
        return tuple(fn(m, p) for m, p in zip(self.models, params))

    def selected_logits(self, params, hidden, selected):
        """Per position, the logits of expert selected[b, t]: hidden (n [B, t, E] arrays from
        `hidden`, a block of positions), selected [B, t] -> [B, t, vocab] float32. Each
        expert's LM head runs on the block in turn; [n, B, t, V] never exists."""
        out = None
        for i in range(self.n):
            logits = self.model(i).logits(self.params_of(params, i), hidden[i])[..., :self.vocab]
            out = logits if out is None else jnp.where((selected == i)[..., None], logits, out)
        return out


def load_experts(paths: Sequence[Named], dtype: str = "float32", param_dtype: Optional[str] = None,
                 vocab: Optional[int] = None, stacked: Optional[bool] = None,
                 shardings_fn=None):
    """(Experts, params) from checkpoints (local HF folders, hub names or `Checkpoint`s).

    shardings_fn(experts) -> params-shaped shardings (see `fr_jax.runtime.sharding`); stacked params
    are then assembled per device from the per-expert host arrays, so the stacked tensor
    never exists whole on one device.
    """
    loaded: List[Tuple[ModelConfig, dict]] = [read_hf(p, dtype, param_dtype) for p in paths]
    experts = Experts([c for c, _ in loaded], vocab=vocab, stacked=stacked)
    host = [p for _, p in loaded]
    shardings = shardings_fn(experts) if shardings_fn else None
    if not experts.stacked:
        if shardings is None:
            return experts, tuple(place(p) for p in host)
        return experts, tuple(place(p, s) for p, s in zip(host, shardings))
    if shardings is None:
        return experts, place(jax.tree.map(lambda *xs: np.stack(xs), *host))

    def put(sharding, *per_expert):
        shape = (len(per_expert),) + per_expert[0].shape
        return jax.make_array_from_callback(
            shape, sharding, lambda idx: np.stack([x[idx[1:]] for x in per_expert[idx[0]]]))
    return experts, jax.tree.map(put, shardings, *host)
