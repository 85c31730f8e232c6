// The LM head's per-row negative log-likelihood for gradient-free evaluation, in one pass per
// block of rows (tvae_core.native.lm_head_nll documents the maths and the measured errors).
//
//   nll_m = log( sum_{v != t_m} exp(l_mv) + exp(x_m) ) - x_m,   l = h W^T in bfloat16,
//
// x_m the target's logit computed exactly in float32 by the caller. Each block's logits are
// computed transposed ([V, rows], oneDNN's bfloat16 matmul) so that 16 rows (AVX-512; 8 with
// AVX2) form one vector of floats: the max and the sum of exponentials over the vocabulary are
// then vertical vector operations (GCC/Clang vector extensions, built with -O3 -march=native),
// with a degree-5 polynomial exponential (relative error 2.0e-7, measured) in place of libm's.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// GCC/Clang vector extensions, one native register wide: the compiler splits wider vectors into
// scalar code for comparisons (measured: an AVX2 build of a 16-wide version was 4x slower than
// the torch path), so the lane count follows the instruction set the build targets.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;  // one zmm register
#elif defined(__AVX2__)
constexpr int64_t kLanes = 8;   // one ymm register
#else
constexpr int64_t kLanes = 4;   // one xmm (SSE2) or NEON register
#endif
typedef float floats __attribute__((vector_size(kLanes * 4)));
typedef int32_t ints __attribute__((vector_size(kLanes * 4)));
typedef uint32_t uints __attribute__((vector_size(kLanes * 4)));
typedef uint16_t halves __attribute__((vector_size(kLanes * 2)));

__attribute__((always_inline)) inline floats splat(float value) { return floats{} + value; }

// bfloat16 is the high half of a float32
inline float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof value);
  return value;
}

__attribute__((always_inline)) inline floats load_bf16(const uint16_t* source) {
  halves raw;
  std::memcpy(&raw, source, sizeof raw);
  return reinterpret_cast<floats>(__builtin_convertvector(raw, uints) << 16);
}

__attribute__((always_inline)) inline floats maximum(floats a, floats b) {
  return a > b ? a : b;
}

// exp(x) = 2^n * e^r with n = round(x log2 e) and r = x - n ln 2 in [-ln2/2, ln2/2] (Cody-Waite:
// ln 2 split in two so that n * ln2_hi is exact and r keeps float32 accuracy for any x); e^r by a
// near-minimax degree-5 polynomial (max relative error 2.0e-7 in float32, measured on a grid of
// x in [-87, 0]), 2^n added to the exponent bits. x is clamped at -126 ln 2 so that 2^n stays a
// normal float: exp(x) < 1.2e-38 counts as ~1e-38, which no sum with a term of 1 (the row's max)
// can see. Callers pass x <= 0.
__attribute__((always_inline)) inline floats fast_exp(floats x) {
  const floats round = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  x = maximum(x, splat(-87.33f));           // = -126 ln 2
  const floats n = (x * 1.44269504088896341f + round) - round;
  const floats r = (x - n * 0.693145751953125f) - n * 1.4286068202862268e-6f;
  floats p = splat(8.297654800117016e-3f);
  p = p * r + 4.191538318991661e-2f;
  p = p * r + 1.6667574644088745e-1f;
  p = p * r + 4.9998894333839417e-1f;
  p = p * r + 9.999997019767761e-1f;
  p = p * r + 1.0000001192092896f;
  const ints exponent = __builtin_convertvector(n, ints) << 23;
  return reinterpret_cast<floats>(reinterpret_cast<ints>(p) + exponent);
}

float lane_exp(float x) {  // fast_exp of one value: the target corrections use the same function
  return fast_exp(splat(x))[0];
}

constexpr int64_t kGroups = 4;  // vectors of rows per block: 16 accumulators, all in registers
constexpr int64_t kBlockRows = kGroups * kLanes;  // rows per matmul: 64 with AVX-512, 32 with AVX2
constexpr int64_t kChunk = 256;  // vocabulary rows per pass: 256 x 64 bfloat16 = 32 KB, L1-sized

// The NLL of `count` (<= kBlockRows) rows whose logits are the columns of `logits`
// ([V, kBlockRows], bfloat16).
// One sweep over the vocabulary in L1-sized chunks: each chunk's max first, then its
// exponentials, the running sum rescaled when the max grows (online logsumexp). The running max
// starts at the exact target logit, so the sum never overflows and the max needs no fix-up.
void reduce_block(const uint16_t* logits, int64_t vocab, const int64_t* targets,
                  const float* target_logits, int64_t count, float* nll) {
  floats max[kGroups], sum[kGroups];
  for (int64_t g = 0; g < kGroups; ++g) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const int64_t row = g * kLanes + j;
      max[g][j] = row < count ? target_logits[row] : 0.0f;
    }
    sum[g] = splat(0.0f);
  }
  for (int64_t first = 0; first < vocab; first += kChunk) {
    const int64_t last = std::min(vocab, first + kChunk);
    floats chunk_max[kGroups];
    for (int64_t g = 0; g < kGroups; ++g) chunk_max[g] = max[g];
    for (int64_t v = first; v < last; ++v) {
      for (int64_t g = 0; g < kGroups; ++g) {
        chunk_max[g] = maximum(chunk_max[g], load_bf16(logits + v * kBlockRows + g * kLanes));
      }
    }
    floats chunk_sum[kGroups];  // summed per chunk, then into the total: float32 rounding grows
    for (int64_t g = 0; g < kGroups; ++g) {  // with 256 + V / 256 terms, not with V
      // rescaled only where the max grew: exp(0) is 1 + 1.2e-7 here, and multiplying by it
      // at each of the V / 256 chunks biased the sum by ~2e-6 (measured)
      sum[g] *= chunk_max[g] > max[g] ? fast_exp(max[g] - chunk_max[g]) : splat(1.0f);
      max[g] = chunk_max[g];
      chunk_sum[g] = splat(0.0f);
    }
    for (int64_t v = first; v < last; ++v) {
      for (int64_t g = 0; g < kGroups; ++g) {
        chunk_sum[g] += fast_exp(load_bf16(logits + v * kBlockRows + g * kLanes) - max[g]);
      }
    }
    for (int64_t g = 0; g < kGroups; ++g) sum[g] += chunk_sum[g];
  }
  for (int64_t row = 0; row < count; ++row) {
    const int64_t g = row / kLanes, j = row % kLanes;
    // the target's rounded term leaves the sum (computed by the same function, so it cancels to
    // the sum's rounding) and its exact logit enters instead
    const float rounded_target = bf16_to_float(logits[targets[row] * kBlockRows + row]);
    const float target_term = lane_exp(target_logits[row] - max[g][j]);
    const float total = sum[g][j] - lane_exp(rounded_target - max[g][j]) + target_term;
    // -log p >= 0: a near-certain target's ~1e-7 of cancellation must not make it negative
    nll[row] = std::max(0.0f, std::log(std::max(total, target_term)) - (target_logits[row] - max[g][j]));
  }
}

// With keep_logits, each block's logits ([V, kBlockRows], bfloat16, the matmul's own output) are
// returned for the backward pass, which then turns them into the gradient in place instead of
// computing the same matmul again (one of the head's four block matmuls per training step).
std::vector<torch::Tensor> lm_head_nll_blocks(const torch::Tensor& hidden, const torch::Tensor& weight,
                                              const torch::Tensor& targets, const torch::Tensor& target_logits,
                                              bool keep_logits) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "lm_head_nll: CPU tensors only");
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "lm_head_nll: hidden and weight must be bfloat16");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "lm_head_nll: hidden [M, H] and weight [V, H] expected");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "lm_head_nll: targets must be int64 [M]");
  TORCH_CHECK(target_logits.scalar_type() == at::kFloat && target_logits.dim() == 1 &&
              target_logits.size(0) == hidden.size(0), "lm_head_nll: target_logits must be float32 [M]");
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  const auto hidden_c = hidden.contiguous();
  const auto weight_c = weight.contiguous();
  const auto targets_c = targets.contiguous();
  const auto target_logits_c = target_logits.contiguous();
  if (rows > 0) {
    const auto [lowest, highest] = at::aminmax(targets_c);
    TORCH_CHECK(lowest.item<int64_t>() >= 0 && highest.item<int64_t>() < vocab,
                "lm_head_nll: targets must lie in [0, ", vocab, ")");
  }
  auto nll = torch::empty({rows}, hidden.options().dtype(at::kFloat));
  const int64_t* target_ptr = targets_c.data_ptr<int64_t>();
  const float* target_logit_ptr = target_logits_c.data_ptr<float>();
  float* nll_ptr = nll.data_ptr<float>();
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  std::vector<torch::Tensor> kept(keep_logits ? blocks : 0);
  // blocks in parallel, each its own single-threaded matmul (nested parallelism is off)
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * kBlockRows, count = std::min(kBlockRows, rows - start);
      auto block = hidden_c.slice(0, start, start + count);
      if (count != kBlockRows) {  // zero rows up to a whole block; their results are dropped
        block = at::cat({block, at::zeros({kBlockRows - count, hidden.size(1)}, hidden.options())});
      }
      const auto logits = at::mm(weight_c, block.t()).contiguous();  // [V, kBlockRows], bfloat16
      reduce_block(reinterpret_cast<const uint16_t*>(logits.data_ptr<at::BFloat16>()), vocab,
                   target_ptr + start, target_logit_ptr + start, count, nll_ptr + start);
      if (keep_logits) kept[b] = logits;  // each block writes its own slot
    }
  });
  kept.insert(kept.begin(), nll);
  return kept;  // {nll, the blocks' logits if kept}
}

torch::Tensor lm_head_nll(const torch::Tensor& hidden, const torch::Tensor& weight,
                          const torch::Tensor& targets, const torch::Tensor& target_logits) {
  return lm_head_nll_blocks(hidden, weight, targets, target_logits, false)[0];
}

// The backward pass of the training head (tvae_core.lm_head, lm_head_kernel="native"): for each
// block of rows, the logits are recomputed transposed ([V, kBlockRows]), turned into the scaled
// gradient d_vm = (exp(l_vm - lse_m) - [v = t_m]) g_m in place, in one sweep (the target's entry
// from its exact logit), and rounded to bfloat16 for the two matmuls
//
//   dL/dh_m = sum_v d_vm w_v,     dL/dw_v = sum_m d_vm h_m   (the latter summed over blocks in float32)
//
// lse_m is the forward pass's log-sum-exp (nll_m + x_m), so no max or sum is taken again.
void gradient_block(uint16_t* logits, int64_t vocab, const int64_t* targets, const float* target_logits,
                    const float* lse, const float* grad_nll, int64_t count) {
  floats shift[kGroups], scale[kGroups];
  for (int64_t g = 0; g < kGroups; ++g) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const int64_t row = g * kLanes + j;
      shift[g][j] = row < count ? lse[row] : 0.0f;
      scale[g][j] = row < count ? grad_nll[row] : 0.0f;  // padding rows get a zero gradient
    }
  }
  for (int64_t v = 0; v < vocab; ++v) {
    for (int64_t g = 0; g < kGroups; ++g) {
      uint16_t* at = logits + v * kBlockRows + g * kLanes;
      // l - lse <= 0 (up to lse's rounding): the forward pass summed these same logits (the same
      // matmul on the same operands) into lse, as fast_exp requires
      const floats value = fast_exp(load_bf16(at) - shift[g]) * scale[g];
      // round to nearest even, as torch's float32 -> bfloat16 conversion (no NaN can arise here
      // from finite inputs; a NaN lse or gradient stays NaN after rounding, as it must)
      const uints bits = reinterpret_cast<uints>(value);
      const uints rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
      const halves out = __builtin_convertvector(rounded, halves);
      std::memcpy(at, &out, sizeof out);
    }
  }
  for (int64_t row = 0; row < count; ++row) {
    const float value = (lane_exp(target_logits[row] - lse[row]) - 1.0f) * grad_nll[row];
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    logits[targets[row] * kBlockRows + row] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}

// out += in, bfloat16 into float32, n values: torch's mixed-dtype add_ takes its generic casting
// loop here, as long as a whole gradient matmul per block (measured)
void accumulate_bf16(float* out, const uint16_t* in, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    floats sum;
    std::memcpy(&sum, out + i, sizeof sum);
    sum += load_bf16(in + i);
    std::memcpy(out + i, &sum, sizeof sum);
  }
  for (; i < n; ++i) out[i] += bf16_to_float(in[i]);
}

// `logits`: the forward pass's blocks (lm_head_nll_blocks with keep_logits), overwritten here with
// the gradient; empty: each block's logits are recomputed (the same matmul on the same operands).
std::vector<torch::Tensor> lm_head_nll_backward(const torch::Tensor& hidden, const torch::Tensor& weight,
                                                const torch::Tensor& targets, const torch::Tensor& target_logits,
                                                const torch::Tensor& lse, const torch::Tensor& grad_nll,
                                                const std::vector<torch::Tensor>& logits) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "lm_head_nll_backward: CPU tensors only");
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "lm_head_nll_backward: hidden and weight must be bfloat16");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "lm_head_nll_backward: hidden [M, H] and weight [V, H] expected");
  const int64_t rows = hidden.size(0), vocab = weight.size(0), width = hidden.size(1);
  for (const auto* t : {&target_logits, &lse, &grad_nll}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == rows,
                "lm_head_nll_backward: target_logits, lse and grad_nll must be float32 [M]");
  }
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == rows,
              "lm_head_nll_backward: targets must be int64 [M]");
  const auto hidden_c = hidden.contiguous();
  const auto weight_c = weight.contiguous();
  const auto targets_c = targets.contiguous();
  const auto target_logits_c = target_logits.contiguous();
  const auto lse_c = lse.contiguous();
  const auto grad_c = grad_nll.contiguous();
  if (rows > 0) {
    const auto [lowest, highest] = at::aminmax(targets_c);
    TORCH_CHECK(lowest.item<int64_t>() >= 0 && highest.item<int64_t>() < vocab,
                "lm_head_nll_backward: targets must lie in [0, ", vocab, ")");
  }
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  TORCH_CHECK(logits.empty() || static_cast<int64_t>(logits.size()) == blocks,
              "lm_head_nll_backward: logits must be empty or the forward pass's ", blocks, " blocks");
  for (const auto& block_logits : logits) {
    TORCH_CHECK(block_logits.scalar_type() == at::kBFloat16 && block_logits.is_contiguous() &&
                block_logits.dim() == 2 && block_logits.size(0) == vocab && block_logits.size(1) == kBlockRows,
                "lm_head_nll_backward: each block of logits must be contiguous bfloat16 [", vocab, ", ",
                kBlockRows, "]");
  }
  auto grad_hidden = torch::empty({rows, width}, hidden.options().dtype(at::kFloat));
  auto grad_weight = torch::zeros({vocab, width}, hidden.options().dtype(at::kFloat));
  // W^T once: W^T d is 1.5x faster than d^T W, the same product (oneDNN, one thread, measured)
  const auto weight_t = weight_c.t().contiguous();  // [H, V]
  // blocks one after the other (the weight gradient is one sum); the matmuls use torch's threads
  for (int64_t start = 0; start < rows; start += kBlockRows) {
    const int64_t count = std::min(kBlockRows, rows - start);
    auto block = hidden_c.slice(0, start, start + count);
    if (count != kBlockRows) {  // zero rows up to a whole block; their gradient is zero
      block = at::cat({block, at::zeros({kBlockRows - count, width}, hidden.options())});
    }
    // [V, kBlockRows] logits, then the gradient
    auto d = logits.empty() ? at::mm(weight_c, block.t()).contiguous() : logits[start / kBlockRows];
    gradient_block(reinterpret_cast<uint16_t*>(d.data_ptr<at::BFloat16>()), vocab,
                   targets_c.data_ptr<int64_t>() + start, target_logits_c.data_ptr<float>() + start,
                   lse_c.data_ptr<float>() + start, grad_c.data_ptr<float>() + start, count);
    grad_hidden.slice(0, start, start + count).copy_(at::mm(weight_t, d).t().slice(0, 0, count));
    const auto partial = at::mm(d, block);  // [V, H] in bfloat16, summed in float32
    accumulate_bf16(grad_weight.data_ptr<float>(), reinterpret_cast<const uint16_t*>(partial.data_ptr<at::BFloat16>()),
                    vocab * width);
  }
  return {grad_hidden, grad_weight};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lm_head_nll", &lm_head_nll, "Per-row NLL of a bias-free bfloat16 LM head (see the file's header)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lm_head_nll_blocks", &lm_head_nll_blocks,
        "lm_head_nll and, with keep_logits, each block's bfloat16 logits for lm_head_nll_backward",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lm_head_nll_backward", &lm_head_nll_backward,
        "Gradients (hidden, weight) of the bias-free bfloat16 LM head's summed, weighted NLL",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
