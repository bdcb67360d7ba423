"""HBM traffic of a compiled program, read from its optimized HLO text.

XLA's `cost_analysis()["bytes accessed"]` sums the operands and outputs of every
instruction, wherever they live. On TPU the compiler's memory-space assignment copies
weights and activations into on-chip memory ahead of their use (`copy-start`, sliced
`async-start`; layouts marked `S(1)`), and the consumer then reads the on-chip copy, so a
weight read once from HBM is counted two or three times; a row gathered from an embedding
table counts as the whole table. For a decode step, which is bound by HBM bandwidth, that
is the difference between a plausible and a wildly pessimistic step time.

`hbm_bytes` counts what crosses HBM instead: per instruction of the scheduled
computations (the entry, loop bodies, called computations; a loop body once, as XLA's
cost analysis does), the operands and outputs that live in HBM (memory space 0), where a
fusion operand that is only sliced or gathered counts the slices it reads, and a fusion
that updates a buffer in place (dynamic-update-slice at its root) counts the update only.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

_ITEM = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
         "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_ITEM, key=len, reverse=True))
                    + r")\[([\d,]*)\](\{[^{}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
# No data moves: tuple plumbing, loop and call wrappers (their bodies are walked), the
# done-halves of async pairs (the start moved the data).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
         "copy-done", "async-done", "all-gather-done", "all-reduce-done",
         "collective-permute-done", "send-done", "recv-done", "iota"}
_SLICING = {"slice", "dynamic-slice", "gather"}


def _arrays(type_text: str) -> List[Tuple[int, bool]]:
    """[(bytes, in HBM)] of every array in a (possibly tuple) HLO type."""
    out = []
    for dt, dims, layout in _ARRAY.findall(type_text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        out.append((n * _ITEM[dt], not re.search(r"S\([1-9]\d*\)", layout or "")))
    return out


def _hbm(type_text: str) -> int:
    return sum(b for b, in_hbm in _arrays(type_text) if in_hbm)


def _split_operands(text: str) -> List[str]:
    """The top-level %names among an instruction's operands."""
    depth, cur, out = 0, "", []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                break
            depth -= 1
        cur += ch
    return re.findall(r"%([\w.\-]+)", cur)


def _computations(text: str) -> Dict[str, List[str]]:
    comps, name, body = {}, None, []
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            name, body = ("ENTRY" if head.group(1) else head.group(2)), []
            comps[name] = body
        elif line.startswith("}"):
            name = None
        elif name is not None:
            body.append(line)
    return comps


def _fusion_reads(lines: List[str]) -> Tuple[Dict[int, int], bool]:
    """Of a fused computation: {parameter index: bytes it reads} for parameters used only
    by slices / gathers, and whether its root updates parameter 0 in place."""
    params, users, sizes = {}, {}, {}
    root_dus = False
    for line in lines:
        m = _INSTR.match(line)
        if not m:
            continue
        name, ty, op, rest = m.groups()
        sizes[name] = sum(b for b, _ in _arrays(ty))
        if op == "parameter":
            params[name] = int(re.match(r"(\d+)", rest).group(1))
            continue
        for i, operand in enumerate(_split_operands(rest)):
            if operand in params:
                # a gather / dynamic-slice reads its slice of operand 0, the rest whole
                kind = op if (op in _SLICING and i == 0) else "whole"
                users.setdefault(operand, []).append((kind, name))
        if line.lstrip().startswith("ROOT") and op == "dynamic-update-slice":
            first = _split_operands(rest)[0]
            root_dus = params.get(first) == 0
    reads = {}
    for pname, idx in params.items():
        us = users.get(pname, [])
        if us and all(kind in _SLICING for kind, _ in us):
            reads[idx] = sum(sizes[u] for _, u in us)
    return reads, root_dus


def _root_op(lines: List[str]) -> str:
    for line in lines:
        if line.lstrip().startswith("ROOT"):
            m = _INSTR.match(line)
            return m.group(3) if m else ""
    return ""


def _scheduled(comps: Dict[str, List[str]]) -> set:
    """Computations that run as scheduled code: the entry and, transitively, the bodies
    and conditions of its loops, the callees of calls and the branches of conditionals
    (not fusion bodies, reducers or async wrappers)."""
    out, todo = set(), ["ENTRY"]
    while todo:
        c = todo.pop()
        if c in out or c not in comps:
            continue
        out.add(c)
        for line in comps[c]:
            m = _INSTR.match(line)
            if not m or m.group(3) not in ("while", "call", "conditional"):
                continue
            rest = m.group(4)
            for key in ("body", "condition", "to_apply", "true_computation",
                        "false_computation"):
                todo += re.findall(key + r"=%([\w.\-]+)", rest)
            b = re.search(r"branch_computations=\{([^}]*)\}", rest)
            if b:
                todo += re.findall(r"%([\w.\-]+)", b.group(1))
    return out


def hbm_bytes(hlo_text: str) -> float:
    """Bytes read from and written to HBM by one run of the program (loop bodies once)."""
    comps = _computations(hlo_text)
    scheduled = _scheduled(comps)
    fused: Dict[str, Tuple[Dict[int, int], bool]] = {}
    total = 0
    for cname in scheduled:
        types: Dict[str, str] = {}
        for line in comps[cname]:
            m = _INSTR.match(line)
            if not m:
                continue
            name, ty, op, rest = m.groups()
            types[name] = ty
            if op in _FREE:
                continue
            operands = _split_operands(rest)
            callee = re.search(r"calls=%([\w.\-]+)", rest)
            callee = callee.group(1) if callee else ""
            if op == "fusion":
                if callee not in fused:
                    fused[callee] = _fusion_reads(comps.get(callee, []))
                reads, in_place = fused[callee]
                for i, o in enumerate(operands):
                    if in_place and i == 0:
                        continue  # updated in place: only the update is written
                    full = _hbm(types.get(o, ""))
                    total += min(full, reads[i]) if i in reads else full
                if in_place and len(operands) > 1:
                    total += _hbm(types.get(operands[1], ""))
                elif not in_place:
                    total += _hbm(ty)
            elif op.endswith("-start"):
                # reads its sources, writes the destination: the first element of a
                # copy-start's (dst, src, context), the one after the operands of an
                # async-start's ((operands), output, context)
                arrays = _arrays(ty)
                src = sum(_hbm(types.get(o, "")) for o in operands)
                at = 0 if op == "copy-start" else len(operands)
                dst_bytes, dst_hbm = arrays[at] if len(arrays) > at else (0, False)
                if _root_op(comps.get(callee, [])) in _SLICING:
                    src = min(src, dst_bytes)  # a sliced prefetch reads its slice only
                total += src + (dst_bytes if dst_hbm else 0)
            elif op == "dynamic-update-slice":  # in place: the update is written
                total += 2 * _hbm(types.get(operands[1], ""))
            else:
                total += sum(_hbm(types.get(o, "")) for o in operands) + _hbm(ty)
    return float(total)
