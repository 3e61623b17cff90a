"""Pre- and post-processing shared by every stage (numpy and Pillow only).

This is the single implementation of what ``SamPredictor`` does around the
networks, so that the ONNX path, the search, TensorRT engines and the C++
sample all see identical tensors:

* ``preprocess``: resize the longest side to 1024 with Pillow's bilinear
  filter (what torchvision's ``resize`` does for a PIL image), normalise with
  SAM's pixel mean/std, zero-pad bottom/right to 1024x1024;
* ``prompt_arrays``: map prompts into the resized frame and add SAM's padding
  point (0, 0, label -1) when no box is given, as ``PromptEncoder`` does;
* ``upscale_logits``: bilinear 256 -> 1024, crop the padding, bilinear to the
  original size (``Sam.postprocess_masks``), as two small matrix products.

Those are the ``sam`` conventions (SAM, MobileSAM). SAM 2's ``SAM2ImagePredictor``
has its own (``sam2``): it resizes both sides to 1024 (aspect ratio not kept;
torchvision's antialiased bilinear resize of the float image, which Pillow's
bilinear filter on float channels reproduces), normalises with the same
mean/std, scales prompts by 1024/W and 1024/H, puts a box's corners before the
clicks and always appends the padding point, and resizes the 256x256 logits
straight to the image's size. Every function below that depends on them takes
``convention``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.records import Prompt

IMAGE_SIZE = 1024
LOW_RES_SIZE = 256
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
MASK_THRESHOLD = 0.0
SAM1, SAM2 = "sam", "sam2"  # SamPredictor (SAM, MobileSAM) and SAM2ImagePredictor (see above)
CONVENTIONS = (SAM1, SAM2)


MAX_PIXELS = 8192 * 8192  # SAM looks at 1024 px; anything larger is a mistake or a decompression bomb
_HIGH_DEPTH_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@contextlib.contextmanager
def open_image(path: str | Path, what: str = "image") -> Iterator[Image.Image]:
    """``Image.open`` with one clear error per problem: missing, not a regular file, unreadable, or too large."""
    if Path(path).exists() and not Path(path).is_file():  # a FIFO or a device would block or never end
        raise SamReuseError(f"{path}: {what} is not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise SamReuseError(f"{path}: {what} is {width}x{height} pixels, too large to decode (limit "
                                        f"{MAX_PIXELS:,} pixels): a decompression bomb, or an image to downscale")
                yield _upright(img)
    except FileNotFoundError:
        raise SamReuseError(f"{path}: {what} not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SamReuseError(f"{path}: {what} too large to decode ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SamReuseError(f"{path}: cannot read {what} ({exc})") from None


EXIF_ORIENTATION = 0x0112


def _upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it: turned by its EXIF orientation, as cv2.imread and browsers do (a phone's
    JPEG is stored sideways with a tag saying so, and its mask is drawn on the upright picture)."""
    if img.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
        return ImageOps.exif_transpose(img)
    return img


def to_rgb8(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB of any mode Pillow reads: palette, alpha and CMYK converted, alpha dropped;
    16-bit and 32-bit gray scaled to 8 bits (65535 -> 255), not clipped as ``convert("RGB")`` would."""
    if img.mode not in _HIGH_DEPTH_GRAY:
        return np.asarray(img.convert("RGB"))
    values = np.asarray(img, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if img.mode.startswith("I;16"):
        full = 65535.0  # the format's own range, however dark the image
    elif img.mode == "I":  # 32-bit integers: usually 8- or 16-bit data that Pillow widened
        full = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    else:  # "F": floats in 0..1, else 0..255
        full = 1.0 if top <= 1.0 else 255.0
    gray = np.clip(np.round(values / full * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def load_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB (``to_rgb8``), with a clear error for bad files."""
    with open_image(path) as img:
        try:
            return to_rgb8(img)
        except OSError as exc:  # truncated data shows up when the pixels are decoded
            raise SamReuseError(f"{path}: cannot read image ({exc})") from None


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention '{convention}' (choose from {', '.join(CONVENTIONS)})")


def resized_shape(height: int, width: int, long_side: int = IMAGE_SIZE, convention: str = SAM1) -> tuple[int, int]:
    """(h, w) of the image inside the encoder's input: the longest side scaled to ``long_side`` and rounded like
    SAM (``pad``), or the whole input (``stretch``)."""
    _check_convention(convention)
    if convention == SAM2:
        return long_side, long_side
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _resized_float(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Bilinear resize of each channel as float32 (antialiased when shrinking), with no rounding to 8 bits."""
    channels = [Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((new_w, new_h), Image.BILINEAR)
                for c in range(image.shape[2])]
    return np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=-1)


def preprocess(image: np.ndarray, long_side: int = IMAGE_SIZE, convention: str = SAM1) -> np.ndarray:
    """HxWx3 uint8 RGB -> 1x3xSxS float32 encoder input (resized, normalised, padded)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
    new_h, new_w = resized_shape(image.shape[0], image.shape[1], long_side, convention)
    if convention == SAM2:
        resized = _resized_float(image, new_h, new_w)
    else:
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
    normalised = (resized - PIXEL_MEAN) / PIXEL_STD
    padded = np.zeros((long_side, long_side, 3), dtype=np.float32)
    padded[:new_h, :new_w] = normalised
    return padded.transpose(2, 0, 1)[None]


def transform_coords(coords: np.ndarray, original_hw: tuple[int, int], long_side: int = IMAGE_SIZE,
                     convention: str = SAM1) -> np.ndarray:
    """Map x,y pixel coordinates of the original image into the resized frame."""
    old_h, old_w = original_hw
    new_h, new_w = resized_shape(old_h, old_w, long_side, convention)
    out = np.array(coords, dtype=np.float64).copy()
    out[..., 0] *= new_w / old_w
    out[..., 1] *= new_h / old_h
    return out.astype(np.float32)


def prompt_arrays(prompt: Prompt, original_hw: tuple[int, int], convention: str = SAM1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Decoder inputs ``point_coords`` (1xNx2) and ``point_labels`` (1xN), float32.

    Box corners are points with labels 2 and 3. Without a box SAM's prompt
    encoder appends a padding point (0, 0) with label -1 (SAM 2's always does);
    the exported decoder has no control flow, so the caller appends it here.
    """
    has_points = prompt.points is not None and len(prompt.points) > 0
    if not has_points and prompt.box is None:
        raise ValueError("a prompt needs at least one point or a box")
    _check_convention(convention)
    coords: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if has_points:
        pts = np.asarray(prompt.points, dtype=np.float32).reshape(-1, 2)
        lab = np.asarray(prompt.labels if prompt.labels is not None else np.ones(len(pts)), dtype=np.float32)
        if lab.shape != (len(pts),):
            raise ValueError(f"{len(pts)} points but labels of shape {lab.shape}")
        coords.append(transform_coords(pts, original_hw, convention=convention))
        labels.append(lab)
    if prompt.box is not None:
        corners = np.asarray(prompt.box, dtype=np.float32).reshape(2, 2)
        at = 0 if convention == SAM2 else len(coords)  # SAM 2: the box's corners come first
        coords.insert(at, transform_coords(corners, original_hw, convention=convention))
        labels.insert(at, np.array([2, 3], dtype=np.float32))
    if prompt.box is None or convention == SAM2:
        coords.append(np.zeros((1, 2), dtype=np.float32))
        labels.append(np.array([-1], dtype=np.float32))
    return np.concatenate(coords)[None].astype(np.float32), np.concatenate(labels)[None].astype(np.float32)


def groups_by_point_count(prompts: Sequence[tuple[np.ndarray, np.ndarray]], size: int | None = None
                          ) -> list[list[int]]:
    """Indices of ``prompt_arrays`` outputs batched for one decoder call each: one point count per batch
    (padding a prompt with -1 points would change SAM's mask), at most ``size`` (None: any) per batch."""
    by_count: dict[int, list[int]] = {}
    for i, (coords, _) in enumerate(prompts):
        by_count.setdefault(coords.shape[1], []).append(i)
    step = size or max(len(prompts), 1)
    return [members[start:start + step] for _, members in sorted(by_count.items())
            for start in range(0, len(members), step)]


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """out_size x in_size matrix equal to 1-D bilinear resizing with align_corners=False.

    Source positions follow PyTorch's ``upsample_bilinear2d``: half-pixel
    centres, negative positions clamped to 0, the upper neighbour clamped to
    the last sample.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = (src - lower).astype(np.float32)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1 - frac)
    np.add.at(matrix, (rows, upper), frac)
    return matrix


def upscale_matrices(original_hw: tuple[int, int], low_res: int = LOW_RES_SIZE,
                     long_side: int = IMAGE_SIZE, convention: str = SAM1) -> tuple[np.ndarray, np.ndarray]:
    """(rows HxL, cols LxW) with ``rows @ logits @ cols`` = SAM's mask post-processing (SAM 2's: one bilinear
    resize of the logits to the image's size)."""
    height, width = original_hw
    if convention == SAM2:
        return bilinear_matrix(low_res, height), np.ascontiguousarray(bilinear_matrix(low_res, width).T)
    new_h, new_w = resized_shape(height, width, long_side, convention)
    to_padded = bilinear_matrix(low_res, long_side)
    rows = bilinear_matrix(new_h, height) @ to_padded[:new_h]
    cols = (bilinear_matrix(new_w, width) @ to_padded[:new_w]).T
    return rows, np.ascontiguousarray(cols)


class _Cells:
    """The output lines of one upscaling axis (rows of ``matrix``, output x low-res) grouped into cells: runs of
    consecutive lines that read the same window of low-res lines (its non-zero weights). Upscaling 256 -> 1024
    makes 257 cells of up to 4 lines, each reading 1 or 2 low-res lines."""

    def __init__(self, matrix: np.ndarray):
        nonzero = matrix != 0
        if not nonzero.any(axis=1).all():
            raise ValueError("every output line of an upscaling matrix must read a low-res line")
        first = nonzero.argmax(axis=1)
        last = nonzero.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
        changes = np.flatnonzero((np.diff(first) != 0) | (np.diff(last) != 0)) + 1
        self.starts = np.concatenate([[0], changes])  # first output line of each cell
        self.sizes = np.diff(np.append(self.starts, len(matrix)))  # output lines per cell
        self.first, self.last = first[self.starts], last[self.starts]  # the low-res window of each cell
        width, height = int((self.last - self.first).max()) + 1, int(self.sizes.max())
        # the j-th low-res line of each cell's window (its last where the window is narrower): all of them
        # together cover each window
        self.offsets = [np.minimum(self.first + j, self.last) for j in range(width)]
        # Per cell, its lines' weights on its window, padded to the largest cell and window with zero weights
        # (a padded line reads nothing, so its value is 0: never positive)
        self.window = np.minimum(self.first[:, None] + np.arange(width), matrix.shape[1] - 1)  # cells x width
        self.lines = np.minimum(self.starts[:, None] + np.arange(height), len(matrix) - 1)  # cells x height
        in_cell = np.arange(height) < self.sizes[:, None]
        in_window = self.first[:, None] + np.arange(width) <= self.last[:, None]
        self.weights = (matrix[self.lines[:, :, None], self.window[:, None, :]]
                        * in_cell[:, :, None] * in_window[:, None, :]).astype(np.float32)  # cells x height x width


@dataclass(frozen=True)
class MaskTarget:
    """A ground-truth mask summed over an ``Upscaling``'s cells, made once per mask and scored against often."""

    mask: np.ndarray  # H x W bool
    in_cells: np.ndarray  # row cells x column cells: the mask's pixels in each cell
    pixels: int


def _over_windows(reduce: np.ufunc, values: np.ndarray, offsets: list[np.ndarray]) -> np.ndarray:
    """``reduce`` (``np.logical_and``, ``np.logical_or``) over each cell's window of lines (``_Cells.offsets``):
    cells x columns of ``values``."""
    return reduce.reduce([values.take(lines, axis=0) for lines in offsets])


class Upscaling:
    """SAM's mask post-processing for one image size (``upscale_matrices``), and the IoU of its thresholded mask.

    Both matrices are bilinear weights: non-negative, each output pixel reading a small window of low-res
    logits. A pixel whose window holds only positive logits is positive, one whose window holds none is not,
    in exact arithmetic and in float alike (a sum of same-signed terms keeps the sign). So ``iou`` groups the
    output pixels into cells that read the same window (``_Cells``; 4 x 4 pixels reading 2 x 2 logits at 256 ->
    1024), counts the cells whose window is all positive whole, and upscales only the pixels of
    cells whose window holds both signs: the mask's border. The same mask as the full products up to float
    rounding of those pixels, at a small fraction of their cost. The search scores every map this way.
    """

    def __init__(self, original_hw: tuple[int, int], convention: str = SAM1):
        self.hw = tuple(original_hw)
        self.rows, self.cols = upscale_matrices(original_hw, convention=convention)
        self._row_cells, self._col_cells = _Cells(self.rows), _Cells(self.cols.T)
        self._cell_pixels = self._row_cells.sizes[:, None] * self._col_cells.sizes[None, :]

    def logits(self, low_res_logits: np.ndarray) -> np.ndarray:
        """LxL logits -> HxW logits at the image's size."""
        return self.rows @ low_res_logits @ self.cols

    def target(self, truth: np.ndarray) -> MaskTarget:
        """``truth`` (H x W bool, this upscaling's size) counted per cell, for ``iou``."""
        if truth.shape != self.hw:
            raise ValueError(f"mask {truth.shape} and upscaling {self.hw} differ in shape")
        in_rows = np.add.reduceat(truth.astype(np.int64), self._row_cells.starts, axis=0)
        return MaskTarget(truth, np.add.reduceat(in_rows, self._col_cells.starts, axis=1),
                          int(np.count_nonzero(truth)))

    def _cells_reached(self, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row cells x column cells: whose window holds only positive logits, and whose holds some but not all."""
        rows, cols = self._row_cells, self._col_cells
        whole = _over_windows(np.logical_and, _over_windows(np.logical_and, positive, rows.offsets).T,
                              cols.offsets).T
        reached = _over_windows(np.logical_or, _over_windows(np.logical_or, positive, rows.offsets).T, cols.offsets).T
        return whole, reached & ~whole

    def _border(self, low_res_logits: np.ndarray, border: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The border cells' pixels (cells x lines x columns, padded) upscaled and thresholded, with their output
        rows and columns and which of them lie in their cell (padding does not)."""
        rows, cols = self._row_cells, self._col_cells
        row_cell, col_cell = np.divmod(np.flatnonzero(border), border.shape[1])
        window = low_res_logits[rows.window[row_cell][:, :, None], cols.window[col_cell][:, None, :]]
        mask = logits_to_mask(rows.weights[row_cell] @ window @ cols.weights[col_cell].transpose(0, 2, 1))
        inside = ((np.arange(mask.shape[1])[None, :, None] < rows.sizes[row_cell][:, None, None])
                  & (np.arange(mask.shape[2])[None, None, :] < cols.sizes[col_cell][:, None, None]))
        return mask, rows.lines[row_cell][:, :, None], cols.lines[col_cell][:, None, :], inside

    def mask(self, low_res_logits: np.ndarray) -> np.ndarray:
        """``logits_to_mask(self.logits(low_res_logits))`` (H x W bool), upscaling only the mask's border."""
        positive = low_res_logits > MASK_THRESHOLD
        if not positive.any():
            return np.zeros(self.hw, dtype=bool)
        whole, border = self._cells_reached(positive)
        out = np.repeat(np.repeat(whole, self._row_cells.sizes, axis=0), self._col_cells.sizes, axis=1)
        if border.any():
            mask, lines, columns, inside = self._border(low_res_logits, border)
            out[np.broadcast_to(lines, mask.shape)[inside], np.broadcast_to(columns, mask.shape)[inside]] = mask[inside]
        return out

    def iou(self, low_res_logits: np.ndarray, target: MaskTarget) -> float:
        """``binary_iou(logits_to_mask(self.logits(low_res_logits)), target.mask)``, counted by cells."""
        positive = low_res_logits > MASK_THRESHOLD
        if not positive.any():
            return 0.0  # an empty prediction: binary_iou's 0, also when the truth is empty
        whole, border = self._cells_reached(positive)
        predicted = int(self._cell_pixels[whole].sum())
        intersection = int(target.in_cells[whole].sum())
        if border.any():
            mask, lines, columns, _ = self._border(low_res_logits, border)  # padding is never positive
            predicted += int(np.count_nonzero(mask))
            intersection += int(np.count_nonzero(mask & target.mask[lines, columns]))
        union = predicted + target.pixels - intersection
        return 0.0 if union == 0 else intersection / union


def low_res_target(mask: np.ndarray, convention: str = SAM1) -> tuple[np.ndarray, np.ndarray]:
    """A HxW ground-truth mask in the decoder's 256x256 low-resolution frame: (target, valid), float32.

    The frame covers the 1024x1024 input, so under SAM's convention the image fills its top-left (h/4 x w/4 of
    the resized image) and under SAM 2's all of it. ``target`` is the share of each low-res pixel inside the
    object (box filter), 0 on the padding; ``valid`` is 1 on the image and 0 on the padding.
    """
    height, width = mask.shape
    new_h, new_w = resized_shape(height, width, convention=convention)
    low_h, low_w = max(1, round(new_h * LOW_RES_SIZE / IMAGE_SIZE)), max(1, round(new_w * LOW_RES_SIZE / IMAGE_SIZE))
    shrunk = Image.fromarray(mask.astype(np.uint8) * 255).resize((low_w, low_h), Image.Resampling.BOX)
    target = np.zeros((LOW_RES_SIZE, LOW_RES_SIZE), np.float32)
    valid = np.zeros_like(target)
    target[:low_h, :low_w] = np.asarray(shrunk, dtype=np.float32) / 255
    valid[:low_h, :low_w] = 1
    return target, valid


def upscale_logits(low_res_logits: np.ndarray, original_hw: tuple[int, int], convention: str = SAM1) -> np.ndarray:
    """...xLxL low-resolution mask logits -> ...xHxW logits at the original image size."""
    rows, cols = upscale_matrices(original_hw, low_res_logits.shape[-1], convention=convention)
    return rows @ low_res_logits.astype(np.float32) @ cols


def binary_iou(prediction: np.ndarray, truth: np.ndarray, empty: float = 0.0) -> float:
    """|P & T| / |P | T| of two boolean masks; ``empty`` when both are empty.

    Scored against ground truth, an empty union counts as 0, as in the reference method; two predictions
    compared with each other (export parity) agree perfectly when both are empty: ``empty=1.0``.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and mask {truth.shape} differ in shape")
    intersection = np.count_nonzero(prediction & truth)
    union = np.count_nonzero(prediction) + np.count_nonzero(truth) - intersection
    return empty if union == 0 else intersection / union


def logits_to_mask(logits: np.ndarray) -> np.ndarray:
    """Binary mask the way SAM thresholds logits."""
    return logits > MASK_THRESHOLD
