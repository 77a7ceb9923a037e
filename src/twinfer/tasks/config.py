"""The ``task`` part of a model's configuration, under the image tasks' own name.

The options, their TOML format and their checks live in :mod:`twinfer.taskconfig`,
outside this package: :mod:`twinfer.config` structures a model's task keys, and
importing :mod:`twinfer.tasks` would pull in the whole serving stack.
"""

from twinfer.taskconfig import *  # noqa: F403  (re-exported as they are)
