"""HBM traffic of a compiled program, read from its optimized HLO text.

XLA's `cost_analysis()["bytes accessed"]` sums the operands and outputs of every
instruction, wherever they live. On TPU the compiler's memory-space assignment copies
weights and activations into on-chip memory ahead of their use (`copy-start`, sliced
`async-start`; layouts marked `S(1)`), and the consumer then reads the on-chip copy, so a
weight read once from HBM is counted two or three times; a row gathered from an embedding
table counts as the whole table. For a decode step, which is bound by HBM bandwidth, that
is the difference between a plausible and a wildly pessimistic step time.

`hbm_bytes` counts what crosses HBM instead. It walks the scheduled computations (the
entry, loop bodies and conditions, called computations, conditional branches); a loop
counts once, as in XLA's cost analysis, or as many times as it runs (`trips`), and a
conditional counts its costliest branch. Per instruction it adds the operands and outputs
that live in HBM (memory space 0). A fusion operand that is only sliced or gathered (also
through bitcasts and nested fusions) counts the slices it reads, and an in-place update
(dynamic-update-slice, or a fusion with one at its root) counts the update only.

`collectives` walks the same computations for what crosses the chips' interconnect: each
all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute, its buffer, its
group size and the bytes a ring makes each participant send (`ring_factor`); the planner
times them (fr_jax.aot.compile).
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import numpy as np

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
    depth, cur = 0, ""
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


def _fusion_reads(callee: str, comps: Dict[str, List[str]], cache: Dict) -> Tuple[
        Dict[int, int], bool]:
    """Of a fused computation: {parameter index: bytes it reads} for the parameters that
    are only sliced or gathered (also through bitcasts and nested fusions), and whether its
    root updates parameter 0 in place."""
    if callee in cache:
        return cache[callee]
    params, users, sizes = {}, {}, {}
    root_dus = False
    for line in comps.get(callee, []):
        m = _INSTR.match(line)
        if not m:
            continue
        name, ty, op, rest = m.groups()
        sizes[name] = sum(b for b, _ in _arrays(ty))
        if op == "parameter":
            params[name] = int(re.match(r"(\d+)", rest).group(1))
        nested = re.search(r"calls=%([\w.\-]+)", rest) if op == "fusion" else None
        for i, operand in enumerate(_split_operands(rest) if op != "parameter" else []):
            users.setdefault(operand, []).append((op, i, name, nested.group(1) if nested else ""))
        if line.lstrip().startswith("ROOT") and op == "dynamic-update-slice":
            root_dus = params.get(_split_operands(rest)[0]) == 0

    def read(value: str, depth: int = 0):
        """Bytes of `value` its users read, or None when some user reads it whole."""
        total = 0
        for op, i, user, nested in users.get(value, []):
            if op in _SLICING and i == 0:
                total += sizes[user]
            elif op == "bitcast" and depth < 8:
                r = read(user, depth + 1)
                if r is None:
                    return None
                total += r
            elif op == "fusion" and nested:
                inner, _ = _fusion_reads(nested, comps, cache)
                if i not in inner:
                    return None
                total += inner[i]
            else:
                return None
        return total if users.get(value) else None

    reads = {}
    for pname, idx in params.items():
        r = read(pname)
        if r is not None:
            reads[idx] = r
    cache[callee] = (reads, root_dus)
    return cache[callee]


def _root_op(lines: List[str]) -> str:
    for line in lines:
        if line.lstrip().startswith("ROOT"):
            m = _INSTR.match(line)
            return m.group(3) if m else ""
    return ""


def _loop_trips(while_rest: str, cond: List[str]) -> int:
    """Iterations of a loop: XLA's own count where the compiler recorded it (backend_config
    known_trip_count), else read from its condition."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_rest)
    return max(1, int(m.group(1))) if m else _trip_count(cond)


def _trip_count(cond: List[str]) -> int:
    """Iterations of a loop whose condition is `counter < constant` (a scan, a fori_loop
    from 0); 1 when the condition has another form."""
    consts, root = {}, None
    for line in cond:
        m = _INSTR.match(line)
        if not m:
            continue
        if m.group(3) == "constant":
            v = re.match(r"(-?\d+)\)", m.group(4))
            if v:
                consts[m.group(1)] = int(v.group(1))
        if line.lstrip().startswith("ROOT"):
            root = m
    if root is None or root.group(3) != "compare" or "direction=LT" not in root.group(4):
        return 1
    operands = _split_operands(root.group(4))
    return max(1, consts.get(operands[1], 1)) if len(operands) == 2 else 1


def _fold(hlo_text: str, trips: bool, leaf, zero, rank=lambda v: v):
    """Sum of `leaf(op, type, rest, types, comps)` over the instructions one run executes:
    the scheduled computations from the entry down, a loop's body and condition once or with
    `trips` as many times as it runs, a call's callee, the conditional branch of highest
    `rank`. Leaves may be numbers or numpy arrays (several totals in one walk)."""
    comps = _computations(hlo_text)
    memo: Dict[str, object] = {}

    def cost(cname: str):
        if cname in memo:
            return memo[cname]
        memo[cname] = zero  # a (malformed) recursive call counts nothing
        types: Dict[str, str] = {}
        total = zero
        for line in comps.get(cname, []):
            m = _INSTR.match(line)
            if not m:
                continue
            name, ty, op, rest = m.groups()
            types[name] = ty
            callees = lambda key: re.findall(key + r"=%([\w.\-]+)", rest)
            if op == "while":
                n = _loop_trips(rest, comps.get(callees("condition")[0], [])) if trips else 1
                for c in callees("body") + callees("condition"):
                    total = total + n * cost(c)
            elif op == "call":
                for c in callees("to_apply"):
                    total = total + cost(c)
            elif op == "conditional":
                b = re.search(r"branch_computations=\{([^}]*)\}", rest)
                branches = (re.findall(r"%([\w.\-]+)", b.group(1)) if b else
                            callees("true_computation") + callees("false_computation"))
                if branches:
                    total = total + max((cost(c) for c in branches), key=rank)
            else:
                total = total + leaf(op, ty, rest, types, comps)
        memo[cname] = total
        return total

    return cost("ENTRY")


def hbm_bytes(hlo_text: str, trips: bool = False) -> float:
    """Bytes read from and written to HBM by one run of the program. A loop body counts
    once (XLA's cost analysis does the same), or with `trips` as many times as the loop
    runs; a conditional counts its costliest branch."""
    fused: Dict[str, Tuple[Dict[int, int], bool]] = {}

    def leaf(op, ty, rest, types, comps):
        if op in _FREE:
            return 0
        return _instruction_bytes(op, ty, rest, types, comps, fused)

    return float(_fold(hlo_text, trips, leaf, 0.0))


def _instruction_bytes(op, ty, rest, types, comps, fused) -> int:
    operands = _split_operands(rest)
    callee = re.search(r"calls=%([\w.\-]+)", rest)
    callee = callee.group(1) if callee else ""
    if op == "fusion":
        reads, in_place = _fusion_reads(callee, comps, fused)
        total = 0
        for i, o in enumerate(operands):
            if in_place and i == 0:
                continue  # updated in place: only the update is written
            full = _hbm(types.get(o, ""))
            total += min(full, reads[i]) if i in reads else full
        if in_place:
            return total + (_hbm(types.get(operands[1], "")) if len(operands) > 1 else 0)
        return total + _hbm(ty)
    if op.endswith("-start"):
        # reads its sources, writes the destination: the first element of a copy-start's
        # (dst, src, context), the one after the operands of an async-start's
        # ((operands), output, context)
        arrays = _arrays(ty)
        src = sum(_hbm(types.get(o, "")) for o in operands)
        at = 0 if op == "copy-start" else len(operands)
        dst_bytes, dst_hbm = arrays[at] if len(arrays) > at else (0, False)
        if _root_op(comps.get(callee, [])) in _SLICING:
            src = min(src, dst_bytes)  # a sliced prefetch reads its slice only
        return src + (dst_bytes if dst_hbm else 0)
    if op == "dynamic-update-slice":  # in place: the update is written
        return 2 * _hbm(types.get(operands[1], ""))
    if op in _SLICING:  # reads the slice it returns (and its indices)
        src = _hbm(types.get(operands[0], "")) if operands else 0
        out = sum(b for b, _ in _arrays(ty))
        rest_ops = sum(_hbm(types.get(o, "")) for o in operands[1:])
        return min(src, out) + _hbm(ty) + rest_ops
    return sum(_hbm(types.get(o, "")) for o in operands) + _hbm(ty)


# ---------------------------------------------------------------------------- collectives
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def ring_factor(kind: str, n: int) -> float:
    """Bytes each of `n` participants sends, per byte of the collective's buffer, in a ring:
    an all-reduce is a reduce-scatter then an all-gather of the whole buffer; an all-gather
    or a reduce-scatter passes on n - 1 of the n shards of the whole (gathered, or not yet
    scattered) buffer; an all-to-all keeps 1/n of its buffer; a permute sends it all."""
    if kind == "collective-permute":
        return 1.0
    if n <= 1:
        return 0.0
    return (2.0 if kind == "all-reduce" else 1.0) * (n - 1) / n


def group_size(rest: str, devices: int) -> int:
    """Participants of each group of a collective, from its replica_groups in any of the
    forms XLA prints: explicit {{0,1,..},..}, iota [groups,size]<=[..], mesh axes
    mesh['a'=2,'b'=4] {'b'}; an empty list means every device."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", rest)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,\s]*)\}", rest)
    if m:
        return len([d for d in m.group(1).split(",") if d.strip()])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:
        sizes = {a: int(s) for a, s in re.findall(r"'([^']+)'(?::\(\d+\))?=(\d+)", m.group(1))}
        n = 1
        for axis in re.findall(r"'([^']+)'", m.group(2)):
            n *= sizes.get(axis, 1)
        return n
    return devices


def _kind(op: str):
    """The collective an op is (itself or its -start half; -done halves move nothing new)."""
    for kind in KINDS:
        if op in (kind, kind + "-start"):
            return kind
    return None


def _operand_bytes(rest: str, types: Dict[str, str]) -> int:
    return sum(b for o in _split_operands(rest) for b, _ in _arrays(types.get(o, "")))


def _called(callee: str, comps: Dict[str, List[str]], cache: Dict) -> List[Tuple]:
    """[(kind, text with its groups, operand bytes)] of the collectives inside a fused or
    async-wrapped computation, nested ones too. An all-reduce of which the computation
    returns one dynamic slice is a reduce-scatter: the TPU compiler's form of it (a custom
    fusion `all-reduce-scatter`). The TPU compiler also splits a collective over several
    fusions that each hold it: the start (custom-call AsyncCollectiveStart), compute
    fusions it progresses alongside (`async_collective_fusion`) and the done
    (AsyncCollectiveDone); it counts at its start only."""
    if callee in cache:
        return cache[callee]
    cache[callee] = []  # a (malformed) recursive call finds nothing
    lines = comps.get(callee, [])
    if callee.startswith("async_collective_fusion") or any(
            'custom_call_target="AsyncCollectiveDone"' in line for line in lines):
        return []
    types: Dict[str, str] = {}
    found, root = [], None
    for line in lines:
        m = _INSTR.match(line)
        if not m:
            continue
        name, ty, op, rest = m.groups()
        types[name] = ty
        if line.lstrip().startswith("ROOT"):
            root = (op, rest)
        inner = re.search(r"calls=%([\w.\-]+)", rest)
        if _kind(op):
            found.append([_kind(op), rest, _operand_bytes(rest, types), name])
        elif op in ("fusion", "async-start") and inner:
            found += [[*f, ""] for f in _called(inner.group(1), comps, cache)]
    if root and root[0] == "dynamic-slice":
        sliced = _split_operands(root[1])[:1]
        for f in found:
            if f[0] == "all-reduce" and [f[3]] == sliced:
                f[0] = "reduce-scatter"
    cache[callee] = [tuple(f[:3]) for f in found]
    return cache[callee]


def collectives(hlo_text: str, trips: bool = False) -> Dict[str, Dict[str, float]]:
    """Every collective one run of the program makes, per kind: {count, bytes (the whole
    buffer: an all-gather's gathered result, a reduce-scatter's operand, the others'
    operands), wire (bytes each participant sends, `ring_factor`)}. Collectives inside
    fusions and async wrappers count, a -start/-done pair once. Loops count once or with
    `trips` as many times as they run; a conditional counts the branch that sends the
    most."""
    head = re.search(r"num_partitions=(\d+)", hlo_text)
    replicas = re.search(r"replica_count=(\d+)", hlo_text)
    devices = int(head.group(1) if head else 1) * int(replicas.group(1) if replicas else 1)
    zero = np.zeros((len(KINDS), 3))
    cache: Dict[str, List[Tuple]] = {}

    def leaf(op, ty, rest, types, comps):
        inner = re.search(r"calls=%([\w.\-]+)", rest)
        if _kind(op):
            found = [(_kind(op), rest, _operand_bytes(rest, types))]
        elif op in ("fusion", "async-start") and inner:
            found = _called(inner.group(1), comps, cache)
        else:
            return zero
        out = zero.copy()
        for kind, groups_text, operands in found:
            n = group_size(groups_text, devices)
            buffer = operands * (n if kind == "all-gather" else 1)
            out[KINDS.index(kind)] += (1, buffer, buffer * ring_factor(kind, n))
        return out

    total = _fold(hlo_text, trips, leaf, zero, rank=lambda v: v[:, 2].sum())
    return {k: dict(count=float(c), bytes=float(b), wire=float(w))
            for k, (c, b, w) in zip(KINDS, total)}


def collective_seconds(stats: Dict[str, Dict[str, float]], ici_bw: float) -> float:
    """Time on the wire of `collectives`' output at `ici_bw` bytes/s sent per chip."""
    return sum(s["wire"] for s in stats.values()) / ici_bw
