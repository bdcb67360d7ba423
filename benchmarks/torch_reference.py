"""A plain PyTorch/transformers implementation of FusionRoute decoding (the reference).

transformers models with their own KV caches (DynamicCache), a Python loop per token, the
same weights read from the same safetensors folders as fr_jax. It is the yardstick of
`decode_bench.py` and the independent check of fr_jax's fused decode in the tests.

Note: with left padding, transformers measures Gemma-2's sliding window in cache slots,
fr_jax in token positions (the correct reading); they agree when rows are unpadded or the
window is longer than the sequence.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DynamicCache


def _load(path, dtype, device):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype)
    return model.to(device).eval()


class TorchFusedReference:
    """mode: "fusionroute" (router + experts) or "expert:<i>" (one expert alone)."""

    def __init__(self, router_path: Optional[str], expert_paths: Sequence[str],
                 mode: str = "fusionroute", dtype=torch.float32, device: str = "cpu"):
        self.mode, self.device = mode, device
        self.expert_index = int(mode.split(":")[1]) if mode.startswith("expert:") else None
        if self.expert_index is None:
            self.router = _load(router_path, dtype, device)
            head = load_file(os.path.join(router_path, "routing_head.safetensors"))["kernel"]
            self.head = head.to(device=device, dtype=dtype)  # [hidden, n_experts]
            self.experts = [_load(p, dtype, device) for p in expert_paths]
        else:
            self.router, self.head = None, None
            self.experts = [_load(expert_paths[self.expert_index], dtype, device)]

    @staticmethod
    def _logits_and_hidden(model, ids, mask, pos, cache):
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                          past_key_values=cache, use_cache=True)
        h = out.last_hidden_state[:, -1]  # after the final norm
        logits = model.lm_head(h).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits, h

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_ids: Sequence[int] = (), pad_id: int = 0,
                 vocab: Optional[int] = None) -> Tuple[List[List[int]], List[List[int]]]:
        """Greedy decode -> (tokens per row, chosen expert per token per row), cut at EOS."""
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        models = ([self.router] if self.router is not None else []) + self.experts
        caches = [DynamicCache(config=m.config) for m in models]
        eos = set(eos_ids)
        out_tokens = [[] for _ in range(b)]
        out_chosen = [[] for _ in range(b)]
        done = [False] * b
        for _ in range(max_new_tokens):
            outs = [self._logits_and_hidden(m, ids, mask, pos, c) for m, c in zip(models, caches)]
            v = vocab or min(o[0].shape[-1] for o in outs)
            if self.router is None:
                scores = outs[0][0][:, :v]
                chosen = torch.full((b,), self.expert_index)
            else:
                r_logits, r_hidden = outs[0]
                k = (r_hidden.float() @ self.head.float()).argmax(-1)
                e_logits = torch.stack([o[0][:, :v] for o in outs[1:]])  # [n, B, V]
                sel = e_logits[k, torch.arange(b)]
                scores = torch.log_softmax(r_logits[:, :v], -1) + torch.log_softmax(sel, -1)
                chosen = k
            nxt = scores.argmax(-1)
            for r in range(b):
                if not done[r]:
                    out_tokens[r].append(int(nxt[r]))
                    out_chosen[r].append(int(chosen[r]))
                    done[r] = int(nxt[r]) in eos
            if all(done):
                break
            ids = nxt[:, None].to(self.device)
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=self.device)], 1)
            pos = pos[:, -1:] + 1
        return out_tokens, out_chosen
