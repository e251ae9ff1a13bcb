// Weight-only matrix product for a few rows of activations on CPUs with AVX-512, for weights in blocks of 32
// input channels with one bf16 scale each: int8 (--int8, llama.cpp's Q8_0 precision) or 4-bit (--int4, Q4_0's):
//   out[m, n] = sum_b s[n, b] * sum_(k in block b) x[m, k] * w[n, k]
// with w = q (8 bits, -127..127) or w = q - 8 (4 bits, q 0..15).
//
// Built on first use by qwen/cpu_kernels.py (torch.utils.cpp_extension, cached per machine).
// Decoding reads every weight once per token, so speed is memory bandwidth: 34 bytes per 32 int8 weights,
// 18 per 32 4-bit ones, as Q8_0 and Q4_0. Each thread walks its weight rows in memory order (one sequential
// stream the hardware prefetcher follows) and prefetches 4 KiB ahead; each weight row is used for up to 8
// activation rows per pass.
//
// Layout. A row's blocks go in groups of 16 (512 channels; the row's last group may hold fewer, G). Within a
// group, channel 32 l + 4 j + t (block l, j < 8, t < 4) belongs to "vector" j, lane l, byte t: 8 vectors of
// 64 bytes whose 32-bit lane l holds 4 channels of block l. One vpdpbusd per vector then adds 4 products into
// each block's own lane, and after the group's 8 vectors each lane holds its block's whole sum: the scales
// apply once per 16 blocks, not once per 64 bytes. int8: vector j is stored at byte 4 G j of the group.
// 4 bits: vectors j and j + 4 share the 4 G bytes at 4 G j (j < 4), j in the low nibbles, j + 4 in the high
// ones. qwen/quantization/layers.py packs and unpacks it (pack_blocks); rows are padded with zeros to whole
// blocks.
//
// Two paths:
// * integer (AVX-512 VNNI), the default where the CPU has it: each activation row is quantized to int8 in
//   the same blocks of 32 (a = max|x| / 127, q = round(x / a); a zero block has a = 0), and each block's
//   integer sum is added to an fp32 accumulator times s * a. Each x is then off by at most a / 2 of its
//   block: the arithmetic of llama.cpp's Q8_0 x Q8_0 and Q4_0 x Q8_0 dot products, at the same precision.
// * float: the weights are widened to fp32, times their blocks' scales, and multiplied with the activations
//   in fp32: exact up to fp32 rounding. It serves CPUs without VNNI, and every CPU with QWEN_INT8_VNNI=0 in
//   the environment (read on each call), e.g. to compare the paths.
// From 24 rows the integer path multiplies as a matrix product (see "integer matrix product" below), to the same
// bits. A prompt takes that product on CPUs whose PyTorch matmul has no AMX (qwen/quantization/layers.py,
// integer_prompts); elsewhere block_dequantize gives PyTorch's matmul the float weight.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

// The integer path's functions; the file itself is built for AVX-512F only, which every CPU that runs
// this kernel has, and the integer path runs only where the CPU reports VNNI (and BW, VL with it).
#define QWEN_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace {

constexpr int kMaxRows = 8;        // activation rows per pass over a weight row
constexpr int64_t kBlock = 32;     // input channels per weight scale and per activation scale
constexpr int64_t kGroup = 16;     // blocks per group: one 32-bit lane each
constexpr int64_t kGroupChannels = kBlock * kGroup;
constexpr int64_t kPartGroups = 6;  // the integer path sums a row's groups in parts of this many (out_columns_vnni)

// One weight row: its packed bytes, its bf16 scales, its length in blocks and its bits per weight (8 or 4).
struct Row {
  const uint8_t* w;
  const uint16_t* s;
  int64_t blocks;
  int bits;
  int64_t bytes;   // the row's weight bytes
  int64_t ahead;   // how far prefetches reach: at least 4 KiB, in whole rows (see prefetch_ahead)
  Row(const uint8_t* w, const uint16_t* s, int64_t blocks, int bits)
      : w(w), s(s), blocks(blocks), bits(bits), bytes(blocks * kBlock * bits / 8),
        ahead((4096 + bytes - 1) / bytes * bytes) {}
  Row at(int64_t n) const { return Row(*this, n); }  // row n of the same weight (this is row 0)
  int64_t group_blocks(int64_t g) const { return std::min(kGroup, blocks - g * kGroup); }
  // Where group g's stored vector k starts (k < 8 for int8, k < 4 for 4 bits: 4 bytes per block of the group).
  const uint8_t* stored(int64_t g, int k) const { return w + g * kGroupChannels * bits / 8 + k * 4 * group_blocks(g); }
  int stored_vectors() const { return bits == 8 ? 8 : 4; }

 private:
  Row(const Row& first, int64_t n) : Row(first) {
    w += n * bytes;
    s += n * blocks;
  }
};

// Lanes [0, n) of 16.
inline __mmask16 lanes(int64_t n) { return n >= 16 ? 0xFFFF : n > 0 ? static_cast<__mmask16>((1u << n) - 1) : 0; }

// Group g's 16 weight scales as fp32 (0 past the row's blocks).
inline __m512 group_scales(const Row& row, int64_t g) {
  const uint16_t* s = row.s + g * kGroup;
  const int64_t n = row.group_blocks(g);
  if (n == kGroup) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  alignas(64) uint32_t wide[16] = {};  // a short last group: nothing past the row is read
  for (int64_t l = 0; l < n; ++l) wide[l] = static_cast<uint32_t>(s[l]) << 16;
  return _mm512_castsi512_ps(_mm512_load_si512(wide));
}

// Prefetches group g of a row at least 4 KiB ahead, whole rows ahead: the same group of a later row, which is
// where this thread reads next even when it sweeps its rows a part at a time (out_columns_vnni).
// (One prefetch per 64 bytes of a whole group, computed cheaply: computing each stored vector's address
// for it made the 4-bit batch-1 loop 1.3x slower.)
inline void prefetch_ahead(const Row& row, int64_t g) {
  const uint8_t* next = row.stored(g, 0) + row.ahead;
  for (int64_t k = 0; k < kGroupChannels * row.bits / 8; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(next + k), _MM_HINT_T0);
  }
}

// The sum of v's 16 lanes in a fixed order: halves (lane i + lane i + 8), then quarters, then pairs. The integer
// matrix product adds its 16 per-lane partial sums in the same order (sum_vectors), so that a row's output is the
// same to the bit on either (no compiler's reduction order is relied on).
inline float sum_lanes(__m512 v) {
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(v),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  const __m128 pairs = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));  // lanes 0 + 2, 1 + 3
  return _mm_cvtss_f32(pairs) + _mm_cvtss_f32(_mm_shuffle_ps(pairs, pairs, 1));
}

// ----- float path and dequantizing (AVX-512F) -----------------------------------------------------------

// Group g's 8 vectors of stored values (int8 bytes, or 4-bit nibbles 0..15), 64 bytes each, zero past a short
// group. AVX-512F has neither byte-masked loads nor byte shifts: the bytes are copied, and nibbles split in
// 32-bit lanes.
inline void group_values(const Row& row, int64_t g, uint8_t (*out)[64]) {
  const int64_t length = 4 * row.group_blocks(g);
  for (int k = 0; k < row.stored_vectors(); ++k) {
    alignas(64) uint8_t bytes[64] = {};
    std::memcpy(bytes, row.stored(g, k), length);
    if (row.bits == 8) {
      std::memcpy(out[k], bytes, 64);
    } else {
      const __m512i v = _mm512_load_si512(bytes), low = _mm512_set1_epi8(0x0F);
      _mm512_store_si512(out[k], _mm512_and_si512(v, low));
      _mm512_store_si512(out[k + 4], _mm512_and_si512(_mm512_srli_epi32(v, 4), low));
    }
  }
}

// 16 weights (4 channels of 4 blocks, from 16 stored values) as fp32, unscaled.
inline __m512 widen(const Row& row, const uint8_t* values) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values));
  return _mm512_cvtepi32_ps(row.bits == 8 ? _mm512_cvtepi8_epi32(b)
                                          : _mm512_sub_epi32(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(8)));
}

// Calls use(g, j, i, weights) for every 16 weights of the row, times their scales in fp32: quarter i (blocks
// 4i ... 4i + 3, 4 channels each) of vector j of group g. The float path and the dequantizing both walk this.
template <typename Use>
inline void each_scaled_quarter(const Row& row, Use&& use) {
  const __m512i index = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const int64_t groups = (row.blocks + kGroup - 1) / kGroup;
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_ahead(row, g);
    alignas(64) uint8_t values[8][64];
    group_values(row, g, values);
    const __m512 ws = group_scales(row, g);
    __m512 scale[4];  // quarter i's blocks' scales, lane by lane
    for (int i = 0; i < 4; ++i) scale[i] = _mm512_permutexvar_ps(_mm512_add_epi32(index, _mm512_set1_epi32(4 * i)), ws);
    for (int j = 0; j < 8; ++j) {
      for (int i = 0; 4 * i < row.group_blocks(g); ++i) {
        use(g, j, i, _mm512_mul_ps(widen(row, values[j] + 16 * i), scale[i]));
      }
    }
  }
}

// Activation rows in the packed order, fp32, zero where a group is short: x [M, groups * 512].
// out[m * ldo] = dot(x row m, w * scales) for m < ROWS.
template <int ROWS>
inline void dot_rows(const float* x, int64_t ldx, const Row& row, float* out, int64_t ldo) {
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  each_scaled_quarter(row, [&](int64_t g, int j, int i, __m512 wf) {
    const float* xj = x + g * kGroupChannels + 64 * j + 16 * i;
    for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xj + m * ldx), wf, acc[m]);
  });
  for (int m = 0; m < ROWS; ++m) out[m * ldo] = sum_lanes(acc[m]);
}

template <int ROWS = kMaxRows>
inline void dot_all_rows(const float* x, int64_t ldx, int64_t M, const Row& row, float* out, int64_t ldo) {
  if constexpr (ROWS > 0) {
    for (; M >= ROWS; M -= ROWS, x += ROWS * ldx, out += ROWS * ldo) dot_rows<ROWS>(x, ldx, row, out, ldo);
    dot_all_rows<ROWS - 1>(x, ldx, M, row, out, ldo);
  }
}

// The bf16 bits of 16 fp32 values, rounded to nearest even (the weights' products are finite).
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// One weight row times its scales into out[0 : blocks * 32] (float, or bf16 bits as uint16_t), in the packed
// channel order of an int8 row: vector j of group g at g * 512 + 4 G j.
template <typename T>
void dequantize_row(const Row& row, T* out) {
  each_scaled_quarter(row, [&](int64_t g, int j, int i, __m512 wf) {
    const int64_t n = row.group_blocks(g);
    alignas(64) T part[16];
    if constexpr (std::is_same_v<T, float>) {
      _mm512_store_ps(part, wf);
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(part), to_bf16(wf));
    }
    const int64_t count = std::min<int64_t>(16, 4 * n - 16 * i);  // a short group's last quarter
    std::memcpy(out + g * kGroupChannels + 4 * n * j + 16 * i, part, count * sizeof(T));
  });
}

// ----- integer path (AVX-512 VNNI) ---------------------------------------------------------------------

// Activation rows quantized per block (x[m, k] ~ a[m, b] * q[m, k] for k in block b), in the packed order and
// group by group, so that one group of a pass's rows lies at fixed offsets; zero where a group is short.
struct Quantized {
  const int8_t* q;        // [groups, M, 512]
  const float* a;         // [groups, M, 16]: lane l = block l's scale
  const int32_t* start;   // [groups, M, 16]: lane l = -zero * (block l's sum of q), see dot_rows_vnni
  int64_t M;
};

// Quantizes row x[0 : K] into group g's q[g * ldq ...], a[g * lda ...] and start[g * lda ...]:
// q = round-half-even(x * (127 / max|x|)), as vcvtps2dq rounds.
QWEN_VNNI void quantize_row(const float* x, int64_t K, int zero, int8_t* q, int64_t ldq, float* a, int32_t* start,
                            int64_t lda) {
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t left = K - b * kBlock, g = b / kGroup, l = b % kGroup;
    const __m512 v0 = _mm512_maskz_loadu_ps(lanes(left), x + b * kBlock);
    const __m512 v1 = _mm512_maskz_loadu_ps(lanes(left - 16), x + b * kBlock + 16);
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    // x * 0 is NaN for an inf or NaN x: a non-finite activation makes its block's scale NaN, so the outputs
    // it feeds are NaN, never finite; a zero block (or one too small for 127 / max) is all 0.
    const __m512 none = _mm512_setzero_ps();
    const float scale = top / 127 + _mm512_reduce_add_ps(_mm512_fmadd_ps(v0, none, _mm512_mul_ps(v1, none)));
    const __m512 inv = _mm512_set1_ps(std::isfinite(127 / top) ? 127 / top : 0);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    alignas(16) int32_t words[8];  // 4 channels each: word j goes to vector j's lane l
    _mm_store_si128(reinterpret_cast<__m128i*>(words), _mm512_cvtepi32_epi8(q0));
    _mm_store_si128(reinterpret_cast<__m128i*>(words + 4), _mm512_cvtepi32_epi8(q1));
    int8_t* qg = q + g * ldq;
    for (int j = 0; j < 8; ++j) std::memcpy(qg + 64 * j + 4 * l, &words[j], 4);
    a[g * lda + l] = scale;
    start[g * lda + l] = -zero * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

// Group g's 8 vectors as vpdpbusd's unsigned operand: int8 weights + 128 (the sign bit flipped), 4-bit ones as
// stored (0..15). A short group's are masked loads, so nothing past the row is read (the last row ends the
// tensor): what lies past it meets q = 0. BITS is a template parameter so that the loops unroll into registers.
template <int BITS>
QWEN_VNNI inline void unsigned_vectors(const Row& row, int64_t g, __m512i (&wu)[8]) {
  constexpr int kStored = BITS == 8 ? 8 : 4;
  const int64_t length = 4 * row.group_blocks(g);
  const uint8_t* base = row.stored(g, 0);
  __m512i v[kStored];
  if (length == 64) {
    for (int k = 0; k < kStored; ++k) v[k] = _mm512_loadu_si512(base + 64 * k);
  } else {
    const __mmask64 mask = (1ull << length) - 1;
    for (int k = 0; k < kStored; ++k) v[k] = _mm512_maskz_loadu_epi8(mask, base + length * k);
  }
  if constexpr (BITS == 8) {
    for (int j = 0; j < 8; ++j) wu[j] = _mm512_xor_si512(v[j], _mm512_set1_epi8(-128));
  } else {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {
      wu[j] = _mm512_and_si512(v[j], low);
      wu[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v[j], 4), low);
    }
  }
}

// Groups [g0, g1) of out[m * ldo] = dot(x row m0 + m, w * scales) for m < ROWS, on the quantized rows, stored
// (the first groups of a row) or added. vpdpbusd multiplies unsigned bytes by signed ones, so the weights go
// in as w + zero (128 or 8) and q as is: each block's sum then holds zero * sum q too, which the
// accumulator's start takes off.
template <int BITS, int ROWS>
QWEN_VNNI inline void dot_rows_vnni(const Quantized& x, int64_t m0, const Row& row, int64_t g0, int64_t g1,
                                    float* out, int64_t ldo) {
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = g0; g < g1; ++g) {
    prefetch_ahead(row, g);
    __m512i wu[8];
    unsigned_vectors<BITS>(row, g, wu);
    const __m512 ws = group_scales(row, g);
    const int64_t at = g * x.M + m0;
    for (int m = 0; m < ROWS; ++m) {
      const int8_t* q = x.q + (at + m) * kGroupChannels;
      // Two chains of 4 dot products, not one of 8: each waits for the one before it.
      __m512i d0 = _mm512_loadu_si512(x.start + (at + m) * 16), d1 = _mm512_setzero_si512();
      for (int j = 0; j < 8; j += 2) {
        d0 = _mm512_dpbusd_epi32(d0, wu[j], _mm512_loadu_si512(q + 64 * j));
        d1 = _mm512_dpbusd_epi32(d1, wu[j + 1], _mm512_loadu_si512(q + 64 * j + 64));
      }
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1));
      acc[m] = _mm512_fmadd_ps(sum, _mm512_mul_ps(ws, _mm512_loadu_ps(x.a + (at + m) * 16)), acc[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) out[m * ldo] = (g0 == 0 ? 0.f : out[m * ldo]) + sum_lanes(acc[m]);
}

template <int BITS, int ROWS = kMaxRows>
QWEN_VNNI inline void dot_all_rows_vnni(const Quantized& x, int64_t m0, const Row& row, int64_t g0, int64_t g1,
                                        float* out, int64_t ldo) {
  if constexpr (ROWS > 0) {
    for (; x.M - m0 >= ROWS; m0 += ROWS) dot_rows_vnni<BITS, ROWS>(x, m0, row, g0, g1, out + m0 * ldo, ldo);
    dot_all_rows_vnni<BITS, ROWS - 1>(x, m0, row, g0, g1, out, ldo);
  }
}

// Weight rows [n0, n1) against every quantized row (a function of its own: lambdas do not take the target).
// Every weight row re-reads all the quantized rows, which is fast while they stay in the L1 cache (48 KiB on
// these Xeons): 8 rows of 5504 channels are 56 KiB, and were 1.3x slower per weight byte than 8 rows of
// 2048. So the rows are swept kPartGroups groups at a time (8 rows of them: 30 KiB). The parts are fixed by
// the width alone, never by the number of rows: a row's sums then add up in the same order whoever else is
// in the batch, and its output is the same to the bit.
template <int BITS>
QWEN_VNNI void out_columns_vnni(const Quantized& x, const Row& first, int64_t N, int64_t n0, int64_t n1, float* out) {
  const int64_t groups = (first.blocks + kGroup - 1) / kGroup;
  for (int64_t g0 = 0; g0 < groups; g0 += kPartGroups) {
    for (int64_t n = n0; n < n1; ++n) {
      dot_all_rows_vnni<BITS>(x, 0, first.at(n), g0, std::min(groups, g0 + kPartGroups), out + n, N);
    }
  }
}

// ----- integer matrix product (AVX-512 VNNI): many rows ------------------------------------------------
//
// The path above reads each weight row once per 8 activation rows and adds a block's products in the block's
// own lane: fine while weights stream from memory, but a prompt's hundreds of rows make it compute-bound. Here
// lanes are output channels instead, as in a GEMM: a thread copies 32 weight rows (a "panel") into vpdpbusd's
// order once, lane i holding output n0 + i's 4 channels of a block, and multiplies the panel with every activation
// row, 4 rows at a time; each vpdpbusd broadcasts 4 bytes of an activation row. The arithmetic is the path above's,
// in its order: the same integer sum per block, times the same product of scales, added per lane l (blocks l,
// l + 16, ...) over a part's groups, then the 16 lanes summed as sum_lanes does and the parts added in turn. So
// a row's output is the same to the bit on both paths, whatever the number of rows.

constexpr int kPanelVectors = 2;                    // 16 outputs each
constexpr int64_t kPanel = 16 * kPanelVectors;      // outputs per panel
constexpr int kTileRows = 4;                        // activation rows per pass over a panel
// block_matmul takes the product from this many rows: below, copying the panels costs more than it saves (2-core
// Intel Xeon, an 11008 x 2048 int8 layer: 2.8 against 2.2 ms at 16 rows, 3.4 against 3.5 at 24, 4.1 against 4.7
// at 32; 33 against 145 ms at 512 rows, where oneDNN's bf16 matmul without AMX takes 136).
constexpr int64_t kProductRows = 24;

// Output rows [n0, n0 + 32) of a weight as vpdpbusd's unsigned operand (int8 + 128, 4-bit as stored), lanes =
// outputs: vector (l, g, j, v) holds channels 4j ... 4j + 3 of block 16 g + l for outputs n0 + 16 v + i, and
// scale (l, g, v) their blocks' scales in fp32. Outputs past N are zero.
struct Panel {
  int64_t groups = 0;
  std::vector<__m512i> w;  // [16 l][groups g][8 j][kPanelVectors v]
  std::vector<__m512> s;   // [16 l][groups g][kPanelVectors v]
  const __m512i* vectors(int64_t l, int64_t g) const { return w.data() + (l * groups + g) * 8 * kPanelVectors; }
  const __m512* scales(int64_t l, int64_t g) const { return s.data() + (l * groups + g) * kPanelVectors; }
};

template <int BITS>
QWEN_VNNI void fill_panel(const Row& first, int64_t N, int64_t n0, Panel& p) {
  const int64_t groups = (first.blocks + kGroup - 1) / kGroup;
  p.groups = groups;
  p.w.assign(16 * groups * 8 * kPanelVectors, _mm512_setzero_si512());
  p.s.assign(16 * groups * kPanelVectors, _mm512_setzero_ps());
  const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(static_cast<int32_t>(first.bytes)));
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int v = 0; v < kPanelVectors; ++v) {
    const int64_t n = n0 + 16 * v, valid = std::min<int64_t>(16, N - n);
    if (valid <= 0) break;
    const __mmask16 mask = lanes(valid);
    const Row row = first.at(n);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t l = 0; l < row.group_blocks(g); ++l) {
        __m512i* out = p.w.data() + (l * groups + g) * 8 * kPanelVectors + v;
        for (int k = 0; k < row.stored_vectors(); ++k) {
          const __m512i d = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, offsets, row.stored(g, k) + 4 * l, 1);
          if constexpr (BITS == 8) {
            out[k * kPanelVectors] = _mm512_xor_si512(d, _mm512_set1_epi8(-128));
          } else {
            out[k * kPanelVectors] = _mm512_and_si512(d, low);
            out[(k + 4) * kPanelVectors] = _mm512_and_si512(_mm512_srli_epi16(d, 4), low);
          }
        }
        alignas(64) uint32_t wide[16] = {};
        for (int64_t i = 0; i < valid; ++i) wide[i] = static_cast<uint32_t>(row.at(i).s[16 * g + l]) << 16;
        p.s[(l * groups + g) * kPanelVectors + v] = _mm512_castsi512_ps(_mm512_load_si512(wide));
      }
    }
  }
}

// The sum of 16 vectors v[l] lane by lane, in sum_lanes's order over l.
inline __m512 sum_vectors(const __m512* v) {
  __m512 half[8], quarter[4];
  for (int i = 0; i < 8; ++i) half[i] = _mm512_add_ps(v[i], v[i + 8]);
  for (int i = 0; i < 4; ++i) quarter[i] = _mm512_add_ps(half[i], half[i + 4]);
  return _mm512_add_ps(_mm512_add_ps(quarter[0], quarter[2]), _mm512_add_ps(quarter[1], quarter[3]));
}

// out[m, n0 : n0 + 32] for activation rows m0 ... m0 + ROWS - 1 (ldo floats per output row; outputs past N
// are not written).
template <int ROWS>
QWEN_VNNI void panel_rows(const Quantized& x, int64_t m0, const Panel& p, int64_t blocks, int64_t valid,
                          float* out, int64_t ldo) {
  __m512 total[ROWS][kPanelVectors];
  alignas(64) __m512 lane_sums[ROWS][kPanelVectors][16];
  for (int64_t g0 = 0; g0 < p.groups; g0 += kPartGroups) {
    const int64_t g1 = std::min(p.groups, g0 + kPartGroups);
    for (int64_t l = 0; l < 16; ++l) {
      __m512 acc[ROWS][kPanelVectors];
      for (int m = 0; m < ROWS; ++m)
        for (int v = 0; v < kPanelVectors; ++v) acc[m][v] = _mm512_setzero_ps();
      for (int64_t g = g0; g < g1 && 16 * g + l < blocks; ++g) {
        const int64_t at = g * x.M + m0;
        const __m512i* w = p.vectors(l, g);
        __m512i d[ROWS][kPanelVectors];
        for (int m = 0; m < ROWS; ++m)
          for (int v = 0; v < kPanelVectors; ++v) d[m][v] = _mm512_set1_epi32(x.start[(at + m) * 16 + l]);
        for (int j = 0; j < 8; ++j) {
          for (int m = 0; m < ROWS; ++m) {
            int32_t word;
            std::memcpy(&word, x.q + (at + m) * kGroupChannels + 64 * j + 4 * l, 4);
            const __m512i q = _mm512_set1_epi32(word);
            for (int v = 0; v < kPanelVectors; ++v) d[m][v] = _mm512_dpbusd_epi32(d[m][v], w[j * kPanelVectors + v], q);
          }
        }
        const __m512* ws = p.scales(l, g);
        for (int m = 0; m < ROWS; ++m) {
          const __m512 a = _mm512_set1_ps(x.a[(at + m) * 16 + l]);
          for (int v = 0; v < kPanelVectors; ++v)
            acc[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[m][v]), _mm512_mul_ps(ws[v], a), acc[m][v]);
        }
      }
      for (int m = 0; m < ROWS; ++m)
        for (int v = 0; v < kPanelVectors; ++v) lane_sums[m][v][l] = acc[m][v];
    }
    for (int m = 0; m < ROWS; ++m) {
      for (int v = 0; v < kPanelVectors; ++v) {
        const __m512 part = sum_vectors(lane_sums[m][v]);
        total[m][v] = g0 == 0 ? _mm512_add_ps(_mm512_setzero_ps(), part) : _mm512_add_ps(total[m][v], part);
      }
    }
  }
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < kPanelVectors; ++v)
      _mm512_mask_storeu_ps(out + (m0 + m) * ldo + 16 * v, lanes(valid - 16 * v), total[m][v]);
}

template <int ROWS = kTileRows>
QWEN_VNNI void panel_all_rows(const Quantized& x, int64_t m0, const Panel& p, int64_t blocks, int64_t valid,
                              float* out, int64_t ldo) {
  if constexpr (ROWS > 0) {
    for (; x.M - m0 >= ROWS; m0 += ROWS) panel_rows<ROWS>(x, m0, p, blocks, valid, out, ldo);
    panel_all_rows<ROWS - 1>(x, m0, p, blocks, valid, out, ldo);
  }
}

// Panels [p0, p1) of the product into out [M, N].
template <int BITS>
QWEN_VNNI void product_panels(const Quantized& x, const Row& first, int64_t N, int64_t p0, int64_t p1, float* out) {
  Panel panel;
  for (int64_t i = p0; i < p1; ++i) {
    fill_panel<BITS>(first, N, i * kPanel, panel);
    panel_all_rows(x, 0, panel, first.blocks, std::min(kPanel, N - i * kPanel), out + i * kPanel, N);
  }
}

// Whether the integer path runs: a CPU with VNNI, and QWEN_INT8_VNNI not "0".
bool use_vnni() {
  static const bool vnni = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512vnni");
  const char* env = std::getenv("QWEN_INT8_VNNI");
  return vnni && !(env && std::strcmp(env, "0") == 0);
}

// ----- the ops -----------------------------------------------------------------------------------------

// Row 0 of w [N, bytes] with scales [N, blocks]: int8 w of 32 bytes per block, or uint8 w of 16 (4 bits).
Row first_row(const at::Tensor& w, const at::Tensor& scales, const char* op) {
  TORCH_CHECK(w.dim() == 2 && scales.dim() == 2 && w.size(0) == scales.size(0), op,
              ": w [N, bytes] and scales [N, blocks]");
  TORCH_CHECK(w.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kBFloat16, op,
              ": w must be contiguous, scales contiguous bf16");
  const int64_t blocks = scales.size(1);
  const bool int8 = w.scalar_type() == at::kChar, int4 = w.scalar_type() == at::kByte;
  TORCH_CHECK((int8 && w.size(1) == 32 * blocks) || (int4 && w.size(1) == 16 * blocks), op,
              ": w must be int8 [N, 32 * blocks] or uint8 [N, 16 * blocks] (4 bits); shapes do not match");
  return Row(reinterpret_cast<const uint8_t*>(w.data_ptr()), reinterpret_cast<const uint16_t*>(scales.data_ptr()),
             blocks, int8 ? 8 : 4);
}

at::Tensor block_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2, "block_matmul: x [M, K]");
  const Row first = first_row(w, scales, "block_matmul");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), blocks = first.blocks;
  TORCH_CHECK((K + kBlock - 1) / kBlock == blocks,
              "block_matmul: shapes do not match (scales must be [N, ceil(K / 32)])");
  const int64_t groups = (blocks + kGroup - 1) / kGroup;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (use_vnni()) {
    at::Tensor q = at::zeros({groups, M, kGroupChannels}, xf.options().dtype(at::kChar));
    at::Tensor a = at::zeros({groups, M, kGroup}, xf.options());
    at::Tensor start = at::zeros({groups, M, kGroup}, xf.options().dtype(at::kInt));
    const int zero = first.bits == 8 ? 128 : 8;
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        quantize_row(xp + m * K, K, zero, q.data_ptr<int8_t>() + m * kGroupChannels, M * kGroupChannels,
                     a.data_ptr<float>() + m * kGroup, start.data_ptr<int32_t>() + m * kGroup, M * kGroup);
      }
    });
    const Quantized xq{q.data_ptr<int8_t>(), a.data_ptr<float>(), start.data_ptr<int32_t>(), M};
    if (M >= kProductRows) {
      at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t p0, int64_t p1) {
        if (first.bits == 8) {
          product_panels<8>(xq, first, N, p0, p1, op);
        } else {
          product_panels<4>(xq, first, N, p0, p1, op);
        }
      });
    } else {
      at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        if (first.bits == 8) {
          out_columns_vnni<8>(xq, first, N, n0, n1, op);
        } else {
          out_columns_vnni<4>(xq, first, N, n0, n1, op);
        }
      });
    }
  } else {
    // The activations in the packed order: channel 32 l + 4 j + t of group g at g * 512 + 64 j + 4 l + t.
    at::Tensor packed = at::zeros({M, groups * kGroupChannels}, xf.options());
    float* pp = packed.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / kGroupChannels, l = k % kGroupChannels / kBlock, j = k % kBlock / 4, t = k % 4;
        pp[m * groups * kGroupChannels + g * kGroupChannels + 64 * j + 4 * l + t] = xp[m * K + k];
      }
    }
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        dot_all_rows(pp, groups * kGroupChannels, M, first.at(n), op + n, N);
      }
    });
  }
  return out.to(x.scalar_type());
}

at::Tensor block_dequantize(const at::Tensor& w, const at::Tensor& scales, at::ScalarType dtype) {
  const Row first = first_row(w, scales, "block_dequantize");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "block_dequantize: float32 or bfloat16 only");
  const int64_t N = w.size(0), width = first.blocks * kBlock;
  at::Tensor out = at::empty({N, width}, w.options().dtype(dtype));
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const Row row = first.at(n);
      if (dtype == at::kFloat) {
        dequantize_row(row, out.data_ptr<float>() + n * width);
      } else {
        dequantize_row(row, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + n * width);
      }
    }
  });
  return out;
}

}  // namespace

// torch.ops.qwen.block_matmul(x, w, scales): out = x @ (w * scales per block of 32 input channels).T, for w in
// the packed layout above (int8, or uint8 holding 4-bit values) and bf16 scales [N, ceil(K / 32)], computed in
// fp32. torch.ops.qwen.block_dequantize(w, scales, dtype): the float weight [N, 32 * blocks] in the packed
// channel order, for a prompt's matmul against activations put in that order. CPU kernels only: torch.compile
// traces them through the shape functions qwen/cpu_kernels.py registers.
TORCH_LIBRARY(qwen, m) {
  m.def("block_matmul(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("block_dequantize(Tensor w, Tensor scales, ScalarType dtype) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen, CPU, m) {
  m.impl("block_matmul", &block_matmul);
  m.impl("block_dequantize", &block_dequantize);
}
