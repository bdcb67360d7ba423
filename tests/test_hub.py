"""Hub names where checkpoint folders are accepted, resolved offline from a pre-populated
Hugging Face cache (HF_HUB_OFFLINE=1: huggingface_hub's own cache lookup, no network)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fr_jax.hf import load_config
from fr_jax.hf.hub import checkpoint_dir, hub_name
from fr_jax.runtime.errors import CheckpointError
from fr_jax.toy.tiny import ensure_tiny_world

sys.path.insert(0, os.path.dirname(__file__))
from cli_env import REPO, one_device_env  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(cache: str, repo: str, folder: str):
    """Lays `folder` out as huggingface_hub stores a downloaded model: blobs, a snapshot of
    links to them under a commit hash, and refs/main naming that commit."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", COMMIT)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    for i, name in enumerate(sorted(os.listdir(folder))):
        blob = os.path.join(root, "blobs", f"{i:040x}")
        shutil.copyfile(os.path.join(folder, name), blob)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(COMMIT)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_tiny_world(str(tmp_path_factory.mktemp("world")), n_experts=2)


def test_names_and_paths_are_told_apart(tmp_path, monkeypatch):
    assert hub_name("google/gemma-2-2b-it") == ("google/gemma-2-2b-it", None)
    assert hub_name("meta-llama/Llama-3.2-1B@v1.0") == ("meta-llama/Llama-3.2-1B", "v1.0")
    for path in ("/ckpt/router", "./a/b", "a/b/c", "router", "~/x/y", ""):
        assert hub_name(path) is None and checkpoint_dir(path) == path
    # a local folder wins over the hub model of the same name
    monkeypatch.chdir(tmp_path)
    os.makedirs("google/gemma-2-2b-it")
    assert hub_name("google/gemma-2-2b-it") is None
    assert checkpoint_dir("google/gemma-2-2b-it") == "google/gemma-2-2b-it"


def test_a_name_missing_from_the_cache_offline_says_how_to_get_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"'fr-test/absent' is not a local folder, and hub "
                       r"model 'fr-test/absent' is not in the HF cache .* HF_HUB_OFFLINE is set: "
                       r"download it .*hf download fr-test/absent"):
        checkpoint_dir("fr-test/absent", cache_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="'fr-test/absent' is not a local folder"):
        load_config("fr-test/absent")  # the loaders resolve names themselves


def test_cached_names_resolve_to_the_snapshot(world, tmp_path):
    _cache_model(str(tmp_path), "fr-test/router", world["router"])
    snap = checkpoint_dir("fr-test/router", cache_dir=str(tmp_path))
    assert snap == os.path.join(str(tmp_path), "models--fr-test--router", "snapshots", COMMIT)
    assert checkpoint_dir(f"fr-test/router@{COMMIT}", cache_dir=str(tmp_path)) == snap
    assert load_config(snap) == load_config(world["router"])


def test_lineup_and_merge_take_hub_names(world, tmp_path, monkeypatch):
    """The lineup's router, experts and stand-alone models, and a merge's base and experts,
    named as hub models: expert names from the names given, `source` (what the eval
    harness fingerprints) the revision's snapshot."""
    from huggingface_hub import constants

    from fr_jax.baselines.merging import merge_hf
    from fr_jax.inference.lineup import load_lineup

    cache = str(tmp_path / "hub")
    for name, folder in [("router", world["router"]), ("math", world["experts"][0]),
                         ("code", world["experts"][1])]:
        _cache_model(cache, f"fr-test/{name}", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)  # where HF_HUB_CACHE would point
    lineup = load_lineup("fr-test/router", ["fr-test/math", "fr-test/code"],
                         models={"solo": "fr-test/math"})
    assert list(lineup.expert_names) == ["math", "code"] and set(lineup.models) == {"solo"}
    assert lineup.source["router"] == checkpoint_dir("fr-test/router")
    assert lineup.source["router"].endswith(os.path.join("models--fr-test--router",
                                                         "snapshots", COMMIT))
    out = merge_hf("fr-test/math", ["fr-test/math", "fr-test/code"], str(tmp_path / "merged"),
                   "task_arithmetic", lambdas=0.5)
    assert load_config(out) == load_config(world["experts"][0])


@pytest.mark.slow
def test_decode_cli_with_hub_names_gives_the_local_folders_tokens(world, tmp_path):
    """`python -m fr_jax.decode` with the router and experts named as hub models, served
    from HF_HOME's cache offline: the same tokens as the same checkpoints as folders."""
    hf_home = tmp_path / "hf"
    for name, folder in [("router", world["router"]), ("math", world["experts"][0]),
                         ("code", world["experts"][1])]:
        _cache_model(str(hf_home / "hub"), f"fr-test/{name}", folder)
    common = ["--config.experts.names=('math', 'code')", "--config.decode.max_new_tokens=6",
              "--prompt=def f(x):"]
    env = dict(one_device_env(tmp_path / "home"), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    runs = {}
    for label, router, experts in [
            ("hub", "fr-test/router", "('fr-test/math', 'fr-test/code')"),
            ("local", world["router"], repr(tuple(world["experts"])))]:
        out = tmp_path / f"{label}.jsonl"
        subprocess.run([sys.executable, "-m", "fr_jax.decode", f"--config.router.path={router}",
                        f"--config.experts.paths={experts}", f"--output={out}", *common],
                       cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
        runs[label] = [json.loads(line) for line in out.read_text().splitlines()]
    hub, local = runs["hub"][0], runs["local"][0]
    assert hub["token_ids"] == local["token_ids"] and hub["experts"] == local["experts"]
    assert len(hub["token_ids"]) > 0


def test_an_entry_point_resolves_each_checkpoint_once(world, tmp_path, monkeypatch):
    """The lineup a config names (router, experts, a stand-alone baseline), every one a hub
    name: each is looked up in the hub cache once and its config.json parsed once."""
    from huggingface_hub import constants

    from fr_jax.config import base_config
    from fr_jax.hf import folders, hub
    from fr_jax.inference.lineup import lineup_from_config

    cache = str(tmp_path / "hub")
    for name, folder in [("router", world["router"]), ("math", world["experts"][0]),
                         ("code", world["experts"][1]), ("merged", world["experts"][1])]:
        _cache_model(cache, f"fr-test/{name}", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    fetched, parsed = [], []
    snapshot, parse = hub.snapshot_download, folders._parse_config
    monkeypatch.setattr(hub, "snapshot_download",
                        lambda repo, **kw: fetched.append(repo) or snapshot(repo, **kw))
    monkeypatch.setattr(folders, "_parse_config",
                        lambda path: parsed.append(path) or parse(path))
    config = base_config()
    config.router.path = "fr-test/router"
    config.experts.paths = ("fr-test/math", "fr-test/code")
    config.baselines.merged = "fr-test/merged"
    lineup = lineup_from_config(config, ["fusionroute", "expert:1", "merged"])
    assert sorted(fetched) == ["fr-test/code", "fr-test/math", "fr-test/merged",
                               "fr-test/router"]
    assert len(parsed) == len(set(parsed)) == 4
    assert list(lineup.expert_names) == ["math", "code"] and set(lineup.models) == {"merged"}


def test_a_training_run_resolves_its_checkpoints_once_and_records_them(world, tmp_path,
                                                                     monkeypatch):
    """train's checks resolve the router and experts (hub names) once and hand the
    checkpoints on: the run's record names the snapshots' contents without a second
    lookup."""
    from huggingface_hub import constants

    from fr_jax.config import base_config
    from fr_jax.hf import hub
    from fr_jax.loop import record
    from fr_jax.loop.stages import check_run

    cache = str(tmp_path / "hub")
    for name, folder in [("router", world["router"]), ("math", world["experts"][0]),
                         ("code", world["experts"][1])]:
        _cache_model(cache, f"fr-test/{name}", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    fetched, snapshot = [], hub.snapshot_download
    monkeypatch.setattr(hub, "snapshot_download",
                        lambda repo, **kw: fetched.append(repo) or snapshot(repo, **kw))
    config = base_config()
    config.router.path = "fr-test/router"
    config.experts.paths = ("fr-test/math", "fr-test/code")
    config.train.stages = ("sft",)
    config.data.sft_path = str(tmp_path / "sft.jsonl")
    open(config.data.sft_path, "w").write('{"prompt": "a", "response": "b"}\n')
    checkpoints = check_run(config)
    assert sorted(fetched) == ["fr-test/code", "fr-test/math", "fr-test/router"]
    assert [c.name for c in checkpoints.values()] == ["fr-test/router", "fr-test/math",
                                                      "fr-test/code"]
    described = record.describe(config, "sft", {f: c.path for f, c in checkpoints.items()})
    assert len(fetched) == 3  # no second lookup
    assert described["models"]["router.path"] == record.model_identity(world["router"]) | {
        "path": "fr-test/router"}
