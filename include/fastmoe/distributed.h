// Process groups for expert parallelism in C++. The fastmoe::nn modules and the exchange ops find their group by
// name, as torch does (ProcessGroup::getGroupName; in Python `group.group_name`). A group made in Python is
// registered already; a group made in C++ is registered with register_group.
#pragma once

#include <c10/util/intrusive_ptr.h>

#include <string>

namespace c10d {
class ProcessGroup;
}

namespace fastmoe::distributed {

// Makes `group` known under `name` in this process (c10d's group registry).
void register_group(const std::string& name, const c10::intrusive_ptr<c10d::ProcessGroup>& group);

// This process's rank in, and the size of, the group registered as `group_name` (an error names it if unknown).
int rank(const std::string& group_name);
int world_size(const std::string& group_name);

// True when CUDA tensors can be exchanged (the build found NCCL).
bool has_nccl();

}  // namespace fastmoe::distributed
