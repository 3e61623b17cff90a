"""What a tuning run tells its user: the typed report (saved as report.json), report.md, the curve, overlays.

``TuneReport`` is the one record of a tune that crosses stages: ``tune``
builds it, report.md, the command's summary and the benchmarks read it, and
``TuneReport.load`` reads a report.json back. The sections that carry the
decision (search, held-out, shipping) are typed; descriptive ones (model,
data, settings, site, curve, cost) stay plain JSON objects.

All mIoU figures are percentages. What ships, and the verdict, come from
``sam_reuse.calibrate.shipping``: read off the paired 90% bootstrap interval
of the held-out gain, cross-fitted over the whole held-out split by default
(or on its validation part, or, without a held-out split, of the
cross-validated gain); ``Shipping.reported`` is the figure to quote.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sam_reuse.base.contract import REPORT_FORMAT
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import staged_outputs, write_json
from sam_reuse.base.imaging import load_image_rgb
from sam_reuse.calibrate.shipping import Gain


@dataclass(frozen=True)
class SearchSummary:
    """The search split: mIoU of the original and of the candidate, and what the search looked at."""

    images: int
    baseline_miou: float
    tuned_miou: float  # the candidate's
    pairs_scored: int
    search_choice_pairs: int  # pairs the search itself chose (guarded prefix / best subset)
    targets: list[int]
    sources: list[int]
    top_pairs: list[list[float]]  # [target, source, search-split mIoU change] of the best 20 pairs
    candidates: list[list[int]]
    subsets: int
    salience: list[float]


@dataclass(frozen=True)
class HeldOutSummary:
    """The held-out split, original against the candidate, and how it was cut into validation and test."""

    images: int
    baseline_miou: float
    tuned_miou: float
    gain: Gain  # over both parts
    per_image: list[dict[str, Any]]  # {"key", "baseline", "tuned"}
    validation_keys: list[str]
    test_keys: list[str]

    def to_json(self) -> dict[str, Any]:
        gain = {k: v for k, v in self.gain.to_json().items() if k != "images"}
        return {"images": self.images, "baseline_miou": self.baseline_miou, "tuned_miou": self.tuned_miou, **gain,
                "per_image": self.per_image, "validation_keys": self.validation_keys, "test_keys": self.test_keys}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeldOutSummary:
        return cls(images=data["images"], baseline_miou=data["baseline_miou"], tuned_miou=data["tuned_miou"],
                   gain=Gain.from_json(data), per_image=data["per_image"], validation_keys=data["validation_keys"],
                   test_keys=data["test_keys"])


class _Decided:
    """A decision as saved: its ``decided_on`` and ``reported`` gains (``Gain``, or None) as JSON objects."""

    _GAINS = ("decided_on", "reported")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), **{k: None if getattr(self, k) is None else getattr(self, k).to_json()
                                   for k in self._GAINS}}

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        gains = {k: None if data.get(k) is None else Gain.from_json(data[k]) for k in cls._GAINS}
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name not in gains}, **gains)


@dataclass(frozen=True)
class MaskTokenSummary(_Decided):
    """The decoder's mask token (``calibrate.token_choice``): every token's mIoU, the search split's candidate,
    and what the held-out split decided; the channel search ran on the shipped token's masks."""

    shipped: int
    candidate: int
    chosen_by: str  # "the shipping rule" or "--mask-token"
    decoder: str  # the shipped decoder: a bare name for a file in the report's folder, else an absolute path
    search_miou: list[float]  # per token, each search image's IoU the mean over its prompts
    held_out_miou: list[float | None]  # per token (None: no held-out split)
    held_out_per_image: list[list[float]]  # per token, per held-out image (the order of data.held_out)
    decided_on: Gain | None  # the candidate against token 0 on what decided (None: chosen by the user)
    reported: Gain | None
    verdict: str


@dataclass(frozen=True)
class Shipping(_Decided):
    """What shipped, on what evidence, and under which file names (``calibrate.shipping.Decision`` as saved)."""

    shipped: str  # "tuned" or "original"
    encoder: str  # the shipped encoder: a bare name for a file in the report's folder, else an absolute path
    candidate_files: list[str]  # the candidate's encoder and map, [] when there is no candidate
    candidate_pairs: int
    basis: str
    decided_on: Gain | None
    reported: Gain | None  # the figure to quote: each image scored by a map chosen without it
    forced: bool
    exit_status: int
    verdict: str
    lower_bounds_90: list[float]


@dataclass(frozen=True)
class Int8Summary:
    """The INT8 version of the shipped encoder (``run --quantize int8``) against it, with the float decoder."""

    model: str  # bare name: the file beside the report
    images: int  # held-out images scored
    fp32_miou: float
    int8_miou: float
    latency_ratio: float  # int8 / fp32 encoder time on ONNX Runtime CPU, median of interleaved rounds
    threads: int


@dataclass(frozen=True)
class TuneReport:
    """Every figure of a tune, what shipped and why; ``to_json`` is report.json (format ``REPORT_FORMAT``)."""

    verdict: str
    shipping: Shipping
    estimate: dict[str, Any] | None  # the figure to quote: basis, gain, gain_interval_90
    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    site: dict[str, Any]
    search: SearchSummary
    held_out: HeldOutSummary | None
    curve: list[dict[str, Any]]  # per map along the path: pairs, map, search_miou, held_out_miou, per image
    strategy_details: dict[str, Any]
    reuse_map: dict[str, Any]  # the candidate's map
    tuned_encoder_check: dict[str, Any]
    overlays: list[str]
    cost: dict[str, Any]
    int8: Int8Summary | None = None  # added by run --quantize int8
    mask_token: MaskTokenSummary | None = None  # None: token 0, not chosen (SAM 2, no held-out split, old decoder)

    @property
    def candidate_pairs(self) -> list[list[int]]:
        return self.reuse_map["sites"][self.site["name"]]["pairs"]

    def to_json(self) -> dict[str, Any]:
        typed = {"shipping": self.shipping.to_json(), "search": asdict(self.search),
                 "held_out": None if self.held_out is None else self.held_out.to_json(),
                 "int8": None if self.int8 is None else asdict(self.int8),
                 "mask_token": None if self.mask_token is None else self.mask_token.to_json()}
        return {"format": REPORT_FORMAT, **{f.name: typed.get(f.name, getattr(self, f.name)) for f in fields(self)}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TuneReport:
        if data.get("format") != REPORT_FORMAT:
            raise SamReuseError(f"not a tuning report of this version (format {data.get('format')!r}, "
                                f"expected {REPORT_FORMAT!r})")
        typed = {"shipping": Shipping.from_json(data["shipping"]), "search": SearchSummary(**data["search"]),
                 "held_out": None if data["held_out"] is None else HeldOutSummary.from_json(data["held_out"]),
                 "int8": None if data.get("int8") is None else Int8Summary(**data["int8"]),
                 "mask_token": (None if data.get("mask_token") is None
                                else MaskTokenSummary.from_json(data["mask_token"]))}
        return cls(**{f.name: typed[f.name] if f.name in typed else data[f.name] for f in fields(cls)})

    def write(self, folder: Path) -> None:
        """report.json and report.md in ``folder`` (a staging folder: they are published together)."""
        write_json(folder / "report.json", self.to_json())
        (folder / "report.md").write_text(markdown(self))

    @classmethod
    def load(cls, path: str | Path) -> TuneReport:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SamReuseError(f"{path}: not a readable tuning report ({exc})") from None

def add_int8_summary(folder: Path, summary: Int8Summary) -> TuneReport:
    """The report in ``folder`` with its INT8 section, rewritten (report.json and report.md together)."""
    report = replace(TuneReport.load(folder / "report.json"), int8=summary)
    with staged_outputs(folder) as staging:
        report.write(staging)
    return report


OVERLAY_SIDE = 256
COLOURS = {"truth": (0, 200, 0), "before": (230, 60, 40), "after": (40, 110, 240)}


def plot_curve(curve: list[dict[str, Any]], chosen: int, path: Path) -> None:
    """Search-split and held-out mIoU of the best subset of each size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [point["pairs"] for point in curve]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(sizes, [p["search_miou"] for p in curve], "o-", label="search split (chosen on)")
    if all(p["held_out_miou"] is not None for p in curve):
        ax.plot(sizes, [p["held_out_miou"] for p in curve], "s-", label="held-out split")
    ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen: {chosen} pair(s)")
    ax.set_xlabel("number of pairs (exhaustive: best subset per size; others: greedy path)")
    ax.set_ylabel("mIoU (%)")
    ax.set_xticks(sizes)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _panel(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], caption: str) -> Image.Image:
    blended = image.astype(np.float32)
    blended[mask] = 0.5 * blended[mask] + 0.5 * np.array(colour, dtype=np.float32)
    panel = Image.fromarray(blended.astype(np.uint8))
    panel.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (OVERLAY_SIDE, OVERLAY_SIDE + 16), (255, 255, 255))
    canvas.paste(panel, (0, 16))
    ImageDraw.Draw(canvas).text((4, 2), caption, fill=(0, 0, 0))
    return canvas


def overlay(image_path: Path, truth: np.ndarray, before: np.ndarray, after: np.ndarray,
            iou_before: float, iou_after: float, path: Path) -> None:
    """PNG with ground truth, original-model mask and tuned-model mask side by side."""
    image = load_image_rgb(image_path)
    panels = [_panel(image, truth, COLOURS["truth"], "ground truth"),
              _panel(image, before, COLOURS["before"], f"original  IoU {iou_before:.1f}"),
              _panel(image, after, COLOURS["after"], f"tuned  IoU {iou_after:.1f}")]
    sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * OVERLAY_SIDE, 0))
    sheet.save(path, format="PNG")


def _gain_row(name: str, role: str, gain: Gain | None) -> str:
    if gain is None:
        return f"| {name} | {role} | - | - | - |"
    low, high = gain.interval
    return (f"| {name} ({gain.images}) | {role} | {gain.gain:+.2f} | [{low:+.2f}, {high:+.2f}] "
            f"| {gain.improved} / {gain.worse} |")


def _estimate_lines(report: TuneReport) -> list[str]:
    """Where each figure comes from and what it decided, candidate against the original."""
    held, search, shipping = report.held_out, report.search, report.shipping
    shipped = (f"`{shipping.encoder}` ({shipping.candidate_pairs} pair(s))" if shipping.shipped == "tuned"
               else f"the original encoder, `{shipping.encoder}`")
    kept = ("" if shipping.shipped == "tuned" or not shipping.candidate_files else
            f" The candidate is kept as `{shipping.candidate_files[0]}` and `{shipping.candidate_files[1]}` "
            "(`--ship-anyway` ships it).")
    lines = [f"**Shipped:** {shipped}.{kept}", "",
             "| images | role | change (mIoU) | 90% CI | better / worse |", "|---|---|---:|---|---|",
             f"| search ({search.images}) | chose the pairs | {search.tuned_miou - search.baseline_miou:+.2f} "
             "| - | - |"]
    if held is None:
        return lines + [_gain_row("search, cross-validated", "decided what ships; leans optimistic (screening saw "
                                  "every image)", shipping.decided_on), "",
                        "No held-out split: keep images back (`--holdout-images`) for a figure that took no part "
                        "in any choice."]
    if report.settings["selection"] == "cross-fitted":
        rows = [_gain_row("held-out, cross-fitted", "decided what ships; each image scored by the map chosen on the "
                          "other half: the figure to quote", shipping.reported)]
    else:
        rows = [_gain_row("held-out, validation part", "decided what ships", shipping.decided_on),
                _gain_row("held-out, test part", "decided nothing: the figure to quote", shipping.reported)]
    decided = shipping.decided_on
    needed = decided.images_needed if decided is not None and decided.interval[0] <= 0 else None
    return lines + [
        *rows,
        _gain_row("held-out, candidate", "the candidate on every held-out image (they chose it)",
                  None if shipping.decided_on is None else held.gain),
        "", f"Held-out mIoU, original -> candidate: {held.baseline_miou:.2f} -> "
            f"{held.tuned_miou:.2f}."
        + (f" A gain of this size and spread needs about {needed} held-out images for its lower bound to clear "
           "0." if needed is not None else ""), "",
        f"**How far to trust it.** The quoted figure holds for images drawn like these {held.images} "
        "held-out images, and no further: this run was not tested against images unlike them (another device, "
        "site or scene type). On shifted splits of public sets the search's pairs have lost held-out mIoU "
        "while gaining on their own images (benchmarks/README.md, \"Do no harm\"); hold out images that look "
        "like the ones you deploy on."]


def _mask_token_lines(token: MaskTokenSummary | None) -> list[str]:
    """Each mask token's mIoU and which one the shipped decoder returns; the pairs below were searched on it."""
    if token is None:
        return []
    return ["## Mask token", "",
            "| token | search mIoU (mean over prompts) | held-out mIoU |", "|---:|---:|---:|",
            *[f"| {k}{' (SAM single mask)' if k == 0 else ''}{' **shipped**' if k == token.shipped else ''} "
              f"| {search:.2f} | {_miou(held)} |"
              for k, (search, held) in enumerate(zip(token.search_miou, token.held_out_miou))], "",
            f"**Mask token:** {token.verdict}. The decoder that goes with the shipped encoder is `{token.decoder}`; "
            f"the pairs below were searched, and the held-out figures below are measured, on token {token.shipped}'s "
            "masks.", "", "## Reuse map", ""]


def _miou(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _curve_table(curve: list[dict[str, Any]]) -> list[str]:
    """Search and held-out mIoU of each map of the curve."""
    lines = ["| pairs | map | search mIoU | held-out mIoU |", "|---:|---|---:|---:|"]
    for p in curve:
        lines.append(f"| {p['pairs']} | {', '.join(f'{t}<-{s}' for t, s in p['map']) or '-'} | {p['search_miou']:.2f} "
                     f"| {_miou(p['held_out_miou'])} |")
    return lines


def markdown(report: TuneReport) -> str:
    """report.md: the figures a user needs to decide whether to ship the tuned model."""
    search, cost, settings, check = report.search, report.cost, report.settings, report.tuned_encoder_check
    held_images = report.held_out.images if report.held_out else 0
    lines = [
        "# sam-reuse tuning report",
        "",
        f"**Verdict:** {report.verdict}",
        "",
        f"- Model: `{report.model['encoder']}` (fingerprint {report.model['encoder_fingerprint'][:12]})",
        f"- Data: `{report.data['source']}`; prompts: {report.data['prompt']}; "
        f"{search.images} search / {held_images} held-out images"
        + ("; every search image also scored on 2 prompts of its own prompt's kind derived from its mask "
           "(evidence: points)" if settings.get("evidence", "given") == "points" else "")
        + (f"; and on {settings['augment']} altered copies of each (--augment)" if settings.get("augment") else "")
        + (f"; {len(report.data['skipped'])} skipped" if report.data["skipped"] else ""),
        f"- Site: `{report.site['name']}` ({report.site['channels']} channels); strategy "
        f"`{settings['strategy']}` ({settings['selection']} selection)"
        + f", top N = {settings['top_n']}, {search.pairs_scored} pairs ranked on all search images "
        f"(targets `{settings['targets']}`, sources `{settings['sources']}`)",
        f"- Candidate pairs (target <- source): {', '.join(f'{t} <- {s}' for t, s in report.candidate_pairs) or 'none'}"
        + (f" (the search's own choice: {search.search_choice_pairs} pair(s))"
           if settings["selection"] in ("cross-fitted", "validated") else ""),
        "",
        *_mask_token_lines(report.mask_token),
        *_estimate_lines(report),
        "",
        "## mIoU against the number of pairs",
        "",
        *_curve_table(report.curve),
        "",
        "![mIoU against pairs](miou_vs_pairs.png)",
        "",
        "## Cost",
        "",
        f"- Decoder evaluations: {cost['decoder_evaluations']['search']:,} (search) + "
        f"{cost['decoder_evaluations']['held_out']:,} (held-out)"
        + (f" + {cost['decoder_evaluations']['mask_tokens']:,} (mask tokens)"
           if cost["decoder_evaluations"].get("mask_tokens") else "") + "; "
        f"{cost['maps_reused_from_journal']:,} units of work read back from `search.jsonl`",
        f"- Wall time: {', '.join(f'{k} {v:.1f} s' for k, v in cost['wall_s'].items())}",
        f"- Tuned encoder check on `{check['image']}`: max |diff| vs the searched "
        f"embedding {check['max_abs_diff']:.2e} ({check['rewrite']})",
        "",
    ]
    if report.int8:
        int8 = report.int8
        lines += ["## INT8 encoder", "",
                  f"`{int8.model}`, the shipped encoder with its weight MatMuls in int8 (sidecar `{int8.model}.json`), "
                  f"with the float decoder on the {int8.images} held-out images:", "",
                  "| encoder | held-out mIoU | latency on ONNX Runtime CPU |", "|---|---:|---:|",
                  f"| fp32 (`{report.shipping.encoder}`) | {int8.fp32_miou:.2f} | 1.00 |",
                  f"| int8 | {int8.int8_miou:.2f} ({int8.int8_miou - int8.fp32_miou:+.2f}) | {int8.latency_ratio:.2f}x "
                  f"({int8.threads} threads, median of interleaved rounds) |", ""]
    if report.overlays:
        lines += ["## Overlays (held-out: green truth, red original, blue tuned)", "",
                  *[f"![{name}]({name})" for name in report.overlays], ""]
    return "\n".join(lines)
