// linear_cross_entropy_vec.h compiled for AVX2 (see cpu/vec/isa_begin.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#define FASTTX_ISA_AVX2 1
#include "cpu/vec/isa_begin.h"
#include "cpu/linear_cross_entropy_vec.h"
#include "cpu/vec/isa_end.h"
