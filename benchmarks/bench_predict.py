"""Pseudo-label throughput: pictures per second of ``predict.py --ids_only`` on a folder, the whole command timed.

    python benchmarks/bench_predict.py --inputs data/toy/val/images -- --dataset toy --data_dir data \
        --arch vit_tiny_patch16_224 --num_codebook 256 --projection_dim 256 --train_resolution 320 \
        --num_workers 2 --crf_workers 2

Everything after ``--`` goes to predict.py (the flags of the run that trained the heads); the id maps are
written to a temporary folder that is removed afterwards. Start-up (imports, backbone and heads loading) is
included, as a user running the command sees it; ``--repeat`` takes the median of several runs.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", required=True, help="a folder of pictures (predict.py --inputs)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("predict_flags", nargs=argparse.REMAINDER, help="-- then predict.py's flags")
    args = parser.parse_args()
    flags = [f for f in args.predict_flags if f != "--"]
    seconds, count = [], 0
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as out:
            output = os.path.join(out, "ids")
            command = [sys.executable, "predict.py", *flags, "--inputs", args.inputs, "--output", output, "--ids_only"]
            start = time.perf_counter()
            subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - start)
            count = sum(name.endswith(".png") for _, _, names in os.walk(output) for name in names)
    median = statistics.median(seconds)
    runs = ", ".join(f"{s:.1f}" for s in seconds)
    print(f"{count} pictures in {median:.1f} s (median of {args.repeat}: {runs}): {count / median:.2f} pictures/s")


if __name__ == "__main__":
    main()
