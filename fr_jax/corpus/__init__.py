"""Text data: local records -> token ids -> fixed-shape, resumable batches.

    records.py    data files -> records 
    tokenize.py   SFT / preference records -> token-id examples, with a DataReport
    batches.py    examples -> [batch, seq_len] rows (Batcher)
    streams.py    the file dealt into streams, each filling its share of every batch's rows:
                  a process reads and tokenizes only the streams on its devices

The data engine that makes the training files (fr_jax.datagen) and the commands that run
it (fr_jax.data) sit above the evaluation harness, which reads prompts through here too.
"""

from fr_jax.corpus.batches import Batcher, empty_rows, pack_batch, place_sequence, place_side
from fr_jax.corpus.records import (Records, jsonl_objects, load_records, prompt_lines,
                                   read_prompts)
from fr_jax.corpus.tokenize import (DataReport, PrefExample, SFTExample, encode_prompt,
                                    tokenize_pref, tokenize_sft)
from fr_jax.runtime.errors import DataError

__all__ = ["Batcher", "DataError", "DataReport", "PrefExample", "Records", "SFTExample",
           "empty_rows", "encode_prompt", "jsonl_objects", "load_records", "pack_batch",
           "place_sequence", "place_side",
           "prompt_lines", "read_prompts", "tokenize_pref", "tokenize_sft"]
