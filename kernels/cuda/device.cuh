// CUDA device discovery. Plain C++ declarations: callers never include CUDA headers.
#pragma once
#include <string>

namespace atmoe::cuda {

// Number of usable devices; 0 (never an error) when the driver or a GPU is missing.
// `why` receives cudaGetDeviceCount's error string in that case.
int device_count(std::string* why = nullptr);
std::string device_name(int dev);

}  // namespace atmoe::cuda
