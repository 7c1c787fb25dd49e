"""Inference benchmark (SPEC §12): peak host memory and time of ``sap infer`` on whole-body volumes.

CPU part (default): synthetic whole-body 2-channel MR cases (``T1``, ``b1000``; body, marrow-like
structure, bright lesions) of three sizes, predicted file-to-file by :func:`sap.infer.run_inference`
with a small stand-in network (Conv3d 2→4, 1³ → ReLU → Conv3d 4→2, 1³; fixed weights that make
the bright spots lesions) through the real engine, 96³ windows, overlap 0.5. The peer, in the same
run on the same files with the same network: a plain MONAI script (nibabel read, per-channel
percentile scaling, ``monai.inferers.sliding_window_inference`` with the full 2-channel output on
the CPU, softmax, threshold, cc3d, nibabel write).

Each row runs in its own process. Memory (SPEC §12) = peak RSS minus the baseline, the RSS right
after importing sap (or the peer's libraries) and building the model. The peak is ``VmHWM``, reset
through ``/proc/self/clear_refs`` when the baseline is read (falls back to ``ru_maxrss``), so it
covers everything after the baseline: a small warm-up case, then the measured case. The warm-up
only keeps one-off costs (lazy imports, first calls) out of the seconds; whatever it leaves
resident still counts against the memory bound (reported as ``warmup_mb``). Bound: at most
3 × channels × voxels × 4 bytes. Time = wall seconds of the measured case (read, preprocess,
predict, post-process, write); the median of ``--repeats`` runs is reported with seconds per
million voxels (constant when time is linear in voxels).

GPU part (``--gpu``, needs CUDA): the paper-scale Swin UNETR (feature_size 48, 96³ windows, random
weights, AMP) on a 400 × 300 × 1000 two-channel volume: end-to-end seconds of ``run_inference``,
engine seconds, peak GPU memory and host RSS increase; the peer is MONAI's
``sliding_window_inference`` with the whole output on the GPU (``device=cuda``) on the same array.

    python benchmarks/bench_infer.py                       # CPU table (3 sizes × 3 runs × 2 rows)
    python benchmarks/bench_infer.py --sizes 64x64x128 --repeats 1   # quick check
    python benchmarks/bench_infer.py --gpu                 # paper scale on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_SIZES = ("192x192x448", "256x192x640", "320x240x800")
CHANNELS = ("T1", "b1000")
ROI = (96, 96, 96)


# ----------------------------------------------------------------------------------- memory
def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_mb(reset_ok: bool) -> float:
    if reset_ok:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------- data
def write_case(folder: Path, shape: tuple[int, int, int], seed: int = 0, compress: bool = True) -> Path:
    """A whole-body-like 2-channel case: elliptic body along z, a bright 'spine', 12 lesions."""
    from sap.data.io import make_geometry, write_image

    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body2d = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    spine2d = (x / 0.08) ** 2 + ((y + 0.3) / 0.08) ** 2 < 1
    geometry = make_geometry(shape, (2.0, 2.0, 2.0), axcodes="LPS")
    lesions = [
        (rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8), rng.integers(8, shape[2] - 8))
        for _ in range(12)
    ]
    for c, name in enumerate(CHANNELS):
        volume = np.empty(shape, np.float32)
        base = np.where(body2d, 100.0, 0.0) + np.where(spine2d, 60.0 if c == 0 else -40.0, 0.0)
        for z in range(shape[2]):
            volume[:, :, z] = base + rng.normal(0, 5, shape[:2])
        for i, j, k in lesions:
            volume[i - 3 : i + 3, j - 3 : j + 3, k - 3 : k + 3] = 20.0 if c == 0 else 400.0
        write_image(
            volume,
            geometry,
            folder / f"{name}.nii.gz" if compress else folder / f"{name}.nii",
            compress=compress,
        )
    return folder


def standin_network():
    """Conv3d 2→4 (1³) → ReLU → Conv3d 4→2 (1³): logit_1 − logit_0 = 12 × b1000 − 9, so voxels
    whose normalised b1000 is near 1 (the lesions) are foreground. Pointwise layers keep the
    network's own per-window working memory small (a 3³ convolution on the CPU unfolds each 96³
    window into ~190 MB), so the measurement shows what grows with the volume."""
    import torch
    from torch import nn

    first = nn.Conv3d(2, 4, 1)
    second = nn.Conv3d(4, 2, 1)
    with torch.no_grad():
        first.weight.zero_()
        first.bias.zero_()
        first.weight[:, 1, 0, 0, 0] = 1.0
        second.weight.zero_()
        second.bias.zero_()
        second.weight[1, 0, 0, 0, 0] = 12.0
        second.bias[1] = -9.0
    return nn.Sequential(first, nn.ReLU(), second)


# ----------------------------------------------------------------------------------- workers
def worker_sap(case: Path, out: Path) -> dict:
    from sap.config import DataConfig
    from sap.infer import InferenceModel, InferOptions, run_inference

    data = DataConfig(channels=list(CHANNELS), modality="mr")
    model = InferenceModel.from_module(standin_network(), list(CHANNELS), data, roi_size=ROI)
    options = InferOptions(progress=False, overlap=0.5, sw_batch_size=2, device="cpu")
    base = _rss_mb()  # SPEC §12 baseline: sap imported, model loaded, nothing predicted yet
    reset_ok = _reset_peak()
    warmup = run_inference(case.parent / "warmup", out.parent / f"{out.name}_warmup", model, options)
    assert not warmup.failed, warmup.summary()
    after_warmup = _rss_mb()
    start = time.perf_counter()
    report = run_inference(case, out, model, options)
    seconds = time.perf_counter() - start
    assert not report.failed, report.summary()
    return {
        "seconds": seconds,
        "base_mb": base,
        "warmup_mb": after_warmup - base,
        "peak_mb": _peak_mb(reset_ok),
        "n_lesions": report.results[0].n_lesions,
    }


def _monai_pipeline(case: Path, out: Path, network) -> int:
    import cc3d
    import nibabel as nib
    import torch
    from monai.inferers import sliding_window_inference

    images = [nib.load(case / f"{name}.nii.gz") for name in CHANNELS]
    array = np.stack([img.get_fdata(dtype=np.float32) for img in images])
    for c in range(array.shape[0]):
        lo, hi = np.percentile(array[c], [1, 99])
        array[c] = (np.clip(array[c], lo, hi) - lo) / max(hi - lo, 1e-6)
    with torch.no_grad():
        logits = sliding_window_inference(
            torch.from_numpy(array)[None], ROI, 2, network, overlap=0.5, mode="gaussian", device="cpu"
        )
    prob = torch.softmax(logits, dim=1)[0, 1].numpy()
    labels = cc3d.connected_components(prob >= 0.5, connectivity=26)
    out.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(prob, images[0].affine), out / "prob.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint16), images[0].affine), out / "lesions.nii.gz")
    return int(labels.max())


def worker_monai(case: Path, out: Path) -> dict:
    import cc3d  # noqa: F401 - the peer's libraries are in its baseline, as sap is in sap's
    import monai.inferers  # noqa: F401
    import nibabel  # noqa: F401

    network = standin_network().eval()
    base = _rss_mb()
    reset_ok = _reset_peak()
    _monai_pipeline(case.parent / "warmup", out.parent / f"{out.name}_warmup", network)
    after_warmup = _rss_mb()
    start = time.perf_counter()
    n_lesions = _monai_pipeline(case, out, network)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "base_mb": base,
        "warmup_mb": after_warmup - base,
        "peak_mb": _peak_mb(reset_ok),
        "n_lesions": n_lesions,
    }


def run_worker(mode: str, case: Path, out: Path, threads: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--case",
        str(case),
        "--out",
        str(out),
        "--threads",
        str(threads),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- CPU table
def cpu_table(sizes: list[str], repeats: int, threads: int) -> str:
    rows = []
    with tempfile.TemporaryDirectory(prefix="sap-bench-infer-") as tmp:
        for size in sizes:
            shape = tuple(int(s) for s in size.split("x"))
            voxels = int(np.prod(shape))
            case = write_case(Path(tmp) / f"case_{size}" / "wb", shape)  # type: ignore[arg-type]
            write_case(Path(tmp) / f"case_{size}" / "warmup", (48, 48, 48), seed=1)
            budget_mb = 3 * len(CHANNELS) * voxels * 4 / 2**20
            for mode in ("sap", "monai"):
                runs = []
                for r in range(repeats):
                    out = Path(tmp) / f"out_{size}_{mode}_{r}"
                    runs.append(run_worker(mode, case, out, threads))
                    print(f"  {size} {mode} run {r + 1}: {runs[-1]}", file=sys.stderr)
                seconds = statistics.median(x["seconds"] for x in runs)
                deltas = [x["peak_mb"] - x["base_mb"] for x in runs]
                warmup = statistics.median(x["warmup_mb"] for x in runs)
                rows.append(
                    (size, voxels, mode, seconds, statistics.median(deltas), max(deltas), warmup, budget_mb,
                     runs[0]["n_lesions"])
                )
    lines = [
        "| volume (2 channels) | voxels | row | seconds (median) | s / Mvoxel | peak RSS − baseline (MB), "
        "median (max) | warm-up residue (MB) | 3 × C × V × 4 B (MB) | ratio to bound, median (max) "
        "| lesions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"sap": "sap infer (run_inference)", "monai": "peer: plain MONAI script"}
    for size, voxels, mode, seconds, delta, worst, warmup, budget, n in rows:
        lines.append(
            f"| {size} | {voxels / 1e6:.1f} M | {names[mode]} | {seconds:.2f} | {seconds / (voxels / 1e6):.3f} | "
            f"{delta:.0f} ({worst:.0f}) | {warmup:.0f} | {budget:.0f} | {delta / budget:.2f} ({worst / budget:.2f}) "
            f"| {n} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- GPU
def gpu_benchmark(shape: tuple[int, int, int], repeats: int, parts: tuple[str, ...] = ("engine", "e2e")) -> str:
    """Engine and peer first (cheap), then the end-to-end runs; progress is printed as it comes."""
    import torch
    from monai.inferers import sliding_window_inference

    from sap.config import load_config
    from sap.data.cases import Case
    from sap.infer import InferenceModel, InferOptions, run_inference
    from sap.infer.pipeline import prepare_image
    from sap.models.engine import sliding_window_predict
    from sap.models.swin import build_swin_unetr

    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    cfg = load_config("paper")
    torch.manual_seed(0)
    network = build_swin_unetr(cfg.model, 2, 2).eval()
    roi = tuple(cfg.model.patch_size)
    model = InferenceModel.from_module(network, list(CHANNELS), cfg.data, roi_size=roi)
    med = statistics.median
    voxels = int(np.prod(shape))
    engine, engine_mem, peer, peer_mem, e2e, e2e_mem, host = [], [], [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="sap-bench-infer-gpu-") as tmp:
        t = time.perf_counter()
        case = write_case(Path(tmp) / "wb", shape, compress=False)
        say(f"wrote {shape} × 2 channels (.nii) in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        image = None if "engine" not in parts else prepare_image(
            Case("wb", "wb", "patients", {c: case / f"{c}.nii" for c in CHANNELS}), cfg.data
        ).image
        say(f"read + preprocessed in {time.perf_counter() - t:.1f} s")
        for _ in range(repeats if "engine" in parts else 0):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            sliding_window_predict(network, image, roi, overlap=0.5, sw_batch_size=2, amp=True)
            torch.cuda.synchronize()
            engine.append(time.perf_counter() - start)
            engine_mem.append(torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                out = sliding_window_inference(
                    torch.from_numpy(image)[None],
                    roi,
                    2,
                    network.cuda(),
                    overlap=0.5,
                    mode="gaussian",
                    sw_device="cuda",
                    device="cuda",
                )
            prob = torch.softmax(out.float(), dim=1)[0, 1].cpu().numpy()
            torch.cuda.synchronize()
            peer.append(time.perf_counter() - start)
            peer_mem.append(torch.cuda.max_memory_allocated() / 2**30)
            del out, prob
            torch.cuda.empty_cache()
            say(
                f"  engine {engine[-1]:.1f} s / {engine_mem[-1]:.2f} GiB; peer {peer[-1]:.1f} s / {peer_mem[-1]:.2f} GiB"
            )
        del image
        for r in range(repeats if "e2e" in parts else 0):
            torch.cuda.reset_peak_memory_stats()
            base = _rss_mb()
            reset_ok = _reset_peak()
            start = time.perf_counter()
            report = run_inference(case, Path(tmp) / f"out{r}", model, InferOptions(progress=False, amp=True))
            e2e.append(time.perf_counter() - start)
            assert not report.failed, report.summary()
            e2e_mem.append(torch.cuda.max_memory_allocated() / 2**30)
            host.append(_peak_mb(reset_ok) - base)
            say(f"  end to end {e2e[-1]:.1f} s, GPU {e2e_mem[-1]:.2f} GiB, host +{host[-1]:.0f} MB")
    bound = 3 * 2 * voxels * 4 / 2**20
    lines = [
        f"Paper-scale Swin UNETR (feature_size 48, 96³ windows, overlap 0.5, 2 windows per batch, AMP), "
        f"{'×'.join(map(str, shape))} × 2 channels ({voxels / 1e6:.0f} M voxels), median of {repeats}:",
        "",
        "| row | seconds | peak GPU memory (GiB) | host RSS increase (MB) |",
        "|---|---|---|---|",
    ]
    if engine:
        lines += [
            f"| sap engine (`sliding_window_predict`, foreground channel stitched on the CPU) | {med(engine):.1f} | "
            f"{med(engine_mem):.2f} | — |",
            f"| peer: MONAI `sliding_window_inference`, 2-channel output on the GPU | {med(peer):.1f} | "
            f"{med(peer_mem):.2f} | — |",
        ]
    if e2e:
        lines.append(
            f"| sap infer end to end (read .nii, preprocess, predict, post-process, write .nii.gz) | {med(e2e):.1f} | "
            f"{med(e2e_mem):.2f} | {med(host):.0f} (bound {bound:.0f}) |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"
    try:
        import torch

        text += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=list(DEFAULT_SIZES), help="volumes XxYxZ (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per row; the median is reported (default: 3)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    parser.add_argument(
        "--gpu", action="store_true", help="paper-scale Swin UNETR on a 400×300×1000 volume (CUDA)"
    )
    parser.add_argument("--gpu-shape", default="400x300x1000", help="GPU volume XxYxZ (default: %(default)s)")
    parser.add_argument("--gpu-parts", default="engine,e2e",
                        help="GPU rows: engine (engine + MONAI peer), e2e (sap infer end to end) (default: %(default)s)")
    parser.add_argument("--worker", choices=["sap", "monai"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        fn = worker_sap if args.worker == "sap" else worker_monai
        print(json.dumps(fn(Path(args.case), Path(args.out))))
        return
    print(f"machine: {machine()}")
    if args.gpu:
        shape = tuple(int(s) for s in args.gpu_shape.split("x"))
        print(
            f"command: python benchmarks/bench_infer.py --gpu --gpu-shape {args.gpu_shape} --repeats {args.repeats}\n"
        )
        print(gpu_benchmark(shape, args.repeats, tuple(args.gpu_parts.split(","))))  # type: ignore[arg-type]
        return
    print(
        f"command: python benchmarks/bench_infer.py --sizes {' '.join(args.sizes)} --repeats {args.repeats} "
        f"--threads {args.threads}\n"
    )
    print(cpu_table(args.sizes, args.repeats, args.threads))


if __name__ == "__main__":
    main()
