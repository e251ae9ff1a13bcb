// Group-wise 4-bit weights on the CPU: a matrix product for a few rows of activations (decoding), one for many
// rows (a prompt's, on AVX-512 VNNI: int4_product) and the dequantized weight (for a prefill's matmul elsewhere).
//
//   w[n, k] = s[n, g] * (q[n, k] - z[n, g]),  g = k / group_size,  q and z in 0..15
//   out[m, n] = sum_k x[m, k] * w[n, k]
//
// Built on first use by qwen/cpu_kernels.py (torch.utils.cpp_extension, cached per machine), with no
// instruction-set flags: each kernel is compiled twice, for AVX-512 VNNI and for AVX2, by function
// target attributes, and the best one this CPU runs is picked at run time.
//
// Layout (made by qwen/quantization/layers.py): packed[n] holds a weight row in blocks of 128 input
// channels, 64 bytes each; byte j of a block holds channel j in its low nibble and channel 64 + j in
// its high one, so one 64-byte load gives two vectors of 64 consecutive channels with an AND and a
// shift. scale_zero[n, g] holds (s, s * z) as float32 (exact for a GPTQ folder's fp16 s and 4-bit z).
// Groups are whole blocks: group_size is 128 or a larger power of two.
//
// Decoding reads every weight once per token, so the product is paced by memory: 4-bit weights move a
// quarter of bf16's bytes, and the arithmetic has to keep up with that stream. It does integer dot
// products, as llama.cpp does: each activation row is quantized to int8 once per call, one scale per
// 128 channels (a = max|x| / 127, x ~ a * xq), and per block
//   sum_k x w = s * a * (sum_k xq q) - s * z * a * (sum_k xq)
// where sum_k xq q is vpdpbusd (AVX-512 VNNI: 64 products of unsigned q by signed xq per instruction)
// or vpmaddubsw + vpmaddwd (AVX2). Weights stream in memory order, prefetched 4 KiB ahead.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#define QWEN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
#define QWEN_AVX2 __attribute__((target("avx2,fma")))

namespace {

constexpr int64_t kBlock = 128;             // input channels per block (and per activation scale)
constexpr int64_t kBlockBytes = kBlock / 2;  // 64: one cache line of packed weights
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kMaxRows = 8;  // activation rows per pass over a weight row

// Activations quantized per row and block: x[m, b*128 + i] ~ scale[m, b] * q[m, b*128 + i].
struct Acts {
  std::vector<int8_t> q;       // [M, K]
  std::vector<float> scale;    // [M, B]
  std::vector<float> qsum;     // [M, B]: scale * sum_i q, for the zero-point term
  int64_t K = 0, B = 0;
};

// xq = round-half-even(x * 127 / max|x|), as vcvtps2dq rounds. In AVX2, which both kernels' CPUs have,
// so both see the same int8 values.
QWEN_AVX2 Acts quantize_rows(const float* x, int64_t M, int64_t K) {
  Acts a;
  a.K = K;
  a.B = K / kBlock;
  a.q.resize(M * K);
  a.scale.resize(M * a.B);
  a.qsum.resize(M * a.B);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  for (int64_t mb = 0; mb < M * a.B; ++mb) {  // block mb of the [M, K] activations
    const float* xb = x + mb * kBlock;
    __m256 vmax = _mm256_setzero_ps(), probe = _mm256_setzero_ps();
    for (int64_t i = 0; i < kBlock; i += 8) {
      const __m256 v = _mm256_loadu_ps(xb + i);
      vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
      probe = _mm256_add_ps(probe, _mm256_mul_ps(v, _mm256_setzero_ps()));  // x * 0: NaN for an inf or NaN x
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    // max drops a NaN, so the probe carries it: a non-finite activation makes its block's scale NaN and
    // every output of its row NaN, as the float product would be, never finite.
    __m128 p4 = _mm_add_ps(_mm256_castps256_ps128(probe), _mm256_extractf128_ps(probe, 1));
    p4 = _mm_add_ps(p4, _mm_movehl_ps(p4, p4));
    const float nan_or_zero = _mm_cvtss_f32(_mm_add_ss(p4, _mm_movehdup_ps(p4)));
    // A zero block, or one too small for 127 / max to be finite, quantizes to all 0 (as the int8 kernel).
    const float ratio = 127.f / amax;
    const __m256 inv = _mm256_set1_ps(std::isfinite(ratio) ? ratio : 0.f);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t i = 0; i < kBlock; i += 32) {
      __m256i v[4];
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * j), inv));
        sum = _mm256_add_epi32(sum, v[j]);
      }
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + mb * kBlock + i),
                          _mm256_permutevar8x32_epi32(bytes, order));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    a.scale[mb] = amax / 127.f + nan_or_zero;
    a.qsum[mb] = a.scale[mb] * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
  return a;
}

// Each kernel computes out[m, n] = dot(x row m, weight row n) for rows m0 .. m0 + ROWS of x and one
// weight row w (its (s, s * z) pairs in sz), adding the zero-point term per group.

// ----- AVX-512 VNNI ----------------------------------------------------------------------------------

// One 128-channel block b of weight row w into acc and zero_term, for ROWS rows of x from xq.
template <int ROWS>
QWEN_AVX512 inline void block_avx512(const Acts& x, const int8_t* xq, const float* xs, const float* xsum,
                                     const uint8_t* w, const float* sz, int64_t b, int shift,
                                     __m512* acc, float* zero_term) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const uint8_t* wb = w + b * kBlockBytes;
  _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes), _MM_HINT_T0);
  const __m512i bytes = _mm512_loadu_si512(wb);
  const __m512i lo = _mm512_and_si512(bytes, nibble);                        // channels 0..63
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);  // channels 64..127
  const int64_t g = b >> shift;
  const float s = sz[2 * g], sz_product = sz[2 * g + 1];
  for (int m = 0; m < ROWS; ++m) {
    const int8_t* xb = xq + m * x.K + b * kBlock;
    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xb));
    d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xb + 64));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s * xs[m * x.B + b]), acc[m]);
    zero_term[m] += sz_product * xsum[m * x.B + b];
  }
}

// Even and odd blocks go to separate accumulators: at one row, the chain of dependent adds is what
// limits the loop otherwise.
template <int ROWS>
QWEN_AVX512 inline void tile_avx512(const Acts& x, int64_t m0, const uint8_t* w, const float* sz, int shift,
                                    float* out, int64_t ldo) {
  const int8_t* xq = x.q.data() + m0 * x.K;
  const float* xs = x.scale.data() + m0 * x.B;
  const float* xsum = x.qsum.data() + m0 * x.B;
  __m512 acc[2][ROWS];
  float zero_term[2][ROWS];
  for (int m = 0; m < ROWS; ++m) {
    acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    zero_term[0][m] = zero_term[1][m] = 0.f;
  }
  int64_t b = 0;
  for (; b + 2 <= x.B; b += 2) {
    block_avx512<ROWS>(x, xq, xs, xsum, w, sz, b, shift, acc[0], zero_term[0]);
    block_avx512<ROWS>(x, xq, xs, xsum, w, sz, b + 1, shift, acc[1], zero_term[1]);
  }
  if (b < x.B) block_avx512<ROWS>(x, xq, xs, xsum, w, sz, b, shift, acc[0], zero_term[0]);
  for (int m = 0; m < ROWS; ++m) {
    out[m * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m])) - zero_term[0][m] - zero_term[1][m];
  }
}

// ----- AVX2 ------------------------------------------------------------------------------------------

QWEN_AVX2 inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int ROWS>
QWEN_AVX2 inline void block_avx2(const Acts& x, const int8_t* xq, const float* xs, const float* xsum,
                                 const uint8_t* w, const float* sz, int64_t b, int shift,
                                 __m256* acc, float* zero_term) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* wb = w + b * kBlockBytes;
  _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes), _MM_HINT_T0);
  const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
  const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32));
  // Channels 0..31, 32..63 (low nibbles), 64..95, 96..127 (high nibbles).
  const __m256i q[4] = {_mm256_and_si256(b0, nibble), _mm256_and_si256(b1, nibble),
                        _mm256_and_si256(_mm256_srli_epi16(b0, 4), nibble),
                        _mm256_and_si256(_mm256_srli_epi16(b1, 4), nibble)};
  const int64_t g = b >> shift;
  const float s = sz[2 * g], sz_product = sz[2 * g + 1];
  for (int m = 0; m < ROWS; ++m) {
    const int8_t* xb = xq + m * x.K + b * kBlock;
    // Pairs of 15 * 127 products summed four times stay below 2^15: no saturation.
    __m256i pairs = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32 * i));
      pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(q[i], xv));
    }
    const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
    acc[m] = _mm256_fmadd_ps(d, _mm256_set1_ps(s * xs[m * x.B + b]), acc[m]);
    zero_term[m] += sz_product * xsum[m * x.B + b];
  }
}

template <int ROWS>
QWEN_AVX2 inline void tile_avx2(const Acts& x, int64_t m0, const uint8_t* w, const float* sz, int shift,
                                float* out, int64_t ldo) {
  const int8_t* xq = x.q.data() + m0 * x.K;
  const float* xs = x.scale.data() + m0 * x.B;
  const float* xsum = x.qsum.data() + m0 * x.B;
  __m256 acc[2][ROWS];
  float zero_term[2][ROWS];
  for (int m = 0; m < ROWS; ++m) {
    acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    zero_term[0][m] = zero_term[1][m] = 0.f;
  }
  int64_t b = 0;
  for (; b + 2 <= x.B; b += 2) {
    block_avx2<ROWS>(x, xq, xs, xsum, w, sz, b, shift, acc[0], zero_term[0]);
    block_avx2<ROWS>(x, xq, xs, xsum, w, sz, b + 1, shift, acc[1], zero_term[1]);
  }
  if (b < x.B) block_avx2<ROWS>(x, xq, xs, xsum, w, sz, b, shift, acc[0], zero_term[0]);
  for (int m = 0; m < ROWS; ++m) {
    out[m * ldo] = reduce_add(_mm256_add_ps(acc[0][m], acc[1][m])) - zero_term[0][m] - zero_term[1][m];
  }
}

// ----- weight rows [n0, n1) against every row of x ------------------------------------------------------

struct Weights {
  const uint8_t* packed;  // [N, K / 2]
  const float* sz;        // [N, groups, 2]
  int64_t groups;         // per row
  int shift;              // block b is in group b >> shift
};

// Calls TILE<ROWS> for rows m0 .. m0 + ROWS, 8 rows at a time and then the rest.
#define QWEN_ALL_ROWS(TILE)                                                               \
  for (int64_t n = n0; n < n1; ++n) {                                                    \
    const uint8_t* wn = w.packed + n * (x.K / 2);                                        \
    const float* sn = w.sz + n * w.groups * 2;                                           \
    int64_t m0 = 0;                                                                      \
    for (; M - m0 >= kMaxRows; m0 += kMaxRows)                                           \
      TILE<kMaxRows>(x, m0, wn, sn, w.shift, out + m0 * N + n, N);               \
    switch (M - m0) {                                                                    \
      case 7: TILE<7>(x, m0, wn, sn, w.shift, out + m0 * N + n, N); break;       \
      case 6: TILE<6>(x, m0, wn, sn, w.shift, out + m0 * N + n, N); break;       \
      case 5: TILE<5>(x, m0, wn, sn, w.shift, out + m0 * N + n, N); break;       \
      case 4: TILE<4>(x, m0, wn, sn, w.shift, out + m0 * N + n, N); break;       \
      case 3: TILE<3>(x, m0, wn, sn, w.shift, out + m0 * N + n, N); break;       \
      case 2: TILE<2>(x, m0, wn, sn, w.shift, out + m0 * N + n, N); break;       \
      case 1: TILE<1>(x, m0, wn, sn, w.shift, out + m0 * N + n, N); break;       \
    }                                                                                    \
  }

QWEN_AVX512 void rows_avx512(const Acts& x, int64_t M, const Weights& w, int64_t n0, int64_t n1, float* out,
                             int64_t N) {
  QWEN_ALL_ROWS(tile_avx512)
}

QWEN_AVX2 void rows_avx2(const Acts& x, int64_t M, const Weights& w, int64_t n0, int64_t n1, float* out,
                         int64_t N) {
  QWEN_ALL_ROWS(tile_avx2)
}

// ATEN_CPU_CAPABILITY=avx2 (or default), which makes PyTorch dispatch as on an AVX2-only CPU, makes this
// kernel do the same, so the AVX2 path can be run, and tested, the way such a CPU reaches it.
bool has_avx512_vnni() {
  static const bool yes = [] {
    const char* capped = std::getenv("ATEN_CPU_CAPABILITY");
    if (capped && (std::strcmp(capped, "avx2") == 0 || std::strcmp(capped, "default") == 0)) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return yes;
}

void check(const at::Tensor& packed, const at::Tensor& scale_zero, int64_t K, int64_t group_size, const char* op) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              op, ": packed must be a contiguous uint8 [N, K / 2]");
  TORCH_CHECK(group_size >= kBlock && (group_size & (group_size - 1)) == 0 && K % group_size == 0,
              op, ": group_size must be 128 or a larger power of two that divides K = ", K, ", got ", group_size);
  TORCH_CHECK(packed.size(1) * 2 == K, op, ": shapes do not match (packed has ", packed.size(1) * 2, " channels, K = ", K, ")");
  TORCH_CHECK(scale_zero.dim() == 3 && scale_zero.scalar_type() == at::kFloat && scale_zero.is_contiguous() &&
                  scale_zero.size(0) == packed.size(0) && scale_zero.size(1) == K / group_size && scale_zero.size(2) == 2,
              op, ": scale_zero must be a contiguous float32 [N, K / group_size, 2]");
}

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero,
                       int64_t group_size, bool avx2) {
  TORCH_CHECK(x.dim() == 2, "int4_matmul: x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  check(packed, scale_zero, K, group_size, "int4_matmul");
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
              "int4_matmul: this CPU has no AVX2");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const Acts acts = quantize_rows(xf.data_ptr<float>(), M, K);
  at::Tensor out = at::empty({M, N}, xf.options());
  const int64_t groups = K / group_size;
  const Weights w{packed.data_ptr<uint8_t>(), scale_zero.data_ptr<float>(),
                  groups, __builtin_ctzll(group_size / kBlock)};
  float* op = out.data_ptr<float>();
  const bool wide = !avx2 && has_avx512_vnni();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (wide) rows_avx512(acts, M, w, n0, n1, op, N);
    else rows_avx2(acts, M, w, n0, n1, op, N);
  });
  return out.to(x.scalar_type());
}

// ----- matrix product for many rows (AVX-512 VNNI) -------------------------------------------------------
//
// The kernels above read each weight row once per 8 activation rows: right for decoding, compute-bound for a
// prompt's hundreds of rows. int4_product multiplies as a GEMM instead: lanes are output channels, a thread copies
// 32 weight rows at a time (a panel) into vpdpbusd's order (lane i: 4 channels of output n0 + i, as unsigned
// bytes 0..15), then runs 4 activation rows at a time past it, each vpdpbusd broadcasting 4 bytes of an
// activation row. A block's integer sum is the kernels' (exact); its float terms are added per block in order,
// not in the decode kernels' lanes, so a row's output rounds apart from int4_matmul's: a layer chooses by the
// tokens each sequence brings (qwen/quantization/layers.py), never by the row count.

constexpr int kProductVectors = 2;                      // 16 outputs each
constexpr int64_t kProductPanel = 16 * kProductVectors;  // outputs per panel
constexpr int kProductRows = 4;                         // activation rows per pass over a panel

// Lanes [0, n) of 16.
inline __mmask16 lanes(int64_t n) { return n >= 16 ? 0xFFFF : n > 0 ? static_cast<__mmask16>((1u << n) - 1) : 0; }

// Output rows [n0, n0 + 32): quad (b, t) (channels b * 128 + 4t ... + 3) of outputs n0 + 16 v + i in lane i of
// w[(b * 32 + t) * 2 + v]; s[(b * 2 + v)] and sz[...] the per-output (s, s * z) of block b's group. Zero past N.
// (Plain bytes and floats, not vectors of __m512i: this file is built without AVX-512 flags, so std::vector's
// code for vector types would not have the instructions.)
struct Panel4 {
  std::vector<uint8_t> w;    // 64 bytes per vector
  std::vector<float> s, sz;  // 16 per vector
};

QWEN_AVX512 void fill_panel4(const Weights& wt, int64_t K, int64_t N, int64_t n0, Panel4& p) {
  const int64_t blocks = K / kBlock, row_bytes = K / 2;
  p.w.assign(blocks * 32 * kProductVectors * 64, 0);
  p.s.assign(blocks * kProductVectors * 16, 0.f);
  p.sz.assign(blocks * kProductVectors * 16, 0.f);
  const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(static_cast<int32_t>(row_bytes)));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int v = 0; v < kProductVectors; ++v) {
    const int64_t n = n0 + 16 * v, valid = std::min<int64_t>(16, N - n);
    if (valid <= 0) break;
    const __mmask16 mask = lanes(valid);
    const uint8_t* rows = wt.packed + n * row_bytes;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int t = 0; t < 16; ++t) {  // bytes 4t ... 4t + 3 of the block: quad t (low nibbles), t + 16 (high)
        const __m512i d = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, offsets,
                                                      rows + b * kBlockBytes + 4 * t, 1);
        _mm512_storeu_si512(p.w.data() + ((b * 32 + t) * kProductVectors + v) * 64, _mm512_and_si512(d, nibble));
        _mm512_storeu_si512(p.w.data() + ((b * 32 + t + 16) * kProductVectors + v) * 64,
                            _mm512_and_si512(_mm512_srli_epi16(d, 4), nibble));
      }
      for (int64_t i = 0; i < valid; ++i) {
        const float* pair = wt.sz + ((n + i) * wt.groups + (b >> wt.shift)) * 2;
        p.s[(b * kProductVectors + v) * 16 + i] = pair[0];
        p.sz[(b * kProductVectors + v) * 16 + i] = pair[1];
      }
    }
  }
}

// out[m0 + m, n0 : n0 + valid] for m < ROWS.
template <int ROWS>
QWEN_AVX512 void panel4_rows(const Acts& x, int64_t m0, const Panel4& p, int64_t valid, float* out, int64_t ldo) {
  __m512 acc[ROWS][kProductVectors];
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < kProductVectors; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t b = 0; b < x.B; ++b) {
    __m512i d[ROWS][kProductVectors];
    for (int m = 0; m < ROWS; ++m)
      for (int v = 0; v < kProductVectors; ++v) d[m][v] = _mm512_setzero_si512();
    const uint8_t* w = p.w.data() + b * 32 * kProductVectors * 64;
    for (int t = 0; t < 32; ++t) {
      for (int m = 0; m < ROWS; ++m) {
        int32_t word;
        std::memcpy(&word, x.q.data() + (m0 + m) * x.K + b * kBlock + 4 * t, 4);
        const __m512i q = _mm512_set1_epi32(word);
        for (int v = 0; v < kProductVectors; ++v)
          d[m][v] = _mm512_dpbusd_epi32(d[m][v], _mm512_loadu_si512(w + (t * kProductVectors + v) * 64), q);
      }
    }
    for (int m = 0; m < ROWS; ++m) {
      const __m512 xs = _mm512_set1_ps(x.scale[(m0 + m) * x.B + b]), xsum = _mm512_set1_ps(x.qsum[(m0 + m) * x.B + b]);
      for (int v = 0; v < kProductVectors; ++v) {
        const __m512 s = _mm512_loadu_ps(p.s.data() + (b * kProductVectors + v) * 16);
        const __m512 sz = _mm512_loadu_ps(p.sz.data() + (b * kProductVectors + v) * 16);
        acc[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[m][v]), _mm512_mul_ps(s, xs), acc[m][v]);
        acc[m][v] = _mm512_fnmadd_ps(sz, xsum, acc[m][v]);
      }
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    for (int v = 0; v < kProductVectors; ++v)
      _mm512_mask_storeu_ps(out + (m0 + m) * ldo + 16 * v, lanes(valid - 16 * v), acc[m][v]);
  }
}

template <int ROWS = kProductRows>
QWEN_AVX512 void panel4_all_rows(const Acts& x, int64_t m0, int64_t M, const Panel4& p, int64_t valid, float* out,
                                 int64_t ldo) {
  if constexpr (ROWS > 0) {
    for (; M - m0 >= ROWS; m0 += ROWS) panel4_rows<ROWS>(x, m0, p, valid, out, ldo);
    panel4_all_rows<ROWS - 1>(x, m0, M, p, valid, out, ldo);
  }
}

QWEN_AVX512 void product_panels4(const Acts& x, int64_t M, const Weights& w, int64_t K, int64_t N, int64_t p0,
                                 int64_t p1, float* out) {
  Panel4 panel;
  for (int64_t i = p0; i < p1; ++i) {
    fill_panel4(w, K, N, i * kProductPanel, panel);
    panel4_all_rows(x, 0, M, panel, std::min(kProductPanel, N - i * kProductPanel), out + i * kProductPanel, N);
  }
}

at::Tensor int4_product(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero,
                        int64_t group_size) {
  TORCH_CHECK(x.dim() == 2, "int4_product: x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  check(packed, scale_zero, K, group_size, "int4_product");
  TORCH_CHECK(has_avx512_vnni(), "int4_product: needs a CPU with AVX-512 VNNI (use int4_dequantize and a matmul)");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const Acts acts = quantize_rows(xf.data_ptr<float>(), M, K);
  at::Tensor out = at::empty({M, N}, xf.options());
  const Weights w{packed.data_ptr<uint8_t>(), scale_zero.data_ptr<float>(), K / group_size,
                  __builtin_ctzll(group_size / kBlock)};
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (N + kProductPanel - 1) / kProductPanel, 1, [&](int64_t p0, int64_t p1) {
    product_panels4(acts, M, w, K, N, p0, p1, op);
  });
  return out.to(x.scalar_type());
}

// One weight row dequantized into fp32 (out32) or bf16 (out16, rounded to nearest even). AVX2, which
// both kernels' CPUs have: a prefill runs it once per layer, so it has to keep up with memory.
QWEN_AVX2 void dequantize_row(const uint8_t* w, const float* sz, int64_t K, int shift, float* out32,
                              uint16_t* out16) {
  const __m256i nibble = _mm256_set1_epi32(0x0F), round = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1),
                quiet = _mm256_set1_epi32(0x0040);
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const __m256 s = _mm256_set1_ps(sz[2 * (b >> shift)]), offset = _mm256_set1_ps(sz[2 * (b >> shift) + 1]);
    for (int64_t j = 0; j < kBlockBytes; j += 8) {
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + b * kBlockBytes + j)));
      const __m256i q[2] = {_mm256_and_si256(bytes, nibble), _mm256_srli_epi32(bytes, 4)};  // channels j, 64 + j
      for (int h = 0; h < 2; ++h) {
        const __m256 v = _mm256_fmsub_ps(_mm256_cvtepi32_ps(q[h]), s, offset);
        const int64_t k = b * kBlock + h * kBlockBytes + j;
        if (out32) {
          _mm256_storeu_ps(out32 + k, v);
        } else {
          const __m256i bits = _mm256_castps_si256(v);
          const __m256i rounded = _mm256_srli_epi32(
              _mm256_add_epi32(bits, _mm256_add_epi32(round, _mm256_and_si256(_mm256_srli_epi32(bits, 16), one))), 16);
          // Rounding would carry a NaN with a low payload into inf: a NaN keeps its top bits, made quiet.
          const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
          const __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(_mm256_srli_epi32(bits, 16), quiet), nan);
          const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out16 + k), _mm256_castsi256_si128(packed));
        }
      }
    }
  }
}

// The float weight [N, K] written into `out` (contiguous float32 or bfloat16), for a prefill's matmul.
// A caller that reuses `out` spares the page faults of a fresh allocation: past 32 MB glibc maps and
// unmaps each one, and touching 45 MB of new pages took longer than the dequantization itself.
void int4_dequantize_into(const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group_size,
                          const at::Tensor& out) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  check(packed, scale_zero, K, group_size, "int4_dequantize");
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), "int4_dequantize: this CPU has no AVX2");
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || out.scalar_type() == at::kFloat) && out.is_contiguous() && out.numel() == N * K,
              "int4_dequantize: out must be a contiguous float32 or bfloat16 tensor of ", N * K, " elements");
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale_zero.data_ptr<float>();
  const int64_t groups = K / group_size;
  const int shift = __builtin_ctzll(group_size / kBlock);
  float* o32 = bf16 ? nullptr : out.data_ptr<float>();
  auto* o16 = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      dequantize_row(wp + n * (K / 2), sp + n * groups * 2, K, shift, o32 ? o32 + n * K : nullptr,
                     o16 ? o16 + n * K : nullptr);
    }
  });
}

// The same in a new tensor of `dtype` (float32 or bfloat16; others via float32).
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group_size,
                           at::ScalarType dtype) {
  const at::ScalarType made = dtype == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  at::Tensor out = at::empty({packed.size(0), packed.size(1) * 2}, packed.options().dtype(made));
  int4_dequantize_into(packed, scale_zero, group_size, out);
  return made == dtype ? out : out.to(dtype);
}

}  // namespace

// torch.ops.qwen.int4_matmul(x, packed, scale_zero, group_size, avx2=False): x @ w.T for the 4-bit w
// above, with x quantized to int8 per 128 channels; avx2=True runs the AVX2 kernel on an AVX-512 CPU
// (for tests). torch.ops.qwen.int4_dequantize(packed, scale_zero, group_size, dtype): w itself;
// int4_dequantize_into(packed, scale_zero, group_size, out): w written into out. torch.ops.qwen.int4_product(x,
// packed, scale_zero, group_size): x @ w.T as int4_matmul's arithmetic, as a matrix product (AVX-512 VNNI only).
TORCH_LIBRARY_FRAGMENT(qwen, m) {
  m.def("int4_matmul(Tensor x, Tensor packed, Tensor scale_zero, int group_size, bool avx2=False) -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor scale_zero, int group_size, ScalarType dtype) -> Tensor");
  m.def("int4_dequantize_into(Tensor packed, Tensor scale_zero, int group_size, Tensor(a!) out) -> ()");
  m.def("int4_product(Tensor x, Tensor packed, Tensor scale_zero, int group_size) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen, CPU, m) {
  m.impl("int4_matmul", &int4_matmul);
  m.impl("int4_dequantize", &int4_dequantize);
  m.impl("int4_dequantize_into", &int4_dequantize_into);
  m.impl("int4_product", &int4_product);
}
