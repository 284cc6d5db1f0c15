"""The refinement methods, by the name a request gives in ``refine.method``.

This registry is the one list of methods: the request schema, the settings and ``RefineConfig`` take
their accepted values from it. A method is one class behind ``RefinementMethod``'s interface; add one
by writing the class and listing it here.
"""

from refiners.methods.base import RefinementMethod
from refiners.methods.coordinate import CoordinateMethod
from refiners.methods.gradient import GradientMethod
from refiners.methods.hybrid import HybridMethod

METHODS: dict[str, type[RefinementMethod]] = {
    m.name: m for m in (CoordinateMethod, GradientMethod, HybridMethod)
}

__all__ = ["METHODS", "CoordinateMethod", "GradientMethod", "HybridMethod", "RefinementMethod"]
