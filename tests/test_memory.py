"""The modularity loss at the published stage-1 shapes: peak memory of one forward and backward under 4 GiB."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, resource, torch
from modules.objectives import modularity_loss
g = torch.Generator().manual_seed(0)
concepts = torch.empty(2048, 384).uniform_(-1 / 2048, 1 / 2048, generator=g).requires_grad_()
feats = torch.randn(16, 100, 384, generator=g)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
modularity_loss(concepts, feats).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
finite = bool(concepts.grad.isfinite().all())
print(json.dumps({"peak_kib": after, "growth_kib": after - before, "grad_finite": finite}))
"""


def test_modularity_loss_at_published_shapes_fits_in_memory():
    # B=16, K=2048, P=100, D=384: one literal B×K×P×P float32 tensor alone is 1.25 GiB and the
    # literal forward+backward grows the process by about 3.8 GiB.
    res = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["grad_finite"]
    assert out["peak_kib"] < 4 * 1024 * 1024
    assert out["growth_kib"] < 1024 * 1024
