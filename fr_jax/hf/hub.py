"""Checkpoint names: a local folder, or a model on the Hugging Face hub.

Wherever fr_jax takes a checkpoint folder it also takes a hub name (`google/gemma-2-2b-it`,
optionally `@revision`). A local folder of that name wins. A hub name is fetched with
huggingface_hub into its standard cache (`HF_HOME` / `HF_HUB_CACHE`), only the files a
checkpoint needs (config, safetensors, tokenizer); `HF_TOKEN` authorises gated models, and
`HF_HUB_OFFLINE=1` serves the cache without asking the network. The fetch happens where the
name is first read, never at import.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from fr_jax.runtime.errors import CheckpointError

# owner/name[@revision]: one slash, the characters the hub allows in repo ids.
HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")

# What a checkpoint folder is made of; a repo's other files (PyTorch .bin weights, GGUF,
# original-format consolidated checkpoints) are never fetched.
CHECKPOINT_FILES = ("config.json", "generation_config.json", "*.safetensors",
                    "*.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                    "tokenizer.model", "special_tokens_map.json",
                    "router.json")  # a router fr_jax trained (+ routing_head.safetensors)


def hub_name(name: str) -> Optional[tuple]:
    """(repo id, revision or None) when `name` is a hub name and no local path, else None."""
    if not name or os.path.exists(name):
        return None
    m = HUB_NAME.match(name)
    return (m["repo"], m["rev"]) if m else None


def checkpoint_dir(name: str, cache_dir: Optional[str] = None,
                   files: Sequence[str] = CHECKPOINT_FILES) -> str:
    """The local folder for `name`: `name` itself when it is a path (existing or not: the
    loader names a missing folder), else the hub model's snapshot in the HF cache, with
    `files` (glob patterns) fetched if they are not there yet. cache_dir: another cache
    than HF_HUB_CACHE."""
    parsed = hub_name(name)
    if parsed is None:
        return name
    repo, revision = parsed
    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        return snapshot_download(repo, revision=revision, cache_dir=cache,
                                 allow_patterns=list(files),
                                 token=os.environ.get("HF_TOKEN") or None)
    except GatedRepoError:
        raise CheckpointError(
            f"hub model {repo!r} is gated: accept its license on https://huggingface.co/{repo} "
            "and set HF_TOKEN to a token of that account (or give a local folder)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"hub model {repo!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{name!r} is neither a local folder nor a model on the hub (a private model "
            "needs HF_TOKEN); give the folder holding config.json and *.safetensors") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else "the hub cannot be reached")
        raise CheckpointError(
            f"{name!r} is not a local folder, and hub model {repo!r} is not in the HF cache "
            f"({cache}) while {why}: download it where there is network (`hf download "
            f"{repo}`) and copy that cache here (or set HF_HOME to it), or give a local "
            "folder") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"fetching hub model {repo!r} failed: "
                              f"{str(e).splitlines()[0][:200]}") from None
