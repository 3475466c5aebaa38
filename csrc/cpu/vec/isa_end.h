// Closes the region opened by cpu/vec/isa_begin.h.
#ifdef FASTTX_ISA
#pragma GCC pop_options
#endif
