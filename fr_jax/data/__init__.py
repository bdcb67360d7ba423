"""Training data: local records -> token ids -> fixed-shape, resumable batches.

    records.py    data files -> records (fr_jax.data.records)
    tokenize.py   SFT / preference records -> token-id examples, with a DataReport
    batches.py    examples -> [batch, seq_len] rows (Batcher)
    streams.py    the file dealt into streams, each filling its share of every batch's rows:
                  a process reads and tokenizes only the streams on its devices

The data engine that makes the training files sits beside them and above the evaluation
harness (it decontaminates against the benchmarks and scores sampled answers):
    mixture.py / sft.py       the stage-1 SFT mixture from a recipe (python -m fr_jax.data.sft)
    preference.py / pairs.py  CDPO pairs from the stage-1 router (python -m fr_jax.data.pairs)
"""

from fr_jax.data.batches import Batcher, empty_rows, place_sequence
from fr_jax.data.records import (Records, jsonl_objects, load_records, prompt_lines,
                                 read_prompts)
from fr_jax.data.tokenize import (DataReport, PrefExample, SFTExample, encode_prompt,
                                  tokenize_pref, tokenize_sft)
from fr_jax.errors import DataError

__all__ = ["Batcher", "DataError", "DataReport", "PrefExample", "Records", "SFTExample",
           "empty_rows", "encode_prompt", "jsonl_objects", "load_records", "place_sequence",
           "prompt_lines", "read_prompts", "tokenize_pref", "tokenize_sft"]
