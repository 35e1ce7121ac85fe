// Argument validation shared by every public msa call (internal). Each check throws msa::Error
// with a message "msa::<fn>: <argument> = <value>, expected <what>".
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "msa/common.h"

namespace msa::detail {

[[noreturn]] void fail(const char* fn, const std::string& what);

// lo <= v <= hi
void check_range(const char* fn, const char* name, int64_t v, int64_t lo, int64_t hi);
// v is one of the listed values
void check_one_of(const char* fn, const char* name, int64_t v, std::initializer_list<int64_t> allowed);
// Non-null pointer where the tensor has elements.
void check_ptr(const char* fn, const char* name, const void* ptr, bool needed = true);
// Finite, positive scale; 0 is replaced by default_value.
void resolve_scale(const char* fn, const char* name, float& scale, float default_value);
// dtype supported by the backend (cpu: f32, bf16, f64; cuda: bf16).
void check_dtype(const char* fn, DType t, const Exec& ex);
// Backend compiled in and implementing this op. Throws for cuda until an op has a kernel.
void check_backend(const char* fn, const Exec& ex, bool cuda_implemented);
// Heads: h_kv >= 1, h_q a multiple of h_kv.
void check_heads(const char* fn, int64_t h_q, int64_t h_kv);

// Layout of a [n, h, d] tensor (last dim contiguous). Zero strides become contiguous defaults;
// strides must be positive; outputs must not overlap themselves.
void resolve_strides3(const char* fn, const char* name, int64_t n, int64_t h, int64_t d, int64_t& stride_tok,
                      int64_t& stride_head, bool is_output);
// Layout of a [n, d] tensor.
void resolve_strides2(const char* fn, const char* name, int64_t n, int64_t d, int64_t& stride_tok, bool is_output);

// The varlen description resolved on the host.
struct SeqInfo {
  int64_t n_q = 0, n_k = 0, batch = 0;
  std::vector<int32_t> cu_q, cu_k;  // [batch+1]
  std::vector<int32_t> seq_of_q;    // [n_q] sequence of each query row
  std::vector<int32_t> pos;         // [n_q] absolute position of each query row
  int64_t max_len_k = 0;

  int64_t len_k(int64_t b) const { return cu_k[b + 1] - cu_k[b]; }
  // Packed key row of position j in the sequence of query row i.
  int64_t key_row(int64_t i, int64_t j) const { return cu_k[seq_of_q[i]] + j; }
};

// Validates seq (cu_seqlens monotone, starting at 0, ending at n; q_pos in range; each sequence's
// queries fit its keys) reading its pointers as host memory.
SeqInfo resolve_varlen(const char* fn, const Varlen& seq);

// Shape-only check of seq for the CUDA backend, whose varlen arrays are device memory and are
// never read on the host: counts in range, cu_seqlens_q required for batch > 1, cu_seqlens_k
// required when n_k != n_q, and n_q <= n_k for a single bottom-right aligned sequence.
void check_varlen_shape(const char* fn, const Varlen& seq);

// The backend's check of seq: resolve_varlen for host arrays (the CPU backend), check_varlen_shape
// for device arrays (the CUDA backend), whose SeqInfo then holds only n_q, n_k and batch.
SeqInfo check_varlen(const char* fn, const Varlen& seq, bool device);

// Validates a [n_q, h_kv, topk] selection: entries are -1 only as tail padding, otherwise blocks
// the query can see (0 <= b <= p / bk), no duplicates within a row. Order within a row is free.
void check_topk_idx(const char* fn, const SeqInfo& s, const int32_t* topk_idx, int64_t h_kv, int64_t topk,
                    int64_t bk);

}  // namespace msa::detail
