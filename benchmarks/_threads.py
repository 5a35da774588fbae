"""Thread count of a benchmark, set before numpy / torch are imported.

Importing this module reads ``--threads N`` (or ``--threads=N``; default 2) from the command line
and exports it as OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS, so that the BLAS and
OpenMP pools of numpy, torch and obc_native all get the same count. It must be imported before
them; the scripts still declare ``--threads`` in their argparse parsers for ``--help``.
"""

import os
import sys


def threads_from_argv(argv: list[str]) -> str:
    """The value of ``--threads`` in ``argv``, or "2"."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "2"


THREADS = threads_from_argv(sys.argv)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = THREADS
