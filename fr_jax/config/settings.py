"""Settings declared once: each field's default, description, range and allowed words in one
row (`Setting`), rows grouped in sections (`Section`). The base config is built from the
rows, the checks (fr_jax.config.base.check_ranges) read their ranges and words, and the
--help screens their descriptions: nothing about a field is written twice.

A range end is a number, None (unbounded) or, for an open end, a string: "(0" (above 0),
"1)" (below 1).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import ml_collections


@dataclasses.dataclass(frozen=True)
class Setting:
    default: Any
    doc: str = ""
    lo: Optional[Union[float, str]] = None
    hi: Optional[Union[float, str]] = None
    words: Tuple[str, ...] = ()  # the values it accepts, when it takes words


@dataclasses.dataclass(frozen=True)
class Section:
    doc: str
    fields: Dict[str, Union[Setting, "Section"]]


def section(doc: str, **fields: Union[Setting, Section]) -> Section:
    return Section(doc, fields)


def build(sections: Mapping[str, Section]) -> ml_collections.ConfigDict:
    """The ConfigDict of `sections` at their defaults (dict defaults as nested ConfigDicts,
    fresh copies each time)."""
    def node(s: Section) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        for name, f in s.fields.items():
            if isinstance(f, Section):
                c[name] = node(f)
            elif isinstance(f.default, dict):
                c[name] = ml_collections.ConfigDict(copy.deepcopy(f.default))
            else:
                c[name] = f.default
        return c
    out = ml_collections.ConfigDict()
    for name, s in sections.items():
        out[name] = node(s)
    return out


def walk(sections: Mapping[str, Section], prefix: str = ""
         ) -> Iterator[Tuple[str, Union[Setting, Section]]]:
    """(dotted name, Setting or Section) of every entry, sections before their fields."""
    for name, f in sections.items():
        dotted = prefix + name
        yield dotted, f
        if isinstance(f, Section):
            yield from walk(f.fields, dotted + ".")


def ranges(sections: Mapping[str, Section]) -> Dict[str, tuple]:
    """{dotted field: (lo, hi)} of every field with a range."""
    return {k: (f.lo, f.hi) for k, f in walk(sections)
            if isinstance(f, Setting) and (f.lo is not None or f.hi is not None)}


def choices(sections: Mapping[str, Section]) -> Dict[str, Tuple[str, ...]]:
    """{dotted field: the words it accepts} of every field that takes words."""
    return {k: f.words for k, f in walk(sections) if isinstance(f, Setting) and f.words}


def docs(sections: Mapping[str, Section]) -> Dict[str, str]:
    """{dotted name: description}; a field whose default is a dict describes its entries
    too (`decode.mesh.*`)."""
    out = {}
    for k, f in walk(sections):
        if f.doc:
            out[k] = f.doc
            if isinstance(f, Setting) and isinstance(f.default, dict):
                out[k + ".*"] = f.doc
    return out
