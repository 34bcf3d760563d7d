"""Competitions and ensembles as YAML: pydantic models, loading, `defaults:` merging and `key=value` overrides.

Knows nothing of torch: every verb that only reads configs stays fast. One concern per module: `base` (the strict
model, the project folder, sizes), `competition`, `recipe` (a member's training options), `tuning`, `member`,
`ensemble` (members and how they combine), `loading` (YAML files, one-line errors, overrides).
"""

from .base import *  # noqa: F401,F403
from .competition import *  # noqa: F401,F403
from .ensemble import *  # noqa: F401,F403
from .loading import *  # noqa: F401,F403
from .member import *  # noqa: F401,F403
from .recipe import *  # noqa: F401,F403
from .tuning import *  # noqa: F401,F403
