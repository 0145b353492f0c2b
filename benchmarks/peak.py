"""`mlxvid bench peak`, as a script: python benchmarks/peak.py [OPTIONS] (see --help and benchmarks/README.md)."""

import sys

from harness import main

if __name__ == "__main__":
    main(["peak", *sys.argv[1:]])
