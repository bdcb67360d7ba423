"""The router's stage-1 SFT mixture for FusionRoute's three domains (math, code, instruction
following), as in the paper: the default recipe of `python -m fr_jax.data.sft`.

    python -m fr_jax.data.sft --config=configs/data/three_domains.py --output=data/sft.jsonl

These are defaults a user edits (or overrides field by field, --config.a.b=value): the
sources, their sizes and the decontamination set. Every source names a hub data set; to
build offline, download it and set its `path` (a local file or folder in the same upstream
format; path wins over hub), e.g. --config.sources.gsm8k.path=/data/gsm8k/train.jsonl, and
likewise --config.decontaminate.data.<benchmark>.path for each benchmark's test set.

Recipe fields (fr_jax/datagen/mixture.py does the work):
  output          the JSONL to write; <output stem>.manifest.json goes beside it
  seed            per-source sampling and the final shuffle (dedup does not depend on it)
  format          "prompt_response": {"prompt", "response", "source", "domain"} records;
                  "messages": {"messages": [{"role", "content"}, ...], "source", "domain"}
  total           0: each source keeps `count` examples (0 = all); > 0: a source with a
                  weight keeps round(total * weight / sum of weights), one without its count
  progress        progress bars over the dedup / decontamination passes
  sources.<name>  source(...) with:
      hub         "owner/name[:subset[:split]]" (split defaults to train), or
      path        a local copy in the upstream format (JSONL, JSON, Parquet, a saved folder)
      subsets     hub subsets to read one after another (e.g. MATH's seven subjects)
      domain      the expert domain the examples train: math, code or instr
      prompt, response   templates: each {field} is the record's field, stripped (a list
                  joins by lines); any {word} is a placeholder, other braces stay as written
      messages    instead of templates: the field holding a chat, with `roles` mapping
                  upstream role names to user/assistant/system and role_key/content_key
                  naming the turn's fields (ShareGPT: from/value, human/gpt)
      transforms  {field: gsm8k_solution | python_block | strip}, applied before templating
      count, weight   see `total`; fewer clean examples than wanted: all are kept and the
                  shortfall is reported (never upsampled)
  dedup           exact (lower-cased, whitespace-collapsed prompt + response), near (word
                  `shingle`-grams with Jaccard >= near_threshold, found by MinHash with
                  num_perm hashes in `bands` bands, confirmed exactly); across all sources,
                  the first occurrence in recipe order is kept
  decontaminate   benchmarks (() = off); data.<benchmark>.{path, hub}: its test set;
                  ngram: an example whose prompt + response shares any ngram-word sequence
                  (words: lower-cased runs of letters and digits) with a test text is
                  dropped; a test text shorter than ngram counts whole

Each source's comment lists the upstream fields its records have ("fields: ..."); its
templates read only those.
"""

import ml_collections

from fr_jax.datagen.mixture import TEST_DATA, source
from fr_jax.harness import prompts as P


def get_config():
    c = ml_collections.ConfigDict()
    c.output = "data/sft_mixed.jsonl"
    c.seed = 0
    c.format = "prompt_response"
    c.total = 0  # counts below: ~59k examples before dedup and decontamination
    c.progress = True

    # In recipe order (sort_keys=False keeps it): where two sources hold the same example,
    # dedup keeps the earlier one's.
    c.sources = ml_collections.ConfigDict(sort_keys=False)
    # Math: prompts end with the eval harness's MATH_INSTRUCTION, answers with \boxed{}.
    # gsm8k: openai/gsm8k, subset "main", train split (7,473 problems; MIT).
    #   fields: question, answer
    #   answer: worked steps with <<48/2=24>> calculator notes, then "#### <number>"
    c.sources.gsm8k = source(hub="openai/gsm8k:main:train", domain="math", prompt=P.GSM8K,
                             response="{answer}", transforms={"answer": "gsm8k_solution"})
    # math: EleutherAI/hendrycks_math, its seven subject subsets, train splits (7,500; MIT).
    #   fields: problem, level, type, solution
    #   solution: LaTeX worked solution, the answer in its last \boxed{}
    c.sources.math = source(
        hub="EleutherAI/hendrycks_math::train", domain="math", prompt=P.MATH500,
        response="{solution}",
        subsets=("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus"))

    # Code: MBPP-style prompts (the eval harness's template) and code in ```python blocks.
    # mbpp: google-research-datasets/mbpp, subset "full", train split (374 tasks; CC-BY-4.0).
    #   fields: task_id, text, code, test_list, test_setup_code, challenge_test_list
    #   test_list: three assert lines (joined one per line into the prompt)
    c.sources.mbpp = source(hub="google-research-datasets/mbpp:full:train", domain="code",
                            prompt=P.fill(P.MBPP, text="{text}", tests="{test_list}"),
                            response="{code}", transforms={"code": "python_block"})
    # magicoder: ise-uiuc/Magicoder-OSS-Instruct-75K, train split (75,197; MIT). Several
    # programming languages; solutions are markdown with their own code fences.
    #   fields: lang, raw_index, index, seed, openai_fingerprint, problem, solution
    c.sources.magicoder = source(hub="ise-uiuc/Magicoder-OSS-Instruct-75K", domain="code",
                                 prompt="{problem}", response="{solution}", count=22000)

    # Instruction following: verifiable constraints in the style of IFEval.
    # tulu_if: allenai/tulu-3-sft-personas-instruction-following, train split (29,980;
    # ODC-BY).
    #   fields: id, prompt, messages, constraints
    #   messages: [{"role": "user", ...}, {"role": "assistant", ...}]
    c.sources.tulu_if = source(hub="allenai/tulu-3-sft-personas-instruction-following",
                               domain="instr", messages="messages", count=22000)

    c.dedup = ml_collections.ConfigDict()
    c.dedup.exact = True
    c.dedup.near = True
    c.dedup.near_threshold = 0.8  # Jaccard of word 5-gram sets
    c.dedup.shingle = 5
    # 20 bands of 6 rows: a pair at Jaccard 0.8 becomes a candidate with p ~ 0.998, one at
    # 0.3 with p ~ 0.015 (candidates are then confirmed on their exact Jaccard).
    c.dedup.num_perm = 120
    c.dedup.bands = 20

    c.decontaminate = ml_collections.ConfigDict()
    c.decontaminate.benchmarks = ("gsm8k", "math500", "humaneval", "mbpp", "ifeval")
    c.decontaminate.data = ml_collections.ConfigDict(
        {b: {"path": "", "hub": TEST_DATA[b]} for b in TEST_DATA})
    c.decontaminate.ngram = 13
    return c
