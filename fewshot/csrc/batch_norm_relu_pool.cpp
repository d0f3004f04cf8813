// Batch norm (the batch's statistics) + ReLU + 2x2 max-pool (stride 2) of a channels-last CPU
// batch in one pass, and its backward in one more: fewshot/fused.py explains why and when.
//
// Memory is (N, H, W, C): the channels of a pixel are contiguous, so every inner loop runs over
// C and the compiler vectorises it (ivdep: the output never overlaps the inputs). Sums over the batch are taken in a fixed number of chunks,
// added in order in double precision, so results do not depend on the thread count.

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
        const T* __restrict__ p0 = xp + ((n * H + 2 * oh) * W + 2 * ow) * C;
        const T* __restrict__ p1 = p0 + C;
        const T* __restrict__ p2 = p0 + W * C;
        const T* __restrict__ p3 = p2 + C;
        T* __restrict__ o = op + (r * OW + ow) * C;
        uint8_t* __restrict__ a = ap + (r * OW + ow) * C;
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {  // the first maximum in ATen's scan order, then the ReLU
          const T v0 = p0[c] * sc[c] + sh[c], v1 = p1[c] * sc[c] + sh[c];
          const T v2 = p2[c] * sc[c] + sh[c], v3 = p3[c] * sc[c] + sh[c];
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
        const T* __restrict__ p0 = xp + ((n * H + 2 * oh) * W + 2 * ow) * C;
        const T* __restrict__ p1 = p0 + C;
        const T* __restrict__ p2 = p0 + W * C;
        const T* __restrict__ p3 = p2 + C;
        const int64_t o = (r * OW + ow) * C;
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {
          const T k = T(ap[o + c]);
          const T dy = op[o + c] > T(0) ? gp[o + c] : T(0);
          const T xa = k == T(0) ? p0[c] : (k == T(1) ? p1[c] : (k == T(2) ? p2[c] : p3[c]));
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

// (out, argmax, mean, invstd), or an empty list where x or the affine parameters are not finite
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be a 4-D channels-last tensor");
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
  const auto g = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  const auto w = weight.contiguous();
  auto grad_x = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto grad_weight = at::empty_like(w), grad_bias = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_relu_pool_backward", [&] {
    backward_impl<scalar_t>(g, x, out, argmax, mean, invstd, w, grad_x, grad_weight, grad_bias);
  });
  return {grad_x, grad_weight, grad_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
