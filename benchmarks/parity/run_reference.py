"""Run one of the authors' stage scripts in this process, on the CPU, with ``reference_shim``'s patches.

    python benchmarks/parity/run_reference.py --reference SCRATCH_COPY --toy_crops DIR --seed S \
        [--inject SEED --orders F --probe F --record F] SCRIPT.py [script flags ...]

Run it from the folder that should receive the script's ``CAUSE/`` outputs.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inject  # noqa: E402
import reference_shim  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="scratch copy of the authors' repository")
    parser.add_argument("--toy_crops", required=True, help="toy data in the crop layout (parity.py writes it)")
    parser.add_argument("--seed", type=int, required=True, help="seeds python, numpy and torch before the script")
    inject.add_flags(parser)
    parser.add_argument("script", help="the authors' stage script, e.g. fine_tuning_mlp.py")
    known, rest = parser.parse_known_args()
    reference = os.path.abspath(known.reference)
    reference_shim.install(reference, os.path.abspath(known.toy_crops))
    reference_shim.seed_all(known.seed)
    inject.run_script(known, rest, reference, inject.install_reference, inject.log_reference_losses)


if __name__ == "__main__":
    main()
