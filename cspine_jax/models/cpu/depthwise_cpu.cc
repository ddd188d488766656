// Depthwise 2D convolution kernels for XLA:CPU, called through the XLA FFI (jax.ffi).
//
// Why: XLA:CPU has no fast depthwise convolution. Its grouped convolution is a generic loop, and
// the formulations expressible in XLA either copy the input (the padded tap sum) or, for the
// kernel gradient, need transposed or shifted copies and batched matmuls or FFTs, which cost far
// more than the arithmetic. These loops read NHWC as it lies, skip the taps that fall on padding
// instead of padding, and keep their sums in registers; the compiler vectorises them over
// channels (`-O3 -march=native`). Work is split over XLA's intra-op thread pool.
//
// All three compute exactly what lax.conv_general_dilated(..., feature_group_count=C) and its
// gradients compute, in float32 (the tests compare them):
//   forward       y[n,p,q,c]   = b[c] + sum_{i,j} x[n, p*sh+i-ph, q*sw+j-pw, c] k[i,j,c]
//   input grad    dx[n,a,b,c]  = sum_{(p,i): p*sh+i-ph=a} sum_{(q,j): q*sw+j-pw=b} g[n,p,q,c] k[i,j,c]
//   kernel grad   dk[i,j,c]    = sum_{n,p,q} x[n, p*sh+i-ph, q*sw+j-pw, c] g[n,p,q,c]
// with x read as 0 outside [0,H) x [0,W). A fourth normalises the forward's output per pixel
// over the channels (ConvNeXt's LayerNorm after the depthwise conv, optionally with its affine
// part) while each row is in cache.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(task) for task in [0, tasks) on the calling thread and up to `workers - 1` helpers
// from XLA's pool. The caller takes tasks too, so the call finishes even when the pool is busy
// with other work; a helper that starts after every task is taken returns without touching
// `body` (it only reads the shared counters, which it co-owns). Which thread runs a task varies
// from call to call: a task's result may not depend on it.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, int64_t workers, const Body& body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto run = [shared, tasks, &body]() {
    for (int64_t t = shared->next.fetch_add(1); t < tasks; t = shared->next.fetch_add(1)) {
      body(t);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  workers = std::max<int64_t>(1, std::min(workers, tasks));
  for (int64_t w = 1; w < workers; ++w) {
    pool.Schedule([shared, run, tasks]() {
      if (shared->next.load() >= tasks) return;  // all taken: `body` may be gone already
      run();
    });
  }
  run();
  while (shared->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

int64_t PoolWorkers(ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

struct Geometry {
  int64_t n, h, w, c, ho, wo, kh, kw, sh, sw, ph, pw;
  // Taps of output row p (column q) that land inside the input: [lo, hi).
  int64_t RowLo(int64_t p) const { return std::max<int64_t>(0, ph - p * sh); }
  int64_t RowHi(int64_t p) const { return std::min<int64_t>(kh, h + ph - p * sh); }
  int64_t ColLo(int64_t q) const { return std::max<int64_t>(0, pw - q * sw); }
  int64_t ColHi(int64_t q) const { return std::min<int64_t>(kw, w + pw - q * sw); }
};

// ---- forward ---------------------------------------------------------------------------------
// Independent sums per block: a 16-wide block alone is one chain of dependent multiply-adds
// (latency-bound, below the FMA units' rate), so narrow blocks take several pixels at once.
template <int CB>
constexpr int PixelsPerCall() { return CB == 64 ? 2 : 4; }

// Output pixels (p, q) .. (p, q + P - 1), channels [c0, c0 + CB): the sum of their taps in
// registers. P > 1 only where all P pixels see every column tap (ColLo = 0, ColHi = kw).
template <int CB, int P>
inline void ForwardPixels(const Geometry& g, const float* x_n, const float* k, const float* bias,
                          float* out, int64_t p, int64_t q, int64_t c0, int64_t cb) {
  float acc[P][CB > 0 ? CB : 8];  // the tail block is < 8 wide
  const int64_t width = CB > 0 ? CB : cb;
  for (int u = 0; u < P; ++u) {
    for (int64_t c = 0; c < width; ++c) acc[u][c] = bias[c0 + c];
  }
  const int64_t i_lo = g.RowLo(p), i_hi = g.RowHi(p);
  const int64_t j_lo = g.ColLo(q), j_hi = g.ColHi(q + P - 1);
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const float* row = x_n + (p * g.sh + i - g.ph) * g.w * g.c + c0;
    const float* ki = k + i * g.kw * g.c + c0;
    for (int64_t j = j_lo; j < j_hi; ++j) {
      const float* kk = ki + j * g.c;
      for (int u = 0; u < P; ++u) {
        const float* src = row + ((q + u) * g.sw + j - g.pw) * g.c;
        for (int64_t c = 0; c < width; ++c) acc[u][c] += src[c] * kk[c];
      }
    }
  }
  for (int u = 0; u < P; ++u) {
    for (int64_t c = 0; c < width; ++c) out[u * g.c + c] = acc[u][c];
  }
}

// Channel blocks of 64, then 16, then 8, then whatever is left (one runtime-length block < 8;
// a runtime-length loop is not kept in registers, so it is the last resort).
template <typename PixelFn>
inline void ForChannelBlocks(int64_t channels, const PixelFn& pixel) {
  int64_t c0 = 0;
  for (; c0 + 64 <= channels; c0 += 64) pixel(std::integral_constant<int, 64>(), c0, 64);
  for (; c0 + 16 <= channels; c0 += 16) pixel(std::integral_constant<int, 16>(), c0, 16);
  for (; c0 + 8 <= channels; c0 += 8) pixel(std::integral_constant<int, 8>(), c0, 8);
  if (c0 < channels) pixel(std::integral_constant<int, 0>(), c0, channels - c0);
}

// The LayerNorm after the forward: 1 / sqrt(var + eps) goes to `rstd`; `scale` and `shift`
// (null: none) are its affine part.
struct Norm {
  float* rstd;
  float eps;
  const float* scale;
  const float* shift;
};

// Normalises each of `pixels` pixels' channels of `y` in place (two-pass statistics), then
// applies the affine part; the pixels' rstd go to norm.rstd[first ...].
void NormalizePixels(float* y, const Norm& norm, int64_t first, int64_t pixels,
                     int64_t channels) {
  for (int64_t q = 0; q < pixels; ++q) {
    float* v = y + q * channels;
    float sum = 0.0f;
    for (int64_t c = 0; c < channels; ++c) sum += v[c];
    const float mean = sum / channels;
    float sq = 0.0f;
    for (int64_t c = 0; c < channels; ++c) sq += (v[c] - mean) * (v[c] - mean);
    const float r = 1.0f / std::sqrt(sq / channels + norm.eps);
    if (norm.scale != nullptr) {
      for (int64_t c = 0; c < channels; ++c) v[c] = (v[c] - mean) * r * norm.scale[c] + norm.shift[c];
    } else {
      for (int64_t c = 0; c < channels; ++c) v[c] = (v[c] - mean) * r;
    }
    norm.rstd[first + q] = r;
  }
}

// y = the depthwise correlation of x with k (kh, kw, C) plus bias, for the geometry `g`; with
// `norm`, each output row is also normalised over the channels while it is in cache.
void RunForward(ffi::ThreadPool& pool, const Geometry& g, const float* xp, const float* kp,
                const float* bp, float* yp, const Norm* norm = nullptr) {
  // Pixels whose window meets no padding column: q in [q_in, q_out).
  const int64_t q_in = std::min<int64_t>(g.wo, (g.pw + g.sw - 1) / g.sw);
  const int64_t q_out = std::max<int64_t>(q_in, std::min<int64_t>(
      g.wo, g.w + g.pw - g.kw >= 0 ? (g.w + g.pw - g.kw) / g.sw + 1 : 0));
  ParallelFor(pool, g.n * g.ho, PoolWorkers(pool), [&](int64_t t) {
    const int64_t n = t / g.ho, p = t % g.ho;
    const float* x_n = xp + n * g.h * g.w * g.c;
    float* y_row = yp + t * g.wo * g.c;
    ForChannelBlocks(g.c, [&](auto cb_tag, int64_t c0, int64_t cb) {
      constexpr int kCB = decltype(cb_tag)::value;
      constexpr int kP = PixelsPerCall<kCB>();
      int64_t q = 0;
      for (; q < g.wo; ++q) {
        if (q >= q_in && q + kP <= q_out) {
          ForwardPixels<kCB, kP>(g, x_n, kp, bp, y_row + q * g.c + c0, p, q, c0, cb);
          q += kP - 1;
        } else {
          ForwardPixels<kCB, 1>(g, x_n, kp, bp, y_row + q * g.c + c0, p, q, c0, cb);
        }
      }
    });
    if (norm != nullptr) NormalizePixels(y_row, *norm, t * g.wo, g.wo, g.c);
  });
}

// Every handler checks what its loops index by before running them: the loops trust the shapes
// (a batch, channel count or bias length that disagrees would read or write past a buffer) and
// divide by the strides.
using Dims = ffi::AnyBuffer::Dimensions;

// x NHWC, k (kh, kw, C) and y NHWC with x's batch and channels, bias (C,), strides > 0 and
// paddings >= 0.
bool ForwardShapesFit(const Dims& xd, const Dims& kd, const Dims& yd, int64_t bias_count) {
  return xd.size() == 4 && kd.size() == 3 && yd.size() == 4 && kd[2] == xd[3] &&
         yd[0] == xd[0] && yd[3] == xd[3] && bias_count == xd[3];
}

bool StridesFit(int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  return sh > 0 && sw > 0 && ph >= 0 && pw >= 0;
}

ffi::Error BadStrides(const char* what, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  return ffi::Error::InvalidArgument(std::string(what) + ": want strides > 0 and paddings >= 0, " +
                                     "got stride (" + std::to_string(sh) + ", " +
                                     std::to_string(sw) + "), padding (" + std::to_string(ph) +
                                     ", " + std::to_string(pw) + ")");
}

std::string Shape(const Dims& d) {
  std::string out = "(";
  for (size_t i = 0; i < d.size(); ++i) out += (i ? ", " : "") + std::to_string(d[i]);
  return out + ")";
}

ffi::Error DepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                            int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (!ForwardShapesFit(xd, kd, yd, bias.element_count())) {
    return ffi::Error::InvalidArgument(
        "depthwise forward: want x NHWC, k (kh,kw,C), bias (C,), y NHWC with x's N and C; got x " +
        Shape(xd) + ", k " + Shape(kd) + ", bias " + Shape(bias.dimensions()) + ", y " +
        Shape(yd));
  }
  if (!StridesFit(sh, sw, ph, pw)) return BadStrides("depthwise forward", sh, sw, ph, pw);
  const Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], kd[0], kd[1], sh, sw, ph, pw};
  RunForward(pool, g, x.typed_data(), k.typed_data(), bias.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

// The forward followed by a LayerNorm: y normalised per pixel, then times scale plus shift (both
// (C,); an empty scale: no affine part), and rstd (N,HO,WO).
ffi::Error DepthwiseForwardNormalized(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                      ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> bias,
                                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                                      ffi::ResultBuffer<ffi::F32> y,
                                      ffi::ResultBuffer<ffi::F32> rstd, int64_t sh, int64_t sw,
                                      int64_t ph, int64_t pw, float eps) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions(), rd = rstd->dimensions();
  const bool affine = scale.element_count() > 0;
  if (!ForwardShapesFit(xd, kd, yd, bias.element_count()) || rd.size() != 3 || rd[0] != yd[0] ||
      rd[1] != yd[1] || rd[2] != yd[2] ||
      (affine && (scale.element_count() != xd[3] || shift.element_count() != xd[3]))) {
    return ffi::Error::InvalidArgument(
        "depthwise forward normalized: want x NHWC, k (kh,kw,C), bias (C,), scale and shift (C,) "
        "or empty, y NHWC with x's N and C, rstd NHW; got x " + Shape(xd) + ", k " + Shape(kd) +
        ", bias " + Shape(bias.dimensions()) + ", scale " + Shape(scale.dimensions()) +
        ", shift " + Shape(shift.dimensions()) + ", y " + Shape(yd) + ", rstd " + Shape(rd));
  }
  if (!StridesFit(sh, sw, ph, pw)) {
    return BadStrides("depthwise forward normalized", sh, sw, ph, pw);
  }
  const Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], kd[0], kd[1], sh, sw, ph, pw};
  const Norm norm{rstd->typed_data(), eps, affine ? scale.typed_data() : nullptr,
                  affine ? shift.typed_data() : nullptr};
  RunForward(pool, g, x.typed_data(), k.typed_data(), bias.typed_data(), y->typed_data(), &norm);
  return ffi::Error::Success();
}

// ---- input gradient --------------------------------------------------------------------------
// dx at input pixel (a, b) for stride > 1: the output pixels whose window covers it, each times
// its tap (every tap tested; at unit stride the forward loop with the flipped kernel is used).
template <int CB>
inline void StridedInputGradPixel(const Geometry& g, const float* g_n, const float* k, float* out,
                                  int64_t a, int64_t b, int64_t c0, int64_t cb) {
  float acc[CB > 0 ? CB : 8];  // the tail block is < 8 wide
  const int64_t width = CB > 0 ? CB : cb;
  for (int64_t c = 0; c < width; ++c) acc[c] = 0.0f;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t tp = a + g.ph - i;  // = p * sh
    if (tp < 0 || tp % g.sh != 0 || tp / g.sh >= g.ho) continue;
    const float* grow = g_n + (tp / g.sh) * g.wo * g.c + c0;
    const float* ki = k + i * g.kw * g.c + c0;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t tq = b + g.pw - j;  // = q * sw
      if (tq < 0 || tq % g.sw != 0 || tq / g.sw >= g.wo) continue;
      const float* src = grow + (tq / g.sw) * g.c;
      const float* kk = ki + j * g.c;
      for (int64_t c = 0; c < width; ++c) acc[c] += src[c] * kk[c];
    }
  }
  for (int64_t c = 0; c < width; ++c) out[c] = acc[c];
}

ffi::Error DepthwiseInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gy,
                              ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> dx,
                              int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  auto gd = gy.dimensions(), kd = k.dimensions(), xd = dx->dimensions();
  if (gd.size() != 4 || kd.size() != 3 || xd.size() != 4 || kd[2] != gd[3] || xd[3] != gd[3] ||
      xd[0] != gd[0]) {
    return ffi::Error::InvalidArgument(
        "depthwise input grad: want g NHWC, k (kh,kw,C), dx NHWC with g's N and C; got g " +
        Shape(gd) + ", k " + Shape(kd) + ", dx " + Shape(xd));
  }
  if (!StridesFit(sh, sw, ph, pw)) return BadStrides("depthwise input grad", sh, sw, ph, pw);
  const Geometry g{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], kd[0], kd[1], sh, sw, ph, pw};
  const float* gp = gy.typed_data();
  const float* kp = k.typed_data();
  float* dp = dx->typed_data();
  if (sh == 1 && sw == 1) {
    // At unit stride dx is g correlated with the flipped kernel, padded by k - 1 - p: the forward.
    const int64_t taps = g.kh * g.kw;
    std::vector<float> flipped(taps * g.c), zeros(g.c, 0.0f);
    for (int64_t t = 0; t < taps; ++t) {
      std::copy(kp + t * g.c, kp + (t + 1) * g.c, flipped.data() + (taps - 1 - t) * g.c);
    }
    const Geometry gt{g.n, g.ho, g.wo, g.c, g.h, g.w, g.kh, g.kw, 1, 1,
                      g.kh - 1 - g.ph, g.kw - 1 - g.pw};
    RunForward(pool, gt, gp, flipped.data(), zeros.data(), dp);
    return ffi::Error::Success();
  }
  ParallelFor(pool, g.n * g.h, PoolWorkers(pool), [&](int64_t t) {
    const int64_t n = t / g.h, a = t % g.h;
    const float* g_n = gp + n * g.ho * g.wo * g.c;
    for (int64_t b = 0; b < g.w; ++b) {
      float* out = dp + ((n * g.h + a) * g.w + b) * g.c;
      ForChannelBlocks(g.c, [&](auto cb_tag, int64_t c0, int64_t cb) {
        StridedInputGradPixel<decltype(cb_tag)::value>(g, g_n, kp, out + c0, a, b, c0, cb);
      });
    }
  });
  return ffi::Error::Success();
}

// ---- kernel gradient -------------------------------------------------------------------------
// Adds output row p of sample n's contribution to every tap, channels [c0, c0 + CB): per tap the
// sum over the row's columns in CB registers, then one add into the chunk's accumulator.
template <int CB>
inline void KernelGradRow(const Geometry& g, const float* x_n, const float* g_n, float* dk,
                          int64_t p, int64_t c0, int64_t cb) {
  constexpr int U = PixelsPerCall<CB>();  // independent partial sums over the columns
  const int64_t width = CB > 0 ? CB : cb;
  const float* grow = g_n + p * g.wo * g.c + c0;
  for (int64_t i = g.RowLo(p); i < g.RowHi(p); ++i) {
    const float* xrow = x_n + (p * g.sh + i - g.ph) * g.w * g.c + c0;
    for (int64_t j = 0; j < g.kw; ++j) {
      // Columns q whose tap j lands inside the input: 0 <= q*sw + j - pw < w.
      const int64_t q_lo = std::max<int64_t>(0, (g.pw - j + g.sw - 1) / g.sw);
      const int64_t q_hi = std::min<int64_t>(g.wo, (g.w + g.pw - j + g.sw - 1) / g.sw);
      float acc[U][CB > 0 ? CB : 8];  // the tail block is < 8 wide
      for (int u = 0; u < U; ++u) {
        for (int64_t c = 0; c < width; ++c) acc[u][c] = 0.0f;
      }
      int64_t q = q_lo;
      for (; q + U <= q_hi; q += U) {
        for (int u = 0; u < U; ++u) {
          const float* src = xrow + ((q + u) * g.sw + j - g.pw) * g.c;
          const float* gq = grow + (q + u) * g.c;
          for (int64_t c = 0; c < width; ++c) acc[u][c] += src[c] * gq[c];
        }
      }
      for (; q < q_hi; ++q) {
        const float* src = xrow + (q * g.sw + j - g.pw) * g.c;
        const float* gq = grow + q * g.c;
        for (int64_t c = 0; c < width; ++c) acc[0][c] += src[c] * gq[c];
      }
      float* out = dk + (i * g.kw + j) * g.c + c0;
      for (int u = 0; u < U; ++u) {
        for (int64_t c = 0; c < width; ++c) out[c] += acc[u][c];
      }
    }
  }
}

ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> gy, ffi::ResultBuffer<ffi::F32> dk,
                               int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  auto xd = x.dimensions(), gd = gy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 3 || gd[3] != xd[3] || kd[2] != xd[3] ||
      gd[0] != xd[0]) {
    return ffi::Error::InvalidArgument(
        "depthwise kernel grad: want x, g NHWC with the same N and C, dk (kh,kw,C); got x " +
        Shape(xd) + ", g " + Shape(gd) + ", dk " + Shape(kd));
  }
  if (!StridesFit(sh, sw, ph, pw)) return BadStrides("depthwise kernel grad", sh, sw, ph, pw);
  const Geometry g{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], kd[0], kd[1], sh, sw, ph, pw};
  const float* xp = x.typed_data();
  const float* gp = gy.typed_data();
  const int64_t taps = g.kh * g.kw * g.c;
  const int64_t tasks = g.n * g.ho;
  const int64_t workers = PoolWorkers(pool);
  // The rows split into a fixed number of contiguous chunks, each summed in row order into its own
  // accumulator, the chunks then added in chunk order: the same bits whichever thread takes which
  // chunk, so a training run repeats exactly (accumulators per thread made the sum depend on the
  // scheduling). The chunk count depends only on the pool size, so it is fixed on a machine.
  const int64_t chunks = std::min<int64_t>(tasks, std::max<int64_t>(8, 2 * workers));
  std::vector<float> partial(chunks * taps, 0.0f);
  ParallelFor(pool, chunks, workers, [&](int64_t chunk) {
    float* acc = partial.data() + chunk * taps;
    for (int64_t t = chunk * tasks / chunks; t < (chunk + 1) * tasks / chunks; ++t) {
      const int64_t n = t / g.ho, p = t % g.ho;
      const float* x_n = xp + n * g.h * g.w * g.c;
      const float* g_n = gp + n * g.ho * g.wo * g.c;
      ForChannelBlocks(g.c, [&](auto cb_tag, int64_t c0, int64_t cb) {
        KernelGradRow<decltype(cb_tag)::value>(g, x_n, g_n, acc, p, c0, cb);
      });
    }
  });
  float* out = dk->typed_data();
  constexpr int64_t kSumBlock = 4096;  // taps per task of the (parallel) sum over chunks
  const int64_t sum_tasks = (taps + kSumBlock - 1) / kSumBlock;
  ParallelFor(pool, sum_tasks, workers, [&](int64_t b) {
    for (int64_t e = b * kSumBlock; e < std::min(taps, (b + 1) * kSumBlock); ++e) {
      float s = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) s += partial[c * taps + e];
      out[e] = s;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define CSPINE_BIND_STRIDES(binding)                                            \
  binding.Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("ph").Attr<int64_t>("pw")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CspineDepthwiseForward, DepthwiseForward,
                              CSPINE_BIND_STRIDES(ffi::Ffi::Bind()
                                                      .Ctx<ffi::ThreadPool>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CspineDepthwiseForwardNormalized, DepthwiseForwardNormalized,
                              CSPINE_BIND_STRIDES(ffi::Ffi::Bind()
                                                      .Ctx<ffi::ThreadPool>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Ret<ffi::Buffer<ffi::F32>>()
                                                      .Ret<ffi::Buffer<ffi::F32>>())
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CspineDepthwiseInputGrad, DepthwiseInputGrad,
                              CSPINE_BIND_STRIDES(ffi::Ffi::Bind()
                                                      .Ctx<ffi::ThreadPool>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CspineDepthwiseKernelGrad, DepthwiseKernelGrad,
                              CSPINE_BIND_STRIDES(ffi::Ffi::Bind()
                                                      .Ctx<ffi::ThreadPool>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Arg<ffi::Buffer<ffi::F32>>()
                                                      .Ret<ffi::Buffer<ffi::F32>>()));
