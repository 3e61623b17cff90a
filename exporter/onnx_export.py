"""torch -> ONNX export of the encoder and single-mask decoder, verified against torch.

Exporter path: the TorchScript ("legacy") exporter at opset 17 by default.
Measured here on MobileSAM (torch 2.14.1, ONNX Runtime CPU, 2 threads) its
encoder runs about 1.3x faster than the dynamo exporter's at opset 18
(0.68 s vs 0.88 s median), writes one self-contained file, and opset 17 is
the first with ``LayerNormalization``, which TensorRT fuses. ``dynamo`` stays
selectable (``exporter="dynamo"``) and is always written without external
data when the model fits in 2 GB.

Every export is checked before anything is published: the ONNX Runtime
encoder against torch on real images, the decoder against
``SingleMaskDecoder`` and the final mask against ``SamPredictor``.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx

from sam_reuse.base import imaging
from sam_reuse.base.contract import (
    APP_DECODER_OUTPUTS,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    EMBEDDING,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    EXPORT_DERIVED_OUTPUTS,
    EXPORT_FORMAT,
    FIRST_ORDER_INPUTS,
    FIRST_ORDER_OUTPUTS,
    FIRST_ORDER_POINTS,
    FIRST_ORDER_SCORER,
    decoder_feeds,
)
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import STORAGE_ERRORS, folder_lock, sha256_file, staged_outputs, write_json
from sam_reuse.base.records import Record
from sam_reuse.base.runtime import onnx_io_spec, ort_session
from sam_reuse.exporter.models import SAM2_FAMILY, build_sam, spec_for
from sam_reuse.graphops.sites import sites_of

DEFAULT_OPSET = 17
MIN_OPSET = 7  # the oldest opset torch's exporter writes; a newer one it cannot use fails as one line (_torch_errors)
EXPORTERS = ("legacy", "dynamo")
TWO_GB = 2**31

# Parity limits an export must meet to be published.
ENCODER_MAX_ABS_DIFF = 1e-3
DECODER_MAX_ABS_DIFF = 1e-3
MIN_MASK_IOU = 0.999
FIRST_ORDER_MAX_REL_DIFF = 1e-3  # of the channel products' largest magnitude


@dataclass
class ExportResult:
    """Paths written by ``export_model`` and the sidecar it saved."""

    encoder: Path
    decoder: Path
    sidecar: Path
    info: dict[str, Any]


@contextlib.contextmanager
def _torch_errors(path: Path, exporter: str, opset: int) -> Iterator[None]:
    """torch's export failures as one line naming the file, the exporter and the opset."""
    try:
        yield
    except SamReuseError:
        raise
    except Exception as exc:  # torch raises many types; none of them is the user's to read in full
        storage = exc if isinstance(exc, OSError) else exc.__cause__ or exc.__context__
        if isinstance(storage, OSError) and storage.errno in STORAGE_ERRORS:  # the disk, not torch
            raise SamReuseError(f"{path.parent.parent}: {storage.strerror} while writing {path.name}; nothing was "
                                "written (free space or choose another folder)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SamReuseError(f"{path.name}: torch could not export it ({exporter} exporter, opset {opset}): "
                            f"{first[:300]}") from None


def _torch_export(module, args: tuple, path: Path, input_names: Sequence[str], output_names: Sequence[str],
                  dynamic: dict[str, dict[int, str]], exporter: str, opset: int) -> None:
    import torch

    with warnings.catch_warnings(), _torch_errors(path, exporter, opset):
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic, do_constant_folding=True)
        elif exporter == "dynamo":
            shapes = {name: {axis: torch.export.Dim.AUTO for axis in axes} for name, axes in dynamic.items()
                      if name in input_names}
            big = sum(p.numel() * p.element_size() for p in module.parameters()) >= TWO_GB
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                        input_names=list(input_names), output_names=list(output_names),
                                        dynamic_shapes=shapes, verbose=False)
            program.save(str(path), external_data=big)
        else:
            raise SamReuseError(f"unknown exporter '{exporter}'; choose from {', '.join(EXPORTERS)}")


def export_encoder(sam, path: Path, exporter: str = "legacy", opset: int = DEFAULT_OPSET) -> None:
    """Write the image encoder: ``image`` Bx3x1024x1024 -> ``image_embeddings`` Bx256x64x64."""
    import torch

    from sam_reuse.exporter.wrappers import ImageEncoder

    example = (torch.zeros(1, 3, 1024, 1024),)
    dynamic = {"image": {0: "batch"}, "image_embeddings": {0: "batch"}}
    with torch.no_grad():
        _torch_export(ImageEncoder(sam).eval(), example, path, ENCODER_INPUTS, ENCODER_OUTPUTS, dynamic,
                      exporter, opset)
    _declare_outputs(path, {"image_embeddings": ["batch", 256, 64, 64]})


def _declare_outputs(path: Path, shapes: dict[str, list[int | str]], properties: dict[str, str] | None = None
                     ) -> None:
    """Replace the exporter's generated dim names of ``shapes``' outputs by the known sizes, and add
    ``properties`` to the model's metadata, in one load and save.

    The ViT neck's output comes out as ``Add..._dim_2`` symbols; consumers
    (TensorRT profiles, graphops, the sidecar) need the real 64x64.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for name, dims in shapes.items():
        (output,) = [o for o in model.graph.output if o.name == name]
        for dim, value in zip(output.type.tensor_type.shape.dim, dims):
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value
    if properties:
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **properties})
    onnx.save(model, str(path))


def export_decoder(sam, path: Path, exporter: str = "legacy", opset: int = DEFAULT_OPSET) -> None:
    """Write the single-mask decoder (see ``exporter.wrappers.SingleMaskDecoder``)."""
    import torch

    from sam_reuse.exporter.wrappers import SingleMaskDecoder, example_decoder_inputs

    dynamic = {
        "image_embeddings": {0: "batch"},
        "point_coords": {0: "batch", 1: "num_points"},
        "point_labels": {0: "batch", 1: "num_points"},
        "mask_input": {0: "batch"},
        "has_mask_input": {0: "batch"},
        "low_res_masks": {0: "batch"},
        "iou_predictions": {0: "batch"},
    }
    with torch.no_grad():
        _torch_export(SingleMaskDecoder(sam).eval(), example_decoder_inputs(2, 3), path, DECODER_INPUTS,
                      DECODER_OUTPUTS, dynamic, exporter, opset)


# What the exported graphs compute, where it changed: an export of an older layout is made again, not reused
# (2026-12-08: the decoders compute every mask token and slice one, so a tune can choose the token).
EXPORT_LAYOUT = "every-mask-token"
APP_DECODERS = {"single": "decoder.prompts.onnx", "multimask": "decoder.prompts.multimask.onnx"}


def check_app_decoders(kinds: Sequence[str]) -> None:
    unknown = sorted(set(kinds) - set(APP_DECODERS))
    if unknown:
        raise SamReuseError(f"--app-decoders: unknown kind {', '.join(unknown)} "
                            f"(choose from {', '.join(APP_DECODERS)})")


def export_prompts_decoder(sam, path: Path, multimask: bool, exporter: str = "legacy",
                           opset: int = DEFAULT_OPSET) -> None:
    """Write the decoder for apps (``exporter.wrappers.PromptsDecoder``): one embedding, K prompts of N points."""
    import torch

    from sam_reuse.exporter.wrappers import PromptsDecoder, example_decoder_inputs

    embedding, *prompts = example_decoder_inputs(3, 2)
    dynamic = {"point_coords": {0: "prompts", 1: "num_points"}, "point_labels": {0: "prompts", 1: "num_points"},
               "mask_input": {0: "prompts"}, "has_mask_input": {0: "prompts"},
               "low_res_masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}}
    with torch.no_grad():
        _torch_export(PromptsDecoder(sam, multimask).eval(), (embedding[:1], *prompts), path, DECODER_INPUTS,
                      DECODER_OUTPUTS, dynamic, exporter, opset)


def export_first_order_scorer(sam, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write the first-order scorer (``exporter.wrappers.FirstOrderScorer``): batch 1, FIRST_ORDER_POINTS points.

    torch's ONNX exporters do not trace a backward pass, so ``make_fx`` first records the forward and the
    backward as plain aten operations, which the dynamo exporter then translates; shapes are fixed there. The
    exporter's own graph optimizer is skipped: it took half the export time, and ONNX Runtime optimizes the
    graph at load (the scorer runs as fast, values within 6e-7).
    """
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from sam_reuse.exporter.wrappers import FirstOrderScorer

    scorer = FirstOrderScorer(sam).eval()
    for parameter in scorer.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    example = (torch.randn(1, 256, 64, 64, generator=generator),
               torch.rand(1, FIRST_ORDER_POINTS, 2, generator=generator) * 1024,
               torch.tensor([[1.0] + [-1.0] * (FIRST_ORDER_POINTS - 1)]),
               (torch.rand(1, 256, 256, generator=generator) > 0.5).float(), torch.ones(1, 256, 256))

    class Traced(torch.nn.Module):  # named inputs: the exporter names the graph's inputs after them
        def __init__(self, graph_module: torch.nn.Module) -> None:
            super().__init__()
            self.graph_module = graph_module

        def forward(self, image_embeddings, point_coords, point_labels, target, valid):
            return self.graph_module(image_embeddings, point_coords, point_labels, target, valid)

    with warnings.catch_warnings(), _torch_errors(path, "dynamo", opset):
        warnings.simplefilter("ignore")
        module = Traced(make_fx(scorer)(*example))
        program = torch.onnx.export(module, example, dynamo=True, opset_version=max(opset, 18),
                                    input_names=list(FIRST_ORDER_INPUTS), output_names=list(FIRST_ORDER_OUTPUTS),
                                    optimize=False, verbose=False)
        program.save(str(path))


def verify_first_order_scorer(sam, path: Path, records: Sequence[Record]) -> float:
    """Largest |ONNX Runtime - torch| of the channel products over their largest magnitude, on the verify
    images with their prompts (those of FIRST_ORDER_POINTS points) and, as the target, torch's own mask."""
    import torch

    from sam_reuse.exporter.wrappers import FirstOrderScorer, ImageEncoder, SingleMaskDecoder

    session = ort_session(path)
    scorer, encoder, decoder = (FirstOrderScorer(sam).eval(), ImageEncoder(sam).eval(),
                                SingleMaskDecoder(sam).eval())
    worst = 0.0
    for record in records:
        image = imaging.load_image_rgb(record.image)
        coords, labels = imaging.prompt_arrays(record.prompt, image.shape[:2])
        if coords.shape[1] != FIRST_ORDER_POINTS:
            continue
        with torch.no_grad():
            embedding = encoder(torch.from_numpy(imaging.preprocess(image)))
            feeds = decoder_feeds(embedding.numpy(), coords, labels)
            logits = decoder(*(torch.from_numpy(feeds[name]) for name in DECODER_INPUTS))[0].numpy()[0, 0]
        target, valid = imaging.low_res_target(imaging.logits_to_mask(imaging.upscale_logits(logits, image.shape[:2])))
        inputs = (feeds[EMBEDDING], coords, labels, target[None], valid[None])
        expected = scorer(*(torch.from_numpy(x) for x in inputs))[0].detach().numpy()
        got = session.run(["channel_products"], dict(zip(FIRST_ORDER_INPUTS, inputs)))[0]
        worst = max(worst, float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12)))
    return worst


def verify_prompts_decoder(module, encoder, path: Path, records: Sequence[Record], convention: str = imaging.SAM1
                           ) -> float:
    """Max |ONNX - torch ``module``| of an app decoder's logits: every verify record's prompt at once on each
    image, the image encoded by the torch ``encoder`` (SAM's embedding, or SAM 2's three outputs)."""
    import torch

    from sam_reuse.exporter.wrappers import as_output_tuple

    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    images = [imaging.load_image_rgb(r.image) for r in records]
    prompts = [imaging.prompt_arrays(record.prompt, image.shape[:2], convention=convention)
               for record, image in zip(records, images)]
    worst = 0.0
    with torch.no_grad():
        for image in images:
            outputs = encoder(torch.from_numpy(imaging.preprocess(image, convention=convention)))
            embedding, *high_res = [o.numpy() for o in as_output_tuple(outputs)]
            for group in imaging.groups_by_point_count(prompts):
                coords = np.concatenate([prompts[k][0] for k in group])
                labels = np.concatenate([prompts[k][1] for k in group])
                feeds = decoder_feeds(embedding, coords, labels, high_res=high_res)
                onnx_logits = session.run(None, {name: feeds[name] for name in names})[0]
                torch_logits = module(*(torch.from_numpy(feeds[name]) for name in names))[0].numpy()
                worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
    return worst


def add_app_decoders(staging: Path, info: dict[str, Any], kinds: Sequence[str],
                     export_one: Callable[[Path, bool], None], decoder_of: Callable[[bool], Any], encoder,
                     records: Sequence[Record], convention: str = imaging.SAM1) -> None:
    """Write each app decoder (``export_one(path, multimask)``), check it against the torch module
    ``decoder_of(multimask)`` on every verify image, and record it in ``info["models"]``."""
    for kind in kinds:
        path, multimask = staging / APP_DECODERS[kind], kind == "multimask"
        export_one(path, multimask)
        difference = verify_prompts_decoder(decoder_of(multimask).eval(), encoder, path, records, convention)
        if difference > DECODER_MAX_ABS_DIFF:
            raise SamReuseError(f"{APP_DECODERS[kind]}: differs from torch by {difference:.3g} "
                                f"(> {DECODER_MAX_ABS_DIFF}); nothing was written")
        info["models"][f"decoder.prompts.{kind}"] = {"file": path.name, "sha256": sha256_file(path),
                                                     "max_abs_diff_vs_torch": difference, **onnx_io_spec(path)}


def verify_export(sam, encoder_path: Path, decoder_path: Path, records: Sequence[Record]) -> dict[str, Any]:
    """Compare the ONNX pair with torch on real images and return the parity figures.

    * ``encoder_max_abs_diff``: ONNX Runtime vs torch image embedding;
    * ``decoder_max_abs_diff``: ONNX Runtime vs torch ``SingleMaskDecoder``
      low-resolution logits, both fed the torch embedding;
    * ``predictor_max_abs_diff`` / ``min_mask_iou``: the whole ONNX path
      (preprocess, encoder, decoder, ``upscale_logits``) against
      ``SamPredictor.predict(multimask_output=False)``.
    Raises ``SamReuseError`` when a figure is outside the published limits.
    """
    import torch

    from sam_reuse.exporter.wrappers import SingleMaskDecoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything import SamPredictor

    encoder = ort_session(encoder_path)
    decoder = ort_session(decoder_path)
    torch_decoder = SingleMaskDecoder(sam).eval()
    predictor = SamPredictor(sam)
    figures = {"images": 0, "encoder_max_abs_diff": 0.0, "decoder_max_abs_diff": 0.0,
               "predictor_max_abs_diff": 0.0, "min_mask_iou": 1.0}
    for record in records:
        image = imaging.load_image_rgb(record.image)
        x = imaging.preprocess(image)
        with torch.no_grad():
            torch_embedding = sam.image_encoder(torch.from_numpy(x)).numpy()
        onnx_embedding = encoder.run(None, {"image": x})[0]
        coords, labels = imaging.prompt_arrays(record.prompt, image.shape[:2])
        feeds = decoder_feeds(torch_embedding, coords, labels)
        onnx_logits = decoder.run(None, feeds)[0]
        with torch.no_grad():
            torch_logits = torch_decoder(*(torch.from_numpy(feeds[name]) for name in feeds))[0].numpy()

        predictor.set_image(image)
        masks, _, low_res = predictor.predict(record.points, record.labels, record.box, multimask_output=False)
        onnx_path_logits = decoder.run(None, decoder_feeds(onnx_embedding, coords, labels))[0]
        require_finite({"image embedding": onnx_embedding, "mask logits": onnx_logits,
                        "mask logits on its own embedding": onnx_path_logits}, record.image)
        onnx_mask = imaging.logits_to_mask(imaging.upscale_logits(onnx_path_logits, image.shape[:2]))[0, 0]

        figures["images"] += 1
        figures["encoder_max_abs_diff"] = max(figures["encoder_max_abs_diff"],
                                              float(np.abs(onnx_embedding - torch_embedding).max()))
        figures["decoder_max_abs_diff"] = max(figures["decoder_max_abs_diff"],
                                              float(np.abs(onnx_logits - torch_logits).max()))
        figures["predictor_max_abs_diff"] = max(figures["predictor_max_abs_diff"],
                                                float(np.abs(onnx_path_logits[0] - low_res).max()))
        figures["min_mask_iou"] = min(figures["min_mask_iou"], imaging.binary_iou(onnx_mask, masks[0], empty=1.0))
    _check_limits(figures)
    return figures


def require_finite(outputs: dict[str, np.ndarray], image: Path) -> None:
    """Refuse ONNX outputs holding NaN or inf: differences between NaN outputs are NaN, which no limit catches
    (a checkpoint with NaN weights exported 'with max|diff| 0' while every output was NaN)."""
    bad = [name for name, values in outputs.items() if not np.isfinite(values).all()]
    if bad:
        raise SamReuseError(f"{image}: the exported model's {', '.join(bad)} hold NaN or inf values (are the "
                            "checkpoint's weights finite?); nothing was written")


def _check_limits(figures: dict[str, Any]) -> None:
    problems = []
    if figures["encoder_max_abs_diff"] > ENCODER_MAX_ABS_DIFF:
        problems.append(f"encoder max abs diff {figures['encoder_max_abs_diff']:.3g} > {ENCODER_MAX_ABS_DIFF}")
    for key in ("decoder_max_abs_diff", "predictor_max_abs_diff"):
        if figures[key] > DECODER_MAX_ABS_DIFF:
            problems.append(f"{key} {figures[key]:.3g} > {DECODER_MAX_ABS_DIFF}")
    if figures["min_mask_iou"] < MIN_MASK_IOU:
        problems.append(f"mask IoU vs SamPredictor {figures['min_mask_iou']:.5f} < {MIN_MASK_IOU}")
    if problems:
        raise SamReuseError("ONNX export does not match torch: " + "; ".join(problems))


def export_model(model_type: str, out_dir: str | Path, checkpoint: str | Path | None = None,
                 verify_records: Sequence[Record] = (), exporter: str = "legacy", opset: int = DEFAULT_OPSET,
                 seed: int = 0, app_decoders: Sequence[str] = (), first_order: bool = False) -> ExportResult:
    """Export ``encoder.onnx``, ``decoder.onnx`` and ``export.json`` (and any ``app_decoders``, and with
    ``first_order`` the search's first-order scorer) into ``out_dir``.

    Nothing appears in ``out_dir`` unless every model was written and passed
    verification on ``verify_records``; existing files are replaced atomically.
    """
    check_export_request(model_type, exporter, verify_records, opset)
    check_app_decoders(app_decoders)
    sam = build_sam(model_type, checkpoint, seed=seed)
    if spec_for(model_type).family == SAM2_FAMILY:
        from sam_reuse.exporter.sam2_export import export_sam2

        return export_sam2(sam, out_dir, verify_records, export_identity(model_type, checkpoint, seed, exporter,
                                                                         opset), app_decoders=app_decoders)
    return export_sam(sam, out_dir, verify_records, export_identity(model_type, checkpoint, seed, exporter, opset),
                      app_decoders=app_decoders, first_order=first_order)


def check_export_request(model_type: str, exporter: str, verify_records: Sequence[Record],
                         opset: int = DEFAULT_OPSET) -> None:
    """Fail before any model is built when the request cannot be exported and verified."""
    spec_for(model_type)
    if exporter not in EXPORTERS:
        raise SamReuseError(f"unknown exporter '{exporter}'; choose from {', '.join(EXPORTERS)}")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise SamReuseError(f"--opset {opset}: not an opset torch can export to here ({MIN_OPSET} to {newest}; "
                            f"default {DEFAULT_OPSET})")
    if not verify_records:
        raise SamReuseError("export needs at least one image to verify the ONNX models against torch")


def export_identity(model_type: str, checkpoint: str | Path | None, seed: int, exporter: str,
                    opset: int) -> dict[str, Any]:
    """What an export was made from; ``existing_export`` compares it before reusing a folder."""
    return {
        "model_type": model_type,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "seed": seed if checkpoint is None else None,
        "exporter": exporter,
        "opset": opset,
        "layout": EXPORT_LAYOUT,
    }


def export_sam(sam, out_dir: str | Path, verify_records: Sequence[Record], info: dict[str, Any],
               reference=None, app_decoders: Sequence[str] = (), first_order: bool = False) -> ExportResult:
    """Export a built ``sam`` into ``out_dir`` and verify it against ``reference`` (default: ``sam`` itself).

    A fine-tuned model is exported with its adapters merged and verified
    against the unmerged model, so the parity figures cover the merge too.
    ``info`` must name the exporter and opset; it is completed and saved as
    ``export.json``. ``app_decoders`` (keys of ``APP_DECODERS``): also write the decoders for apps, each
    checked against torch on every verify image with all the verify prompts at once. ``first_order``: also
    write ``FIRST_ORDER_SCORER``, checked against torch on the verify images.
    """
    out_dir = Path(out_dir)
    exporter, opset = info["exporter"], info["opset"]
    check_app_decoders(app_decoders)
    from sam_reuse.exporter.wrappers import ImageEncoder, PromptsDecoder

    reference_model = reference if reference is not None else sam
    replacing = (*EXPORT_DERIVED_OUTPUTS, APP_DECODER_OUTPUTS, FIRST_ORDER_SCORER)
    with folder_lock(out_dir), staged_outputs(out_dir, replacing=replacing) as staging:
        started = time.perf_counter()
        export_encoder(sam, staging / "encoder.onnx", exporter, opset)
        export_decoder(sam, staging / "decoder.onnx", exporter, opset)
        export_seconds = time.perf_counter() - started
        parity = verify_export(reference_model, staging / "encoder.onnx", staging / "decoder.onnx", verify_records)
        info = {
            **info,
            "export_seconds": round(export_seconds, 2),
            "models": {
                "encoder": {"file": "encoder.onnx", "sha256": sha256_file(staging / "encoder.onnx"),
                            **onnx_io_spec(staging / "encoder.onnx")},
                "decoder": {"file": "decoder.onnx", "sha256": sha256_file(staging / "decoder.onnx"),
                            **onnx_io_spec(staging / "decoder.onnx")},
            },
            "parity": {**parity, "verified_on": [str(r.image) for r in verify_records]},
            "sites": {name: site.to_json() for name, site in sites_of(staging / "encoder.onnx").items()},
        }
        add_app_decoders(staging, info, app_decoders,
                         lambda path, multimask: export_prompts_decoder(sam, path, multimask, exporter, opset),
                         lambda multimask: PromptsDecoder(reference_model, multimask), ImageEncoder(reference_model),
                         verify_records)
        if first_order:
            path = staging / FIRST_ORDER_SCORER
            export_first_order_scorer(sam, path, opset)
            difference = verify_first_order_scorer(reference_model, path, verify_records)
            if difference > FIRST_ORDER_MAX_REL_DIFF:
                raise SamReuseError(f"{FIRST_ORDER_SCORER}: differs from torch by {difference:.3g} of its largest "
                                    f"value (> {FIRST_ORDER_MAX_REL_DIFF}); nothing was written")
            info["models"]["first_order"] = {"file": path.name, "sha256": sha256_file(path),
                                             "max_rel_diff_vs_torch": difference, **onnx_io_spec(path)}
        write_json(staging / "export.json", {"format": EXPORT_FORMAT, **info})
    return ExportResult(out_dir / "encoder.onnx", out_dir / "decoder.onnx", out_dir / "export.json", info)


def existing_export(out_dir: str | Path, model_type: str, checkpoint: str | Path | None = None,
                    exporter: str = "legacy", opset: int = DEFAULT_OPSET, seed: int = 0,
                    first_order: bool = False) -> ExportResult | None:
    """A verified export already in ``out_dir`` for exactly these settings (with the first-order scorer when
    ``first_order``), or None.

    Lets a rerun of the whole pipeline (for instance after an interrupted
    search) skip the export instead of rebuilding identical models; both
    model files must still hash to what ``export.json`` recorded.
    """
    out_dir = Path(out_dir)
    try:
        info = json.loads((out_dir / "export.json").read_text())
        wanted = {"model_type": model_type, "exporter": exporter, "opset": opset, "layout": EXPORT_LAYOUT,
                  "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
                  "seed": seed if checkpoint is None else None}
        if any(info.get(key) != value for key, value in wanted.items()):
            return None
        files = {name: f"{name}.onnx" for name in ("encoder", "decoder")}
        if first_order and not isinstance(info.get("first_order"), str):  # a string: why this export has none
            files["first_order"] = FIRST_ORDER_SCORER
        for name, file in files.items():
            if sha256_file(out_dir / file) != info["models"][name]["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ExportResult(out_dir / "encoder.onnx", out_dir / "decoder.onnx", out_dir / "export.json", info)
