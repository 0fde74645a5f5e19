"""``python -m mgg_fast`` (and the ``mgg-fast`` console script): see :mod:`mgg_fast.cli`."""

import os
import sys

from mgg_fast.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    # errors name the program as typed (argparse would say "__main__.py")
    sys.exit(main(prog=f"{os.path.basename(sys.executable) or 'python'} -m mgg_fast"))
