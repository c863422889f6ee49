"""Per-adapter prompt parts (``--prompt-parts per-adapter``): the part of a prompt each adapter's pass sees.

Composable-Diffusion style: a prompt is comma tags (``kwibbit, hattock, white plain background, inkvel``); each
adapter learned one trigger word. An adapter's part keeps the tags that hold its own trigger and the tags that
hold no adapter's trigger (the shared scene), so a LoRA is never conditioned on the other LoRAs' trigger words,
which it never saw in training (``kwibbit, white plain background`` for the frog LoRA above).
"""

from __future__ import annotations

import re


def _word(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", flags=re.IGNORECASE)


def tag_holds(tag: str, word: str) -> bool:
    """Whether comma tag ``tag`` holds ``word`` as a whole word (case-insensitive)."""
    return _word(word).search(tag) is not None


def _tags_and_triggers(prompt: str, triggers: list[str]) -> tuple[list[str], list[str]]:
    """The prompt's non-empty comma tags and the stripped trigger words, each checked to be in some tag."""
    tags = [t.strip() for t in prompt.split(",") if t.strip()]
    words = [(w or "").strip() for w in triggers]
    for word in words:
        if not word:
            raise ValueError("prompt parts: an adapter has no trigger word (set --triggers)")
        if not any(tag_holds(t, word) for t in tags):
            raise ValueError(f"prompt parts: trigger {word!r} is in no comma tag of the prompt {prompt!r}")
    return tags, words


def adapter_prompt_parts(prompt: str, triggers: list[str]) -> list[str]:
    """One prompt per trigger: the comma tags holding that trigger (as a whole word) plus those holding none.

    Example: ``adapter_prompt_parts("kwibbit, hattock, white plain background", ["kwibbit", "hattock"])`` is
    ``["kwibbit, white plain background", "hattock, white plain background"]``.
    Raises:
        ValueError: a trigger is empty or in no tag of the prompt (its adapter would see only the scene).
    """
    tags, words = _tags_and_triggers(prompt, triggers)
    return [", ".join(t for t in tags if tag_holds(t, word) or not any(tag_holds(t, w) for w in words))
            for word in words]


def _without(tag: str, words: list[str]) -> str:
    """``tag`` with each of ``words`` (whole words) taken out, spaces tidied."""
    for word in words:
        tag = _word(word).sub(" ", tag)
    return " ".join(tag.split())


def class_word_prompts(prompt: str, triggers: list[str]) -> tuple[str, list[str]]:
    """``--prompt-parts class-words``: the base model's prompt (every trigger word taken out of its tag, the class
    words left) and one prompt per adapter (the base's prompt with that adapter's trigger put back).

    Example: ``class_word_prompts("zorbo robot, hattock hat, night background", ["zorbo", "hattock"])`` is
    ``("robot, hat, night background", ["zorbo robot, hat, night background", "robot, hattock hat, night
    background"])``: no pass sees a trigger it does not know, and every pass sees the whole scene.
    Raises:
        ValueError: a trigger is empty or in no tag, or a tag holds nothing but triggers (no class word is left
            for the base to draw).
    """
    tags, words = _tags_and_triggers(prompt, triggers)
    stripped = [_without(t, words) for t in tags]
    bare = [orig for orig, new in zip(tags, stripped) if not new]
    if bare:
        raise ValueError(f"prompt parts class-words: the tag {bare[0]!r} holds only trigger words; write its class "
                         f"next to the trigger (e.g. 'kwibbit frog')")
    others = [[w for w in words if w.lower() != word.lower()] for word in words]  # a tag may hold two triggers
    parts = [", ".join(_without(orig, rest) if tag_holds(orig, word) else new for orig, new in zip(tags, stripped))
             for word, rest in zip(words, others)]
    return ", ".join(stripped), parts


def adapter_triggers(settings, adapters) -> list[str]:
    """Each adapter's trigger word: ``settings.triggers`` if set, else each file's ``lorakit.trigger`` metadata
    ("" where it has none)."""
    if settings.triggers:
        return list(settings.triggers)
    return [(a.metadata or {}).get("lorakit.trigger", "") for a in adapters]
