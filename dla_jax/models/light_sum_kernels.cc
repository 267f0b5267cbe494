// The light families' layer-attention branch (dla_jax.models.layer_attention.light_sum) on
// the CPU, forward and backward, as XLA FFI handlers.
//
// XLA:CPU runs it as many memory-bound passes over [B, H, W, C] (padded copies, shifted
// products, two convs of dz, their kernel gradients, per-image sums). Here each image is
// read once, while it sits in cache, with every result computed in the same loop over its
// pixels. Images are independent (each writes its own rows, per-image sums included),
// so the batch is split over threads and over devices; the caller sums over images.
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
//   d_shortcut       = (dz · gate + excite_conv) · λ   (refresh)   or   dz · λ
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

// Calls visit(t, pixels) for each neighbour (h+i-1, w+j-1) of pixel (h, w) inside the image:
// tap t = 3i + j and the neighbour's offset from the pixel, in pixels. For interior pixels
// (kBorder false) the nine calls unroll with constant taps.
template <bool kBorder, typename Visit>
__attribute__((always_inline)) inline void ForNeighbours(int64_t h, int64_t w, int64_t H, int64_t W, Visit&& visit) {
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      if (kBorder && (h + i - 1 < 0 || h + i - 1 >= H || w + j - 1 < 0 || w + j - 1 >= W)) continue;
      visit(3 * i + j, (i - 1) * W + (j - 1));
    }
  }
}

// Calls pixel(border, h, w) for every pixel, border a std::bool_constant: true on the image's edge.
template <typename Pixel>
__attribute__((always_inline)) inline void ForPixels(int64_t H, int64_t W, Pixel&& pixel) {
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t w = 0; w < W; ++w) {
      if (h > 0 && h < H - 1 && w > 0 && w < W - 1) {
        pixel(std::false_type{}, h, w);
      } else {
        pixel(std::true_type{}, h, w);
      }
    }
  }
}

// What both directions read: the images (out, shortcut) and the branch's gates and weights.
template <typename T>
struct Operands {
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

// What z's channel vector c is made of, besides the images: both kernels' taps, heads, gate and λ.
template <typename T>
struct ZWeights {
  typename Simd<T>::Vec value_kernel[9], excite_kernel[9], heads, gate, lam;
  __attribute__((always_inline)) ZWeights(const Operands<T>& p, const ImageOperands<T>& in, int64_t c, bool refresh) {
    using S = Simd<T>;
    const int64_t C = p.channels;
    for (int t = 0; t < 9; ++t) {
      value_kernel[t] = S::Load(p.value_kernel + t * C + c);
      excite_kernel[t] = refresh ? S::Load(p.excite_kernel + t * C + c) : typename S::Vec{};
    }
    heads = S::Load(in.heads + c);
    gate = S::Load(in.gate + c);
    lam = S::Load(p.lam + c);
  }
};

// z's channel vector at pixel (h, w) of image `in`, `at` = its offset there: the forward pass's sum.
template <typename T, bool kRefresh, bool kBorder>
__attribute__((always_inline)) inline typename Simd<T>::Vec ZAt(const Operands<T>& p, const ImageOperands<T>& in,
                                                                const ZWeights<T>& weights, int64_t h, int64_t w,
                                                                int64_t at) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  const int64_t C = p.channels;
  Vec value = {}, excite = {};
  ForNeighbours<kBorder>(h, w, p.height, p.width, [&](int t, int64_t pixels) DLA_INLINE {
    value += S::Load(in.out + at + pixels * C) * weights.value_kernel[t];
    if (kRefresh) excite += S::Load(in.shortcut + at + pixels * C) * weights.excite_kernel[t];
  });
  const Vec shortcut = S::Load(in.shortcut + at);
  const Vec previous = kRefresh ? shortcut * weights.gate + excite : shortcut;
  return value * weights.heads + weights.lam * previous;
}

// Calls sink(pixel, c, z) for every pixel and channel vector of image b, pixel by pixel, all
// channels of a pixel together: the image is read in order.
template <typename T, bool kRefresh, typename Sink>
__attribute__((always_inline)) inline void ForZ(const Operands<T>& p, int64_t b, Sink&& sink) {
  const ImageOperands<T> in(p, b);
  ForPixels(p.height, p.width, [&](auto border, int64_t h, int64_t w) DLA_INLINE {
    const int64_t pixel = h * p.width + w;
    for (int64_t c = 0; c < p.channels; c += Simd<T>::kLanes) {
      const ZWeights<T> weights(p, in, c, kRefresh);
      sink(pixel, c, ZAt<T, kRefresh, decltype(border)::value>(p, in, weights, h, w, pixel * p.channels + c));
    }
  });
}

// Per-channel running sums of one image, in a thread's own buffer (`count` of them, zeroed).
template <typename T>
T* ZeroedSums(int64_t count) {
  thread_local std::vector<T> sums;
  sums.assign(count, T{0});
  return sums.data();
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
  const int64_t C = p.channels, pixels = p.height * p.width;
  T* z = p.z + b * pixels * C;
  T* shift = ZeroedSums<T>(3 * C);
  T *sum = shift + C, *squares = sum + C;
  ForZ<T, kRefresh>(p, b, [&](int64_t pixel, int64_t c, Vec value) DLA_INLINE {
    S::Store(z + pixel * C + c, value);
    if (!p.statistics) return;
    if (pixel == 0) S::Store(shift + c, value);
    const Vec shifted = value - S::Load(shift + c);
    S::Store(sum + c, S::Load(sum + c) + shifted);
    S::Store(squares + c, S::Load(squares + c) + shifted * shifted);
  });
  for (int64_t c = 0; c < C; c += S::kLanes) {
    const Vec mean_shifted = S::Load(sum + c) / static_cast<T>(pixels);
    const Vec m2 = S::Load(squares + c) - S::Load(sum + c) * mean_shifted;
    S::Store(p.image_mean + b * C + c, S::Load(shift + c) + mean_shifted);
    S::Store(p.image_m2 + b * C + c, m2 > 0 ? m2 : Vec{});
  }
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
  const int64_t C = p.channels;
  const T* dy = p.dy + b * p.height * p.width * C;
  T* sum_dy = ZeroedSums<T>(2 * C);
  T* sum_dy_centered = sum_dy + C;
  ForZ<T, kRefresh>(p, b, [&](int64_t pixel, int64_t c, Vec z) DLA_INLINE {
    const Vec g = S::Load(dy + pixel * C + c);
    S::Store(sum_dy + c, S::Load(sum_dy + c) + g);
    S::Store(sum_dy_centered + c, S::Load(sum_dy_centered + c) + g * (z - S::Load(p.z_mean + c)));
  });
  for (int64_t c = 0; c < C; c += S::kLanes) {
    S::Store(p.sum_dy + b * C + c, S::Load(sum_dy + c));
    S::Store(p.sum_dy_centered + b * C + c, S::Load(sum_dy_centered + c));
  }
}

template <typename T>
struct Backward : Operands<T> {
  bool batch_norm;
  const T *dy, *dy_scale, *offset, *z_scale, *z_mean;
  T *d_out, *d_shortcut, *value_taps, *excite_taps, *shortcut_dz, *d_heads;
};

// One channel vector at a time over the whole image: first its dz into a compact buffer
// (one vector per pixel; with batch_norm, z recomputed), then the convs of dz, with the
// kernels' taps and tap sums held in registers.
template <typename T, bool kRefresh>
__attribute__((always_inline)) inline void BackwardBody(const Backward<T>& p, int64_t b) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  const int64_t H = p.height, W = p.width, C = p.channels, L = S::kLanes;
  const ImageOperands<T> in(p, b);
  const T *out = in.out, *sc = in.shortcut, *dy = p.dy + in.image;
  T* d_out = p.d_out + in.image;
  T* d_sc = p.d_shortcut + in.image;
  thread_local std::vector<T> buffer;
  buffer.resize(H * W * L);
  T* dz = buffer.data();
  for (int64_t c = 0; c < C; c += L) {
    const Vec dy_scale = S::Load(p.dy_scale + c), z_scale = S::Load(p.z_scale + c), z_mean = S::Load(p.z_mean + c);
    const Vec offset = S::Load(p.offset + c);
    if (p.batch_norm) {
      const ZWeights<T> weights(p, in, c, kRefresh);
      ForPixels(H, W, [&](auto border, int64_t h, int64_t w) DLA_INLINE {
        const int64_t pixel = h * W + w, at = pixel * C + c;
        const Vec z = ZAt<T, kRefresh, decltype(border)::value>(p, in, weights, h, w, at);
        S::Store(dz + pixel * L, dy_scale * S::Load(dy + at) + z_scale * (z - z_mean) + offset);
      });
    } else {
      for (int64_t pixel = 0; pixel < H * W; ++pixel) {
        S::Store(dz + pixel * L, dy_scale * S::Load(dy + pixel * C + c) + offset);
      }
    }
    Vec value_kernel[9], excite_kernel[9], value_taps[9] = {}, excite_taps[9] = {};
    for (int t = 0; t < 9; ++t) {  // flipped: the convs of dz are the forward convs' adjoints
      value_kernel[t] = S::Load(p.value_kernel + (8 - t) * C + c);
      excite_kernel[t] = kRefresh ? S::Load(p.excite_kernel + (8 - t) * C + c) : Vec{};
    }
    const Vec heads = S::Load(in.heads + c), gate = S::Load(in.gate + c), lam = S::Load(p.lam + c);
    Vec shortcut_dz = {}, d_heads = {};
    ForPixels(H, W, [&](auto border, int64_t h, int64_t w) DLA_INLINE {
      const int64_t pixel = h * W + w, at = pixel * C + c;
      const Vec g = S::Load(dz + pixel * L);
      Vec value_conv = {}, excite_conv = {};
      ForNeighbours<decltype(border)::value>(h, w, H, W, [&](int t, int64_t pixels) DLA_INLINE {
        const Vec neighbour = S::Load(dz + (pixel + pixels) * L);
        value_conv += neighbour * value_kernel[t];
        value_taps[t] += S::Load(out + at + pixels * C) * g;
        if (kRefresh) {
          excite_conv += neighbour * excite_kernel[t];
          excite_taps[t] += S::Load(sc + at + pixels * C) * g;
        }
      });
      S::Store(d_out + at, value_conv * heads);
      d_heads += S::Load(out + at) * value_conv;
      shortcut_dz += S::Load(sc + at) * g;
      S::Store(d_sc + at, kRefresh ? (g * gate + excite_conv) * lam : g * lam);
    });
    for (int t = 0; t < 9; ++t) {
      S::Store(p.value_taps + (b * 9 + t) * C + c, value_taps[t] * heads);
      S::Store(p.excite_taps + (b * 9 + t) * C + c, excite_taps[t]);
    }
    S::Store(p.shortcut_dz + b * C + c, shortcut_dz);
    S::Store(p.d_heads + b * C + c, d_heads);
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
  using T = std::remove_const_t<std::remove_pointer_t<decltype(problem.out)>>;
  if (channels % Simd<T>::kLanes != 0) {
    return ffi::Error::InvalidArgument("dla_jax light_sum kernel: channels must be a multiple of the vector width");
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

template <ffi::DataType D>
using Image4 = ffi::Buffer<D, 4>;
template <ffi::DataType D>
using Vectors = ffi::Buffer<D, 2>;

// Every handler takes the per-image operands first ([B, H, W, C] images, then [B, C] vectors),
// then the shared ones ([9, C] kernels, tap t = 3i + j, and [C] vectors).

template <ffi::DataType D>
Operands<ffi::NativeType<D>> Read(Image4<D> out, Image4<D> shortcut, Vectors<D> heads, Vectors<D> gate,
                                  Vectors<D> value_kernel, Vectors<D> excite_kernel, ffi::Buffer<D, 1> lam,
                                  bool refresh) {
  const auto d = out.dimensions();
  return {d[0],
          d[1],
          d[2],
          d[3],
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
ffi::Error LightSumForward(ffi::ThreadPool pool, Image4<D> out, Image4<D> shortcut, Vectors<D> heads, Vectors<D> gate,
                           Vectors<D> value_kernel, Vectors<D> excite_kernel, ffi::Buffer<D, 1> lam, bool refresh,
                           bool statistics, ffi::ResultBuffer<D, 4> z, ffi::ResultBuffer<D, 2> image_mean,
                           ffi::ResultBuffer<D, 2> image_m2) {
  const Forward<ffi::NativeType<D>> problem{{Read(out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh)},
                                            statistics,
                                            z->typed_data(),
                                            image_mean->typed_data(),
                                            image_m2->typed_data()};
  return ForEachImage(pool, problem);
}

template <ffi::DataType D>
ffi::Error LightSumGradientSums(ffi::ThreadPool pool, Image4<D> out, Image4<D> shortcut, Image4<D> dy,
                                Vectors<D> heads, Vectors<D> gate, Vectors<D> value_kernel, Vectors<D> excite_kernel,
                                ffi::Buffer<D, 1> lam, ffi::Buffer<D, 1> z_mean, bool refresh,
                                ffi::ResultBuffer<D, 2> sum_dy, ffi::ResultBuffer<D, 2> sum_dy_centered) {
  const GradientSums<ffi::NativeType<D>> problem{
      {Read(out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh)},
      dy.typed_data(),
      z_mean.typed_data(),
      sum_dy->typed_data(),
      sum_dy_centered->typed_data()};
  return ForEachImage(pool, problem);
}

template <ffi::DataType D>
ffi::Error LightSumBackward(ffi::ThreadPool pool, Image4<D> out, Image4<D> shortcut, Image4<D> dy, Vectors<D> heads,
                            Vectors<D> gate, Vectors<D> value_kernel, Vectors<D> excite_kernel, ffi::Buffer<D, 1> lam,
                            ffi::Buffer<D, 1> dy_scale, ffi::Buffer<D, 1> offset, ffi::Buffer<D, 1> z_scale,
                            ffi::Buffer<D, 1> z_mean, bool refresh, bool batch_norm, ffi::ResultBuffer<D, 4> d_out,
                            ffi::ResultBuffer<D, 4> d_shortcut, ffi::ResultBuffer<D, 3> value_taps,
                            ffi::ResultBuffer<D, 3> excite_taps, ffi::ResultBuffer<D, 2> shortcut_dz,
                            ffi::ResultBuffer<D, 2> d_heads) {
  const Backward<ffi::NativeType<D>> problem{
      {Read(out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh)},
      batch_norm,
      dy.typed_data(),
      dy_scale.typed_data(),
      offset.typed_data(),
      z_scale.typed_data(),
      z_mean.typed_data(),
      d_out->typed_data(),
      d_shortcut->typed_data(),
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
  auto images = ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<Image4<D>>().template Arg<Image4<D>>();
  return WithGatesAndWeights<D>(std::move(images))  // out, shortcut, ...
      .template Attr<bool>("refresh")
      .template Attr<bool>("statistics")
      .template Ret<Image4<D>>()    // z
      .template Ret<Vectors<D>>()   // image_mean
      .template Ret<Vectors<D>>();  // image_m2
}

template <ffi::DataType D>
auto ImagesAndGradient() {  // out, shortcut, dy
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<Image4<D>>()
      .template Arg<Image4<D>>()
      .template Arg<Image4<D>>();
}

template <ffi::DataType D>
auto LightSumGradientSumsBinding() {
  return WithGatesAndWeights<D>(ImagesAndGradient<D>())
      .template Arg<ffi::Buffer<D, 1>>()  // z_mean
      .template Attr<bool>("refresh")
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
      .template Attr<bool>("batch_norm")
      .template Ret<Image4<D>>()          // d_out
      .template Ret<Image4<D>>()          // d_shortcut
      .template Ret<ffi::Buffer<D, 3>>()  // value_taps
      .template Ret<ffi::Buffer<D, 3>>()  // excite_taps
      .template Ret<Vectors<D>>()         // shortcut_dz
      .template Ret<Vectors<D>>();        // d_heads
}

}  // namespace

#define DLA_HANDLERS(NAME)                                                                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME##F32, NAME<ffi::F32>, NAME##Binding<ffi::F32>()); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME##F64, NAME<ffi::F64>, NAME##Binding<ffi::F64>());

DLA_HANDLERS(LightSumForward)
DLA_HANDLERS(LightSumGradientSums)
DLA_HANDLERS(LightSumBackward)
