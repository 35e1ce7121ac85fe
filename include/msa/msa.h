// msa/msa.h — the whole public API of the msa library (MiniMax Sparse Attention).
#pragma once

#include "msa/attention.h"
#include "msa/common.h"
#include "msa/decode.h"
#include "msa/index.h"
#include "msa/kl.h"
