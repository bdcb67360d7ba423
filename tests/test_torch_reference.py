"""fr_jax's fused decode and the PyTorch reference (benchmarks/torch_reference.py) agree."""

import pytest

from benchmarks.torch_reference import TorchFusedReference
from fr_jax.hf import save_hf
from fr_jax.inference import FusedDecoder
from fr_jax.routing.experts import load_experts
from fr_jax.routing.modes import Mode
from fr_jax.routing.router import load_router, save_router
from fixtures import build_world


def _write_world(tmp_path, model_type):
    router, r_params, experts, e_list = build_world(model_type)
    save_router(str(tmp_path / "router"), router, r_params)
    paths = [str(tmp_path / f"expert{i}") for i in range(len(e_list))]
    for path, p in zip(paths, e_list):
        save_hf(path, experts.cfgs[0], p)
    return str(tmp_path / "router"), paths


# Gemma-2 prompts have equal lengths: transformers measures the sliding window in cache slots,
# which differs from token positions only under left padding (see torch_reference.py).
@pytest.mark.parametrize("model_type,prompts", [
    ("llama", [[5, 9, 11, 40, 6], [17], [60, 61, 62]]),
    ("gemma2", [[5, 9, 11, 40, 6], [17, 18, 19, 20, 21]]),
])
@pytest.mark.parametrize("mode", ["fusionroute", "expert:2"])
def test_same_greedy_tokens_and_experts_as_pytorch(tmp_path, model_type, prompts, mode):
    router_path, paths = _write_world(tmp_path, model_type)
    router, r_params = load_router(router_path)
    experts, e_params = load_experts(paths)
    n = 10
    ours = FusedDecoder(Mode.parse(mode), router, experts, chunk=4).generate(
        {"router": r_params, "experts": e_params}, prompts, n, eos_ids=[])
    ref_tokens, ref_chosen = TorchFusedReference(router_path, paths, mode).generate(prompts, n)
    for row in range(len(prompts)):
        assert ours.row(row) == (ref_tokens[row], ref_chosen[row]), row
