"""The earlier name of :mod:`tinynorm.settings` (the scoped settings of the fast
paths): ``tinynorm.config`` is that module itself, so that code written against
it (``from tinynorm import config; config.using(...)``) keeps working."""
import sys

from . import settings

sys.modules[__name__] = settings
