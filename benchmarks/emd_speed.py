"""Speed table of the EMD solvers (same code as ``deepemd bench emd``).

python benchmarks/emd_speed.py --quick
python benchmarks/emd_speed.py --sizes 25x25 --batches 1000 --threads 2
"""

import argparse
import sys

from deepemd.bench.emd import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
