// Pre- and post-processing of SAM (and SAM 2) around its two networks, the same as sam_reuse/base/imaging.py.
// Convention::kSam frames images as SamPredictor, Convention::kSam2 as SAM2ImagePredictor.
//
// preprocess():   SAM: resize the longest side to 1024 with Pillow's bilinear filter (antialiased, 8-bit
//                 fixed point, horizontal pass then vertical), normalise with SAM's pixel mean/std,
//                 zero-pad to 1024x1024, planar CHW float32. SAM 2: stretch to 1024x1024 with the same
//                 filter on float pixels (Pillow's "F" images: weights and sums in double, no rounding).
// parse_prompt(): a prompt from the command line: "p:X,Y" (foreground point), "n:X,Y" (background
//                 point), "b:X0,Y0,X1,Y1" (box), parts joined by '+', e.g. "b:10,20,300,400+p:150,200".
// prompt_arrays(): the decoder's point_coords/point_labels for one prompt. SAM: points, then the box's
//                 corners (labels 2, 3), or the padding point (0, 0, label -1) when there is no box.
//                 SAM 2: the box's corners first, then the points, then the padding point always.
// upscale_mask(): SAM: bilinear 256 -> 1024 (align_corners=False), crop the padding, bilinear to the
//                 image size; SAM 2: bilinear 256 -> the image size; then threshold at 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sam {

constexpr int kImageSize = 1024;
constexpr int kLowResSize = 256;

// Whose predictor the exported models follow (an export's ``sam_reuse.convention``).
enum class Convention { kSam, kSam2 };

struct RgbImage {
    int height = 0;
    int width = 0;
    std::vector<uint8_t> pixels;  // height x width x 3, row-major
};

// Reads a JPEG or an 8-bit PNG as RGB (gray is replicated, alpha dropped, palettes expanded).
// Throws std::runtime_error naming the file on any problem.
RgbImage load_image_rgb(const std::string& path);

// (h, w) of the image inside the encoder input: the longest side scaled to 1024 and rounded like SAM, or
// 1024 x 1024 (SAM 2).
void resized_shape(int height, int width, int* new_height, int* new_width, Convention convention = Convention::kSam);

// Pillow's Image.resize(..., BILINEAR) for an RGB image.
RgbImage resize_bilinear(const RgbImage& image, int new_height, int new_width);

// 1x3x1024x1024 float32 encoder input.
std::vector<float> preprocess(const RgbImage& image, Convention convention = Convention::kSam);

// One prompt in image pixels: points (x, y pairs) with labels (1 foreground, 0 background) and/or a box.
struct Prompt {
    std::vector<float> points;  // x0, y0, x1, y1, ...
    std::vector<float> labels;  // one per point
    bool has_box = false;
    float box[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // x0, y0, x1, y1
};

// Parses the syntax above. Throws std::runtime_error naming the text on any problem.
Prompt parse_prompt(const std::string& text);

// point_coords (N x 2, in the 1024-pixel frame) and point_labels (N) of one prompt, as the predictor builds them.
void prompt_arrays(const Prompt& prompt, int height, int width, std::vector<float>* coords, std::vector<float>* labels,
                   Convention convention = Convention::kSam);

// 256x256 low-resolution logits -> height x width mask (1 = object), as the predictor thresholds it.
std::vector<uint8_t> upscale_mask(const std::vector<float>& low_res_logits, int height, int width,
                                  Convention convention = Convention::kSam);

// Writes a one-channel 8-bit PNG (mask * 255). Throws std::runtime_error on failure.
void write_mask_png(const std::string& path, const std::vector<uint8_t>& mask, int height, int width);

}  // namespace sam
