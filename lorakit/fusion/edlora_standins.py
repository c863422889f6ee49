"""The stand-ins of ED-LoRA concepts folded into plain words (:mod:`lorakit.fusion.edlora_fold`): which text
stands for which concept (``--concept-word NAME=TEXT``, default the concept's name), checked against the base
tokenizer, the other concepts' stand-ins and the plain LoRAs' triggers; prompts rewritten with them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorakit.adapters.edlora import read_edlora


@dataclass
class StandIn:
    """One ED-LoRA concept and the plain text that stands for it in the folded model."""

    name: str
    words: list[str]  # pseudo-words as in the file (renamed ones are set by ConceptFold.apply)
    text: str
    source: int  # index of the input adapter


def parse_concept_words(given) -> dict[str, str]:
    """``--concept-word NAME=TEXT ...`` -> ``{NAME: TEXT}``. Raises ValueError for a malformed or repeated entry."""
    out: dict[str, str] = {}
    for entry in given or []:
        name, sep, text = entry.partition("=")
        name, text = name.strip(), " ".join(text.split())
        if not sep or not name or not text:
            raise ValueError(f"--concept-word {entry!r}: expected CONCEPT=TEXT, e.g. robot='tin robot'")
        if name in out:
            raise ValueError(f"--concept-word names concept {name!r} twice")
        out[name] = text
    return out


def default_text(name: str) -> str:
    """The concept's name as plain words: ``<cat_toy>`` -> ``cat toy``."""
    return " ".join(re.sub(r"[^0-9A-Za-z']+", " ", name).split())


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[k : k + len(sub)] == sub for k in range(len(seq) - len(sub) + 1))


def resolve_stand_ins(pipe, concepts, given) -> list[StandIn]:
    """The stand-in of every ED-LoRA concept among the fusion's inputs, checked against the base tokenizer.

    Raises:
        ValueError (one line) for a ``--concept-word`` naming no concept, a stand-in that is empty, uses an added
        token or a pseudo-word, or collides with another concept's (equal, or one's tokens inside the other's).
    """
    chosen = parse_concept_words(given)
    found: list[StandIn] = []
    for i, c in enumerate(concepts):
        if c.adapter.kind != "edlora":
            continue
        info, _ = read_edlora(c.adapter, c.name)
        for concept in info["concepts"]:
            name = concept["name"]
            text = chosen.get(name) or default_text(name)
            if not text:
                raise ValueError(f"{c.name}: concept {name!r} has no usable name for a stand-in; give --concept-word "
                                 f"{name}=TEXT")
            found.append(StandIn(name, list(concept["words"]), text, i))
    if not found:
        raise ValueError("--fold-concepts: no input is an ED-LoRA file (plain LoRAs need no folding)")
    unknown = sorted(set(chosen) - {s.name for s in found})
    if unknown:
        raise ValueError(f"--concept-word {unknown[0]}=...: no ED-LoRA concept of that name (concepts: "
                         f"{', '.join(s.name for s in found)})")
    tok = pipe.tokenizer
    pseudo = {w for s in found for w in s.words}
    ids = {}
    for s in found:
        hit = [w for w in pseudo if w in s.text.split()]
        ids[s.name] = tok(s.text, add_special_tokens=False).input_ids
        if hit or not ids[s.name] or max(ids[s.name]) >= tok.vocab_size:
            raise ValueError(f"concept {s.name}: stand-in {s.text!r} must be plain words of the base vocabulary "
                             f"(no pseudo-word{', found ' + hit[0] if hit else ''}); give --concept-word {s.name}=TEXT")
    for c in concepts:  # a plain LoRA's trigger words keep calling that LoRA
        for word in (c.trigger or "").split(",") if c.adapter.kind != "edlora" else []:
            t = tok(word.strip(), add_special_tokens=False).input_ids
            for s in found:
                if t and (_contains(ids[s.name], t) or _contains(t, ids[s.name])):
                    raise ValueError(f"stand-in {s.text!r} of concept {s.name} collides with the trigger "
                                     f"{word.strip()!r} of {c.name}; give --concept-word {s.name}=TEXT")
    for k, a in enumerate(found):
        for b in found[k + 1 :]:
            if _contains(ids[a.name], ids[b.name]) or _contains(ids[b.name], ids[a.name]):
                raise ValueError(f"stand-ins collide: concept {a.name} ({a.text!r}) and concept {b.name} ({b.text!r}) "
                                 "would share words in the folded model; give each its own with --concept-word "
                                 "NAME=TEXT")
    return found


def with_stand_ins(prompt: str, subs: list[tuple[str, str]]) -> str:
    """``prompt`` with each ``(pseudo-words, stand-in)`` replaced. Raises ValueError when a pseudo-word is left
    (used apart from its concept's other words)."""
    out = prompt
    for words, text in subs:
        out = out.replace(words, text)
    left = [w for words, _ in subs for w in words.split() if w in out.split()]
    if left:
        raise ValueError(f"prompt {prompt!r} uses {left[0]} apart from its concept's other pseudo-words; the fold "
                         "needs them together, as in the file's trigger")
    return out
