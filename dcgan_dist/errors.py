"""The two kinds of error a command ends with, each as one line on stderr.

- `config.ConfigError` (a ValueError): bad input, found before work starts or before a resume changes anything:
  exit 2, the run directory as it was.
- `RunError`: a failure during the run (bad data past a threshold, non-finite losses, an unreachable store after
  its retries): exit 1; the newest checkpoint is intact and the same command resumes.
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A failure during a run; the message is one line that says what failed and what to do."""
