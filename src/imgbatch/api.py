"""The Python front door: plan, apply and generate, as a pipeline imports them.

Takes manifests (paths, text or mappings) and single requests; gives plans, reports and images.
The work is done in `imgbatch.run`; this module only names what a program may rely on.

    >>> from imgbatch.api import apply
    >>> apply("manifests/cyclist-spot.yaml", provider="placeholder").ok
    True
"""

from __future__ import annotations

from imgbatch.review.outcome import ApplyReport
from imgbatch.run.apply import (
    ApplyOptions,
    apply,
    apply_async,
    expand_shots,
    make_plan,
)
from imgbatch.run.generate import agenerate, generate

__all__ = [
    "ApplyOptions",
    "ApplyReport",
    "agenerate",
    "apply",
    "apply_async",
    "expand_shots",
    "generate",
    "make_plan",
]
