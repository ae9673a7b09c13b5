"""Peak memory and time of the modularity loss at the published stage-1 shapes, on CPU.

One forward + backward of `modules.ops.modularity_loss` (concept chunks, running max,
arg-max backward) at B=16, K=2048, P=100 (a 40x40 grid sampled in 4x4 cells), D=384,
float32, against the literal formulation, which materialises B×K×P×P tensors (one is
1250 MiB). Each measurement runs in a fresh process so that its peak resident set size
(ru_maxrss) is its own; the number reported is the growth of that peak over the
process's peak before the call (imports and inputs).

    python benchmarks/bench_modularity.py                  # chunked only
    python benchmarks/bench_modularity.py --literal        # also run the literal (~5 GB)
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.ops import modularity_loss  # noqa: E402

MIB = 1 << 20


def literal_modularity_loss(concepts: torch.Tensor, feats: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    """SPEC §3 with the full [B, K, P, P] tensor."""
    normed = F.normalize(feats.detach(), dim=2)
    affinity = (normed @ normed.transpose(2, 1)).clamp(0)
    affinity = affinity - affinity * torch.eye(affinity.shape[1])
    degree = affinity.sum(dim=2, keepdim=True)
    edges = affinity.sum(dim=(1, 2), keepdim=True)
    weights = affinity - (degree / edges) @ (degree.transpose(2, 1) / edges) * edges
    assignment = (normed @ F.normalize(concepts, dim=1).t()).clamp(0).transpose(2, 1)
    delta = torch.tanh(assignment.unsqueeze(3) @ assignment.unsqueeze(2) / temp).max(dim=1).values
    return -((weights / edges) @ delta).diagonal(dim1=-2, dim2=-1).sum(dim=-1).mean()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB


def measure(method: str, chunk_size, batch: int, concepts: int, tokens: int, dim: int, repeats: int) -> dict:
    """One method in this process: peak RSS growth of the first call, median time of all."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(batch, tokens, dim, generator=gen)
    codebook = torch.empty(concepts, dim).uniform_(-1 / concepts, 1 / concepts, generator=gen)
    codebook.requires_grad_(True)
    before = peak_rss_mib()
    times, loss = [], None
    for _ in range(repeats):
        codebook.grad = None
        start = time.perf_counter()
        if method == "literal":
            loss = literal_modularity_loss(codebook, feats)
        else:
            loss = modularity_loss(codebook, feats, chunk_size=chunk_size)
        loss.backward()
        times.append(time.perf_counter() - start)
    return {
        "peak_mib": peak_rss_mib() - before,
        "seconds": statistics.median(times),
        "loss": float(loss),
        "grad_norm": float(codebook.grad.norm()),
    }


def run_child(method: str, chunk_size, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", method, "--chunk", str(chunk_size),
               "--batch", str(args.batch), "--concepts", str(args.concepts), "--tokens", str(args.tokens),
               "--dim", str(args.dim), "--repeats", str(args.repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{method} (chunk {chunk_size}) failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--concepts", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk-sizes", nargs="+", default=["16", "64", "auto", "512"],
                        help="concepts per chunk; 'auto' = the default, 2^24 // (B·P²) (104 here)")
    parser.add_argument("--repeats", type=int, default=3, help="forward+backward calls timed per method")
    parser.add_argument("--literal", action="store_true", help="also run the literal B×K×P×P formulation")
    parser.add_argument("--child", choices=["chunked", "literal"], help=argparse.SUPPRESS)
    parser.add_argument("--chunk", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        chunk = None if args.chunk == "auto" else int(args.chunk)
        print(json.dumps(measure(args.child, chunk, args.batch, args.concepts, args.tokens, args.dim, args.repeats)))
        return

    block_mib = args.batch * args.concepts * args.tokens ** 2 * 4 / MIB
    print(f"B={args.batch} K={args.concepts} P={args.tokens} D={args.dim} float32, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"literal formulation: one B×K×P×P float32 tensor = {block_mib:.0f} MiB; autograd keeps the tanh output "
          f"and its backward holds about three such tensors at once (~{3 * block_mib:.0f} MiB)")
    rows = [("chunked", chunk) for chunk in args.chunk_sizes] + ([("literal", "auto")] if args.literal else [])
    print(f"{'method':<9} {'chunk':>6} {'peak RSS growth (MiB)':>22} {'fwd+bwd (s)':>12} {'loss':>14} {'|grad|':>12}")
    for method, chunk in rows:
        result = run_child(method, chunk, args)
        label = "-" if method == "literal" else chunk
        print(f"{method:<9} {label:>6} {result['peak_mib']:>22.0f} {result['seconds']:>12.2f} "
              f"{result['loss']:>14.8f} {result['grad_norm']:>12.6g}")


if __name__ == "__main__":
    main()
