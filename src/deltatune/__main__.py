"""``python -m deltatune …`` (and ``torchrun … -m deltatune train …``): the ``deltatune`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
