"""Run one of the project's stage scripts in this process, optionally with injected random draws.

    python benchmarks/parity/run_project.py [--inject SEED --orders F --probe F --record F] \
        fine_tuning.py [script flags ...]
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import inject  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    inject.add_flags(parser)
    parser.add_argument("script", help="the project's stage script, e.g. fine_tuning.py")
    known, rest = parser.parse_known_args()
    inject.run_script(known, rest, ROOT, inject.install_project, inject.log_project_losses)


if __name__ == "__main__":
    main()
