"""The earlier name of :mod:`tinynorm.runfiles` (the run directory's files):
``tinynorm.checkpoint`` is that module itself, so that code and scripts written
against it (``from tinynorm.checkpoint import CheckpointError``) keep working."""
import sys

from . import runfiles

sys.modules[__name__] = runfiles
