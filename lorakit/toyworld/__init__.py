"""The toy world: procedural concepts, their renders and datasets, the tiny toy base, the concept LoRAs, the oracle
that says which concepts an image shows, and the demo built on them.

Importing it registers the toy world's ``oracle`` metric and its trigger-word descriptions into
:mod:`lorakit.eval.registry` (evaluation itself never imports the toy world).
"""

from lorakit.eval.registry import Metric, register, register_describer
from lorakit.toyworld.metrics import OracleSettings, describe_trigger

register("oracle", Metric("lorakit.toyworld.metrics:oracle", OracleSettings, "oracle"))
register_describer(describe_trigger)
