"""The prompt templates of the evaluation harness, all in one place.

Protocol (the paper's): zero-shot, one user message rendered by the chat template of the
experts' family (the router and the experts share one tokenizer), greedy decoding, a
max-new-tokens per benchmark (config `eval.max_new_tokens.<benchmark>`). The templates below
build that user message from a benchmark record; `fr_jax.data.encode_prompt` then applies the
chat template and the assistant header. Nothing else is added: no system prompt, no
few-shot examples.

    gsm8k     GSM8K question, then MATH_INSTRUCTION (the answer is read from \\boxed{})
    math500   MATH-500 problem, then MATH_INSTRUCTION
    humaneval the function signature and docstring in a ```python block, asking for the
              whole function back in one ```python block
    mbpp      the task text and its assert lines, asking for the code in one ```python block
    ifeval    the IFEval prompt as it is (its instructions are part of it)
    toy       the embedded world's prompt as it is (the models were trained on it bare)
"""

from __future__ import annotations

import re
from typing import Sequence

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

GSM8K = "{question}\n" + MATH_INSTRUCTION

MATH500 = "{problem}\n" + MATH_INSTRUCTION

HUMANEVAL = ("Complete the following Python function. Reply with the complete function, "
             "including its signature, in one ```python code block.\n\n```python\n{prompt}```")

MBPP = ("You are an expert Python programmer, and here is your task: {text} Your code should "
        "pass these tests:\n\n{tests}\n\nReply with the code in one ```python code block.")

IFEVAL = "{prompt}"

TOY = "{prompt}"


def fill(template: str, **fields: str) -> str:
    """Replaces each `{name}` of the template (only those: LaTeX braces such as \\boxed{}
    stay as they are)."""
    return re.sub(r"\{(\w+)\}", lambda m: fields.get(m.group(1), m.group(0)), template)


def gsm8k(question: str) -> str:
    return fill(GSM8K, question=question.strip())


def math500(problem: str) -> str:
    return fill(MATH500, problem=problem.strip())


def humaneval(prompt: str) -> str:
    # The prompt keeps its trailing newline so the closing fence stands on its own line.
    return fill(HUMANEVAL, prompt=prompt if prompt.endswith("\n") else prompt + "\n")


def mbpp(text: str, tests: Sequence[str]) -> str:
    return fill(MBPP, text=text.strip(), tests="\n".join(t.strip() for t in tests))


def ifeval(prompt: str) -> str:
    return fill(IFEVAL, prompt=prompt)


def toy(prompt: str) -> str:
    return fill(TOY, prompt=prompt)
