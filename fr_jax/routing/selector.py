"""Sequence-level routing at decode time: the SharedTrunkNet selector (arXiv 2603.20895).

An *encoder* (any fr_jax model; by default the router's backbone) reads the prompt once; its
residual stream after each layer is pooled over the prompt (the mean over the prompt's tokens
and the last token, concatenated: [2E] per layer). A SharedTrunkNet (trunk.py) trained on one
layer's pooled activations gives P(correct) per *target* -- each expert alone (`expert:<i>`)
or FusionRoute itself (`fusionroute`) -- and the prompt goes to argmax_t P(correct_t) -
lam * cost_t. Decode mode `sequence` runs this inside the jitted prefill (fr_jax/inference);
the pipeline that labels prompts and trains the net is fr_jax/baselines/seqroute_pipeline.py.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.models import Model, ModelConfig
from fr_jax.routing.modes import Mode
from fr_jax.routing.trunk import SharedTrunkNet, load_trunk
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.errors import CheckpointError, ModeError

META_FILE = "seqroute.json"  # beside the trunk's Orbax folder: encoder, targets, layer
FUSIONROUTE = "fusionroute"


# ---------------------------------------------------------------------------- targets
def default_targets(n_experts: int, with_fusionroute: bool = True) -> List[str]:
    return [f"expert:{i}" for i in range(n_experts)] + ([FUSIONROUTE] if with_fusionroute else [])


def parse_targets(targets: Sequence[str], n_experts: int) -> List[Mode]:
    """Target names -> decode modes; a target is `expert:<i>` or `fusionroute`."""
    if not targets:
        raise ModeError("sequence-level routing needs at least one target")
    modes = []
    for t in targets:
        m = Mode.parse(t, n_experts)
        if m.kind not in ("expert", "fusionroute"):
            raise ModeError(f"target {t!r} cannot be chosen per prompt: targets are "
                            f"expert:<i> (0..{n_experts - 1}) or {FUSIONROUTE}")
        modes.append(m)
    if len(set(targets)) != len(targets):
        raise ModeError(f"targets repeat a name: {list(targets)}")
    return modes



# ---------------------------------------------------------------------------- features
def truncate(cfg: ModelConfig, params, n_layers: int) -> Tuple[ModelConfig, dict]:
    """The encoder's first `n_layers` layers (the layers are stacked on axis 0)."""
    if not 1 <= n_layers <= cfg.num_layers:
        raise ValueError(f"cannot keep {n_layers} of {cfg.num_layers} layers")
    small = cfg.replace(num_layers=n_layers, layer_types=tuple(cfg.layer_types[:n_layers]))
    params = dict(params, layers=jax.tree.map(lambda x: x[:n_layers], params["layers"]))
    return small, params


def pool(residual, mask):
    """residual [L, B, T, E], mask [B, T] (left-padded prompts) -> [L, B, 2E] float32: the
    mean over each prompt's real tokens, then its last token (position T-1)."""
    r = residual.astype(jnp.float32)
    m = mask.astype(jnp.float32)[None, :, :, None]
    mean = jnp.sum(r * m, axis=2) / jnp.maximum(jnp.sum(m, axis=2), 1.0)
    return jnp.concatenate([mean, r[:, :, -1]], axis=-1)


def prefill_features(model: Model, params, tokens, mask):
    """Pooled per-layer activations of left-padded prompts tokens [B, T] -> [L, B, 2E]."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    _, residual = model.forward(params, tokens, positions, mask.astype(jnp.int32),
                                collect_intermediates=True, last_only=True)
    return pool(residual, mask)


# ---------------------------------------------------------------------------- decode-time
class Selector:
    """The per-prompt choice inside the decoder's prefill: the encoder truncated after the
    trunk's layer -> pooled features -> SharedTrunkNet -> argmax_t P(correct_t) - lam c_t.

    Pure: `choose(params, tokens, mask)` traces into the jitted prefill, with
    params = `selector.params(encoder_params)`.
    """

    def __init__(self, encoder_cfg: ModelConfig, trunk, lam: float = 0.0):
        if trunk.layer >= encoder_cfg.num_layers:
            raise ValueError(f"the SharedTrunkNet reads encoder layer {trunk.layer} but the "
                             f"encoder has {encoder_cfg.num_layers} layers: wrong encoder")
        width = int(np.asarray(trunk.mean).shape[-1])
        if width != 2 * encoder_cfg.hidden_size:
            raise ValueError(f"the SharedTrunkNet takes {width} features but the encoder "
                             f"gives {2 * encoder_cfg.hidden_size} (2 x hidden size): it was "
                             "trained on another encoder")
        self.trunk = trunk
        self.targets = list(trunk.target_names)
        self.lam = float(lam)
        self.encoder_cfg = encoder_cfg
        self.encoder = Model(encoder_cfg.replace(
            num_layers=trunk.layer + 1, layer_types=tuple(encoder_cfg.layer_types[:trunk.layer + 1])))
        self.net = SharedTrunkNet(hidden=tuple(trunk.hidden), n_targets=len(self.targets))
        costs = np.asarray(trunk.costs, np.float64)
        self.rel_costs = jnp.asarray(costs / costs.max(), jnp.float32)

    def params(self, encoder_params) -> dict:
        _, enc = truncate(self.encoder_cfg, encoder_params, self.trunk.layer + 1)
        return {"encoder": enc, "net": self.trunk.params,
                "mean": jnp.asarray(self.trunk.mean, jnp.float32),
                "std": jnp.asarray(self.trunk.std, jnp.float32)}

    def choose(self, params, tokens, mask):
        """tokens, mask [B, T] -> (target index [B] int32, P(correct) [B, n_targets])."""
        feats = prefill_features(self.encoder, params["encoder"], tokens, mask)[-1]
        x = (feats - params["mean"]) / params["std"]
        p = jax.nn.sigmoid(self.net.apply({"params": params["net"]}, x).astype(jnp.float32))
        score = p - self.lam * self.rel_costs
        # Ties go to the cheaper target, as in trunk.route.
        order = jnp.argsort(self.rel_costs, stable=True)
        pick = jnp.argmax(score[:, order], axis=-1)
        return order[pick].astype(jnp.int32), p


def load_selector(path: str, encoder_cfg: ModelConfig, encoder_params, lam: Optional[float],
                  mesh=None):
    """(Selector, selector params) from a trained SharedTrunkNet folder, for decode mode
    `sequence`; the caller passes the encoder the folder's seqroute.json names. lam None =
    the lam the folder's report used."""
    trunk = load_trunk(path)
    meta = read_meta(path)
    sel = Selector(encoder_cfg, trunk, meta["lam"] if lam is None else lam)
    params = sel.params(encoder_params)
    if mesh is not None:
        rest = {k: v for k, v in params.items() if k != "encoder"}
        params = dict(jax.device_put(rest, sh.replicated(mesh)), encoder=params["encoder"])
    return sel, params


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path!r} is not a trained SharedTrunkNet folder (no "
                              f"{META_FILE}); train one with `python -m fr_jax.seqroute`")
    with open(meta_path) as f:
        return json.load(f)
