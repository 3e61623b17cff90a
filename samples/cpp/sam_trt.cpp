// Runs the encoder and decoder engines that export-and-tune builds on one image and several prompts:
//   sam_trt ENCODER.engine DECODER.engine IMAGE OUT_DIR PROMPT [PROMPT ...]
// PROMPT: "p:X,Y" foreground point, "n:X,Y" background point, "b:X0,Y0,X1,Y1" box, joined by '+'
// (sam_image.hpp). Writes OUT_DIR/mask-K.png for the K-th prompt, or mask-K-M.png for each of the
// multimask decoder's three masks. With an app decoder (decoder.prompts*.onnx, one embedding for K
// prompts: build it with --batch 1:K:KMAX) the prompts that share a point count go in one call; with
// decoder.onnx (embedding b paired with prompt b) each prompt is one call. Engines of a SAM 2 export (the
// encoder writes high_res_feats_0/1) are run with SAM 2's framing and their features fed to the decoder.
// Works with TensorRT 10 and TensorRT-RTX (same nvinfer1 C++ API; link libnvinfer or libtensorrt_rtx).
// Inputs and outputs are float32 in both precisions (fp16 engines keep fp32 I/O).
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "sam_image.hpp"

namespace {

class Logger : public nvinfer1::ILogger {
    void log(Severity severity, const char* message) noexcept override {
        if (severity <= Severity::kWARNING) std::cerr << "tensorrt: " << message << "\n";
    }
};

void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

std::vector<char> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error(path + ": cannot open");
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

size_t volume(const nvinfer1::Dims& dims) {
    size_t count = 1;
    for (int i = 0; i < dims.nbDims; ++i) count *= static_cast<size_t>(dims.d[i]);
    return count;
}

// One engine with device buffers for every I/O tensor; inputs by name, outputs copied back by name.
class Engine {
public:
    Engine(nvinfer1::IRuntime& runtime, const std::string& path) {
        const std::vector<char> blob = read_file(path);
        engine_.reset(runtime.deserializeCudaEngine(blob.data(), blob.size()));
        if (!engine_) throw std::runtime_error(path + ": cannot deserialize (built for another GPU or TensorRT?)");
        context_.reset(engine_->createExecutionContext());
        if (!context_) throw std::runtime_error(path + ": cannot create an execution context");
    }
    ~Engine() {
        for (auto& [name, pointer] : device_) cudaFree(pointer);
    }

    void set_input(const std::string& name, const std::vector<float>& values, const nvinfer1::Dims& dims) {
        if (volume(dims) != values.size()) throw std::runtime_error(name + ": shape and data size differ");
        if (!context_->setInputShape(name.c_str(), dims)) throw std::runtime_error(name + ": shape outside the profile");
        void* pointer = buffer(name, values.size());
        check(cudaMemcpy(pointer, values.data(), values.size() * sizeof(float), cudaMemcpyHostToDevice), "upload");
    }

    // The engine's shape of an I/O tensor (-1 where it is dynamic).
    nvinfer1::Dims engine_shape(const char* name) const { return engine_->getTensorShape(name); }

    bool has_tensor(const std::string& name) const {
        for (int i = 0; i < engine_->getNbIOTensors(); ++i)
            if (name == engine_->getIOTensorName(i)) return true;
        return false;
    }

    std::map<std::string, std::vector<float>> run(cudaStream_t stream) {
        std::map<std::string, std::vector<float>> outputs;
        for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
            const char* name = engine_->getIOTensorName(i);
            if (engine_->getTensorDataType(name) != nvinfer1::DataType::kFLOAT)
                throw std::runtime_error(std::string(name) + ": expected float32 I/O");
            if (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kOUTPUT)
                outputs[name].resize(volume(context_->getTensorShape(name)));
            context_->setTensorAddress(name, buffer(name, outputs.count(name) ? outputs[name].size() : 0));
        }
        if (!context_->enqueueV3(stream)) throw std::runtime_error("enqueueV3 failed");
        for (auto& [name, values] : outputs)
            check(cudaMemcpyAsync(values.data(), device_[name], values.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                  stream), "download");
        check(cudaStreamSynchronize(stream), "synchronize");
        return outputs;
    }

private:
    // The device buffer of `name`, (re)allocated when `count` floats do not fit; count 0: as allocated.
    void* buffer(const std::string& name, size_t count) {
        if (count > sizes_[name]) {
            if (device_[name]) cudaFree(device_[name]);
            check(cudaMalloc(&device_[name], count * sizeof(float)), "cudaMalloc");
            sizes_[name] = count;
        }
        return device_[name];
    }

    std::unique_ptr<nvinfer1::ICudaEngine> engine_;
    std::unique_ptr<nvinfer1::IExecutionContext> context_;
    std::map<std::string, void*> device_;
    std::map<std::string, size_t> sizes_;
};

nvinfer1::Dims dims(std::initializer_list<int64_t> values) {
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(values.size());
    int i = 0;
    for (int64_t v : values) d.d[i++] = v;
    return d;
}

struct Encoded {
    std::vector<float> coords, labels;
    int64_t points() const { return static_cast<int64_t>(labels.size()); }
};

// Indices of the prompts decoded in one call: those with the same point count (padding a prompt with -1
// points would change SAM's mask), or each prompt alone when the decoder pairs embeddings with prompts.
std::vector<std::vector<size_t>> call_groups(const std::vector<Encoded>& prompts, bool shared_embedding) {
    std::map<int64_t, std::vector<size_t>> by_count;
    for (size_t k = 0; k < prompts.size(); ++k) by_count[prompts[k].points()].push_back(k);
    std::vector<std::vector<size_t>> groups;
    for (const auto& [count, members] : by_count) {
        if (shared_embedding) groups.push_back(members);
        else for (size_t k : members) groups.push_back({k});
    }
    return groups;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 6) {
        std::cerr << "usage: sam_trt ENCODER.engine DECODER.engine IMAGE OUT_DIR PROMPT [PROMPT ...]\n";
        return 2;
    }
    try {
        Logger logger;
        std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
        Engine encoder(*runtime, argv[1]);
        Engine decoder(*runtime, argv[2]);
        const std::string out = argv[4];
        cudaStream_t stream;
        check(cudaStreamCreate(&stream), "cudaStreamCreate");

        const sam::Convention convention =
            encoder.has_tensor("high_res_feats_0") ? sam::Convention::kSam2 : sam::Convention::kSam;
        if ((convention == sam::Convention::kSam2) != decoder.has_tensor("high_res_feats_0"))
            throw std::runtime_error(std::string(argv[2]) + ": not the decoder of " + argv[1] +
                                     "'s export (one is SAM 2's, the other not)");
        const sam::RgbImage image = sam::load_image_rgb(argv[3]);
        std::vector<Encoded> prompts(static_cast<size_t>(argc - 5));
        for (size_t k = 0; k < prompts.size(); ++k)
            sam::prompt_arrays(sam::parse_prompt(argv[5 + k]), image.height, image.width, &prompts[k].coords,
                               &prompts[k].labels, convention);
        encoder.set_input("image", sam::preprocess(image, convention), dims({1, 3, sam::kImageSize, sam::kImageSize}));
        const std::map<std::string, std::vector<float>> encoded = encoder.run(stream);
        const bool shared_embedding = decoder.engine_shape("image_embeddings").d[0] == 1;

        const size_t plane = static_cast<size_t>(sam::kLowResSize) * sam::kLowResSize;
        for (const std::vector<size_t>& group : call_groups(prompts, shared_embedding)) {
            const int64_t count = static_cast<int64_t>(group.size()), points = prompts[group[0]].points();
            std::vector<float> coords, labels;
            for (size_t k : group) {
                coords.insert(coords.end(), prompts[k].coords.begin(), prompts[k].coords.end());
                labels.insert(labels.end(), prompts[k].labels.begin(), prompts[k].labels.end());
            }
            decoder.set_input("image_embeddings", encoded.at("image_embeddings"), dims({1, 256, 64, 64}));
            if (convention == sam::Convention::kSam2) {
                decoder.set_input("high_res_feats_0", encoded.at("high_res_feats_0"), dims({1, 32, 256, 256}));
                decoder.set_input("high_res_feats_1", encoded.at("high_res_feats_1"), dims({1, 64, 128, 128}));
            }
            decoder.set_input("point_coords", coords, dims({count, points, 2}));
            decoder.set_input("point_labels", labels, dims({count, points}));
            decoder.set_input("mask_input", std::vector<float>(group.size() * plane, 0.0f),
                              dims({count, 1, sam::kLowResSize, sam::kLowResSize}));
            decoder.set_input("has_mask_input", std::vector<float>(group.size(), 0.0f), dims({count}));
            const std::vector<float> logits = decoder.run(stream).at("low_res_masks");  // K x M x 256 x 256
            const size_t masks = logits.size() / (group.size() * plane);
            for (size_t row = 0; row < group.size(); ++row)
                for (size_t m = 0; m < masks; ++m) {
                    const auto first = logits.begin() + static_cast<std::ptrdiff_t>((row * masks + m) * plane);
                    const std::string name = out + "/mask-" + std::to_string(group[row]) +
                                             (masks > 1 ? "-" + std::to_string(m) : "") + ".png";
                    sam::write_mask_png(name, sam::upscale_mask(std::vector<float>(first, first + plane), image.height,
                                                                image.width, convention), image.height, image.width);
                }
        }
        cudaStreamDestroy(stream);
        std::cout << "wrote " << prompts.size() << " prompt(s)' masks to " << out << " (" << image.width << "x"
                  << image.height << ")\n";
    } catch (const std::exception& error) {
        std::cerr << "sam_trt: " << error.what() << "\n";
        return 1;
    }
    return 0;
}
