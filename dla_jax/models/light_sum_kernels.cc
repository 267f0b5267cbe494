// The light families' layer-attention branch (dla_jax.models.layer_attention.light_sum) on
// the CPU, forward and backward, and the backward pass of DLA-B's cache read (CacheBackward), as
// XLA FFI handlers.
//
// XLA:CPU runs it as many memory-bound passes over [B, H, W, C] (padded copies, shifted
// products, two convs of dz, their kernel gradients, per-image sums). Here each image is
// read once, a channel vector at a time, into zero-padded panels that stay in cache, and
// every result is computed from them: blocks of neighbouring outputs share the loads of
// their 3×3 windows, and the kernels' taps stay in registers. Images are independent (each
// writes its own rows, per-image sums included), so the batch is split over threads and
// over devices; the caller sums over images.
//
// Forward: z = dwconv(out, value_kernel)·heads + λ·previous, previous = shortcut·gate +
// dwconv(shortcut, excite_kernel) (refresh) or shortcut; and each image's mean of z and
// Σ_hw (z - mean)², from which the caller forms the BatchNorm's batch statistics.
// Gradient sums: each image's Σ_hw dy and Σ_hw dy·(z - z_mean), z recomputed (the forward
// pass saves none) and z_mean its batch mean, from which the caller forms the BatchNorm's
// backward pass as a per-channel affine map dz = dy_scale·dy + offset + z_scale·(z - z_mean).
// Backward, for one image, dz = dy_scale·dy + offset (+ z_scale·(z - z_mean), z recomputed,
// where batch_norm) formed as dy is read; x[h+i-1, w+j-1] is 0 outside the image; tap t = 3i + j:
//   value_conv[h, w] = Σ_t dz[h+i-1, w+j-1] · value_kernel[8 - t]
//   excite_conv      the same with excite_kernel
//   d_out            = value_conv · heads
//   d_shortcut       = (dz · gate + excite_conv) · λ   (refresh)   or   dz · λ   (not written if empty)
//   value_taps[t]    = heads · Σ_hw out[h+i-1, w+j-1] · dz[h, w]
//   excite_taps[t]   = Σ_hw shortcut[h+i-1, w+j-1] · dz[h, w]        (refresh only)
//   shortcut_dz      = Σ_hw shortcut · dz
//   d_heads          = Σ_hw out · value_conv

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kVectorBytes = 64;

// On the loops' lambdas: inlined, their vectors stay in registers (GCC's inliner may refuse large ones).
#define DLA_INLINE __attribute__((always_inline))

template <typename T>
struct Simd {
  typedef T Vec __attribute__((vector_size(kVectorBytes)));
  typedef Vec UnalignedVec __attribute__((aligned(alignof(T))));
  static constexpr int64_t kLanes = kVectorBytes / sizeof(T);
  __attribute__((always_inline)) static Vec Load(const T* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
  __attribute__((always_inline)) static void Store(T* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
};

// One channel vector of an image at a time, zero-padded by a pixel on every side: [H + 2][W + 2]
// vectors in a thread's own buffer, `count` panels of them. The convs read their 3×3 windows
// from a panel at fixed offsets, without bounds checks, and from cache; the image itself is
// read once per channel vector.
template <typename T>
class Panels {
 public:
  using S = Simd<T>;

  // Borders zeroed once: afterwards only interiors are written.
  Panels(int count, int64_t height, int64_t width)
      : height_(height), width_(width), row_((width + 2) * S::kLanes), size_((height + 2) * row_) {
    thread_local std::vector<T> buffer;
    buffer.resize(count * size_ + S::kLanes);
    const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
    data_ = buffer.data() + (-address % kVectorBytes) / sizeof(T);
    for (int panel = 0; panel < count; ++panel) {
      T* start = data_ + panel * size_;
      std::fill(start, start + row_, T{0});
      std::fill(start + (height + 1) * row_, start + size_, T{0});
      for (int64_t h = 0; h < height; ++h) {
        S::Store(At(panel, h, -1), typename S::Vec{});
        S::Store(At(panel, h, width), typename S::Vec{});
      }
    }
  }

  T* At(int panel, int64_t h, int64_t w) const { return data_ + panel * size_ + (h + 1) * row_ + (w + 1) * S::kLanes; }
  int64_t Row() const { return row_; }

  // Copies channel vector c of an [H, W, C] image into the interior of `panel`.
  void Pack(int panel, const T* image, int64_t channels, int64_t c) {
    for (int64_t h = 0; h < height_; ++h) {
      for (int64_t w = 0; w < width_; ++w) S::Store(At(panel, h, w), S::Load(image + (h * width_ + w) * channels + c));
    }
  }

 private:
  int64_t height_, width_, row_, size_;
  T* data_;
};

// The 3×3 windows of kBlock neighbouring outputs (h, w + o) of a panel, read together: each
// input x = (h + i - 1, w + k - 1) is loaded once and tap(o, t, x) called for every output o it
// feeds, through tap t = 3i + (k - o). `at` points at (h, w) in the panel, `row` its row length.
template <int kBlock, typename T, typename Tap>
__attribute__((always_inline)) inline void ForBlockTaps(const T* at, int64_t row, Tap&& tap) {
#pragma GCC unroll 3
  for (int i = 0; i < 3; ++i) {
#pragma GCC unroll 8
    for (int k = 0; k < kBlock + 2; ++k) {
      const typename Simd<T>::Vec x = Simd<T>::Load(at + (i - 1) * row + (k - 1) * Simd<T>::kLanes);
#pragma GCC unroll 8
      for (int o = 0; o < kBlock; ++o) {
        if (k - o >= 0 && k - o < 3) tap(o, 3 * i + k - o, x);
      }
    }
  }
}

// ForBlocks' default: nothing prefetched.
struct NoPrefetch {
  void operator()(int64_t) const {}
};

// Calls block(size, h, w) for blocks of outputs (h, w .. w + size - 1) that cover an H×W image,
// size a std::integral_constant: kBlock wherever the row has room, else 1; and prefetch(pixel)
// for each pixel of the block first.
template <int kBlock, typename Block, typename Prefetch = NoPrefetch>
__attribute__((always_inline)) inline void ForBlocks(int64_t H, int64_t W, Block&& block, Prefetch&& prefetch = {}) {
  for (int64_t h = 0; h < H; ++h) {
    int64_t w = 0;
    for (; w + kBlock <= W; w += kBlock) {
      for (int o = 0; o < kBlock; ++o) prefetch(h * W + w + o);
      block(std::integral_constant<int, kBlock>{}, h, w);
    }
    for (; w < W; ++w) {
      prefetch(h * W + w);
      block(std::integral_constant<int, 1>{}, h, w);
    }
  }
}

// The image's next channel vector, prefetched into L2 pixel by pixel during the current one's
// first sweep, so that packing it reads from cache: `count` arrays (none after the last vector).
template <typename T>
struct Ahead {
  int count;
  int64_t channels;
  const T* at[3];
  // The same for one more [H, W, C] array (dy), `image` at its current channel vector.
  Ahead Also(const T* image) const {
    Ahead more = *this;
    if (count) more.at[more.count++] = image + Simd<T>::kLanes;
    return more;
  }
  void operator()(int64_t pixel) const {
    for (int a = 0; a < count; ++a) __builtin_prefetch(at[a] + pixel * channels, 0, 1);
  }
};

// Outputs per block: their accumulators and the kernels' taps fill the 32 vector registers of AVX-512.
constexpr int kBlock = 4;

// What both directions read: the images (out, shortcut) and the branch's gates and weights.
template <typename T>
struct Operands {
  using Element = T;
  int64_t batch, height, width, channels;
  bool refresh;
  const T *out, *shortcut, *heads, *gate, *value_kernel, *excite_kernel, *lam;
};

// Image b's share of the per-image operands; `image` is its offset in [B, H, W, C] arrays.
template <typename T>
struct ImageOperands {
  int64_t image;
  const T *out, *shortcut, *heads, *gate;
  ImageOperands(const Operands<T>& p, int64_t b)
      : image(b * p.height * p.width * p.channels),
        out(p.out + image),
        shortcut(p.shortcut + image),
        heads(p.heads + b * p.channels),
        gate(p.gate + b * p.channels) {}
};

// What z's channel vector c is made of, besides the images: both kernels' taps (`flipped`
// for the backward convs, the forward convs' adjoints), heads, gate and λ.
template <typename T>
struct ZWeights {
  typename Simd<T>::Vec value_kernel[9], excite_kernel[9], heads, gate, lam;
  __attribute__((always_inline)) ZWeights(const Operands<T>& p, const ImageOperands<T>& in, int64_t c, bool refresh,
                                          bool flipped) {
    using S = Simd<T>;
    const int64_t C = p.channels;
    for (int t = 0; t < 9; ++t) {
      const int64_t tap = flipped ? 8 - t : t;
      value_kernel[t] = S::Load(p.value_kernel + tap * C + c);
      excite_kernel[t] = refresh ? S::Load(p.excite_kernel + tap * C + c) : typename S::Vec{};
    }
    heads = S::Load(in.heads + c);
    gate = S::Load(in.gate + c);
    lam = S::Load(p.lam + c);
  }
};

// The panels: the channel vector's out and shortcut (every kernel) and dz (the backward pass).
enum : int { kOut, kShortcut, kDz };

// z's channel vector at a block of outputs (h, w + o) from the out and shortcut panels.
template <int kSize, bool kRefresh, typename T>
__attribute__((always_inline)) inline void BlockZ(const Panels<T>& panels, const ZWeights<T>& weights, int64_t h,
                                                  int64_t w, typename Simd<T>::Vec (&z)[kSize]) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  Vec value[kSize] = {}, excite[kSize] = {};
  const T *out = panels.At(kOut, h, w), *shortcut = panels.At(kShortcut, h, w);
  ForBlockTaps<kSize>(out, panels.Row(), [&](int o, int t, Vec x) DLA_INLINE { value[o] += x * weights.value_kernel[t]; });
  if (kRefresh) {
    ForBlockTaps<kSize>(shortcut, panels.Row(),
                        [&](int o, int t, Vec x) DLA_INLINE { excite[o] += x * weights.excite_kernel[t]; });
  }
  for (int o = 0; o < kSize; ++o) {
    const Vec s = S::Load(shortcut + o * S::kLanes);
    z[o] = value[o] * weights.heads + weights.lam * (kRefresh ? s * weights.gate + excite[o] : s);
  }
}

// Calls channel(panels, c, ahead) for each channel vector c of the image, with its out and
// shortcut packed into panels kOut and kShortcut of `count`; `ahead` prefetches the next ones.
template <typename T, typename Channel>
__attribute__((always_inline)) inline void ForChannelVectors(const Operands<T>& p, const ImageOperands<T>& in,
                                                             int count, Channel&& channel) {
  constexpr int64_t L = Simd<T>::kLanes;
  Panels<T> panels(count, p.height, p.width);
  for (int64_t c = 0; c < p.channels; c += L) {
    panels.Pack(kOut, in.out, p.channels, c);
    panels.Pack(kShortcut, in.shortcut, p.channels, c);
    channel(panels, c, Ahead<T>{c + L < p.channels ? 2 : 0, p.channels, {in.out + c + L, in.shortcut + c + L}});
  }
}

template <typename T>
struct Forward : Operands<T> {
  bool statistics;
  T *z, *image_mean, *image_m2;
};

// z and, where `statistics` (training; else zeros), the image's mean of z and Σ_hw (z - mean)²
// from sums of z - z[0, 0] (its first pixel: a shift that keeps the sum of squares from cancelling).
template <typename T, bool kRefresh>
__attribute__((always_inline)) inline void ForwardBody(const Forward<T>& p, int64_t b) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  const int64_t H = p.height, W = p.width, C = p.channels;
  const ImageOperands<T> in(p, b);
  T* z_image = p.z + in.image;
  ForChannelVectors(p, in, 2, [&](const Panels<T>& panels, int64_t c, const Ahead<T>& ahead) DLA_INLINE {
    const ZWeights<T> weights(p, in, c, kRefresh, false);
    Vec shift = {}, sum = {}, squares = {};
    if (p.statistics) {
      Vec first[1];
      BlockZ<1, kRefresh>(panels, weights, 0, 0, first);
      shift = first[0];
    }
    ForBlocks<kBlock>(H, W, [&](auto block, int64_t h, int64_t w) DLA_INLINE {
      constexpr int size = decltype(block)::value;
      Vec z[size];
      BlockZ<size, kRefresh>(panels, weights, h, w, z);
      for (int o = 0; o < size; ++o) {
        S::Store(z_image + (h * W + w + o) * C + c, z[o]);
        if (p.statistics) {
          sum += z[o] - shift;
          squares += (z[o] - shift) * (z[o] - shift);
        }
      }
    }, ahead);
    const Vec mean_shifted = sum / static_cast<T>(H * W), m2 = squares - sum * mean_shifted;
    S::Store(p.image_mean + b * C + c, shift + mean_shifted);
    S::Store(p.image_m2 + b * C + c, m2 > 0 ? m2 : Vec{});
  });
}

template <typename T>
struct GradientSums : Operands<T> {
  const T* dy;
  const T* z_mean;
  T *sum_dy, *sum_dy_centered;
};

// The image's Σ_hw dy and Σ_hw dy·(z - z_mean), z recomputed (not saved by the forward pass).
template <typename T, bool kRefresh>
__attribute__((always_inline)) inline void GradientSumsBody(const GradientSums<T>& p, int64_t b) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  const int64_t W = p.width, C = p.channels;
  const ImageOperands<T> in(p, b);
  const T* dy = p.dy + in.image;
  ForChannelVectors(p, in, 2, [&](const Panels<T>& panels, int64_t c, const Ahead<T>& ahead) DLA_INLINE {
    const ZWeights<T> weights(p, in, c, kRefresh, false);
    const Vec z_mean = S::Load(p.z_mean + c);
    Vec sum_dy = {}, sum_dy_centered = {};
    ForBlocks<kBlock>(p.height, W, [&](auto block, int64_t h, int64_t w) DLA_INLINE {
      constexpr int size = decltype(block)::value;
      Vec z[size];
      BlockZ<size, kRefresh>(panels, weights, h, w, z);
      for (int o = 0; o < size; ++o) {
        const Vec g = S::Load(dy + (h * W + w + o) * C + c);
        sum_dy += g;
        sum_dy_centered += g * (z[o] - z_mean);
      }
    }, ahead.Also(dy + c));
    S::Store(p.sum_dy + b * C + c, sum_dy);
    S::Store(p.sum_dy_centered + b * C + c, sum_dy_centered);
  });
}

template <typename T>
struct Backward : Operands<T> {
  bool batch_norm;
  const T *dy, *dy_scale, *offset, *z_scale, *z_mean;
  T *d_out, *d_shortcut, *value_taps, *excite_taps, *shortcut_dz, *d_heads;
};

// Channel vector by channel vector, three sweeps over the panels: dz (with batch_norm, z
// recomputed), then the convs of dz and what reads them, then the kernels' taps.
template <typename T, bool kRefresh>
__attribute__((always_inline)) inline void BackwardBody(const Backward<T>& p, int64_t b) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  const int64_t H = p.height, W = p.width, C = p.channels;
  const ImageOperands<T> in(p, b);
  const T* dy = p.dy + in.image;
  T *d_out = p.d_out + in.image, *d_shortcut = p.d_shortcut ? p.d_shortcut + in.image : nullptr;
  ForChannelVectors(p, in, 3, [&](const Panels<T>& panels, int64_t c, const Ahead<T>& ahead) DLA_INLINE {
    const Vec dy_scale = S::Load(p.dy_scale + c), offset = S::Load(p.offset + c);
    const Vec z_scale = S::Load(p.z_scale + c), z_mean = S::Load(p.z_mean + c);
    const ZWeights<T> forward(p, in, c, kRefresh, false), weights(p, in, c, kRefresh, true);
    ForBlocks<kBlock>(H, W, [&](auto block, int64_t h, int64_t w) DLA_INLINE {
      constexpr int size = decltype(block)::value;
      Vec z[size] = {};
      if (p.batch_norm) BlockZ<size, kRefresh>(panels, forward, h, w, z);
      for (int o = 0; o < size; ++o) {
        const Vec g = dy_scale * S::Load(dy + (h * W + w + o) * C + c) + offset;
        S::Store(panels.At(kDz, h, w + o), p.batch_norm ? g + z_scale * (z[o] - z_mean) : g);
      }
    }, ahead.Also(dy + c));
    Vec shortcut_dz = {}, d_heads = {};
    ForBlocks<kBlock>(H, W, [&](auto block, int64_t h, int64_t w) DLA_INLINE {
      constexpr int size = decltype(block)::value;
      Vec value_conv[size] = {}, excite_conv[size] = {};
      ForBlockTaps<size>(panels.At(kDz, h, w), panels.Row(), [&](int o, int t, Vec x) DLA_INLINE {
        value_conv[o] += x * weights.value_kernel[t];
        if (kRefresh) excite_conv[o] += x * weights.excite_kernel[t];
      });
      for (int o = 0; o < size; ++o) {
        const int64_t at = (h * W + w + o) * C + c;
        const Vec g = S::Load(panels.At(kDz, h, w + o));
        S::Store(d_out + at, value_conv[o] * weights.heads);
        d_heads += S::Load(panels.At(kOut, h, w + o)) * value_conv[o];
        shortcut_dz += S::Load(panels.At(kShortcut, h, w + o)) * g;
        if (d_shortcut) {
          S::Store(d_shortcut + at, kRefresh ? (g * weights.gate + excite_conv[o]) * weights.lam : g * weights.lam);
        }
      }
    });
    Vec value_taps[9] = {}, excite_taps[9] = {};
    ForBlocks<kBlock>(H, W, [&](auto block, int64_t h, int64_t w) DLA_INLINE {
      constexpr int size = decltype(block)::value;
      Vec g[size];
      for (int o = 0; o < size; ++o) g[o] = S::Load(panels.At(kDz, h, w + o));
      ForBlockTaps<size>(panels.At(kOut, h, w), panels.Row(),
                         [&](int o, int t, Vec x) DLA_INLINE { value_taps[t] += x * g[o]; });
      if (kRefresh) {
        ForBlockTaps<size>(panels.At(kShortcut, h, w), panels.Row(),
                           [&](int o, int t, Vec x) DLA_INLINE { excite_taps[t] += x * g[o]; });
      }
    });
    for (int t = 0; t < 9; ++t) {
      S::Store(p.value_taps + (b * 9 + t) * C + c, value_taps[t] * weights.heads);
      S::Store(p.excite_taps + (b * 9 + t) * C + c, excite_taps[t]);
    }
    S::Store(p.shortcut_dz + b * C + c, shortcut_dz);
    S::Store(p.d_heads + b * C + c, d_heads);
  });
}

// DLA-B's cache read out = Σ_{t < filled} weights[t] ⊙ values[t] (weights [T, B, C], values
// [T, B, H, W, C]), backward, for one image: for each filled slot t, in one sweep of its value,
//   d_weights[t] = Σ_hw values[t] · d_out        d_values[t] += weights[t] · d_out   (in place)
// with d_out read from cache after the first slot; d_weights is 0 past `filled`. XLA:CPU
// copies each slot out of the cache, reduces it, and adds and writes back the slots apart.
template <typename T>
struct CacheBackward {
  using Element = T;
  int64_t batch, pixels, channels, capacity, filled;
  const T *weights, *values, *d_out;
  T *d_weights, *d_values;
};

// Channel vectors c .. c + kChunk - 1 of one slot of one image, over all its pixels.
template <int kChunk, typename T>
__attribute__((always_inline)) inline void CacheBackwardChunk(const CacheBackward<T>& p, int64_t slot, int64_t b,
                                                              int64_t c) {
  using S = Simd<T>;
  const int64_t C = p.channels, row = slot * p.batch + b, image = row * p.pixels * C;
  const T *weights = p.weights + row * C + c, *values = p.values + image + c;
  const T* d_out = p.d_out + b * p.pixels * C + c;
  T* d_values = p.d_values + image + c;
  typename S::Vec sum[kChunk] = {}, weight[kChunk];
#pragma GCC unroll 4
  for (int k = 0; k < kChunk; ++k) weight[k] = S::Load(weights + k * S::kLanes);
  for (int64_t at = 0; at < p.pixels * C; at += C) {
#pragma GCC unroll 4
    for (int k = 0; k < kChunk; ++k) {
      const int64_t i = at + k * S::kLanes;
      const typename S::Vec g = S::Load(d_out + i);
      sum[k] += S::Load(values + i) * g;
      S::Store(d_values + i, S::Load(d_values + i) + weight[k] * g);
    }
  }
#pragma GCC unroll 4
  for (int k = 0; k < kChunk; ++k) S::Store(p.d_weights + row * C + c + k * S::kLanes, sum[k]);
}

template <typename T>
__attribute__((always_inline)) inline void CacheBackwardBody(const CacheBackward<T>& p, int64_t b) {
  constexpr int64_t L = Simd<T>::kLanes;
  constexpr int kChunk = 4;
  for (int64_t slot = 0; slot < p.capacity; ++slot) {
    if (slot >= p.filled) {
      std::fill_n(p.d_weights + (slot * p.batch + b) * p.channels, p.channels, T{0});
      continue;
    }
    int64_t c = 0;
    for (; c + kChunk * L <= p.channels; c += kChunk * L) CacheBackwardChunk<kChunk>(p, slot, b, c);
    for (; c < p.channels; c += L) CacheBackwardChunk<1>(p, slot, b, c);
  }
}

// One clone per instruction set, picked at load time, so the build stays portable.
#define DLA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define DLA_IMAGE(PROBLEM, BODY, T) \
  DLA_CLONES void Image(const PROBLEM<T>& p, int64_t b) { p.refresh ? BODY<T, true>(p, b) : BODY<T, false>(p, b); }
DLA_IMAGE(Forward, ForwardBody, float)
DLA_IMAGE(Forward, ForwardBody, double)
DLA_IMAGE(GradientSums, GradientSumsBody, float)
DLA_IMAGE(GradientSums, GradientSumsBody, double)
DLA_IMAGE(Backward, BackwardBody, float)
DLA_IMAGE(Backward, BackwardBody, double)
DLA_CLONES void Image(const CacheBackward<float>& p, int64_t b) { CacheBackwardBody(p, b); }
DLA_CLONES void Image(const CacheBackward<double>& p, int64_t b) { CacheBackwardBody(p, b); }

// Hands images to whichever of XLA's threads are free. The caller takes images too and
// returns once every image is done; a helper that starts later finds none left and
// touches nothing but this shared state.
template <typename Problem>
struct Images {
  Problem problem;
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mutex;
  std::condition_variable finished;

  void Work() {
    for (int64_t b; (b = next.fetch_add(1)) < problem.batch;) {
      Image(problem, b);
      std::lock_guard<std::mutex> lock(mutex);
      if (++done == problem.batch) finished.notify_all();
    }
  }
};

template <typename Problem>
ffi::Error ForEachImage(ffi::ThreadPool& pool, const Problem& problem) {
  const int64_t batch = problem.batch, channels = problem.channels;
  using T = typename Problem::Element;
  if (channels % Simd<T>::kLanes != 0) {
    return ffi::Error::InvalidArgument("dla_jax CPU kernel: channels must be a multiple of the vector width");
  }
  if (batch == 0) return ffi::Error::Success();
  auto images = std::make_shared<Images<Problem>>();
  images->problem = problem;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), batch) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([images] { images->Work(); });
  images->Work();
  std::unique_lock<std::mutex> lock(images->mutex);
  images->finished.wait(lock, [&] { return images->done == batch; });
  return ffi::Error::Success();
}

// Images come in any shape whose last axis is the channels, with W an attribute: the forward
// pass takes them as [B, H, W, C], the backward passes as [B·H·W, C] rows of pixels (see
// `cpu_kernels._kernel_call` for why).
template <ffi::DataType D>
using Pixels = ffi::Buffer<D>;
template <ffi::DataType D>
using Vectors = ffi::Buffer<D, 2>;

// Every handler takes the per-image operands first (images, then [B, C] vectors), then the
// shared ones ([9, C] kernels, tap t = 3i + j, and [C] vectors).

template <ffi::DataType D>
Operands<ffi::NativeType<D>> Read(Pixels<D> out, Pixels<D> shortcut, Vectors<D> heads, Vectors<D> gate,
                                  Vectors<D> value_kernel, Vectors<D> excite_kernel, ffi::Buffer<D, 1> lam,
                                  bool refresh, int64_t width) {
  const int64_t batch = heads.dimensions()[0], channels = out.dimensions().back();
  const int64_t pixels = channels == 0 ? 0 : out.element_count() / channels;
  return {batch,
          batch == 0 || width == 0 ? 0 : pixels / batch / width,
          width,
          channels,
          refresh,
          out.typed_data(),
          shortcut.typed_data(),
          heads.typed_data(),
          gate.typed_data(),
          value_kernel.typed_data(),
          excite_kernel.typed_data(),
          lam.typed_data()};
}

template <ffi::DataType D>
ffi::Error LightSumForward(ffi::ThreadPool pool, Pixels<D> out, Pixels<D> shortcut, Vectors<D> heads, Vectors<D> gate,
                           Vectors<D> value_kernel, Vectors<D> excite_kernel, ffi::Buffer<D, 1> lam, bool refresh,
                           int64_t width, bool statistics, ffi::ResultBuffer<D> z, ffi::ResultBuffer<D, 2> image_mean,
                           ffi::ResultBuffer<D, 2> image_m2) {
  const Forward<ffi::NativeType<D>> problem{{Read(out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh, width)},
                                            statistics,
                                            z->typed_data(),
                                            image_mean->typed_data(),
                                            image_m2->typed_data()};
  return ForEachImage(pool, problem);
}

template <ffi::DataType D>
ffi::Error LightSumGradientSums(ffi::ThreadPool pool, Pixels<D> out, Pixels<D> shortcut, Pixels<D> dy,
                                Vectors<D> heads, Vectors<D> gate, Vectors<D> value_kernel, Vectors<D> excite_kernel,
                                ffi::Buffer<D, 1> lam, ffi::Buffer<D, 1> z_mean, bool refresh, int64_t width,
                                ffi::ResultBuffer<D, 2> sum_dy, ffi::ResultBuffer<D, 2> sum_dy_centered) {
  const GradientSums<ffi::NativeType<D>> problem{
      {Read(out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh, width)},
      dy.typed_data(),
      z_mean.typed_data(),
      sum_dy->typed_data(),
      sum_dy_centered->typed_data()};
  return ForEachImage(pool, problem);
}

template <ffi::DataType D>
ffi::Error LightSumBackward(ffi::ThreadPool pool, Pixels<D> out, Pixels<D> shortcut, Pixels<D> dy, Vectors<D> heads,
                            Vectors<D> gate, Vectors<D> value_kernel, Vectors<D> excite_kernel, ffi::Buffer<D, 1> lam,
                            ffi::Buffer<D, 1> dy_scale, ffi::Buffer<D, 1> offset, ffi::Buffer<D, 1> z_scale,
                            ffi::Buffer<D, 1> z_mean, bool refresh, int64_t width, bool batch_norm, ffi::ResultBuffer<D> d_out,
                            ffi::ResultBuffer<D> d_shortcut, ffi::ResultBuffer<D, 3> value_taps,
                            ffi::ResultBuffer<D, 3> excite_taps, ffi::ResultBuffer<D, 2> shortcut_dz,
                            ffi::ResultBuffer<D, 2> d_heads) {
  const Backward<ffi::NativeType<D>> problem{
      {Read(out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh, width)},
      batch_norm,
      dy.typed_data(),
      dy_scale.typed_data(),
      offset.typed_data(),
      z_scale.typed_data(),
      z_mean.typed_data(),
      d_out->typed_data(),
      d_shortcut->element_count() ? d_shortcut->typed_data() : nullptr,
      value_taps->typed_data(),
      excite_taps->typed_data(),
      shortcut_dz->typed_data(),
      d_heads->typed_data()};
  return ForEachImage(pool, problem);
}

// Binds what every handler takes after its per-image operands: the heads and gate [B, C],
// then the shared kernels and λ.
template <ffi::DataType D, typename Binding>
auto WithGatesAndWeights(Binding&& binding) {
  return std::move(binding)
      .template Arg<Vectors<D>>()          // heads
      .template Arg<Vectors<D>>()          // gate
      .template Arg<Vectors<D>>()          // value_kernel
      .template Arg<Vectors<D>>()          // excite_kernel
      .template Arg<ffi::Buffer<D, 1>>();  // lam
}

template <ffi::DataType D>
auto LightSumForwardBinding() {
  auto images = ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<Pixels<D>>().template Arg<Pixels<D>>();
  return WithGatesAndWeights<D>(std::move(images))  // out, shortcut, ...
      .template Attr<bool>("refresh")
      .template Attr<int64_t>("width")
      .template Attr<bool>("statistics")
      .template Ret<Pixels<D>>()    // z
      .template Ret<Vectors<D>>()   // image_mean
      .template Ret<Vectors<D>>();  // image_m2
}

template <ffi::DataType D>
auto ImagesAndGradient() {  // out, shortcut, dy
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<Pixels<D>>()
      .template Arg<Pixels<D>>()
      .template Arg<Pixels<D>>();
}

template <ffi::DataType D>
auto LightSumGradientSumsBinding() {
  return WithGatesAndWeights<D>(ImagesAndGradient<D>())
      .template Arg<ffi::Buffer<D, 1>>()  // z_mean
      .template Attr<bool>("refresh")
      .template Attr<int64_t>("width")
      .template Ret<Vectors<D>>()   // sum_dy
      .template Ret<Vectors<D>>();  // sum_dy_centered
}

template <ffi::DataType D>
auto LightSumBackwardBinding() {
  return WithGatesAndWeights<D>(ImagesAndGradient<D>())
      .template Arg<ffi::Buffer<D, 1>>()  // dy_scale
      .template Arg<ffi::Buffer<D, 1>>()  // offset
      .template Arg<ffi::Buffer<D, 1>>()  // z_scale
      .template Arg<ffi::Buffer<D, 1>>()  // z_mean
      .template Attr<bool>("refresh")
      .template Attr<int64_t>("width")
      .template Attr<bool>("batch_norm")
      .template Ret<Pixels<D>>()          // d_out
      .template Ret<Pixels<D>>()          // d_shortcut
      .template Ret<ffi::Buffer<D, 3>>()  // value_taps
      .template Ret<ffi::Buffer<D, 3>>()  // excite_taps
      .template Ret<Vectors<D>>()         // shortcut_dz
      .template Ret<Vectors<D>>();        // d_heads
}

// The cache read's backward pass: weights, d_weights [T, B, C]; values, d_values [T, B, H, W, C];
// d_out [B, H, W, C]; filled, the number of slots written. d_values is aliased with its result,
// which the kernel updates in place; it comes in its own shape, as XLA copied it around the call
// when it was reshaped to rows of pixels.
template <ffi::DataType D>
ffi::Error CacheReadBackward(ffi::ThreadPool pool, ffi::Buffer<D, 3> weights, ffi::Buffer<D> values,
                             ffi::Buffer<D> d_out, ffi::Buffer<D> d_values, ffi::Buffer<ffi::S32, 0> filled,
                             ffi::ResultBuffer<D, 3> d_weights, ffi::ResultBuffer<D> d_values_out) {
  const auto dimensions = weights.dimensions();
  const int64_t capacity = dimensions[0], batch = dimensions[1], channels = dimensions[2];
  const int64_t rows = capacity * batch * channels, count = std::clamp<int64_t>(filled.typed_data()[0], 0, capacity);
  const CacheBackward<ffi::NativeType<D>> problem{batch,
                                                  rows == 0 ? 0 : values.element_count() / rows,  // pixels
                                                  channels,
                                                  capacity,
                                                  count,
                                                  weights.typed_data(),
                                                  values.typed_data(),
                                                  d_out.typed_data(),
                                                  d_weights->typed_data(),
                                                  d_values_out->typed_data()};
  return ForEachImage(pool, problem);
}

template <ffi::DataType D>
auto CacheReadBackwardBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<D, 3>>()       // weights
      .template Arg<ffi::Buffer<D>>()          // values
      .template Arg<ffi::Buffer<D>>()          // d_out
      .template Arg<ffi::Buffer<D>>()          // d_values, aliased with the second result
      .template Arg<ffi::Buffer<ffi::S32, 0>>()  // filled
      .template Ret<ffi::Buffer<D, 3>>()       // d_weights
      .template Ret<ffi::Buffer<D>>();         // d_values
}

}  // namespace

#define DLA_HANDLERS(NAME)                                                                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME##F32, NAME<ffi::F32>, NAME##Binding<ffi::F32>()); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME##F64, NAME<ffi::F64>, NAME##Binding<ffi::F64>());

DLA_HANDLERS(LightSumForward)
DLA_HANDLERS(LightSumGradientSums)
DLA_HANDLERS(LightSumBackward)
DLA_HANDLERS(CacheReadBackward)
