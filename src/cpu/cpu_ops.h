// The CPU reference backend (internal): one function per public operation. Parameters arrive
// validated, with zero strides and scales already resolved to their defaults, and n_q > 0
// (the backwards may get n_q == 0 with n_k > 0: they must then zero dk/dv or dk_idx).
#pragma once

#include "../validate.h"
#include "msa/msa.h"

namespace msa::cpu {

void index_topk(const IndexTopkParams& p, const detail::SeqInfo& s, int num_threads);
void block_topk(const BlockTopkParams& p, int num_threads);
SelectionRecall selection_recall(const SelectionRecallParams& p, const detail::SeqInfo& s, int num_threads);

// sparse = (p.topk_idx != nullptr)
void attention_forward(const AttentionParams& p, const detail::SeqInfo& s, int num_threads);
void attention_backward(const AttentionBwdParams& p, const detail::SeqInfo& s, int num_threads);

double index_kl_loss(const IndexKLParams& p, const detail::SeqInfo& s, int num_threads);
void index_kl_backward(const IndexKLParams& p, const detail::SeqInfo& s, int num_threads);

// Shared by the reference implementations: the selected top-k of one row of block scores M
// (length n_vis, the last entry is the local block), with the contract of index_topk, written
// ascending into out[0..topk) with -1 padding. force_last keeps the last entry.
void select_topk_row(const float* m, int64_t n_vis, int64_t topk, bool force_last, int32_t* out);

}  // namespace msa::cpu
