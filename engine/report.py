"""``report.html``: one self-contained page with everything a test.py run produced.

Sections (``<section id=...>``): ``config``, ``metrics`` (with the clusters used), ``iou`` (per-class bars),
``confusion``, ``losses`` (each training stage's ``<stage>_loss.png`` or ``<stage>.jsonl``) and ``examples``. Pictures
are embedded as base64 ``data:`` URIs and there is no script or external reference: the page opens anywhere, offline.
"""

import base64
import html
import io
import math
import os
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from engine.config import STAGE3_NOTES
from utils.atomic import atomic_write_bytes
from utils.visualize import plot_losses

# fmt: off
TITLES = {"config": "Configuration", "metrics": "Metrics", "iou": "Per-class IoU", "confusion": "Confusion matrix",
          "losses": "Training losses", "examples": "Examples"}
# The rows of the metrics table (test.py prints the same): title, key in metrics.json.
METRIC_ROWS = (("CAUSE (cluster probe)", "cluster"), ("CAUSE + CRF", "cluster_crf"),
               ("linear probe (supervised)", "linear"), ("linear probe + CRF", "linear_crf"),
               ("k-means on backbone tokens", "kmeans"), ("k-means on head features", "kmeans_head"))
# fmt: on
SECTIONS = tuple(TITLES)
STAGES = ("mediator", "front_door", "fine_tuning")

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 6px 0; }
.note { color: #666; font-size: 13px; }
.columns { display: flex; gap: 16px; align-items: flex-start; }
.columns table { font-size: 11px; }
.columns td, .columns th { padding: 1px 6px; }
"""


def iou_chart(iou, class_names):
    """Horizontal bars of per-class IoU (percent); absent classes (NaN) are labelled n/a."""
    n = len(class_names)
    fig = Figure(figsize=(7.0, max(2.0, 0.25 * n + 0.8)), dpi=100)
    ax = fig.subplots()
    values = [0.0 if math.isnan(v) else v for v in iou]
    ax.barh(range(n), values, color="#4a7ab5")
    for i, v in enumerate(iou):
        ax.text(min(values[i], 100.0) + 1, i, "n/a" if math.isnan(v) else f"{v:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(n), labels=class_names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("IoU (%)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def stage_loss_png(stage, log_dirs):
    """The PNG bytes of a stage's loss curves from the first of ``log_dirs`` that has them, or None."""
    for directory in log_dirs:
        picture = os.path.join(directory, f"{stage}_loss.png")
        if os.path.isfile(picture):
            return Path(picture).read_bytes()
        log = os.path.join(directory, f"{stage}.jsonl")
        if os.path.isfile(log):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    plot_losses(log, os.path.join(tmp, "loss.png"))
                except ValueError:
                    continue
                return Path(tmp, "loss.png").read_bytes()
    return None


def _image(png_bytes, alt):
    data = base64.b64encode(png_bytes).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _config_section(config):
    rows = [f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in sorted(config.items())]
    per_column = math.ceil(len(rows) / 3) or 1
    tables = "".join(f"<table>{''.join(rows[i : i + per_column])}</table>" for i in range(0, len(rows), per_column))
    return f"<div class=columns>{tables}</div>"


def _metrics_section(result):
    rows = ["<tr><th>method</th><th>mIoU (%)</th><th>pAcc (%)</th></tr>"]
    cells = "<tr><td>{}</td><td class=num>{:.2f}</td><td class=num>{:.2f}</td></tr>"
    rows += [cells.format(html.escape(t), result[k]["mIoU"], result[k]["pAcc"]) for t, k in METRIC_ROWS if k in result]
    used = f"clusters receiving pixels: {result['clusters_used']}/{result['n_classes']}"
    protocol = STAGE3_NOTES[result.get("stage3", "unknown")]
    return f"<table>{''.join(rows)}</table><p>{html.escape(used)}</p><p>{html.escape(protocol)}</p>"


def render_report(config, result, confusion_png, panel_pngs, log_dirs):
    """The page as a string; ``log_dirs``: folders searched, in order, for each stage's losses."""
    best, names = "cluster_crf" if "cluster_crf" in result else "cluster", result["class_names"]
    chart = _image(iou_chart(result[best]["iou"], names), "per-class IoU")
    confusion = _image(confusion_png, "confusion matrix") if confusion_png else "<p class=note>no confusion matrix</p>"
    losses = ""
    for stage in STAGES:
        png = stage_loss_png(stage, log_dirs)
        found = _image(png, f"{stage} loss") if png else f"<p class=note>no {stage}.jsonl log found</p>"
        losses += f"<h3>{stage}</h3>{found}"
    examples = "".join(_image(p, f"example {i}") for i, p in enumerate(panel_pngs))
    examples = f"<p class=note>image | ground truth | clusters | CRF | matched</p>{examples}" if panel_pngs else ""
    body = {
        "config": _config_section(config),
        "metrics": _metrics_section(result),
        "iou": f"<p class=note>{best}, Hungarian-matched</p>{chart}",
        "confusion": confusion,
        "losses": losses,
        "examples": examples or "<p class=note>no examples (--save_images 0)</p>",
    }
    heading = html.escape(f"CAUSE evaluation: {result['dataset']}, {result['head']} head, {result['backbone']}")
    sections = "".join(f'<section id="{key}"><h2>{TITLES[key]}</h2>{body[key]}</section>' for key in SECTIONS)
    head = f"<head><meta charset=utf-8><title>{heading}</title><style>{STYLE}</style></head>"
    return f"<!DOCTYPE html><html lang=en>{head}<body><h1>{heading}</h1>{sections}</body></html>\n"


def write_report(path, config, result, confusion_path, panel_paths, log_dirs):
    """Writes :func:`render_report` of a run to ``path`` (atomically), reading the pictures from disk."""
    confusion = Path(confusion_path).read_bytes() if confusion_path and os.path.isfile(confusion_path) else None
    page = render_report(config, result, confusion, [Path(p).read_bytes() for p in panel_paths], log_dirs)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
