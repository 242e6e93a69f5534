"""Verifiable requirements (IFEval's 25 instruction types and the project's own ``ecd:`` ones).

See :mod:`ecd_ray.constraints.catalogue` for the types, :mod:`ecd_ray.constraints.checkers`
for the check functions and :mod:`ecd_ray.constraints.stated` for whether an instruction
states a requirement.
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
from ecd_ray.constraints.stated import STATED_CHECKS, stated

__all__ = [
    "CATALOGUE",
    "IFEVAL_IDS",
    "RequirementType",
    "STATED_CHECKS",
    "check_loose",
    "check_strict",
    "compatible_types",
    "conflicts",
    "stated",
]
