// CPU kernels for batch norm with the batch's statistics (fewshot/fused.py explains why and when):
// 1. batch norm + ReLU + 2x2 max-pool (stride 2) of a channels-last batch in one pass, and its
//    backward in one more;
// 2. batch norm's second derivative (NCHW and channels-last);
// 3. the block's ReLU and pooling as linear maps of gradients, for the block's second derivative.
//
// 1: memory is (N, H, W, C): the channels of a pixel are contiguous, so every inner loop runs over
// C and the compiler vectorises it (ivdep: the output never overlaps the inputs). Sums over the
// batch are taken in a fixed number of chunks, added in order in double precision, so results do
// not depend on the thread count.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunks = 16;

// per-channel sums over row ranges of an (rows, C) array, one chunk per task, added in order
template <typename Body>
std::vector<double> chunked_channel_sums(int64_t rows, int64_t width, const Body& body) {
  std::vector<double> parts(kChunks * width, 0.0);
  const int64_t per = (rows + kChunks - 1) / kChunks;
  at::parallel_for(0, kChunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) body(k * per, std::min(rows, (k + 1) * per), parts.data() + k * width);
  });
  std::vector<double> total(width, 0.0);
  for (int64_t k = 0; k < kChunks; ++k)
    for (int64_t c = 0; c < width; ++c) total[c] += parts[k * width + c];
  return total;
}

// The four inputs of the 2x2 window (n, oh, ow) of an (N, H, W, C) array, and the one of them
// the block's argmax byte k names (0-3 in ATen's scan order).
template <typename T>
struct Window {
  const T* __restrict__ p0;
  const T* __restrict__ p1;
  const T* __restrict__ p2;
  const T* __restrict__ p3;
  Window(const T* base, int64_t n, int64_t oh, int64_t ow, int64_t H, int64_t W, int64_t C)
      : p0(base + ((n * H + 2 * oh) * W + 2 * ow) * C), p1(p0 + C), p2(p0 + W * C), p3(p0 + W * C + C) {}
  T pick(T k, int64_t c) const { return k == T(0) ? p0[c] : (k == T(1) ? p1[c] : (k == T(2) ? p2[c] : p3[c])); }
};

template <typename T>
bool forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                  at::Tensor& out, at::Tensor& argmax, at::Tensor& mean_t, at::Tensor& invstd_t) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = H / 2, OW = W / 2;
  const int64_t M = N * H * W;
  const T* __restrict__ xp = x.data_ptr<T>();
  const auto sum = chunked_channel_sums(M, C, [&, xp](int64_t r0, int64_t r1, double* acc) {
    std::vector<T> row_sum(C);
    for (int64_t r = r0; r < r1; r += W) {  // a row of W pixels summed in T, then added in double
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      T* __restrict__ s = row_sum.data();
      for (int64_t p = r; p < std::min(r1, r + W); ++p)
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) s[c] += xp[p * C + c];
      #pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) acc[c] += s[c];
    }
  });
  std::vector<T> mean_T(C);
  #pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) mean_T[c] = T(sum[c] / M);
  const auto squares = chunked_channel_sums(M, C, [&, xp](int64_t r0, int64_t r1, double* acc) {
    std::vector<T> row_sum(C);
    const T* __restrict__ mu = mean_T.data();
    for (int64_t r = r0; r < r1; r += W) {
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      T* __restrict__ s = row_sum.data();
      for (int64_t p = r; p < std::min(r1, r + W); ++p)
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) { const T d = xp[p * C + c] - mu[c]; s[c] += d * d; }
      #pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) acc[c] += s[c];
    }
  });
  double* mean = mean_t.data_ptr<double>();
  double* invstd = invstd_t.data_ptr<double>();
  const T* g = weight.data_ptr<T>();
  const T* b = bias.data_ptr<T>();
  std::vector<T> scale(C), shift(C);
  #pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = double(mean_T[c]);
    invstd[c] = 1.0 / std::sqrt(squares[c] / M + eps);
    scale[c] = T(invstd[c] * double(g[c]));
    shift[c] = T(double(b[c]) - mean[c] * invstd[c] * double(g[c]));
    if (!std::isfinite(mean[c]) || !std::isfinite(invstd[c]) || !std::isfinite(double(scale[c])) || !std::isfinite(double(shift[c])))
      return false;  // NaN or infinity somewhere: the caller takes ATen's ops, which propagate them as they do
  }
  T* __restrict__ op = out.data_ptr<T>();
  uint8_t* __restrict__ ap = argmax.data_ptr<uint8_t>();
  const T* __restrict__ sc = scale.data();
  const T* __restrict__ sh = shift.data();
  at::parallel_for(0, N * OH, 1, [&, xp, op, ap, sc, sh](int64_t begin, int64_t end) {  // copies: no aliasing
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const Window<T> window(xp, n, oh, ow, H, W, C);
        T* __restrict__ o = op + (r * OW + ow) * C;
        uint8_t* __restrict__ a = ap + (r * OW + ow) * C;
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {  // the first maximum in ATen's scan order, then the ReLU
          const T v0 = window.p0[c] * sc[c] + sh[c], v1 = window.p1[c] * sc[c] + sh[c];
          const T v2 = window.p2[c] * sc[c] + sh[c], v3 = window.p3[c] * sc[c] + sh[c];
          T best = v0, k = 0;
          k = v1 > best ? T(1) : k; best = v1 > best ? v1 : best;
          k = v2 > best ? T(2) : k; best = v2 > best ? v2 : best;
          k = v3 > best ? T(3) : k; best = v3 > best ? v3 : best;
          o[c] = best > T(0) ? best : T(0);
          a[c] = uint8_t(k);
        }
      }
    }
  });
  return true;
}

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out, const at::Tensor& argmax,
                   const at::Tensor& mean_t, const at::Tensor& invstd_t, const at::Tensor& weight,
                   at::Tensor& grad_x, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = H / 2, OW = W / 2;
  const int64_t M = N * H * W;
  const T* __restrict__ xp = x.data_ptr<T>();
  const T* __restrict__ gp = grad_out.data_ptr<T>();
  const T* __restrict__ op = out.data_ptr<T>();
  const uint8_t* __restrict__ ap = argmax.data_ptr<uint8_t>();
  const double* mean = mean_t.data_ptr<double>();
  const double* invstd = invstd_t.data_ptr<double>();
  std::vector<T> mu(C), is(C);
  #pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) { mu[c] = T(mean[c]); is[c] = T(invstd[c]); }
  // sum(dy) and sum(dy * xhat) per channel; dy, the gradient at the batch norm's output, is zero
  // except at each window's argmax where the ReLU passed it
  const auto sums = chunked_channel_sums(N * OH, 2 * C, [&, xp, gp, op, ap](int64_t r0, int64_t r1, double* acc) {
    std::vector<T> row(2 * C);
    T* __restrict__ s_dy = row.data();
    T* __restrict__ s_dyx = row.data() + C;
    const T* __restrict__ m = mu.data();
    const T* __restrict__ v = is.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      std::fill(row.begin(), row.end(), T(0));
      for (int64_t ow = 0; ow < OW; ++ow) {
        const Window<T> window(xp, n, oh, ow, H, W, C);
        const int64_t o = (r * OW + ow) * C;
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {
          const T dy = op[o + c] > T(0) ? gp[o + c] : T(0);
          const T xa = window.pick(T(ap[o + c]), c);
          s_dy[c] += dy;
          s_dyx[c] += dy * (xa - m[c]) * v[c];
        }
      }
      #pragma GCC ivdep
      for (int64_t c = 0; c < 2 * C; ++c) acc[c] += row[c];
    }
  });
  T* gw = grad_weight.data_ptr<T>();
  T* gb = grad_bias.data_ptr<T>();
  const T* g = weight.data_ptr<T>();
  std::vector<T> k_(C), a_(C), b_(C);
  #pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    gb[c] = T(sums[c]);
    gw[c] = T(sums[C + c]);
    k_[c] = T(double(g[c]) * invstd[c]);
    a_[c] = T(sums[c] / M);
    b_[c] = T(sums[C + c] / M);
  }
  // grad_x = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), row by row of the input
  T* __restrict__ gxp = grad_x.data_ptr<T>();
  const T* __restrict__ kk = k_.data();
  const T* __restrict__ aa = a_.data();
  const T* __restrict__ bb = b_.data();
  const T* __restrict__ m = mu.data();
  const T* __restrict__ v = is.data();
  at::parallel_for(0, N * H, 1, [&, xp, gp, op, ap, gxp, kk, aa, bb, m, v](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / H, h = r % H, oh = h / 2;
      for (int64_t w = 0; w < W; ++w) {
        const T* __restrict__ xr = xp + (r * W + w) * C;
        T* __restrict__ gr = gxp + (r * W + w) * C;
        if (oh < OH && w / 2 < OW) {  // inside a pooling window: dy where this pixel was the argmax
          const T me = T((h & 1) * 2 + (w & 1));
          const int64_t o = ((n * OH + oh) * OW + w / 2) * C;
          #pragma GCC ivdep
          for (int64_t c = 0; c < C; ++c) {
            const T dy = (T(ap[o + c]) == me && op[o + c] > T(0)) ? gp[o + c] : T(0);
            gr[c] = kk[c] * (dy - aa[c] - (xr[c] - m[c]) * v[c] * bb[c]);
          }
        } else {  // the last row or column of an odd size: pooled by no window
          #pragma GCC ivdep
          for (int64_t c = 0; c < C; ++c) gr[c] = kk[c] * (-aa[c] - (xr[c] - m[c]) * v[c] * bb[c]);
        }
      }
    }
  });
}

}  // namespace

// The saved tensors of the block, as forward made them (these functions are callable from Python).
static void check_block(int64_t N, int64_t C, int64_t H, int64_t W, const at::Tensor& out, const at::Tensor& argmax) {
  const int64_t OH = H / 2, OW = W / 2;
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast) && out.sizes() == at::IntArrayRef({N, C, OH, OW}),
              "out must be the block's channels-last output");
  TORCH_CHECK(argmax.is_contiguous() && argmax.scalar_type() == at::kByte && argmax.sizes() == at::IntArrayRef({N, OH, OW, C}),
              "argmax must be the block's (N, OH, OW, C) bytes");
}

static void check_channel_vectors(const at::Tensor& x, std::initializer_list<at::Tensor> vectors) {
  for (const auto& v : vectors) TORCH_CHECK(v.numel() == x.size(1), "a per-channel vector has the wrong length");
}

// (out, argmax, mean, invstd), or an empty list where x or the affine parameters are not finite
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be a 4-D channels-last tensor");
  check_channel_vectors(x, {weight, bias});
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto out = at::empty({N, C, H / 2, W / 2}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto argmax = at::empty({N, H / 2, W / 2, C}, x.options().dtype(at::kByte));
  auto mean = at::empty({C}, x.options().dtype(at::kDouble));
  auto invstd = at::empty({C}, x.options().dtype(at::kDouble));
  const auto w = weight.contiguous(), b = bias.contiguous();
  bool finite = false;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_relu_pool", [&] {
    finite = forward_impl<scalar_t>(x, w, b, eps, out, argmax, mean, invstd);
  });
  if (!finite) return {};
  return {out, argmax, mean, invstd};
}

// (grad_x, grad_weight, grad_bias)
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                                 const at::Tensor& argmax, const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be a 4-D channels-last tensor");
  check_block(x.size(0), x.size(1), x.size(2), x.size(3), out, argmax);
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && grad_out.scalar_type() == x.scalar_type(), "dtypes differ");
  check_channel_vectors(x, {mean, invstd, weight});
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "grad_out must have the block output's shape");
  TORCH_CHECK(mean.scalar_type() == at::kDouble && invstd.scalar_type() == at::kDouble, "mean and invstd must be float64");
  const auto g = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  const auto w = weight.contiguous();
  auto grad_x = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto grad_weight = at::empty_like(w), grad_bias = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_relu_pool_backward", [&] {
    backward_impl<scalar_t>(g, x, out, argmax, mean, invstd, w, grad_x, grad_weight, grad_bias);
  });
  return {grad_x, grad_weight, grad_bias};
}


// The second derivative of batch norm with the batch's statistics, in two passes over the
// data: fewshot/fused.py explains why and when (ATen's takes about 25 elementwise ops).
//
// Per channel, with M elements, xh = (x - mean) * invstd, A = mean(dy), B = mean(dy * xh),
// P(v) = invstd * (v - mean(v) - xh * mean(v * xh))  (batch norm's backward operator):
//   grad_input  = dy -> gamma * P(dy), gamma's = sum(dy * xh), beta's = sum(dy)   (first backward)
// and, given the gradients ggI, ggG, ggB of those three outputs:
//   S1 = sum(ggI * (dy - A - xh * B)), S2 = sum(ggI * xh)
//   d/d dy    = gamma * P(ggI) + ggG * xh + ggB
//   d/d gamma = invstd * S1
//   d/d x     = gamma * (-invstd^2 * S1 / M * xh - invstd * B * P(ggI) - invstd * S2 / M * P(dy)) + ggG * P(dy)
// x, dy and ggI are (N, C, L) contiguous; sums per channel in double.

namespace {

template <typename T>
void double_backward_impl(int64_t N, int64_t C, int64_t L, const T* x, const T* dy, const T* ggI, const T* ggG, const T* ggB,
          const T* gamma, const double* mean, const double* invstd, T* gx, T* gdy, T* ggamma) {
  const double M = double(N * L);
  at::parallel_for(0, C, 1, [&, x, dy, ggI, ggG, ggB, gamma, gx, gdy, ggamma](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const T mu = T(mean[c]), is = T(invstd[c]);
      double s_dy = 0, s_dyxh = 0, s_g = 0, s_gxh = 0, s_gdy = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T* __restrict__ xr = x + (n * C + c) * L;
        const T* __restrict__ dr = dy + (n * C + c) * L;
        const T* __restrict__ gr = ggI ? ggI + (n * C + c) * L : nullptr;
        T a = 0, b = 0, d = 0, e = 0, f = 0;
        if (gr) {
#pragma GCC ivdep
          for (int64_t i = 0; i < L; ++i) {
            const T xh = (xr[i] - mu) * is;
            a += dr[i]; b += dr[i] * xh; d += gr[i]; e += gr[i] * xh; f += gr[i] * dr[i];
          }
        } else {
#pragma GCC ivdep
          for (int64_t i = 0; i < L; ++i) {
            const T xh = (xr[i] - mu) * is;
            a += dr[i]; b += dr[i] * xh;
          }
        }
        s_dy += a; s_dyxh += b; s_g += d; s_gxh += e; s_gdy += f;
      }
      const double A = s_dy / M, B = s_dyxh / M, Ag = s_g / M, Bg = s_gxh / M;
      const double S1 = s_gdy - A * s_g - B * s_gxh, S2 = s_gxh;
      const double g = double(gamma[c]), isd = invstd[c];
      ggamma[c] = T(isd * S1);
      const T gG = ggG ? ggG[c] : T(0), gB = ggB ? ggB[c] : T(0);
      const T tA = T(A), tB = T(B), tAg = T(Ag), tBg = T(Bg), tg = T(g);
      const T c_xh = T(-g * isd * isd * S1 / M), c_pg = T(-g * isd * B), c_pd = T(-g * isd * S2 / M);
      for (int64_t n = 0; n < N; ++n) {
        const T* __restrict__ xr = x + (n * C + c) * L;
        const T* __restrict__ dr = dy + (n * C + c) * L;
        const T* __restrict__ gr = ggI ? ggI + (n * C + c) * L : nullptr;
        T* __restrict__ ox = gx + (n * C + c) * L;
        T* __restrict__ od = gdy + (n * C + c) * L;
        if (gr) {
#pragma GCC ivdep
          for (int64_t i = 0; i < L; ++i) {
            const T xh = (xr[i] - mu) * is;
            const T p_dy = is * (dr[i] - tA - xh * tB);
            const T p_gg = is * (gr[i] - tAg - xh * tBg);
            ox[i] = c_xh * xh + c_pg * p_gg + c_pd * p_dy + gG * p_dy;
            od[i] = tg * p_gg + gG * xh + gB;
          }
        } else {
#pragma GCC ivdep
          for (int64_t i = 0; i < L; ++i) {
            const T xh = (xr[i] - mu) * is;
            const T p_dy = is * (dr[i] - tA - xh * tB);
            ox[i] = gG * p_dy;
            od[i] = gG * xh + gB;
          }
        }
      }
    }
  });
}

// The same formulas for a channels-last (N, H, W, C) batch: an (M, C) array whose rows are pixels, sums
// over row chunks (as the block's kernels), then one elementwise pass.
template <typename T>
void double_backward_cl_impl(int64_t M, int64_t C, const T* x, const T* dy, const T* ggI, const T* ggG, const T* ggB,
                             const T* gamma, const double* mean, const double* invstd, T* gx, T* gdy, T* ggamma) {
  std::vector<T> mu(C), is(C);
  for (int64_t c = 0; c < C; ++c) { mu[c] = T(mean[c]); is[c] = T(invstd[c]); }
  const int64_t K = ggI ? 5 : 2;  // sums: dy, dy * xh, and with ggI: ggI, ggI * xh, ggI * dy
  const auto sums = chunked_channel_sums(M, K * C, [&, x, dy, ggI](int64_t r0, int64_t r1, double* acc) {
    std::vector<T> part(K * C);
    const T* __restrict__ m = mu.data();
    const T* __restrict__ v = is.data();
    for (int64_t r = r0; r < r1; r += 64) {  // 64 rows summed in T, then added in double
      std::fill(part.begin(), part.end(), T(0));
      T* __restrict__ a = part.data();
      T* __restrict__ b = a + C;
      for (int64_t p = r; p < std::min(r1, r + 64); ++p) {
        const T* __restrict__ xr = x + p * C;
        const T* __restrict__ dr = dy + p * C;
        if (ggI) {
          const T* __restrict__ gr = ggI + p * C;
          T* __restrict__ d = b + C;
          T* __restrict__ e = d + C;
          T* __restrict__ f = e + C;
          #pragma GCC ivdep
          for (int64_t c = 0; c < C; ++c) {
            const T xh = (xr[c] - m[c]) * v[c];
            a[c] += dr[c]; b[c] += dr[c] * xh; d[c] += gr[c]; e[c] += gr[c] * xh; f[c] += gr[c] * dr[c];
          }
        } else {
          #pragma GCC ivdep
          for (int64_t c = 0; c < C; ++c) {
            const T xh = (xr[c] - m[c]) * v[c];
            a[c] += dr[c]; b[c] += dr[c] * xh;
          }
        }
      }
      for (int64_t c = 0; c < K * C; ++c) acc[c] += part[c];
    }
  });
  // per channel: the coefficients of the formulas above
  std::vector<T> tA(C), tB(C), tAg(C), tBg(C), tg(C), c_xh(C), c_pg(C), c_pd(C), gG(C), gB(C);
  for (int64_t c = 0; c < C; ++c) {
    const double A = sums[c] / M, B = sums[C + c] / M;
    const double s_g = ggI ? sums[2 * C + c] : 0.0, s_gxh = ggI ? sums[3 * C + c] : 0.0, s_gdy = ggI ? sums[4 * C + c] : 0.0;
    const double S1 = s_gdy - A * s_g - B * s_gxh, S2 = s_gxh;
    const double g = double(gamma[c]), isd = invstd[c];
    ggamma[c] = T(isd * S1);
    tA[c] = T(A); tB[c] = T(B); tAg[c] = T(s_g / M); tBg[c] = T(s_gxh / M); tg[c] = T(g);
    c_xh[c] = T(-g * isd * isd * S1 / M); c_pg[c] = T(-g * isd * B); c_pd[c] = T(-g * isd * S2 / M);
    gG[c] = ggG ? ggG[c] : T(0); gB[c] = ggB ? ggB[c] : T(0);
  }
  at::parallel_for(0, M, 256, [&, x, dy, ggI, gx, gdy](int64_t begin, int64_t end) {
    const T *__restrict__ m = mu.data(), *__restrict__ v = is.data(), *__restrict__ a = tA.data(), *__restrict__ b = tB.data();
    const T *__restrict__ ag = tAg.data(), *__restrict__ bg = tBg.data(), *__restrict__ gm = tg.data();
    const T *__restrict__ kx = c_xh.data(), *__restrict__ kg = c_pg.data(), *__restrict__ kd = c_pd.data();
    const T *__restrict__ wG = gG.data(), *__restrict__ wB = gB.data();
    for (int64_t p = begin; p < end; ++p) {
      const T* __restrict__ xr = x + p * C;
      const T* __restrict__ dr = dy + p * C;
      T* __restrict__ ox = gx + p * C;
      T* __restrict__ od = gdy + p * C;
      if (ggI) {
        const T* __restrict__ gr = ggI + p * C;
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {
          const T xh = (xr[c] - m[c]) * v[c];
          const T p_dy = v[c] * (dr[c] - a[c] - xh * b[c]);
          const T p_gg = v[c] * (gr[c] - ag[c] - xh * bg[c]);
          ox[c] = kx[c] * xh + kg[c] * p_gg + kd[c] * p_dy + wG[c] * p_dy;
          od[c] = gm[c] * p_gg + wG[c] * xh + wB[c];
        }
      } else {
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {
          const T xh = (xr[c] - m[c]) * v[c];
          ox[c] = wG[c] * v[c] * (dr[c] - a[c] - xh * b[c]);
          od[c] = wG[c] * xh + wB[c];
        }
      }
    }
  });
}

}  // namespace

// (grad_x, grad_dy, grad_gamma), in x's layout (NCHW-contiguous, or channels-last); ggI, ggG, ggB may be
// undefined (zero)
std::vector<at::Tensor> double_backward(const at::Tensor& x_, const at::Tensor& dy_, const c10::optional<at::Tensor>& ggI_,
                                        const c10::optional<at::Tensor>& ggG_, const c10::optional<at::Tensor>& ggB_,
                                        const at::Tensor& gamma_, const at::Tensor& mean, const at::Tensor& invstd) {
  TORCH_CHECK(x_.dim() >= 2 && dy_.sizes() == x_.sizes(), "dy must have x's shape");
  TORCH_CHECK(!(ggI_.has_value() && ggI_->defined()) || ggI_->sizes() == x_.sizes(), "ggI must have x's shape");
  check_channel_vectors(x_, {gamma_, mean, invstd});
  if (ggG_.has_value() && ggG_->defined()) check_channel_vectors(x_, {*ggG_});
  if (ggB_.has_value() && ggB_->defined()) check_channel_vectors(x_, {*ggB_});
  TORCH_CHECK(mean.scalar_type() == at::kDouble && invstd.scalar_type() == at::kDouble, "mean and invstd must be float64");
  const bool channels_last = x_.dim() == 4 && x_.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_.is_contiguous();
  const auto layout = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto x = x_.contiguous(layout), dy = dy_.contiguous(layout), gamma = gamma_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / std::max<int64_t>(N * C, 1);
  at::Tensor ggI, ggG, ggB;
  if (ggI_.has_value() && ggI_->defined()) ggI = ggI_->contiguous(layout);
  if (ggG_.has_value() && ggG_->defined()) ggG = ggG_->contiguous();
  if (ggB_.has_value() && ggB_->defined()) ggB = ggB_->contiguous();
  auto gx = at::empty_like(x, x.options().memory_format(layout)), gdy = at::empty_like(x, x.options().memory_format(layout));
  auto ggamma = at::empty_like(gamma);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_double_backward", [&] {
    const scalar_t* ggI_p = ggI.defined() ? ggI.data_ptr<scalar_t>() : nullptr;
    const scalar_t* ggG_p = ggG.defined() ? ggG.data_ptr<scalar_t>() : nullptr;
    const scalar_t* ggB_p = ggB.defined() ? ggB.data_ptr<scalar_t>() : nullptr;
    if (channels_last)
      double_backward_cl_impl<scalar_t>(N * L, C, x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), ggI_p, ggG_p, ggB_p, gamma.data_ptr<scalar_t>(),
                                        mean.data_ptr<double>(), invstd.data_ptr<double>(), gx.data_ptr<scalar_t>(), gdy.data_ptr<scalar_t>(),
                                        ggamma.data_ptr<scalar_t>());
    else
      double_backward_impl<scalar_t>(N, C, L, x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), ggI_p, ggG_p, ggB_p, gamma.data_ptr<scalar_t>(),
                                     mean.data_ptr<double>(), invstd.data_ptr<double>(), gx.data_ptr<scalar_t>(), gdy.data_ptr<scalar_t>(),
                                     ggamma.data_ptr<scalar_t>());
  });
  return {gx, gdy, ggamma};
}

// 3. The block's ReLU and pooling as linear maps of gradients, for its second derivative: at a given
// x they pass each window's winner where the ReLU passed, and nothing else (zero second derivative).
// to_winners: a block-output-sized gradient (N, C, OH, OW) -> the batch norm's output size (N, C, H, W);
// from_winners: its adjoint. Both channels-last.

namespace {

template <typename T>
void to_winners_impl(int64_t N, int64_t C, int64_t H, int64_t W, const T* gp, const T* op, const uint8_t* ap, T* gz) {
  const int64_t OH = H / 2, OW = W / 2;
  at::parallel_for(0, N * H, 1, [&, gp, op, ap, gz](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / H, h = r % H, oh = h / 2;
      for (int64_t w = 0; w < W; ++w) {
        T* __restrict__ out = gz + (r * W + w) * C;
        if (oh < OH && w / 2 < OW) {
          const T me = T((h & 1) * 2 + (w & 1));
          const int64_t o = ((n * OH + oh) * OW + w / 2) * C;
          #pragma GCC ivdep
          for (int64_t c = 0; c < C; ++c) out[c] = (T(ap[o + c]) == me && op[o + c] > T(0)) ? gp[o + c] : T(0);
        } else {
          #pragma GCC ivdep
          for (int64_t c = 0; c < C; ++c) out[c] = T(0);
        }
      }
    }
  });
}

template <typename T>
void from_winners_impl(int64_t N, int64_t C, int64_t H, int64_t W, const T* gz, const T* op, const uint8_t* ap, T* gp) {
  const int64_t OH = H / 2, OW = W / 2;
  at::parallel_for(0, N * OH, 1, [&, gz, op, ap, gp](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const Window<T> window(gz, n, oh, ow, H, W, C);
        const int64_t o = (r * OW + ow) * C;
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {
          const T v = window.pick(T(ap[o + c]), c);  // loaded unconditionally: gcc vectorises only then
          gp[o + c] = op[o + c] > T(0) ? v : T(0);
        }
      }
    }
  });
}

}  // namespace

at::Tensor to_winners(const at::Tensor& grad_out_, const at::Tensor& out, const at::Tensor& argmax, int64_t H, int64_t W) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto grad_out = grad_out_.contiguous(cl);
  const int64_t N = out.size(0), C = out.size(1);
  TORCH_CHECK(out.dim() == 4 && H >= 0 && W >= 0, "to_winners: shapes");
  check_block(N, C, H, W, out, argmax);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == out.scalar_type(),
              "to_winners: grad_out must have the block output's shape and dtype");
  auto grad_z = at::empty({N, C, H, W}, out.options().memory_format(cl));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "to_winners", [&] {
    to_winners_impl<scalar_t>(N, C, H, W, grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), argmax.data_ptr<uint8_t>(),
                              grad_z.data_ptr<scalar_t>());
  });
  return grad_z;
}

at::Tensor from_winners(const at::Tensor& grad_z_, const at::Tensor& out, const at::Tensor& argmax) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto grad_z = grad_z_.contiguous(cl);
  const int64_t N = grad_z.size(0), C = grad_z.size(1), H = grad_z.size(2), W = grad_z.size(3);
  check_block(N, C, H, W, out, argmax);
  TORCH_CHECK(grad_z.scalar_type() == out.scalar_type(), "from_winners: dtypes differ");
  auto grad_out = at::empty_like(out, out.options().memory_format(cl));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "from_winners", [&] {
    from_winners_impl<scalar_t>(N, C, H, W, grad_z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), argmax.data_ptr<uint8_t>(),
                                grad_out.data_ptr<scalar_t>());
  });
  return grad_out;
}

// The kernels release the GIL: MAML runs tasks on several threads, whose Python would wait otherwise.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("to_winners", &to_winners, no_gil);
  m.def("from_winners", &from_winners, no_gil);
  m.def("forward", &forward, no_gil);
  m.def("backward", &backward, no_gil);
  m.def("double_backward", &double_backward, no_gil);
}
