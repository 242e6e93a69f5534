"""Verifiable requirements (IFEval's 25 instruction types and the project's own ``ecd:`` ones).

See :mod:`ecd_ray.constraints.catalogue` for the types and :mod:`ecd_ray.constraints.checkers`
for the check functions.
"""

from ecd_ray.constraints.catalogue import (
    CATALOGUE,
    IFEVAL_IDS,
    RequirementType,
    check_loose,
    check_strict,
    compatible_types,
    conflicts,
)

__all__ = [
    "CATALOGUE",
    "IFEVAL_IDS",
    "RequirementType",
    "check_loose",
    "check_strict",
    "compatible_types",
    "conflicts",
]
