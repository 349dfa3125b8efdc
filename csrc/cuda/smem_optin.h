// The dynamic shared-memory opt-in of a kernel (cudaFuncSetAttribute with
// cudaFuncAttributeMaxDynamicSharedMemorySize), done once per kernel
// instantiation and device, safely from any host thread. Plain CUDA runtime:
// included by the launchers, no torch headers.
//
// Why not on every launch, as the launchers used to: the attribute belongs to
// the kernel on a device, not to the launch. The same kernel runs with and
// without an attn_mask tile (two sizes), so a thread that set the smaller
// size between another thread's opt-in to the larger one and its launch made
// that launch fail ("too many resources requested"). Here the limit only ever
// grows: once a thread has seen it at or above its size, no other thread can
// lower it before its launch.
#pragma once

#include <atomic>
#include <mutex>

#include <cuda_runtime.h>

namespace pyfastattn {
namespace cuda {

// Devices tracked per kernel. A device index past this (not seen in
// practice) takes the lock on every call and sets the device's whole opt-in
// maximum, a value no other thread lowers.
constexpr int kSmemOptInDevices = 64;

// State of one kernel instantiation; `Tag` is a type unique to it (its traits
// or tile type).
template <typename Tag>
struct SmemOptInState {
  static std::atomic<int>& granted(int device) {
    static std::atomic<int> bytes[kSmemOptInDevices] = {};
    return bytes[device];
  }
  static std::mutex& lock() {
    static std::mutex m;
    return m;
  }
};

// Makes at least `bytes` of dynamic shared memory available to `kernel` on
// the current device. Above 48 KB a kernel must opt in; the first call per
// (kernel, device) that needs more than has been granted sets the attribute,
// under a lock; the others cost an atomic load.
template <typename Tag, typename Kernel>
cudaError_t ensure_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  using State = SmemOptInState<Tag>;
  const bool tracked = device >= 0 && device < kSmemOptInDevices;
  if (tracked && State::granted(device).load(std::memory_order_acquire) >= bytes) return cudaSuccess;
  std::lock_guard<std::mutex> guard(State::lock());
  if (tracked && State::granted(device).load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
  int value = bytes;
  if (!tracked) {
    err = cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    if (value < bytes) value = bytes;  // let the attribute call report the failure
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, value);
  if (err == cudaSuccess && tracked) State::granted(device).store(value, std::memory_order_release);
  return err;
}

}  // namespace cuda
}  // namespace pyfastattn
