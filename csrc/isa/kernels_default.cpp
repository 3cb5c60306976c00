// Both CPU kernel tables (the memory ops' and the sum tree's) for the
// baseline instruction set (whatever the compiler targets by default): the
// fallback on any processor.
#include "common/isa_prelude.h"
#include "cpu/kernel_table.h"
#include "replay/tree_kernel_table.h"

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/memory_kernels.h"
#include "replay/tree_kernels.h"

NEURALMEM_ISA_TABLES(DEFAULT, "default")
