"""Layer patterns: a model's shape written as data.

A pattern lists the decoder layers bottom to top, one attention *kind* per layer (see
:data:`megatron_ext.models.registry.ATTENTION_KINDS`)::

    "swa*8 [hsa swa*4]*2"      8 SWA layers, then two retrieval groups of (1 HSA + 4 SWA)   (SWA+HSA-345M)
    "swa*6 [gca*6]"            6 SWA layers, then one GCA group of 6 layers                 (DRT)
    "full*24"                  a dense GPT

Grammar (tokens separated by spaces or commas):

* ``kind`` or ``kind*N``: one layer, or N identical layers;
* ``kind:moe`` / ``kind:dense``: force a MoE or a dense MLP on that layer (otherwise megatron-core's
  ``moe_layer_freq`` decides when experts are configured);
* ``[ ... ]`` and ``[ ... ]*N``: a retrieval group. Retrieval layers (``hsa``, ``gca``) of one group share one
  retrieval (top-k chunks and weights), computed from the hidden state entering the group's first retrieval layer.
  A retrieval layer outside brackets forms a group of its own.

The chunk memory (chunk encoder output, K/V and landmarks) is computed once, at the first retrieval layer of the
model, and shared by every group above it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["LayerPlan", "parse_layer_pattern", "format_layer_pattern"]

_TOKEN = re.compile(r"\[|\]\*\d+|\]|[A-Za-z_][A-Za-z0-9_]*(?::(?:moe|dense))?(?:\*\d+)?")


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer is.

    index: 0-based global layer index; kind: attention kind name; mlp: "moe", "dense" or None (config decides);
    group: retrieval-group id (None for layers outside any group); group_head: this layer computes its group's
    retrieval; memory_builder: this layer computes the chunk memory (the first retrieval layer of the model).
    """

    index: int
    kind: str
    mlp: str | None = None
    group: int | None = None
    group_head: bool = False
    memory_builder: bool = False


def _tokenize(pattern: str) -> list[str]:
    text = pattern.replace(",", " ")
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(
                f"layer_pattern {pattern!r}: cannot read {text[pos:pos + 12]!r} at position {pos}; write layers as "
                f"'kind', 'kind*N', 'kind:moe', and groups as '[ ... ]' or '[ ... ]*N' (e.g. 'swa*8 [hsa swa*4]*2')"
            )
        tokens.append(m.group(0))
        pos = m.end()
    return tokens


def _expand(pattern: str, tokens: list[str]) -> list[tuple[str, str | None, int | None]]:
    """Flatten to (kind, mlp, bracket-group serial or None) per layer."""
    layers: list[tuple[str, str | None, int | None]] = []
    group_serial = 0
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "[":
            try:
                close = tokens.index("]", i) if "]" in tokens[i:] else None
            except ValueError:
                close = None
            # find the matching close token (no nesting allowed)
            j = i + 1
            while j < len(tokens) and not tokens[j].startswith("]"):
                if tokens[j] == "[":
                    raise ValueError(f"layer_pattern {pattern!r}: groups cannot be nested; close ']' before '['")
                j += 1
            if j == len(tokens):
                raise ValueError(f"layer_pattern {pattern!r}: '[' without a closing ']'")
            del close
            repeat = int(tokens[j][2:]) if tokens[j].startswith("]*") else 1
            inner = _expand(pattern, tokens[i + 1 : j])
            if not inner:
                raise ValueError(f"layer_pattern {pattern!r}: empty group '[]'")
            for _ in range(repeat):
                for kind, mlp, _unused in inner:
                    layers.append((kind, mlp, group_serial))
                group_serial += 1
            i = j + 1
            continue
        if tok.startswith("]"):
            raise ValueError(f"layer_pattern {pattern!r}: ']' without an opening '['")
        name, _, count = tok.partition("*")
        kind, _, mlp = name.partition(":")
        n = int(count) if count else 1
        if n < 1:
            raise ValueError(f"layer_pattern {pattern!r}: repeat count in {tok!r} must be >= 1")
        layers.extend((kind, mlp or None, None) for _ in range(n))
        i += 1
    return layers


def parse_layer_pattern(pattern: str, retrieval_kinds: set[str] | frozenset[str] = frozenset({"hsa", "gca"})):
    """Parse a pattern into one :class:`LayerPlan` per layer (kinds are checked by the registry, not here)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"layer_pattern must be a non-empty string such as 'swa*8 [hsa swa*4]*2', got {pattern!r}")
    flat = _expand(pattern, _tokenize(pattern))
    plans: list[LayerPlan] = []
    group_ids: dict[object, int] = {}
    heads_seen: set[int] = set()
    memory_built = False
    for index, (kind, mlp, bracket) in enumerate(flat):
        is_retrieval = kind in retrieval_kinds
        group = None
        if bracket is not None:
            group = group_ids.setdefault(("bracket", bracket), len(group_ids))
        elif is_retrieval:
            group = group_ids.setdefault(("single", index), len(group_ids))
        group_head = is_retrieval and group not in heads_seen
        if group_head:
            heads_seen.add(group)
        memory_builder = is_retrieval and not memory_built
        memory_built = memory_built or is_retrieval
        plans.append(LayerPlan(index, kind, mlp, group, group_head, memory_builder))
    for gid in set(p.group for p in plans if p.group is not None):
        if gid not in heads_seen:
            raise ValueError(
                f"layer_pattern {pattern!r}: a '[ ... ]' group has no retrieval layer ({sorted(retrieval_kinds)}); "
                f"groups exist to share one retrieval, so put an hsa or gca layer in it or drop the brackets"
            )
    return plans


def format_layer_pattern(plans: list[LayerPlan]) -> str:
    """A compact one-line rendering of parsed plans (run-length encoded), for summaries."""
    out: list[str] = []
    i = 0
    while i < len(plans):
        p = plans[i]
        if p.group is not None:
            j = i
            while j < len(plans) and plans[j].group == p.group:
                j += 1
            out.append("[" + format_layer_pattern([LayerPlan(q.index, q.kind, q.mlp) for q in plans[i:j]]) + "]")
            i = j
            continue
        j = i
        while j < len(plans) and plans[j].group is None and (plans[j].kind, plans[j].mlp) == (p.kind, p.mlp):
            j += 1
        name = p.kind + (f":{p.mlp}" if p.mlp else "")
        out.append(name if j - i == 1 else f"{name}*{j - i}")
        i = j
    return " ".join(out)
