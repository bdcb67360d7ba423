"""The router-training ablation in the demo world (configs/ablation.py): which reading of
stage 1 and CDPO makes the complementary logits complement the experts.

One shared world (the experts and their base, trained once or adopted from a bundled
world), then per variant and seed one router run of the demo pipeline with its baselines
off (world data, router SFT, preference pairs, CDPO, the harness on `modes`), each in its
own folder: <workdir>/runs/<variant>/seed<k>. A finished run (its results.json) is read
back, never re-run; an interrupted one resumes in the pipeline's own steps. The table:
<workdir>/ablation.{json,md}, variant x mode x domain, mean and standard deviation over
the seeds, and each variant's router training time. With baseline modes among `modes`
(the scale sweep, configs/ablation.py:scale) the runs train the demo's baselines too and
the summary adds FusionRoute's margin over the best of them per variant and seed, with
each variant's router and expert sizes: <workdir>/scale.{md,png}.
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
from fr_jax.toy.checks import needs_baseline

# The router's share of a run's wall time: what a variant costs to train ("base models":
# a router of a size no bundled base has gets its base pretrained in the run).
ROUTER_STEPS = ("base models", "router SFT", "preference pairs", "router CDPO")
# The default is chosen by this rule (docs/training.md): the highest FusionRoute average
# among the variants that lose at most this much on any skill domain against expert_only
# (a tie: the smaller spread over the seeds).
SKILL_TOLERANCE = 0.01
# The baselines FusionRoute's margin is taken over (the best of those in `modes`, per seed).
MARGIN_OVER = ("finetuned", "sequence", "expert_only")



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
    c.train.seed, c.demo.progress = seed, cfg.progress
    c.demo.baselines = any(needs_baseline(m) for m in cfg.modes)
    c.eval.modes = tuple(cfg.modes)
    c.demo.bundle = ""
    c.train.workdir = os.path.join(os.path.abspath(cfg.workdir), "runs", variant, f"seed{seed}")
    return c


def shared_world(cfg, variant: str) -> str:
    """The folder a variant's runs adopt their experts (and router base, where sizes match)
    from: the demo config's `demo.start_from` when it names one whose experts have the
    variant's shape, else a world trained here once per expert shape (the pipeline's first
    steps, world seed and budgets of `common` and the variant, seed 0):
    <workdir>/shared, or <workdir>/shared-<layers>x<hidden> for experts of another size
    than the demo's."""
    c = demo_config(cfg, variant, 0)
    if c.demo.start_from and P.experts_fit(c, c.demo.start_from):
        return c.demo.start_from
    e, default = c.demo.expert_model, _common_config(cfg).demo.expert_model
    same = e.to_dict() == default.to_dict()
    name = "shared" if same else f"shared-{e.num_layers}x{e.hidden_size}"
    root = os.path.join(os.path.abspath(cfg.workdir), name)
    if not os.path.isfile(os.path.join(root, "world.json")):
        c.demo.start_from, c.train.workdir, c.demo.progress = "", root, cfg.progress
        print(f"[ablation] training the experts of {variant} once, in {root}", flush=True)
        P.train_world(c, root)
    return root


def model_size(m) -> int:
    """Parameters of a demo model section (demo.router_model / demo.expert_model)."""
    return P.parameter_count(m, W.build_tokenizer())


def _stats(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _margin(results: List[dict], over: List[str]) -> dict:
    """FusionRoute's average minus the best of the baselines `over`, per seed (each seed
    against its own best), with which baseline that was."""
    best = [max(over, key=lambda m: r["average"][m]) for r in results]
    out = _stats([r["average"]["fusionroute"] - r["average"][b] for r, b in zip(results, best)])
    out["best_baseline"] = best
    return out


def summarise(cfg, runs: Dict[str, List[dict]], sizes: Dict[str, dict] = None) -> dict:
    """Per variant: accuracy and average of every mode (mean, std, per-seed values), the
    router's training time, and whether it keeps every skill domain within
    SKILL_TOLERANCE of expert_only; plus the variant the rule picks. With baselines among
    the modes, each variant's FusionRoute margin over the best of MARGIN_OVER (per seed);
    `sizes` {variant: {"router": params, "experts": params}} is recorded as given."""
    out = {"demo": cfg.demo, "seeds": list(cfg.seeds), "modes": list(cfg.modes),
           "domains": list(W.EVAL_DOMAINS), "variants": {}}
    over = [m for m in MARGIN_OVER if m in cfg.modes]
    for name, results in runs.items():
        v = {"changes": cfg.definitions[name].to_dict(), "accuracy": {}, "average": {}}
        if sizes and name in sizes:
            v["parameters"] = sizes[name]
        if "fusionroute" in cfg.modes and {"finetuned", "sequence"} & set(over):
            v["margin"] = _margin(results, over)
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
    out["pick"] = min(eligible, key=lambda n: _rank(out["variants"][n])) if eligible else None
    return out


def _rank(v: dict):
    """The rule's order: the higher FusionRoute average first; equal averages (the same
    count of correct answers, whatever the float rounding) by the smaller spread."""
    avg = v["average"]["fusionroute"]
    return (-round(avg["mean"], 9), round(avg["std"], 9))


def _head_rows(head: List[str]) -> List[str]:
    """A markdown table's header and rule rows."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


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
             *_head_rows(head)]
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
                  f"{100 * SKILL_TOLERANCE:.0f} point of expert_only on every skill domain; a "
                  f"tie to the smaller spread): {pick or 'none qualifies'}"]
    return "\n".join(lines) + "\n"


def scale_markdown(summary: dict) -> str:
    """The scale sweep's table: per variant its sizes, FusionRoute's and each baseline's
    average and FusionRoute's margin over the best baseline (mean ± sd over seeds, points)."""
    over = [m for m in MARGIN_OVER if m in summary["modes"]]
    head = (["variant", "router params", "expert params", "fusionroute"] + over +
            ["FusionRoute − best baseline", "best baseline (per seed)"])
    lines = [f"FusionRoute against the best baseline by size ({summary['demo']} demo world; "
             f"average exact match, %, mean ± sd over seeds "
             f"{', '.join(map(str, summary['seeds']))})", "",
             *_head_rows(head)]
    for name, v in summary["variants"].items():
        if "margin" not in v:
            continue
        size = v.get("parameters", {})
        row = [name, f"{size.get('router', 0):,}", f"{size.get('experts', 0):,}"]
        row += [_cell(v["average"][m]) for m in ["fusionroute"] + over]
        row += [_cell(v["margin"]), " / ".join(v["margin"]["best_baseline"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def claim_markdown(summary: dict, runs: Dict[str, List[dict]], variant: str) -> str:
    """One variant's claim table: every mode's exact match per domain (mean ± sd over the
    seeds), then FusionRoute minus each other mode, per domain and seed (mean ± sd, and
    on how many seeds it is above)."""
    doms, results = summary["domains"] + ["average"], runs[variant]
    value = lambda r, m, d: r["average"][m] if d == "average" else r["accuracy"][m][d]
    head = ["mode"] + doms
    lines = [f"{variant}: exact match (%) and FusionRoute's margin (points), mean ± sd over "
             f"seeds {', '.join(map(str, summary['seeds']))} ({summary['demo']} demo world)",
             "", *_head_rows(head)]
    for m in summary["modes"]:
        lines.append("| " + " | ".join([f"`{m}`"] + [_cell(_stats([value(r, m, d)
                                                                   for r in results]))
                                                     for d in doms]) + " |")
    for m in summary["modes"]:
        if m == "fusionroute":
            continue
        cells = []
        for d in doms:
            diffs = [value(r, "fusionroute", d) - value(r, m, d) for r in results]
            above = sum(x > 0 for x in diffs)
            cells.append(f"{_cell(_stats(diffs))} ({above}/{len(diffs)} above)")
        lines.append("| " + " | ".join([f"FusionRoute − `{m}`"] + cells) + " |")
    return "\n".join(lines) + "\n"


def scale_plot(summary: dict, path: str):
    """FusionRoute's margin over the best baseline against the router's parameters (mean
    and sd over seeds): one line for the bundled experts, a point per other expert size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_experts: Dict[int, list] = {}
    for name, v in summary["variants"].items():
        if "margin" in v and "parameters" in v:
            by_experts.setdefault(v["parameters"]["experts"], []).append(
                (v["parameters"]["router"], 100 * v["margin"]["mean"],
                 100 * v["margin"]["std"], name))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for experts, points in sorted(by_experts.items()):
        points.sort()
        ax.errorbar([p[0] for p in points], [p[1] for p in points],
                    yerr=[p[2] for p in points], marker="o", capsize=3,
                    label=f"experts of {experts:,} parameters")
        for x, y, _, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="router parameters",
           ylabel="FusionRoute − best baseline (points)",
           title="Margin over the best baseline by size (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finished(path: str, modes) -> dict:
    """A run's results.json when it has every mode in `modes`, else None (a run of the
    ablation read by the scale sweep has no baselines yet: it is finished, not retrained)."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    return results if set(modes) <= set(results["accuracy"]) else None


# What a kept run's record must match to stand for the run (the variant's changes, what
# every run shares, the world): a record of another definition is not read back.
def _identity(cfg, variant: str) -> dict:
    return {"demo": cfg.demo, "common": list(cfg.common),
            "changes": cfg.definitions[variant].to_dict()}


def _kept_path(cfg, variant: str, seed: int) -> str:
    return os.path.join(cfg.results_dir, cfg.demo or "full", "runs", variant, f"seed{seed}.json")


def kept_run(cfg, variant: str, seed: int) -> dict:
    """A finished run's results from `results_dir` (the evidence kept in the repository,
    read back like a finished run's folder) when recorded for this very definition and
    with every mode in `modes`, else None."""
    if not cfg.results_dir:
        return None
    path = _kept_path(cfg, variant, seed)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record_ = json.load(f)
    if record_.get("identity") != _identity(cfg, variant):
        return None
    results = record_["results"]
    return results if set(cfg.modes) <= set(results["accuracy"]) else None


def keep_run(cfg, variant: str, seed: int, results: dict):
    """Writes a finished run's results (every mode, per domain, its timings) to
    `results_dir`, with what defined it."""
    if cfg.results_dir:
        keep = {k: results[k] for k in ("domains", "modes", "accuracy", "average", "shares",
                                        "n_test", "timings_s", "seed") if k in results}
        record.write_json(_kept_path(cfg, variant, seed),
                          {"identity": _identity(cfg, variant), "results": keep})


def run_ablation(cfg) -> dict:
    """Every variant x seed (finished runs are read back), then the summary, written to
    <workdir>/ablation.{json,md} (and scale.{md,png} with baselines) and returned; with
    `results_dir`, each run's results and the tables are kept there too (and a run kept
    there for the same definition is read back, not retrained)."""
    if not cfg.seeds or not cfg.variants:
        raise ConfigError("the ablation needs at least one seed and one variant")
    for name in cfg.variants:  # every run's config is checked before the first one trains
        for seed in cfg.seeds:
            demo_config(cfg, name, seed)
    runs: Dict[str, List[dict]] = {}
    sizes: Dict[str, dict] = {}
    for name in cfg.variants:
        runs[name] = []
        start_from = None
        for seed in cfg.seeds:
            c = demo_config(cfg, name, seed)
            done = os.path.join(c.train.workdir, "results.json")
            results = _finished(done, cfg.modes) or kept_run(cfg, name, seed)
            if results is None:
                start_from = start_from or shared_world(cfg, name)
                c.demo.start_from = start_from
                print(f"[ablation] {name}, seed {seed}", flush=True)
                P.run_pipeline(c)
                results = _finished(done, cfg.modes)
            keep_run(cfg, name, seed, results)
            runs[name].append(results)
        sizes[name] = {"router": model_size(c.demo.router_model),
                       "experts": model_size(c.demo.expert_model)}
    summary = summarise(cfg, runs, sizes)
    stem = "scale" if any("margin" in v for v in summary["variants"].values()) else "ablation"
    text = markdown(summary)
    if stem == "scale":
        text += "\n" + scale_markdown(summary)
        text += "".join("\n" + claim_markdown(summary, runs, name) for name in runs)
    roots = [os.path.abspath(cfg.workdir)] + (
        [os.path.join(cfg.results_dir, cfg.demo or "full")] if cfg.results_dir else [])
    for root in roots:
        record.write_json(os.path.join(root, f"{stem}.json"), summary)
        if stem == "scale":
            scale_plot(summary, os.path.join(root, "scale.png"))
        with open(os.path.join(root, f"{stem}.md"), "w") as f:
            f.write(text)
    print("\n" + text, flush=True)
    return summary
