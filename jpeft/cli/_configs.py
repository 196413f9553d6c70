"""The published model configurations of :mod:`jpeft.models.published`, under the name the CLI used."""

from jpeft.models.published import ALIASES, PUBLISHED, lookup

__all__ = ["ALIASES", "PUBLISHED", "lookup"]
