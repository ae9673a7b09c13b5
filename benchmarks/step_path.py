"""What a reader follows through one stage-2 run: the project functions it enters, file by file.

    python benchmarks/step_path.py [--head mlp|tr]

Trains a 64-concept codebook on the toy data (stage 1, two steps, in a temporary folder), then runs stage 2 for
two steps in this process under a profiler and records every project function entered: while setting up
(``main`` before ``fit``) and inside the training loop (``engine.loop.fit``). A function counts with its whole
source (``def`` to its last line, each line once per file); module-level code does not count. Data are loaded in
this process (``--num_workers 0``) so that the dataset's code is seen too. Prints one markdown table per phase.
"""

import argparse
import ast
import collections
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import engine.loop  # noqa: E402
import train_front_door  # noqa: E402

# The files that hold the method and its loop; everything else the step enters is data, backbone or plumbing.
METHOD = ("train_front_door.py", "engine/loop.py", "modules/")


def function_spans(path):
    """``{first line of a code object: (first, last) source line}`` for every function and lambda of a file."""
    spans = {}
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            spans[node.lineno] = spans[first] = (first, node.end_lineno)
    return spans


class Follower:
    """A profiler hook collecting the project functions entered, per phase."""

    def __init__(self):
        self.phase, self.entered = "setup", collections.defaultdict(set)

    def __call__(self, frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(ROOT + os.sep) and frame.f_code.co_name != "<module>":
            relative = os.path.relpath(path, ROOT)
            if not relative.startswith((".venv", "tests", "benchmarks")):
                self.entered[self.phase].add((relative, frame.f_code.co_firstlineno, frame.f_code.co_name))

    def table(self, phase):
        lines, names = collections.defaultdict(set), collections.defaultdict(set)
        for path, first, name in self.entered[phase]:
            start, end = function_spans(os.path.join(ROOT, path)).get(first, (first, first))
            lines[path].update(range(start, end + 1))
            if not name.startswith("<"):
                names[path].add(name)
        rows = sorted(lines, key=lambda p: (not p.startswith(METHOD), -len(lines[p])))
        out = ["| file | lines | functions |", "|---|---:|---|"]
        out += [f"| `{p}` | {len(lines[p])} | {', '.join(sorted(names[p]))} |" for p in rows]
        method = [p for p in rows if p.startswith(METHOD)]
        total = sum(len(lines[p]) for p in rows)
        out.append(
            f"\n{len(rows)} files, {total} lines; the script, the loop and the method: {len(method)} files, "
            f"{sum(len(lines[p]) for p in method)} lines"
        )
        return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="mlp", choices=("mlp", "tr"))
    head = parser.parse_args().head
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--data_dir", os.path.join(tmp, "data"), "--out", os.path.join(tmp, "out"), "--cpu"]
        common += ["--num_codebook", "64", "--batch_size", "4", "--num_workers", "0", "--max_steps", "2"]
        mediator = [sys.executable, os.path.join(ROOT, "train_mediator.py"), *common]
        subprocess.run(mediator, check=True, capture_output=True)
        follower, fit = Follower(), engine.loop.fit

        def followed_fit(*args, **kwargs):
            follower.phase = "training loop"
            try:
                return fit(*args, **kwargs)
            finally:
                follower.phase = "after"

        train_front_door.fit = followed_fit
        argv = [*common, "--head", head, "--projection_dim", "64"]
        sys.setprofile(follower)
        try:
            train_front_door.cli.run(train_front_door.main, train_front_door.parser(), argv)
        finally:
            sys.setprofile(None)
    for phase in ("training loop", "setup"):
        print(f"### stage 2 (`--head {head}`): {phase}\n\n{follower.table(phase)}\n")


if __name__ == "__main__":
    main()
