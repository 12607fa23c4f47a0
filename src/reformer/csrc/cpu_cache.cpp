// A size-class caching CPU allocator (reformer.cpu_cache): freed blocks of at least kMin bytes
// stay mapped and are handed out again for the next request of the same size class, so that
// a training step's repeated shapes (every layer, every step) fault in no fresh pages. The
// free blocks it keeps are bounded by a limit in bytes; a block that would pass the limit goes
// back to the system. Smaller blocks are allocated and freed at once (c10::alloc_cpu, as
// PyTorch's own allocator does). A plain C interface (ctypes), no Python headers: it builds in
// seconds.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <pthread.h>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kMin = size_t(1) << 20;  // smaller blocks are not kept
constexpr size_t kHeader = 64;            // the block's size, kept in front of its data

size_t size_class(size_t n) {
  if (n < kMin) return n;
  // eight classes per power of two (<= 12.5% rounding), multiples of 64 KiB
  size_t top = size_t(1) << (63 - __builtin_clzll(n));
  size_t step = std::max<size_t>(top >> 3, size_t(1) << 16);
  return (n + step - 1) / step * step;
}

struct Caching;
Caching* the_cache = nullptr;
void release(void* data);

// Every block carries its size class in a header, so a data pointer is its own context (a
// "simple" DataPtr: raw_allocate and raw_deleter work as with PyTorch's own allocator).
struct Caching final : c10::Allocator {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<char*>> free_blocks;
  size_t cached = 0, in_use = 0, limit = 0, hits = 0, misses = 0;

  c10::DataPtr allocate(size_t n) override {
    size_t bytes = size_class(n);
    char* base = nullptr;
    if (bytes >= kMin) {
      std::lock_guard<std::mutex> g(mu);
      auto it = free_blocks.find(bytes);
      if (it != free_blocks.end() && !it->second.empty()) {
        base = it->second.back();
        it->second.pop_back();
        cached -= bytes;
        ++hits;
      } else {
        ++misses;
      }
      in_use += bytes;
    }
    if (base == nullptr) {
      base = static_cast<char*>(c10::alloc_cpu(bytes + kHeader));
      *reinterpret_cast<size_t*>(base) = bytes;
    }
    void* data = base + kHeader;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void give_back(char* base) {
    size_t bytes = *reinterpret_cast<size_t*>(base);
    bool keep = false;
    if (bytes >= kMin) {
      std::lock_guard<std::mutex> g(mu);
      in_use -= bytes;
      keep = cached + bytes <= limit;
      if (keep) {
        free_blocks[bytes].push_back(base);
        cached += bytes;
      }
    }
    if (!keep) c10::free_cpu(base);
  }

  size_t empty() {
    std::vector<char*> drop;
    size_t freed;
    {
      std::lock_guard<std::mutex> g(mu);
      for (auto& kv : free_blocks) drop.insert(drop.end(), kv.second.begin(), kv.second.end());
      free_blocks.clear();
      freed = cached;
      cached = 0;
    }
    for (char* p : drop) c10::free_cpu(p);
    return freed;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

void release(void* data) { the_cache->give_back(static_cast<char*>(data) - kHeader); }

}  // namespace

extern "C" {

int reformer_cache_install(int64_t limit) {
  if (the_cache != nullptr) {
    std::lock_guard<std::mutex> g(the_cache->mu);
    the_cache->limit = static_cast<size_t>(limit);
    return 2;
  }
  the_cache = new Caching();  // never freed: tensors it made may outlive any owner
  the_cache->limit = static_cast<size_t>(limit);
  // A fork (DataLoader workers) while another thread holds the lock would leave the child's
  // copy locked for ever: the forking thread takes it first and both sides release it.
  pthread_atfork([] { the_cache->mu.lock(); }, [] { the_cache->mu.unlock(); },
                 [] { the_cache->mu.unlock(); });
  c10::SetCPUAllocator(the_cache, /*priority=*/100);
  return c10::GetCPUAllocator() == the_cache ? 1 : 0;
}

void reformer_cache_stats(int64_t* out) {  // cached, in use, limit, hits, misses
  if (the_cache == nullptr) {
    for (int i = 0; i < 5; ++i) out[i] = 0;
    return;
  }
  std::lock_guard<std::mutex> g(the_cache->mu);
  out[0] = int64_t(the_cache->cached);
  out[1] = int64_t(the_cache->in_use);
  out[2] = int64_t(the_cache->limit);
  out[3] = int64_t(the_cache->hits);
  out[4] = int64_t(the_cache->misses);
}

int64_t reformer_cache_empty() { return the_cache == nullptr ? 0 : int64_t(the_cache->empty()); }

}  // extern "C"
