"""The router-training ablation in the demo world (configs/ablation.py): which reading of
stage 1 and CDPO makes the complementary logits complement the experts.

One shared world (the experts and their base, trained once or adopted from a bundled
world), then per variant and seed one router run of the demo pipeline with its baselines
off (world data, router SFT, preference pairs, CDPO, the harness on `modes`), each in its
own folder: <workdir>/runs/<variant>/seed<k>. A finished run (its results.json) is read
back, never re-run; an interrupted one resumes in the pipeline's own steps. The table:
<workdir>/ablation.{json,md}, variant x mode x domain, mean and standard deviation over
the seeds, and each variant's router training time.
"""

from __future__ import annotations

import ast
import json
import os
import runpy
import statistics
from typing import Dict, List

import ml_collections

from fr_jax.config import default_config_file, nested
from fr_jax.harness import toy_world as W
from fr_jax.loop import record
from fr_jax.runtime.errors import ConfigError
from fr_jax.toy import pipeline as P

# The router's share of a run's wall time: what a variant costs to train ("base models":
# a router of a size no bundled base has gets its base pretrained in the run).
ROUTER_STEPS = ("base models", "router SFT", "preference pairs", "router CDPO")
# The default is chosen by this rule (docs/training.md): the highest FusionRoute average
# among the variants that lose at most this much on any skill domain against expert_only.
SKILL_TOLERANCE = 0.01


def _update(node, changes, where: str):
    """Writes the nested `changes` into the ConfigDict `node`; an unknown field is refused
    by name (a typo must not run as the unchanged default)."""
    for key, value in changes.items():
        if key not in node:
            raise ConfigError(f"{where}.{key} is not a field of configs/demo.py")
        if isinstance(value, ml_collections.ConfigDict):
            _update(node[key], value, f"{where}.{key}")
            continue
        try:
            node[key] = value
        except TypeError as e:
            raise ConfigError(f"{where}.{key}={value!r}: {e}") from None


def _parse_common(items) -> ml_collections.ConfigDict:
    """`common`'s "dotted.field=value" strings -> nested changes (values read as Python
    literals, else kept as text: train.sft.lm_target=fused)."""
    fields = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"common: {item!r} is not written field=value")
        try:
            fields[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            fields[key.strip()] = text.strip()
    return nested(fields)


def _common_config(cfg):
    """configs/demo.py:<cfg.demo> with `common` applied: what every run starts from."""
    c = runpy.run_path(default_config_file("demo.py"))["get_config"](cfg.demo)
    _update(c, _parse_common(cfg.common), "common")
    return c


def demo_config(cfg, variant: str, seed: int):
    """The demo config of one run: configs/demo.py:<cfg.demo>, `common`, the variant."""
    if variant not in cfg.definitions:
        raise ConfigError(f"unknown variant {variant!r}; defined: "
                          f"{', '.join(cfg.definitions.keys())}")
    c = _common_config(cfg)
    _update(c, cfg.definitions[variant], f"definitions.{variant}")
    c.train.seed, c.demo.progress, c.demo.baselines = seed, cfg.progress, False
    c.eval.modes = tuple(cfg.modes)
    c.demo.bundle = ""
    c.train.workdir = os.path.join(os.path.abspath(cfg.workdir), "runs", variant, f"seed{seed}")
    return c


def shared_world(cfg) -> str:
    """The folder every run adopts its experts (and router base, where sizes match) from:
    the demo config's `demo.start_from` when it names one, else a world trained here once
    (the pipeline's first steps, world seed and budgets of `common`, seed 0)."""
    c = _common_config(cfg)
    if c.demo.start_from:
        return c.demo.start_from
    root = os.path.join(os.path.abspath(cfg.workdir), "shared")
    c.train.workdir, c.train.seed, c.demo.progress = root, 0, cfg.progress
    P.train_world(c, root)
    return root


def _stats(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(cfg, runs: Dict[str, List[dict]]) -> dict:
    """Per variant: accuracy and average of every mode (mean, std, per-seed values), the
    router's training time, and whether it keeps every skill domain within
    SKILL_TOLERANCE of expert_only; plus the variant the rule picks."""
    out = {"demo": cfg.demo, "seeds": list(cfg.seeds), "modes": list(cfg.modes),
           "domains": list(W.EVAL_DOMAINS), "variants": {}}
    for name, results in runs.items():
        v = {"changes": cfg.definitions[name].to_dict(), "accuracy": {}, "average": {}}
        for mode in cfg.modes:
            v["accuracy"][mode] = {d: _stats([r["accuracy"][mode][d] for r in results])
                                   for d in W.EVAL_DOMAINS}
            v["average"][mode] = _stats([r["average"][mode] for r in results])
        v["router_time_s"] = _stats([sum(r["timings_s"].get(k, 0.0) for k in ROUTER_STEPS)
                                     for r in results])
        if {"fusionroute", "expert_only"} <= set(cfg.modes):
            fr, eo = v["accuracy"]["fusionroute"], v["accuracy"]["expert_only"]
            v["keeps_skills"] = all(fr[d]["mean"] >= eo[d]["mean"] - SKILL_TOLERANCE
                                    for d in W.DOMAINS)
        out["variants"][name] = v
    eligible = [n for n, v in out["variants"].items() if v.get("keeps_skills")]
    out["pick"] = max(eligible, key=lambda n: out["variants"][n]["average"]["fusionroute"]
                      ["mean"]) if eligible else None
    return out


def _cell(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def markdown(summary: dict) -> str:
    """FusionRoute's accuracy per variant and domain (mean ± sd over seeds, %), the other
    modes' averages, the router's training time; the picked variant in bold."""
    doms, modes = summary["domains"], summary["modes"]
    others = [m for m in modes if m != "fusionroute"]
    head = (["variant"] + [f"fusionroute {d}" for d in doms] + ["fusionroute average"] +
            [f"{m} average" for m in others] + ["keeps skills", "router training (s)"])
    lines = [f"Router-training ablation ({summary['demo']} demo world; exact match, %, mean ± "
             f"sd over seeds {', '.join(map(str, summary['seeds']))})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in summary["variants"].items():
        acc = v["accuracy"].get("fusionroute")
        row = [f"**{name}**" if name == summary.get("pick") else name]
        row += [_cell(acc[d]) for d in doms] if acc else ["-"] * len(doms)
        row += [_cell(v["average"]["fusionroute"]) if acc else "-"]
        row += [_cell(v["average"][m]) for m in others]
        row += [{True: "yes", False: "no"}.get(v.get("keeps_skills"), "-"),
                f"{v['router_time_s']['mean']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    pick = summary.get("pick")
    lines += ["", f"Picked by the rule (highest FusionRoute average among the variants within "
                  f"{100 * SKILL_TOLERANCE:.0f} point of expert_only on every skill domain): "
                  f"{pick or 'none qualifies'}"]
    return "\n".join(lines) + "\n"


def run_ablation(cfg) -> dict:
    """Every variant x seed (finished runs are read back), then the summary, written to
    <workdir>/ablation.{json,md} and returned."""
    if not cfg.seeds or not cfg.variants:
        raise ConfigError("the ablation needs at least one seed and one variant")
    for name in cfg.variants:  # every run's config is checked before the first one trains
        for seed in cfg.seeds:
            demo_config(cfg, name, seed)
    start_from = shared_world(cfg)
    runs: Dict[str, List[dict]] = {}
    for name in cfg.variants:
        runs[name] = []
        for seed in cfg.seeds:
            c = demo_config(cfg, name, seed)
            done = os.path.join(c.train.workdir, "results.json")
            if not os.path.isfile(done):
                c.demo.start_from = start_from
                print(f"[ablation] {name}, seed {seed}", flush=True)
                P.run_pipeline(c)
            with open(done) as f:
                runs[name].append(json.load(f))
    summary = summarise(cfg, runs)
    root = os.path.abspath(cfg.workdir)
    record.write_json(os.path.join(root, "ablation.json"), summary)
    text = markdown(summary)
    with open(os.path.join(root, "ablation.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    return summary
