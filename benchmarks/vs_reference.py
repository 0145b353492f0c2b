"""`mlxvid bench vs-reference`, as a script: python benchmarks/vs_reference.py [OPTIONS] (see --help and
benchmarks/README.md). Needs torch and diffusers; skips with a message without them."""

import sys

from harness import main

if __name__ == "__main__":
    main(["vs-reference", *sys.argv[1:]])
