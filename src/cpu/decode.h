// CPU reference of the decode calls (internal): append into the paged cache, decode index top-k
// and sparse decode attention. Parameters arrive validated with strides and scales resolved.
#pragma once

#include <cstdint>
#include <vector>

#include "../validate.h"
#include "msa/decode.h"

namespace msa::cpu {

// cu_new [batch+1] and seq_lens [batch] as validated host copies.
void append_kv(const AppendKvParams& p, const std::vector<int32_t>& cu_new, const std::vector<int32_t>& seq_lens,
               int num_threads);

// s holds the query side only (n_q, batch, cu_q, seq_of_q, pos); the keys of request b are the
// seq_lens[b] cached tokens. n_q > 0.
void decode_index_topk(const DecodeIndexParams& p, const detail::SeqInfo& s, const std::vector<int32_t>& seq_lens,
                       int num_threads);
void decode_attention(const DecodeAttentionParams& p, const detail::SeqInfo& s, const std::vector<int32_t>& seq_lens,
                      int num_threads);

}  // namespace msa::cpu
