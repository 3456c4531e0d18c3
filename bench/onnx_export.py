#!/usr/bin/env python3
"""--export onnx on a trained model and frames it never saw: how far onnxruntime's
probabilities are from the Keras model's (the export's check allows 1e-4), what the export
costs, and onnxruntime's forward rate against Keras's own predict at the same batch size.

Runs under the Keras backend of the environment (KERAS_BACKEND), with the packages of
requirements-onnx.txt (requirements-onnx-jax.txt under JAX):

    python build_multi_hot_model.py /work/data/train_a /work/data/train_a/labels.csv \\
        /tmp/real224 --weights ../shared/weights/mobilenet_v2_0.35_no_top_imagenet.weights.h5 \\
        --backbone mobilenet_v2 --alpha 0.35 --fine-tune-epochs 0 --epochs 5
    python bench/onnx_export.py /tmp/real224 /work/data/test_b
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import measurements  # noqa: E402  (same folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="A model directory written by a training script.")
    parser.add_argument("frames_dir", help="Frames the model never saw (any image files).")
    parser.add_argument("--frames", type=int, default=256, help="How many frames to compare.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="Timing rounds; medians reported.")
    parser.add_argument("--output", default=None,
                        help="Results file; default docs/measurements/onnx_export_BACKEND.md.")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)

    from symbol_trainer import backend, export, images, model_dir
    import onnxruntime

    keras = backend.keras
    loaded = model_dir.load_model_dir(args.model_dir)
    metadata = json.loads((Path(args.model_dir) / "metadata.json").read_text())
    geometry = images.ImageGeometry.from_json(metadata["input"])
    symbols = list(metadata["symbols"])
    files = sorted(p for p in Path(args.frames_dir).rglob("*")
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.frames]
    pixels = np.stack([images.load_image_array(p, geometry) for p in files])

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / export.ONNX_FILE
        clock = time.perf_counter()
        export.write_onnx(loaded.model, symbols, geometry, path)
        export_seconds = time.perf_counter() - clock
        size_mb = path.stat().st_size / 1e6
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def onnx_predict():
            parts = [session.run(names, {export.ONNX_INPUT: pixels[i:i + args.batch]})
                     for i in range(0, len(pixels), args.batch)]
            return {n: np.concatenate([p[k] for p in parts]).ravel() for k, n in enumerate(names)}

        def keras_predict():
            out = loaded.model.predict(pixels, batch_size=args.batch, verbose=0)
            return {s: np.ravel(keras.ops.convert_to_numpy(v)) for s, v in out.items()}

        got, expected = onnx_predict(), keras_predict()
        timings = {"onnxruntime": [], "keras": []}
        for _ in range(args.rounds):
            for name, run in (("onnxruntime", onnx_predict), ("keras", keras_predict)):
                clock = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - clock)

    differences = {s: float(np.max(np.abs(got[s] - expected[s]))) for s in symbols}
    rates = {k: len(pixels) / float(np.median(v)) for k, v in timings.items()}
    facts = measurements.header(f"ONNX export under {backend.BACKEND}: agreement and speed",
                                started, None)
    facts["backend"] = {"keras_backend": backend.BACKEND, "keras": keras.__version__,
                        "tensorflow": getattr(backend.tf, "__version__", "not imported"),
                        "visible_gpus": []}
    net = metadata["backbone"]
    data = {**facts, "model": {"backbone": net, "input": metadata["input"], "symbols": symbols},
            "frames": len(pixels), "frames_dir": str(args.frames_dir), "batch": args.batch,
            "max_difference": differences, "export_seconds": export_seconds,
            "onnx_megabytes": size_mb, "images_per_second": rates,
            "onnxruntime": onnxruntime.__version__, "load_average_1min": os.getloadavg()[0]}
    lines = [measurements.header_markdown(facts),
             f"Model: {args.model_dir}, {net['name']} alpha {net.get('alpha')} "
             f"({geometry.height}x{geometry.width} input, "
             f"{', '.join(symbols)}); {len(pixels)} frames of {args.frames_dir}, never seen in "
             f"training; batch {args.batch}, CPU, medians of {args.rounds} rounds. The speeds "
             f"are only comparable on an idle machine: load average {os.getloadavg()[0]:.1f} "
             f"over the last minute at the end, on {os.cpu_count()} cores.", "",
             "| | value |", "|---|---:|"]
    lines += [f"| largest difference in probability, {s} | {d:.2g} |"
              for s, d in differences.items()]
    lines += [f"| export time (write_onnx, s) | {export_seconds:.1f} |",
              f"| model.onnx size (MB) | {size_mb:.1f} |",
              f"| onnxruntime {onnxruntime.__version__}, images/s | {rates['onnxruntime']:.0f} |",
              f"| Keras predict ({backend.BACKEND}), images/s | {rates['keras']:.0f} |"]
    output = args.output or ROOT / "docs" / "measurements" / f"onnx_export_{backend.BACKEND}.md"
    for path in measurements.write(output, "\n".join(lines), data):
        print(f"Wrote {path}")
    print("\n".join(lines[-(len(differences) + 5):]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
