"""The demo pipeline: a multi-domain world where FusionRoute's claim can be checked on a CPU.

    python -m fr_jax.demo [--config=configs/demo.py[:quick]] [--config.<field>=...]

Steps, each reusing the product's own code paths and each skipped when its output exists
(an interrupted run resumes; training stages also resume from their Orbax checkpoints):
  1. world: tokenizer, train / held-out tasks (fr_jax.harness.toy_world), JSONL files;
  2. bases: a Llama-3-architecture model and a smaller one for the router, "pretrained" on
     the general task (stage `lm`);
  3. experts: the base fine-tuned on each domain (stage `lm`), written as HF folders;
  4. router stage 1 (SFT) and stage 2 (CDPO, pairs built by sampling FusionRoute answers
     and scoring them) through fr_jax.train;
  5. the fine-tuned baseline: the base fine-tuned on the router's SFT data, same budget;
  6. every decode mode on every domain's held-out prompts -> results.{json,md,png} and
     TensorBoard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from typing import Dict, List

import jax

from fr_jax.baselines import seqroute_pipeline as S
from fr_jax.baselines.merging import merge_hf
from fr_jax.config.demo_sections import DEMO_SECTIONS
from fr_jax.harness import runner as harness, report
from fr_jax.harness import toy_world as W
from fr_jax.harness.benchmarks import toy_examples
from fr_jax.hf import load_config, save_hf
from fr_jax.loop import finetune, record, train
from fr_jax.loop.tensorboard import summary_writer
from fr_jax.models import Model, ModelConfig, RopeConfig
from fr_jax.runtime.errors import ConfigError
from fr_jax.toy.checks import check_demo, start_world
from fr_jax.toy.world_pairs import EXPERT_NAMES, load_world_lineup, preference_pairs


def _log(cfg, msg):
    if cfg.demo.progress:
        print(msg, flush=True)


def _done(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "DONE"))


def _mark_done(path: str):
    with open(os.path.join(path, "DONE"), "w") as f:
        f.write("complete\n")


# ---------------------------------------------------------------------------- models
def model_config(m, tokenizer):
    return ModelConfig(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads, head_dim=m.hidden_size // m.num_heads,
        rope=RopeConfig(theta=10000.0), tie_word_embeddings=True, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id)


def parameter_count(m, tokenizer) -> int:
    """Parameters of the model a demo model section describes (shapes only, no weights)."""
    shapes = jax.eval_shape(Model(model_config(m, tokenizer)).init, jax.random.key(0))
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def _expert_layout(src: str) -> str:
    """A bundle keeps the experts at <src>/<domain>; a pipeline's root at experts/<domain>."""
    return "experts/{}" if os.path.isdir(os.path.join(src, "experts")) else "{}"


def _fits(folder: str, m, tokenizer) -> bool:
    """Whether the model in `folder` has the shape of the demo model section `m`."""
    have, want = load_config(folder), model_config(m, tokenizer)
    return all(getattr(have, k) == getattr(want, k) for k in _SHAPE_FIELDS)


def experts_fit(cfg, src: str) -> bool:
    """Whether the world in folder `src` has experts of demo.expert_model's shape."""
    first = os.path.join(src, _expert_layout(src).format(W.DOMAINS[0]))
    return _fits(first, cfg.demo.expert_model, W.build_tokenizer())


def run_config(cfg, workdir: str, stage: str, budget=None, sft_path="", pref_path=""):
    """The fr_jax.train config of one run of the pipeline: the demo config without its own
    sections (every training setting as the demo config has it), for one stage, its data and
    folder, every seed from train.seed; `budget` (steps, lr, warmup) replaces the stage's
    own (a base's, an expert's, the fine-tuned baseline's)."""
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        for name in DEMO_SECTIONS:
            del c[name]
    c.lock()
    c.data.sft_path, c.data.pref_path = sft_path, pref_path
    c.data.seed = cfg.train.seed
    c.train.workdir = workdir
    c.train.stages = (stage,)
    if stage == "cdpo":  # the demo's two router stages are two runs, each at its batch
        c.train.batch_size = cfg.demo.cdpo_batch_size
    s = c.train[stage]
    if budget is not None:
        s.steps, s.lr, s.warmup = budget.steps, budget.lr, budget.warmup
    c.train.eval_every = c.train.ckpt_every = max(s.steps // 2, 1)
    return c


# ---------------------------------------------------------------------------- steps
def _expert_budget(cfg, domain: str):
    st = cfg.demo.experts.copy_and_resolve_references()
    st.steps = st.steps_by_domain.get(domain, st.steps)
    return st


def make_data(cfg, root: str) -> Dict[str, str]:
    """World tasks -> JSONL files under root/data; returns their paths."""
    d = os.path.join(root, "data")
    paths = {"base": "base.jsonl", "sft": "router_sft.jsonl", "test": "test.jsonl",
             **{f"expert_{x}": f"expert_{x}.jsonl" for x in W.DOMAINS}}
    paths = {k: os.path.join(d, v) for k, v in paths.items()}
    paths["train_pool"] = os.path.join(d, "train_pool.jsonl")
    if _done(d):
        return paths
    data = W.make_world_data(cfg.world.n_train, cfg.world.n_test, cfg.world.seed)
    seed = cfg.train.seed
    n_rows = lambda st: st.steps * cfg.train.batch_size * 2  # ~2 examples per packed row
    W.write_jsonl(paths["test"], [t.record() for d_ in W.EVAL_DOMAINS for t in data.test[d_]])
    W.write_jsonl(paths["train_pool"], [t.record() for d_ in W.EVAL_DOMAINS
                                        for t in data.train[d_]])
    W.write_jsonl(paths["base"], [t.record() for t in W.mixture(
        data.train, dict(cfg.world.base_mix), n_rows(cfg.demo.base), seed + 10)])
    own = cfg.world.expert_own
    for i, x in enumerate(W.DOMAINS):
        others = (1.0 - own) / (len(W.DOMAINS) - 1)
        weights = {y: (own if y == x else others) for y in W.DOMAINS}
        weights = {y: w for y, w in weights.items() if w > 0}
        W.write_jsonl(paths[f"expert_{x}"], [t.record() for t in W.mixture(
            data.train, weights, n_rows(_expert_budget(cfg, x)), seed + 20 + i)])
    W.write_jsonl(paths["sft"], [t.record() for t in W.mixture(
        data.train, dict(cfg.world.router_mix), n_rows(cfg.train.sft), seed + 30)])
    _mark_done(d)
    return paths


def read_tasks(path: str) -> List[W.Task]:
    with open(path) as f:
        return [W.Task(r["domain"], r["prompt"], r["response"]) for r in map(json.loads, f)]


def train_lm(cfg, root: str, name: str, init: str, data_path: str, budget) -> str:
    """Stage `lm` from the HF folder `init` on `data_path` with `budget` (steps, lr,
    warmup); returns the exported folder."""
    out = os.path.join(root, name)
    if _done(out):
        return out
    c = run_config(cfg, os.path.join(root, "train", name), "lm", budget, sft_path=data_path)
    c.train.lm.init = init
    exported = finetune(c, progress=cfg.demo.progress)
    if os.path.isdir(out):
        shutil.rmtree(out)
    shutil.copytree(exported, out)
    _mark_done(out)
    return out


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim")


def write_world(cfg, folder: str):
    """folder/world.json: the settings the world was drawn with (what start_from checks)."""
    w = cfg.world
    with open(os.path.join(folder, "world.json"), "w") as f:
        json.dump(dict(seed=w.seed, n_train=w.n_train, n_test=w.n_test,
                       seq_len=cfg.data.seq_len), f, indent=1, sort_keys=True)


def adopt_trained(cfg, root: str, tokenizer):
    """With `cfg.demo.start_from` (a bundled world's folder, `fr_jax.runtime.bundle`, or another run's
    root, `train_world`): its experts' base,
    the router's base and the three experts are copied to where stages 2-3 would have
    written theirs, so those stages are skipped. Refused unless that world was drawn as this
    run's is (same world seed and training pools; this run's held-out prompts among its
    held-out ones) and its models have this config's shapes: otherwise the adopted experts
    could have trained on this run's test prompts."""
    src = start_world(cfg)
    layout = _expert_layout(src)
    same = lambda folder, m: _fits(os.path.join(src, folder), m, tokenizer)
    adopt = {"base": "base", **{f"experts/{x}": layout.format(x) for x in W.DOMAINS}}
    for dest, name in adopt.items():
        if not same(name, cfg.demo.expert_model):
            raise ConfigError(f"{os.path.join(src, name)} is not the model this config "
                              "describes (demo.expert_model); leave demo.start_from empty to "
                              "train it")
    # The router's base: the bundled one, or the experts' base where the router is as
    # large as an expert (both are the same pretraining, `say`, at the same budget); a
    # router of another size gets its base trained here.
    for name in ("router_base", "base"):
        if same(name, cfg.demo.router_model):
            adopt["router_base"] = name
            break
    else:
        _log(cfg, "[demo] no pretrained base of demo.router_model's size in "
                  "demo.start_from: training one")
    for dest, name in adopt.items():
        out = os.path.join(root, dest)
        if _done(out):
            continue
        if os.path.isdir(out):
            shutil.rmtree(out)
        shutil.copytree(os.path.join(src, name), out)
        _mark_done(out)


def init_models(cfg, root: str, tokenizer) -> Dict[str, str]:
    """Seeded random inits of the experts' base and of the (smaller) router's base, as HF
    folders."""
    paths = {"base": os.path.join(root, "init", "base"),
             "router": os.path.join(root, "init", "router")}
    if _done(os.path.join(root, "init")):
        return paths
    k_base, k_router = jax.random.split(jax.random.key(cfg.train.seed))
    base_cfg = model_config(cfg.demo.expert_model, tokenizer)
    save_hf(paths["base"], base_cfg, jax.device_get(Model(base_cfg).init(k_base)),
            tokenizer=tokenizer)
    router_cfg = model_config(cfg.demo.router_model, tokenizer)
    save_hf(paths["router"], router_cfg, jax.device_get(Model(router_cfg).init(k_router)),
            tokenizer=tokenizer)
    _mark_done(os.path.join(root, "init"))
    return paths


def train_router_stage(cfg, root: str, stage: str, router_path: str, experts: List[str],
                       sft_path: str = "", pref_path: str = "") -> str:
    """Router stage `sft` or `cdpo` through fr_jax.loop.train; returns the exported
    router (train.sft / train.cdpo as the demo config has them)."""
    workdir = os.path.join(root, "train", "router")
    out = os.path.join(workdir, stage, "router")
    if _done(out):
        return out
    c = run_config(cfg, workdir, stage, sft_path=sft_path, pref_path=pref_path)
    c.router.path = router_path
    c.experts.paths = tuple(experts)
    c.experts.names = EXPERT_NAMES
    train(c, progress=cfg.demo.progress)
    _mark_done(out)
    return out


def merged_models(cfg, root: str, base: str, experts: List[str]) -> Dict[str, str]:
    """The merging baselines: each configured method over the experts and their shared
    base, written as HF folders (fr_jax.baselines.merging) -> {"merged:<tag>": folder}."""
    out = {}
    for tag, method in (("ta", "task_arithmetic"), ("ties", "ties")):
        folder = os.path.join(root, "merged", tag)
        if not _done(folder):
            m = cfg.demo.merge
            options = ({"lambdas": m.ta_lambda} if method == "task_arithmetic"
                       else {"density": m.ties_density, "lam": m.ties_lambda})
            merge_hf(base, experts, folder, method, **options)
            _mark_done(folder)
        out[f"merged:{tag}"] = folder
    return out


def train_seqroute(cfg, root: str, router: str, experts: List[str], pool: List[W.Task]) -> str:
    """SharedTrunkNet over the trained lineup: labelled training prompts -> labels of every
    target (each expert alone, FusionRoute) -> layer probes -> trunk (fr_jax.baselines)."""
    workdir = os.path.join(root, "seqroute")
    trunk_dir = os.path.join(workdir, "trunk")
    if _done(workdir):
        return trunk_dir
    lineup = load_world_lineup(router, experts)
    tasks = W.labelled_records(pool, cfg.world.n_labelled, cfg.train.seed)
    report = S.build(lineup, tasks, cfg.seqroute, workdir,
                     ("router", lineup.router.cfg, lineup.params["router"]["backbone"]),
                     W.score, progress=cfg.demo.progress,
                     lazy=True)  # the costs of decode's default schedule (same tokens)
    m = report["metrics"]
    _log(cfg, f"[seqroute] layer {report['layer'] + 1} chosen by the probes; held-out routed "
              f"accuracy {100 * m['accuracy']:.1f}% (best single {m['best_single']} "
              f"{100 * m['best_single_accuracy']:.1f}%, oracle {100 * m['oracle']:.1f}%)")
    _mark_done(workdir)
    return trunk_dir


def evaluate(cfg, lineup, tests: List[W.Task], workdir: str = None) -> dict:
    """Every configured mode on every domain's held-out prompts, through the evaluation
    harness (benchmark `toy`, one column per domain; cached under `workdir` when given)
    -> the results dict."""
    s = harness.Settings(max_new_tokens={"toy": cfg.eval.max_new_tokens.toy}, workdir=workdir,
                         batch_size=cfg.eval.batch_size, progress=cfg.demo.progress,
                         columns=cfg.eval.columns)
    results = harness.evaluate(lineup, {"toy": toy_examples(tests)}, list(cfg.eval.modes), s)
    results["n_test"] = cfg.world.n_test
    return results


def _tensorboard(results: dict, logdir: str):
    w = summary_writer(logdir)
    for mode, acc in results["accuracy"].items():
        tag = mode.replace(":", "_")  # a tag holds no ':' (TensorBoard would rename it)
        for d, v in acc.items():
            w.add_scalar(f"eval/{d}/{tag}", v, 0)
        w.add_scalar(f"eval/average/{tag}", results["average"][mode], 0)
    for mode, per in results.get("speculation", {}).items():
        tag = mode.replace(":", "_")
        for d, v in per.items():  # decode.speculate: what the drafts saved, per domain
            w.add_scalar(f"speculation/{d}/{tag}/tokens_per_pass", v["tokens_per_pass"], 0)
            w.add_scalar(f"speculation/{d}/{tag}/acceptance", v["acceptance"], 0)
    w.add_text("results", report.markdown(results), 0)
    w.close()


def bundle(paths: Dict[str, str], results: dict, cfg, target: str):
    """Copies the trained router, its pretrained base, the experts and their base, the
    baselines (TIES-merged model, fine-tuned model, SharedTrunkNet) and the results table
    to `target`, with a manifest of file hashes."""
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.makedirs(target)
    single = [(k, paths[k]) for k in ("router", "router_base", "base", "merged", "finetuned",
                                      "seqroute")]
    for name, src in single + [(x, p) for x, p in zip(W.DOMAINS, paths["experts"])]:
        shutil.copytree(src, os.path.join(target, name),
                        ignore=shutil.ignore_patterns("DONE"))
    write_world(cfg, target)
    with open(os.path.join(target, "results.json"), "w") as f:
        json.dump({k: results[k] for k in ("domains", "modes", "expert_names", "n_test",
                                           "accuracy", "average", "shares")}, f, indent=1,
                  sort_keys=True)
    manifest = {}
    for dirpath, _, files in sorted(os.walk(target)):
        for fn in sorted(files):
            p = os.path.join(dirpath, fn)
            with open(p, "rb") as f:
                manifest[os.path.relpath(p, target)] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(target, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def train_world(cfg, root: str, mark=lambda name, since: time.perf_counter()):
    """Steps 1-3: the world's data, the two bases and the experts (adopted from
    cfg.demo.start_from where it names a bundled world), under `root`, which then also holds a
    world.json: another run can start from it. mark(step name, its start time) is called
    after each step. Returns (data paths, base, router base, expert folders)."""
    t = time.perf_counter()
    tokenizer = W.build_tokenizer()
    data = make_data(cfg, root)
    inits = init_models(cfg, root, tokenizer)
    if cfg.demo.start_from:
        adopt_trained(cfg, root, tokenizer)
    t = mark("world", t)
    base = train_lm(cfg, root, "base", inits["base"], data["base"], cfg.demo.base)
    router_base = train_lm(cfg, root, "router_base", inits["router"], data["base"],
                           cfg.demo.router_base)
    t = mark("base models", t)
    experts = [train_lm(cfg, root, f"experts/{x}", base, data[f"expert_{x}"],
                        _expert_budget(cfg, x)) for x in W.DOMAINS]
    mark("experts", t)
    write_world(cfg, root)
    return data, base, router_base, experts


def run_pipeline(cfg) -> dict:
    """The whole pipeline; returns the results dict (also written under train.workdir)."""
    check_demo(cfg)  # every setting, and where it writes, before any work
    t0 = time.perf_counter()
    root = os.path.abspath(cfg.train.workdir)
    os.makedirs(root, exist_ok=True)
    # Seconds spent in each step summed over every invocation of this run: a resumed run
    # reports what its steps cost in all, not the ~0 s of skipping them the second time.
    timings_file = os.path.join(root, "timings.json")
    spent = {}
    if os.path.isfile(timings_file):
        with open(timings_file) as f:
            spent = json.load(f)
    timings = {}

    def mark(name, since):
        now = round(time.perf_counter() - since, 1)
        timings[name] = round(spent.get(name, 0.0) + now, 1)
        _log(cfg, f"[demo] {name} done in {now:.0f} s")
        record.write_json(timings_file, {**spent, **timings})
        return time.perf_counter()

    data, base, router_base, experts = train_world(cfg, root, mark)
    t = time.perf_counter()
    sft_router = train_router_stage(cfg, root, "sft", router_base, experts,
                                    sft_path=data["sft"])
    t = mark("router SFT", t)
    pool = read_tasks(data["train_pool"])
    pref = preference_pairs(cfg, root, sft_router, experts, pool)
    t = mark("preference pairs", t)
    # CDPO's SFT term (train.cdpo.sft_weight) reads stage 1's data.
    router = train_router_stage(cfg, root, "cdpo", sft_router, experts, pref_path=pref,
                                sft_path=data["sft"] if cfg.train.cdpo.sft_weight else "")
    t = mark("router CDPO", t)
    if cfg.demo.baselines:
        finetuned = train_lm(cfg, root, "finetuned", base, data["sft"], cfg.train.sft)
        t = mark("fine-tuned baseline", t)
        merged = merged_models(cfg, root, base, experts)
        t = mark("merged baselines", t)
        trunk = train_seqroute(cfg, root, router, experts, pool)
        t = mark("sequence-level router (SharedTrunkNet)", t)
        lineup = load_world_lineup(router, experts, {"finetuned": finetuned, **merged},
                                   seqroute=trunk)
    else:
        lineup = load_world_lineup(router, experts)
    lineup.speculate = cfg.decode.speculate  # the same answers; its acceptance is reported
    results = evaluate(cfg, lineup, read_tasks(data["test"]), os.path.join(root, "eval"))
    t = mark("evaluation", t)
    results["timings_s"] = dict(timings, total=round(sum(timings.values()), 1))
    results["wall_s"] = round(time.perf_counter() - t0, 1)  # this invocation's
    results["seed"] = cfg.train.seed
    paths = report.write(results, root)
    _tensorboard(results, os.path.join(root, "tensorboard", "eval"))
    if cfg.demo.bundle:
        bundle({"router": router, "router_base": router_base, "experts": experts,
                "base": base, "merged": merged["merged:ties"], "finetuned": finetuned,
                "seqroute": trunk}, results, cfg, cfg.demo.bundle)
        _log(cfg, f"[demo] bundled the trained world in {cfg.demo.bundle}")
    print("\n" + report.markdown(results), flush=True)  # the product: always shown
    print(f"[demo] total {results['timings_s']['total']:.0f} s; wrote "
          f"{', '.join(paths.values())}; TensorBoard (the viewer: pip install -e "
          f"\".[tensorboard]\"): tensorboard --logdir {root}", flush=True)
    return results
