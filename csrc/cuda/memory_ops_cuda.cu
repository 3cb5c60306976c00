// CUDA kernels for the neuralmem ops (placeholder until the kernels land).
#include <torch/library.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
