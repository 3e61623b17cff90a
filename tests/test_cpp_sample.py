"""samples/cpp: the C++ pre/post-processing equals exporter/imaging.py; the TensorRT part where it can run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_reuse.base.imaging import (
    SAM1,
    SAM2,
    load_image_rgb,
    logits_to_mask,
    preprocess,
    prompt_arrays,
    upscale_logits,
)
from sam_reuse.base.records import Prompt
from tests.conftest import REPO, SAMPLES

SAMPLE = REPO / "samples" / "cpp"


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    if not (shutil.which("cmake") and shutil.which("c++")):
        pytest.skip("samples/cpp needs cmake and a C++ compiler")
    folder = tmp_path_factory.mktemp("cpp-build")
    configure = subprocess.run(["cmake", "-S", str(SAMPLE), "-B", str(folder)], capture_output=True, text=True)
    if configure.returncode != 0:
        pytest.skip(f"samples/cpp does not configure here (libjpeg/libpng missing?): {configure.stderr[-300:]}")
    subprocess.run(["cmake", "--build", str(folder), "-j", "2"], check=True, capture_output=True)
    return folder


def _images(folder: Path) -> list[tuple[Path, int, int]]:
    """Real bundled JPEG (1024x1024) plus other sizes and encodings: upscaled, downscaled, gray, palette, RGBA."""
    photo = load_image_rgb(SAMPLES / "10.jpg")
    cases = [(SAMPLES / "10.jpg", 512, 600)]
    variants = {"wide.jpg": Image.fromarray(photo).resize((640, 480)),
                "tall.png": Image.fromarray(photo).resize((900, 1500)),
                "gray.jpg": Image.fromarray(photo).convert("L").resize((700, 333)),
                "palette.png": Image.fromarray(photo).resize((317, 211)).convert("P"),
                "alpha.png": Image.fromarray(photo).resize((256, 300)).convert("RGBA")}
    for name, image in variants.items():
        image.save(folder / name, quality=90) if name.endswith(".jpg") else image.save(folder / name)
        cases.append((folder / name, image.width // 3, image.height // 2))
    return cases


def _run_check(build: Path, image: Path, prompts: list[str], out: Path, logits: Path | None = None,
               convention: str = SAM1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = [str(build / "sam_preprocess_check")] + (["--sam2"] if convention == SAM2 else []) + [str(image), str(out)]
    subprocess.run(args + (["--logits", str(logits)] if logits else []) + prompts, check=True, capture_output=True)


def _prompts(x: int, y: int) -> list[tuple[str, Prompt]]:
    """Command-line prompts of sam_trt's syntax and the same prompts for prompt_arrays: a point, a box with
    fractional corners, a box with a foreground and a background point, two points."""
    box = np.array([x / 3, y / 4 + 0.5, x * 1.5 + 0.25, y * 1.2])
    box_text = ",".join(f"{v:.2f}" for v in box)
    return [(f"p:{x},{y}", Prompt(points=np.array([[x, y]]), labels=np.array([1]))),
            (f"b:{box_text}", Prompt(box=box.round(2))),
            (f"b:{box_text}+p:{x},{y}+n:{x // 2},{y // 3}",
             Prompt(points=np.array([[x, y], [x // 2, y // 3]]), labels=np.array([1, 0]), box=box.round(2))),
            (f"n:{x},{y}+p:{x // 2}.5,{y}",
             Prompt(points=np.array([[x, y], [x // 2 + 0.5, y]]), labels=np.array([0, 1])))]


@pytest.mark.parametrize("convention", [SAM1, SAM2])
def test_cpp_preprocessing_and_prompts_equal_python(build, tmp_path, convention):
    for image, x, y in _images(tmp_path):
        prompts = _prompts(x, y)
        _run_check(build, image, [text for text, _ in prompts], tmp_path / image.stem, convention=convention)
        rgb = load_image_rgb(image)
        expected = preprocess(rgb, convention=convention)
        got = np.fromfile(tmp_path / image.stem / "input.f32", dtype=np.float32).reshape(expected.shape)
        if convention == SAM1:
            np.testing.assert_array_equal(got, expected, err_msg=str(image))
        else:  # Pillow 13 runs the vertical pass first for some shapes (which, it does not say): the last bit differs
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=str(image))
        for k, (text, prompt) in enumerate(prompts):
            coords, labels = prompt_arrays(prompt, rgb.shape[:2], convention=convention)
            written = np.fromfile(tmp_path / image.stem / f"prompt-{k}.f32", dtype=np.float32)
            np.testing.assert_array_equal(written, np.concatenate([coords.ravel(), labels.ravel()]),
                                          err_msg=f"{image} {text}")


@pytest.mark.parametrize("convention", [SAM1, SAM2])
def test_cpp_masks_equal_python_except_at_zero_logits(build, tmp_path, convention):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    logits = (40.0 - np.hypot(yy - 120, xx - 140) + rng.normal(0, 2, (256, 256))).astype(np.float32)
    logits.tofile(tmp_path / "logits.f32")
    for image, x, y in _images(tmp_path)[:3]:
        _run_check(build, image, [f"p:{x},{y}"], tmp_path / image.stem, tmp_path / "logits.f32", convention)
        hw = load_image_rgb(image).shape[:2]
        upscaled = upscale_logits(logits, hw, convention=convention)
        with Image.open(tmp_path / image.stem / "mask.png") as png:
            got = np.asarray(png) > 127
        assert got.shape == hw
        differ = got != logits_to_mask(upscaled)
        # The two sum in different orders: only pixels whose logit is within rounding of 0 may differ.
        assert np.abs(upscaled[differ]).max(initial=0.0) < 1e-4, str(image)
        assert 0.05 < got.mean() < 0.95


def test_cpp_check_names_a_bad_image_or_prompt(build, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = subprocess.run([str(build / "sam_preprocess_check"), str(tmp_path / "broken.jpg"), str(tmp_path),
                             "p:1,1"], capture_output=True, text=True)
    assert result.returncode == 1 and "broken.jpg: cannot read JPEG" in result.stderr
    for text, problem in (("p:1", "expected 2 numbers in '1'"), ("p:1,x", "'x' is not a number"),
                          ("q:1,2", "'q:1,2' is not p:X,Y, n:X,Y or b:X0,Y0,X1,Y1"),
                          ("b:1,2,3,4+b:1,2,3,4", "more than one box"),
                          ("p:1,2+", "'' is not p:X,Y"), ("b:1,2,3,nan", "'nan' is not a number")):
        result = subprocess.run([str(build / "sam_preprocess_check"), str(SAMPLES / "10.jpg"), str(tmp_path), text],
                                capture_output=True, text=True)
        assert result.returncode == 1 and f"prompt '{text}': {problem}" in result.stderr, (text, result.stderr)


def test_cpp_engines_run_like_onnx_runtime(build, mobilesam_export, sample_records, tmp_path):
    """Where TensorRT headers and a GPU exist: sam_trt's mask against the ONNX Runtime path's."""
    from sam_reuse.base.imaging import binary_iou
    from sam_reuse.calibrate.activations import encode
    from sam_reuse.calibrate.data import load_sample
    from sam_reuse.calibrate.evaluator import MaskEvaluator
    from sam_reuse.exporter.engine import build_engine, gpu_available

    if not (build / "sam_trt").exists():
        pytest.skip("sam_trt not built: no TensorRT/TensorRT-RTX headers (NvInfer.h) and library here; build "
                    "samples/cpp with -DTENSORRT_ROOT=... where TensorRT is installed")
    if not gpu_available():
        pytest.skip("sam_trt built, but running engines needs an NVIDIA GPU")
    sample = load_sample(sample_records[0])
    for name in ("encoder", "decoder"):
        build_engine(getattr(mobilesam_export, name), tmp_path / f"{name}.engine", "fp32")
    x, y = (int(v) for v in sample.prompt.points[0])
    subprocess.run([str(build / "sam_trt"), str(tmp_path / "encoder.engine"), str(tmp_path / "decoder.engine"),
                    str(sample.record.image), str(tmp_path), f"p:{x},{y}"], check=True)
    evaluator = MaskEvaluator(mobilesam_export.decoder, [sample], encode(mobilesam_export.encoder, [sample],
                                                                         progress=False))
    expected = evaluator.predicted_mask(evaluator.low_res_logits()[0], 0)
    with Image.open(tmp_path / "mask-0.png") as png:
        assert binary_iou(np.asarray(png) > 127, expected) > 0.98
