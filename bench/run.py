"""Run the benchmark without the console script: ``python bench/run.py [options]`` is
``bharnet bench [options]`` (``--help`` lists them)."""
import argparse
import sys

from bharnet.bench import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bharnet bench")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
