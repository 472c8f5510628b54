"""How every giblet command ends: exit 0, or one line on stderr and exit 1 (130 on Ctrl-C)."""
from __future__ import annotations

import sys
from typing import Callable

from giblet.errors import GibletError


def one_line_errors(prog: str, body: Callable[[], int], *, debug: bool, interrupted: str) -> int:
    """Run ``body``; turn any exception into ``PROG: error: ...`` (the traceback only with ``debug``)."""
    try:
        return body()
    except GibletError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected library error: still one line
        if debug:
            raise
        print(f"{prog}: error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
