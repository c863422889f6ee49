"""Toy world v2: 64x64 scenes in which every held-out concept is one identity (``kwibbit``) of a generic class
(``frog``) that the base model knows, as with DreamBooth's identifier + class. v1 (``lorakit.toyworld``) is
untouched; see ``docs/toyworld_v2.md``."""
