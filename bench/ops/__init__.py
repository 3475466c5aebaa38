"""The ops the suite knows, by name. One file per op; register it here."""
from bench.ops import bias_gelu

OPS = {spec.name: spec for spec in (bias_gelu.SPEC,)}
