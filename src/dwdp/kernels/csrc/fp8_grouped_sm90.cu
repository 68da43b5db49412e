// Block-scaled FP8 grouped GEMM for Hopper (sm_90a), on CUTLASS's pointer-array
// warp-specialised kernel with blockwise scaling.
//
//   D[rows of group g] = (A * SFA)[rows] @ (B[g] * SFB[g])^T
//
// A [M, K] e4m3 (row stride lda), SFA [M, K/128] fp32 (1x128 per-token scales, K-major),
// B[g] [N, K] e4m3 at B + g * stride_be (row stride ldb), SFB[g] [N/128, K/128] fp32 at
// SB + g * stride_bse (the checkpoints' 128x128 block scales), D [M, N] bf16.
//
// Rows are grouped by expert: counts[g] consecutive rows each, starting at *row_base
// (or 0). The per-group pointers, strides, scale layouts and problem shapes are written
// on the device by a small kernel from the device-side counts, so the host never waits
// for the router, and each expert's weights are read where they lie (a DWDP resident
// shard or prefetch slot: any base pointer and expert stride).
//
// Compiled once per tile configuration (-DDWDP_CFG=<id>), each object exporting
// dwdp_fp8_sm90_<id>_{run,workspace,args_bytes}; plain C entry points (raw device
// pointers, the stream as an integer) so the library does not depend on torch's C++ ABI.

#include <cstdint>
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/detail/blockwise_scale_layout.hpp"

using namespace cute;

#ifndef DWDP_CFG
#define DWDP_CFG 0
#endif

// id: tile M x N (K is 128, one scale block), cluster, schedule. Ids stay fixed (benchmark
// results name them); ones that never won on an H100 (128x128 with a 2x1 cluster, 64x128
// pingpong with a 2x1 cluster, 128x128 pingpong, whose two fp32 accumulators spill) are
// left out to keep the first-use build short.
#if DWDP_CFG == 0
using TileShape = Shape<_128, _128, _128>; using ClusterShape = Shape<_1, _1, _1>; constexpr bool kCoop = true;
#elif DWDP_CFG == 2
using TileShape = Shape<_128, _128, _128>; using ClusterShape = Shape<_1, _2, _1>; constexpr bool kCoop = true;
#elif DWDP_CFG == 3
using TileShape = Shape<_64, _128, _128>; using ClusterShape = Shape<_1, _1, _1>; constexpr bool kCoop = false;
#else
#error "unknown DWDP_CFG"
#endif

#define DWDP_CAT2(a, b) a##b
#define DWDP_CAT(a, b) DWDP_CAT2(a, b)
#define DWDP_FN(name) DWDP_CAT(DWDP_CAT(dwdp_fp8_sm90_, DWDP_CFG), name)

namespace DWDP_CAT(dwdp_sm90_cfg, DWDP_CFG) {  // named per config: several configs link into one library

using ElementA = cutlass::float_e4m3_t;
using ElementB = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;  // B[g] is [N, K] with K contiguous
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlign = 16;  // elements of 1 byte: 16-byte TMA rows
constexpr int kAlignD = 8;

// 1 x 128 activation scales and 128 x 128 weight scales, both stored K-major (as the
// quantiser writes [M, K/128] and the checkpoints store [N/128, K/128]): no transposed copy.
using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

using KernelSchedule = std::conditional_t<kCoop, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                                          cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise>;
using EpilogueSchedule = std::conditional_t<kCoop, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
                                            cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, LayoutD*, kAlignD, ElementD, LayoutD*, kAlignD, EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<ElementD, float, void>>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    ElementA, cute::tuple<LayoutA*, LayoutSFA*>, kAlign,
    ElementB, cute::tuple<LayoutB*, LayoutSFB*>, kAlign,
    float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
using StrideA = typename GemmKernel::InternalStrideA;
using StrideB = typename GemmKernel::InternalStrideB;
using StrideD = typename GemmKernel::InternalStrideD;
using Shape3 = typename ProblemShape::UnderlyingProblemShape;

// The per-group argument arrays, carved out of one device buffer.
struct Views {
  Shape3* shapes; const ElementA** a; const ElementB** b; ElementD** d; const float** sfa; const float** sfb;
  StrideA* sa; StrideB* sb; StrideD* sd; LayoutSFA* lsfa; LayoutSFB* lsfb;
};

constexpr size_t align_up(size_t x) { return (x + 127) / 128 * 128; }

size_t carve(void* base, int G, Views* v) {
  size_t off = 0;
  auto take = [&](size_t bytes) { size_t o = off; off += align_up(bytes); return static_cast<char*>(base) + o; };
  Views w;
  w.shapes = reinterpret_cast<Shape3*>(take(sizeof(Shape3) * G));
  w.a = reinterpret_cast<const ElementA**>(take(sizeof(void*) * G));
  w.b = reinterpret_cast<const ElementB**>(take(sizeof(void*) * G));
  w.d = reinterpret_cast<ElementD**>(take(sizeof(void*) * G));
  w.sfa = reinterpret_cast<const float**>(take(sizeof(void*) * G));
  w.sfb = reinterpret_cast<const float**>(take(sizeof(void*) * G));
  w.sa = reinterpret_cast<StrideA*>(take(sizeof(StrideA) * G));
  w.sb = reinterpret_cast<StrideB*>(take(sizeof(StrideB) * G));
  w.sd = reinterpret_cast<StrideD*>(take(sizeof(StrideD) * G));
  w.lsfa = reinterpret_cast<LayoutSFA*>(take(sizeof(LayoutSFA) * G));
  w.lsfb = reinterpret_cast<LayoutSFB*>(take(sizeof(LayoutSFB) * G));
  if (v) *v = w;
  return off;
}

__device__ __forceinline__ int64_t load_int(const void* p, int bytes, int i) {
  return bytes == 8 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

constexpr int kSetupThreads = 1024;

// One block: a prefix sum of the counts gives each group's first row; every group's
// pointers, shapes, strides and scale layouts follow from it.
__global__ void __launch_bounds__(kSetupThreads) setup_groups(
    Views v, int G, int N, int K, const void* counts, int counts_bytes, const void* row_base, int base_bytes,
    const ElementA* A, int64_t lda, const float* SA, const ElementB* B, int64_t stride_be, int64_t ldb,
    const float* SB, int64_t stride_bse, ElementD* D, int64_t ldd) {
  __shared__ int64_t carry;
  __shared__ int64_t warp_sums[kSetupThreads / 32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (tid == 0) carry = row_base ? load_int(row_base, base_bytes, 0) : 0;
  __syncthreads();
  const int64_t sfa_ld = (K + 127) / 128;
  for (int g0 = 0; g0 < G; g0 += kSetupThreads) {
    const int g = g0 + tid;
    const int64_t m = g < G ? load_int(counts, counts_bytes, g) : 0;
    int64_t incl = m;  // inclusive scan within the warp, then across warps
    for (int o = 1; o < 32; o *= 2) {
      int64_t y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    int64_t before = carry;
    for (int w = 0; w < warp; ++w) before += warp_sums[w];
    const int64_t row0 = before + incl - m;
    if (g < G) {
      v.shapes[g] = Shape3{static_cast<int>(m), N, K};
      v.a[g] = A + row0 * lda;
      v.b[g] = B + g * stride_be;
      v.d[g] = D + row0 * ldd;
      v.sfa[g] = SA + row0 * sfa_ld;
      v.sfb[g] = SB + g * stride_bse;
      StrideA sa{}; get<0>(sa) = lda; v.sa[g] = sa;
      StrideB sb{}; get<0>(sb) = ldb; v.sb[g] = sb;
      StrideD sd{}; get<0>(sd) = ldd; v.sd[g] = sd;
      v.lsfa[g] = ScaleConfig::tile_atom_to_shape_SFA(make_shape(static_cast<int>(m), N, K, 1));
      v.lsfb[g] = ScaleConfig::tile_atom_to_shape_SFB(make_shape(static_cast<int>(m), N, K, 1));
    }
    __syncthreads();
    if (tid == kSetupThreads - 1) carry = before + incl;
    __syncthreads();
  }
}

typename Gemm::Arguments make_args(Views const& v, int G, int sm_count, int device, int raster, int swizzle) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {G, v.shapes, nullptr},  // problem shapes live on the device only
      {v.a, v.sa, v.b, v.sb, v.sfa, v.lsfa, v.sfb, v.lsfb},
      {{}, nullptr, v.sd, v.d, v.sd},
      hw};
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  using Raster = typename GemmKernel::TileScheduler::RasterOrderOptions;
  args.scheduler.raster_order = raster == 2 ? Raster::AlongN : Raster::AlongM;
  args.scheduler.max_swizzle_size = swizzle;
  return args;
}

}  // namespace

using namespace DWDP_CAT(dwdp_sm90_cfg, DWDP_CFG);

extern "C" {

// Bytes of the per-group argument buffer for G groups.
size_t DWDP_FN(_args_bytes)(int G) { return carve(nullptr, G, nullptr); }

size_t DWDP_FN(_workspace)(int G, int sm_count) {
  Views v{};
  carve(nullptr, G, &v);
  return Gemm::get_workspace_size(make_args(v, G, sm_count, 0, 1, 1));
}

// Returns 0, or a cudaError_t (> 0), or -(1000 + cutlass::Status).
int DWDP_FN(_run)(const void* A, int64_t lda, const float* SA, const void* B, int64_t stride_be, int64_t ldb,
                  const float* SB, int64_t stride_bse, void* D, int64_t ldd, const void* counts, int counts_bytes,
                  const void* row_base, int base_bytes, int G, int N, int K, void* args_buf, void* workspace,
                  int sm_count, int device, int raster, int swizzle, int64_t stream_handle) {
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  // This library links its own CUDA runtime: make the operands' device current for it
  // (the same primary context torch uses), whatever device it last saw.
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  Views v{};
  carve(args_buf, G, &v);
  setup_groups<<<1, kSetupThreads, 0, stream>>>(
      v, G, N, K, counts, counts_bytes, row_base, base_bytes, static_cast<const ElementA*>(A), lda, SA,
      static_cast<const ElementB*>(B), stride_be, ldb, SB, stride_bse, static_cast<ElementD*>(D), ldd);
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  Gemm gemm;
  auto args = make_args(v, G, sm_count, device, raster, swizzle);
  cutlass::Status st = gemm.initialize(args, workspace, stream);
  if (st != cutlass::Status::kSuccess) return -(1000 + static_cast<int>(st));
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) return -(1000 + static_cast<int>(st));
  err = cudaGetLastError();
  return static_cast<int>(err);
}

}  // extern "C"
