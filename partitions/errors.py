"""The one exception type that the data layer raises for bad input.

Every message names the file, row or setting at fault and says what to do, so
the CLI can print it as is instead of a traceback from deep inside pandas or
OpenCV.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad site data or a bad setting; ``str(error)`` is the user-facing message."""
