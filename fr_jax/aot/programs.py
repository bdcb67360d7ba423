"""Every program a config runs, built with fr_jax's own code from abstract params: the
training stages' steps, the expert-signal precompute, the fused decoder's prefill and chunk,
the server's prefills, insert and chunk."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax import steps
from fr_jax.aot.shapes import forward_flops, splash_flops
from fr_jax.config import frozen_dtype
from fr_jax.inference import FusedDecoder, SpeculativeDecoder, speculates
from fr_jax.inference.lineup import experts_layout
from fr_jax.routing.experts import Experts
from fr_jax.routing.modes import Mode
from fr_jax.routing.router import Router
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.errors import PlanError
from fr_jax.serving.spec_engine import make_engine
from fr_jax.steps import residency, samples


# ---------------------------------------------------------------------------- programs
@dataclasses.dataclass
class Program:
    """One jitted program with the abstract arguments to lower it with."""

    name: str
    kind: str  # train | decode
    fn: object
    args: tuple
    groups: Dict[str, object]  # what each argument group is: {label: pytree of args}
    model_flops: float = 0.0  # useful FLOPs per step (all chips), for MFU
    roofline_bytes: float = 0.0  # bytes a decode step must read (all chips)
    kernel_flops: float = 0.0  # FLOPs inside custom calls (all chips), added to XLA's count
    steps: int = 1  # steps one run makes (a decode chunk: its tokens)
    accum: int = 1  # micro-batches of one training step (its cost: one micro-batch's x accum)
    uses: Tuple[str, ...] = ("router", "experts")  # whose depth its cost grows with
    costed: bool = True  # FLOPs / bytes / step time are measured (steps, not prefills)
    # Buffers the run keeps on the devices beside this program's arguments while it runs
    # (fr_jax.steps.residency): {label: pytree of ShapeDtypeStructs}.
    resident: Dict[str, object] = dataclasses.field(default_factory=dict)


def _abstract(shapes, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)


def _sft_rows(rows, seq, n_experts=0):
    out = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32)
           for k in ("tokens", "targets", "positions", "segment_ids")}
    out["loss_mask"] = jax.ShapeDtypeStruct((rows, seq), jnp.float32)
    if n_experts:
        out["signal_logprob"] = jax.ShapeDtypeStruct((rows, seq, n_experts), jnp.float32)
        out["signal_top1"] = jax.ShapeDtypeStruct((rows, seq, n_experts), jnp.int32)
    return out


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def train_programs(config, rcfg, ecfgs, mesh, stages: Sequence[str], hosts: int = 1,
                   decode_mesh=None) -> List[Program]:
    """The training programs of config.train.stages: the SFT step (and the expert-signal
    precompute when signals are precomputed), the CDPO step (and its reference's
    precompute), their evaluation steps, the sample decode, and where the launch has
    several processes each stage's export (its router gathered to every process). The
    sample decode runs on `decode_mesh` (default: `mesh`)."""
    tc, seq = config.train, config.data.seq_len
    n, vocab = len(ecfgs), min(c.vocab_size for c in [rcfg, *ecfgs])
    micro = steps.micro_batch_size(tc)
    router = Router(steps.trained_cfg(rcfg, config), n)
    experts = Experts([steps.frozen_cfg(c, config).replace(param_dtype=frozen_dtype(config))
                       for c in ecfgs], vocab=vocab)
    r_params = _abstract(router.param_shapes(), sh.param_shardings(router, mesh))
    e_params = _abstract(experts.param_shapes(), sh.param_shardings(experts, mesh))
    ref_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype(config),
                                                             sharding=x.sharding), r_params)
    tokens = tc.batch_size * seq
    rc, ec = router.cfg, experts.cfgs[0]
    trained_fwd = 1 + (rc.remat != "none")  # a rematerialised layer runs forward twice
    out, sampled = [], []
    for name in stages:
        # What the run holds beside each phase's arguments, from the run's own table.
        held = residency.resident(name, config)
        models = {"router": r_params, "experts": e_params, "ref": ref_params}
        beside = lambda phase, args: {k: models[k] for k in sorted(held.get(phase, ()))
                                      if k in models and k not in args}
        if name == "sft":
            pre = tc.sft.expert_signals == "precompute"
            if pre:
                fn = steps.signals_program(experts, vocab, tc.loss_block, mesh, seq, micro)
                out.append(Program("expert signals (precompute)", "train", fn,
                                   (e_params, _sft_rows(micro, seq)),
                                   {"frozen": e_params},
                                   n * forward_flops(ecfgs[0], micro * seq, (seq + 1) / 2),
                                   uses=("experts",),
                                   kernel_flops=n * splash_flops(ec, micro, seq, 1, False),
                                   resident=beside("signals", {"experts"})))
            in_step = steps.sft_needs_experts(tc.sft)
            frozen = {"experts": e_params} if in_step else {}
            batch = _sft_rows(tc.batch_size, seq, n if pre else 0)
            flops = 3 * forward_flops(rcfg, tokens, (seq + 1) / 2)
            kernel = splash_flops(rc, tc.batch_size, seq, trained_fwd, True)
            # Online signals and a fused generator term each run every expert forward.
            runs = (not pre) + (tc.sft.lm_target != "router")
            flops += runs * n * forward_flops(ecfgs[0], tokens, (seq + 1) / 2)
            kernel += runs * n * splash_flops(ec, tc.batch_size, seq, 1, False)
        elif name == "cdpo":
            pre = tc.cdpo.reference == "precompute"
            if pre:
                fn = steps.reference_program(router, experts, vocab, tc.loss_block, mesh, seq,
                                             micro)
                side = _sft_rows(micro, seq)
                out.append(Program("CDPO reference (precompute)", "train", fn,
                                   (ref_params, e_params, side),
                                   {"frozen": {"ref": ref_params, "experts": e_params}},
                                   forward_flops(rcfg, micro * seq, (seq + 1) / 2)
                                   + n * forward_flops(ecfgs[0], micro * seq, (seq + 1) / 2),
                                   kernel_flops=splash_flops(rc, micro, seq, 1, False)
                                   + n * splash_flops(ec, micro, seq, 1, False),
                                   resident=beside("reference", {"ref", "experts"})))
            frozen = {"experts": e_params} if pre else {"experts": e_params, "ref": ref_params}
            side = _sft_rows(tc.batch_size, seq)
            if pre:
                side["ref_logprob"] = jax.ShapeDtypeStruct((tc.batch_size,), jnp.float32)
                side["ref_route_logits"] = jax.ShapeDtypeStruct((tc.batch_size, seq, n),
                                                                jnp.float32)
            batch = {"chosen": side, "rejected": side}
            # both sides: the policy (fwd + bwd), every expert, and the reference router
            # unless its log-probs are precomputed
            flops = 2 * ((3 + (not pre)) * forward_flops(rcfg, tokens, (seq + 1) / 2)
                         + n * forward_flops(ecfgs[0], tokens, (seq + 1) / 2))
            kernel = 2 * (splash_flops(rc, tc.batch_size, seq, trained_fwd + (not pre), True)
                          + n * splash_flops(ec, tc.batch_size, seq, 1, False))
            if tc.cdpo.sft_weight:  # stage 1's loss on SFT rows beside the pairs: the
                # policy (fwd + bwd), every expert for the signals (and a fused term's bias)
                batch["sft"] = _sft_rows(tc.batch_size, seq)
                runs = 1 + (tc.sft.lm_target != "router")
                flops += (3 * forward_flops(rcfg, tokens, (seq + 1) / 2)
                          + runs * n * forward_flops(ecfgs[0], tokens, (seq + 1) / 2))
                kernel += (splash_flops(rc, tc.batch_size, seq, trained_fwd, True)
                           + runs * n * splash_flops(ec, tc.batch_size, seq, 1, False))
        else:
            continue
        stage = steps.build_stage(name, router, experts, mesh, tc[name], tc, r_params, frozen,
                                  vocab, sft_cfg=tc.sft)
        state = steps.abstract_state(stage, r_params)
        step, evaluate = stage.jitted(batch)
        args = {"state"} | set(frozen)
        out.append(Program(f"{name.upper()} step", "train", step, (state, frozen, batch),
                           {"params": state.params, "optimizer": state.opt_state,
                            "frozen": frozen}, flops,
                           uses=("router", "experts") if frozen else ("router",),
                           kernel_flops=kernel, accum=max(tc.grad_accum, 1),
                           resident=beside("step", args)))
        if tc.eval_every:  # evaluation runs beside the whole train state
            out.append(Program(f"{name.upper()} eval", "train", evaluate,
                               (state.params, frozen,
                                {k: v for k, v in batch.items() if k != "sft"}),
                               {"params": state.params, "frozen": frozen}, costed=False,
                               resident=dict(beside("eval", args),
                                             optimizer=state.opt_state)))
        if hosts > 1 and "export" in held:
            out.append(_export_program(name, mesh, r_params, beside("export", set())))
        if "sample" in held:
            sampled.append(dict(beside("sample", {"state", "sampler"}), state=state))
    if sampled:
        out += _sample_programs(router, experts, vocab, seq, decode_mesh or mesh, sampled)
    return out


def _export_program(name, mesh, r_params, resident) -> Program:
    """The export of a stage's router from a multi-process run: `distributed.fetch` gathers
    each leaf to every process, one at a time; the largest leaf's gather, with the rest of
    the router (and what else stays, see residency) beside it."""
    leaves = jax.tree.leaves(r_params)
    big = max(range(len(leaves)), key=lambda i: _nbytes(leaves[i]))
    resident = dict(resident, router=[x for i, x in enumerate(leaves) if i != big])
    gather = jax.jit(lambda x: x, out_shardings=sh.replicated(mesh))
    return Program(f"{name.upper()} export (router gathered, largest tensor)", "train", gather,
                   (leaves[big],), {"params": leaves[big]}, costed=False, resident=resident)


def _sample_programs(router, experts, vocab, seq, mesh, sampled) -> List[Program]:
    """The sample decode a training run makes every train.sample_every updates (its
    prefill and chunk: `fr_jax.steps.samples`' decoder at its shapes, on the decoding
    `mesh`, with its copies of the router and the experts), compiled once, beside the
    largest of the sampling stages' resident buffers (the train state)."""
    resident = max(sampled, key=_nbytes)
    dec = samples.sample_decoder(router, experts, vocab, mesh)
    router_sh, experts_sh = samples.layouts(dec)
    params = dec.prepare({"router": _abstract(router.param_shapes(), router_sh),
                          "experts": _abstract(experts.param_shapes(), experts_sh)})
    slots = samples.cache_len(seq)
    (pre, pre_args), (chunk, chunk_args) = dec.compiled_programs(params, samples.PROMPTS, seq,
                                                                 slots)
    caches = _abstract(pre_args[4], dec._cache_shardings(pre_args[4]))
    tag = f"batch {samples.PROMPTS}"
    return [Program(f"sample decode prefill, {tag}, prompt {seq}", "decode", pre, pre_args,
                    {"params": params, "caches": caches}, costed=False, resident=resident),
            Program(f"sample decode chunk, {tag}, cache {slots}", "decode", chunk, chunk_args,
                    {"params": params, "caches": caches}, costed=False, resident=resident)]


def _fused_lineup(config, rcfg, ecfgs, mesh, mode_name: str, lazy: bool,
                  single_expert: bool, speculate: int = 0, chunk: int = 0):
    """(decoder, abstract params on `mesh`, the model configs a step runs, n experts) of one
    decode lineup, every model in the frozen dtype; None where the mode has no lazy
    schedule. With `single_expert` (cost of a lazy step: the router and the one selected
    expert), a one-expert lineup decoded eagerly stands in for a lazy one. `speculate` > 0:
    a SpeculativeDecoder of that many drafts whose runs are `chunk` speculative steps (1 where
    0)."""
    dt = frozen_dtype(config)
    dc = config.decode
    n = 1 if (single_expert and lazy) else len(ecfgs)
    router = Router(rcfg.replace(param_dtype=dt), n)
    vocab = min(c.vocab_size for c in [rcfg, *ecfgs])
    experts = Experts([c.replace(param_dtype=dt) for c in ecfgs[:n]], vocab=vocab,
                      stacked=experts_layout(config))
    kw = dict(vocab=vocab, chunk=chunk or (1 if speculate else dc.chunk), mesh=mesh,
              lazy_experts=lazy and n > 1, catch_up_width=dc.catch_up_width)
    mode = Mode.parse(mode_name, n)
    dec = (SpeculativeDecoder(mode, router, experts, speculate, **kw) if speculate
           else FusedDecoder(mode, router, experts, **kw))
    if lazy and n > 1 and not dec.lazy:
        return None  # this mode has no lazy schedule
    params = {"router": _abstract(router.param_shapes(), sh.param_shardings(router, mesh)),
              "experts": _abstract(experts.param_shapes(), sh.param_shardings(experts, mesh))}
    used = [router.cfg] * bool(dec.router) + (
        [ecfgs[0]] if (lazy or n == 1) else list(ecfgs[:n]))
    return dec, params, used, n


def _chunk_costs(config, rcfg, ecfgs, dec, params, used, lazy, batch, cache_len):
    """(useful FLOPs per step, bytes a step must read) of a decode chunk: the weights of the
    models it runs (of an untied input embedding only the rows looked up) and their caches
    (every slot)."""
    dt = frozen_dtype(config)
    weights = (_nbytes(params.get("router", {})) if dec.router else 0) + (
        _nbytes(params["experts"]) // (len(ecfgs) if lazy else 1))
    weights -= sum(c.vocab_size * c.hidden_size for c in used
                   if not c.tie_word_embeddings) * jnp.dtype(dt).itemsize
    kv_item = jnp.dtype(rcfg.dtype).itemsize  # caches hold activations
    kv = sum(2 * c.num_layers * c.num_kv_heads * c.head_dim for c in used) * (
        batch * cache_len * kv_item)
    return sum(forward_flops(c, batch, cache_len) for c in used), weights + kv


def _speculative_costs(config, rcfg, ecfgs, dec, params, used, lazy, batch, cache_len):
    """(FLOPs, bytes read) of one speculative step and the tokens it yields at
    plan.acceptance: 1 + acceptance x k. The router's weights and cache are read k + 1
    times, the expert's once."""
    k = dec.speculate
    router_pass = [c for c in used[:1] if dec.router]
    flops = sum(forward_flops(c, batch * (k + 1), cache_len) for c in used)
    _, read = _chunk_costs(config, rcfg, ecfgs, dec, params, used, lazy, batch, cache_len)
    _, r_read = _chunk_costs(config, rcfg, ecfgs, dec, {"router": params["router"],
                                                        "experts": {}}, router_pass, lazy,
                             batch, cache_len)
    return flops, read + k * r_read, 1 + config.plan.acceptance * k


def _speculative_step(config, rcfg, ecfgs, mesh, mode_name: str, lazy: bool, batch: int,
                      single_expert: bool) -> Program:
    """One speculative step (decode.speculate = k): the router reads k + 1 tokens one at a
    time, the selected expert the chunk of k + 1 in one pass. At plan.acceptance (the share of
    drafts kept) a step yields 1 + acceptance x k tokens: the program's run counts that
    many, so its FLOPs, bytes and step time read per accepted token."""
    pc, k = config.plan, config.decode.speculate
    dec, params, used, _ = _fused_lineup(config, rcfg, ecfgs, mesh, mode_name, lazy,
                                         single_expert, speculate=k)
    params = dec.prepare(params)
    (_, pre_args), (step, step_args) = dec.compiled_programs(params, batch, pc.prompt_len,
                                                             pc.cache_len)
    caches = _abstract(pre_args[4], dec._cache_shardings(pre_args[4]))
    flops, read, tokens = _speculative_costs(config, rcfg, ecfgs, dec, params, used, lazy,
                                             batch, pc.cache_len)
    label = "lazy" if lazy else "eager"
    return Program(f"decode speculative step, {mode_name} {label} k={k} ({pc.acceptance:.0%} "
                   f"of drafts kept: {tokens:.2f} tokens), batch {batch}, cache {pc.cache_len}",
                   "decode", step, step_args, {"params": params, "caches": caches},
                   flops / tokens, read / tokens, steps=tokens)


def decode_programs(config, rcfg, ecfgs, mesh, modes: Sequence[str], batches: Sequence[int],
                    lazy_options: Sequence[bool], single_expert: bool = False) -> List[Program]:
    """The fused decoder's prefill and chunk for each mode x lazy/eager x batch (see
    _fused_lineup for `single_expert`)."""
    pc, dc = config.plan, config.decode
    out = []
    for mode_name in modes:
        for lazy in lazy_options:
            label = "lazy" if lazy else "eager"
            for batch in batches:
                built = _fused_lineup(config, rcfg, ecfgs, mesh, mode_name, lazy, single_expert)
                if built is None:
                    break
                dec, params, used, _ = built
                params = dec.prepare(params)
                (pre, pre_args), (chunk, chunk_args) = dec.compiled_programs(
                    params, batch, pc.prompt_len, pc.cache_len)
                caches = _abstract(pre_args[4], dec._cache_shardings(pre_args[4]))
                flops, read = _chunk_costs(config, rcfg, ecfgs, dec, params, used, lazy, batch,
                                           pc.cache_len)
                tag = f"{mode_name} {label}, batch {batch}"
                out.append(Program(f"decode prefill, {tag}, prompt {pc.prompt_len}", "decode",
                                   pre, pre_args, {"params": params, "caches": caches},
                                   sum(forward_flops(c, batch * pc.prompt_len,
                                                     (pc.prompt_len + 1) / 2) for c in used),
                                   costed=False))
                out.append(Program(f"decode chunk, {tag}, cache {pc.cache_len}", "decode",
                                   chunk, chunk_args, {"params": params, "caches": caches},
                                   flops, read, steps=dc.chunk))
                if dc.speculate and speculates(Mode.parse(mode_name)):
                    out.append(_speculative_step(config, rcfg, ecfgs, mesh, mode_name, lazy,
                                                 batch, single_expert))
    return out


def serve_programs(config, rcfg, ecfgs, mesh, single_expert: bool = False) -> List[Program]:
    """The server's programs (fr_jax.serving.engine) for decode.mode with decode's lazy
    setting: each prompt bucket's prefill, the insert of a prefilled row into its slot, and
    the decode chunk of serve.slots rows, at serve.cache_len (plan.cache_len where 0)."""
    dc, s = config.decode, config.serve
    cache_len = s.cache_len or config.plan.cache_len
    lazy = bool(dc.lazy_experts)
    k = dc.speculate if speculates(Mode.parse(dc.mode)) else 0
    built = _fused_lineup(config, rcfg, ecfgs, mesh, dc.mode, lazy, single_expert, k, dc.chunk)
    if built is None:  # the mode has no lazy schedule
        lazy = False
        built = _fused_lineup(config, rcfg, ecfgs, mesh, dc.mode, lazy, single_expert, k,
                              dc.chunk)
    dec, params, used, _ = built
    engine = make_engine(dec, params, s.slots, cache_len, eos_ids=[0], pad_id=0,
                         buckets=tuple(s.buckets) or None, place=False)
    state = jax.eval_shape(engine._zero_state)
    tag = f"{dc.mode} {'lazy' if lazy else 'eager'}" + (f" k={k}" if k else "")
    out = []
    for name, fn, args in engine.lowerable():
        groups = {"params": engine.params} if name != "insert" else {}
        if name == "chunk" and k:  # read per accepted token, as the decode step
            flops, read, tokens = _speculative_costs(config, rcfg, ecfgs, dec, engine.params,
                                                     used, lazy, s.slots, cache_len)
            out.append(Program(f"serve chunk, {tag} ({config.plan.acceptance:.0%} of drafts "
                               f"kept), {s.slots} slots, cache {cache_len}", "decode", fn,
                               args, dict(groups, caches=state), flops / tokens,
                               read / tokens, steps=dc.chunk * tokens))
        elif name == "chunk":
            flops, read = _chunk_costs(config, rcfg, ecfgs, dec, engine.params, used, lazy,
                                       s.slots, cache_len)
            out.append(Program(f"serve chunk, {tag}, {s.slots} slots, cache {cache_len}",
                               "decode", fn, args, dict(groups, caches=state), flops, read,
                               steps=dc.chunk))
        else:
            out.append(Program(f"serve {name}, {tag}", "decode", fn, args,
                               dict(groups, caches=state), costed=False))
    return out


def all_programs(config, rcfg, ecfgs, meshes, single_expert: bool = False,
                 hosts: int = 1) -> List[Program]:
    """Every program of the config: meshes = {"train": mesh, "decode": mesh}; `hosts`: the
    processes of the launch (a multi-host run gathers its router to export it)."""
    pc = config.plan
    wanted = set(pc.programs)
    unknown = wanted - {"train", "decode", "serve"}
    if unknown:
        raise PlanError(f"plan.programs: unknown {sorted(unknown)}; use train, decode, serve")
    out = []
    if "train" in wanted:
        out += train_programs(config, rcfg, ecfgs, meshes["train"], tuple(config.train.stages),
                              hosts, meshes["decode"])
    if "decode" in wanted:
        out += decode_programs(config, rcfg, ecfgs, meshes["decode"], tuple(pc.decode_modes),
                               tuple(pc.decode_batches), tuple(pc.lazy), single_expert)
    if "serve" in wanted:
        out += serve_programs(config, rcfg, ecfgs, meshes["decode"], single_expert)
    return out
