"""The one exception type of the conversion half.

Every failure a user can cause (bad source, broken checkpoint, unknown type, full disk)
becomes a ConvertError whose message is one line that names the problem and the fix;
the CLI prints it and exits 2 without a traceback.
"""

from __future__ import annotations


class ConvertError(Exception):
    """A conversion failed for a reason the user can act on; str(e) is one line."""
