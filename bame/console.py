"""How bame's commands speak and end: ``bame: error: ...`` lines on stderr, and their exit statuses.

Exit statuses (docs/run_folders.md; sweeps read their runs' to tell a divergence from a failure): 0 ok;
1 a sweep run failed or diverged; 2 a user mistake (one line per problem, no traceback); 3 the run
diverged; 128 + N a run stopped by signal N at the end of a step, with a checkpoint (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import sys

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE", "error", "warning"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process killed by it


def error(msg: str) -> None:
    print(f"bame: error: {msg}", file=sys.stderr)


def warning(msg: str) -> None:
    print(f"bame: warning: {msg}", file=sys.stderr)
