// Everything a libtorch user needs: the ops, the token path, debug mode and the fastmoe::nn modules.
#pragma once

#include "fastmoe/debug.h"
#include "fastmoe/nn/gates.h"
#include "fastmoe/nn/moe.h"
#include "fastmoe/ops.h"
#include "fastmoe/token_dispatch.h"
