// Runs the encoder and decoder engines that `export-and-tune run` builds on one image and one point:
//   sam_trt ENCODER.engine DECODER.engine IMAGE X Y MASK.png
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

}  // namespace

int main(int argc, char** argv) {
    if (argc != 7) {
        std::cerr << "usage: sam_trt ENCODER.engine DECODER.engine IMAGE X Y MASK.png\n";
        return 2;
    }
    try {
        Logger logger;
        std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
        Engine encoder(*runtime, argv[1]);
        Engine decoder(*runtime, argv[2]);
        cudaStream_t stream;
        check(cudaStreamCreate(&stream), "cudaStreamCreate");

        const sam::RgbImage image = sam::load_image_rgb(argv[3]);
        encoder.set_input("image", sam::preprocess(image), dims({1, 3, sam::kImageSize, sam::kImageSize}));
        std::vector<float> embedding = encoder.run(stream).at("image_embeddings");

        std::vector<float> coords, labels;
        sam::point_prompt(std::stof(argv[4]), std::stof(argv[5]), image.height, image.width, &coords, &labels);
        decoder.set_input("image_embeddings", embedding, dims({1, 256, 64, 64}));
        decoder.set_input("point_coords", coords, dims({1, 2, 2}));
        decoder.set_input("point_labels", labels, dims({1, 2}));
        decoder.set_input("mask_input", std::vector<float>(sam::kLowResSize * sam::kLowResSize, 0.0f),
                          dims({1, 1, sam::kLowResSize, sam::kLowResSize}));
        decoder.set_input("has_mask_input", {0.0f}, dims({1}));
        const std::vector<float> logits = decoder.run(stream).at("low_res_masks");  // 1x1x256x256: mask token 0

        sam::write_mask_png(argv[6], sam::upscale_mask(logits, image.height, image.width), image.height, image.width);
        cudaStreamDestroy(stream);
        std::cout << "wrote " << argv[6] << " (" << image.width << "x" << image.height << ")\n";
    } catch (const std::exception& error) {
        std::cerr << "sam_trt: " << error.what() << "\n";
        return 1;
    }
    return 0;
}
