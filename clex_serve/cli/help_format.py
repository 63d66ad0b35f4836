"""The ``--help`` layout of every clex-serve command: each flag's default, said once."""

from __future__ import annotations

import argparse
import re

# A help text that already speaks of its default ("default: the model's", "default 12 on the CPU") says it
# better than argparse's "(default: None)" would.
_MENTIONS_DEFAULT = re.compile(r"\bdefaults?\b", re.IGNORECASE)


class DefaultsOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except that it adds "(default: X)" only where the help does not
    already mention a default, and not at all for an empty default (None, "", []: "(default: None)" tells
    nothing) or for on/off switches, whose default is plain from their name."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        empty = action.default is None or (isinstance(action.default, (str, list, tuple)) and not action.default)
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if empty or switch or _MENTIONS_DEFAULT.search(action.help or ""):
            return action.help
        return super()._get_help_string(action)
