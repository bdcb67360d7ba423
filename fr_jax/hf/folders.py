"""Local Hugging Face checkpoint folders <-> fr_jax params.

    cfg, params = load_hf("/ckpt/Llama-3.2-1B", dtype="bfloat16")
    save_hf("/out/router", cfg, params, tokenizer=tok)   # loadable by transformers
    tok = load_tokenizer("/ckpt/Llama-3.2-1B")

A checkpoint is a local folder with `config.json` and one `model.safetensors` or several
shards plus `model.safetensors.index.json`, or a hub name (fr_jax/hf/hub.py). An entry point
resolves each name once (`resolve`: the local folder, a hub name's snapshot, and its parsed
config.json) and hands the `Checkpoint` on: every loader here takes one as well as a name.

Layout: HF stores linear weights as [out, in]; fr_jax kernels are [in, out] with heads split
out ([E, heads, head_dim] for q/k/v, [heads, head_dim, E] for o), and every per-layer tensor
is stacked on a leading `layers` axis. HF's q/k weights are already permuted for the
half-split ("rotate_half") rotary layout that `fr_jax.models.layers.apply_rope` uses, so
they load without a permutation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from typing import Dict, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fr_jax.hf.hub import checkpoint_dir
from fr_jax.models.architecture import ModelConfig
from fr_jax.models.model import Model
from fr_jax.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that carry no learned state.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------- name mapping
@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor <-> one fr_jax param (or one layer slice of a stacked param)."""

    hf_name: str  # may contain {i} for the layer index
    path: Tuple[str, ...]  # path in the fr_jax param tree
    kind: str  # how to convert, see _to_flax / _to_hf

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf_name


def _entries(cfg: ModelConfig) -> List[_Entry]:
    L = "model.layers.{i}."
    e = [_Entry("model.embed_tokens.weight", ("embed", "embedding"), "same"),
         _Entry("model.norm.weight", ("final_norm", "scale"), "same")]
    if not cfg.tie_word_embeddings:
        e.append(_Entry("lm_head.weight", ("lm_head",), "linear"))
    for proj, kind in (("q_proj", "qkv"), ("k_proj", "qkv"), ("v_proj", "qkv"), ("o_proj", "o")):
        e.append(_Entry(L + f"self_attn.{proj}.weight", ("layers", "attn", proj, "kernel"), kind))
        if cfg.attention_bias:
            e.append(_Entry(L + f"self_attn.{proj}.bias", ("layers", "attn", proj, "bias"),
                            "qkv_bias" if kind == "qkv" else "same"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        e.append(_Entry(L + f"mlp.{proj}.weight", ("layers", "mlp", proj, "kernel"), "linear"))
        if cfg.mlp_bias:
            e.append(_Entry(L + f"mlp.{proj}.bias", ("layers", "mlp", proj, "bias"), "same"))
    if cfg.sandwich_norms:  # Gemma-2 names its four norms after their place
        norms = {"input_layernorm": "pre_attn_norm", "post_attention_layernorm": "post_attn_norm",
                 "pre_feedforward_layernorm": "pre_mlp_norm",
                 "post_feedforward_layernorm": "post_mlp_norm"}
    else:  # Llama's "post_attention_layernorm" is the norm in front of the MLP
        norms = {"input_layernorm": "pre_attn_norm", "post_attention_layernorm": "pre_mlp_norm"}
    for hf, ours in norms.items():
        e.append(_Entry(L + f"{hf}.weight", ("layers", ours, "scale"), "same"))
    return e


def _to_flax(kind: str, x: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """HF tensor -> fr_jax layout of `shape` (one layer's slice for layered params).

    Linear weights are [out, in] in HF; transposing gives [in, out], and the reshape splits
    heads out of q/k/v's output ([E, N, D]) or o's input ([H, D, E]).
    """
    if kind in ("linear", "qkv", "o"):
        return x.T.reshape(shape)
    return x.reshape(shape)  # "same", "qkv_bias"


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "qkv":  # [E, N, D] -> [N*D, E]
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if kind == "o":  # [H, D, E] -> [E, H*D]
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    if kind == "qkv_bias":  # [N, D] -> [N*D]
        return x.reshape(-1)
    return x


def _hf_shape(kind: str, flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    return _to_hf(kind, np.empty(flax_shape, np.int8)).shape


# ---------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint resolved once: the name it was given, its local folder (for a hub name,
    the snapshot in the HF cache) and its config.json, parsed (float32; `model_config`
    gives it the dtypes a loader asks for)."""
    name: str
    path: str
    config: ModelConfig

    def model_config(self, dtype: str = "float32",
                     param_dtype: Optional[str] = None) -> ModelConfig:
        return self.config.replace(dtype=dtype, param_dtype=param_dtype or dtype)


Named = Union[str, Checkpoint]  # what every loader takes: a name, or one resolved already


def resolve(name: Named) -> Checkpoint:
    """The checkpoint `name` names (a folder or a hub name, see fr_jax/hf/hub.py): its hub
    snapshot fetched if need be and its config.json read, with a clear error for a missing
    or odd folder. A Checkpoint is returned as it is."""
    if isinstance(name, Checkpoint):
        return name
    path = checkpoint_dir(name)
    return Checkpoint(name, path, _parse_config(path))


def local_folder(name: Named) -> str:
    """The local folder of a name (a hub name's snapshot) or of a resolved checkpoint."""
    return name.path if isinstance(name, Checkpoint) else checkpoint_dir(name)


def load_config(name: Named, dtype: str = "float32",
                param_dtype: Optional[str] = None) -> ModelConfig:
    """ModelConfig of a checkpoint (its config.json), with the dtypes given."""
    return resolve(name).model_config(dtype, param_dtype)


def _parse_config(path: str) -> ModelConfig:
    """ModelConfig from a local folder's config.json, with a clear error for a missing or
    odd file."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path!r} does not exist (give a local folder "
                              "holding config.json and *.safetensors, or a hub name such as "
                              "google/gemma-2-2b-it)")
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{cfg_file} not found: {path!r} is not an HF checkpoint folder "
                              "(expected config.json next to the *.safetensors files)")
    try:
        with open(cfg_file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    # Multimodal wrappers nest the language model's config.
    if "text_config" in raw and "model_type" not in raw.get("text_config", {}):
        raw = {**raw, **raw["text_config"]}
    return ModelConfig.from_hf(raw, source=cfg_file)


def _check_safetensors_file(file: str) -> Dict[str, dict]:
    """Reads a safetensors header and checks the file holds every byte it declares."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated or empty ({size} bytes): re-copy the shard")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:  # a damaged length field: never try to read it
            raise CheckpointError(f"{file} is truncated or damaged: its header declares {n} "
                                  f"bytes but the file has {size}; re-copy the shard")
        raw = f.read(n)
    if len(raw) < n:
        raise CheckpointError(f"{file} is truncated inside its header ({size} bytes, header "
                              f"declares {n}): re-copy the shard")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{file} is not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        end = 8 + n + info["data_offsets"][1]
        if end > size:
            raise CheckpointError(
                f"{file} is truncated: tensor {name!r} needs bytes up to {end} but the file has "
                f"{size}; re-copy or re-download this shard")
    return header


def _weight_map(path: str) -> Dict[str, str]:
    """HF tensor name -> absolute shard file."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            wm = json.load(f).get("weight_map")
        if not wm:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = sorted(set(wm.values()))
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.isfile(full):
                raise CheckpointError(f"shard {full} listed in {index} is missing")
        return {k: os.path.join(path, v) for k, v in wm.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    # Other safetensors files may sit beside the model (e.g. a router's routing head).
    files = [f for f in files if f.startswith("model")] or files
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = (" (found PyTorch pickles " + ", ".join(bins) +
                ": re-save with save_pretrained(safe_serialization=True))") if bins else ""
        raise CheckpointError(f"no *.safetensors weights in {path!r}{hint}")
    wm = {}
    for fname in files:
        full = os.path.join(path, fname)
        for name in _check_safetensors_file(full):
            wm[name] = full
    return wm


class _ShardReader:
    """Opens each shard once (after checking it is complete) and reads tensors as numpy."""

    def __init__(self, weight_map: Dict[str, str]):
        self.weight_map = weight_map
        self._open: Dict[str, object] = {}
        self._checked = set()

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> Tuple[np.ndarray, str]:
        file = self.weight_map[name]
        if file not in self._checked:
            header = _check_safetensors_file(file)
            if name not in header:
                raise CheckpointError(f"tensor {name!r} is listed for {file} in the index but "
                                      "that shard does not contain it")
            self._checked.add(file)
        if file not in self._open:
            try:
                self._open[file] = safe_open(file, framework="np")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {file}: {e}") from None
        return self._open[file].get_tensor(name), file


def _resolve(reader: _ShardReader, name: str) -> Optional[str]:
    """The stored name for `name`, tolerating checkpoints saved without the `model.` prefix."""
    if reader.has(name):
        return name
    if name.startswith("model.") and reader.has(name[len("model."):]):
        return name[len("model."):]
    return None


def load_hf(path: Named, dtype: str = "float32", param_dtype: Optional[str] = None,
            shardings=None) -> Tuple[ModelConfig, dict]:
    """Reads a checkpoint (an HF folder, a hub name or a `Checkpoint`) into (ModelConfig,
    params on device).

    dtype: activation dtype; param_dtype: dtype the params are stored in (default: dtype).
    shardings: optional params-shaped pytree of `jax.sharding.Sharding`; each param is then
    assembled shard by shard on its devices (`jax.make_array_from_callback`), never whole
    on one device.
    """
    cfg, params = read_hf(path, dtype, param_dtype)
    return cfg, place(params, shardings)


def read_hf(path: Named, dtype: str = "float32",
            param_dtype: Optional[str] = None) -> Tuple[ModelConfig, dict]:
    """Like `load_hf` but leaves the params as host numpy arrays (for stacking, placing)."""
    checkpoint = resolve(path)
    path, cfg = checkpoint.path, checkpoint.model_config(dtype, param_dtype)
    reader = _ShardReader(_weight_map(path))
    shapes = Model(cfg).param_shapes()
    np_dtype = jnp.dtype(cfg.param_dtype)
    params: dict = {}
    used = set()
    for entry in _entries(cfg):
        target = _get(shapes, entry.path).shape
        layer_shape = target[1:] if entry.layered else target
        layer_ids = range(cfg.num_layers) if entry.layered else [None]
        slices = []
        for i in layer_ids:
            want = entry.hf_name.format(i=i)
            name = _resolve(reader, want)
            if name is None:
                raise CheckpointError(
                    f"checkpoint {path!r} has no tensor {want!r} (needed by {cfg.model_type} "
                    f"with the settings in config.json); is config.json from the same model?")
            x, file = reader.get(name)
            expect = _hf_shape(entry.kind, layer_shape)
            if tuple(x.shape) != expect:
                raise CheckpointError(
                    f"tensor {name!r} in {file} has shape {tuple(x.shape)} but config.json "
                    f"implies {expect}; config.json and the weights disagree")
            slices.append(_to_flax(entry.kind, x, layer_shape).astype(np_dtype))
            used.add(name)
        value = np.stack(slices) if entry.layered else slices[0]
        _set(params, entry.path, value)
    unused = [n for n in reader.weight_map if n not in used and not n.endswith(_IGNORED_SUFFIXES)
              and not (cfg.tie_word_embeddings and n.endswith("lm_head.weight"))]
    if unused:
        log.warning("%s: %d tensors not used by fr_jax's %s model, e.g. %s", path, len(unused),
                    cfg.model_type, unused[:3])
    return cfg, params


def place(params, shardings=None):
    """Host arrays -> device arrays; with shardings, each device receives only its shard."""
    if shardings is None:
        return jax.tree.map(jnp.asarray, params)

    def put(x, sharding):
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree.map(put, params, shardings)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------- writing
def hf_state_dict(cfg: ModelConfig, params) -> Dict[str, np.ndarray]:
    """fr_jax params -> {HF tensor name: numpy array} in HF layout."""
    out = {}
    for entry in _entries(cfg):
        value = np.asarray(jax.device_get(_get(params, entry.path)))
        if entry.layered:
            for i in range(cfg.num_layers):
                out[entry.hf_name.format(i=i)] = _to_hf(entry.kind, value[i])
        else:
            out[entry.hf_name] = _to_hf(entry.kind, value)
    return out


def save_hf(path: str, cfg: ModelConfig, params, tokenizer=None, dtype: Optional[str] = None,
            max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes params as an HF folder (config.json + safetensors [+ index] [+ tokenizer]).

    The folder loads with `transformers.AutoModelForCausalLM.from_pretrained(path)` and
    with `load_hf(path)`. dtype: storage dtype (default: the params' own dtype).
    """
    os.makedirs(path, exist_ok=True)
    tensors = hf_state_dict(cfg, params)
    if dtype is not None:
        target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        tensors = {k: v.astype(target) for k, v in tensors.items()}
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(jnp.dtype(next(iter(tensors.values())).dtype))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)

    shards: List[Dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    for stale in (SINGLE_FILE, INDEX_FILE):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(v.nbytes for v in tensors.values())
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_tokenizer(path: Named):
    """The tokenizer saved in a checkpoint folder, hub model or resolved `Checkpoint`
    (transformers' AutoTokenizer)."""
    from transformers import AutoTokenizer

    path = local_folder(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"tokenizer folder {path!r} does not exist")
    if not any(os.path.isfile(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"no tokenizer in {path!r} (expected tokenizer.json or "
                              "tokenizer.model next to config.json)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types, and names no file
        raise CheckpointError(f"cannot load the tokenizer in {path!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else 'no message'}); "
                              "check its tokenizer files and config.json") from None
