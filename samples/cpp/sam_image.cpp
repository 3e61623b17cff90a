// See sam_image.hpp. Every step mirrors exporter/imaging.py; tests/test_cpp_sample.py checks the
// results against it bit for bit (preprocessing) and pixel for pixel (masks).
#include "sam_image.hpp"

#include <jpeglib.h>
#include <png.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <type_traits>

namespace sam {
namespace {

constexpr float kPixelMean[3] = {123.675f, 116.28f, 103.53f};
constexpr float kPixelStd[3] = {58.395f, 57.12f, 57.375f};

struct FileCloser {
    void operator()(FILE* f) const { if (f) std::fclose(f); }
};
using File = std::unique_ptr<FILE, FileCloser>;

File open_file(const std::string& path, const char* mode) {
    File file(std::fopen(path.c_str(), mode));
    if (!file) throw std::runtime_error(path + ": cannot open");
    return file;
}

struct JpegError {
    jpeg_error_mgr base;
    std::jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr info) {
    auto* error = reinterpret_cast<JpegError*>(info->err);
    (*info->err->format_message)(info, error->message);
    std::longjmp(error->jump, 1);
}

// libjpeg with its defaults (islow IDCT, fancy upsampling), as Pillow decodes.
RgbImage load_jpeg(const std::string& path, FILE* file) {
    jpeg_decompress_struct info;
    JpegError error;
    info.err = jpeg_std_error(&error.base);
    error.base.error_exit = jpeg_fail;
    RgbImage image;
    if (setjmp(error.jump)) {
        jpeg_destroy_decompress(&info);
        throw std::runtime_error(path + ": cannot read JPEG (" + error.message + ")");
    }
    jpeg_create_decompress(&info);
    jpeg_stdio_src(&info, file);
    jpeg_read_header(&info, TRUE);
    if (info.jpeg_color_space == JCS_CMYK || info.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&info);
        throw std::runtime_error(path + ": CMYK JPEGs are not supported");
    }
    info.out_color_space = JCS_RGB;
    jpeg_start_decompress(&info);
    image.height = static_cast<int>(info.output_height);
    image.width = static_cast<int>(info.output_width);
    image.pixels.resize(static_cast<size_t>(image.height) * image.width * 3);
    while (info.output_scanline < info.output_height) {
        JSAMPROW row = image.pixels.data() + static_cast<size_t>(info.output_scanline) * image.width * 3;
        jpeg_read_scanlines(&info, &row, 1);
    }
    jpeg_finish_decompress(&info);
    jpeg_destroy_decompress(&info);
    return image;
}

// 8-bit PNGs: palette expanded, gray replicated, alpha dropped - Pillow's convert("RGB").
RgbImage load_png(const std::string& path, FILE* file) {
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
    png_infop info = png ? png_create_info_struct(png) : nullptr;
    if (!info) throw std::runtime_error(path + ": out of memory reading PNG");
    RgbImage image;
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, nullptr);
        throw std::runtime_error(path + ": cannot read PNG");
    }
    png_init_io(png, file);
    png_read_info(png, info);
    if (png_get_bit_depth(png, info) == 16) {
        png_destroy_read_struct(&png, &info, nullptr);
        throw std::runtime_error(path + ": 16-bit PNGs are not supported");
    }
    int color = png_get_color_type(png, info);
    if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) {
        png_set_expand_gray_1_2_4_to_8(png);
        png_set_gray_to_rgb(png);
    }
    if (color & PNG_COLOR_MASK_ALPHA) png_set_strip_alpha(png);
    png_read_update_info(png, info);
    image.height = static_cast<int>(png_get_image_height(png, info));
    image.width = static_cast<int>(png_get_image_width(png, info));
    image.pixels.resize(static_cast<size_t>(image.height) * image.width * 3);
    std::vector<png_bytep> rows(image.height);
    for (int y = 0; y < image.height; ++y) rows[y] = image.pixels.data() + static_cast<size_t>(y) * image.width * 3;
    png_read_image(png, rows.data());
    png_destroy_read_struct(&png, &info, nullptr);
    return image;
}

// Pillow's Resample.c, bilinear filter: 8 bits per channel in fixed point, float32 ("F" images) in double.
constexpr int kPrecisionBits = 32 - 8 - 2;

struct Coefficients {
    int ksize = 0;
    std::vector<int> bounds;       // (first input index, count) per output index
    std::vector<double> weights;   // ksize normalised weights per output index (float images)
    std::vector<int> fixed;        // the same in fixed point (8-bit images)
};

Coefficients precompute(int in_size, int out_size) {
    const double scale = static_cast<double>(in_size) / out_size;
    const double filter_scale = std::max(scale, 1.0);
    const double support = 1.0 * filter_scale;  // the bilinear filter's support is 1
    Coefficients c;
    c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    c.bounds.resize(out_size * 2);
    c.weights.assign(static_cast<size_t>(out_size) * c.ksize, 0.0);
    c.fixed.assign(static_cast<size_t>(out_size) * c.ksize, 0);
    for (int xx = 0; xx < out_size; ++xx) {
        const double center = (xx + 0.5) * scale;
        int xmin = static_cast<int>(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double* k = &c.weights[static_cast<size_t>(xx) * c.ksize];
        double total = 0.0;
        for (int x = 0; x < xmax; ++x) {
            double t = std::fabs((x + xmin - center + 0.5) * (1.0 / filter_scale));
            k[x] = t < 1.0 ? 1.0 - t : 0.0;
            total += k[x];
        }
        for (int x = 0; x < xmax; ++x) {
            if (total != 0.0) k[x] /= total;
            const double fixed = k[x] * (1 << kPrecisionBits);
            c.fixed[static_cast<size_t>(xx) * c.ksize + x] = static_cast<int>(fixed < 0 ? fixed - 0.5 : fixed + 0.5);
        }
        c.bounds[xx * 2] = xmin;
        c.bounds[xx * 2 + 1] = xmax;
    }
    return c;
}

uint8_t clip8(int value) {
    const int shifted = value >> kPrecisionBits;  // arithmetic shift, as Pillow relies on
    return static_cast<uint8_t>(std::clamp(shifted, 0, 255));
}

// One pass of interleaved `channels`-channel pixels along rows (horizontal) or columns, reading rows
// [first_row, ...) of `in` (in_width wide); uint8 in Pillow's fixed point, float accumulated in double.
template <typename T>
std::vector<T> resample_pass(const std::vector<T>& in, int in_width, int channels, int out_height, int out_width,
                             const Coefficients& c, bool horizontal, int first_row) {
    std::vector<T> out(static_cast<size_t>(out_height) * out_width * channels);
    for (int y = 0; y < out_height; ++y) {
        for (int x = 0; x < out_width; ++x) {
            const int index = horizontal ? x : y;
            const int start = c.bounds[index * 2], count = c.bounds[index * 2 + 1];
            const size_t offset = static_cast<size_t>(index) * c.ksize;
            for (int channel = 0; channel < channels; ++channel) {
                auto sample = [&](int i) {
                    const int sy = horizontal ? y + first_row : start + i;
                    const int sx = horizontal ? start + i : x;
                    return in[(static_cast<size_t>(sy) * in_width + sx) * channels + channel];
                };
                T& target = out[(static_cast<size_t>(y) * out_width + x) * channels + channel];
                if constexpr (std::is_same_v<T, uint8_t>) {
                    int sum = 1 << (kPrecisionBits - 1);
                    for (int i = 0; i < count; ++i) sum += sample(i) * c.fixed[offset + i];
                    target = clip8(sum);
                } else {
                    double sum = 0.0;
                    for (int i = 0; i < count; ++i) sum += sample(i) * c.weights[offset + i];
                    target = static_cast<T>(sum);
                }
            }
        }
    }
    return out;
}

// Pillow's Image.resize(..., BILINEAR): horizontal pass over only the rows the vertical pass reads, then
// the vertical pass with its bounds shifted to match; a pass is skipped when its size does not change.
template <typename T>
std::vector<T> resize_pillow(const std::vector<T>& pixels, int height, int width, int channels, int new_height,
                             int new_width) {
    const Coefficients horizontal = precompute(width, new_width);
    Coefficients vertical = precompute(height, new_height);
    const int first_row = vertical.bounds[0];
    const int last_row = vertical.bounds[new_height * 2 - 2] + vertical.bounds[new_height * 2 - 1];
    std::vector<T> current = pixels;
    int current_width = width, row_offset = 0;
    if (new_width != width) {
        current = resample_pass(pixels, width, channels, last_row - first_row, new_width, horizontal, true, first_row);
        current_width = new_width;
        row_offset = first_row;
    }
    if (new_height != height) {
        for (int y = 0; y < new_height; ++y) vertical.bounds[y * 2] -= row_offset;
        current = resample_pass(current, current_width, channels, new_height, new_width, vertical, false, 0);
    }
    return current;
}

// PyTorch's upsample_bilinear2d along one axis (align_corners=False): source index pair and weight.
struct Taps {
    std::vector<int> lower, upper;
    std::vector<float> frac;
};

Taps bilinear_taps(int in_size, int out_size) {
    Taps t;
    const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
    for (int i = 0; i < out_size; ++i) {
        const float src = std::max((static_cast<float>(i) + 0.5f) * scale - 0.5f, 0.0f);
        const int lower = std::min(static_cast<int>(std::floor(src)), in_size - 1);
        t.lower.push_back(lower);
        t.upper.push_back(std::min(lower + 1, in_size - 1));
        t.frac.push_back(src - static_cast<float>(lower));
    }
    return t;
}

// rows x cols float image -> out_rows x out_cols, separable bilinear.
std::vector<float> resize_float(const std::vector<float>& in, int rows, int cols, int out_rows, int out_cols) {
    const Taps r = bilinear_taps(rows, out_rows), c = bilinear_taps(cols, out_cols);
    std::vector<float> tmp(static_cast<size_t>(rows) * out_cols), out(static_cast<size_t>(out_rows) * out_cols);
    for (int y = 0; y < rows; ++y)
        for (int x = 0; x < out_cols; ++x)
            tmp[static_cast<size_t>(y) * out_cols + x] = (1.0f - c.frac[x]) * in[static_cast<size_t>(y) * cols + c.lower[x]] +
                                                        c.frac[x] * in[static_cast<size_t>(y) * cols + c.upper[x]];
    for (int y = 0; y < out_rows; ++y)
        for (int x = 0; x < out_cols; ++x)
            out[static_cast<size_t>(y) * out_cols + x] = (1.0f - r.frac[y]) * tmp[static_cast<size_t>(r.lower[y]) * out_cols + x] +
                                                        r.frac[y] * tmp[static_cast<size_t>(r.upper[y]) * out_cols + x];
    return out;
}

}  // namespace

RgbImage load_image_rgb(const std::string& path) {
    File file = open_file(path, "rb");
    unsigned char magic[8] = {0};
    const size_t got = std::fread(magic, 1, sizeof magic, file.get());
    std::rewind(file.get());
    if (got >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF) return load_jpeg(path, file.get());
    if (got == 8 && png_sig_cmp(magic, 0, 8) == 0) return load_png(path, file.get());
    throw std::runtime_error(path + ": not a JPEG or PNG image");
}

void resized_shape(int height, int width, int* new_height, int* new_width, Convention convention) {
    if (convention == Convention::kSam2) {
        *new_height = *new_width = kImageSize;
        return;
    }
    const double scale = kImageSize * 1.0 / std::max(height, width);
    *new_height = static_cast<int>(height * scale + 0.5);
    *new_width = static_cast<int>(width * scale + 0.5);
}

RgbImage resize_bilinear(const RgbImage& image, int new_height, int new_width) {
    return {new_height, new_width, resize_pillow(image.pixels, image.height, image.width, 3, new_height, new_width)};
}

std::vector<float> preprocess(const RgbImage& image, Convention convention) {
    int new_height = 0, new_width = 0;
    resized_shape(image.height, image.width, &new_height, &new_width, convention);
    std::vector<float> resized;
    if (convention == Convention::kSam2) {  // each channel as a float image: no rounding to 8 bits
        resized = resize_pillow(std::vector<float>(image.pixels.begin(), image.pixels.end()), image.height,
                                image.width, 3, new_height, new_width);
    } else {
        const RgbImage pixels = resize_bilinear(image, new_height, new_width);
        resized.assign(pixels.pixels.begin(), pixels.pixels.end());
    }
    std::vector<float> tensor(static_cast<size_t>(3) * kImageSize * kImageSize, 0.0f);
    for (int c = 0; c < 3; ++c)
        for (int y = 0; y < new_height; ++y)
            for (int x = 0; x < new_width; ++x) {
                const float value = resized[(static_cast<size_t>(y) * new_width + x) * 3 + c];
                tensor[(static_cast<size_t>(c) * kImageSize + y) * kImageSize + x] = (value - kPixelMean[c]) / kPixelStd[c];
            }
    return tensor;
}

namespace {

std::vector<float> parse_numbers(const std::string& text, size_t count, const std::string& whole) {
    std::vector<float> values;
    size_t position = 0;
    while (position <= text.size()) {
        const size_t comma = std::min(text.find(',', position), text.size());
        const std::string field = text.substr(position, comma - position);
        size_t used = 0;
        float value = 0.0f;
        try {
            value = std::stof(field, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (field.empty() || used != field.size() || !std::isfinite(value))
            throw std::runtime_error("prompt '" + whole + "': '" + field + "' is not a number");
        values.push_back(value);
        position = comma + 1;
    }
    if (values.size() != count)
        throw std::runtime_error("prompt '" + whole + "': expected " + std::to_string(count) + " numbers in '" + text + "'");
    return values;
}

// exporter.imaging.transform_coords: scale in double precision, store float32.
float scaled(float value, int resized, int original) {
    return static_cast<float>(static_cast<double>(value) * (static_cast<double>(resized) / original));
}

}  // namespace

Prompt parse_prompt(const std::string& text) {
    Prompt prompt;
    size_t position = 0;
    while (position <= text.size()) {
        const size_t plus = std::min(text.find('+', position), text.size());
        const std::string part = text.substr(position, plus - position);
        if (part.size() < 2 || part[1] != ':')
            throw std::runtime_error("prompt '" + text + "': '" + part + "' is not p:X,Y, n:X,Y or b:X0,Y0,X1,Y1");
        const std::string numbers = part.substr(2);
        if (part[0] == 'p' || part[0] == 'n') {
            const std::vector<float> xy = parse_numbers(numbers, 2, text);
            prompt.points.insert(prompt.points.end(), xy.begin(), xy.end());
            prompt.labels.push_back(part[0] == 'p' ? 1.0f : 0.0f);
        } else if (part[0] == 'b') {
            if (prompt.has_box) throw std::runtime_error("prompt '" + text + "': more than one box");
            const std::vector<float> box = parse_numbers(numbers, 4, text);
            std::copy(box.begin(), box.end(), prompt.box);
            prompt.has_box = true;
        } else {
            throw std::runtime_error("prompt '" + text + "': '" + part + "' is not p:X,Y, n:X,Y or b:X0,Y0,X1,Y1");
        }
        position = plus + 1;
    }
    return prompt;
}

void prompt_arrays(const Prompt& prompt, int height, int width, std::vector<float>* coords, std::vector<float>* labels,
                   Convention convention) {
    int new_height = 0, new_width = 0;
    resized_shape(height, width, &new_height, &new_width, convention);
    std::vector<float> box, points;
    for (size_t i = 0; i + 1 < prompt.points.size(); i += 2) {
        points.push_back(scaled(prompt.points[i], new_width, width));
        points.push_back(scaled(prompt.points[i + 1], new_height, height));
    }
    for (int corner = 0; prompt.has_box && corner < 2; ++corner) {
        box.push_back(scaled(prompt.box[2 * corner], new_width, width));
        box.push_back(scaled(prompt.box[2 * corner + 1], new_height, height));
    }
    const bool box_first = convention == Convention::kSam2;  // SAM 2 puts the box's corners before the points
    const std::vector<float>& first = box_first ? box : points;
    const std::vector<float>& second = box_first ? points : box;
    *coords = first;
    coords->insert(coords->end(), second.begin(), second.end());
    labels->clear();
    if (prompt.has_box && box_first) labels->insert(labels->end(), {2.0f, 3.0f});
    labels->insert(labels->end(), prompt.labels.begin(), prompt.labels.end());
    if (prompt.has_box && !box_first) labels->insert(labels->end(), {2.0f, 3.0f});
    if (!prompt.has_box || convention == Convention::kSam2) {  // the padding point: SAM without a box, SAM 2 always
        coords->insert(coords->end(), {0.0f, 0.0f});
        labels->push_back(-1.0f);
    }
}

std::vector<uint8_t> upscale_mask(const std::vector<float>& low_res_logits, int height, int width,
                                  Convention convention) {
    std::vector<float> logits;
    if (convention == Convention::kSam2) {  // one bilinear resize straight to the image
        logits = resize_float(low_res_logits, kLowResSize, kLowResSize, height, width);
    } else {
        int new_height = 0, new_width = 0;
        resized_shape(height, width, &new_height, &new_width, convention);
        const std::vector<float> padded = resize_float(low_res_logits, kLowResSize, kLowResSize, kImageSize, kImageSize);
        std::vector<float> cropped(static_cast<size_t>(new_height) * new_width);
        for (int y = 0; y < new_height; ++y)
            std::copy_n(&padded[static_cast<size_t>(y) * kImageSize], new_width, &cropped[static_cast<size_t>(y) * new_width]);
        logits = resize_float(cropped, new_height, new_width, height, width);
    }
    std::vector<uint8_t> mask(logits.size());
    std::transform(logits.begin(), logits.end(), mask.begin(), [](float v) { return v > 0.0f ? 1 : 0; });
    return mask;
}

void write_mask_png(const std::string& path, const std::vector<uint8_t>& mask, int height, int width) {
    File file = open_file(path, "wb");
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
    png_infop info = png ? png_create_info_struct(png) : nullptr;
    if (!info) throw std::runtime_error(path + ": out of memory writing PNG");
    std::vector<uint8_t> scaled(mask.size());
    std::transform(mask.begin(), mask.end(), scaled.begin(), [](uint8_t v) { return v ? 255 : 0; });
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        throw std::runtime_error(path + ": cannot write PNG");
    }
    png_init_io(png, file.get());
    png_set_IHDR(png, info, width, height, 8, PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int y = 0; y < height; ++y) png_write_row(png, scaled.data() + static_cast<size_t>(y) * width);
    png_write_end(png, nullptr);
    png_destroy_write_struct(&png, &info);
}

}  // namespace sam
