"""``python -m mgg_fast`` (and the ``mgg-fast`` console script): see :mod:`mgg_fast.cli`."""

import sys

from mgg_fast.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
