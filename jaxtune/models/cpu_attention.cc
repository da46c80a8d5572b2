// Fused softmax attention for XLA:CPU, as two XLA FFI handlers (forward, backward).
//
// Why a kernel of our own: XLA:CPU has no fused attention, and the scores, softmax and their
// gradients run there as separate ops over (B*K, G*T, S) float32 arrays, with the backward's
// query-contracting products as slow Eigen dots. Here each (batch, KV head) group is one task:
// its queries go in tiles of kRows, its keys in blocks of kKeys, and a tile's scores never leave
// the cache (flash attention: an online softmax forward that keeps each row's log-sum-exp, and a
// backward that recomputes the probabilities from it). Key blocks that no query of a tile can see
// (after a causal tile, outside the packed documents of its rows) are skipped.
//
// Layouts (row-major, float32): q (B, T, N, H), k and v (B, T, K, H) with N % K == 0 (the G = N / K
// query heads of a group share its KV head), segment ids (B, T) int32 (0: padding, which no query
// sees; a query sees the keys of its own segment, and with `causal` none after itself; a segment
// need not be one run: prompt tuning's virtual tokens share the text's segment across padding; a
// sliding window (`left`, `right` >= 0) keeps to keys at most that many before / after the query), out
// (B, T, N, H), lse (B, N, T). A row with no key to see gives zeros (and lse 0). H % 8 == 0. With
// `cap` > 0 the scores are soft-capped, cap * tanh(score / cap) (Gemma 2), before masking; the
// backward multiplies dS by the cap's derivative, 1 - tanh^2, recomputed with the scores.
//
// Dropout on the probabilities (`drop` > 0: each probability dropped with chance drop / 65536, the
// rest scaled by `kept`, 1 / (1 - rate) for the rate drop stands for) draws no random numbers: whether query i of head n in
// batch row b keeps key j is a hash of (seed, b, n, i, j) (`row_key`, `drop_row` below; the same function is
// `attention_keep` in jaxtune/models/dropout.py), so the backward recomputes the forward's mask, and a shard
// of a mesh, told its first batch row and head, draws the mask of the whole batch. The normaliser
// sums the kept and dropped probabilities alike (dropout follows the softmax), and the backward is
// flash attention's with dropout: dV from the dropped probabilities, dS = P (Z dP - D) with Z the
// mask's scale and D the row's dO . O of the dropped output.
//
// Built at first use by jaxtune/models/cpu_attention.py with the machine's C++ compiler.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <unordered_map>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));

constexpr int64_t kRows = 32;  // queries per tile
constexpr int64_t kKeys = 32;  // keys per block

inline v8 load(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// exp(x) for a vector, Cephes' expf polynomial (about 1 ulp); 0 below -87 (masked scores).
inline v8 vexp(v8 x) {
  const v8 lo = splat(-87.0f), hi = splat(88.0f);
  i8v zero = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  v8 fx = x * splat(1.44269504088896341f) + splat(0.5f);
  i8v n = __builtin_convertvector(fx, i8v);
  v8 fn = __builtin_convertvector(n, v8);
  i8v over = fn > fx;  // truncation rounded a negative up: floor
  n += over;           // -1 where over
  fn = __builtin_convertvector(n, v8);
  x = x - fn * splat(0.693359375f) - fn * splat(-2.12194440e-4f);
  v8 y = splat(1.9875691500e-4f);
  y = y * x + splat(1.3981999507e-3f);
  y = y * x + splat(8.3334519073e-3f);
  y = y * x + splat(4.1665795894e-2f);
  y = y * x + splat(1.6666665459e-1f);
  y = y * x + splat(5.0000001201e-1f);
  y = y * x * x + x + splat(1.0f);
  i8v bits = (n + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  return zero ? splat(0.0f) : y;
}

// tanh(x) for a vector: an odd Taylor polynomial below |x| = 1/16 (error < 1e-12 relative), else
// (1 - e) / (1 + e) with e = exp(-2|x|) (within 1e-6 relative; 0 past |x| = 43, so tanh = +-1).
inline v8 vtanh(v8 x) {
  const v8 a = x < 0.0f ? -x : x;
  const v8 a2 = a * a;
  const v8 small = a * (splat(1.0f) + a2 * (splat(-1.0f / 3) + a2 * (splat(2.0f / 15) + a2 * splat(-17.0f / 315))));
  const v8 e = vexp(splat(-2.0f) * a);
  const v8 t = (a < 0.0625f) ? small : (splat(1.0f) - e) / (splat(1.0f) + e);
  return x < 0.0f ? -t : t;
}

// Soft-caps a tile of scores in place, cap * tanh(x / cap); with `slope`, stores 1 - tanh^2 there.
inline void cap_tile(float cap, float* tile, float* slope) {
  const v8 c = splat(cap), inv = splat(1.0f / cap);
  for (int64_t j = 0; j < kRows * kKeys; j += 8) {
    const v8 t = vtanh(load(tile + j) * inv);
    store(tile + j, c * t);
    if (slope) store(slope + j, splat(1.0f) - t * t);
  }
}

// murmur3's 32-bit finaliser: a bijection whose every output bit depends on every input bit.
template <typename T>
inline T fmix(T h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The dropout hash of one query row: (seed, batch row, query head, query position) mixed in turn.
inline uint32_t row_key(const uint32_t* seed, uint32_t b, uint32_t n, uint32_t i) {
  uint32_t x = fmix(seed[0] ^ fmix(b * 0x9E3779B9u + seed[1]));
  x = fmix(x ^ (n * 0x85EBCA6Bu + 0x165667B1u));
  return fmix(x + i * 0xC2B2AE35u);
}

// Multiplies row[j] (keys j0 + j, j < kKeys) by the row's dropout scale: 0 where dropped, else
// `kept` (1 / keep probability). Key j is kept when the top 16 bits of fmix(key ^ j * golden) are at
// least `drop`.
inline void drop_row(uint32_t key, int64_t j0, uint32_t drop, float kept, float* row) {
  const u8v lanes = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t j = 0; j < kKeys; j += 8) {
    const u8v idx = lanes + static_cast<uint32_t>(j0 + j);
    const u8v bits = fmix((idx * 0x9E3779B9u) ^ key) >> 16;
    const i8v keep = bits >= drop;
    store(row + j, keep ? load(row + j) * splat(kept) : splat(0.0f));
  }
}

// Keeps x in a register: without it GCC folds the load into each FMA that reads x, and the
// micro-kernels below become bound by loads instead of FMAs.
#define IN_REGISTER(x) asm("" : "+x"(x))

// c[r, j] = sum_d a[r, d] * bt[d, j] for r < kRows, j < kKeys: a (kRows, h), bt (h, ldb).
void scores_tile(const float* a, int64_t h, const float* bt, int64_t ldb, float* c) {
  for (int64_t r = 0; r < kRows; r += 4) {
    for (int64_t j = 0; j < kKeys; j += 16) {
      v8 acc[4][2] = {};
      for (int64_t d = 0; d < h; ++d) {
        v8 b0 = load(bt + d * ldb + j), b1 = load(bt + d * ldb + j + 8);
        IN_REGISTER(b0);
        IN_REGISTER(b1);
        for (int rr = 0; rr < 4; ++rr) {
          const v8 av = splat(a[(r + rr) * h + d]);
          acc[rr][0] += av * b0;
          acc[rr][1] += av * b1;
        }
      }
      for (int rr = 0; rr < 4; ++rr) {
        store(c + (r + rr) * kKeys + j, acc[rr][0]);
        store(c + (r + rr) * kKeys + j + 8, acc[rr][1]);
      }
    }
  }
}

// out[i, :] += sum_j p[i * prs + j * pcs] * b[j, :] for i < rows (a multiple of 4), j < inner:
// b (inner, h), out (rows, h).
void accumulate(float* out, int64_t rows, const float* p, int64_t prs, int64_t pcs, int64_t inner,
                const float* b, int64_t h) {
  for (int64_t i = 0; i < rows; i += 4) {
    int64_t col = 0;
    for (; col + 16 <= h; col += 16) {
      v8 acc[4][2];
      for (int rr = 0; rr < 4; ++rr) {
        acc[rr][0] = load(out + (i + rr) * h + col);
        acc[rr][1] = load(out + (i + rr) * h + col + 8);
      }
      for (int64_t j = 0; j < inner; ++j) {
        v8 b0 = load(b + j * h + col), b1 = load(b + j * h + col + 8);
        IN_REGISTER(b0);
        IN_REGISTER(b1);
        for (int rr = 0; rr < 4; ++rr) {
          const v8 pv = splat(p[(i + rr) * prs + j * pcs]);
          acc[rr][0] += pv * b0;
          acc[rr][1] += pv * b1;
        }
      }
      for (int rr = 0; rr < 4; ++rr) {
        store(out + (i + rr) * h + col, acc[rr][0]);
        store(out + (i + rr) * h + col + 8, acc[rr][1]);
      }
    }
    if (col < h) {  // h % 16 == 8
      v8 acc[4];
      for (int rr = 0; rr < 4; ++rr) acc[rr] = load(out + (i + rr) * h + col);
      for (int64_t j = 0; j < inner; ++j) {
        v8 bj = load(b + j * h + col);
        IN_REGISTER(bj);
        for (int rr = 0; rr < 4; ++rr) acc[rr] += splat(p[(i + rr) * prs + j * pcs]) * bj;
      }
      for (int rr = 0; rr < 4; ++rr) store(out + (i + rr) * h + col, acc[rr]);
    }
  }
}

// A call's attributes, as jaxtune/models/cpu_attention.py passes them (see Shape for their meaning;
// `drop` arrives signed and is checked before it becomes Shape's).
struct Settings {
  float scale;
  int32_t causal, left, right, drop;
  float kept, softcap;
};

struct Shape {
  int64_t b, t, n, kv, h, g, tp, sp;  // tp, sp: t rounded up to kRows, kKeys
  float scale;
  bool causal;
  int64_t left, right;  // a sliding window: keys at most left before, right after the query (-1: no bound)
  uint32_t drop;        // dropout: probabilities dropped with chance drop / 65536 (0: none)
  float kept;           // the kept probabilities' scale, 1 / (1 - rate)
  float cap;            // soft-capping of the scores (0: none)
  const uint32_t* rng;  // seed[2], then the shard's first batch row and first query head
};

// One group's inputs, packed as its pass reads them: queries (G, tp, h) pre-scaled, keys transposed
// (h, sp); for the forward values (sp, h), for the backward keys (sp, h) and values transposed; the segment ids (0 past t), and for each query the keys [lo, hi) that hold its
// segment (from its first to its last token, cut after the query when causal and to the window's
// keys; empty for padding and past t). `runs`: every segment is one run, so every key in [lo, hi) is the query's segment's.
struct Packed {
  std::vector<float> q, k, kt, v, vt;
  std::vector<int32_t> seg;
  std::vector<int64_t> lo, hi;
  bool runs = true;
};

void pack(const Shape& s, int64_t group, const float* q, const float* k, const float* v, const int32_t* seg,
          bool backward, Packed* p) {
  const int64_t b = group / s.kv, head = group % s.kv, h = s.h;
  p->q.assign(s.g * s.tp * h, 0.0f);
  p->kt.assign(h * s.sp, 0.0f);
  if (backward) {
    p->k.assign(s.sp * h, 0.0f);
    p->vt.assign(h * s.sp, 0.0f);
  } else {
    p->v.assign(s.sp * h, 0.0f);
  }
  p->lo.assign(s.tp, 0);
  p->hi.assign(s.tp, 0);
  p->seg.assign(std::max(s.tp, s.sp), 0);
  const int32_t* ids = seg + b * s.t;
  std::unordered_map<int32_t, std::pair<int64_t, int64_t>> span;  // segment -> [first, last] token
  for (int64_t t = 0; t < s.t; ++t) {
    p->seg[t] = ids[t];
    auto [it, fresh] = span.try_emplace(ids[t], t, t);
    if (!fresh) {
      p->runs = p->runs && (it->second.second == t - 1 || ids[t] == 0);
      it->second.second = t;
    }
  }
  for (int64_t t = 0; t < s.t; ++t) {
    if (ids[t] == 0) continue;
    const auto& [first, last] = span[ids[t]];
    p->lo[t] = s.left >= 0 ? std::max(first, t - s.left) : first;
    p->hi[t] = std::min(s.causal ? t + 1 : last + 1, s.right >= 0 ? t + s.right + 1 : last + 1);
  }
  for (int64_t t = 0; t < s.t; ++t) {
    for (int64_t g = 0; g < s.g; ++g) {
      const float* src = q + ((b * s.t + t) * s.n + head * s.g + g) * h;
      float* dst = p->q.data() + (g * s.tp + t) * h;
      for (int64_t d = 0; d < h; ++d) dst[d] = src[d] * s.scale;
    }
    const float* ks = k + ((b * s.t + t) * s.kv + head) * h;
    const float* vs = v + ((b * s.t + t) * s.kv + head) * h;
    for (int64_t d = 0; d < h; ++d) p->kt[d * s.sp + t] = ks[d];
    if (backward) {
      std::memcpy(p->k.data() + t * h, ks, h * sizeof(float));
      for (int64_t d = 0; d < h; ++d) p->vt[d * s.sp + t] = vs[d];
    } else {
      std::memcpy(p->v.data() + t * h, vs, h * sizeof(float));
    }
  }
}

// The key blocks [*first, *end) that some query of the tile starting at i0 sees (none: first == end):
// a causal tile sees no keys after its last query, a tile inside one packed document none outside it,
// a windowed tile none outside its queries' windows.
void key_blocks(const Shape& s, const Packed& p, int64_t i0, int64_t* first, int64_t* end) {
  int64_t lo = s.sp, hi = 0;
  for (int64_t i = i0; i < std::min(i0 + kRows, s.t); ++i) {
    if (p.lo[i] < p.hi[i]) {
      lo = std::min(lo, p.lo[i]);
      hi = std::max(hi, p.hi[i]);
    }
  }
  *first = lo >= hi ? 0 : lo / kKeys * kKeys;
  *end = lo >= hi ? 0 : std::min(s.sp, (hi + kKeys - 1) / kKeys * kKeys);
}

// Sets row[j] (scores of query i against keys j0 + j) to -inf where the query cannot see the key;
// returns false when the block holds none of its segment's keys (it may still see none of them when
// its segment is not one run: the caller checks the row's maximum).
inline bool mask_row(const Packed& p, int64_t i, int64_t j0, float* row) {
  const int64_t a = std::max<int64_t>(p.lo[i] - j0, 0), e = std::min<int64_t>(p.hi[i] - j0, kKeys);
  if (a >= e) return false;
  std::fill(row, row + a, -INFINITY);
  std::fill(row + e, row + kKeys, -INFINITY);
  if (!p.runs) {
    for (int64_t j = a; j < e; ++j)
      if (p.seg[j0 + j] != p.seg[i]) row[j] = -INFINITY;
  }
  return true;
}

void forward_group(const Shape& s, int64_t group, const float* q, const float* k, const float* v,
                   const int32_t* seg, float* out, float* lse) {
  Packed p;
  pack(s, group, q, k, v, seg, false, &p);
  const int64_t b = group / s.kv, head = group % s.kv, h = s.h;
  std::vector<float> sc(kRows * kKeys), acc(kRows * h);
  float top[kRows], total[kRows];
  for (int64_t g = 0; g < s.g; ++g) {
    for (int64_t i0 = 0; i0 < s.t; i0 += kRows) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(top, top + kRows, -INFINITY);
      std::fill(total, total + kRows, 0.0f);
      const float* qt = p.q.data() + (g * s.tp + i0) * h;
      int64_t first, end;
      key_blocks(s, p, i0, &first, &end);
      for (int64_t j0 = first; j0 < end; j0 += kKeys) {
        scores_tile(qt, h, p.kt.data() + j0, s.sp, sc.data());
        if (s.cap > 0.0f) cap_tile(s.cap, sc.data(), nullptr);
        for (int64_t r = 0; r < kRows; ++r) {
          float* row = sc.data() + r * kKeys;
          if (!mask_row(p, i0 + r, j0, row)) {  // nothing to see in this block
            std::fill(row, row + kKeys, 0.0f);
            continue;
          }
          v8 most = load(row);
          for (int64_t j = 8; j < kKeys; j += 8) {
            const v8 x = load(row + j);
            most = x > most ? x : most;
          }
          float best = most[0];
          for (int c = 1; c < 8; ++c) best = std::max(best, most[c]);
          if (best == -INFINITY) {  // only other segments' keys
            std::fill(row, row + kKeys, 0.0f);
            continue;
          }
          const float now = std::max(top[r], best);
          const float keep = top[r] == -INFINITY ? 0.0f : std::exp(top[r] - now);
          top[r] = now;
          v8 sum = splat(0.0f);
          for (int64_t j = 0; j < kKeys; j += 8) {
            const v8 e = vexp(load(row + j) - splat(now));
            store(row + j, e);
            sum += e;
          }
          float added = 0.0f;
          for (int c = 0; c < 8; ++c) added += sum[c];
          total[r] = total[r] * keep + added;
          if (keep != 1.0f)
            for (int64_t d = 0; d < h; ++d) acc[r * h + d] *= keep;
          if (s.drop) drop_row(row_key(s.rng, s.rng[2] + b, s.rng[3] + head * s.g + g, i0 + r), j0, s.drop, s.kept, row);
        }
        accumulate(acc.data(), kRows, sc.data(), kKeys, 1, kKeys, p.v.data() + j0 * h, h);
      }
      for (int64_t r = 0; r < kRows && i0 + r < s.t; ++r) {
        const int64_t t = i0 + r, n = head * s.g + g;
        float* dst = out + ((b * s.t + t) * s.n + n) * h;
        for (int64_t d = 0; d < h; ++d) dst[d] = total[r] > 0.0f ? acc[r * h + d] / total[r] : 0.0f;
        lse[(b * s.n + n) * s.t + t] = total[r] > 0.0f ? top[r] + std::log(total[r]) : 0.0f;
      }
    }
  }
}

void backward_group(const Shape& s, int64_t group, const float* q, const float* k, const float* v,
                    const int32_t* seg, const float* out, const float* lse, const float* dout, float* dq,
                    float* dk, float* dv) {
  Packed p;
  pack(s, group, q, k, v, seg, true, &p);
  const int64_t b = group / s.kv, head = group % s.kv, h = s.h;
  std::vector<float> pr(kRows * kKeys), dp(kRows * kKeys), slope(s.cap > 0.0f ? kRows * kKeys : 0), dot(kRows * h),
      dqt(kRows * h);
  std::vector<float> dkp(s.sp * h, 0.0f), dvp(s.sp * h, 0.0f);
  float row_lse[kRows], delta[kRows];
  for (int64_t g = 0; g < s.g; ++g) {
    const int64_t n = head * s.g + g;
    for (int64_t i0 = 0; i0 < s.t; i0 += kRows) {
      std::fill(dot.begin(), dot.end(), 0.0f);
      std::fill(dqt.begin(), dqt.end(), 0.0f);
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t t = i0 + r;
        row_lse[r] = 0.0f;
        delta[r] = 0.0f;
        if (t >= s.t) continue;
        const float* o = out + ((b * s.t + t) * s.n + n) * h;
        const float* d_o = dout + ((b * s.t + t) * s.n + n) * h;
        float sum = 0.0f;
        for (int64_t d = 0; d < h; ++d) {
          dot[r * h + d] = d_o[d];
          sum += d_o[d] * o[d];
        }
        delta[r] = sum;
        row_lse[r] = lse[(b * s.n + n) * s.t + t];
      }
      const float* qt = p.q.data() + (g * s.tp + i0) * h;
      int64_t first, end;
      key_blocks(s, p, i0, &first, &end);
      for (int64_t j0 = first; j0 < end; j0 += kKeys) {
        scores_tile(qt, h, p.kt.data() + j0, s.sp, pr.data());
        if (s.cap > 0.0f) cap_tile(s.cap, pr.data(), slope.data());
        for (int64_t r = 0; r < kRows; ++r) {
          float* row = pr.data() + r * kKeys;
          if (!mask_row(p, i0 + r, j0, row)) {
            std::fill(row, row + kKeys, 0.0f);
            continue;
          }
          const v8 top = splat(row_lse[r]);
          for (int64_t j = 0; j < kKeys; j += 8) store(row + j, vexp(load(row + j) - top));
        }
        scores_tile(dot.data(), h, p.vt.data() + j0, s.sp, dp.data());  // dP = dO V^T
        for (int64_t r = 0; r < kRows; ++r) {
          float* dpr = dp.data() + r * kKeys;
          float* prr = pr.data() + r * kKeys;
          const v8 dr = splat(delta[r]);
          if (s.drop) {  // dS = P (Z dP - D); P becomes Z P, the probabilities the forward used
            float z[kKeys];
            std::fill(z, z + kKeys, 1.0f);
            drop_row(row_key(s.rng, s.rng[2] + b, s.rng[3] + n, i0 + r), j0, s.drop, s.kept, z);
            for (int64_t j = 0; j < kKeys; j += 8) {
              const v8 pj = load(prr + j), zj = load(z + j);
              store(dpr + j, pj * (zj * load(dpr + j) - dr));
              store(prr + j, pj * zj);
            }
          } else {
            for (int64_t j = 0; j < kKeys; j += 8) store(dpr + j, load(prr + j) * (load(dpr + j) - dr));
          }
          if (s.cap > 0.0f)  // through the cap: d(cap tanh(x / cap)) / dx = 1 - tanh^2
            for (int64_t j = 0; j < kKeys; j += 8) store(dpr + j, load(dpr + j) * load(slope.data() + r * kKeys + j));
        }
        // dV[j] += sum_r (Z P)[r, j] dO[r]
        accumulate(dvp.data() + j0 * h, kKeys, pr.data(), 1, kKeys, kRows, dot.data(), h);
        // dS now in dp: dQ += dS K (scaled at the end), dK += dS^T (scale * Q)
        accumulate(dqt.data(), kRows, dp.data(), kKeys, 1, kKeys, p.k.data() + j0 * h, h);
        accumulate(dkp.data() + j0 * h, kKeys, dp.data(), 1, kKeys, kRows, qt, h);
      }
      for (int64_t r = 0; r < kRows && i0 + r < s.t; ++r) {
        float* dst = dq + ((b * s.t + i0 + r) * s.n + n) * h;
        for (int64_t d = 0; d < h; ++d) dst[d] = dqt[r * h + d] * s.scale;
      }
    }
  }
  for (int64_t t = 0; t < s.t; ++t) {
    std::memcpy(dk + ((b * s.t + t) * s.kv + head) * h, dkp.data() + t * h, h * sizeof(float));
    std::memcpy(dv + ((b * s.t + t) * s.kv + head) * h, dvp.data() + t * h, h * sizeof(float));
  }
}

// Runs work(i) for i < count on the caller's thread and on helpers from XLA's pool. The caller
// takes work too, so a pool that is busy elsewhere only means fewer helpers; a helper that starts
// after the work is gone touches nothing but the shared counters.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t count, F work) {
  struct Counters {
    std::atomic<int64_t> next{0}, active{0};
  };
  auto counters = std::make_shared<Counters>();
  auto run = [counters, count, &work]() {
    for (int64_t i; (i = counters->next.fetch_add(1)) < count;) work(i);
  };
  const int64_t helpers = std::min<int64_t>(count - 1, std::max<int64_t>(pool.num_threads() - 1, 0));
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([counters, count, &work]() {
      counters->active.fetch_add(1);
      for (int64_t j; (j = counters->next.fetch_add(1)) < count;) work(j);
      counters->active.fetch_sub(1);
    });
  }
  run();
  while (counters->active.load() > 0) std::this_thread::yield();
}

ffi::Error shape_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                    const ffi::Buffer<ffi::S32>& seg, const ffi::Buffer<ffi::U32>& rng, const Settings& a, Shape* s) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), sd = seg.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || sd.size() != 2)
    return ffi::Error::InvalidArgument("jaxtune attention: q, k must be rank 4 and segment ids rank 2");
  if (rng.element_count() != 4 || a.drop < 0 || a.drop >= 65536)
    return ffi::Error::InvalidArgument("jaxtune attention: dropout needs 4 uint32 (seed, first row, first head) "
                                       "and 0 <= drop < 65536");
  *s = Shape{qd[0], qd[1], qd[2], kd[2], qd[3], 0, 0, 0, a.scale, a.causal != 0, a.left, a.right,
             static_cast<uint32_t>(a.drop), a.kept, a.softcap, rng.typed_data()};
  // v is read with k's strides: another length would read past its end, another head dim garbage.
  if (kd[0] != s->b || kd[1] != s->t || kd[3] != s->h || sd[0] != s->b || sd[1] != s->t || s->kv == 0 ||
      s->n % s->kv != 0 || s->h % 8 != 0 || vd.size() != kd.size() ||
      !std::equal(vd.begin(), vd.end(), kd.begin()))
    return ffi::Error::InvalidArgument("jaxtune attention: shapes do not fit q (B, T, N, H), k and v (B, T, K, H), "
                                       "segment ids (B, T)");
  s->g = s->n / s->kv;
  s->tp = (s->t + kRows - 1) / kRows * kRows;
  s->sp = (s->t + kKeys - 1) / kKeys * kKeys;
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::U32> rng,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, Settings settings) {
  Shape s;
  if (ffi::Error e = shape_of(q, k, v, seg, rng, settings, &s); e.failure()) return e;
  parallel_for(pool, s.b * s.kv, [&](int64_t group) {
    forward_group(s, group, q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(), out->typed_data(),
                  lse->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::U32> rng,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    Settings settings) {
  Shape s;
  if (ffi::Error e = shape_of(q, k, v, seg, rng, settings, &s); e.failure()) return e;
  parallel_for(pool, s.b * s.kv, [&](int64_t group) {
    backward_group(s, group, q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(), out.typed_data(),
                   lse.typed_data(), dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data());
  });
  return ffi::Error::Success();
}

// q, k, v, the segment ids and the dropout words: the arguments both entry points start with.
auto attention_inputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::U32>>();
}

}  // namespace

// Both entry points take the call's attributes as one Settings, decoded by name.
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(Settings, ffi::StructMember<float>("scale"),
                                      ffi::StructMember<int32_t>("causal"), ffi::StructMember<int32_t>("left"),
                                      ffi::StructMember<int32_t>("right"), ffi::StructMember<int32_t>("drop"),
                                      ffi::StructMember<float>("kept"), ffi::StructMember<float>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtuneAttentionForward, forward,
                              attention_inputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attrs<Settings>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtuneAttentionBackward, backward,
                              attention_inputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attrs<Settings>());
