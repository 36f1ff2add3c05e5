// Which CUDA architectures a build holds, from its DJEPA_CUDA_ARCHS list (CMake's, "80,90a";
// entries may carry -real / -virtual). Plain C++ (no CUDA, no pybind11): tests compile it with g++.
#pragma once

#include <cstring>
#include <string>

namespace djepa {

// Whether the comma- or semicolon-separated `archs` names `arch` exactly ("90a" is not "90":
// a plain sm_90 pass compiles the sm_90a kernels as empty bodies). "90a-real" and
// "90a-virtual" count as "90a".
inline bool build_has_arch(const char* archs, const char* arch) {
  const std::string list = archs ? archs : "";
  size_t pos = 0;
  while (pos <= list.size()) {
    size_t end = list.find_first_of(",;", pos);
    if (end == std::string::npos) end = list.size();
    std::string entry = list.substr(pos, end - pos);
    const size_t first = entry.find_first_not_of(" \t");
    const size_t last = entry.find_last_not_of(" \t");
    entry = first == std::string::npos ? "" : entry.substr(first, last - first + 1);
    for (const char* suffix : {"-real", "-virtual"}) {
      const size_t n = std::strlen(suffix);
      if (entry.size() > n && entry.compare(entry.size() - n, n, suffix) == 0) entry.resize(entry.size() - n);
    }
    if (entry == arch) return true;
    pos = end + 1;
  }
  return false;
}

}  // namespace djepa
