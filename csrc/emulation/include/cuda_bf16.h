// Stands in for the CUDA toolkit header of this name in the host-compiled build of csrc/cuda (see ../cuda_emulation.h).
#pragma once

#include "../cuda_emulation.h"
