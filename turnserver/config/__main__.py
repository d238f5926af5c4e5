"""``python -m turnserver.config --markdown`` prints the operator reference."""

import sys

from .reference import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
