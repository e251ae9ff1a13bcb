// Weight-only int8 matrix product for a few rows of activations on CPUs with AVX-512:
//   out[m, n] = scales[n] * sum_k x[m, k] * w[n, k]
//
// Built on first use by qwen/cpu_kernels.py (torch.utils.cpp_extension, cached per machine).
// Decoding reads every weight once per token, so speed is memory bandwidth. Each thread walks its
// rows of w in memory order (one sequential stream the hardware prefetcher follows) and prefetches
// 4 KiB ahead, which keeps more DRAM reads in flight than PyTorch's _weight_int8pack_mm (measured
// on a 2-core Xeon: 15-17 vs 12-14 GB/s over the Qwen-1.8B layer shapes). Each 64-byte chunk of a
// weight row is widened to fp32 once and used for up to 8 activation rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kPrefetchBytes = 4096;
constexpr int kMaxRows = 8;  // activation rows per pass: 8 accumulators + 4 widened weight vectors

// out[m * ldo] = scale * dot(x[m * K : (m + 1) * K], w[0 : K]) for m < ROWS.
template <int ROWS>
inline void dot_rows(const float* x, const int8_t* w, int64_t K, float scale, float* out, int64_t ldo) {
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T0);
    const __m512i bytes = _mm512_loadu_si512(w + k);
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(bytes)));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(bytes, 1)));
    const __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(bytes, 2)));
    const __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(bytes, 3)));
    for (int m = 0; m < ROWS; ++m) {
      const float* xk = x + m * K + k;
      __m512 a = _mm512_fmadd_ps(_mm512_loadu_ps(xk), w0, acc[m]);
      a = _mm512_fmadd_ps(_mm512_loadu_ps(xk + 16), w1, a);
      a = _mm512_fmadd_ps(_mm512_loadu_ps(xk + 32), w2, a);
      acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xk + 48), w3, a);
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    float sum = _mm512_reduce_add_ps(acc[m]);
    for (int64_t j = k; j < K; ++j) sum += x[m * K + j] * static_cast<float>(w[j]);
    out[m * ldo] = sum * scale;
  }
}

// One weight row against all M activation rows, kMaxRows at a time.
template <int ROWS = kMaxRows>
inline void dot_all_rows(const float* x, int64_t M, const int8_t* w, int64_t K, float scale, float* out, int64_t ldo) {
  if constexpr (ROWS > 0) {
    for (; M >= ROWS; M -= ROWS, x += ROWS * K, out += ROWS * ldo) dot_rows<ROWS>(x, w, K, scale, out, ldo);
    dot_all_rows<ROWS - 1>(x, M, w, K, scale, out, ldo);
  }
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && scales.dim() == 1, "int8_matmul: x [M, K], w [N, K], scales [N]");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_matmul: w must be contiguous int8");
  TORCH_CHECK(x.size(1) == w.size(1) && scales.size(0) == w.size(0), "int8_matmul: shapes do not match");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dot_all_rows(xp, M, wp + n * K, K, sp[n], op + n, N);
  });
  return out.to(x.scalar_type());
}

}  // namespace

// torch.ops.qwen.int8_matmul(x, w, scales): out = (x @ w.T) * scales for int8 w, computed in fp32.
// A CPU kernel only: torch.compile traces the op through the shape function qwen/cpu_kernels.py registers.
TORCH_LIBRARY(qwen, m) { m.def("int8_matmul(Tensor x, Tensor w, Tensor scales) -> Tensor"); }
TORCH_LIBRARY_IMPL(qwen, CPU, m) { m.impl("int8_matmul", &int8_matmul); }
