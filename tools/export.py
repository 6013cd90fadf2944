"""Export a trained backbone for deployment: Paddle Inference (model.json + model.pdiparams) and/or ONNX.

    python tools/export.py --network r50 --weights backbone.pdparams --format both --output exported/r50

The output directory also gets meta.json (network, width, embedding size, input shape, preprocessing, checksum
of the source weights, parity figures). Every exported model is run on the same random batch as the dynamic-graph
model and the export fails (nothing written) if any output differs by more than --tolerance. The directory
appears complete or not at all: it is built under a temporary name beside it and renamed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from deploy.embedder import (
    META_NAME,
    ONNX_MODEL,
    PADDLE_MODEL,
    PADDLE_PARAMS,
    PREPROCESSING,
    DygraphEmbedder,
    OnnxEmbedder,
    PaddleInferenceEmbedder,
    file_sha256,
    load_backbone,
)
from utils.atomic import atomic_output_dir
from utils.cli import check_writable, exit_on_user_error, positive_float, positive_int, start_program
from utils.faces import render_face, sample_identity
from utils.image import INPUT_SIZE

ONNX_OPSET = 11


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence what C++ code prints to stdout/stderr (paddle2onnx, PIR passes); replay it if an error escapes."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            _restore(saved)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        _restore(saved)


def _restore(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in zip((1, 2), saved, strict=True):
        os.dup2(copy, fd)
        os.close(copy)


def save_paddle(model, out_dir: Path, batch_size: int | None) -> None:
    """`paddle.jit.to_static` + `paddle.jit.save` with an InputSpec [batch or None, 3, 112, 112]."""
    import paddle

    spec = paddle.static.InputSpec([batch_size, 3, INPUT_SIZE, INPUT_SIZE], "float32", "input")
    static = paddle.jit.to_static(model, input_spec=[spec], full_graph=True)
    paddle.jit.save(static, str(out_dir / Path(PADDLE_MODEL).stem))
    if not (out_dir / PADDLE_MODEL).is_file() or not (out_dir / PADDLE_PARAMS).is_file():
        raise RuntimeError(f"paddle.jit.save did not write {PADDLE_MODEL} + {PADDLE_PARAMS} in {out_dir}")


def save_onnx(out_dir: Path) -> None:
    """Convert the saved Paddle inference model with paddle2onnx's Python API."""
    try:
        import paddle2onnx
    except ImportError as e:
        raise RuntimeError(f"--format onnx needs paddle2onnx (pip install paddle2onnx==2.1.0): {e}") from None
    paddle2onnx.export(str(out_dir / PADDLE_MODEL), str(out_dir / PADDLE_PARAMS), save_file=str(out_dir / ONNX_MODEL),
                       opset_version=ONNX_OPSET, enable_onnx_checker=True, verbose=False, optimize_tool="None")
    if not (out_dir / ONNX_MODEL).is_file():
        raise RuntimeError(f"paddle2onnx did not write {out_dir / ONNX_MODEL}")


def parity(reference: DygraphEmbedder, exported: list, batch_size: int | None, seed: int = 0) -> dict[str, float]:
    """Max abs difference of each exported model's embeddings from the dynamic graph's on one batch.

    The batch is synthetic faces (utils/faces.py), the kind of input a face model is made for: on random noise a
    trained network's activations, and with them float32 rounding differences, can be far larger than on faces.
    """
    rng = np.random.default_rng(seed)
    images = np.stack([render_face(sample_identity(rng), rng)[0] for _ in range(batch_size or 3)])
    expected = reference.embed(images)
    return {e.backend: float(np.abs(e.embed(images) - expected).max()) for e in exported}


def export(network: str, weights: Path, output: Path, formats: tuple[str, ...], batch_size: int | None = None,
           width: float = 1.0, embedding_size: int = 512, tolerance: float = 1e-4, force: bool = False) -> dict:
    """Write the exported model(s) + meta.json into `output` atomically; returns the metadata."""
    if output.exists() and not force and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output}: exists (use --force to replace it)")
    check_writable(output.parent, folder=True)  # the export is built beside `output`, then renamed
    model = load_backbone(network, weights, width, embedding_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(output) as tmp:  # its mode comes from the umask (mkdtemp: 0700)
        meta = {
            "network": network, "width": width, "embedding_size": embedding_size,
            "input_shape": [batch_size, 3, INPUT_SIZE, INPUT_SIZE], "batch_size": batch_size,
            "input_name": "input", "preprocessing": PREPROCESSING,
            "files": {"paddle": [PADDLE_MODEL, PADDLE_PARAMS] if "paddle" in formats else None,
                      "onnx": ONNX_MODEL if "onnx" in formats else None},
            "onnx_opset": ONNX_OPSET if "onnx" in formats else None,
            "source": {"file": weights.name, "sha256": file_sha256(weights)},
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")  # the predictors read it
        with quiet_native_output():
            save_paddle(model, tmp, batch_size)
            exported = [PaddleInferenceEmbedder(tmp)] if "paddle" in formats else []
            if "onnx" in formats:
                save_onnx(tmp)
                exported.append(OnnxEmbedder(tmp / ONNX_MODEL))
        meta["parity_max_abs_diff"] = parity(DygraphEmbedder(model, embedding_size), exported, batch_size)
        bad = {k: v for k, v in meta["parity_max_abs_diff"].items() if not v <= tolerance}
        if bad:
            raise RuntimeError(f"exported model differs from the dynamic graph by {bad} > {tolerance}; nothing written")
        if "paddle" not in formats:  # the Paddle files were only the input of the ONNX conversion
            (tmp / PADDLE_MODEL).unlink()
            (tmp / PADDLE_PARAMS).unlink()
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def parse_batch_size(text: str) -> int | None:
    """argparse type: 'dynamic' (None) or a positive integer."""
    if text == "dynamic":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        message = f"--batch-size must be 'dynamic' or a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def main(argv: list[str] | None = None) -> int:
    start_program()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", required=True, help="backbone name (r18, r34, r50, r100, r200, mbf, mbf_large)")
    parser.add_argument("--weights", required=True, type=Path, help="backbone state dict (.pdparams)")
    parser.add_argument("--output", required=True, type=Path, help="directory to create")
    parser.add_argument("--format", choices=["paddle", "onnx", "both"], default="both")
    parser.add_argument("--batch-size", type=parse_batch_size, default=None,
                        help="'dynamic' (default) or a fixed batch size frozen into the model")
    parser.add_argument("--width", type=positive_float, default=1.0,
                        help="channel-width multiplier the model was trained with")
    parser.add_argument("--embedding-size", type=positive_int, default=512)
    parser.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="max abs difference allowed in the parity check")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    formats = ("paddle", "onnx") if args.format == "both" else (args.format,)
    return exit_on_user_error(lambda: export_and_report(args, formats), also=(RuntimeError,))


def export_and_report(args: argparse.Namespace, formats: tuple[str, ...]) -> int:
    meta = export(args.network, args.weights, args.output, formats, args.batch_size, args.width,
                  args.embedding_size, args.tolerance, args.force)
    batch = meta["batch_size"] or "dynamic"
    print(f"exported {args.network} (width {args.width}, {args.embedding_size}-d, batch {batch}) -> {args.output}")
    for backend, diff in meta["parity_max_abs_diff"].items():
        files = meta["files"][backend]
        print(f"  {backend:<6} {' + '.join(files) if isinstance(files, list) else files:<30} "
              f"max |diff| vs dygraph {diff:.2e} (tolerance {args.tolerance:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
