"""The tuning stage as a Python API: ONNX pair + labelled folder -> reuse map, tuned encoder, report.

``tune`` chooses pairs on the search split only and reports the held-out
split; ``evaluate`` scores any encoder/decoder pair end to end. Neither
imports torch.

Sites: the image embedding (the reference method's) or an MLP-hidden site
``mlp.<i>`` inside the encoder, scored through the encoder's suffix after
the site (``calibrate.suffix``). Inner sites are wider (MobileSAM's last
blocks: 1,280 channels) and each candidate costs about 2.5 decoder runs, so
their default pair space and plan are smaller (``INNER_SITE_CHANNELS``,
``INNER_SITE_PLAN``); the map found there is applied by ``prune`` when it
is exact, which removes the replaced channels and makes the encoder cheaper.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from sam_reuse.base.contract import (
    EMBEDDING,
    EVALUATION_FORMAT,
    FIRST_ORDER_POINTS,
    FIRST_ORDER_SCORER,
    JOURNAL,
    TUNE_OUTPUTS,
)
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import as_seen_from, ensure_writable_dir, folder_lock, staged_outputs
from sam_reuse.base.imaging import SAM2, load_image_rgb, preprocess
from sam_reuse.base.records import Sample
from sam_reuse.base.runtime import active_providers, check_pair, load_model, model_convention, on_device, ort_session
from sam_reuse.calibrate.activations import encode_tensors
from sam_reuse.calibrate.augment import ALTERATIONS, with_altered_copies
from sam_reuse.calibrate.data import MASK_RULE, CalibrationSet, load_calibration
from sam_reuse.calibrate.evaluator import MaskEvaluator
from sam_reuse.calibrate.evidence import EVIDENCE, MeanOverPrompts, evidence_samples
from sam_reuse.calibrate.fast import OBJECTIVES, FastPlan, fast
from sam_reuse.calibrate.fast import SELECTIONS as FAST_SELECTIONS
from sam_reuse.calibrate.first_order import first_order_scores
from sam_reuse.calibrate.journal import Journal
from sam_reuse.calibrate.report import (
    HeldOutSummary,
    MaskTokenSummary,
    SearchSummary,
    Shipping,
    TuneReport,
    overlay,
    plot_curve,
)
from sam_reuse.calibrate.salience import channel_salience
from sam_reuse.calibrate.search import SearchResult, exhaustive, pair_space, parse_channels, planned_subsets
from sam_reuse.calibrate.shipping import SELECTIONS as SHIP_SELECTIONS
from sam_reuse.calibrate.shipping import Decision, Gain, decide_on_cross_validation, decide_on_held_out, held_out_parts
from sam_reuse.calibrate.shipping import ORIGINAL_SHIPPED, TUNED_SHIPPED
from sam_reuse.calibrate.suffix import SuffixEmbedder
from sam_reuse.calibrate.token_choice import AUTO, MASK_TOKEN_CHOICES, TokenChoice, choose_token, given_token
from sam_reuse.graphops.graph import fingerprint, load_graph
from sam_reuse.graphops.mask_token import (
    MASK_TOKENS,
    SINGLE_CLICK,
    mask_token_of,
    recorded_token,
    with_every_token,
    with_mask_token,
)
from sam_reuse.graphops.reuse_map import ReuseMap, SiteReuse, reuse_index
from sam_reuse.graphops.rewrites import apply_reuse_map, require_original
from sam_reuse.graphops.sites import Site, find_sites

# What tune publishes: the encoder and map under these names when they ship, under the others when the evidence
# kept them back. A tune replaces every output of an earlier tune in the folder (contract.TUNE_OUTPUTS).
SHIPPED_OUTPUTS = ("encoder.tuned.onnx", "reuse_map.json")
NOT_SHIPPED_OUTPUTS = ("encoder.tuned.not-shipped.onnx", "reuse_map.not-shipped.json")
TUNED_DECODER = "decoder.tuned.onnx"  # the decoder returning the shipped mask token, when that is not token 0
STRATEGIES = ("fast", "first-order", "exhaustive")
# The first-order strategy (embedding site): the pairs its scores rank best, at most FIRST_ORDER_PER_TARGET per
# target, raced on the plan's race images; the best pair_keep of them go on to every image.
FIRST_ORDER_SHORTLIST = 48
FIRST_ORDER_PER_TARGET = 4
FIRST_ORDER_PLAN = {"pair_keep": 24}
CHECK_TOLERANCE = 1e-4
# Defaults for sites inside the encoder: the least salient channels may be replaced (pruned) by copies of
# the most salient, and the plan races on fewer images and keeps fewer candidates per stage.
INNER_SITE_CHANNELS = 64
INNER_SITE_PLAN = {"race_images": 8, "screen_keep": 12, "channels_paired": 8, "pair_keep": 24}


@dataclass
class TuneSettings:
    """Every knob of a tuning run; recorded in report.json."""

    site: str = "embedding"
    strategy: str | None = None  # None: first-order where its scorer is beside the decoder (embedding), else fast
    # The candidate map and what decides: "cross-fitted" (chosen along the search's curve on the held-out split, each
    # half's choice scored on the other), "validated" (chosen and decided on the held-out validation part), or the
    # search's own choice, the "guarded" prefix of the greedy path or the "naive" whole path. See calibrate.shipping.
    selection: str = "cross-fitted"
    ship_anyway: bool = False  # ship the candidate even when the evidence does not show an improvement
    objective: str = "mean"  # how the fast and first-order searches compare maps (calibrate.fast.OBJECTIVES)
    # The decoder's mask token: "auto" (chosen on the search split, shipped by the held-out rule; SAM 1 decoders
    # with a held-out split) or "0".."3" (that token ships). See calibrate.token_choice.
    mask_token: str = AUTO
    top_n: int = 10
    targets: str | None = None  # None: "all" at the embedding, "unsalient:64" inside the encoder
    sources: str | None = None  # None: "all" at the embedding, "salient:64" inside the encoder
    prompt: str = "given"
    evidence: str | None = None  # prompts per image; None: "points" at the embedding, "given" inside the encoder
    augment: int = 0  # altered copies of each search image scored beside it (calibrate.augment); 0: none
    masks: str | None = None
    search_images: int | None = None
    holdout_images: int | None = None
    min_images: int = 2
    batch_size: int = 8
    cv_folds: int = 5  # used only without a held-out split
    overlays: int = 4
    cache_dir: str | None = None
    progress: bool = True
    device: str = "cpu"  # where ONNX Runtime encodes and searches: cpu, or cuda (onnxruntime-gpu; else the CPU)


@dataclass
class TuneResult:
    reuse_map: ReuseMap  # the candidate's map (empty when there is none); shipped only if decision says so
    report: TuneReport
    out_dir: Path
    decision: Decision  # the reuse map's (the mask token's is in report.mask_token)

    @property
    def exit_status(self) -> int:
        """0 when anything tuned ships (the encoder or the decoder's mask token), 3 when the originals do."""
        return self.report.shipping.exit_status

    @property
    def shipped_decoder(self) -> str:
        """The decoder that goes with the shipped encoder: a bare name in ``out_dir``, else an absolute path."""
        token = self.report.mask_token
        return token.decoder if token is not None else self.report.model["decoder"]


def _require_file(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise SamReuseError(f"{path}: {what} not found")
    return Path(path)


def _sample_identity(sample: Sample) -> list[Any]:
    mask_hash = hashlib.sha256(np.packbits(sample.mask).tobytes() + str(sample.hw).encode()).hexdigest()
    prompt = sample.prompt
    return [sample.key, sample.image_sha256, mask_hash,
            None if prompt.points is None else prompt.points.tolist(),
            None if prompt.labels is None else prompt.labels.tolist(),
            None if prompt.box is None else prompt.box.tolist()]


def _pct(values: np.ndarray) -> float:
    return float(np.mean(values) * 100)


def _check_tuned_encoder(tuned: onnx.ModelProto, sample: Sample, searched: np.ndarray) -> float:
    """Max |diff| between the rewritten encoder's embedding and the one the search scored."""
    session = ort_session(tuned.SerializeToString())
    image = preprocess(load_image_rgb(sample.record.image), convention=model_convention(tuned))
    embedding = session.run([EMBEDDING], {session.get_inputs()[0].name: image})[0][0]
    return float(np.abs(embedding - searched).max())


def _embedding_evaluator(encoder: onnx.ModelProto, decoder: onnx.ModelProto, samples: list[Sample],
                         settings: TuneSettings, desc: str) -> MaskEvaluator:
    """The evaluator of reuse at the embedding, with whatever else the decoder reads from the encoder (SAM 2's
    high-resolution features), each image encoded once."""
    convention, features = check_pair(encoder, decoder, "the encoder", "the decoder")
    values = encode_tensors(encoder, samples, [EMBEDDING, *features], settings.cache_dir, settings.progress, desc)
    embeddings = np.stack(values[EMBEDDING]) if samples else np.zeros((0,), dtype=np.float32)
    return MaskEvaluator(decoder, samples, embeddings, settings.batch_size,
                         features={name: values[name] for name in features}, convention=convention)


def _site_evaluator(encoder: onnx.ModelProto, decoder: onnx.ModelProto, site: Site, samples: list[Sample],
                    settings: TuneSettings, desc: str) -> tuple[MaskEvaluator, list[np.ndarray] | np.ndarray]:
    """The split's evaluator at ``site`` and the site's activations (for salience), encoding each image once."""
    if site.name == "embedding":
        evaluator = _embedding_evaluator(encoder, decoder, samples, settings, desc)
        return evaluator, evaluator.embeddings
    convention, features = check_pair(encoder, decoder, "the encoder", "the decoder")
    embedder = SuffixEmbedder(encoder, site, samples, settings.cache_dir, settings.progress, desc=desc,
                              features=features)
    evaluator = MaskEvaluator(decoder, samples, embedder.original_embeddings(), settings.batch_size, embedder,
                              features=embedder.original_features(), convention=convention)
    return evaluator, embedder.site_activations()


def _searched_embedding(evaluator: MaskEvaluator, row: int, index: np.ndarray) -> np.ndarray:
    """The embedding the search scored for ``index`` on image ``row``."""
    if evaluator.embedder is None:
        return np.take(np.asarray(evaluator.embeddings[row]), index, axis=0)
    return evaluator.embedder.embeddings(index, [row])[0]


def _channel_specs(settings: TuneSettings, site_name: str, channels: int) -> tuple[str, str]:
    """The --targets/--sources in force: the user's, else the site's default."""
    count = min(INNER_SITE_CHANNELS, channels)
    inner = site_name != "embedding"
    return (settings.targets or (f"unsalient:{count}" if inner else "all"),
            settings.sources or (f"salient:{count}" if inner else "all"))


def _choose_overlays(keys: list[str], gains: np.ndarray, count: int) -> list[int]:
    """The held-out images that changed most: biggest gains and biggest losses, half each."""
    if count <= 0:
        return []
    order = list(np.lexsort((np.arange(len(gains)), -gains)))
    picked = order[: (count + 1) // 2] + order[::-1][: count // 2]
    return sorted(set(int(i) for i in picked), key=lambda i: (-gains[i], keys[i]))[:count]


def _site(encoder: onnx.ModelProto, encoder_path: Path, name: str) -> Site:
    sites = find_sites(load_graph(encoder))
    if name not in sites:
        what = f"an output named '{EMBEDDING}' with a channel axis" if name == "embedding" else "no such site"
        raise SamReuseError(f"{encoder_path}: no site '{name}' ({what}; this encoder has: "
                            f"{', '.join(sites) or 'none'}; 'export-and-tune sites ENCODER' lists them)")
    return sites[name]


def _check_settings(settings: TuneSettings) -> None:
    if settings.strategy is not None and settings.strategy not in STRATEGIES:
        raise SamReuseError(f"unknown strategy '{settings.strategy}' (choose from {', '.join(STRATEGIES)})")
    if settings.selection not in SHIP_SELECTIONS:
        raise SamReuseError(f"unknown selection '{settings.selection}' (choose from {', '.join(SHIP_SELECTIONS)})")
    if settings.mask_token not in MASK_TOKEN_CHOICES:
        raise SamReuseError(f"unknown --mask-token '{settings.mask_token}' "
                            f"(choose from {', '.join(MASK_TOKEN_CHOICES)})")
    if settings.objective not in OBJECTIVES:
        raise SamReuseError(f"unknown objective '{settings.objective}' (choose from {', '.join(OBJECTIVES)})")
    if settings.objective != "mean" and settings.strategy == "exhaustive":
        raise SamReuseError("--objective applies to the fast and first-order searches; exhaustive ranks subsets "
                            "by their mean")
    if settings.evidence is not None and settings.evidence not in EVIDENCE:
        raise SamReuseError(f"unknown evidence '{settings.evidence}' (choose from {', '.join(EVIDENCE)})")
    if not 0 <= settings.augment <= len(ALTERATIONS):
        raise SamReuseError(f"--augment must be between 0 and {len(ALTERATIONS)} (the alterations: "
                            f"{', '.join(ALTERATIONS)}), not {settings.augment}")
    if settings.top_n < 1:
        raise SamReuseError("--top-pairs must be at least 1")
    if settings.batch_size < 1:
        raise SamReuseError("--batch-size must be at least 1")
    if settings.cv_folds < 2:
        raise SamReuseError("--cv-folds must be at least 2")
    if settings.min_images < 1:
        raise SamReuseError("--min-images must be at least 1")
    if settings.overlays < 0:
        raise SamReuseError("--overlays must be 0 or more")
    if settings.cache_dir is not None:
        ensure_writable_dir(settings.cache_dir, "--cache-dir")


def _empty_reason(result: SearchResult) -> str:
    """Why the map is empty, in the user's terms."""
    if result.details.get("naive_pairs"):
        return ("the greedy path raised the search-split mean, but no prefix's lower 90% bound of per-image "
                "gain is above 0 (guarded selection)")
    return "no pair improved the search split"


def _evidence(settings: TuneSettings, site_name: str) -> str:
    """The --evidence in force: the user's, else the site's default.

    At the embedding every search image is scored on 3 prompts by default: against one prompt, the guarded
    search's held-out gain rose by 1.3 mIoU over random splits and its worst-hit images lost less on all
    three shared sets (benchmarks/README.md, "More evidence per search image"). Inside the encoder a
    candidate already costs about 2.5 decoder runs, and 3 prompts were never measured there.
    """
    return settings.evidence or ("points" if site_name == "embedding" else "given")


def _check_channel_specs(settings: TuneSettings, site_name: str, channels: int) -> None:
    """Reject a malformed --targets/--sources now, not after minutes of encoding."""
    for option, spec in zip(("--targets", "--sources"), _channel_specs(settings, site_name, channels)):
        try:
            parse_channels(spec, channels, np.zeros(channels))
        except ValueError as exc:
            raise SamReuseError(f"{option}: {exc}") from None


def _curve_point(result: SearchResult, size: int, held_out: np.ndarray | None) -> dict[str, Any]:
    subset = result.curve[size]
    return {"pairs": size, "map": [list(p) for p in subset], "search_miou": _pct(result.ious_of(subset)),
            "held_out_miou": None if held_out is None else _pct(held_out)}


def _held_out_curve(result: SearchResult, held: MaskEvaluator) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Search and held-out mIoU of each map of ``result.curve`` (size 0: the original model), and each map's
    per-image held-out IoUs, which the shipping rule reads."""
    curve, held_ious = [], []
    for size, subset in enumerate(result.curve):
        held_ious.append(held.ious(reuse_index(held.channels, subset)))
        curve.append({**_curve_point(result, size, held_ious[-1]),
                      "held_out_per_image": [float(v * 100) for v in held_ious[-1]]})
    return curve, held_ious


def _write_overlays(held: MaskEvaluator, images: list[int], index: np.ndarray, before_ious: np.ndarray,
                    after_ious: np.ndarray, folder: Path) -> None:
    """Ground truth / original / tuned masks of the held-out ``images``."""
    before, after = held.low_res_logits(None, images), held.low_res_logits(index, images)
    for i, logits_before, logits_after in zip(images, before, after):
        sample = held.samples[i]
        overlay(sample.record.image, sample.mask, held.predicted_mask(logits_before, i),
                held.predicted_mask(logits_after, i), before_ious[i] * 100, after_ious[i] * 100,
                folder / f"overlay-{sample.key}.png")


@dataclass
class _Inputs:
    """Stage 1: the models, the site and the calibration data, validated before any minute is spent."""

    encoder: Path
    decoder: Path
    data: Path
    encoder_model: onnx.ModelProto
    decoder_model: onnx.ModelProto
    encoder_fp: str
    decoder_fp: str
    site: Site
    calibration: CalibrationSet
    strategy: str  # the --strategy in force (``_strategy``)
    scorer: Path | None  # the first-order scorer, checked, when that strategy is in force
    chooses_token: bool  # whether a mask token is chosen or given (``_chooses_token``)


@dataclass
class _Scoring:
    """Stage 2: each split's evaluator (every image encoded once) and the search split's site activations."""

    evidence: str
    per_image: int  # rows per search image: its prompts, on the image and on each altered copy
    search_eval: MaskEvaluator
    search_prompts: list[Sample]
    search_activations: list[np.ndarray] | np.ndarray
    held: MaskEvaluator | None  # the held-out images, each on its own prompt
    token_evaluations: int = 0  # decoder runs scoring the other mask tokens


@dataclass
class _Search:
    """Stage 3: the channels searched and what the search found on its own split."""

    target_spec: str
    source_spec: str
    targets: list[int]
    sources: list[int]
    salience: np.ndarray
    result: SearchResult


@dataclass
class _Assessment:
    """Stage 4: the candidate, what ships and on what evidence, and the rewritten encoder, checked exact."""

    decision: Decision
    curve: list[dict[str, Any]]
    reuse_map: ReuseMap
    tuned_model: onnx.ModelProto
    gains: np.ndarray  # per image, of the candidate: held-out, else cross-validated
    held_ious: tuple[np.ndarray, np.ndarray] | None  # held-out IoUs of the original and the candidate
    check: dict[str, Any]


def _strategy(settings: TuneSettings, decoder: Path, site: Site, convention: str) -> str:
    """The --strategy in force: the user's, else first-order at the embedding when its scorer is there, else fast.

    First-order held the fast search's held-out gain on the fixed and shifted splits of the three shared sets
    with 4-5x fewer decoder runs (benchmarks/README.md, "First-order against fast" and "Do no harm"). It needs
    the scorer that ``export`` writes (torch), so an export without it falls back to fast, and says so.
    """
    if settings.strategy is not None:
        return settings.strategy
    if site.name != "embedding":
        return "fast"
    if convention == SAM2:
        print("SAM 2 exports have no first-order scorer (their single mask is a discrete choice between mask "
              "tokens): the fast search")
        return "fast"
    if not (decoder.parent / FIRST_ORDER_SCORER).is_file():
        print(f"no {FIRST_ORDER_SCORER} beside {decoder} (export writes it unless --no-first-order): "
              "the fast search, about 4x the decoder runs")
        return "fast"
    return "first-order"


def _first_order_scorer(decoder: Path, site: Site) -> Path:
    """The first-order scorer exported beside ``decoder``; refused before minutes of encoding if it is not there."""
    if site.name != "embedding":
        raise SamReuseError(f"--strategy first-order scores reuse at the image embedding only, not at '{site.name}'")
    scorer = decoder.parent / FIRST_ORDER_SCORER
    if not scorer.is_file():
        raise SamReuseError(f"--strategy first-order: no {scorer} (export with --first-order writes it beside "
                            "decoder.onnx; torch is needed for that)")
    load_model(scorer, "first-order scorer", role="first_order")
    return scorer


def _prepare(encoder: Path, decoder: Path, data: Path, out_dir: Path, settings: TuneSettings) -> _Inputs:
    _check_settings(settings)
    encoder_model = load_model(encoder, "encoder ONNX", role="encoder")
    decoder_model = load_model(decoder, "decoder ONNX", role="decoder")
    require_original(encoder_model, encoder, "tune")
    convention, _ = check_pair(encoder_model, decoder_model, encoder, decoder)
    site = _site(encoder_model, encoder, settings.site)
    _check_channel_specs(settings, site.name, site.channels)
    strategy = _strategy(settings, decoder, site, convention)
    scorer = _first_order_scorer(decoder, site) if strategy == "first-order" else None
    calibration = load_calibration(data, settings.masks, settings.prompt, settings.search_images,
                                   settings.holdout_images, settings.min_images)
    if not calibration.held_out and strategy == "exhaustive":
        raise SamReuseError(f"--strategy {strategy} needs a held-out split (--holdout-images > 0); "
                            "without one, the fast strategy reports a cross-validated estimate")
    if not calibration.held_out and len(calibration.search) < settings.cv_folds:
        raise SamReuseError(f"{data}: {len(calibration.search)} search images cannot make "
                            f"{settings.cv_folds} cross-validation folds (keep a held-out split or add images)")
    chooses_token = _chooses_token(decoder_model, decoder, convention, bool(calibration.held_out), settings)
    ensure_writable_dir(out_dir, "--out")
    return _Inputs(encoder, decoder, data, encoder_model, decoder_model, fingerprint(encoder_model),
                   fingerprint(decoder_model), site, calibration, strategy, scorer, chooses_token)


def _chooses_token(decoder_model: onnx.ModelProto, decoder: Path, convention: str, held_out: bool,
                   settings: TuneSettings) -> bool:
    """Whether this tune scores the decoder's mask tokens: a token the user named must be possible (else refused
    before any encoding); ``auto`` skips, saying why, where the rule cannot run."""
    if settings.mask_token == "0":
        return False
    given = settings.mask_token != AUTO
    if convention == SAM2:
        if given:
            raise SamReuseError("--mask-token: SAM 2's single mask is already a choice between its mask tokens")
        return False
    if recorded_token(decoder_model) == SINGLE_CLICK:
        if given:
            raise SamReuseError(f"--mask-token: {decoder} chooses its mask by the single-click rule; tune with the "
                                "exported decoder.onnx")
        print(f"{decoder}: chooses its mask by the single-click rule, kept; the search scores that")
        return False
    try:
        current = mask_token_of(decoder_model, str(decoder))
    except SamReuseError as exc:
        if given:
            raise SamReuseError(f"--mask-token: {exc}") from None
        print(f"mask token 0 kept: {exc}")
        return False
    if current != 0:
        raise SamReuseError(f"{decoder}: already returns mask token {current} (a tuned decoder); tune with the "
                            "exported decoder.onnx")
    if not held_out and not given:
        print("mask token 0 kept: choosing another needs a held-out split (--holdout-images > 0)")
        return False
    return True


def _encode(inputs: _Inputs, settings: TuneSettings) -> _Scoring:
    # Each search image appears once per prompt of its evidence, for itself and each altered copy (the encoder
    # still runs once per image and copy).
    evidence = _evidence(settings, inputs.site.name)
    copies = with_altered_copies(inputs.calibration.search, settings.augment, settings.cache_dir)
    search_prompts = evidence_samples(copies, evidence)
    search_eval, activations = _site_evaluator(inputs.encoder_model, inputs.decoder_model, inputs.site,
                                               search_prompts, settings, "encode search split")
    held = None
    if inputs.calibration.held_out:  # never altered, on their own prompts: they stand for the images deployed on
        held = _site_evaluator(inputs.encoder_model, inputs.decoder_model, inputs.site, inputs.calibration.held_out,
                               settings, "encode held-out split")[0]
    return _Scoring(evidence, (1 + settings.augment) * (1 + EVIDENCE[evidence]), search_eval, search_prompts,
                    activations, held)


def _choose_mask_token(inputs: _Inputs, scoring: _Scoring, settings: TuneSettings
                       ) -> tuple[TokenChoice | None, onnx.ModelProto | None, _Scoring]:
    """Every mask token scored on the cached embeddings (one decoder run per prompt returns them all), the token
    that ships, its decoder (None: token 0), and the scoring the search goes on with (that token's masks).

    Held-out images are scored on the search's evidence too (their own prompt first): the token decision gained
    power from it, the reuse decision did not (benchmarks/README.md, "Which mask token").
    """
    if not inputs.chooses_token:
        return None, None, scoring
    every = with_every_token(inputs.decoder_model, str(inputs.decoder))
    search_eval = scoring.search_eval.with_decoder(every, at_site=False)
    search_ious = search_eval.token_ious().reshape(-1, scoring.per_image, MASK_TOKENS).mean(axis=1).T
    held_ious = np.zeros((0, 1 + EVIDENCE[scoring.evidence], MASK_TOKENS))
    scoring.token_evaluations = search_eval.evaluations
    if scoring.held:
        held_eval = scoring.held.with_decoder(every, evidence_samples(inputs.calibration.held_out, scoring.evidence),
                                              at_site=False)
        held_ious = held_eval.token_ious().reshape(len(inputs.calibration.held_out), -1, MASK_TOKENS)
        scoring.token_evaluations += held_eval.evaluations
    if settings.mask_token == AUTO:
        choice = choose_token(list(search_ious), list(held_ious.mean(axis=1).T), list(held_ious[:, 0].T),
                              settings.selection, settings.ship_anyway)
    else:
        choice = given_token(int(settings.mask_token), list(search_ious), list(held_ious[:, 0].T))
    if choice.token == 0:
        return choice, None, scoring
    shipped = with_mask_token(inputs.decoder_model, choice.token, str(inputs.decoder))
    return choice, shipped, replace(scoring, search_eval=scoring.search_eval.with_decoder(shipped),
                                    held=scoring.held.with_decoder(shipped) if scoring.held else None)


def _search(inputs: _Inputs, scoring: _Scoring, settings: TuneSettings, out_dir: Path, token: int) -> _Search:
    site, per_image, images = inputs.site, scoring.per_image, len(inputs.calibration.search)
    salience = channel_salience(scoring.search_activations[::per_image], site.axis)  # each image once
    target_spec, source_spec = _channel_specs(settings, site.name, site.channels)
    targets = parse_channels(target_spec, site.channels, salience)
    sources = parse_channels(source_spec, site.channels, salience)
    pairs = pair_space(targets, sources)
    if not pairs:
        raise SamReuseError("--targets/--sources leave no pair (a pair needs a target different from its source)")
    plan = FastPlan(top_n=settings.top_n, max_pairs=settings.top_n,
                    **(INNER_SITE_PLAN if site.name != "embedding" else {}),
                    **(FIRST_ORDER_PLAN if settings.strategy == "first-order" else {}))
    shortlist = None
    if settings.strategy == "first-order":
        scores = first_order_scores(inputs.scorer, scoring.search_prompts,
                                    scoring.search_activations, settings.progress)
        if not scores.prompts:
            raise SamReuseError(f"--strategy first-order: no search prompt has {FIRST_ORDER_POINTS} points (one "
                                "point, or a box); use --evidence points or the fast strategy")
        shortlist = scores.best_pairs(FIRST_ORDER_SHORTLIST, targets, sources, FIRST_ORDER_PER_TARGET)
    # The selection rule is left out: it changes no measurement, so every selection shares a journal.
    config = {"strategy": settings.strategy, "encoder": inputs.encoder_fp, "decoder": inputs.decoder_fp,
              **({"mask_token": token} if token else {}),
              "site": site.tensor, "mask_rule": MASK_RULE,
              "images": [_sample_identity(s) for s in scoring.search_prompts],
              "targets": targets, "sources": sources, "top_n": settings.top_n, "batch_size": settings.batch_size,
              **({"plan": plan.to_json()} if settings.strategy != "exhaustive" else {}),
              **({"shortlist": shortlist} if shortlist is not None else {})}
    journal = Journal(out_dir / JOURNAL, config)
    if journal.restarted:
        print(f"{out_dir / JOURNAL}: written for other settings; starting the search over")
    if settings.progress:
        if shortlist is not None:
            work = (f"{len(shortlist)} pairs nominated by first-order scores ({scores.prompts} prompts scored, "
                    f"{scores.left_out} left out), then a greedy path: at most "
                    f"{plan.planned_runs(0, images, len(shortlist), per_image):,} decoder runs")
        elif settings.strategy == "fast":
            screened = len(set(targets) | set(sources))
            work = (f"screening {screened} channels, then pairs and a greedy path: "
                    f"at most {plan.planned_runs(screened, images, per_image=per_image):,} decoder runs")
        else:
            work = (f"{len(pairs):,} pairs + up to {planned_subsets(pairs, settings.top_n):,} subsets, "
                    f"each scored on {images} search images" + (f" x {per_image} prompts" if per_image > 1 else ""))
        print(f"{settings.strategy} search: {work} ({len(journal.entries):,} units already in {JOURNAL})")
    scorer = MeanOverPrompts(scoring.search_eval, per_image)
    if settings.strategy != "exhaustive":
        search_selection = settings.selection if settings.selection in FAST_SELECTIONS else "guarded"
        result = fast(scorer.ious, site.channels, targets, sources, journal, images, plan, search_selection,
                      cv_folds=0 if inputs.calibration.held_out else settings.cv_folds, progress=settings.progress,
                      shortlist=shortlist, per_image=per_image, objective=settings.objective)
    else:
        result = exhaustive(scorer.ious, site.channels, pairs, settings.top_n, journal, images,
                            progress=settings.progress, per_image=per_image)
    return _Search(target_spec, source_spec, targets, sources, salience, result)


def _assess(inputs: _Inputs, scoring: _Scoring, search: _Search, settings: TuneSettings) -> _Assessment:
    result, calibration, site = search.result, inputs.calibration, inputs.site
    if calibration.held_out:
        curve, held_by_size = _held_out_curve(result, scoring.held)
        decision = decide_on_held_out(held_by_size, len(result.best), settings.selection, settings.ship_anyway,
                                      _empty_reason(result))
        held_ious = (held_by_size[0], held_by_size[decision.candidate])
        gains = (held_ious[1] - held_ious[0]) * 100
        check_samples, check_eval, check_stride = calibration.held_out, scoring.held, 1
    else:  # the user keeps no images back: the cross-validated estimate decides
        curve = [_curve_point(result, size, None) for size in range(len(result.curve))]
        estimate = result.details["cross_validation"]
        gains = np.asarray(estimate["per_image_gain"])
        decision = decide_on_cross_validation(gains, len(result.best), estimate["folds"], settings.ship_anyway,
                                              _empty_reason(result))
        held_ious = None
        check_samples, check_eval, check_stride = calibration.search, scoring.search_eval, scoring.per_image
    reuse = SiteReuse(tensor=site.tensor, axis=site.axis, channels=site.channels,
                      pairs=tuple(result.curve[decision.candidate]))
    reuse_map = ReuseMap(model_fingerprint=inputs.encoder_fp, sites={settings.site: reuse},
                         # The map travels inside the shipped encoder: no local path or record id (report.json has them)
                         meta={"strategy": settings.strategy, "search_images": len(calibration.search),
                               "held_out_images": len(calibration.held_out), "shipped": decision.ship_tuned})
    tuned_model, applied = apply_reuse_map(inputs.encoder_model, reuse_map)
    row = int(np.argmax(np.abs(gains))) if len(gains) else 0  # the image the candidate changed most
    max_diff = _check_tuned_encoder(tuned_model, check_samples[row],
                                    _searched_embedding(check_eval, row * check_stride, reuse.index()))
    if max_diff > CHECK_TOLERANCE:
        raise SamReuseError(f"tuned encoder disagrees with the searched embedding by {max_diff:.2e} "
                            f"on {check_samples[row].key}: the rewrite is not exact")
    check = {"image": check_samples[row].key, "max_abs_diff": max_diff,
             "rewrite": ", ".join(f"{k}: {v}" for k, v in applied.items()) or "none (empty map)"}
    return _Assessment(decision, curve, reuse_map, tuned_model, gains, held_ious, check)


def _token_summary(choice: TokenChoice | None, inputs: _Inputs, out_dir: Path) -> MaskTokenSummary | None:
    """The mask token section of the report, with its verdict."""
    if choice is None:
        return None
    decision = choice.decision
    if decision is None:
        verdict = f"mask token {choice.token}: given by --mask-token"
    else:
        head = f"mask token {choice.candidate} against token 0: {decision.basis} {decision.decided.describe()}"
        if decision.ship_tuned:
            shipped = "; ships anyway (--ship-anyway)" if decision.forced else "; ships"
            verdict = f"{head}{shipped} in {TUNED_DECODER}"
        else:
            needed = decision.decided.images_needed
            verdict = head + (f" (a gain of this size and spread needs about {needed} images to show)" if needed
                              else "") + "; token 0 kept"
    return MaskTokenSummary(
        shipped=choice.token, candidate=choice.candidate,
        chosen_by="--mask-token" if decision is None else "the shipping rule",
        decoder=TUNED_DECODER if choice.token else as_seen_from(out_dir, inputs.decoder),
        search_miou=[_pct(v) for v in choice.search_ious],
        held_out_miou=[_pct(v) if len(v) else None for v in choice.held_out_ious],
        held_out_per_image=[[float(x * 100) for x in v] for v in choice.held_out_ious],
        decided_on=None if decision is None else decision.decided,
        reported=None if decision is None else decision.reported, verdict=verdict)


def _report(inputs: _Inputs, scoring: _Scoring, search: _Search, assessment: _Assessment,
            token: TokenChoice | None, settings: TuneSettings, overlays: list[int], wall: dict[str, float],
            out_dir: Path) -> TuneReport:
    """Every figure of the run, what shipped and why."""
    calibration, result, decision = inputs.calibration, search.result, assessment.decision
    keys = [s.key for s in calibration.held_out]
    shipped_names = SHIPPED_OUTPUTS if decision.ship_tuned else NOT_SHIPPED_OUTPUTS
    reported = decision.reported
    held = None
    if assessment.held_ious is not None:
        held_base, held_tuned = assessment.held_ious
        validation, test = held_out_parts(len(keys))
        held = HeldOutSummary(images=len(keys), baseline_miou=_pct(held_base), tuned_miou=_pct(held_tuned),
                              gain=Gain.of(assessment.gains),
                              per_image=[{"key": k, "baseline": float(b * 100), "tuned": float(t * 100)}
                                         for k, b, t in zip(keys, held_base, held_tuned)],
                              validation_keys=[keys[i] for i in validation], test_keys=[keys[i] for i in test])
    shipping = Shipping(shipped="tuned" if decision.ship_tuned else "original",
                        encoder=shipped_names[0] if decision.ship_tuned else as_seen_from(out_dir, inputs.encoder),
                        candidate_files=list(shipped_names) if decision.candidate else [],
                        candidate_pairs=decision.candidate, basis=decision.basis, decided_on=decision.decided,
                        reported=reported, forced=decision.forced,
                        exit_status=(TUNED_SHIPPED if decision.ship_tuned or (token and token.token)
                                     else ORIGINAL_SHIPPED),
                        verdict=decision.verdict, lower_bounds_90=decision.lower_bounds)
    mask_token = _token_summary(token, inputs, out_dir)
    return TuneReport(
        verdict=decision.verdict if mask_token is None else f"{mask_token.verdict}. {decision.verdict}",
        shipping=shipping,
        estimate=None if reported is None else {
            "basis": ("test part of the held-out split (decided nothing)"
                      if calibration.held_out and settings.selection != "cross-fitted" else decision.basis),
            "gain": reported.gain, "gain_interval_90": list(reported.interval)},
        model={"encoder": as_seen_from(out_dir, inputs.encoder), "decoder": as_seen_from(out_dir, inputs.decoder),
               "encoder_fingerprint": inputs.encoder_fp, "decoder_fingerprint": inputs.decoder_fp},
        data={"source": str(inputs.data), "mask_rule": MASK_RULE, "prompt": settings.prompt,
              "search": [s.key for s in calibration.search], "held_out": keys, "skipped": calibration.skipped},
        settings={**asdict(settings), "targets": search.target_spec, "sources": search.source_spec,
                  "evidence": scoring.evidence},
        site={"name": settings.site, "tensor": inputs.site.tensor, "axis": inputs.site.axis,
              "channels": inputs.site.channels},
        search=SearchSummary(images=len(calibration.search), baseline_miou=_pct(result.baseline),
                             tuned_miou=_pct(result.ious_of(result.curve[decision.candidate])),
                             pairs_scored=len(result.pair_scores), search_choice_pairs=len(result.best),
                             targets=search.targets, sources=search.sources,
                             top_pairs=[[t, s, d * 100] for (t, s), d in result.pair_scores[:20]],
                             candidates=[list(p) for p in result.candidates], subsets=len(result.subsets),
                             salience=[float(v) for v in search.salience]),
        held_out=held,
        curve=assessment.curve,
        strategy_details=result.details,
        reuse_map=assessment.reuse_map.to_json(),
        tuned_encoder_check=assessment.check,
        overlays=[f"overlay-{keys[i]}.png" for i in overlays],
        mask_token=mask_token,
        cost={"decoder_evaluations": {"search": scoring.search_eval.evaluations,
                                      "held_out": scoring.held.evaluations if scoring.held else 0,
                                      "mask_tokens": scoring.token_evaluations},
              "maps_reused_from_journal": result.reused,
              "encoded_images": len(calibration.search) + len(calibration.held_out),
              "execution_providers": active_providers(), "wall_s": wall},
    )


def tune(encoder: str | Path, decoder: str | Path, data: str | Path, out_dir: str | Path,
         settings: TuneSettings | None = None) -> TuneResult:
    """Search a reuse map on ``data``'s search split, decide on held-out images whether it ships, write it all.

    Stages: prepare (validate everything), encode (each image once), search (the search split only),
    assess (the shipping rule, ``calibrate.shipping``, and the rewrite checked exact), publish.
    Writes ``search.jsonl`` (progress, for resuming) as it goes and, at the end and all at once, the
    candidate encoder and map (``SHIPPED_OUTPUTS`` or ``NOT_SHIPPED_OUTPUTS``), ``report.json``,
    ``report.md``, ``miou_vs_pairs.png`` and ``overlay-<key>.png`` for a few held-out images.
    """
    settings = settings or TuneSettings()
    with on_device(settings.device):
        return _tune_stages(Path(encoder), Path(decoder), Path(data), Path(out_dir), settings)


def _tune_stages(encoder: Path, decoder: Path, data: Path, out_dir: Path, settings: TuneSettings) -> TuneResult:
    wall: dict[str, float] = {}
    started = mark = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal mark
        wall[stage], mark = time.perf_counter() - mark, time.perf_counter()

    inputs = _prepare(encoder, decoder, data, out_dir, settings)
    settings = replace(settings, strategy=inputs.strategy)
    lap("load")
    with folder_lock(out_dir):  # the journal is checked and written under the lock
        scoring = _encode(inputs, settings)
        lap("encode")
        token, tuned_decoder, scoring = _choose_mask_token(inputs, scoring, settings)
        lap("mask_token")
        search = _search(inputs, scoring, settings, out_dir, token.token if token else 0)
        lap("search")
        assessment = _assess(inputs, scoring, search, settings)
        lap("held_out")

        decision = assessment.decision
        keys = [s.key for s in inputs.calibration.held_out]
        overlays = (_choose_overlays(keys, assessment.gains, settings.overlays)
                    if assessment.held_ious is not None and decision.candidate else [])
        names = SHIPPED_OUTPUTS if decision.ship_tuned else NOT_SHIPPED_OUTPUTS
        with staged_outputs(out_dir, replacing=TUNE_OUTPUTS) as staging:
            if decision.candidate:
                onnx.save(assessment.tuned_model, str(staging / names[0]))
                assessment.reuse_map.save(staging / names[1])
            if tuned_decoder is not None:
                onnx.save(tuned_decoder, str(staging / TUNED_DECODER))
            plot_curve(assessment.curve, decision.candidate, staging / "miou_vs_pairs.png")
            if overlays:
                _write_overlays(scoring.held, overlays, assessment.reuse_map.sites[settings.site].index(),
                                *assessment.held_ious, staging)
            wall["total"] = time.perf_counter() - started
            report = _report(inputs, scoring, search, assessment, token, settings, overlays, wall, out_dir)
            report.write(staging)
        return TuneResult(reuse_map=assessment.reuse_map, report=report, out_dir=out_dir, decision=decision)


@dataclass
class Evaluation:
    split: str
    keys: list[str]
    ious: np.ndarray

    @property
    def miou(self) -> float:
        return _pct(self.ious)

    def to_json(self) -> dict[str, Any]:
        return {"format": EVALUATION_FORMAT, "split": self.split, "images": len(self.keys), "miou": self.miou,
                "per_image": {k: float(v * 100) for k, v in zip(self.keys, self.ious)}}


SPLITS = ("held-out", "search", "all")


def evaluate(encoder: str | Path, decoder: str | Path, data: str | Path, split: str = "held-out",
             settings: TuneSettings | None = None) -> Evaluation:
    """mIoU of an encoder/decoder pair (e.g. encoder.tuned.onnx) on a split, end to end on ONNX Runtime."""
    settings = settings or TuneSettings()
    if split not in SPLITS:
        raise SamReuseError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    _check_settings(settings)
    with on_device(settings.device):
        return _evaluate_split(encoder, decoder, data, split, settings)


def _evaluate_split(encoder: str | Path, decoder: str | Path, data: str | Path, split: str,
                    settings: TuneSettings) -> Evaluation:
    encoder_model = load_model(encoder, "encoder ONNX", role="encoder")
    decoder_model = load_model(decoder, "decoder ONNX", role="decoder")
    calibration: CalibrationSet = load_calibration(data, settings.masks, settings.prompt, settings.search_images,
                                                   settings.holdout_images, min_images=0)
    samples = {"held-out": calibration.held_out, "search": calibration.search,
               "all": calibration.search + calibration.held_out}[split]
    if not samples:
        raise SamReuseError(f"{data}: no usable images in the {split} split")
    check_pair(encoder_model, decoder_model, encoder, decoder)
    evaluator = _embedding_evaluator(encoder_model, decoder_model, samples, settings, f"encode {split}")
    return Evaluation(split=split, keys=[s.key for s in samples], ious=evaluator.ious())


def copy_model(source: str | Path, target: Path) -> None:
    """Copy an ONNX file, with the external data files it names (models over 2 GB need them), into an output
    folder atomically (used when tuning an existing pair)."""
    source = _require_file(Path(source), "ONNX model")
    if source.resolve() == target.resolve():
        return
    model = onnx.load(str(source), load_external_data=False)
    data_files = sorted({entry.value for tensor in model.graph.initializer
                         if tensor.data_location == onnx.TensorProto.EXTERNAL
                         for entry in tensor.external_data if entry.key == "location"})
    with staged_outputs(target.parent) as staging:
        shutil.copyfile(source, staging / target.name)
        for name in data_files:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.parent / name, staging / name)
