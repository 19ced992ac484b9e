"""Does the DALI loader give the right batches on this GPU?  The first step of the device check.

CI runs every DALI graph on the CPU only; the GPU graph (nvJPEG through the `mixed` decoder, the GPU
resize, flip, rotation and noise, the decoded cache moved with `.gpu()`, the copy into torch's memory)
first runs on a CUDA machine.  This checks it against the DALI CPU loader on real files before any figure
is taken from it, in a few seconds, and exits 1 when a check fails, so that the device check trains
with the torchvision loader instead of measuring a broken one.  Files: up to 4 colour JPEGs among the
full-resolution ones (gray and colour files in one batch), gray ones up to 20, and 8 of the 224 set (RGB,
as every file of chest_xray_224: training there never takes the gray branch).

Checks (limits in the table; images float32 in [0, 1] before the noise):
  eval: every file once  both loaders deliver every file once, labels in order (else the rest is skipped)
  eval GPU vs CPU        mean |GPU - CPU| over all values, and the largest per-image mean (nvJPEG's IDCT
                         and DALI's GPU resize differ from libjpeg-turbo's and the CPU resize by rounding)
  all-RGB batch          the same comparison for one batch of the colour files alone, as chest_xray_224
                         gives (the gray branch of the decoder gets no sample)
  order and batches      a sampler order with duplicates and a partial last batch: batch sizes, labels
                         in the order, duplicates within 2/255 (nvJPEG may give two copies of a file in
                         one batch to its hardware and to its CUDA decoder)
  gray planes equal      every one-component JPEG gives 3 equal channels
  cached GPU vs GPU      the decoded cache (decoded once on the CPU, moved to the GPU per batch)
  training range         the training augmentation: finite, in [0, 1.5], its mean over the evaluation
                         mean in [1.05, 1.45] (noise mean 1.35; the rotation's zero fill lowers it)
  consumed without waiting  GPU only: batches copied by kernels queued behind a 10 ms GPU spin each, the
                         host running ahead as the training loop does between its loss reads, hold the
                         same images as batches copied at once (DALI must not reuse a batch's memory
                         before the GPU has read it)

    python scripts/dali_gpu_smoke.py --data .data [--cpu] [--json smoke.json]
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import SHARED_DATA, run_cli, script_parser  # noqa: E402

from pipelines.dali import DaliLoader, is_gray_jpeg, read_encoded  # noqa: E402
from pipelines.decoded_cache import DecodedCache  # noqa: E402
from report import markdown_table  # noqa: E402

BATCH = 16
DUPLICATE_TOLERANCE = 2 / 255
GPU_SPIN_CYCLES = 20_000_000  # torch.cuda._sleep: about 10 ms of one GPU thread spinning


def one_component(path: str | Path) -> bool:
    """Whether the loader decodes this file as one gray plane (its own flag, from the JPEG header)."""
    return bool(is_gray_jpeg(read_encoded(str(path))))


def pick_files(data: Path, n_fullres: int = 20, n_224: int = 8) -> list[str]:
    fullres = sorted((data / "chest_xray_fullres").rglob("*.jpeg"))
    if not fullres:
        raise SystemExit(f"no full-resolution JPEGs under {data / 'chest_xray_fullres'}")
    colour = [p for p in fullres if not one_component(p)]
    gray = [p for p in fullres if p not in colour]
    small = sorted((data / "chest_xray_224" / "test").rglob("*.jpeg"))[:n_224]
    return [str(p) for p in colour[:4] + gray[: n_fullres - len(colour[:4])] + small]


def run(loader: DaliLoader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.float().cpu())
        ys.append(y.cpu())
    return torch.cat(xs), torch.cat(ys), [len(y) for y in ys]


def check(name: str, value: float | str, limit: str, ok: bool) -> dict:
    return {"check": name, "value": value if isinstance(value, str) else f"{value:.5f}", "limit": limit,
            "ok": "yes" if ok else "NO"}


def smoke(files: list[str], device_id: int | None, threads: int) -> list[dict]:
    n = len(files)
    labels = list(range(n))

    def loader(order, augment=False, device=device_id, **kw) -> DaliLoader:
        return DaliLoader(files, labels, order, batch_size=BATCH, augment=augment, device_id=device,
                          num_threads=threads, **kw)

    rows = []
    gpu, y, sizes = run(loader(range(n)))
    cpu, y_cpu, _ = run(loader(range(n), device=None))
    delivered = len(gpu) == len(cpu) == n and y.tolist() == y_cpu.tolist() == labels
    rows.append(check("eval: every file once, in order", f"GPU {len(gpu)}, CPU {len(cpu)} images", f"{n}, in order",
                      delivered))
    if not delivered:
        return rows  # the comparisons below need both whole
    diff = (gpu - cpu).abs()
    per_image = diff.mean(dim=(1, 2, 3))
    rows.append(check("eval GPU vs CPU: mean |diff|", float(diff.mean()), "< 0.005", float(diff.mean()) < 0.005))
    rows.append(check("eval GPU vs CPU: worst image's mean |diff|", float(per_image.max()), "< 0.01",
                      float(per_image.max()) < 0.01))
    rows.append(check("eval GPU vs CPU: max |diff| (reported)", float(diff.max()), "-", True))
    rows.append(all_rgb_batch(files, loader))
    order = [i for i in range(n) for _ in range(1 + i % 3)][: 2 * BATCH + 5]
    x, y, sizes = run(loader(order))
    pairs = [(a, b) for a in range(len(order)) for b in range(a) if order[a] == order[b]]
    apart = max(float((x[a] - x[b]).abs().max()) for a, b in pairs) if len(x) == len(order) else float("inf")
    ok = sizes == [BATCH, BATCH, 5] and y.tolist() == order and apart <= DUPLICATE_TOLERANCE
    rows.append(check("order and batches: sizes, labels, duplicates", f"{sizes}, "
                      f"labels {'in order' if y.tolist() == order else 'WRONG'}, duplicates max |diff| "
                      f"{apart:.4f}", f"[{BATCH}, {BATCH}, 5], <= {DUPLICATE_TOLERANCE:.4f}", ok))
    gray = [i for i, f in enumerate(files) if one_component(f)]
    equal = all(torch.equal(gpu[i, 0], gpu[i, c]) for i in gray for c in (1, 2))
    rows.append(check(f"gray planes equal ({len(gray)} files)", "yes" if equal else "no", "yes", equal))
    cache = DecodedCache(files, num_threads=threads).fill()
    cached, _, _ = run(loader(range(n), cache=cache))
    cached_diff = float((cached - gpu).abs().mean())
    rows.append(check("cached GPU vs GPU: mean |diff|", cached_diff, "< 0.005", cached_diff < 0.005))
    aug, y, _ = run(loader(list(range(n)) * 4, augment=True))
    ratio = float(aug.mean() / gpu.mean())
    ok = bool(torch.isfinite(aug).all()) and float(aug.min()) >= 0 and float(aug.max()) <= 1.5 + 1e-5 \
        and 1.05 <= ratio <= 1.45 and aug.shape == (4 * n, 3, 224, 224)
    rows.append(check("training range: min / max / mean over eval mean",
                      f"{float(aug.min()):.3f} / {float(aug.max()):.3f} / {ratio:.3f}", "0 / <= 1.5 / 1.05-1.45", ok))
    spin = None if device_id is None else (lambda: torch.cuda._sleep(GPU_SPIN_CYCLES))
    rows.append(consumed_without_waiting(loader(list(range(n)) * 4), loader(list(range(n)) * 4), spin))
    return rows


def all_rgb_batch(files: list[str], loader: Callable[..., DaliLoader]) -> dict:
    """One evaluation batch of the colour files alone, GPU against CPU: mean |diff| and worst image's."""
    rgb = [i for i, f in enumerate(files) if not one_component(f)][:BATCH]
    gpu, _, sizes = run(loader(rgb))
    cpu, _, _ = run(loader(rgb, device=None))
    if sizes != [len(rgb)] or gpu.shape != cpu.shape:
        return check("all-RGB batch GPU vs CPU", f"batches {sizes}", f"[{len(rgb)}]", False)
    diff = (gpu - cpu).abs()
    mean, worst = float(diff.mean()), float(diff.mean(dim=(1, 2, 3)).max())
    return check(f"all-RGB batch ({len(rgb)} files) GPU vs CPU: mean / worst image's |diff|",
                 f"{mean:.5f} / {worst:.5f}", "< 0.005 / < 0.01", mean < 0.005 and worst < 0.01)


def consumed_without_waiting(first: Iterable, second: Iterable, spin: Callable[[], None] | None) -> dict:
    """The same evaluation batches copied at once (``first``) and by copies queued behind a GPU spin
    while the host runs ahead (``second``; ``spin`` queues the GPU's wait, None on the CPU): within the
    duplicates' tolerance (nvJPEG's two decoders) unless a batch's memory was reused before the GPU read
    it, which puts other images there."""
    name = "consumed without waiting: max |diff|"
    if spin is None:
        return check(name, "n/a on the CPU", f"<= {DUPLICATE_TOLERANCE:.4f}", True)
    at_once = torch.cat([x.cpu() for x, _ in first])
    queued = []
    for x, _ in second:
        spin()
        queued.append(x.clone())
    later = torch.cat(queued).cpu()
    worst = float((at_once - later).abs().max()) if later.shape == at_once.shape else float("inf")
    return check(f"{name} ({len(at_once)} images)", worst, f"<= {DUPLICATE_TOLERANCE:.4f}",
                 worst <= DUPLICATE_TOLERANCE)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", type=Path, default=SHARED_DATA,
                        help="folder holding chest_xray_fullres/ and chest_xray_224/")
    parser.add_argument("--cpu", action="store_true",
                        help="run the 'GPU' side on the CPU too (tries the script where there is no GPU)")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads (default 2)")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("CUDA is not available: give --cpu to try the checks on the CPU", file=sys.stderr)
        return 2
    files = pick_files(args.data)
    rows = smoke(files, None if args.cpu else 0, args.threads)
    print(f"DALI loader on {'the CPU (--cpu)' if args.cpu else 'cuda:0'} against DALI on the CPU, "
          f"{len(files)} files of {args.data}")
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    failed = [r["check"] for r in rows if r["ok"] != "yes"]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
