"""The envelope's public names at their first import path, kept for users.

The envelope lives in ``django_apee.core.envelope``, the byte layout in
``django_apee.core.wire``.
"""

from django_apee.core.envelope import (
    DecodeError,
    Envelope,
    Meta,
    UnserializableValueError,
)

__all__ = ["DecodeError", "Envelope", "Meta", "UnserializableValueError"]
