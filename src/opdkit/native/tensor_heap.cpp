// torch's CPU allocator for a training process's tensors: best fit over one address range of their own.
//
// glibc's heap holds a step's tensors among the interpreter's and the libraries' own small blocks, some of which
// outlive the step: they split the memory the step frees, and the next step's large blocks go above them. On the
// SmolLM2 pair that heap peaked 0.15-0.2 GB higher than this one, by a different amount in each identical run
// (docs/performance.md). Here tensors alone share a range reserved once (pages are only touched, and counted, when
// used): each block goes in the smallest free gap that holds it, a freed block merges with free neighbours, and the
// range's top comes down when the block below it is freed. Pages once touched stay (glibc's heap does the same under
// allocator.keep_freed_memory): the next step reuses them without faulting them in again. A block the range cannot
// hold comes from glibc as before.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t kAlignment = 64;  // c10's alignment for CPU tensors

struct Range {
  char* base = nullptr;
  size_t capacity = 0;
  size_t top = 0;   // blocks and gaps lie below top, untouched memory above
  size_t peak = 0;  // the highest top: what the range has touched
  std::map<size_t, size_t> gaps;                // offset -> size
  std::multimap<size_t, size_t> gaps_by_size;   // size -> offset
  std::unordered_map<size_t, size_t> blocks;    // offset -> size, blocks in use
  std::mutex lock;

  void forget_gap(std::map<size_t, size_t>::iterator gap) {
    auto [first, last] = gaps_by_size.equal_range(gap->second);
    for (auto it = first; it != last; ++it)
      if (it->second == gap->first) { gaps_by_size.erase(it); break; }
    gaps.erase(gap);
  }

  void add_gap(size_t offset, size_t size) {
    gaps.emplace(offset, size);
    gaps_by_size.emplace(size, offset);
  }

  // the block's offset, or SIZE_MAX where the range cannot hold it
  size_t take(size_t size) {
    auto fit = gaps_by_size.lower_bound(size);
    if (fit != gaps_by_size.end()) {
      size_t offset = fit->second, gap = fit->first;
      gaps_by_size.erase(fit);
      gaps.erase(offset);
      if (gap > size) add_gap(offset + size, gap - size);
      blocks.emplace(offset, size);
      return offset;
    }
    if (top + size > capacity) return SIZE_MAX;
    size_t offset = top;
    top += size;
    if (top > peak) peak = top;
    blocks.emplace(offset, size);
    return offset;
  }

  void give(size_t offset) {
    auto block = blocks.find(offset);
    size_t size = block->second;
    blocks.erase(block);
    auto after = gaps.lower_bound(offset);
    if (after != gaps.end() && after->first == offset + size) {
      size += after->second;
      auto next = std::next(after);
      forget_gap(after);
      after = next;
    }
    if (after != gaps.begin()) {
      auto before = std::prev(after);
      if (before->first + before->second == offset) {
        offset = before->first;
        size += before->second;
        forget_gap(before);
      }
    }
    if (offset + size == top) top = offset;
    else add_gap(offset, size);
  }
};

Range range;

void release(void* pointer) {
  char* p = static_cast<char*>(pointer);
  if (p == nullptr) return;
  c10::profiledCPUMemoryReporter().Delete(p);
  if (p >= range.base && p < range.base + range.capacity) {
    std::lock_guard<std::mutex> guard(range.lock);
    range.give(static_cast<size_t>(p - range.base));
  } else {
    c10::free_cpu(p);
  }
}

struct TensorHeap final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    size_t size = (nbytes + kAlignment - 1) / kAlignment * kAlignment;
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> guard(range.lock);
      size_t offset = range.take(size);
      if (offset != SIZE_MAX) data = range.base + offset;
    }
    if (data == nullptr) data = c10::alloc_cpu(nbytes);
    c10::profiledCPUMemoryReporter().New(data, nbytes);
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

TensorHeap heap;

}  // namespace

extern "C" {

// Make the range torch's CPU allocator, reserving `capacity` bytes of address space the first time; 0 if the
// reservation is refused.
int tensor_heap_install(uint64_t capacity) {
  if (range.base == nullptr) {
    void* base = mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return 0;
    range.base = static_cast<char*>(base);
    range.capacity = capacity;
  }
  c10::SetCPUAllocator(&heap, /*priority=*/1);
  return 1;
}

// torch's own CPU allocator again for new tensors; the range's tensors still return to it when freed
void tensor_heap_uninstall() { c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), /*priority=*/1); }

// what the range holds now, in bytes: in blocks, in gaps below the top, and the highest top it reached
void tensor_heap_usage(uint64_t* in_blocks, uint64_t* in_gaps, uint64_t* peak) {
  std::lock_guard<std::mutex> guard(range.lock);
  uint64_t used = 0, free = 0;
  for (auto& block : range.blocks) used += block.second;
  for (auto& gap : range.gaps) free += gap.second;
  *in_blocks = used;
  *in_gaps = free;
  *peak = range.peak;
}

}  // extern "C"
