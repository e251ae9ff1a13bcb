// bf16 matrix product for a few rows of activations on CPUs with AVX-512 BF16 dot products:
//   out[m, n] = sum_k x[m, k] * w[n, k]   (bf16 inputs, fp32 accumulation, bf16 output)
//
// Built on first use by qwen/cpu_kernels.py (torch.utils.cpp_extension, cached per machine).
// Decoding reads every weight once per token, so its speed is memory bandwidth. PyTorch's bf16
// matrix-vector product on these CPUs reads a few GB/s. Two paths, each reading the weight as it is
// stored (no packed copy):
// * AMX (CPUs with AMX-BF16, e.g. Xeon Sapphire Rapids and later): tiles of 16 weight rows x 32 k are
//   AMX's A operand, loaded straight from the weight; the activations, packed once per call in AMX's
//   pair layout, are the B operand (up to 16 rows). One tile product is 16 x 16 x 32 multiply-adds, so
//   8 or 16 activation rows cost about what 1 does: the weight's read. AVX-512 alone is compute-bound
//   past ~3 rows (a 2-core Xeon: 18 GB/s at 8 rows against 28 at 1), as oneDNN is without AMX.
// * AVX-512 BF16 elsewhere (and for weights whose K is not a multiple of 32, and the last N % 16 rows):
//   each thread streams its weight rows in memory order with a prefetch 4 KiB ahead (as qwen's int8
//   kernel does) and multiplies 32 bf16 pairs per instruction (vdpbf16ps), for up to 8 activation rows
//   per pass over a weight row.
// Either way an output element's arithmetic depends on its weight row and activation row only, never on
// how many rows came with it: a sequence decodes to the same bits alone and in a batch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <optional>
#include <vector>

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

// AMX-BF16 and AMX-TILE in CPUID, and Linux's permission to use the tile registers (asked once per process).
bool amx_available() {
  static const bool available = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return available;
}

constexpr int kTileRows = 16;  // weight rows per A tile; also activation rows per B tile
constexpr int kTileK = 32;     // bf16 values per tile row (64 bytes)
constexpr int kAmxRows = 32;   // activation rows per chunk: two B tiles
constexpr int64_t kAmxPrefetch = 256;  // bf16 values ahead on each weight row streamed

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 2b + p accumulates weight block b (16 rows) times activation part p (16 rows, the second one
// rows[1] <= 16); 4 + p holds part p's activations (16 k-pairs x rows[p] pairs); 6 + b block b's weights.
TileConfig amx_config(const int* rows) {
  TileConfig config;
  for (int p = 0; p < 2; ++p) {
    config.colsb[p] = config.colsb[2 + p] = config.colsb[4 + p] = static_cast<uint16_t>(rows[p] * 4);
  }
  config.colsb[6] = config.colsb[7] = kTileK * 2;
  for (int t = 0; t < 8; ++t) config.rows[t] = config.colsb[t] ? kTileRows : 0;  // a tile of 0 bytes is unused
  return config;
}

// c[p][r * rows[p] + m] = dot(weight row r, row m of part p) for the 16 * BLOCKS weight rows from w. xv[p] is
// part p in AMX's pair layout, xv[p][(k / 2) * 2 rows[p] + 2m + (k % 2)] = x[m, k]: 32 k of a part are one tile.
template <int BLOCKS, int PARTS>
inline void amx_block(const uint16_t* w, int64_t K, const uint16_t* const* xv, const int* rows, float* const* c) {
  _tile_zero(0);
  if constexpr (PARTS == 2) _tile_zero(1);
  if constexpr (BLOCKS == 2) _tile_zero(2);
  if constexpr (BLOCKS == 2 && PARTS == 2) _tile_zero(3);
  for (int64_t k = 0; k < K; k += kTileK) {
    for (int r = 0; r < BLOCKS * kTileRows; ++r) {  // 16 or 32 streams: more than the hardware prefetcher follows
      _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + kAmxPrefetch), _MM_HINT_T0);
    }
    _tile_loadd(4, xv[0] + k * rows[0], rows[0] * 4);
    if constexpr (PARTS == 2) _tile_loadd(5, xv[1] + k * rows[1], rows[1] * 4);
    _tile_loadd(6, w + k, K * 2);
    _tile_dpbf16ps(0, 6, 4);
    if constexpr (PARTS == 2) _tile_dpbf16ps(1, 6, 5);
    if constexpr (BLOCKS == 2) {
      _tile_loadd(7, w + kTileRows * K + k, K * 2);
      _tile_dpbf16ps(2, 7, 4);
      if constexpr (PARTS == 2) _tile_dpbf16ps(3, 7, 5);
    }
  }
  _tile_stored(0, c[0], rows[0] * 4);
  if constexpr (PARTS == 2) _tile_stored(1, c[1], rows[1] * 4);
  if constexpr (BLOCKS == 2) _tile_stored(2, c[0] + kTileRows * rows[0], rows[0] * 4);
  if constexpr (BLOCKS == 2 && PARTS == 2) _tile_stored(3, c[1] + kTileRows * rows[1], rows[1] * 4);
}

// op[m * N + n] (+ bias) for n < N rounded down to 16, through AMX. The activations go in chunks of 32 rows (two
// parts of 16; more than 32 rows are padded with zero rows to whole chunks); each thread takes 32 weight rows at a
// time through every chunk, so a weight is read from memory once (then from cache) however many rows there are.
void amx_matmul(const uint16_t* xp, int64_t M, const uint16_t* wp, int64_t K, int64_t N, const float* bp, float* op) {
  const int64_t chunks = (M + kAmxRows - 1) / kAmxRows;
  const int first = static_cast<int>(std::min<int64_t>(M, kTileRows));
  const int rows[2] = {chunks > 1 ? kTileRows : first, chunks > 1 ? kTileRows : static_cast<int>(M) - first};
  const int64_t chunk_size = K * (rows[0] + rows[1]);
  std::vector<uint16_t> packed(chunks * chunk_size, 0);
  for (int64_t j = 0; j < chunks; ++j) {
    for (int p = 0; p < 2; ++p) {
      uint16_t* part = packed.data() + j * chunk_size + p * K * rows[0];
      for (int m = 0; m < rows[p] && j * kAmxRows + p * kTileRows + m < M; ++m) {
        const uint16_t* row = xp + (j * kAmxRows + p * kTileRows + m) * K;
        for (int64_t k = 0; k < K; ++k) part[(k / 2) * 2 * rows[p] + 2 * m + (k % 2)] = row[k];
      }
    }
  }
  at::parallel_for(0, N / kTileRows, 2, [&](int64_t b0, int64_t b1) {
    const TileConfig config = amx_config(rows);
    _tile_loadconfig(&config);
    float c0[2 * kTileRows * kTileRows], c1[2 * kTileRows * kTileRows];
    float* c[2] = {c0, c1};
    for (int64_t b = b0; b < b1;) {
      const int blocks = b + 1 < b1 ? 2 : 1;
      const uint16_t* w = wp + b * kTileRows * K;
      const int64_t n0 = b * kTileRows;
      for (int64_t j = 0; j < chunks; ++j) {
        const uint16_t* xv[2] = {packed.data() + j * chunk_size, packed.data() + j * chunk_size + K * rows[0]};
        if (blocks == 2 && rows[1] > 0) amx_block<2, 2>(w, K, xv, rows, c);
        if (blocks == 2 && rows[1] == 0) amx_block<2, 1>(w, K, xv, rows, c);
        if (blocks == 1 && rows[1] > 0) amx_block<1, 2>(w, K, xv, rows, c);
        if (blocks == 1 && rows[1] == 0) amx_block<1, 1>(w, K, xv, rows, c);
        for (int p = 0; p < 2; ++p) {
          for (int m = 0; m < rows[p] && j * kAmxRows + p * kTileRows + m < M; ++m) {
            float* out = op + (j * kAmxRows + p * kTileRows + m) * N + n0;
            for (int r = 0; r < blocks * kTileRows; ++r) out[r] = c[p][r * rows[p] + m] + (bp ? bp[n0 + r] : 0.0f);
          }
        }
      }
      b += blocks;
    }
    _tile_release();
  });
}

at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, bool amx) {
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
  // AMX for whole 16-row blocks of the weight; AVX-512 for the rest.
  int64_t first = 0;
  if (amx && K % kTileK == 0 && N >= kTileRows && amx_available()) {
    amx_matmul(xp, M, wp, K, N, bp, op);
    first = N / kTileRows * kTileRows;
  }
  at::parallel_for(first, N, 16, [&](int64_t n0, int64_t n1) {
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

// torch.ops.qwen.bf16_matmul(x, w, bias=None, amx=True): x @ w.T (+ bias) for bf16 x [M, K] and w [N, K],
// accumulated in fp32 and rounded to bf16 once; amx=False keeps to AVX-512 (to compare the two).
TORCH_LIBRARY_FRAGMENT(qwen, m) {
  m.def("bf16_matmul(Tensor x, Tensor w, Tensor? bias=None, bool amx=True) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen, CPU, m) { m.impl("bf16_matmul", &bf16_matmul); }
