"""Stateful layers built from the ops."""
from .base import *      # noqa: F401,F403
from .layers import *    # noqa: F401,F403
from .init import *      # noqa: F401,F403
from .norm import *      # noqa: F401,F403
