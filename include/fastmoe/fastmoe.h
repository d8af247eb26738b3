// Everything a libtorch user needs: the ops and the fastmoe::nn modules.
#pragma once

#include "fastmoe/nn/gates.h"
#include "fastmoe/nn/moe.h"
#include "fastmoe/ops.h"
