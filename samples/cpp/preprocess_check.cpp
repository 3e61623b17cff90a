// The TensorRT-free half of the sample, for checking against exporter/imaging.py (tests/test_cpp_sample.py):
//   sam_preprocess_check [--sam2] IMAGE OUT_DIR [--logits LOW_RES_LOGITS.f32] PROMPT [PROMPT ...]
// (--sam2: SAM 2's framing) writes OUT_DIR/input.f32 (1x3x1024x1024 float32, the encoder input), OUT_DIR/prompt-K.f32 for the K-th
// PROMPT (sam_image.hpp's syntax; point_coords N x 2 then point_labels N) and, given 256x256 float32
// logits, OUT_DIR/mask.png at the image's size.
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "sam_image.hpp"

namespace {

void write_floats(const std::string& path, const std::vector<float>& values) {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(values.size() * sizeof(float)));
    if (!out) throw std::runtime_error(path + ": cannot write");
}

std::vector<float> read_floats(const std::string& path, size_t count) {
    std::ifstream in(path, std::ios::binary);
    std::vector<float> values(count);
    in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(count * sizeof(float)));
    if (!in) throw std::runtime_error(path + ": expected " + std::to_string(count) + " float32 values");
    return values;
}

}  // namespace

int main(int argc, char** argv) {
    const bool sam2 = argc > 1 && std::string(argv[1]) == "--sam2";
    const sam::Convention convention = sam2 ? sam::Convention::kSam2 : sam::Convention::kSam;
    if (sam2) {
        --argc;
        ++argv;
    }
    const bool has_logits = argc > 4 && std::string(argv[3]) == "--logits";
    const int first_prompt = has_logits ? 5 : 3;
    if (argc <= first_prompt) {
        std::cerr << "usage: sam_preprocess_check [--sam2] IMAGE OUT_DIR [--logits LOW_RES_LOGITS.f32] PROMPT "
                     "[PROMPT ...]\n";
        return 2;
    }
    try {
        const sam::RgbImage image = sam::load_image_rgb(argv[1]);
        const std::string out = argv[2];
        write_floats(out + "/input.f32", sam::preprocess(image, convention));
        for (int k = 0; k < argc - first_prompt; ++k) {
            std::vector<float> coords, labels;
            sam::prompt_arrays(sam::parse_prompt(argv[first_prompt + k]), image.height, image.width, &coords, &labels,
                               convention);
            coords.insert(coords.end(), labels.begin(), labels.end());
            write_floats(out + "/prompt-" + std::to_string(k) + ".f32", coords);
        }
        if (has_logits) {
            const auto logits = read_floats(argv[4], static_cast<size_t>(sam::kLowResSize) * sam::kLowResSize);
            sam::write_mask_png(out + "/mask.png", sam::upscale_mask(logits, image.height, image.width, convention),
                                image.height, image.width);
        }
    } catch (const std::exception& error) {
        std::cerr << "sam_preprocess_check: " << error.what() << "\n";
        return 1;
    }
    return 0;
}
