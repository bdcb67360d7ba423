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


def markdown(results: dict) -> str:
    """The accuracy table (modes x domains, plus the average) and the token shares."""
    domains, names = results["domains"], results["expert_names"]
    head = "| mode | " + " | ".join(domains) + " | average |"
    lines = [head, "|" + "---|" * (len(domains) + 2)]
    for mode in results["modes"]:
        acc = results["accuracy"][mode]
        cells = [f"{100 * acc[d]:.1f}" for d in domains] + [f"{100 * results['average'][mode]:.1f}"]
        lines.append(f"| {mode_label(mode, names)} (`{mode}`) | " + " | ".join(cells) + " |")
    out = ["Exact-match accuracy (%) on held-out prompts, "
           f"{results['n_test']} per domain, greedy decoding.", "", *lines]
    shares = results.get("shares", {}).get("fusionroute")
    if shares:
        out += ["", "Share of FusionRoute's generated tokens (%) by the expert selected "
                "for them, per domain:", "",
                "| domain | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for d in domains:
            out.append(f"| {d} | " + " | ".join(f"{100 * shares[d][n]:.1f}" for n in names)
                       + " |")
    return "\n".join(out) + "\n"


def plot(results: dict, path: str):
    """Accuracy bars per mode and domain; FusionRoute's routing share per domain."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains, modes, names = results["domains"], results["modes"], results["expert_names"]
    shares = results.get("shares", {}).get("fusionroute")
    fig, axes = plt.subplots(1, 2 if shares else 1, figsize=(15 if shares else 10, 4.8),
                             gridspec_kw={"width_ratios": [3, 1]} if shares else None)
    ax = axes[0] if shares else axes
    width = 0.8 / len(modes)
    x = np.arange(len(domains) + 1)
    cmap = plt.get_cmap("tab10")
    for j, mode in enumerate(modes):
        vals = [results["accuracy"][mode][d] for d in domains] + [results["average"][mode]]
        ax.bar(x + (j - (len(modes) - 1) / 2) * width, np.array(vals) * 100, width,
               label=mode_label(mode, names), color=cmap(j % 10),
               edgecolor="black" if mode == "fusionroute" else None)
    ax.set_xticks(x, list(domains) + ["average"])
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy per decode mode and domain")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(0, -0.08))
    if shares:
        ax2 = axes[1]
        bottom = np.zeros(len(domains))
        for i, n in enumerate(names):
            vals = np.array([shares[d][n] for d in domains]) * 100
            ax2.bar(domains, vals, bottom=bottom, label=n, color=cmap(i))
            bottom += vals
        ax2.set_ylabel("share of tokens (%)")
        ax2.set_title("FusionRoute: expert per token")
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
