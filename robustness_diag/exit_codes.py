"""One home for the exit codes every command uses (stated in every command's ``--help`` and in the README)."""
from __future__ import annotations

#: everything asked for was done
EXIT_OK = 0
#: some inputs (images, checkpoints) failed, each named with its reason; the rest was processed
EXIT_FAILED = 1
#: usage or setup error (bad option, unreadable statistics, output not writable): nothing was processed
EXIT_USAGE = 2

EXIT_CODES_HELP = "exit codes: 0 all done, 1 some inputs failed (each named with its reason), 2 usage or setup error"

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_CODES_HELP"]
