"""Results tables: accuracy per (mode, domain), routing shares; written as JSON, Markdown
and a PNG chart."""

from __future__ import annotations

import json
import os
from typing import Dict, Sequence

MODE_LABELS = {  # how the table names the modes
    "router_only": "router alone", "expert_only": "token routing, expert only",
    "sequence": "sequence-level routing, SharedTrunkNet",
    "sequence:head": "sequence-level routing, routing head averaged", "mixture": "soft mixture",
    "merged:ta": "merged, task arithmetic", "merged:ties": "merged, TIES",
    "merged": "merged experts", "fusionroute": "FusionRoute",
    "finetuned": "fine-tuned on all domains", "oracle": "oracle: per-prompt best expert"}


def mode_label(mode: str, expert_names: Sequence[str]) -> str:
    if mode.startswith("expert:"):
        i = int(mode.split(":")[1])
        return f"{expert_names[i]} expert alone" if i < len(expert_names) else mode
    return MODE_LABELS.get(mode, mode)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def markdown(results: dict) -> str:
    """The accuracy table (modes x columns, plus the average) and the routing shares of
    the modes in results["share_modes"] (default: FusionRoute)."""
    domains, names = results["domains"], results["expert_names"]
    titles = results.get("titles", {})
    head = "| mode | " + " | ".join(titles.get(d, d) for d in domains) + " | average |"
    lines = [head, "|" + "---|" * (len(domains) + 2)]
    for mode in results["modes"]:
        acc = results["accuracy"][mode]
        cells = [_pct(acc[d]) for d in domains] + [_pct(results["average"][mode])]
        lines.append(f"| {mode_label(mode, names)} (`{mode}`) | " + " | ".join(cells) + " |")
    caption = results.get("caption") or ("Exact-match accuracy (%) on held-out prompts, "
                                         f"{results['n_test']} per domain, greedy decoding.")
    out = [caption, "", *lines]
    for mode in results.get("share_modes", ["fusionroute"]):
        shares = results.get("shares", {}).get(mode)
        if not shares:
            continue
        who = "FusionRoute" if mode == "fusionroute" else f"`{mode}`"
        out += ["", f"Share of {who}'s generated tokens (%) by the expert selected "
                "for them, per " + results.get("column_kind", "domain") + ":", "",
                "| " + results.get("column_kind", "domain") + " | " + " | ".join(names) + " |",
                "|" + "---|" * (len(names) + 1)]
        for d in domains:
            out.append(f"| {titles.get(d, d)} | "
                       + " | ".join(f"{100 * shares[d][n]:.1f}" for n in names) + " |")
    for note in results.get("notes", []):
        out += ["", note]
    return "\n".join(out) + "\n"


def plot(results: dict, path: str):
    """Accuracy bars per mode and column (domain or benchmark); the routing share per
    column of the first of results["share_modes"] (default: FusionRoute)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains, modes, names = results["domains"], results["modes"], results["expert_names"]
    share_mode = (results.get("share_modes") or ["fusionroute"])[0]
    shares = results.get("shares", {}).get(share_mode)
    fig, axes = plt.subplots(1, 2 if shares else 1, figsize=(15 if shares else 10, 4.8),
                             gridspec_kw={"width_ratios": [3, 1]} if shares else None)
    ax = axes[0] if shares else axes
    width = 0.8 / len(modes)
    x = np.arange(len(domains) + 1)
    cmap = plt.get_cmap("tab10")
    for j, mode in enumerate(modes):
        vals = [results["accuracy"][mode][d] for d in domains] + [results["average"][mode]]
        vals = [np.nan if v is None else v for v in vals]
        ax.bar(x + (j - (len(modes) - 1) / 2) * width, np.array(vals) * 100, width,
               label=mode_label(mode, names), color=cmap(j % 10),
               edgecolor="black" if mode == "fusionroute" else None)
    titles = results.get("titles", {})
    ax.set_xticks(x, [titles.get(d, d) for d in domains] + ["average"])
    ax.set_ylabel(results.get("metric_label", "exact match (%)"))
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy per decode mode and " + results.get("column_kind", "domain"))
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(0, -0.08))
    if shares:
        ax2 = axes[1]
        bottom = np.zeros(len(domains))
        for i, n in enumerate(names):
            vals = np.array([shares[d][n] for d in domains]) * 100
            ax2.bar([titles.get(d, d) for d in domains], vals, bottom=bottom, label=n,
                    color=cmap(i))
            bottom += vals
        ax2.set_ylabel("share of tokens (%)")
        ax2.set_title(("FusionRoute" if share_mode == "fusionroute" else share_mode)
                      + ": expert per token")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, outdir: str, stem: str = "results") -> Dict[str, str]:
    """results.json, results.md and results.png under `outdir`; returns their paths."""
    os.makedirs(outdir, exist_ok=True)
    paths = {k: os.path.join(outdir, f"{stem}.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    plot(results, paths["png"])
    return paths
