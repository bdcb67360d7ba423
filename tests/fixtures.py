"""What the tests share, in one module: tiny random fr_jax models and a tiny FusionRoute
world (a router and same-shape experts), and small benchmark files in the upstream record
formats."""

import json
import os

import jax

from fr_jax.models import ModelConfig
from fr_jax.models.architecture import RopeConfig
from fr_jax.routing.experts import Experts
from fr_jax.routing.router import Router


def tiny(model_type):
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=12)
    if model_type == "llama":
        return ModelConfig("llama", **common, rope=RopeConfig(
            theta=10000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=8))
    return ModelConfig("gemma2", **common, tie_word_embeddings=True, norm_plus_one=True,
                       sandwich_norms=True, scale_embeddings=True, query_pre_attn_scalar=20.0,
                       attn_logit_softcap=5.0, final_logit_softcap=3.0, sliding_window=4,
                       layer_types=("sliding_attention", "full_attention", "sliding_attention"))


def _scale(params, k=5.0):
    # Larger-than-init weights so attention is far from uniform and mistakes show.
    return jax.tree.map(lambda x: x * k if x.ndim > 1 else x, params)


def scaled_params(model, seed=0):
    return _scale(model.init(jax.random.key(seed)))


N_EXPERTS = 3
PROMPTS = [[5, 9, 11, 40, 6], [17], [60, 61, 62]]


def build_world(model_type, untied_router=False, seed=0, n_experts=N_EXPERTS):
    """A router (2 layers) and n same-shape experts of one tiny family, random weights."""
    cfg = tiny(model_type)
    router_cfg = cfg.replace(num_layers=2, layer_types=cfg.layer_types[:2],
                             tie_word_embeddings=False if untied_router else cfg.tie_word_embeddings)
    router = Router(router_cfg, n_experts)
    keys = jax.random.split(jax.random.key(seed), n_experts + 1)
    r_params = router.init(keys[0])
    r_params = {"backbone": _scale(r_params["backbone"]),
                # A large head so the argmax expert changes from token to token.
                "head": {"kernel": r_params["head"]["kernel"] * 400.0}}
    experts = Experts([cfg] * n_experts)
    e_list = [_scale(experts.models[0].init(k)) for k in keys[1:]]
    return router, r_params, experts, e_list


def mixed_selector(router, r_params):
    """A `sequence` mode Selector over a random SharedTrunkNet that sends PROMPTS to
    FusionRoute and to an expert alone (targets expert:0, expert:2, fusionroute)."""
    import jax.numpy as jnp

    from fr_jax.baselines import seqroute_pipeline as S
    from fr_jax.routing import trunk as T
    from fr_jax.routing.selector import Selector

    targets, costs = ["expert:0", "expert:2", "fusionroute"], [1.0, 1.0, 3.0]
    feats = S.encode_features(router.backbone, r_params["backbone"], PROMPTS, 0, batch_size=4)
    for seed in range(60):
        net = T.SharedTrunkNet((16,), 3)
        trunk = T.Trunk(net.init(jax.random.key(seed), jnp.zeros((1, feats.shape[-1])))["params"],
                        feats[1].mean(0), feats[1].std(0) + 1e-3, targets, 1, costs, (16,))
        choice = T.route(trunk.predict(feats[1]), costs, 0.0)
        if 2 in choice and len(set(choice.tolist())) >= 2:
            return Selector(router.cfg, trunk, lam=0.0)
    raise AssertionError("no random trunk sends the prompts to FusionRoute and an expert")


GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                 "many clips in May. How many clips did Natalia sell altogether?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
               "<<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A shop sells 1,200 pens a day. How many pens does it sell in 2 days?",
     "answer": "1,200 * 2 = <<1200*2=2400>>2,400\n#### 2,400"},
    {"question": "Tom has 5 apples and eats 2. How many are left?",
     "answer": "5 - 2 = <<5-2=3>>3\n#### 3"},
]

MATH500 = [
    {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "solution": "It is $\\boxed{\\frac12}$.",
     "answer": "\\frac{1}{2}", "subject": "Prealgebra", "level": 1,
     "unique_id": "test/prealgebra/1.json"},
    {"problem": "Simplify $\\sqrt{8}$.", "solution": "$\\sqrt{8} = \\boxed{2\\sqrt{2}}$.",
     "answer": "2\\sqrt{2}", "subject": "Algebra", "level": 2,
     "unique_id": "test/algebra/2.json"},
    {"problem": "Solve $x^2 = 9$ for $x > 0$.", "solution": "$x = \\boxed{3}$.",
     "answer": "3", "subject": "Algebra", "level": 1, "unique_id": "test/algebra/3.json"},
]

MBPP = [
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a "
                            "given character from the string.",
     "code": "def remove_Occ(s,ch):\n    s = s.replace(ch, '', 1)\n    i = s.rfind(ch)\n"
             "    return s if i < 0 else s[:i] + s[i + 1:]",
     "test_list": ['assert remove_Occ("hello","l") == "heo"',
                   'assert remove_Occ("abcda","a") == "bcd"',
                   'assert remove_Occ("PHP","P") == "H"'],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 17, "text": "Write a function to find the perimeter of a square.",
     "code": "def square_perimeter(a):\n  return 4*a",
     "test_list": ["assert square_perimeter(10)==40", "assert square_perimeter(5)==20",
                   "assert square_perimeter(4)==16"],
     "test_setup_code": "import math", "challenge_test_list": []},
]

# IFEval records carry every checker argument, None where unused (as on the hub).
_NONE_KW = {"num_words": None, "relation": None, "num_sentences": None, "keywords": None,
            "num_highlights": None, "end_phrase": None, "forbidden_words": None}


def _kw(**kw):
    return dict(_NONE_KW, **kw)


IFEVAL = [
    {"key": 1000, "prompt": "Write a short note about rivers without using any commas. Use at "
                            "least 8 words.",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [_kw(), _kw(num_words=8, relation="at least")]},
    {"key": 1001, "prompt": "Answer in lowercase letters only: what is the sky like today?",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [_kw()]},
    {"key": 1002, "prompt": "Describe a cat in exactly 2 sentences or fewer and end with the "
                            "phrase 'Any other questions?'",
     "instruction_id_list": ["length_constraints:number_sentences", "startend:end_checker"],
     "kwargs": [_kw(num_sentences=2, relation="less than"),
                _kw(end_phrase="Any other questions?")]},
]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_all(root) -> dict:
    """{benchmark: path} of JSONL fixtures (HumanEval: the packaged file, left to default)."""
    return {"gsm8k": write_jsonl(os.path.join(root, "gsm8k", "test.jsonl"), GSM8K),
            "math500": write_jsonl(os.path.join(root, "math500", "test.jsonl"), MATH500),
            "mbpp": write_jsonl(os.path.join(root, "mbpp", "mbpp.jsonl"), MBPP),
            "ifeval": write_jsonl(os.path.join(root, "ifeval", "input_data.jsonl"), IFEVAL)}
