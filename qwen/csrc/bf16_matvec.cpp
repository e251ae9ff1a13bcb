// bf16 matrix product for a few rows of activations on CPUs with AVX-512 BF16 dot products:
//   out[m, n] = sum_k x[m, k] * w[n, k]   (bf16 inputs, fp32 accumulation, bf16 output)
//
// Built on first use by qwen/cpu_kernels.py (torch.utils.cpp_extension, cached per machine).
// Decoding reads every weight once per token, so its speed is memory bandwidth. PyTorch's bf16
// matrix-vector product on these CPUs reads a few GB/s; this kernel streams each thread's weight
// rows in memory order with a prefetch 4 KiB ahead (as qwen's int8 kernel does), and multiplies 32
// bf16 pairs per instruction (vdpbf16ps) straight from the loaded bytes, with no conversion, for up
// to 8 activation rows per pass over a weight row.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <optional>

namespace {

constexpr int64_t kPrefetchElems = 2048;  // 4 KiB of bf16 ahead
constexpr int kMaxRows = 8;

// out[m * ldo] = dot(x[m * K : (m + 1) * K], w[0 : K]) for m < ROWS, in fp32.
template <int ROWS>
inline void dot_rows(const uint16_t* x, const uint16_t* w, int64_t K, float* out, int64_t ldo) {
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchElems), _MM_HINT_T0);
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
    for (int m = 0; m < ROWS; ++m) {
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv);
    }
  }
  if (k < K) {  // the tail: masked loads read zeros past the end
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int m = 0; m < ROWS; ++m) {
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k), wv);
    }
  }
  for (int m = 0; m < ROWS; ++m) out[m * ldo] = _mm512_reduce_add_ps(acc[m]);
}

template <int ROWS = kMaxRows>
inline void dot_all_rows(const uint16_t* x, int64_t M, const uint16_t* w, int64_t K, float* out, int64_t ldo) {
  if constexpr (ROWS > 0) {
    for (; M >= ROWS; M -= ROWS, x += ROWS * K, out += ROWS * ldo) dot_rows<ROWS>(x, w, K, out, ldo);
    dot_all_rows<ROWS - 1>(x, M, w, K, out, ldo);
  }
}

at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "bf16_matmul: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_matmul: bf16 only");
  TORCH_CHECK(x.size(1) == w.size(1), "bf16_matmul: shapes do not match");
  // A weight is read at every call: copying a strided one each time would cost more than the product.
  TORCH_CHECK(w.is_contiguous(), "bf16_matmul: the weight must be contiguous (make it so once, not per call)");
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bf16_matmul: bias [N]");
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      dot_all_rows(xp, M, wp + n * K, K, op + n, N);
      if (bp) {  // in fp32, before the one rounding to bf16 (as PyTorch's linear adds it)
        for (int64_t m = 0; m < M; ++m) op[m * N + n] += bp[n];
      }
    }
  });
  return out.to(at::kBFloat16);
}

}  // namespace

// torch.ops.qwen.bf16_matmul(x, w, bias=None): x @ w.T (+ bias) for bf16 x [M, K] and w [N, K], accumulated
// in fp32 and rounded to bf16 once.
TORCH_LIBRARY_FRAGMENT(qwen, m) { m.def("bf16_matmul(Tensor x, Tensor w, Tensor? bias=None) -> Tensor"); }
TORCH_LIBRARY_IMPL(qwen, CPU, m) { m.impl("bf16_matmul", &bf16_matmul); }
