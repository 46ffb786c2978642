"""rlhf-cli: the ``rlhf`` command line composing the three-stage pipeline."""

from ._version import __version__

__all__ = ["__version__"]
