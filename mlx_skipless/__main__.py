"""`python -m mlx_skipless COMMAND ...`: the `mlx-skipless` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
