// Pre- and post-processing of SAM around its two networks, the same as exporter/imaging.py.
//
// preprocess():   resize the longest side to 1024 with Pillow's bilinear filter (antialiased, 8-bit
//                 fixed point, horizontal pass then vertical), normalise with SAM's pixel mean/std,
//                 zero-pad to 1024x1024, planar CHW float32.
// point_prompt(): the decoder's point_coords/point_labels for one foreground point, with SAM's
//                 padding point (0, 0, label -1).
// upscale_mask(): bilinear 256 -> 1024 (align_corners=False), crop the padding, bilinear to the
//                 image size, threshold at 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sam {

constexpr int kImageSize = 1024;
constexpr int kLowResSize = 256;

struct RgbImage {
    int height = 0;
    int width = 0;
    std::vector<uint8_t> pixels;  // height x width x 3, row-major
};

// Reads a JPEG or an 8-bit PNG as RGB (gray is replicated, alpha dropped, palettes expanded).
// Throws std::runtime_error naming the file on any problem.
RgbImage load_image_rgb(const std::string& path);

// (h, w) after scaling the longest side to 1024, rounded like SAM.
void resized_shape(int height, int width, int* new_height, int* new_width);

// Pillow's Image.resize(..., BILINEAR) for an RGB image.
RgbImage resize_bilinear(const RgbImage& image, int new_height, int new_width);

// 1x3x1024x1024 float32 encoder input.
std::vector<float> preprocess(const RgbImage& image);

// point_coords (1x2x2) and point_labels (1x2) for one foreground point (x, y) in image pixels.
void point_prompt(float x, float y, int height, int width, std::vector<float>* coords, std::vector<float>* labels);

// 256x256 low-resolution logits -> height x width mask (1 = object), as SamPredictor thresholds it.
std::vector<uint8_t> upscale_mask(const std::vector<float>& low_res_logits, int height, int width);

// Writes a one-channel 8-bit PNG (mask * 255). Throws std::runtime_error on failure.
void write_mask_png(const std::string& path, const std::vector<uint8_t>& mask, int height, int width);

}  // namespace sam
