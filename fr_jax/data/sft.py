"""`python -m fr_jax.data.sft`: the router's stage-1 SFT mixture, built from a recipe.

    python -m fr_jax.data.sft                      # configs/data/three_domains.py (hub data)
    python -m fr_jax.data.sft --config=configs/data/three_domains.py \\
        --config.sources.gsm8k.path=/data/gsm8k/train.jsonl \\
        --config.decontaminate.data.gsm8k.path=/data/gsm8k/test.jsonl \\
        --output=data/sft_mixed.jsonl --seed=1

The recipe is checked here, every field before any data is read (`read_recipe`); then its
sources (hub names or local files in their upstream formats) are mapped to chat examples,
deduplicated, decontaminated against the evaluation benchmarks' test sets, sampled to
their targets and shuffled (fr_jax.datagen.mixture). Writes the JSONL (what
`data.sft_path` points stage `sft` at) and <output stem>.manifest.json beside it, and
prints what happened to each source. Without network, point every source's and
benchmark's `path` at a local copy.
"""

from __future__ import annotations

import os
from typing import List

from fr_jax import cli
from fr_jax.config import check_ranges
from fr_jax.datagen import mixture as M
from fr_jax.harness import benchmarks as B
from fr_jax.runtime.errors import ConfigError, DataError

COMMAND = cli.Command("data.sft", "data/three_domains.py", (
    cli.Flag("output", "output", "the mixture JSONL to write (the manifest goes beside it)"),
    cli.Flag("seed", "seed", "sampling and shuffling seed", "integer"),
), devices=False,
    doc="docs/real-models.md")
RANGES = {"seed": (0, None), "total": (0, None), "dedup.near_threshold": ("(0", 1),
          "dedup.shingle": (1, None), "dedup.num_perm": (1, None), "dedup.bands": (1, None),
          "decontaminate.ngram": (1, None)}
# Every recipe field the builder reads (configs/data/three_domains.py documents them).
FIELDS = ("output", "seed", "format", "total", "progress", "sources", "dedup.exact",
          "dedup.near", "dedup.near_threshold", "dedup.shingle", "dedup.num_perm",
          "dedup.bands", "decontaminate.benchmarks", "decontaminate.data",
          "decontaminate.ngram")
# Manifest count -> table column.
COLUMNS = {"read": "read", "dropped": "dropped", "exact_duplicates": "exact dup",
           "near_duplicates": "near dup", "contaminated": "contaminated",
           "available": "available", "target": "target", "kept": "kept", "short": "short"}


def _source_problem(s: M.Source, key: str) -> str:
    """What is wrong with a source's settings ("" if nothing)."""
    if not s.domain:
        return "domain is empty: name the domain it trains (math, code or instr)"
    if not (s.hub or s.path):
        return (f"neither hub nor path is set; set --config.{key}.path=<local copy in its "
                f"upstream format> or --config.{key}.hub=<owner/name[:subset[:split]]>")
    templates = (s.prompt, s.response)
    if (any(templates) if s.messages else not all(templates)):
        return "set either both prompt and response templates, or messages (a chat field)"
    if any(r not in M.ROLES for r in s.roles.values()):
        return f"roles must map upstream role names to {', '.join(M.ROLES)}"
    if s.count < 0 or not 0 <= s.weight < float("inf"):
        return "count and weight must be >= 0"
    for fld, t in s.transforms.items():
        if t not in M.TRANSFORMS:
            return (f"transforms.{fld}: unknown transform {t!r}; choose from "
                    f"{', '.join(M.TRANSFORMS)}")
        if s.messages or fld not in M.source_fields(s):
            return f"transforms.{fld}: no template reads {{{fld}}} (transforms apply to those)"
    return ""


def parse_source(name: str, cfg) -> M.Source:
    """config.sources.<name> -> a Source; a recipe mistake is a ConfigError naming the
    field, a path that does not exist a DataError."""
    key = f"sources.{name}"
    if not hasattr(cfg, "keys"):
        raise ConfigError(f"{key} is {cfg!r}; a source is fr_jax.datagen.mixture.source(...)")
    unknown = sorted(set(cfg.keys()) - set(M.SOURCE_DEFAULTS))
    if unknown:
        raise ConfigError(f"{key}: unknown field(s) {', '.join(unknown)}; a source has "
                          f"{', '.join(M.SOURCE_DEFAULTS)}")
    f = {**M.SOURCE_DEFAULTS, **M.as_dict(cfg)}
    s = M.Source(name, **{**f, "subsets": tuple(f["subsets"]), "roles": M.as_dict(f["roles"]),
                          "transforms": M.as_dict(f["transforms"]), "domain": str(f["domain"]),
                          "count": int(f["count"]), "weight": float(f["weight"])})
    problem = _source_problem(s, key)
    if problem:
        raise ConfigError(f"{key}: {problem}")
    if s.path and not os.path.exists(s.path):
        raise DataError(f"{key}.path: {s.path!r} does not exist; point --config.{key}.path at "
                        "a local copy (JSONL, JSON, Parquet or a saved datasets folder)")
    return s


def read_recipe(config) -> List[M.Source]:
    """The recipe's sources, every setting checked before any data is read."""
    for field in FIELDS:
        node = config
        for part in field.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            raise ConfigError(f"the recipe has no {field} field (see "
                              "configs/data/three_domains.py for every field it needs)")
    check_ranges(config, RANGES)
    if config.format not in M.FORMATS:
        raise ConfigError(f"--config.format={config.format!r} is not one of "
                          f"{', '.join(M.FORMATS)}")
    if config.dedup.num_perm % config.dedup.bands:
        raise ConfigError(f"--config.dedup.num_perm={config.dedup.num_perm} is not a multiple "
                          f"of --config.dedup.bands={config.dedup.bands}")
    if not config.sources:
        raise ConfigError("the recipe has no sources (config.sources is empty)")
    sources = [parse_source(n, c) for n, c in config.sources.items()]
    if (config.total > 0) != any(s.weight > 0 for s in sources):
        raise ConfigError("weights need a total and a total needs weights: set --config.total "
                          "> 0 and --config.sources.<name>.weight, or use counts with total=0")
    for b in config.decontaminate.benchmarks:
        if b not in B.BENCHMARKS:
            raise ConfigError(f"--config.decontaminate.benchmarks: unknown benchmark {b!r}; "
                              f"choose from {', '.join(B.BENCHMARKS)}")
    return sources


def table(manifest: dict) -> str:
    """A manifest's per-source counts as an aligned text table (totals last), then why
    records were dropped and what the decontamination compared against."""
    def cells(name, domain, entry):
        return [name, domain] + [str(sum(v.values()) if isinstance(v, dict) else v)
                                 for v in (entry[k] for k in COLUMNS)]
    rows = [["source", "domain", *COLUMNS.values()]]
    rows += [cells(n, e["domain"], e) for n, e in manifest["sources"].items()]
    rows.append(cells("total", "", manifest["totals"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    for name, e in manifest["sources"].items():
        for kind, counts in (("dropped", e["dropped"]), ("contaminated", e["contaminated"])):
            if counts:
                lines.append(f"{name} {kind}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    d = manifest["decontamination"]
    lines.append("decontamination: " + (", ".join(
        f"{b} ({v['test_texts']} test texts)" for b, v in d["benchmarks"].items())
        + f", {d['ngram']}-word n-grams" if d["enabled"] else "off"))
    return "\n".join(lines)


def build(config, fv=None) -> dict:
    """Checks the recipe, builds the mixture and prints its table; returns the manifest."""
    manifest = M.build_mixture(config, read_recipe(config))
    print("\n" + table(manifest), flush=True)
    print(f"wrote {manifest['records']} examples to {config.output} (manifest: "
          f"{M.manifest_path(config.output)})", flush=True)
    return manifest


def main(argv=None):
    return cli.main(COMMAND, build, argv)


if __name__ == "__main__":
    main()
