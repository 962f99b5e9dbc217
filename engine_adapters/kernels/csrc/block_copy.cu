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
// computes the alignment). Payload i starts at payload_addrs[i], or, for payloads laid end to
// end, at payload_base + i * payload_stride (then no address array is sent at all).
//
// Block ids come in GPU memory (copy_blocks), or from a CPU tensor inside the launch itself
// (copy_blocks_inline): up to kInlineIds ids per launch travel as a kernel parameter, so a
// call needs no upload, no allocation and no event, only the launch.
//
// Inputs were validated in Python; the checks here guard the binding itself. They return a
// status code (0 when the call ran; the Status values below, or kCudaError + a cudaError_t),
// which cuda.py turns into its error message. Nothing here throws, formats text or touches
// iostreams: on the H200 machine this was tested on, both a C++ exception thrown out of the
// extension (TORCH_CHECK) and a message built with std::ostringstream crashed the process.

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

// Why a call did not run; cuda.py keeps the matching messages (STATUS_MESSAGES).
enum Status : int64_t {
  kOk = 0,
  kNotOnDevice = 1,       // an index tensor is not on the CUDA device of layer_addrs
  kNotInt64 = 2,          // an index tensor is not int64
  kNotContiguous1D = 3,   // an index tensor is not a contiguous 1-D tensor
  kCountMismatch = 4,     // payload_addrs is neither empty nor one address per block id
  kBadKvParts = 5,        // kv_parts is not 1 or 2
  kBadVectorBytes = 6,    // vector_bytes is not 1, 2, 4, 8 or 16
  kBadSegmentBytes = 7,   // segment_bytes is not a positive multiple of vector_bytes
  kBadSegmentCount = 8,   // layers * kv_parts is not in 1..INT32_MAX
  kBadPairs = 9,          // segment_pairs is not a contiguous (n, 2) int64 CPU tensor
  kNotOnHost = 10,        // inline block ids are not a CPU tensor
  kBadBlockId = 11,       // an inline block id is negative or does not fit in 32 bits
  kCudaError = 1000,      // + the cudaError_t of a failed launch or copy
};

// Block ids a launch carries as its parameter: 4000 of the 4096 bytes a kernel's parameters
// may take on every CUDA version (Segments takes the rest).
constexpr int kInlineIds = 1000;

struct InlineIds {
  int32_t id[kInlineIds];
};

struct Segments {
  const int64_t* __restrict__ layer_addrs;
  const int64_t* __restrict__ block_ids;  // in GPU memory; unused by the inline kernel
  const int64_t* __restrict__ payload_addrs;  // nullptr: payload_base + i * payload_stride
  int64_t payload_base;
  int64_t payload_stride;
  int64_t num_blocks;
  int kv_parts;
  int64_t kv_stride;
  int64_t block_stride;
  int64_t segment_bytes;
  bool to_payload;
};

static_assert(sizeof(Segments) + sizeof(InlineIds) <= 4096, "the inline kernel's parameters must fit in 4096 bytes");

// Segment (blockIdx.x) of the i-th block, cache block id `block_id`: one thread block's share.
template <typename Vec>
__device__ __forceinline__ void copy_segment(const Segments& s, int64_t i, int64_t block_id) {
  const int segment = blockIdx.x;  // layer * kv_parts + half
  const int layer = segment / s.kv_parts;
  const int half = segment % s.kv_parts;
  const int64_t units = s.segment_bytes / static_cast<int64_t>(sizeof(Vec));
  char* cache = reinterpret_cast<char*>(s.layer_addrs[layer]) + half * s.kv_stride + block_id * s.block_stride;
  const int64_t payload_at = s.payload_addrs != nullptr ? s.payload_addrs[i] : s.payload_base + i * s.payload_stride;
  char* payload = reinterpret_cast<char*>(payload_at) + segment * s.segment_bytes;
  const Vec* __restrict__ src = reinterpret_cast<const Vec*>(s.to_payload ? cache : payload);
  Vec* __restrict__ dst = reinterpret_cast<Vec*>(s.to_payload ? payload : cache);
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < units; k += blockDim.x) {
    dst[k] = src[k];
  }
}

template <typename Vec>
__global__ void copy_segments(const Segments s) {
  for (int64_t i = blockIdx.y; i < s.num_blocks; i += gridDim.y) {
    copy_segment<Vec>(s, i, s.block_ids[i]);
  }
}

// __grid_constant__: the ids are read where the parameter lives, not copied per thread.
template <typename Vec>
__global__ void copy_segments_inline(const Segments s, const __grid_constant__ InlineIds ids) {
  for (int64_t i = blockIdx.y; i < s.num_blocks; i += gridDim.y) {
    copy_segment<Vec>(s, i, ids.id[i]);
  }
}

// Calls `launch` with a value of the access type for `vector_bytes` (1, 2, 4, 8 or 16, checked
// by model_status), which names the kernel instance to launch: one switch for both kernels.
template <typename Launch>
void by_width(int64_t vector_bytes, const Launch& launch) {
  switch (vector_bytes) {
    case 16: launch(int4{}); break;
    case 8: launch(int2{}); break;
    case 4: launch(int{}); break;
    case 2: launch(int16_t{}); break;
    default: launch(int8_t{}); break;  // 1
  }
}

// The checks every launch shares: kOk, or why the segment model's numbers cannot run.
int64_t model_status(int64_t kv_parts, int64_t vector_bytes, int64_t segment_bytes, int64_t per_block) {
  if (kv_parts != 1 && kv_parts != 2) {
    return kBadKvParts;
  }
  if (vector_bytes != 1 && vector_bytes != 2 && vector_bytes != 4 && vector_bytes != 8 && vector_bytes != 16) {
    return kBadVectorBytes;
  }
  if (segment_bytes <= 0 || segment_bytes % vector_bytes != 0) {
    return kBadSegmentBytes;
  }
  if (per_block <= 0 || per_block > INT32_MAX) {
    return kBadSegmentCount;
  }
  return kOk;
}

int64_t index_tensor_status(const torch::Tensor& t, const torch::Device& device) {
  if (t.device() != device) {
    return kNotOnDevice;
  }
  if (t.scalar_type() != torch::kInt64) {
    return kNotInt64;
  }
  if (t.dim() != 1 || !t.is_contiguous()) {
    return kNotContiguous1D;
  }
  return kOk;
}

}  // namespace

// Copy every segment of the plan: cache -> payloads when to_payload (a gather), else
// payloads -> cache (a scatter). The index tensors are on the GPU that runs the copy; an empty
// payload_addrs means payloads laid end to end from payload_base, payload_stride apart. The
// launch goes on torch's current stream of that GPU. Returns kOk once launched, else a Status.
int64_t copy_blocks(const torch::Tensor& layer_addrs,
                    const torch::Tensor& block_ids,
                    const torch::Tensor& payload_addrs,
                    int64_t payload_base,
                    int64_t payload_stride,
                    int64_t kv_parts,
                    int64_t kv_stride,
                    int64_t block_stride,
                    int64_t segment_bytes,
                    int64_t vector_bytes,
                    bool to_payload) {
  if (!layer_addrs.is_cuda()) {
    return kNotOnDevice;
  }
  const torch::Device device = layer_addrs.device();
  for (const torch::Tensor* tensor : {&layer_addrs, &block_ids, &payload_addrs}) {
    const int64_t status = index_tensor_status(*tensor, device);
    if (status != kOk) {
      return status;
    }
  }
  const bool by_address = payload_addrs.numel() != 0;
  if (by_address && block_ids.numel() != payload_addrs.numel()) {
    return kCountMismatch;
  }
  const int64_t per_block = layer_addrs.numel() * kv_parts;  // segments of one block
  const int64_t model = model_status(kv_parts, vector_bytes, segment_bytes, per_block);
  if (model != kOk) {
    return model;
  }
  const int64_t num_blocks = block_ids.numel();
  if (num_blocks == 0) {
    return kOk;
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const dim3 grid(static_cast<unsigned>(per_block), static_cast<unsigned>(std::min<int64_t>(num_blocks, kMaxGridY)));
  const Segments segments{layer_addrs.data_ptr<int64_t>(),
                          block_ids.data_ptr<int64_t>(),
                          by_address ? payload_addrs.data_ptr<int64_t>() : nullptr,
                          payload_base,
                          payload_stride,
                          num_blocks,
                          static_cast<int>(kv_parts),
                          kv_stride,
                          block_stride,
                          segment_bytes,
                          to_payload};
  by_width(vector_bytes, [&](auto vec) {
    copy_segments<decltype(vec)><<<grid, kThreads, 0, stream>>>(segments);
  });
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? kOk : kCudaError + static_cast<int64_t>(error);
}

// copy_blocks with the block ids in a CPU tensor (int64, contiguous, 1-D) and the payloads end
// to end from payload_base: kInlineIds ids per launch, as kernel parameters. Returns kOk once
// every launch is queued, else a Status (a failed launch leaves the ones before it queued).
int64_t copy_blocks_inline(const torch::Tensor& layer_addrs,
                           const torch::Tensor& block_ids,
                           int64_t payload_base,
                           int64_t payload_stride,
                           int64_t kv_parts,
                           int64_t kv_stride,
                           int64_t block_stride,
                           int64_t segment_bytes,
                           int64_t vector_bytes,
                           bool to_payload) {
  if (!layer_addrs.is_cuda()) {
    return kNotOnDevice;
  }
  const torch::Device device = layer_addrs.device();
  const int64_t layers = index_tensor_status(layer_addrs, device);
  if (layers != kOk) {
    return layers;
  }
  if (block_ids.is_cuda()) {
    return kNotOnHost;
  }
  if (block_ids.scalar_type() != torch::kInt64) {
    return kNotInt64;
  }
  if (block_ids.dim() != 1 || !block_ids.is_contiguous()) {
    return kNotContiguous1D;
  }
  const int64_t per_block = layer_addrs.numel() * kv_parts;
  const int64_t model = model_status(kv_parts, vector_bytes, segment_bytes, per_block);
  if (model != kOk) {
    return model;
  }
  const int64_t num_blocks = block_ids.numel();
  const int64_t* all = block_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_blocks; ++i) {
    if (all[i] < 0 || all[i] > INT32_MAX) {
      return kBadBlockId;
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  InlineIds ids;
  for (int64_t first = 0; first < num_blocks; first += kInlineIds) {
    const int64_t count = std::min<int64_t>(kInlineIds, num_blocks - first);
    for (int64_t j = 0; j < count; ++j) {
      ids.id[j] = static_cast<int32_t>(all[first + j]);
    }
    const Segments segments{layer_addrs.data_ptr<int64_t>(),
                            nullptr,
                            nullptr,
                            payload_base + first * payload_stride,
                            payload_stride,
                            count,
                            static_cast<int>(kv_parts),
                            kv_stride,
                            block_stride,
                            segment_bytes,
                            to_payload};
    const dim3 grid(static_cast<unsigned>(per_block), static_cast<unsigned>(count));  // count <= kInlineIds
    by_width(vector_bytes, [&](auto vec) {
      copy_segments_inline<decltype(vec)><<<grid, kThreads, 0, stream>>>(segments, ids);
    });
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) {
      return kCudaError + static_cast<int64_t>(error);
    }
  }
  return kOk;
}

// The same segments with one cudaMemcpyAsync each, as vLLM's swap_blocks moves blocks: the
// benchmark's per-block reference. Addresses come as host tensors (the loop runs on the CPU).
// Returns kOk once every copy is queued, else a Status.
int64_t copy_blocks_memcpy(const torch::Tensor& segment_pairs, int64_t segment_bytes, int64_t device_index,
                           bool to_payload) {
  if (segment_pairs.is_cuda() || segment_pairs.scalar_type() != torch::kInt64 || segment_pairs.dim() != 2 ||
      segment_pairs.size(1) != 2 || !segment_pairs.is_contiguous()) {
    return kBadPairs;
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
      return kCudaError + static_cast<int64_t>(error);
    }
  }
  return kOk;
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
  m.def("copy_blocks_inline", &copy_blocks_inline, "Copy blocks whose ids are in a CPU tensor, ids in the launch");
  m.def("copy_blocks_memcpy", &copy_blocks_memcpy, "Copy a plan's segments, one cudaMemcpyAsync each");
  m.def("device_address", &device_address, "The device address of pinned or registered host memory, or 0");
}
