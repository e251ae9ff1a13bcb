// Weight-only int8 matrix product for a few rows of activations on CPUs with AVX-512:
//   out[m, n] = scales[n] * sum_k x[m, k] * w[n, k]
//
// Built on first use by qwen/cpu_kernels.py (torch.utils.cpp_extension, cached per machine).
// Decoding reads every weight once per token, so speed is memory bandwidth. Each thread walks its
// rows of w in memory order (one sequential stream the hardware prefetcher follows) and prefetches
// 4 KiB ahead, which keeps more DRAM reads in flight than PyTorch's _weight_int8pack_mm (measured
// on a 2-core Xeon: 15-17 vs 12-14 GB/s over the Qwen-1.8B layer shapes). Each 64-byte chunk of a
// weight row is used for up to 8 activation rows, on one of two paths:
//
// * float: the chunk is widened to fp32 and multiplied in fp32, exact up to fp32 rounding. It serves
//   every row count on CPUs without VNNI (and everywhere with QWEN_INT8_VNNI=0).
// * integer (AVX-512 VNNI): widening and 4 fp32 FMAs per 16 weights per row cost more
//   time than memory takes to deliver the chunk (at 8 rows the float path reads 6-8 GB/s). Instead each
//   activation row is quantized to int8, one scale per block of 128 channels (a = max|x| / 127,
//   q = round(x / a); a zero block has a = 0), vpdpbusd makes 64 int8 products per instruction, and
//   each block's integer sum is added to an fp32 accumulator times its scale: 15-21 GB/s at 8 rows,
//   1.4-1.9x PyTorch's bf16 matmul (AMX) over the same shapes, 1.2-1.6x the float path at 2 rows
//   and 1.1-1.6x even at one (bench/int8_kernel.py, 2-core Xeon), so a batch-1 decode takes it too, as
//   llama.cpp's Q8_0 quantizes its activations. The cost is 8-bit activations: each x is off by at most a / 2
//   of its block's a, so one large channel (an outlier) coarsens only its own block.
//   QWEN_INT8_VNNI=0 in the environment (read on each call) turns it off, e.g. to compare the paths.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

// The integer path's functions; the file itself is built for AVX-512F only, which every CPU that runs
// this kernel has, and the integer path runs only where the CPU reports VNNI.
#define QWEN_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

namespace {

constexpr int64_t kPrefetchBytes = 4096;
constexpr int kMaxRows = 8;          // activation rows per pass: 8 accumulators + 4 widened weight vectors
constexpr int64_t kBlock = 128;      // input channels per activation scale on the integer path
constexpr int64_t kMinVnniRows = 1;  // rows from which the integer path runs (faster from one row)

// ----- float path -------------------------------------------------------------------------------------

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

// ----- integer path (AVX-512 VNNI) ---------------------------------------------------------------------

// Activation rows quantized per block of kBlock channels: x[m, b * kBlock + i] ~ a[b, m] * q[b, m, i]. Block
// by block ([blocks, M, kBlock]), so that one block of a pass's rows lies at fixed offsets; q is 0 past K.
struct Quantized {
  const int8_t* q;     // [blocks, M, kBlock]
  const float* a;      // [blocks, M]
  const float* corr;   // [M]: 128 * sum_b a[b, m] * sum_i q[b, m, i], see dot_rows_vnni
  int64_t M;
};

// Quantizes row x[0 : K] into q[b * ldq : b * ldq + kBlock], a[b * lda] for each block b, and its corr:
// q = round-half-even(x * (127 / max|x|)), as vcvtps2dq rounds.
QWEN_VNNI void quantize_row(const float* x, int64_t K, int8_t* q, int64_t ldq, float* a, int64_t lda, float* corr) {
  constexpr int kVecs = kBlock / 16;
  float sum = 0;
  for (int64_t k = 0; k < K; k += kBlock, q += ldq, a += lda) {
    __m512 v[kVecs];
    __m512 amax = _mm512_setzero_ps(), probe = _mm512_setzero_ps();
    for (int i = 0; i < kVecs; ++i) {
      const int64_t left = K - k - 16 * i;
      v[i] = _mm512_maskz_loadu_ps(left >= 16 ? 0xFFFF : left > 0 ? (1u << left) - 1 : 0, x + k + 16 * i);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
      probe = _mm512_fmadd_ps(v[i], _mm512_setzero_ps(), probe);  // x * 0: NaN for an inf or NaN x
    }
    const float top = _mm512_reduce_max_ps(amax);
    // A non-finite activation makes its block's scale NaN, so the outputs it feeds are NaN (inf or
    // NaN on the float path), never finite; a zero block (or one too small for 127 / max) is all 0.
    *a = top / 127 + _mm512_reduce_add_ps(probe);
    const __m512 inv = _mm512_set1_ps(std::isfinite(127 / top) ? 127 / top : 0);
    __m512i qsum = _mm512_setzero_si512();
    for (int i = 0; i < kVecs; ++i) {
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
      qsum = _mm512_add_epi32(qsum, qi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * i), _mm512_cvtepi32_epi8(qi));
    }
    sum += *a * static_cast<float>(128 * _mm512_reduce_add_epi32(qsum));
  }
  *corr = sum;
}

// The bytes of a 64-byte chunk that lie before the end of the row, `left` bytes away.
QWEN_VNNI inline __mmask64 chunk_mask(int64_t left) {
  return left >= 64 ? ~0ull : left > 0 ? (1ull << left) - 1 : 0;
}

// out[m * ldo] = scale * dot(x row m0 + m, w[0 : K]) for m < ROWS, on the quantized rows. vpdpbusd
// multiplies unsigned bytes by signed ones, so w goes in as w + 128 (its sign bit flipped) and q as is:
// each block's sum then holds 128 * sum_i q too, which corr subtracts once per row.
template <int ROWS>
QWEN_VNNI inline void dot_rows_vnni(const Quantized& x, int64_t m0, const int8_t* w, int64_t K, float scale,
                                    float* out, int64_t ldo) {
  constexpr int kChunks = kBlock / 64;
  const __m512i flip = _mm512_set1_epi8(-128);
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  const int8_t* q = x.q + m0 * kBlock;
  const float* a = x.a + m0;
  for (int64_t k = 0; k < K; k += kBlock, q += x.M * kBlock, a += x.M) {
    __m512i wu[kChunks];
    for (int c = 0; c < kChunks; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k + 64 * c + kPrefetchBytes), _MM_HINT_T0);
      // Masked, so nothing past the row is read (the last row ends the tensor); the zeros there become
      // 128, against q = 0.
      wu[c] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(chunk_mask(K - k - 64 * c), w + k + 64 * c), flip);
    }
    for (int m = 0; m < ROWS; ++m) {
      __m512i d = _mm512_setzero_si512();
      for (int c = 0; c < kChunks; ++c) {
        d = _mm512_dpbusd_epi32(d, wu[c], _mm512_loadu_si512(q + m * kBlock + 64 * c));
      }
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(a[m]), acc[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) out[m * ldo] = (_mm512_reduce_add_ps(acc[m]) - x.corr[m0 + m]) * scale;
}

template <int ROWS = kMaxRows>
QWEN_VNNI inline void dot_all_rows_vnni(const Quantized& x, int64_t m0, const int8_t* w, int64_t K, float scale,
                                        float* out, int64_t ldo) {
  if constexpr (ROWS > 0) {
    for (; x.M - m0 >= ROWS; m0 += ROWS) dot_rows_vnni<ROWS>(x, m0, w, K, scale, out + m0 * ldo, ldo);
    dot_all_rows_vnni<ROWS - 1>(x, m0, w, K, scale, out, ldo);
  }
}

// Weight rows [n0, n1) against every quantized row (a function of its own: lambdas do not take the target).
QWEN_VNNI void out_columns_vnni(const Quantized& x, const int8_t* w, const float* scales, int64_t K, int64_t N,
                                int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) dot_all_rows_vnni(x, 0, w + n * K, K, scales[n], out + n, N);
}

// Whether M rows take the integer path: enough rows, a CPU with VNNI, and QWEN_INT8_VNNI not "0".
bool use_vnni(int64_t M) {
  static const bool vnni = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  const char* env = std::getenv("QWEN_INT8_VNNI");
  return M >= kMinVnniRows && vnni && !(env && std::strcmp(env, "0") == 0);
}

// ----- the op ------------------------------------------------------------------------------------------

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
  if (use_vnni(M)) {
    const int64_t blocks = (K + kBlock - 1) / kBlock;
    at::Tensor q = at::empty({blocks, M, kBlock}, xf.options().dtype(at::kChar));
    at::Tensor a = at::empty({blocks, M}, xf.options());
    at::Tensor corr = at::empty({M}, xf.options());
    for (int64_t m = 0; m < M; ++m) {
      quantize_row(xp + m * K, K, q.data_ptr<int8_t>() + m * kBlock, M * kBlock, a.data_ptr<float>() + m, M,
                   corr.data_ptr<float>() + m);
    }
    const Quantized xq{q.data_ptr<int8_t>(), a.data_ptr<float>(), corr.data_ptr<float>(), M};
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { out_columns_vnni(xq, wp, sp, K, N, n0, n1, op); });
  } else {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) dot_all_rows(xp, M, wp + n * K, K, sp[n], op + n, N);
    });
  }
  return out.to(x.scalar_type());
}

}  // namespace

// torch.ops.qwen.int8_matmul(x, w, scales): out = (x @ w.T) * scales for int8 w, computed in fp32.
// A CPU kernel only: torch.compile traces the op through the shape function qwen/cpu_kernels.py registers.
TORCH_LIBRARY(qwen, m) { m.def("int8_matmul(Tensor x, Tensor w, Tensor scales) -> Tensor"); }
TORCH_LIBRARY_IMPL(qwen, CPU, m) { m.impl("int8_matmul", &int8_matmul); }
