"""What the project's command-line scripts share: help texts from a module docstring, and one-line
errors instead of tracebacks for the mistakes a user makes (a missing or unreadable file, a bad value)."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

#: ../shared/data beside the project, whatever the current directory
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: set (to anything but empty or 0) to get the full traceback instead of the one-line error
TRACEBACK_ENV = "NEUMONIA_DALI_TRACEBACK"


def want_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def script_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first paragraph and whose epilog is the rest
    (each said once), with defaults shown for every option that has help."""

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str | None:
            if action.nargs == 0 or "default" in (action.help or "") or action.default is None:
                return action.help  # flags, help that states its default, options without one
            return super()._get_help_string(action)

    first, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=first, epilog=rest or None, formatter_class=Formatter)


def run_cli(main: Callable[[], int], prog: str | None = None) -> int:
    """``main()``, with OSError and ValueError (bad input, missing or unwritable paths) and
    FloatingPointError (a diverged run) turned into one line on stderr and exit status 2 (the
    traceback with NEUMONIA_DALI_TRACEBACK=1)."""
    try:
        return main()
    except (OSError, ValueError, FloatingPointError) as error:
        if want_traceback():
            raise
        print(f"{prog or Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        return 2
