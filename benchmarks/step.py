"""`mlxvid bench step`, as a script: python benchmarks/step.py [OPTIONS] (see --help and benchmarks/README.md)."""

import sys

from harness import main

if __name__ == "__main__":
    main(["step", *sys.argv[1:]])
