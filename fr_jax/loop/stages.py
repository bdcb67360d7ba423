"""The training loop: a stage's data, steps, evaluation, samples, TensorBoard scalars and
Orbax checkpoints (resumed from the latest good one), and the runs built from stages --
the router's sft / cdpo (`train`) and one plain model's lm (`finetune`)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from fr_jax.config import check_ranges, decode_mesh, frozen_dtype
from fr_jax.corpus.streams import StreamBatcher
from fr_jax.hf import Checkpoint, load_hf, load_tokenizer, resolve, save_hf
from fr_jax.hf.hub import hub_name
from fr_jax.inference.lineup import Lineup, load_lineup
from fr_jax.loop import record
from fr_jax.loop.checkpoint import Checkpointer
from fr_jax.loop.frozen_outputs import precompute_reference, precompute_signals
from fr_jax.loop.inputs import check_data_path, layout_for, load_stage_data
from fr_jax.loop.tensorboard import summary_writer
from fr_jax.loop.watch import WATCHED, Watch
from fr_jax.loop.workdir import hold, interrupt_after, resume_note
from fr_jax.models import Model
from fr_jax.routing.experts import Experts
from fr_jax.routing.router import Router, save_router
from fr_jax.runtime import distributed
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.errors import DataError, Interrupted, TrainError
from fr_jax.steps.residency import Parked, after_precompute, copy_as, in_step, take_over
from fr_jax.steps.samples import first_prompts, make_sampler
from fr_jax.steps.stage import (abstract_state, build_stage, frozen_cfg, init_state,
                                micro_batch_size, trained_cfg)


# ---------------------------------------------------------------------------- the loop
def _scalars(metrics) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


class _Writer:
    """tensorboardX on process 0 only; a no-op elsewhere."""

    def __init__(self, logdir: str):
        self.w = None
        if jax.process_index() == 0:
            self.w = summary_writer(logdir)

    def scalars(self, prefix, values, step):
        if self.w:
            for k, v in values.items():
                self.w.add_scalar(f"{prefix}/{k}", v, step)

    def histogram(self, tag, values, step):
        if self.w:
            self.w.add_histogram(tag, np.asarray(values), step)

    def text(self, tag, text, step):
        if self.w:
            self.w.add_text(tag, text, step)

    def close(self):
        if self.w:
            self.w.close()


def run_stage(name: str, config, trainee, params, experts: Optional[Experts], e_params,
              tokenizer, mesh, progress: bool = True, samples: Optional[Lineup] = None,
              observe: Optional[Callable] = None, folders: Optional[Dict[str, str]] = None):
    """Trains one stage to its configured number of steps (resuming if a checkpoint exists)
    and returns (params, history). `trainee` is the Router (sft, cdpo) or, for stage `lm`,
    the plain Model trained on the SFT data (no experts). `samples`: the lineup whose
    FusionRoute answers are logged as text (train.sample_every).

    The stage takes `params` over: they become the train state's buffers (or are freed
    when a checkpoint is restored), so the caller must not use them again. `e_params`, the
    experts' params, come as a `Parked` holder (or bare): the stage leaves them on the
    devices only in the phases `residency.resident` names. `observe(stage, phase, program,
    args)` is called before each phase's first program call (what tests check fr_jax.plan's
    memory against: the run's live buffers then). `folders`: {config field: local folder} of
    the checkpoints the entry point resolved (the run's record names their contents)."""
    hook = observe
    observe = ((lambda phase, fn, args: hook(name, phase, fn, args)) if hook
               else (lambda *_: None))
    held = e_params if e_params is None or isinstance(e_params, Parked) else Parked(e_params)
    tc, dc = config.train, config.data
    stage_cfg = tc[name]
    vocab = len(tokenizer)
    workdir = os.path.join(tc.workdir, name)
    layout = layout_for(mesh, tc.batch_size, dc.streams)
    n_streams = record.check_or_write(config, name, distributed.is_main(), layout.n_streams,
                                      folders)
    if n_streams != layout.n_streams:  # a resume keeps the stage's first stream count
        layout = layout_for(mesh, tc.batch_size, n_streams)
    kind = "sft" if name in ("sft", "lm") else "pref"
    path = dc.sft_path if kind == "sft" else dc.pref_path
    data = load_stage_data(path, kind, tokenizer, dc, layout)
    report = data.report
    os.makedirs(workdir, exist_ok=True)
    if distributed.is_main():  # every file of a run is written once, by process 0
        record.write_json(os.path.join(workdir, "data_report.json"),
                          {"path": path, **report.to_json()})
    if not data.n_train:  # bad records are skipped and counted; only nothing usable is fatal
        why = (f"all {data.n_held} usable ones are held out for the eval loss; lower "
               "data.eval_fraction" if data.n_held else f"{report}")
        raise DataError(f"{path}: no usable {kind} records for training ({why}); see "
                        f"{os.path.join(workdir, 'data_report.json')}")
    if jax.process_count() > 1:  # each process says what it read: its streams' records
        print(f"[{name}] process {jax.process_index()} reads data streams {layout.mine()} of "
              f"{layout.n_streams}: {data.n_read} of {data.n_entries} records", flush=True)
    precomputed = name == "sft" and stage_cfg.expert_signals == "precompute"
    if precomputed:
        data.attach(precompute_signals(
            data.examples(), experts, held.get(), vocab, dc.seq_len, micro_batch_size(tc),
            stage_cfg.signals_cache or os.path.join(workdir, "expert_signals.npz"), progress,
            mesh, tc.loss_block, layout=layout, observe=observe))
    reference = name == "cdpo" and stage_cfg.reference == "precompute"
    # The stage-1 router, frozen in the frozen models' dtype: CDPO's reference policy.
    ref_params = (copy_as(params, frozen_dtype(config), jax.tree.map(lambda x: x.sharding,
                                                                       params))
                  if name == "cdpo" else None)
    if reference:
        data.attach(precompute_reference(
            data.examples(), trainee, ref_params, experts, held.get(), vocab, dc.seq_len,
            micro_batch_size(tc),
            stage_cfg.reference_cache or os.path.join(workdir, "reference.npz"), progress,
            mesh, tc.loss_block, layout=layout, observe=observe))
    streams = f"; {layout.n_streams} data streams" if layout.n_streams > 1 else ""
    _print(f"[{name}] data: {report}; {data.n_train} train / {data.n_held} eval{streams}")
    widths = dict(signals=experts.n if precomputed else 0,
                  reference=trainee.n_experts if reference else 0)
    batcher = StreamBatcher(layout, data.train, dc.seq_len, dc.seed, kind, dc.pack, **widths)
    # CDPO with stage 1's loss kept on: SFT rows beside every batch of pairs, their own
    # stream position in every checkpoint.
    sft_batcher = (_sft_term_batcher(dc, tokenizer, layout, workdir)
                   if name == "cdpo" and stage_cfg.sft_weight else None)

    def next_batch():
        b = batcher.next()
        return dict(b, sft=sft_batcher.next()) if sft_batcher else b

    # What the steps do not take leaves the devices: precomputed signals free the experts'
    # HBM for the step (to host memory when a sample decode or a later stage needs them
    # again), a precomputed reference frees the reference router.
    needs = in_step(name, stage_cfg)
    if held is not None:
        {"keep": lambda: None, "host": held.park, "drop": held.drop}[
            after_precompute(name, config)]()
    frozen = {"experts": held.get()} if "experts" in needs else {}
    if "ref" in needs:
        frozen["ref"] = ref_params
    elif ref_params is not None:
        take_over(ref_params)
    ref_params = None
    stage = build_stage(name, trainee, experts, mesh, stage_cfg, tc, params, frozen, vocab,
                        sft_cfg=tc.sft)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep)
    history = []  # one entry per logged update, kept across resumes (checkpoint meta)
    # A resume restores into the state's shapes without building a fresh state first (its
    # optimizer state alone is twice the params).
    restored = ckpt.restore_latest(abstract_state(stage, params),
                                   upto=record.resume_upto(config, name)) if tc.resume else None
    if restored is not None:
        state, meta, at = restored
        take_over(params)
        batcher.restore(meta["data"])
        if sft_batcher and "sft_data" in meta:  # (a checkpoint saved without the term
            sft_batcher.restore(meta["sft_data"])  # starts its rows from the first)
        history = list(meta.get("history", []))
        _print(f"[{name}] resumed from step {at} ({batcher.describe(meta['data'])})")
    else:
        state = init_state(stage, params, tc.seed, take=True)
    del params
    watch = Watch(name, config, history, ckpt)
    frozen = jax.device_put(frozen, stage.frozen_shardings)
    first = next_batch()
    train_step, eval_step = stage.jitted(first)
    writer = _Writer(os.path.join(tc.workdir, "tensorboard", name))
    writer.text("config", "<pre>" + config.to_json_best_effort(indent=2) + "</pre>", 0)

    # Sample decodes run on every process as one program over the decoding mesh, on
    # process 0's first prompts; process 0 writes them.
    sampling = bool(tc.sample_every) and samples is not None and name != "lm"
    mine = [e for part in (data.held, data.train) for s in sorted(part) for e in part[s]]
    prompts = first_prompts(mine) if sampling else []
    sampler = (make_sampler(samples, prompts, dc.seq_len,
                            sh.mesh_from_config(decode_mesh(config))) if prompts else None)
    # One loop iteration = one optimizer update over train.batch_size rows (grad_accum
    # micro-batches inside the step); logging, evaluation and checkpoints count updates.
    total = stage_cfg.steps
    micro = int(state.step)
    bar = tqdm(total=total, initial=micro, desc=name, disable=not progress or
               jax.process_index() != 0, dynamic_ncols=True)
    batch, t_last, tokens_since, micro_last = first, time.perf_counter(), 0, micro
    history_path = os.path.join(workdir, "history.json")
    pending = []  # (update, watched metrics still on device): checked at the next boundary
    if micro < total:
        observe("step", train_step, (state, frozen, stage.put_batch(batch)))
    try:
        while micro < total:
            state, metrics = train_step(state, frozen, stage.put_batch(batch))
            micro += 1
            tokens_since += batcher.tokens(batch) + (sft_batcher.tokens(batch["sft"])
                                                     if sft_batcher else 0)
            bar.update(1)
            pending.append((micro, {k: metrics[k] for k in WATCHED if k in metrics}))
            saving = micro % tc.ckpt_every == 0 or micro == total
            if saving or micro % tc.log_every == 0:
                # Before anything is logged or saved: a diverged step never reaches a checkpoint.
                watch.check(pending)
                pending = []
            if micro % tc.log_every == 0 or micro == total:
                metrics = jax.device_get(metrics)
                tokens_since = sum(distributed.gather(tokens_since))  # the global batch's
                now = time.perf_counter()
                values = _scalars(metrics)
                values.update(lr=float(stage.schedule(micro)),
                              tokens_per_s=tokens_since / (now - t_last),
                              step_time=(now - t_last) / (micro - micro_last))
                if "route_share" in metrics:  # per-expert share of the tokens routed to it
                    writer.histogram("train/route_share", metrics["route_share"], micro)
                    values.update({f"route_share_{i}": float(v)
                                   for i, v in enumerate(metrics["route_share"])})
                writer.scalars("train", values, micro)
                history.append({"micro": micro, **values})
                bar.set_postfix(loss=f"{values['loss']:.3f}")
                t_last, tokens_since, micro_last = now, 0, micro
            if tc.eval_every and data.n_held and (micro % tc.eval_every == 0 or micro == total):
                ev = evaluate(stage, eval_step, state.params, frozen, data.held, layout, tc, dc,
                              kind, widths, observe)
                observe = _once(observe, "eval")
                writer.scalars("eval", ev, micro)
                if history:
                    history[-1].update({f"eval_{k}": v for k, v in ev.items()})
            if sampler is not None and (micro % tc.sample_every == 0 or micro == total):
                # The decode takes the experts from host memory in the decoding layout;
                # a step that uses them gets them back in its own afterwards.
                held.park()
                text = sampler(state.params, held, hook and (
                    lambda fn, args: observe("sample", fn, args)))
                observe = _once(observe, "sample")
                if distributed.is_main():
                    writer.text("samples", text, micro)
                if "experts" in needs:
                    frozen["experts"] = held.get()
            if saving:
                # The history up to this step travels with the step: a resume from any
                # checkpoint continues the history that led to it.
                position = StreamBatcher.state(layout.n_streams,
                                               distributed.gather(batcher.positions()))
                meta = {"data": position, "stage": name, "micro": micro, "history": history}
                if sft_batcher:
                    meta["sft_data"] = StreamBatcher.state(
                        layout.n_streams, distributed.gather(sft_batcher.positions()))
                with interrupt_after():
                    ckpt.save(micro, state, meta)
                if distributed.is_main():
                    record.write_json(history_path, history)
            if micro < total:
                batch = next_batch()
    except KeyboardInterrupt:
        raise Interrupted(resume_note(config, name, micro)) from None
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    if distributed.is_main():
        record.write_json(history_path, history)
    return state.params, history


def _once(observe, phase: str):
    """`observe`, silent from now on for `phase` (its first call has been seen)."""
    return lambda p, *a: None if p == phase else observe(p, *a)


def _sft_term_batcher(dc, tokenizer, layout, workdir) -> StreamBatcher:
    """CDPO's SFT rows (train.cdpo.sft_weight): data.sft_path's training examples in the
    stage's stream layout, its own order (seed data.seed + 1)."""
    data = load_stage_data(dc.sft_path, "sft", tokenizer, dc, layout)
    if distributed.is_main():
        record.write_json(os.path.join(workdir, "sft_term_data_report.json"),
                          {"path": dc.sft_path, **data.report.to_json()})
    if not data.n_train:
        raise DataError(f"{dc.sft_path}: no usable SFT records for CDPO's SFT term "
                        f"(train.cdpo.sft_weight): {data.report}")
    _print(f"[cdpo] SFT term: {data.report}; {data.n_train} train")
    return StreamBatcher(layout, data.train, dc.seq_len, dc.seed + 1, "sft", dc.pack)


def evaluate(stage, eval_step, params, frozen, held, layout, tc, dc, kind,
             widths, observe=None) -> Dict[str, float]:
    """Mean metrics over the first `eval_batches` batches of the held-out examples (each
    process filling its streams' rows with its own held-out examples)."""
    batcher = StreamBatcher(layout, held, dc.seq_len, dc.seed, kind, dc.pack, **widths)
    sums: Dict[str, float] = {}
    n = 0
    while n < tc.eval_batches:
        batch = stage.put_batch(batcher.next())
        if observe is not None and n == 0:
            observe("eval", eval_step, (params, frozen, batch))
        m = _scalars(jax.device_get(eval_step(params, frozen, batch)))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        if distributed.all_agree(batcher.first_epoch_done()):
            break
    return {k: v / max(n, 1) for k, v in sums.items()}


def _print(msg):
    if jax.process_index() == 0:
        print(msg, flush=True)


def _require_init(config) -> str:
    """Stage lm's init model folder (train.lm.init), which it must name."""
    if not config.train.lm.init:
        raise TrainError("stage lm fine-tunes an existing model: set --config.train.lm.init "
                         "to its HF folder")
    return config.train.lm.init


def finetune(config, progress: bool = True, observe: Optional[Callable] = None,
             init: Optional[Checkpoint] = None) -> str:
    """Stage `lm`: fine-tunes one ordinary model (no routing) from `train.lm.init` on the SFT
    data -- the direct fine-tuning baseline, and how the demo world trains its experts.
    Returns the folder of the exported HF checkpoint (<workdir>/lm/model). `init`: that
    checkpoint, when the caller resolved it already."""
    init = init or resolve(_require_init(config))
    mesh = sh.mesh_from_config(config.mesh)
    dtype, pdtype = config.model.dtype, config.model.param_dtype or None
    model = Model(trained_cfg(init.model_config(dtype, pdtype), config))
    tokenizer = load_tokenizer(init)
    # Loaded straight into the stage, which takes the params over (see run_stage).
    shardings = sh.param_shardings(model, mesh)
    params, _ = run_stage("lm", config, model, load_hf(init, dtype, pdtype, shardings=shardings)[1],
                          None, None, tokenizer, mesh, progress, observe=observe,
                          folders={"train.lm.init": init.path})
    out = os.path.join(config.train.workdir, "lm", "model")
    host = distributed.fetch(params)  # every process: a collective where params are sharded
    if distributed.is_main():
        save_hf(out, model.cfg, host, tokenizer=tokenizer)
        _print(f"[lm] exported model to {out}")
    return out


def train(config, progress: bool = True, observe: Optional[Callable] = None) -> str:
    """The configured stages: sft and/or cdpo train the router of config.router.path for
    the experts of config.experts.paths (returns the exported router's folder); lm alone
    fine-tunes one plain model (see `finetune`; returns its folder). `observe`: see
    `run_stage`."""
    check_ranges(config)
    checkpoints = check_run(config)
    distributed.initialize(config.train.distributed)
    with hold(config):
        try:
            return _train(config, progress, observe, checkpoints)
        except KeyboardInterrupt:  # outside a stage's steps (loading, precomputing, export)
            raise Interrupted(resume_note(config)) from None


def check_run(config) -> Dict[str, Checkpoint]:
    """What a run needs before it touches its workdir: known stages (lm alone), the
    checkpoints named, each stage's data file present. Returns the run's checkpoints,
    resolved once (a hub name fetched, config.json parsed), by config field."""
    tc = config.train
    bad = [s for s in tc.stages if s not in ("sft", "cdpo", "lm")]
    if bad:
        raise TrainError(f"unknown training stage {bad[0]!r}; stages are 'sft', 'cdpo' "
                         "(the router) or 'lm' (one plain model, alone)")
    if "lm" in tc.stages and tuple(tc.stages) != ("lm",):
        raise TrainError("stage lm trains one plain model and runs on its own "
                         f"(train.stages=('lm',)), got {tuple(tc.stages)}")
    if "lm" in tc.stages:
        _require_init(config)
    if "lm" not in tc.stages and (not config.router.path or not config.experts.paths):
        raise TrainError("set both --config.router.path and --config.experts.paths")
    fields = record.checkpoint_fields(config, "lm" in tc.stages)
    # Local folders first (a missing one is named before the data); hub names, which may
    # be fetched, once the data files are known to be there.
    local = {f: resolve(n) for f, n in fields.items() if hub_name(n) is None}
    for name in tc.stages:
        kind = "pref" if name == "cdpo" else "sft"
        check_data_path(config.data.pref_path if kind == "pref" else config.data.sft_path,
                        kind)
    if "cdpo" in tc.stages:
        if tc.cdpo.head == "sft" and not tc.cdpo.sft_weight:
            raise TrainError("train.cdpo.head=sft trains the routing head on the SFT term, "
                             "which train.cdpo.sft_weight=0 turns off; set sft_weight > 0 "
                             "or leave head=frozen")
        if tc.cdpo.sft_weight:  # CDPO's SFT term reads the stage-1 data too
            try:
                check_data_path(config.data.sft_path, "sft")
            except DataError as e:
                raise DataError(f"train.cdpo.sft_weight={tc.cdpo.sft_weight} keeps stage "
                                f"1's loss on during CDPO: {e}") from None
    return {f: local[f] if f in local else resolve(n) for f, n in fields.items()}


def _train(config, progress: bool, observe: Optional[Callable],
           checkpoints: Dict[str, Checkpoint]) -> str:
    tc = config.train
    if "lm" in tc.stages:
        return finetune(config, progress, observe, checkpoints["train.lm.init"])
    router_path = checkpoints["router.path"]
    expert_paths = [checkpoints[f"experts.paths[{i}]"] for i in range(len(config.experts.paths))]
    folders = {field: c.path for field, c in checkpoints.items()}
    mesh = sh.mesh_from_config(config.mesh)
    dtype = config.model.dtype
    lineup = load_lineup(router_path, expert_paths, names=config.experts.names, mesh=mesh,
                         dtype=dtype, router_dtype=config.model.param_dtype or dtype,
                         frozen=frozen_dtype(config), router_seed=tc.seed,
                         softcap=config.fusion.softcap)
    router = Router(trained_cfg(lineup.router.cfg, config), lineup.router.n_experts)
    experts = Experts([frozen_cfg(c, config) for c in lineup.experts.cfgs],
                      vocab=lineup.experts.vocab, stacked=lineup.experts.stacked)
    # Sample decodes use the lineup's models and tokenizer (fr_jax.steps.samples); the
    # stages take the params over (the lineup must hold no second reference to them).
    samples = dataclasses.replace(lineup, router=router, experts=experts, mesh=None,
                                  params={})
    # The router's params travel in `carry`, popped into each stage: no local here keeps
    # the incoming copy alive beside the stage's own.
    carry, held = {"router": lineup.params.pop("router")}, Parked(lineup.params.pop("experts"))
    tokenizer = lineup.tokenizer
    out = None
    for name in tc.stages:
        carry["router"], _ = run_stage(name, config, router, carry.pop("router"), experts,
                                       held, tokenizer, mesh, progress, samples, observe,
                                       folders)
        out = os.path.join(tc.workdir, name, "router")
        host = distributed.fetch(carry["router"])  # every process: a collective where sharded
        if distributed.is_main():
            save_router(out, router, host, tokenizer=tokenizer,
                        expert_names=list(lineup.expert_names))
            _print(f"[{name}] exported router to {out}")
    return out
