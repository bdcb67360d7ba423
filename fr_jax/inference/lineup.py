"""The lineup: every model a run decodes with, loaded once, checked once.

A `Lineup` holds the router and the experts (FusionRoute's modes, see fr_jax/routing/modes.py), a
SharedTrunkNet selector (mode `sequence`) and named stand-alone models (baselines such as
a fine-tuned or merged model, decoded alone under their own name as a mode), with the one
tokenizer they share, the end-of-sequence ids and the pad id. `load_lineup` reads them
from local folders; `lineup_from_config` reads the folders a config names. Every entry
point (decode, eval, train's sample decodes, seqroute, the demo) goes through here: the
tokenizer check and the EOS / pad rule exist once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import jax

from fr_jax.config import decode_mesh, frozen_dtype
from fr_jax.hf import Checkpoint, Named, load_hf, load_tokenizer, resolve
from fr_jax.hf.hub import hub_name
from fr_jax.inference.core import Decoder
from fr_jax.inference.fused import FusedDecoder
from fr_jax.inference.sampling import Sampling
from fr_jax.inference.speculative import SpeculativeDecoder, speculates
from fr_jax.models import Model
from fr_jax.routing.experts import Experts, load_experts
from fr_jax.routing.fusion import lineup_cfgs
from fr_jax.routing.modes import Mode
from fr_jax.routing.router import Router, load_router
from fr_jax.routing.selector import load_selector, read_meta
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.errors import CheckpointError, ConfigError, ModeError


@dataclasses.dataclass
class Lineup:
    router: Optional[Router]
    experts: Optional[Experts]
    params: dict  # {"router": ..., "experts": ..., "selector": ... (with a selector)}
    tokenizer: object
    expert_names: Sequence[str]
    models: Dict[str, Tuple[Model, dict]] = dataclasses.field(default_factory=dict)
    # name -> (Model, params): stand-alone models decoded as modes of their own
    selector: object = None  # sequence.selector.Selector for mode `sequence`, or None
    source: dict = dataclasses.field(default_factory=dict)  # the folders it was read from
    eos_ids: Sequence[int] = ()  # every id that ends a row (see `end_ids`)
    pad_id: int = 0
    mesh: object = None  # the mesh the params are placed on: decoders shard batches over it
    lazy_experts: bool = False  # FusedDecoder's lazy experts (the same tokens, faster)
    catch_up_width: int = 8
    speculate: int = 0  # drafted tokens per expert pass (SpeculativeDecoder); 0 = off

    @property
    def n_experts(self) -> Optional[int]:
        return self.experts.n if self.experts is not None else None

    @property
    def max_positions(self) -> Optional[int]:
        """The smallest max_position_embeddings of its models: positions past it were never
        trained."""
        cfgs = lineup_cfgs(self.router, self.experts) + [
            m.cfg for m, _ in (self.models or {}).values()]
        return min((c.max_position_embeddings for c in cfgs if c.max_position_embeddings),
                   default=None)

    def decoder(self, mode: str, sampling: Sampling = Sampling(), chunk: int = 8):
        """(decoder, params) for `mode`: a FusionRoute mode, or a stand-alone model's name."""
        if mode in self.models:
            model, params = self.models[mode]
            return Decoder(model, sampling, chunk, self.mesh), params
        m = Mode.parse(mode, self.n_experts)
        if m.standalone:
            raise ModeError(f"mode {mode!r} needs its model in the lineup (models: "
                            f"{sorted(self.models) or 'none'})")
        if (m.uses_router and self.router is None) or (m.uses_experts and self.experts is None):
            raise ModeError(f"mode {mode!r} needs models this lineup does not have")
        kw = dict(vocab=len(self.tokenizer), sampling=sampling, chunk=chunk, mesh=self.mesh,
                  selector=self.selector, lazy_experts=self.lazy_experts,
                  catch_up_width=self.catch_up_width)
        if self.speculate and speculates(m):
            return SpeculativeDecoder(m, self.router, self.experts, self.speculate, **kw), \
                self.params
        return FusedDecoder(m, self.router, self.experts, **kw), self.params


def check_tokenizers(named: Sequence[Tuple[str, object]]):
    """All (path, tokenizer) pairs must be one tokenizer: FusionRoute adds logits per id."""
    ref_path, ref = named[0]
    ref_vocab = ref.get_vocab()
    for path, tok in named[1:]:
        vocab = tok.get_vocab()
        if vocab != ref_vocab:
            diff = sum(1 for k, v in vocab.items() if ref_vocab.get(k) != v)
            raise CheckpointError(
                f"tokenizer mismatch: {path} ({len(vocab)} tokens) differs from {ref_path} "
                f"({len(ref_vocab)} tokens) in {diff + abs(len(ref_vocab) - len(vocab))} "
                "entries; the router and every expert must share one tokenizer (same family)")


def end_ids(tokenizer, cfgs, eos_ids: Sequence[int] = ()) -> List[int]:
    """The ids that end a row: `eos_ids` when given, else every model's EOS ids and the
    tokenizer's EOS token."""
    if eos_ids:
        vocab = len(tokenizer)
        outside = [i for i in eos_ids if not 0 <= int(i) < vocab]
        if outside:
            raise ConfigError(f"decode.eos_ids {list(eos_ids)}: {outside[0]} is not a token id "
                              f"of this tokenizer (0..{vocab - 1}), so it would never end a "
                              "row; give ids inside the vocabulary, or () for the checkpoints'")
        return sorted(set(int(i) for i in eos_ids))
    out = set().union(*(c.eos_token_ids for c in cfgs))
    if tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return sorted(out)


def pad_id(tokenizer, cfgs) -> int:
    """The tokenizer's pad id, else the first model's, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return (cfgs[0].pad_token_id if cfgs else None) or 0


def load_lineup(router: Named = "", experts: Sequence[Named] = (), *,
                names: Sequence[str] = (), models: Mapping[str, Named] = None,
                seqroute: str = "", seqroute_encoder: str = "",
                seqroute_lam: Optional[float] = None, mesh=None, dtype: str = "float32",
                router_dtype: Optional[str] = None, frozen: Optional[str] = None,
                stacked: Optional[bool] = None, router_seed: int = 0,
                n_experts: Optional[int] = None, eos_ids: Sequence[int] = (),
                lazy_experts: bool = False,
                catch_up_width: int = 8, softcap: str = "each", speculate: int = 0) -> Lineup:
    """Reads the lineup from folders, hub names (fr_jax/hf/hub.py) or checkpoints resolved
    already (`fr_jax.hf.resolve`; each name is resolved once here): the router (a fr_jax
    router, or a base checkpoint that gets a fresh head for `n_experts` (default: one per
    expert) seeded by `router_seed`), the experts (in the router's order), stand-alone `models`
    {name: folder} and a trained SharedTrunkNet folder `seqroute` (its encoder:
    `seqroute_encoder`, default the one the folder names; "router" is the router's
    backbone).

    dtype: activations; router_dtype: the router's params (default `frozen`); frozen: every
    other model's params (default dtype). Params are placed on `mesh` when given. Every
    folder is checked before anything heavy is read; the router, experts and models must
    share one tokenizer, and it must fit every model's vocabulary. softcap: where the
    router's and experts' final soft-cap applies (fusion.softcap: "each" model's logits,
    or the "sum" of the fused ones: fr_jax/routing/fusion.py).
    """
    # Expert names come from what was given; hub names become their cache snapshots, so
    # `source` (which the eval harness fingerprints) names the exact revision.
    given = lambda p: p.name if isinstance(p, Checkpoint) else p
    names = list(names) or [os.path.basename(os.path.normpath(given(p))) for p in experts]
    frozen = frozen or dtype
    router_dtype = router_dtype or frozen
    if seqroute and not router:
        raise ModeError("mode 'sequence' needs the router (its backbone is the default "
                        "encoder and FusionRoute a target): set --config.router.path")
    if not (router or experts or models):
        raise CheckpointError("no checkpoints given: set --config.router.path and "
                              "--config.experts.paths (or a stand-alone model)")
    # Every folder is named and parsed here, before anything heavy is read.
    router = resolve(router) if router else None
    experts = [resolve(p) for p in experts]
    models = {k: resolve(v) for k, v in (models or {}).items()}
    folders = ([router] if router else []) + experts + list(models.values())
    if seqroute and not os.path.isdir(seqroute):
        raise CheckpointError(f"mode 'sequence': no SharedTrunkNet at {seqroute!r}; train one "
                              "with `python -m fr_jax.seqroute` and set --config.seqroute.path")
    toks = [(p.path, load_tokenizer(p)) for p in folders]
    check_tokenizers(toks)
    tokenizer = toks[0][1]
    placed = (lambda m: sh.param_shardings(m, mesh)) if mesh is not None else None

    r = e = selector = None
    params, cfgs = {}, []
    if router:
        r, params["router"] = load_router(router, n_experts=n_experts or len(experts) or None,
                                          seed=router_seed, dtype=dtype,
                                          param_dtype=router_dtype, shardings_fn=placed)
        cfgs.append(r.cfg)
    if experts:
        e, params["experts"] = load_experts(experts, dtype, frozen, vocab=len(tokenizer),
                                            stacked=stacked, shardings_fn=placed)
        cfgs += list(e.cfgs)
    if softcap == "sum":
        r, e = leave_cap_to_rule(r, e)
    loaded = {}
    for name, path in models.items():
        mcfg, p = load_hf(path, dtype, frozen)
        model = Model(mcfg)
        loaded[name] = (model, jax.device_put(p, sh.param_shardings(model, mesh))
                        if mesh is not None else p)
        cfgs.append(mcfg)
    too_small = [c for c in cfgs if c.vocab_size < len(tokenizer)]
    if too_small:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but a model has "
                              f"only {too_small[0].vocab_size} logits: the tokenizer is from "
                              "another model")
    if seqroute:
        encoder = seqroute_encoder or read_meta(seqroute)["encoder"]
        if encoder == "router":
            enc_cfg, enc_params = r.cfg, params["router"]["backbone"]
        else:
            enc_cfg, enc_params = load_hf(encoder, dtype, frozen)
        selector, params["selector"] = load_selector(seqroute, enc_cfg, enc_params,
                                                     seqroute_lam, mesh)
    source = {"router": router.path if router else "", "experts": [e.path for e in experts],
              "models": {k: m.path for k, m in models.items()}, "seqroute": seqroute}
    return Lineup(r, e, params, tokenizer, names, loaded, selector, source,
                  end_ids(tokenizer, cfgs, eos_ids), pad_id(tokenizer, cfgs), mesh,
                  lazy_experts, catch_up_width, speculate)


def leave_cap_to_rule(router: Optional[Router], experts: Optional[Experts]):
    """fusion.softcap=sum: the router and experts rebuilt to return raw logits
    (ModelConfig.raw_logits), their common final soft-cap applied by the fusion rule to
    the sum. Refused where they have no cap, or not one cap."""
    cfgs = lineup_cfgs(router, experts)
    caps = sorted({c.final_logit_softcap for c in cfgs}, key=str)
    if caps == [None]:
        raise ConfigError("fusion.softcap=sum caps the sum of the router's and the expert's "
                          "logits with the models' final soft-cap, and these models have none "
                          "(Gemma-2 has one; Llama-3 does not): leave fusion.softcap=each")
    if len(caps) > 1:
        raise ConfigError("fusion.softcap=sum caps the sum with the models' one final "
                          f"soft-cap, but the router and experts have {caps}: leave "
                          "fusion.softcap=each")
    if router is not None:
        router = Router(router.cfg.replace(raw_logits=True), router.n_experts)
    if experts is not None:
        experts = Experts([c.replace(raw_logits=True) for c in experts.cfgs],
                          vocab=experts.vocab, stacked=experts.stacked)
    return router, experts


def experts_layout(config) -> Optional[bool]:
    """config.experts.stacked -> the `stacked` argument of load_experts (auto: the list
    layout, which decoding reads in place; see fr_jax/config/base.py)."""
    return {"auto": False, "yes": True, "no": False}[config.experts.stacked]


STANDALONE_HOW = {"merged": "`python -m fr_jax.merge`",
                  "finetuned": "`python -m fr_jax.train` with --config.train.stages=lm"}


def lineup_from_config(config, modes: Sequence[str]) -> Lineup:
    """The lineup `modes` need, from the folders `config` names (router.path, experts.paths,
    baselines.<model>, seqroute.path), on the decoding mesh. The entry points fill in
    default folders (the bundled world) before calling this."""
    n = len(config.experts.paths) or None
    parsed = [Mode.parse(m, n) for m in modes]
    shared = [m for m in parsed if not m.standalone]
    router = any(m.uses_router for m in shared)
    experts = any(m.uses_experts for m in shared)
    # Each folder resolved once, here: a wrong one is named first, before what the modes lack.
    router_path = resolve(config.router.path) if config.router.path else ""
    paths = [resolve(p) for p in config.experts.paths]
    if router and not config.router.path:
        raise ModeError(f"mode {next(m for m in shared if m.uses_router).name!r} needs a "
                        "router: set --config.router.path")
    if experts and not paths:
        raise ModeError(f"mode {next(m for m in shared if m.uses_experts).name!r} needs "
                        "experts: set --config.experts.paths")
    for m in shared:
        if m.fixed_expert is not None and m.fixed_expert >= len(paths):
            raise ModeError(f"mode {m.name!r}: only {len(paths)} experts are configured")
    models = {}
    for m in parsed:
        if m.standalone:
            path = getattr(config.baselines, m.model)
            try:
                models[m.name] = resolve(path) if path else None
            except CheckpointError:
                if hub_name(path) is not None:  # the hub's own error says more
                    raise
                models[m.name] = None
            if models[m.name] is None:
                raise CheckpointError(
                    f"mode {m.name!r}: no model at {path!r}; write one with "
                    f"{STANDALONE_HOW[m.model]} and set --config.baselines.{m.model}")
    sequence = any(m.needs_selector for m in shared)
    if sequence and not config.seqroute.path:
        raise ModeError("mode 'sequence' needs a trained SharedTrunkNet: train one with "
                        "`python -m fr_jax.seqroute` and set --config.seqroute.path")
    d = config.decode
    return load_lineup(
        router_path if (router or sequence) else "", paths if experts else [],
        names=config.experts.names, models=models,
        seqroute=config.seqroute.path if sequence else "",
        seqroute_encoder=config.seqroute.encoder, seqroute_lam=config.seqroute.lam,
        mesh=sh.mesh_from_config(decode_mesh(config)), dtype=config.model.dtype,
        frozen=frozen_dtype(config), stacked=experts_layout(config),
        router_seed=config.router.seed, n_experts=len(paths) or None, eos_ids=d.eos_ids,
        lazy_experts=d.lazy_experts,
        catch_up_width=d.catch_up_width, softcap=config.fusion.softcap,
        speculate=d.speculate)
