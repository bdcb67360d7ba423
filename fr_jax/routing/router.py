"""The FusionRoute router: a Llama-3 / Gemma-2 backbone plus a linear routing head.

One forward gives both outputs method.md defines:
  - the backbone's next-token logits (the *complementary logits*), and
  - routing logits W h_t on the final hidden state (after the final norm); their softmax
    is the routing weight vector w_t over the experts.

Params: {"backbone": <model params>, "head": {"kernel": [hidden, n_experts]}}.
On disk a router is an HF folder for the backbone (loadable by transformers on its own)
plus `routing_head.safetensors` and `router.json`.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from fr_jax.hf import Named, place, read_hf, resolve, save_hf
from fr_jax.models import KVCache, Model, ModelConfig
from fr_jax.runtime.errors import CheckpointError

HEAD_FILE = "routing_head.safetensors"
ROUTER_FILE = "router.json"


class RouterOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] or [B, V] float32 complementary logits (None: not formed)
    route_logits: jax.Array  # [B, T, n] or [B, n] float32
    hidden: jax.Array  # final hidden state (after the final norm)


class Router:
    """Pure functions over router params; holds only static structure."""

    def __init__(self, cfg: ModelConfig, n_experts: int):
        if n_experts < 1:
            raise ValueError(f"a router needs at least one expert, got n_experts={n_experts}")
        self.cfg = cfg
        self.n_experts = n_experts
        self.backbone = Model(cfg)

    def __repr__(self):
        return f"Router({self.backbone!r}, n_experts={self.n_experts})"

    # ------------------------------------------------------------------ params
    def init_head(self, rng) -> dict:
        kernel = jax.random.normal(rng, (self.cfg.hidden_size, self.n_experts), jnp.float32)
        return {"kernel": (kernel * 0.02).astype(self.cfg.param_dtype)}

    def init(self, rng) -> dict:
        r_backbone, r_head = jax.random.split(rng)
        return {"backbone": self.backbone.init(r_backbone), "head": self.init_head(r_head)}

    def logical_axes(self) -> dict:
        from jax.sharding import PartitionSpec as P
        return {"backbone": self.backbone.logical_axes(), "head": {"kernel": P("embed", None)}}

    def param_shapes(self) -> dict:
        return {"backbone": self.backbone.param_shapes(),
                "head": {"kernel": jax.ShapeDtypeStruct((self.cfg.hidden_size, self.n_experts),
                                                        jnp.dtype(self.cfg.param_dtype))}}

    # ------------------------------------------------------------------ forward
    def route_logits(self, head, hidden):
        """hidden [..., E] -> routing logits [..., n] (float32)."""
        return jnp.einsum("...e,en->...n", hidden, head["kernel"].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)

    def _out(self, params, out) -> RouterOutput:
        return RouterOutput(out.logits, self.route_logits(params["head"], out.hidden), out.hidden)

    def forward(self, params, tokens, positions=None, segment_ids=None,
                with_logits: bool = True) -> RouterOutput:
        """Cache-free forward over tokens [B, T] (training, scoring). Without `with_logits`
        the complementary logits are left to `lm_logits` (formed blockwise in training)."""
        return self._out(params, self.backbone.forward(params["backbone"], tokens, positions,
                                                       segment_ids, with_logits=with_logits))

    def lm_logits(self, params, hidden):
        """Final hidden states [..., E] -> complementary logits [..., V] (float32)."""
        return self.backbone.logits(params["backbone"], hidden)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        return self.backbone.init_cache(batch_size, max_len, dtype)

    def extend(self, params, tokens, cache, mask=None, last_only: bool = False):
        """Appends tokens [B, T] to the cache (see `Model.extend`) -> (RouterOutput, cache)."""
        out, cache = self.backbone.extend(params["backbone"], tokens, cache, mask, last_only)
        return self._out(params, out), cache

    prefill = extend

    def step(self, params, token, cache):
        """token [B] -> (RouterOutput with logits [B, V], route_logits [B, n]; cache)."""
        out, cache = self.backbone.step(params["backbone"], token, cache)
        return self._out(params, out), cache


# ---------------------------------------------------------------------- disk
def save_router(path: str, router: Router, params, tokenizer=None,
                expert_names: Optional[Sequence[str]] = None) -> str:
    """Writes the backbone as an HF folder plus the routing head and router.json."""
    save_hf(path, router.cfg, params["backbone"], tokenizer=tokenizer)
    save_file({"kernel": np.asarray(jax.device_get(params["head"]["kernel"]))},
              os.path.join(path, HEAD_FILE))
    with open(os.path.join(path, ROUTER_FILE), "w") as f:
        json.dump({"n_experts": router.n_experts,
                   "expert_names": list(expert_names) if expert_names else None}, f, indent=2)
    return path


def load_router(path: Named, n_experts: Optional[int] = None, seed: int = 0,
                dtype: str = "float32", param_dtype: Optional[str] = None, shardings_fn=None):
    """(Router, params) from `path` (a folder, a hub name, see fr_jax/hf/hub.py, or a
    resolved `Checkpoint`).

    A folder with a routing head (written by `save_router`) is restored as it is; a plain
    HF base checkpoint gets a fresh head for `n_experts` experts, seeded by `seed`.
    shardings_fn(router) -> params-shaped shardings (see `fr_jax.runtime.sharding.param_shardings`);
    each param is then placed shard by shard.
    """
    checkpoint = resolve(path)
    path = checkpoint.path
    head_file = os.path.join(path, HEAD_FILE)
    has_head = os.path.isfile(head_file)
    if has_head:
        with open(os.path.join(path, ROUTER_FILE)) as f:
            saved_n = int(json.load(f)["n_experts"])
        if n_experts is not None and n_experts != saved_n:
            raise CheckpointError(
                f"router {path!r} was trained for {saved_n} experts but {n_experts} were given; "
                "pass the same experts in the same order, or start from the base checkpoint")
        n_experts = saved_n
    elif n_experts is None:
        raise CheckpointError(f"{path!r} has no {HEAD_FILE}: it is a base checkpoint, so the "
                              "number of experts must be given to create a routing head")
    cfg, backbone = read_hf(checkpoint, dtype=dtype, param_dtype=param_dtype)
    router = Router(cfg, n_experts)
    if has_head:
        kernel = load_file(head_file)["kernel"]
        want = (cfg.hidden_size, n_experts)
        if kernel.shape != want:
            raise CheckpointError(f"{head_file}: routing head has shape {kernel.shape}, expected "
                                  f"{want} (hidden_size x n_experts)")
        head = {"kernel": kernel.astype(jnp.dtype(cfg.param_dtype))}
    else:
        head = jax.device_get(router.init_head(jax.random.key(seed)))
    params = {"backbone": backbone, "head": head}
    return router, place(params, shardings_fn(router) if shardings_fn else None)

