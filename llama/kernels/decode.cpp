// Kernels for decoding on x86-64 CPUs with AVX2 and FMA. Matrix products of a few rows of activations
// (M <= 16: batch-1 or small-batch decode steps, speculative verify passes) times a weight
// that is streamed from memory once per call.
//
//   out (M, N) fp32 = x (M, K) fp32 @ W (N, K)ᵀ, with W held as
//     linear_f32:  fp32 (N, K)
//     linear_int8: int8 (N, K) and a bf16 scale per row and group of `group_size` columns (llama.cpp's
//                  Q8_0 at 32; K: one per row):                  W[n, k] = q[n, k] * scale[n, k / group_size]
//     linear_int4: 4-bit codes in blocks of 32 columns (N, K/2) and bf16 (scale, zero) per row and
//                  group of `group_size` columns:                W[n, k] = (q[n, k] - 8) * scale + zero
//                  byte j of a row's block b holds q[32b + j] (low nibble) and q[32b + 16 + j] (high),
//                  so unpacking needs no shuffles (one 32-byte load: two blocks); the scales and zeros
//                  of each tile of 4 rows interleaved, (ceil(N/4), K/group_size, 2, 4).
//
// MKL's fp32 matrix-vector and small matrix products reach 4-8 GB/s of weights on these machines;
// a decode step is bound by how fast its weights stream from memory (13-18 GB/s here). Each call
// walks W in tiles of ROWS rows, split across torch's threads, and multiplies each tile with every
// row of x while it is in L1 (int4 tiles are unpacked once for several rows).
//
// Every output element is one fp32 accumulator of 8 lanes over k in order, summed across lanes at
// the end, whatever M, N or the tiling: the result for one row of x does not depend on which other
// rows are in the call, so a verify pass of k tokens gives the logits of k single-token steps.
//
// And decode_attention: one new position per row against the KV cache; decode_block: a whole transformer
// block for a few new positions per row (at the end of this file).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

constexpr int64_t ROWS = 4;   // weight rows per tile
constexpr int64_t LANES = 8;  // fp32 lanes of a 256-bit register
constexpr int64_t BLOCK = 32; // int4 columns per 16-byte block
// int4 products of up to PACKED_ROWS rows of x read each tile's packed codes once per row (from L1
// after the first); more rows unpack the tile once into a buffer and read that. Measured on SmolLM2's
// w13 (AMD EPYC Zen 5, 2 threads, weights from memory): 2 rows 48 against 57-68 us, 5 rows 97-102
// against 104-168, 8 rows level, 16 rows 290-312 against 331-371.
constexpr int64_t PACKED_ROWS = 8;
// A tile reads ROWS short streams (a row of 576 int8 weights is 9 cache lines), too short for the
// hardware prefetcher to run ahead of: each load also asks for the same bytes TILES_AHEAD tiles on
// (measured on SmolLM2's shapes, AMD EPYC: fp32 11.6 GB/s without, 18 GB/s at 4 tiles, less at 1, 2, 8, 16).
constexpr int64_t TILES_AHEAD = 4;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

// out[m * ldo + r] = Σ_k x[m * K + k] w[r * K + k], for R weight rows and MR rows of x.
template <int R, int MR>
inline void dot_tile(const float* x, const float* w, int64_t K, float* out, int64_t ldo) {
  __m256 acc[MR][R];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += LANES) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + TILES_AHEAD * ROWS) * K + k), _MM_HINT_T0);
      wv[r] = _mm256_loadu_ps(w + r * K + k);
    }
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) out[m * ldo + r] = horizontal_sum(acc[m][r]);
}

// Every row of x (M, K) against R rows of w: out (M, ldo) columns [0, R).
template <int R>
void dot_rows(const float* x, int64_t M, const float* w, int64_t K, float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) dot_tile<R, 2>(x + m * K, w, K, out + m * ldo, ldo);
  if (m < M) dot_tile<R, 1>(x + m * K, w, K, out + m * ldo, ldo);
}

// fn(std::integral_constant<int, rows>{}) for rows in 1..ROWS (a tile's rows: ROWS, or fewer for the last
// tile): the tile functions take the count as a template argument, so their accumulators stay in registers.
template <typename Fn>
void with_rows(int64_t rows, Fn fn) {
  switch (rows) {
    case 4: return fn(std::integral_constant<int, 4>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    default: return fn(std::integral_constant<int, 1>{});
  }
}

at::Tensor new_output(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous (M, K) fp32 tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous (N, K') tensor");
  TORCH_CHECK(x.size(1) % LANES == 0, "in_features must be a multiple of ", LANES, ", got ", x.size(1));
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

// Runs tile(n, rows, partial) for the weight's tiles of ROWS rows across torch's threads, each
// writing its (M, ROWS) outputs to `partial`, which is copied into out (M, N).
template <typename Tile>
void for_each_tile(at::Tensor& out, Tile tile) {
  const int64_t M = out.size(0), N = out.size(1);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (N + ROWS - 1) / ROWS, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> partial(M * ROWS);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * ROWS, rows = std::min(ROWS, N - n);
      tile(n, rows, partial.data());
      for (int64_t m = 0; m < M; ++m) std::memcpy(op + m * N + n, partial.data() + m * ROWS, rows * sizeof(float));
    }
  });
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.size(1) == x.size(1), "weight must be fp32 (N, K)");
  at::Tensor out = new_output(x, weight);
  const int64_t M = x.size(0), K = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  for_each_tile(out, [&](int64_t n, int64_t rows, float* partial) {
    with_rows(rows, [&](auto R) { dot_rows<decltype(R)::value>(xp, M, wp + n * K, K, partial, ROWS); });
  });
  return out;
}

// ---- quantized weights: integer dot products against activations quantized to integers ----
//
// Each row of x is quantized in blocks of 32 columns with a scale per block (x ≈ q * scale), so that
// weight-activation products are summed by integer instructions instead of converting each weight
// to fp32: int4 weights against int8 activations (as llama.cpp does for its q4 weights: maddubs and
// madd, 32 products in two instructions), int8 weights against int16 activations (madd: 16 products
// an instruction; int8 activations cost int8 weights 1.5 points of top-1 agreement on SmolLM2).

template <typename Code>
struct QuantizedRows {  // x (M, K) ≈ q * scale per block of 32 columns
  std::vector<Code> q;       // (M, K)
  std::vector<float> scale;  // (M, K/32)
  std::vector<float> sum;    // (M, K/32): Σ of the block's quantized values times its scale
};

template <typename Code>
QuantizedRows<Code> quantize_rows(const float* x, int64_t M, int64_t K) {
  constexpr float LEVELS = sizeof(Code) == 1 ? 127 : 32767;
  QuantizedRows<Code> out{std::vector<Code>(M * K), std::vector<float>(M * K / BLOCK),
                          std::vector<float>(M * K / BLOCK)};
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < M * K / BLOCK; ++b) {
    const float* block = x + b * BLOCK;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(block + i * LANES);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float max_abs = _mm_cvtss_f32(m4);
    const float scale = max_abs / LEVELS;
    const __m256 inverse = _mm256_set1_ps(max_abs != 0 ? LEVELS / max_abs : 0);
    __m256i q[4];
    __m256i total = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inverse), _MM_FROUND_TO_NEAREST_INT));
      total = _mm256_add_epi32(total, q[i]);
    }
    // The packs work within 128-bit lanes: the permutes put the values back in column order.
    const __m256i words01 = _mm256_packs_epi32(q[0], q[1]), words23 = _mm256_packs_epi32(q[2], q[3]);
    Code* codes = out.q.data() + b * BLOCK;
    if constexpr (sizeof(Code) == 1) {
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words01, words23), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), bytes);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), _mm256_permute4x64_epi64(words01, 0xD8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 16), _mm256_permute4x64_epi64(words23, 0xD8));
    }
    out.scale[b] = scale;
    out.sum[b] = horizontal_sum(_mm256_cvtepi32_ps(total)) * scale;
  }
  return out;
}

// 32 products of unsigned (0..255) and signed bytes, summed in pairs to 16 x int16, then to 8 x fp32.
inline __m256 dot_bytes(__m256i unsigned_bytes, __m256i signed_bytes) {
  const __m256i pairs = _mm256_maddubs_epi16(unsigned_bytes, signed_bytes);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// int8 weights, R rows from w (stride K), against one row of x in int16: out[r] = Σ_k q_w q_x s_x s_w, the
// weight's scale s_w that of its group of columns: group_scales holds R rows of `groups` bf16 scales.
template <int R>
inline void dot_int8_tile(const int8_t* w, const uint16_t* group_scales, int64_t groups,
                          const QuantizedRows<int16_t>& x, int64_t m, int64_t K, float* out) {
  const int16_t* xq = x.q.data() + m * K;
  const float* xs = x.scale.data() + m * K / BLOCK;
  const int64_t blocks_per_group = K / BLOCK / groups;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 w_scale[R];
    for (int r = 0; r < R; ++r) w_scale[r] = _mm256_set1_ps(bf16_to_float(group_scales[r * groups + g]));
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * BLOCK));
      const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * BLOCK + 16));
      const __m256 s = _mm256_set1_ps(xs[b]);
      for (int r = 0; r < R; ++r) {
        const int8_t* bytes = w + r * K + b * BLOCK;
        _mm_prefetch(reinterpret_cast<const char*>(bytes + TILES_AHEAD * ROWS * K), _MM_HINT_T0);
        const __m256i w_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
        const __m256i w_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16)));
        // |products| <= 127 * 32767 and 4 of them per int32 lane: no overflow
        const __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(w_lo, x_lo), _mm256_madd_epi16(w_hi, x_hi));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(s, w_scale[r]), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = horizontal_sum(acc[r]);
}

// ---- int4 ----
// A row's 16-byte blocks are read two at a time: one 32-byte load holds blocks b and b + 1, its low
// nibbles columns 0..15 of both, its high nibbles columns 16..31 of both. The activations' int8 codes
// are stored in the same order (`pair_order`), so unpacking is an and and a shift, and one maddubs
// takes 32 products of both blocks; lanes 0-3 of the int32 sums belong to block b, 4-7 to block b + 1.
// A row whose block count is odd ends with one block read alone.

// x's int8 codes of blocks b, b + 1 (64 bytes) -> [b 0..15, b+1 0..15, b 16..31, b+1 16..31]
inline void pair_order(int8_t* codes) {
  int8_t copy[2 * BLOCK];
  std::memcpy(copy, codes, sizeof copy);
  std::memcpy(codes, copy, 16);
  std::memcpy(codes + 16, copy + BLOCK, 16);
  std::memcpy(codes + 32, copy + 16, 16);
  std::memcpy(codes + 48, copy + BLOCK + 16, 16);
}

// The codes of a tile's weight rows, as the products take them: per pair of blocks, the low nibbles
// (32 bytes) and the high nibbles (32 bytes); for an odd last block, its 32 codes in column order.
struct Int4Codes {
  __m256i low, high;
};

inline Int4Codes unpack_pair(const uint8_t* bytes) {
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  return {_mm256_and_si256(v, low_nibbles), _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles)};
}

inline __m256i unpack_block(const uint8_t* bytes) {  // 16 bytes -> columns 0..15 (low lane), 16..31 (high)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low_nibbles), _mm_and_si128(v, low_nibbles));
}

// bf16 (scale, zero) of a tile's ROWS rows for group g -> fp32 [4 scales | 4 zeros]
inline __m256 tile_scale_zero(const uint16_t* tile_scales, int64_t g) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile_scales + g * 2 * ROWS));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// Where a tile's codes come from: straight from the packed weight (up to PACKED_ROWS rows of x), or from a
// copy unpacked once into an L1-sized buffer (more rows of x: each tile is unpacked once, not per row).
struct PackedInt4 {
  const uint8_t* w;  // the tile's first row
  int64_t K;
  Int4Codes pair(int r, int64_t b) const {
    const uint8_t* bytes = w + r * K / 2 + b * BLOCK / 2;
    _mm_prefetch(reinterpret_cast<const char*>(bytes + TILES_AHEAD * ROWS * K / 2), _MM_HINT_T0);
    return unpack_pair(bytes);
  }
  __m256i block(int r, int64_t b) const { return unpack_block(w + r * K / 2 + b * BLOCK / 2); }
};

struct UnpackedInt4 {
  const __m256i* codes;  // (ROWS, K / 32) registers' worth: per row, its pairs (low, high) then an odd block
  int64_t K;
  Int4Codes pair(int r, int64_t b) const {
    const __m256i* row = codes + r * K / BLOCK;
    return {_mm256_load_si256(row + b), _mm256_load_si256(row + b + 1)};
  }
  __m256i block(int r, int64_t b) const { return _mm256_load_si256(codes + r * K / BLOCK + b); }
};

template <int R>
void unpack_tile(const PackedInt4& packed, __m256i* codes) {
  const int64_t blocks = packed.K / BLOCK;
  for (int r = 0; r < R; ++r) {
    __m256i* row = codes + r * blocks;
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
      const Int4Codes c = packed.pair(r, b);
      _mm256_store_si256(row + b, c.low);
      _mm256_store_si256(row + b + 1, c.high);
    }
    if (b < blocks) _mm256_store_si256(row + b, packed.block(r, b));
  }
}

// int4 weights, R <= ROWS rows of one tile, against one quantized row of x:
// out[r] = Σ_groups scale_g Σ_blocks (Σ q_w q_x) s_x + (zero_g - 8 scale_g) Σ x̂_group.
// The tile's scales and zeros come interleaved, (groups, 2, ROWS) bf16: one 16-byte load a group
// gives all four rows'.
template <int R, typename Codes>
inline void dot_int4_tile(const Codes& w, const uint16_t* tile_scales, int64_t group_size,
                          const QuantizedRows<int8_t>& x, int64_t m, int64_t K, float* out) {
  const int8_t* xq = x.q.data() + m * K;
  const float* xs = x.scale.data() + m * K / BLOCK;
  const float* xsum = x.sum.data() + m * K / BLOCK;
  const int64_t blocks = K / BLOCK, blocks_per_group = group_size / BLOCK;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  __m256 offset = _mm256_setzero_ps();  // lanes r and 4 + r: row r's Σ (zero - 8 scale) Σ x̂ over blocks
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const __m256 sz0 = tile_scale_zero(tile_scales, b / blocks_per_group);
    const __m256 sz1 = tile_scale_zero(tile_scales, (b + 1) / blocks_per_group);
    const __m256 scales = _mm256_permute2f128_ps(sz0, sz1, 0x20), zeros = _mm256_permute2f128_ps(sz0, sz1, 0x31);
    const __m256 x_sums = _mm256_setr_m128(_mm_set1_ps(xsum[b]), _mm_set1_ps(xsum[b + 1]));
    offset = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8), scales, zeros), x_sums, offset);
    const __m256 x_scales = _mm256_setr_m128(_mm_set1_ps(xs[b]), _mm_set1_ps(xs[b + 1]));
    const __m256i x_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * BLOCK));
    const __m256i x_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * BLOCK + 32));
    for (int r = 0; r < R; ++r) {
      const Int4Codes c = w.pair(r, b);
      // |each maddubs lane| <= 2 * 15 * 127, so the int16 sum of two cannot overflow
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(c.low, x_low), _mm256_maddubs_epi16(c.high, x_high));
      const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
      const __m256 scale = _mm256_permutevar8x32_ps(scales, _mm256_setr_epi32(r, r, r, r, r + 4, r + 4, r + 4, r + 4));
      acc[r] = _mm256_fmadd_ps(sums, _mm256_mul_ps(x_scales, scale), acc[r]);
    }
  }
  if (b < blocks) {  // an odd last block: its scales in the low lanes (rows), its products in all eight
    const __m256 sz = tile_scale_zero(tile_scales, b / blocks_per_group);
    const __m256 scales = _mm256_permute2f128_ps(sz, sz, 0x00), zeros = _mm256_permute2f128_ps(sz, sz, 0x11);
    const __m256 x_sums = _mm256_setr_m128(_mm_set1_ps(xsum[b]), _mm_setzero_ps());
    offset = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8), scales, zeros), x_sums, offset);
    const __m256 x_scale = _mm256_set1_ps(xs[b]);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * BLOCK));
    for (int r = 0; r < R; ++r) {
      const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w.block(r, b), xv), ones));
      acc[r] = _mm256_fmadd_ps(sums, _mm256_mul_ps(x_scale, _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(r))),
                               acc[r]);
    }
  }
  float offsets[2 * ROWS];
  _mm256_storeu_ps(offsets, offset);
  for (int r = 0; r < R; ++r) out[r] = horizontal_sum(acc[r]) + (offsets[r] + offsets[ROWS + r]);
}

template <typename TileFn>
void each_row_of_x(int64_t rows, int64_t M, float* partial, TileFn tile) {
  // partial is (M, ROWS): out for x row m and weight row r at partial[m * ROWS + r]
  for (int64_t m = 0; m < M; ++m) with_rows(rows, [&](auto R) { tile(R, m, partial + m * ROWS); });
}

// scales (N, K / group_size) (group_size K: (N,), a scale per row).
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t group_size) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.size(1) == x.size(1), "weight must be int8 (N, K)");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % BLOCK == 0, "in_features must be a multiple of ", BLOCK, ", got ", K);
  TORCH_CHECK(group_size > 0 && group_size % BLOCK == 0 && K % group_size == 0,
              "group_size must be a multiple of ", BLOCK, " dividing in_features (in_features: a scale per row)");
  const int64_t groups = K / group_size;
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.numel() == weight.size(0) * groups &&
                  scales.is_contiguous(),
              "scales must be contiguous bf16 (N, K / group_size)");
  at::Tensor out = new_output(x, weight);
  const QuantizedRows<int16_t> xq = quantize_rows<int16_t>(x.data_ptr<float>(), M, K);
  const int8_t* wp = weight.data_ptr<int8_t>();
  const uint16_t* sp = static_cast<const uint16_t*>(scales.data_ptr());
  for_each_tile(out, [&](int64_t n, int64_t rows, float* partial) {
    each_row_of_x(rows, M, partial, [&](auto R, int64_t m, float* o) {
      dot_int8_tile<decltype(R)::value>(wp + n * K, sp + n * groups, groups, xq, m, K, o);
    });
  });
  return out;
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales_and_zeros,
                       int64_t group_size) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.size(1) * 2 == K, "weight must be uint8 (N, K/2)");
  TORCH_CHECK(group_size % BLOCK == 0 && K % group_size == 0, "group_size must be a multiple of ", BLOCK,
              " dividing in_features");
  const int64_t tiles = (N + ROWS - 1) / ROWS;
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.numel() == tiles * (K / group_size) * 2 * ROWS,
              "scales_and_zeros must be contiguous bf16 (ceil(N/4), K/group_size, 2, 4): pack_int4_scales");
  at::Tensor out = new_output(x, weight);
  QuantizedRows<int8_t> xq = quantize_rows<int8_t>(x.data_ptr<float>(), M, K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b + 2 <= K / BLOCK; b += 2) pair_order(xq.q.data() + m * K + b * BLOCK);
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  const uint16_t* sp = static_cast<const uint16_t*>(scales_and_zeros.data_ptr());
  const int64_t groups = K / group_size;
  for_each_tile(out, [&](int64_t n, int64_t rows, float* partial) {
    const PackedInt4 packed{wp + n * K / 2, K};
    const uint16_t* tile_scales = sp + n * groups * 2;  // tile n / ROWS
    with_rows(rows, [&](auto R) {
      constexpr int Rows = decltype(R)::value;
      if (M <= PACKED_ROWS) {
        for (int64_t m = 0; m < M; ++m)
          dot_int4_tile<Rows>(packed, tile_scales, group_size, xq, m, K, partial + m * ROWS);
        return;
      }
      thread_local std::vector<__m256i> codes;  // the tile unpacked once for every row of x
      codes.resize(ROWS * K / BLOCK);
      unpack_tile<Rows>(packed, codes.data());
      const UnpackedInt4 unpacked{codes.data(), K};
      for (int64_t m = 0; m < M; ++m)
        dot_int4_tile<Rows>(unpacked, tile_scales, group_size, xq, m, K, partial + m * ROWS);
    });
  });
  return out;
}

// The fp32 weight (N, K) that int4 weights in the kernel layout stand for: prefills (more rows
// than the products above take) multiply it with one GEMM.
at::Tensor dequantize_int4(const at::Tensor& weight, const at::Tensor& scales_and_zeros, int64_t group_size) {
  const int64_t N = weight.size(0), K = weight.size(1) * 2, groups = K / group_size;
  const int64_t tiles = (N + ROWS - 1) / ROWS;
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && K % group_size == 0 &&
                  group_size % BLOCK == 0 && scales_and_zeros.scalar_type() == at::kBFloat16 &&
                  scales_and_zeros.is_contiguous() && scales_and_zeros.numel() == tiles * groups * 2 * ROWS,
              "expected int4 weights and scales in the kernel layout (pack_int4_blocks, pack_int4_scales)");
  at::Tensor out = at::empty({N, K}, weight.options().dtype(at::kFloat));
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  const uint16_t* sp = static_cast<const uint16_t*>(scales_and_zeros.data_ptr());
  float* op = out.data_ptr<float>();
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* tile_scales = sp + (n / ROWS) * groups * 2 * ROWS;
      for (int64_t b = 0; b < K / BLOCK; ++b) {
        const int64_t g = b * BLOCK / group_size;
        const float scale = bf16_to_float(tile_scales[g * 2 * ROWS + n % ROWS]);
        const float zero = bf16_to_float(tile_scales[g * 2 * ROWS + ROWS + n % ROWS]);
        const __m256 s = _mm256_set1_ps(scale), base = _mm256_set1_ps(zero - 8 * scale);  // the value of code 0
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + n * K / 2 + b * BLOCK / 2));
        const __m128i lo = _mm_and_si128(packed, low_nibbles), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_nibbles);
        const __m128i quarters[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};  // columns 0-7 .. 24-31
        for (int i = 0; i < 4; ++i) {
          const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(quarters[i]));
          _mm256_storeu_ps(op + n * K + b * BLOCK + i * LANES, _mm256_fmadd_ps(q, s, base));
        }
      }
    }
  });
  return out;
}

// ---- attention of one new position per row (decode steps) ----
//
// out (B, H, hd) = softmax(q kᵀ / √hd) v over row b's cached positions where mask is true, query head h
// reading key/value head h / (H / Hkv). Only the positions up to a row's last true mask entry are read:
// a compiled decode step hands over the whole cache (static shapes) with a mask, and this reads what the
// row holds, not max_seq_len positions.

// e^x for 8 lanes (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial in r; relative
// error about 1e-7). Lanes below -87.3 (e^x under fp32's normal range, -inf included) give 0.
inline __m256 exp_ps(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(two_n)), underflow);
}

// q · k over hd (a multiple of 8) columns: one accumulator of 8 lanes, summed across lanes at the end.
inline float dot(const float* q, const float* k, int64_t hd) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; d += LANES) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
  return horizontal_sum(acc);
}

// Attention of the queries q (M, H, hd) contiguous, T per cache row (query i reads row i / T), each over
// its first lengths[i] positions of keys and values (B', Hkv, S, hd), B' >= M / T, where row_mask (1 or
// M rows of S, or null: all) is true; into out (M, H, hd).
void attend(const float* qp, int64_t M, int64_t T, int64_t H, int64_t hd, const at::Tensor& keys,
            const at::Tensor& values, const std::vector<int64_t>& lengths, const bool* mp, int64_t mask_rows,
            float* op) {
  const int64_t Hkv = keys.size(1), S = keys.size(2);
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, M * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S + LANES);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / H, b = i / T, h = task % H, g = h / (H / Hkv), length = lengths[i];
      const bool* row_mask = mp ? mp + (mask_rows == 1 ? 0 : i) * S : nullptr;
      const float* qh = qp + task * hd;
      const float* K = kp + b * keys.stride(0) + g * keys.stride(1);
      const float* V = vp + b * values.stride(0) + g * values.stride(1);
      float* o = op + task * hd;
      if (length == 0) {  // nothing visible: zeros (a filler row of a compiled step)
        std::fill(o, o + hd, 0.0f);
        continue;
      }
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < length; ++s) {
        const bool visible = !row_mask || row_mask[s];
        scores[s] = visible ? dot(qh, K + s * keys.stride(2), hd) * scale : -std::numeric_limits<float>::infinity();
        max_score = std::max(max_score, scores[s]);
      }
      // probabilities (unnormalized) in place, 8 at a time; the padding past `length` is -inf: 0
      std::fill(scores.begin() + length, scores.begin() + length + LANES, -std::numeric_limits<float>::infinity());
      __m256 total = _mm256_setzero_ps();
      for (int64_t s = 0; s < length; s += LANES) {
        const __m256 p = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores.data() + s), _mm256_set1_ps(max_score)));
        _mm256_storeu_ps(scores.data() + s, p);
        total = _mm256_add_ps(total, p);
      }
      const float inverse_total = 1.0f / horizontal_sum(total);
      for (int64_t d = 0; d < hd; d += 4 * LANES) {  // 32 output columns at a time: 4 accumulators
        const int64_t width = std::min<int64_t>(4 * LANES, hd - d);
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t s = 0; s < length; ++s) {
          const __m256 p = _mm256_set1_ps(scores[s]);
          const float* v = V + s * values.stride(2) + d;
          for (int64_t i = 0; i < width / LANES; ++i) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + i * LANES), acc[i]);
        }
        for (int64_t i = 0; i < width / LANES; ++i)
          _mm256_storeu_ps(o + d + i * LANES, _mm256_mul_ps(acc[i], _mm256_set1_ps(inverse_total)));
      }
    }
  });
}

void check_cache(const at::Tensor& keys, const at::Tensor& values) {
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kFloat && keys.stride(3) == 1 && keys.sizes() == values.sizes() &&
                  values.scalar_type() == at::kFloat && values.stride(3) == 1,
              "keys and values must be fp32 (B, Hkv, S, hd), each position's hd values contiguous");
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous fp32 (B, H, hd)");
  check_cache(keys, values);
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2), Hkv = keys.size(1), S = keys.size(2);
  TORCH_CHECK(keys.size(0) == B && keys.size(3) == hd && H % Hkv == 0 && hd % LANES == 0,
              "q (B, H, hd) and keys (B, Hkv, S, hd) disagree, or hd is not a multiple of ", LANES);
  const bool* mp = nullptr;
  int64_t mask_rows = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(1) == S && mask->is_contiguous() &&
                    (mask->size(0) == 1 || mask->size(0) == B),
                "mask must be contiguous bool (1 or B, S)");
    mp = mask->data_ptr<bool>();
    mask_rows = mask->size(0);
  }
  // Per row, once for all its heads: the positions read, up to its last visible one.
  std::vector<int64_t> lengths(B, S);
  for (int64_t b = 0; mp && b < B; ++b) {
    const bool* row_mask = mp + (mask_rows == 1 ? 0 : b) * S;
    while (lengths[b] > 0 && !row_mask[lengths[b] - 1]) --lengths[b];
  }
  at::Tensor out = at::empty({B, H, hd}, q.options());
  attend(q.data_ptr<float>(), B, 1, H, hd, keys, values, lengths, mp, mask_rows, out.data_ptr<float>());
  return out;
}

// ---- a whole transformer block for a few new tokens per row (decode steps, speculative verify passes) ----
//
// What llama.model.TransformerBlock computes for x (B, T, D), B * T <= 16 tokens, at model-parallel size 1,
// in one call instead of some twenty PyTorch operations (a batch-1 step spent as long dispatching those
// as multiplying its weights):
//
//   h = x + wo(attention(rope(q), cache with rope(k), v written at the tokens' positions))
//       where q, k, v = split(wqkv(rms_norm(x) * attention_norm))
//   out = h + w2(silu(gate) * up),  gate, up = chunk(w13(rms_norm(h) * ffn_norm))
//
// Token t of row b is at position positions[b, t] and attends to its row's cache positions 0 .. that one
// (causal decoding; every token's keys and values are written first). A token's result does not depend
// on the other tokens of the call: a verify pass of k tokens gives the outputs of k single-token steps.
// The linears are given as (weight, scales or None, group size): fp32, int8 or int4 (kernel layout)
// weights, as linear_* take them.

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                  int64_t group_size) {
  if (!scales.has_value()) return linear_f32(x, weight);
  if (weight.scalar_type() == at::kChar) return linear_int8(x, weight, *scales, group_size);
  return linear_int4(x, weight, *scales, group_size);
}

// out[m] = x[m] / sqrt(mean(x[m]²) + eps) * weight, over D columns
void rms_norm(const float* x, int64_t M, int64_t D, const float* weight, double eps, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += LANES) {
      const __m256 v = _mm256_loadu_ps(row + d);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    const float inverse = 1.0f / std::sqrt(horizontal_sum(acc) / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) out[m * D + d] = row[d] * inverse * weight[d];
  }
}

// Rotates the interleaved pairs (v[2i], v[2i+1]) of `heads` heads of hd values by cos/sin table (hd/2, 2).
void rotate(float* v, int64_t heads, int64_t hd, const float* table) {
  for (int64_t h = 0; h < heads; ++h, v += hd)
    for (int64_t i = 0; i < hd / 2; ++i) {
      const float cos = table[2 * i], sin = table[2 * i + 1], even = v[2 * i], odd = v[2 * i + 1];
      v[2 * i] = even * cos - odd * sin;
      v[2 * i + 1] = even * sin + odd * cos;
    }
}

at::Tensor decode_block(const at::Tensor& x, const at::Tensor& attention_norm, const at::Tensor& ffn_norm, double eps,
                        const at::Tensor& rope, const at::Tensor& positions, at::Tensor& cache_k, at::Tensor& cache_v,
                        int64_t n_heads, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                        at::IntArrayRef group_sizes) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be contiguous fp32 (B, T, D)");
  check_cache(cache_k, cache_v);
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), "the KV cache must be contiguous (B, Hkv, S, hd)");
  TORCH_CHECK(weights.size() == 4 && scales.size() == 4 && group_sizes.size() == 4,
              "weights, scales and group_sizes are for wqkv, wo, w13, w2");
  const int64_t B = x.size(0), T = x.size(1), M = B * T, D = x.size(2);
  const int64_t Hkv = cache_k.size(1), S = cache_k.size(2), hd = cache_k.size(3);
  const int64_t q_width = n_heads * hd, kv_width = Hkv * hd;
  TORCH_CHECK(cache_k.size(0) >= B && n_heads % Hkv == 0 && hd % LANES == 0 && D % LANES == 0,
              "x (B, T, D), n_heads and the cache (B, Hkv, S, hd) disagree");
  TORCH_CHECK(attention_norm.numel() == D && ffn_norm.numel() == D && attention_norm.scalar_type() == at::kFloat &&
                  ffn_norm.scalar_type() == at::kFloat && attention_norm.is_contiguous() && ffn_norm.is_contiguous(),
              "the norms' weights must be contiguous fp32 (D,)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 2 && positions.is_contiguous() &&
                  (positions.size(0) == 1 || positions.size(0) == B) && positions.size(1) == T,
              "positions must be contiguous long (1 or B, T)");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.dim() == 4 &&
                  rope.size(0) == positions.size(0) && rope.size(1) == T && rope.size(2) == hd / 2 && rope.size(3) == 2,
              "rope must be contiguous fp32 (1 or B, T, hd/2, 2): cos and sin at the positions");
  // Token i = (row b, t): its position and its row of positions and rope (shared by every row, or its own).
  const bool shared = positions.size(0) == 1;
  auto own = [&](int64_t i) { return shared ? i % T : i; };
  const int64_t* pos = positions.data_ptr<int64_t>();
  std::vector<int64_t> lengths(M);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t p = pos[own(i)];
    TORCH_CHECK(p >= 0 && p < S, "position ", p, " is outside the cache's ", S, " positions");
    lengths[i] = p + 1;
  }
  auto layer = [&](int i, const at::Tensor& in) { return linear(in, weights[i], scales.get(i), group_sizes[i]); };

  // Attention
  at::Tensor normed = at::empty({M, D}, x.options());
  rms_norm(x.data_ptr<float>(), M, D, attention_norm.data_ptr<float>(), eps, normed.data_ptr<float>());
  at::Tensor qkv = layer(0, normed);  // (M, q_width + 2 kv_width)
  TORCH_CHECK(qkv.size(1) == q_width + 2 * kv_width, "wqkv has ", qkv.size(1), " outputs, expected ",
              q_width + 2 * kv_width);
  at::Tensor q = at::empty({M, n_heads, hd}, x.options());
  for (int64_t i = 0; i < M; ++i) {
    float* row = qkv.data_ptr<float>() + i * qkv.size(1);
    rotate(row, n_heads + Hkv, hd, rope.data_ptr<float>() + own(i) * hd);  // q's heads, then k's
    std::memcpy(q.data_ptr<float>() + i * q_width, row, q_width * sizeof(float));
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t at_position = (((i / T) * Hkv + g) * S + pos[own(i)]) * hd;
      std::memcpy(cache_k.data_ptr<float>() + at_position, row + q_width + g * hd, hd * sizeof(float));
      std::memcpy(cache_v.data_ptr<float>() + at_position, row + q_width + kv_width + g * hd, hd * sizeof(float));
    }
  }
  at::Tensor attended = at::empty({M, q_width}, x.options());
  attend(q.data_ptr<float>(), M, T, n_heads, hd, cache_k, cache_v, lengths, nullptr, 0, attended.data_ptr<float>());
  at::Tensor h = layer(1, attended);  // (M, D)
  TORCH_CHECK(h.size(1) == D, "wo has ", h.size(1), " outputs, expected ", D);
  float* hp = h.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t j = 0; j < M * D; ++j) hp[j] += xp[j];

  // Feed-forward (SwiGLU)
  rms_norm(hp, M, D, ffn_norm.data_ptr<float>(), eps, normed.data_ptr<float>());
  at::Tensor gate_up = layer(2, normed);  // (M, 2F)
  const int64_t F = gate_up.size(1) / 2;
  TORCH_CHECK(F % LANES == 0, "w13's width must be a multiple of ", 2 * LANES);
  at::Tensor gated = at::empty({M, F}, x.options());
  for (int64_t i = 0; i < M; ++i) {
    const float* gate = gate_up.data_ptr<float>() + i * 2 * F;
    const float* up = gate + F;
    float* out = gated.data_ptr<float>() + i * F;
    for (int64_t f = 0; f < F; f += LANES) {  // silu(g) * u = g * u / (1 + e^-g)
      const __m256 g = _mm256_loadu_ps(gate + f);
      const __m256 denominator = _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g)));
      _mm256_storeu_ps(out + f, _mm256_div_ps(_mm256_mul_ps(g, _mm256_loadu_ps(up + f)), denominator));
    }
  }
  at::Tensor out = layer(3, gated);  // (M, D)
  TORCH_CHECK(out.size(1) == D, "w2 has ", out.size(1), " outputs, expected ", D);
  float* op = out.data_ptr<float>();
  for (int64_t j = 0; j < M * D; ++j) op[j] += hp[j];
  return out.view({B, T, D});
}

}  // namespace

TORCH_LIBRARY(llama_kernels, m) {
  m.def("linear_f32(Tensor x, Tensor weight) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor weight, Tensor scales, int group_size) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor weight, Tensor scales_and_zeros, int group_size) -> Tensor");
  m.def("dequantize_int4(Tensor weight, Tensor scales_and_zeros, int group_size) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor? mask) -> Tensor");
  m.def("decode_block(Tensor x, Tensor attention_norm, Tensor ffn_norm, float eps, Tensor rope, Tensor positions, "
        "Tensor(a!) cache_k, Tensor(b!) cache_v, int n_heads, Tensor[] weights, Tensor?[] scales, "
        "int[] group_sizes) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_kernels, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("dequantize_int4", &dequantize_int4);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_block", &decode_block);
}
