"""`mlxvid bench vae`, as a script: python benchmarks/vae.py [OPTIONS] (see --help and benchmarks/README.md)."""

import sys

from harness import main

if __name__ == "__main__":
    main(["vae", *sys.argv[1:]])
