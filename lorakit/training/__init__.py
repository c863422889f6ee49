"""Trainers: the shared Accelerate loop (:mod:`lorakit.training.loop`) and the recipes built on it."""
