"""The envelope's public names, where releases before 0.2 exported them.

The format and its codecs live in ``django_apee.core.envelope``.
"""

from django_apee.core.envelope import (
    DecodeError,
    Envelope,
    Meta,
    UnserializableValueError,
)

__all__ = ["DecodeError", "Envelope", "Meta", "UnserializableValueError"]
