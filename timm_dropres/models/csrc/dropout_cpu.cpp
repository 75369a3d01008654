// Residual dropout on CPU: sorted drop positions applied inside one pass each way, fused with the residual
// addition and the ReLU of a post-activation block, and the positions themselves turned out of random words
// in three passes. Built and loaded by timm_dropres/models/cpu_kernel.py (torch.utils.cpp_extension); the
// autograd wiring, the drawing of the random words and every check of the arguments' layout live in
// timm_dropres/models/cpu_dropout.py.
//
// Every tensor argument is dense and all of them share one memory order (the Python side makes it so); the
// kernels walk raw memory, and `pos` holds strictly increasing indices into it (int32 or int64).
//
// Rounding is that of the separate ATen ops: the scaled branch is rounded to the tensor's dtype before the
// addition (as torch.mul then add_ round twice), so a result equals dropout-then-add bit for bit at equal drops.
// Build flags: -ffp-contract=off keeps the two roundings (no FMA contraction); -fno-trapping-math lets the
// compiler vectorise the ReLU selects; with GCC, -fopenmp makes at::parallel_for use the OpenMP runtime torch
// already loaded (libgomp.so.1), so torch.set_num_threads governs these loops as it governs ATen's.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace {

// Elements per step of a loop: the dense pass over a chunk, then the drops inside it, while the chunk is in L1
// (three or four 4 KB float32 streams). On the project's AVX-512 machine 1024 patched one 2.1 M-element tensor's
// drops 0.1-0.15 ms faster than 4096 (about 1 ms per resnet50 step, extrapolated); 512 and 2048 were close.
constexpr int64_t kChunk = 1024;
// Chunks per parallel task (32768 elements, ATen's own grain size).
constexpr int64_t kGrain = 32;

template <typename index_t>
int64_t first_drop_at_or_after(const index_t* pos, int64_t m, int64_t i) {
  return std::lower_bound(pos, pos + m, i, [](index_t a, int64_t b) { return static_cast<int64_t>(a) < b; }) - pos;
}

// Calls dense(b, e) for each chunk [b, e) of [0, n), then drop(j) for each position j inside it.
template <typename index_t, typename Dense, typename Drop>
void chunked(int64_t n, const index_t* pos, int64_t m, const Dense& dense, const Drop& drop) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, kGrain, [&](int64_t c0, int64_t c1) {
    int64_t k = first_drop_at_or_after(pos, m, c0 * kChunk);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kChunk;
      const int64_t e = std::min(n, b + kChunk);
      dense(b, e);
      for (; k < m && static_cast<int64_t>(pos[k]) < e; ++k) drop(static_cast<int64_t>(pos[k]));
    }
  });
}

template <typename scalar_t, typename index_t>
void drop_scale_impl(const scalar_t* src, scalar_t* out, const index_t* pos, int64_t m,
                     int64_t n, double scale_d) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scale = static_cast<opmath_t>(scale_d);
  chunked(n, pos, m,
      [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) out[j] = static_cast<scalar_t>(static_cast<opmath_t>(src[j]) * scale);
      },
      [&](int64_t j) { out[j] = scalar_t(0); });
}

template <typename scalar_t, typename index_t, bool RELU>
void drop_add_impl(const scalar_t* x, const scalar_t* __restrict__ s, scalar_t* out, const index_t* pos, int64_t m,
                   int64_t n, double scale_d) {
  // out may be x itself (each element is read before it is written); never s (the drops read s again)
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scale = static_cast<opmath_t>(scale_d);
  chunked(n, pos, m,
      [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) {
          const scalar_t kept = static_cast<scalar_t>(static_cast<opmath_t>(x[j]) * scale);
          const opmath_t v = static_cast<opmath_t>(static_cast<scalar_t>(
              static_cast<opmath_t>(kept) + static_cast<opmath_t>(s[j])));
          out[j] = static_cast<scalar_t>(RELU ? (v < opmath_t(0) ? opmath_t(0) : v) : v);
        }
      },
      [&](int64_t j) {  // the separate ops add the shortcut to a zero: 0 + (-0) is +0
        const opmath_t v = static_cast<opmath_t>(static_cast<scalar_t>(opmath_t(0) + static_cast<opmath_t>(s[j])));
        out[j] = static_cast<scalar_t>(RELU ? (v < opmath_t(0) ? opmath_t(0) : v) : v);
      });
}

template <typename scalar_t, typename index_t>
void drop_add_relu_backward_impl(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                                 scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_s, const index_t* pos,
                                 int64_t m, int64_t n, double scale_d) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scale = static_cast<opmath_t>(scale_d);
  chunked(n, pos, m,
      [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) {
          // as threshold_backward(grad, out, 0): zero where out <= 0, so a NaN output passes its gradient
          const opmath_t g = static_cast<opmath_t>(grad[j]);
          const opmath_t gs = static_cast<opmath_t>(out[j]) <= opmath_t(0) ? opmath_t(0) : g;
          grad_s[j] = static_cast<scalar_t>(gs);
          grad_x[j] = static_cast<scalar_t>(gs * scale);
        }
      },
      [&](int64_t j) { grad_x[j] = scalar_t(0); });
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": dtypes differ (", a.scalar_type(), " vs ",
              b.scalar_type(), ")");
  TORCH_CHECK(a.sizes() == b.sizes(), what, ": shapes differ (", a.sizes(), " vs ", b.sizes(), ")");
  for (int64_t d = 0; d < a.dim(); ++d) {  // a dimension of size 1 may carry any stride
    TORCH_CHECK(a.size(d) == 1 || a.stride(d) == b.stride(d), what, ": strides differ (", a.strides(), " vs ",
                b.strides(), ")");
  }
  TORCH_CHECK(a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense(), what,
              ": tensors must be dense");
}

// A written tensor against another argument: the same elements (when the loop reads each before writing it,
// `same_ok`) or none; never an overlap at an offset, which would read elements the loop already wrote.
void check_overlap(const at::Tensor& written, const at::Tensor& other, bool same_ok, const char* what,
                   const char* names) {
  const at::MemOverlapStatus status = at::get_overlap_status(written, other);
  TORCH_CHECK(status == at::MemOverlapStatus::No || (same_ok && status == at::MemOverlapStatus::Full), what, ": ",
              names, same_ok ? " must be the same tensor or not overlap" : " must not overlap");
}

template <typename index_t>
bool increasing_in_range(const index_t* p, int64_t m, int64_t n) {
  if (m == 0) return true;
  bool ok = p[0] >= 0 && static_cast<int64_t>(p[m - 1]) < n;
  for (int64_t i = 1; i < m; ++i) ok &= p[i] > p[i - 1];  // a vectorised reduction: a few us per 200 k drops
  return ok;
}

// The kernels write at pos: every index is checked (strictly increasing and inside the tensor) before any
// write, so a bad pos raises instead of writing out of bounds.
void check_pos(const at::Tensor& pos, int64_t n) {
  TORCH_CHECK(pos.device().is_cpu() && pos.dim() == 1 && pos.is_contiguous(), "pos: a contiguous 1-D CPU tensor");
  TORCH_CHECK(pos.scalar_type() == at::kInt || pos.scalar_type() == at::kLong, "pos: int32 or int64");
  const bool ok = pos.scalar_type() == at::kInt
      ? increasing_in_range(pos.const_data_ptr<int32_t>(), pos.numel(), n)
      : increasing_in_range(pos.const_data_ptr<int64_t>(), pos.numel(), n);
  TORCH_CHECK(ok, "pos: positions must be strictly increasing and lie in [0, ", n, ")");
}

// out = src * scale, zero at pos; out may be src
void drop_scale(const at::Tensor& src, const at::Tensor& pos, double scale, at::Tensor out) {
  check_pair(src, out, "drop_scale");
  check_overlap(out, src, true, "drop_scale", "out and src");
  check_pos(pos, src.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "drop_scale", [&] {
    AT_DISPATCH_INDEX_TYPES(pos.scalar_type(), "drop_scale", [&] {
      const scalar_t* s = src.const_data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      drop_scale_impl<scalar_t, index_t>(s, o, pos.const_data_ptr<index_t>(), pos.numel(), src.numel(), scale);
    });
  });
}

// out = act(shortcut + x * scale), act(shortcut) at pos; out may be x
void drop_add(const at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& pos, double scale, bool relu,
              at::Tensor out) {
  check_pair(x, shortcut, "drop_add");
  check_pair(x, out, "drop_add");
  TORCH_CHECK(!out.is_alias_of(shortcut), "drop_add: out must not share memory with shortcut");
  check_overlap(out, x, true, "drop_add", "out and x");
  check_pos(pos, x.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "drop_add", [&] {
    AT_DISPATCH_INDEX_TYPES(pos.scalar_type(), "drop_add", [&] {
      const index_t* p = pos.const_data_ptr<index_t>();
      if (relu) {
        drop_add_impl<scalar_t, index_t, true>(x.const_data_ptr<scalar_t>(), shortcut.const_data_ptr<scalar_t>(),
                                               out.data_ptr<scalar_t>(), p, pos.numel(), x.numel(), scale);
      } else {
        drop_add_impl<scalar_t, index_t, false>(x.const_data_ptr<scalar_t>(), shortcut.const_data_ptr<scalar_t>(),
                                                out.data_ptr<scalar_t>(), p, pos.numel(), x.numel(), scale);
      }
    });
  });
}

// grad_shortcut = threshold_backward(grad, out, 0); grad_x = grad_shortcut * scale, zero at pos
void drop_add_relu_backward(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& pos, double scale,
                            at::Tensor grad_x, at::Tensor grad_shortcut) {
  check_pair(grad, out, "drop_add_relu_backward");
  check_pair(grad, grad_x, "drop_add_relu_backward");
  check_pair(grad, grad_shortcut, "drop_add_relu_backward");
  // the loop's pointers are __restrict__: the two outputs share no element with each other or the inputs
  check_overlap(grad_x, grad_shortcut, false, "drop_add_relu_backward", "grad_x and grad_shortcut");
  for (const at::Tensor* written : {&grad_x, &grad_shortcut}) {
    check_overlap(*written, grad, false, "drop_add_relu_backward", "the gradients written and grad");
    check_overlap(*written, out, false, "drop_add_relu_backward", "the gradients written and out");
  }
  check_pos(pos, grad.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "drop_add_relu_backward", [&] {
    AT_DISPATCH_INDEX_TYPES(pos.scalar_type(), "drop_add_relu_backward", [&] {
      drop_add_relu_backward_impl<scalar_t, index_t>(
          grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
          grad_shortcut.data_ptr<scalar_t>(), pos.const_data_ptr<index_t>(), pos.numel(), grad.numel(), scale);
    });
  });
}


// Drop positions from random words: the ATen-op chain of cpu_dropout.drop_positions (eleven passes) in three,
// the middle one torch's own log_:  u = (w & 0xFFFFFF) * 2^-24;  g = floor(log(1 - u) * inv_log) + 1;
// pos = base + cumsum(g). Every step but the log is exact or the chain's own float32 rounding (the product, as
// torch.mul_ by a Python scalar rounds it; the + 1 in float32, as add_ does, which matters for gaps above 2^24),
// and the log is the same ATen call on a tensor of the same length, so the positions equal the op chain's bit
// for bit. Writes the positions below n over the words (int32) and returns how many there are; words.numel()
// means every one fell below n (the caller draws on from the last). The words are read and written as int32
// only (the float values go through std::bit_cast), so no pointer of another type aliases them.
int64_t geometric_positions_(at::Tensor words, double inv_log_d, int64_t n, int64_t base) {
  TORCH_CHECK(words.device().is_cpu() && words.dim() == 1 && words.is_contiguous() && words.scalar_type() == at::kInt,
              "geometric_positions_: words must be a contiguous 1-D int32 CPU tensor");
  // a gap is at most log(2^-24) * inv_log + 1; at most 2^30 + 1 keeps the cast below and the sums far from overflow
  TORCH_CHECK(inv_log_d < 0.0 && std::log(0x1p-24) * inv_log_d <= 0x1p30,
              "geometric_positions_: inv_log must be 1 / log(1 - p), in [-6.45e7, 0) (p >= 1.6e-8), got ", inv_log_d);
  TORCH_CHECK(n >= 0 && n <= (int64_t{1} << 31),
              "geometric_positions_: n must be in [0, 2**31] (positions below it fit int32), got ", n);
  TORCH_CHECK(base >= -1 && base < std::max<int64_t>(n, 0),
              "geometric_positions_: base must be in [-1, n) (-1, or the last position drawn), got ", base, " for n = ", n);
  const int64_t m = words.numel();
  int32_t* w = words.data_ptr<int32_t>();
  at::parallel_for(0, m, 32768, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float u = static_cast<float>(w[i] & 0xFFFFFF) * 0x1p-24f;
      w[i] = std::bit_cast<int32_t>(1.0f - u);  // exact: u is on the 2^-24 grid
    }
  });
  words.view(at::kFloat).log_();  // torch's own log, as the op chain's log_
  const float inv_log = static_cast<float>(inv_log_d);
  constexpr int64_t kBlock = 1024;
  int64_t pos = base;  // < n + 2^30 + 1 at most: no overflow; sums past n are never written
  for (int64_t b = 0; b < m; b += kBlock) {
    const int64_t e = std::min(m, b + kBlock);
    for (int64_t i = b; i < e; ++i) {
      w[i] = static_cast<int32_t>(std::floor(std::bit_cast<float>(w[i]) * inv_log) + 1.0f);
    }
    for (int64_t i = b; i < e; ++i) {
      pos += w[i];
      if (pos >= n) return i;
      w[i] = static_cast<int32_t>(pos);
    }
  }
  return m;
}

}  // namespace

TORCH_LIBRARY(timm_dropres_cpu, m) {
  m.def("drop_scale(Tensor src, Tensor pos, float scale, Tensor(a!) out) -> ()");
  m.def("drop_add(Tensor x, Tensor shortcut, Tensor pos, float scale, bool relu, Tensor(a!) out) -> ()");
  m.def("drop_add_relu_backward(Tensor grad, Tensor out, Tensor pos, float scale, Tensor(a!) grad_x, "
        "Tensor(b!) grad_shortcut) -> ()");
  m.def("geometric_positions_(Tensor(a!) words, float inv_log, int n, int base) -> int");
}

TORCH_LIBRARY_IMPL(timm_dropres_cpu, CPU, m) {
  m.impl("drop_scale", &drop_scale);
  m.impl("drop_add", &drop_add);
  m.impl("drop_add_relu_backward", &drop_add_relu_backward);
  m.impl("geometric_positions_", &geometric_positions_);
}
