"""Exceptions the command line maps to exit statuses (kept free of torch so ``lorakit --help`` stays fast)."""


class InsufficientMemory(ValueError):
    """A stage's memory estimate exceeds the free memory; the message is one line with the numbers and the override."""
