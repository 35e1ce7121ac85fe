// msa/common.h — types shared by every msa operation: dtypes, the error type, the execution
// context (backend + stream) and the varlen sequence description. For every user of the C++ API.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace msa {

// Element type of the floating-point tensors of a call (q, k, v, q_idx, k_idx, o, gradients).
// lse, block scores and losses are always float32 / double as documented per field.
// f64 exists for float64 finite-difference checks and is CPU-only.
enum class DType : int32_t { f32 = 0, bf16 = 1, f64 = 2 };

enum class Backend : int32_t { cpu = 0, cuda = 1 };

const char* dtype_name(DType t);
const char* backend_name(Backend b);
int64_t dtype_size(DType t);

// Every invalid argument is reported by throwing msa::Error (a std::invalid_argument). Its
// message names the function, the argument and what was expected, e.g.
//   "msa::index_topk: topk = 0, expected 1 <= topk <= 32".
// Nothing is written to outputs when a call throws during validation.
class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& what) : std::invalid_argument(what) {}
};

// bfloat16 storage type: the top 16 bits of an IEEE float32. Conversion rounds to nearest even;
// NaN stays NaN.
struct bf16 {
  uint16_t bits = 0;
};
float bf16_to_float(bf16 x);
bf16 float_to_bf16(float f);

// Strides are in elements, int64, and must be positive; a stride left at 0 means the contiguous
// default for that tensor's documented shape. The last dim is always contiguous. Outputs must not
// overlap themselves.

// Where and how a call runs.
struct Exec {
  Backend backend = Backend::cpu;
  void* stream = nullptr;  // cudaStream_t for Backend::cuda; ignored on the CPU
  int num_threads = 0;     // CPU threads; 0 = all hardware threads
  // Most bytes of device workspace one CUDA call may take; 0 = the operation's default. The
  // sparse attention forward runs the queries in passes sized to fit (default: passes of
  // 2^25 / (h_q * topk) queries, about 8.7 GB at h_q = 64, topk = 16, d = 128); a larger budget
  // means fewer passes and a faster long prompt, with bitwise the same results. A budget too small
  // for one query throws msa::Error. The KL loss and backward size their query passes the same way
  // (default: about 7 GB at 128K tokens of the M3 shape).
  size_t max_workspace_bytes = 0;
};

// Which query tokens exist, which key tokens they may see, and their absolute positions.
// Tokens are packed ("THD"): sequence b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) and
// key rows [cu_seqlens_k[b], cu_seqlens_k[b+1]). Positions are 0-based within the sequence.
// A query may be a chunk of a longer sequence whose keys are all present (chunked prefill,
// context parallelism, decode): its absolute position p indexes the keys of its sequence, and
// it sees exactly the keys at positions 0..p (causal). Blocks are aligned to positions.
// All pointers live in the memory of the backend that runs the call.
struct Varlen {
  int64_t n_q = 0;                        // packed query tokens
  int64_t n_k = 0;                        // packed key tokens
  int64_t batch = 1;                      // number of sequences B
  const int32_t* cu_seqlens_q = nullptr;  // [batch+1], 0 .. n_q, non-decreasing; nullptr: batch == 1, {0, n_q}
  const int32_t* cu_seqlens_k = nullptr;  // [batch+1], 0 .. n_k, non-decreasing; nullptr: same as cu_seqlens_q (needs n_k == n_q)
  const int32_t* q_pos = nullptr;         // [n_q] absolute position of each query in its sequence, 0 <= p < len_k;
                                          // nullptr: bottom-right aligned, p = len_k - len_q + (row - cu_seqlens_q[b])
};

// Library version string ("major.minor.patch").
const char* version();
// True when this build contains the CUDA backend (it may still find no GPU at run time).
bool cuda_compiled();
// Number of CUDA devices visible now (0 without the CUDA backend or without a GPU).
int cuda_device_count();

}  // namespace msa
