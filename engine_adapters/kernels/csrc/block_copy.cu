// Block copies between a paged KV cache and block payloads, in one launch (issue 6).
//
// The Python side (engine_adapters/kernels/plan.py) reduces every supported layout to
// segments: segment (layer, half) of block id b sits at
//     layer_addrs[layer] + half * kv_stride + b * block_stride
// in the cache, and at payload_addrs[i] + (layer * kv_parts + half) * segment_bytes in block
// i's payload. One thread block copies one segment; the grid covers every block and layer,
// so a whole batch is one launch. Addresses may point at device memory or at pinned or
// registered host memory (the GPU reads and writes it over PCIe).
//
// Accesses are `Vec` wide (16 bytes where every address and length allows; the Python side
// computes the alignment). Inputs were validated in Python; the checks here guard the
// binding itself. They return their reason as text ("" when the call ran), which cuda.py
// raises: nothing here throws, because a C++ exception thrown out of this extension crashed
// the process on the H200 machine it was tested on, instead of becoming a Python error.

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>

namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

struct Segments {
  const int64_t* __restrict__ layer_addrs;
  const int64_t* __restrict__ block_ids;
  const int64_t* __restrict__ payload_addrs;
  int64_t num_blocks;
  int kv_parts;
  int64_t kv_stride;
  int64_t block_stride;
  int64_t segment_bytes;
  bool to_payload;
};

template <typename Vec>
__global__ void copy_segments(const Segments s) {
  const int segment = blockIdx.x;  // layer * kv_parts + half
  const int layer = segment / s.kv_parts;
  const int half = segment % s.kv_parts;
  const int64_t units = s.segment_bytes / static_cast<int64_t>(sizeof(Vec));
  for (int64_t i = blockIdx.y; i < s.num_blocks; i += gridDim.y) {
    char* cache = reinterpret_cast<char*>(s.layer_addrs[layer]) + half * s.kv_stride + s.block_ids[i] * s.block_stride;
    char* payload = reinterpret_cast<char*>(s.payload_addrs[i]) + segment * s.segment_bytes;
    const Vec* __restrict__ src = reinterpret_cast<const Vec*>(s.to_payload ? cache : payload);
    Vec* __restrict__ dst = reinterpret_cast<Vec*>(s.to_payload ? payload : cache);
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < units; k += blockDim.x) {
      dst[k] = src[k];
    }
  }
}

template <typename Vec>
void launch(const dim3& grid, cudaStream_t stream, const Segments& segments) {
  copy_segments<Vec><<<grid, kThreads, 0, stream>>>(segments);
}

template <typename... Parts>
std::string text(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

std::string index_tensor_problem(const torch::Tensor& t, const char* name, const torch::Device& device) {
  if (t.device() != device) {
    return text(name, " must be on ", device, ", got ", t.device());
  }
  if (t.scalar_type() != torch::kInt64) {
    return text(name, " must be int64, got ", t.scalar_type());
  }
  if (t.dim() != 1 || !t.is_contiguous()) {
    return text(name, " must be a contiguous 1-D tensor");
  }
  return "";
}

}  // namespace

// Copy every segment of the plan: cache -> payloads when to_payload (a gather), else
// payloads -> cache (a scatter). The three index tensors are on the GPU that runs the copy;
// the launch goes on torch's current stream of that GPU. Returns "" once launched, else why not.
std::string copy_blocks(const torch::Tensor& layer_addrs,
                 const torch::Tensor& block_ids,
                 const torch::Tensor& payload_addrs,
                 int64_t kv_parts,
                 int64_t kv_stride,
                 int64_t block_stride,
                 int64_t segment_bytes,
                 int64_t vector_bytes,
                 bool to_payload) {
  if (!layer_addrs.is_cuda()) {
    return "layer_addrs must be on a CUDA device";
  }
  const torch::Device device = layer_addrs.device();
  for (const auto& [tensor, name] : {std::pair{&layer_addrs, "layer_addrs"}, std::pair{&block_ids, "block_ids"},
                                     std::pair{&payload_addrs, "payload_addrs"}}) {
    std::string problem = index_tensor_problem(*tensor, name, device);
    if (!problem.empty()) {
      return problem;
    }
  }
  if (block_ids.numel() != payload_addrs.numel()) {
    return "one payload address per block id";
  }
  if (kv_parts != 1 && kv_parts != 2) {
    return text("kv_parts must be 1 or 2, got ", kv_parts);
  }
  if (vector_bytes != 1 && vector_bytes != 2 && vector_bytes != 4 && vector_bytes != 8 && vector_bytes != 16) {
    return text("vector_bytes must be 1, 2, 4, 8 or 16, got ", vector_bytes);
  }
  if (segment_bytes <= 0 || segment_bytes % vector_bytes != 0) {
    return text("segment_bytes ", segment_bytes, " is not a multiple of the access width ", vector_bytes);
  }
  const int64_t per_block = layer_addrs.numel() * kv_parts;  // segments of one block
  if (per_block <= 0 || per_block > INT32_MAX) {
    return text("bad segment count per block ", per_block);
  }
  const int64_t num_blocks = block_ids.numel();
  if (num_blocks == 0) {
    return "";
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const dim3 grid(static_cast<unsigned>(per_block), static_cast<unsigned>(std::min<int64_t>(num_blocks, kMaxGridY)));
  const Segments segments{layer_addrs.data_ptr<int64_t>(),
                          block_ids.data_ptr<int64_t>(),
                          payload_addrs.data_ptr<int64_t>(),
                          num_blocks,
                          static_cast<int>(kv_parts),
                          kv_stride,
                          block_stride,
                          segment_bytes,
                          to_payload};
  switch (vector_bytes) {
    case 16: launch<int4>(grid, stream, segments); break;
    case 8: launch<int2>(grid, stream, segments); break;
    case 4: launch<int>(grid, stream, segments); break;
    case 2: launch<int16_t>(grid, stream, segments); break;
    default: launch<int8_t>(grid, stream, segments); break;  // 1, checked above
  }
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? "" : text("block copy launch failed: ", cudaGetErrorString(error));
}

// The same segments with one cudaMemcpyAsync each, as vLLM's swap_blocks moves blocks: the
// benchmark's per-block reference. Addresses come as host tensors (the loop runs on the CPU).
// Returns "" once every copy is queued, else why not.
std::string copy_blocks_memcpy(const torch::Tensor& segment_pairs, int64_t segment_bytes, int64_t device_index,
                               bool to_payload) {
  if (segment_pairs.is_cuda() || segment_pairs.scalar_type() != torch::kInt64 || segment_pairs.dim() != 2 ||
      segment_pairs.size(1) != 2 || !segment_pairs.is_contiguous()) {
    return "segment_pairs must be a contiguous (n, 2) int64 CPU tensor of (cache, payload) addresses";
  }
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_index)).stream();
  const int64_t* pairs = segment_pairs.data_ptr<int64_t>();
  for (int64_t i = 0; i < segment_pairs.size(0); ++i) {
    void* cache = reinterpret_cast<void*>(pairs[2 * i]);
    void* payload = reinterpret_cast<void*>(pairs[2 * i + 1]);
    const cudaError_t error = to_payload
        ? cudaMemcpyAsync(payload, cache, segment_bytes, cudaMemcpyDefault, stream)
        : cudaMemcpyAsync(cache, payload, segment_bytes, cudaMemcpyDefault, stream);
    if (error != cudaSuccess) {
      return text("cudaMemcpyAsync of segment ", i, " failed: ", cudaGetErrorString(error));
    }
  }
  return "";
}

// The device address of pinned or registered host memory, for any address inside it (the same
// number on systems with unified addressing; asked, not assumed), or 0 for memory that is
// neither: the caller (cuda.py) raises its error in Python, so no C++ exception is involved.
int64_t device_address(int64_t host_address) {
  cudaPointerAttributes attributes{};
  const cudaError_t error = cudaPointerGetAttributes(&attributes, reinterpret_cast<void*>(host_address));
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear it, so that it is not reported by the next launch
    return 0;
  }
  if (attributes.type != cudaMemoryTypeHost || attributes.devicePointer == nullptr) {
    return 0;
  }
  return reinterpret_cast<int64_t>(attributes.devicePointer);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("copy_blocks", &copy_blocks, "Copy a plan's segments in one launch");
  m.def("copy_blocks_memcpy", &copy_blocks_memcpy, "Copy a plan's segments, one cudaMemcpyAsync each");
  m.def("device_address", &device_address, "The device address of pinned or registered host memory, or 0");
}
