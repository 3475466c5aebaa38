// softmax_vec.h compiled for AVX-512 (see cpu/vec/isa_begin.h).
#include <ATen/ATen.h>

#include "cpu/softmax_kernels.h"

#define FASTTX_ISA_AVX512 1
#include "cpu/vec/isa_begin.h"
#include "cpu/softmax_vec.h"
#include "cpu/vec/isa_end.h"
