// The light families' layer-attention branch (dla_jax.models.layer_attention.light_sum) on
// the CPU, forward and backward, as XLA FFI handlers.
//
// XLA:CPU runs it as many memory-bound passes over [B, H, W, C] (padded copies, shifted
// products, two convs of dz, their kernel gradients, per-image sums). Here each image is
// read once, while it sits in cache, with every result computed in the same loop over its
// pixels. Images are independent (each writes its own rows, per-image tap sums included),
// so the batch is split over threads and over devices; the caller sums over images.
//
// Forward: z = dwconv(out, value_kernel)·heads + λ·previous, previous = shortcut·gate +
// dwconv(shortcut, excite_kernel) (refresh) or shortcut.
// Backward, for one image (x[h+i-1, w+j-1] is 0 outside the image; tap t = 3i + j):
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

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kVectorBytes = 64;

template <typename T>
struct Simd {
  typedef T Vec __attribute__((vector_size(kVectorBytes)));
  typedef Vec UnalignedVec __attribute__((aligned(alignof(T))));
  static constexpr int64_t kLanes = kVectorBytes / sizeof(T);
  __attribute__((always_inline)) static Vec Load(const T* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
  __attribute__((always_inline)) static void Store(T* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
};

// The in-image neighbours of pixel (h, w): tap t = 3i + j and the offset of pixel (h+i-1, w+j-1).
struct Neighbours {
  int taps[9];
  int64_t offsets[9];
  int count = 0;
  Neighbours(int64_t h, int64_t w, int64_t H, int64_t W, int64_t C) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        const int64_t hh = h + i - 1, ww = w + j - 1;
        if (hh < 0 || hh >= H || ww < 0 || ww >= W) continue;
        taps[count] = 3 * i + j;
        offsets[count] = (hh * W + ww) * C;
        ++count;
      }
    }
  }
};

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

template <typename T>
struct Forward : Operands<T> {
  T* z;
};

template <typename T>
__attribute__((always_inline)) inline void ForwardBody(const Forward<T>& p, int64_t b) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  const int64_t H = p.height, W = p.width, C = p.channels, L = S::kLanes;
  const ImageOperands<T> in(p, b);
  const T *out = in.out, *sc = in.shortcut, *heads = in.heads, *gate = in.gate;
  T* z = p.z + in.image;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t w = 0; w < W; ++w) {
      Neighbours n(h, w, H, W, C);
      const int64_t at = (h * W + w) * C;
      for (int64_t c = 0; c < C; c += L) {
        Vec value = {}, excite = {};
        for (int k = 0; k < n.count; ++k) {
          const int64_t o = n.offsets[k] + c;
          value += S::Load(out + o) * S::Load(p.value_kernel + n.taps[k] * C + c);
          if (p.refresh) excite += S::Load(sc + o) * S::Load(p.excite_kernel + n.taps[k] * C + c);
        }
        const Vec previous = p.refresh ? S::Load(sc + at + c) * S::Load(gate + c) + excite : S::Load(sc + at + c);
        S::Store(z + at + c, value * S::Load(heads + c) + S::Load(p.lam + c) * previous);
      }
    }
  }
}

template <typename T>
struct Backward : Operands<T> {
  const T* dz;
  T *d_out, *d_shortcut, *value_taps, *excite_taps, *shortcut_dz, *d_heads;
};

template <typename T>
__attribute__((always_inline)) inline void BackwardBody(const Backward<T>& p, int64_t b) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  const int64_t H = p.height, W = p.width, C = p.channels, L = S::kLanes;
  const ImageOperands<T> in(p, b);
  const T *out = in.out, *sc = in.shortcut, *heads = in.heads, *gate = in.gate;
  const T* dz = p.dz + in.image;
  T* d_out = p.d_out + in.image;
  T* d_sc = p.d_shortcut + in.image;
  T* value_taps = p.value_taps + b * 9 * C;
  T* excite_taps = p.excite_taps + b * 9 * C;
  T* sdz = p.shortcut_dz + b * C;
  T* dh = p.d_heads + b * C;
  std::fill(value_taps, value_taps + 9 * C, T(0));
  std::fill(excite_taps, excite_taps + 9 * C, T(0));
  std::fill(sdz, sdz + C, T(0));
  std::fill(dh, dh + C, T(0));
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t w = 0; w < W; ++w) {
      Neighbours n(h, w, H, W, C);
      const int64_t at = (h * W + w) * C;
      for (int64_t c = 0; c < C; c += L) {
        Vec value_conv = {}, excite_conv = {};
        const Vec g = S::Load(dz + at + c);
        for (int k = 0; k < n.count; ++k) {
          const int t = n.taps[k];
          const int64_t o = n.offsets[k] + c;
          const Vec neighbour = S::Load(dz + o);
          value_conv += neighbour * S::Load(p.value_kernel + (8 - t) * C + c);
          T* vt = value_taps + t * C + c;
          S::Store(vt, S::Load(vt) + S::Load(out + o) * g);
          if (p.refresh) {
            excite_conv += neighbour * S::Load(p.excite_kernel + (8 - t) * C + c);
            T* et = excite_taps + t * C + c;
            S::Store(et, S::Load(et) + S::Load(sc + o) * g);
          }
        }
        S::Store(d_out + at + c, value_conv * S::Load(heads + c));
        S::Store(dh + c, S::Load(dh + c) + S::Load(out + at + c) * value_conv);
        S::Store(sdz + c, S::Load(sdz + c) + S::Load(sc + at + c) * g);
        const Vec lam = S::Load(p.lam + c);
        S::Store(d_sc + at + c, p.refresh ? (g * S::Load(gate + c) + excite_conv) * lam : g * lam);
      }
    }
  }
  for (int t = 0; t < 9; ++t) {
    for (int64_t c = 0; c < C; ++c) value_taps[t * C + c] *= heads[c];
  }
}

// One clone per instruction set, picked at load time, so the build stays portable.
#define DLA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
DLA_CLONES void Image(const Forward<float>& p, int64_t b) { ForwardBody(p, b); }
DLA_CLONES void Image(const Forward<double>& p, int64_t b) { ForwardBody(p, b); }
DLA_CLONES void Image(const Backward<float>& p, int64_t b) { BackwardBody(p, b); }
DLA_CLONES void Image(const Backward<double>& p, int64_t b) { BackwardBody(p, b); }

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
                           ffi::ResultBuffer<D, 4> z) {
  const Forward<ffi::NativeType<D>> problem{
      {Read(out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh)}, z->typed_data()};
  return ForEachImage(pool, problem);
}

template <ffi::DataType D>
ffi::Error LightSumBackward(ffi::ThreadPool pool, Image4<D> out, Image4<D> shortcut, Image4<D> dz, Vectors<D> heads,
                            Vectors<D> gate, Vectors<D> value_kernel, Vectors<D> excite_kernel, ffi::Buffer<D, 1> lam,
                            bool refresh, ffi::ResultBuffer<D, 4> d_out, ffi::ResultBuffer<D, 4> d_shortcut,
                            ffi::ResultBuffer<D, 3> value_taps, ffi::ResultBuffer<D, 3> excite_taps,
                            ffi::ResultBuffer<D, 2> shortcut_dz, ffi::ResultBuffer<D, 2> d_heads) {
  const Backward<ffi::NativeType<D>> problem{
      {Read(out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh)},
      dz.typed_data(),
      d_out->typed_data(),
      d_shortcut->typed_data(),
      value_taps->typed_data(),
      excite_taps->typed_data(),
      shortcut_dz->typed_data(),
      d_heads->typed_data()};
  return ForEachImage(pool, problem);
}

// Binds the operands both handlers take after their images: the [B, C] vectors, then the shared ones.
template <ffi::DataType D, typename Binding>
auto WithGatesAndWeights(Binding&& binding) {
  return std::move(binding)
      .template Arg<Vectors<D>>()  // heads
      .template Arg<Vectors<D>>()  // gate
      .template Arg<Vectors<D>>()  // value_kernel
      .template Arg<Vectors<D>>()  // excite_kernel
      .template Arg<ffi::Buffer<D, 1>>()  // lam
      .template Attr<bool>("refresh");
}

template <ffi::DataType D>
auto LightSumForwardBinding() {
  auto images = ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<Image4<D>>().template Arg<Image4<D>>();
  return WithGatesAndWeights<D>(std::move(images)).template Ret<Image4<D>>();  // out, shortcut -> z
}

template <ffi::DataType D>
auto LightSumBackwardBinding() {
  auto images = ffi::Ffi::Bind()
                    .Ctx<ffi::ThreadPool>()
                    .template Arg<Image4<D>>()   // out
                    .template Arg<Image4<D>>()   // shortcut
                    .template Arg<Image4<D>>();  // dz
  return WithGatesAndWeights<D>(std::move(images))
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
DLA_HANDLERS(LightSumBackward)
