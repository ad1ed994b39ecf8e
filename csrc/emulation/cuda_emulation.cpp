// The scheduler behind cuda_emulation.h: the blocks of a grid in turn, the threads of a block
// as ucontext fibers on the calling thread. A fiber runs until it reaches a barrier or a warp
// collective (or returns); when no fiber can run, the waiting warps or the waiting block are
// released, after checking that they wait at the same call, or an EmulationError is raised.
#include "cuda_emulation.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define PEFTKERN_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PEFTKERN_EMU_ASAN 1
#endif
#endif
#if defined(PEFTKERN_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace peftkern::emu {
namespace {

#if defined(PEFTKERN_EMU_ASAN)
constexpr size_t kStackBytes = 256 << 10;  // instrumented frames carry redzones
#else
constexpr size_t kStackBytes = 128 << 10;
#endif

enum class State { ready, barrier, warp, done };

struct Fiber {
  ucontext_t context;
  void* stack = nullptr;  // kStackBytes, above one guard page
  State state = State::done;
  Site site{nullptr, 0};
  WarpOp op = WarpOp::sync;
  uint64_t value = 0;  // what this lane gives to a collective
  int source = 0;      // the lane whose value it takes
  uint64_t result = 0;
  std::exception_ptr error;
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping of this fiber's stack
};

struct Run {
  const std::function<void()>* body = nullptr;
  dim3 block;
  int threads = 0;
  std::vector<Fiber> fibers;
  int current = 0;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;  // the caller's stack, for AddressSanitizer
  size_t scheduler_stack_bytes = 0;
  std::vector<unsigned char> dynamic_shared;
  struct StaticShared {
    Site site;
    std::vector<unsigned char> bytes;
  };
  std::vector<StaticShared> static_shared;  // of the running block, by declaration
};

std::mutex launch_lock;  // one emulated launch at a time: the built-ins are globals
Run* active = nullptr;
bool reverse_warp_order = false;

std::string where(Site site) {
  std::ostringstream s;
  s << site.file << ":" << site.line;
  return s.str();
}

bool same_site(Site a, Site b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

std::string thread_name(const Run& run, int t) {
  std::ostringstream s;
  s << "thread (" << t % run.block.x << "," << (t / run.block.x) % run.block.y << ","
    << t / (run.block.x * run.block.y) << ") of block (" << blockIdx.x << "," << blockIdx.y << ","
    << blockIdx.z << ")";
  return s.str();
}

[[noreturn]] void fail(const std::string& message) {
  throw EmulationError("CUDA emulation: " + message);
}

void* allocate_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* base =
      mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) fail("cannot map a fiber stack");
  mprotect(base, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
  return static_cast<unsigned char*>(base) + page;
}

// Fiber stacks are kept for the next launch (the process's tests launch many kernels).
std::vector<void*>& stack_pool() {
  static std::vector<void*> pool;
  return pool;
}

void switch_to_fiber(Run& run, Fiber& fiber) {
  void* fake = nullptr;
#if defined(PEFTKERN_EMU_ASAN)
  __sanitizer_start_switch_fiber(&fake, fiber.stack, kStackBytes);
#endif
  swapcontext(&run.scheduler, &fiber.context);
#if defined(PEFTKERN_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  (void)fake;
}

void arrived_in_fiber(Run& run, Fiber& fiber) {
#if defined(PEFTKERN_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fiber.fake_stack, &run.scheduler_stack,
                                  &run.scheduler_stack_bytes);
#endif
  (void)run;
  (void)fiber;
}

// Called on a fiber: back to the scheduler until the fiber is released.
void yield_to_scheduler(Run& run, Fiber& fiber, bool exiting) {
#if defined(PEFTKERN_EMU_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fiber.fake_stack, run.scheduler_stack,
                                 run.scheduler_stack_bytes);
#endif
  (void)exiting;
  swapcontext(&fiber.context, &run.scheduler);
  arrived_in_fiber(run, fiber);
}

void fiber_main() {
  Run& run = *active;
  Fiber& fiber = run.fibers[run.current];
  arrived_in_fiber(run, fiber);
  try {
    (*run.body)();
  } catch (...) {
    fiber.error = std::current_exception();
  }
  fiber.state = State::done;
  yield_to_scheduler(run, fiber, /*exiting=*/true);
}

void set_thread_index(const Run& run, int t) {
  threadIdx.x = static_cast<unsigned>(t) % run.block.x;
  threadIdx.y = (static_cast<unsigned>(t) / run.block.x) % run.block.y;
  threadIdx.z = static_cast<unsigned>(t) / (run.block.x * run.block.y);
}

// Called when no lane of the warp starting at thread `first` can run: releases the warp if its
// lanes all wait at the same collective, fails if some do and the others wait elsewhere.
// Returns whether the warp was released.
bool release_warp(Run& run, int first) {
  const int end = std::min(first + 32, run.threads);
  int waiting = -1;
  for (int t = first; t < end && waiting < 0; ++t)
    if (run.fibers[t].state == State::warp) waiting = t;
  if (waiting < 0) return false;
  const Fiber& w = run.fibers[waiting];
  if (end - first < 32) {
    std::ostringstream s;
    s << "warp collective at " << where(w.site) << " in a block of " << run.threads
      << " threads: the last warp is partial (block sizes must be multiples of 32)";
    fail(s.str());
  }
  for (int t = first; t < end; ++t) {
    const Fiber& f = run.fibers[t];
    if (f.state == State::warp && same_site(f.site, w.site) && f.op == w.op) continue;
    std::string other = f.state == State::done ? "has exited"
                        : f.state == State::barrier
                            ? "waits at __syncthreads() at " + where(f.site)
                            : "waits at a warp collective at " + where(f.site);
    fail(thread_name(run, waiting) + " waits at a warp collective at " + where(w.site) +
         " while its warp's " + thread_name(run, t) + " " + other);
  }
  uint64_t ballot = 0;
  for (int t = first; t < end; ++t) ballot |= (run.fibers[t].value & 1u) << (t - first);
  for (int t = first; t < end; ++t) {
    Fiber& f = run.fibers[t];
    f.result = w.op == WarpOp::ballot ? ballot : run.fibers[first + f.source].value;
    f.state = State::ready;
  }
  return true;
}

// Runs the warp starting at thread `first` until each of its lanes waits at __syncthreads()
// or has exited: one warp at a time, as far as it goes, so that a read of shared memory that
// another warp writes without a barrier in between sees the value from before the write.
void run_warp(Run& run, int first) {
  const int end = std::min(first + 32, run.threads);
  do {
    for (int t = first; t < end; ++t) {
      Fiber& f = run.fibers[t];
      if (f.state != State::ready) continue;
      run.current = t;
      set_thread_index(run, t);
      switch_to_fiber(run, f);
      if (f.error) std::rethrow_exception(f.error);
    }
  } while (release_warp(run, first));
}

// Every thread left waits at __syncthreads() (or has exited): release them all if they wait
// at the same one and none has exited.
void release_barrier(Run& run) {
  int waiting = -1, exited = -1;
  for (int t = 0; t < run.threads; ++t) {
    const Fiber& f = run.fibers[t];
    if (f.state == State::barrier && waiting < 0) waiting = t;
    if (f.state == State::done && exited < 0) exited = t;
    if (f.state == State::barrier && !same_site(f.site, run.fibers[waiting].site))
      fail(thread_name(run, waiting) + " waits at __syncthreads() at " +
           where(run.fibers[waiting].site) + " while " + thread_name(run, t) + " waits at " +
           where(f.site));
  }
  if (exited >= 0)
    fail(thread_name(run, exited) + " has exited while " + thread_name(run, waiting) +
         " waits at __syncthreads() at " + where(run.fibers[waiting].site) +
         " (a barrier in divergent code)");
  for (Fiber& f : run.fibers) f.state = State::ready;
}

void run_block(Run& run) {
  // 0xFF bytes are a NaN in every floating type: a read before the block's own write shows.
  std::fill(run.dynamic_shared.begin(), run.dynamic_shared.end(), 0xFF);
  run.static_shared.clear();
  for (int t = 0; t < run.threads; ++t) {
    Fiber& f = run.fibers[t];
#if defined(PEFTKERN_EMU_ASAN)
    // Frames abandoned on this stack by the previous block (or an error) leave poisoned shadow.
    __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
#if defined(PEFTKERN_EMU_ASAN)
    // AddressSanitizer's swapcontext clears the shadow of the target's uc_stack on every
    // switch, which wipes the poisoning of live frames and costs a memset per switch; the
    // stack is only needed by makecontext, and its shadow was reset above.
    f.context.uc_stack.ss_sp = nullptr;
    f.context.uc_stack.ss_size = 0;
#endif
    f.state = State::ready;
    f.error = nullptr;
    f.fake_stack = nullptr;
  }
  for (;;) {
    const int warps = (run.threads + 31) / 32;
    for (int i = 0; i < warps; ++i) run_warp(run, 32 * (reverse_warp_order ? warps - 1 - i : i));
    bool all_done = true;
    for (const Fiber& f : run.fibers) all_done = all_done && f.state == State::done;
    if (all_done) return;
    release_barrier(run);
  }
}

Fiber& current_fiber() {
  if (active == nullptr) fail("a barrier or warp collective was called outside a kernel launch");
  return active->fibers[active->current];
}

}  // namespace

void sync_threads(Site site) {
  Fiber& f = current_fiber();
  f.state = State::barrier;
  f.site = site;
  yield_to_scheduler(*active, f, /*exiting=*/false);
}

uint64_t warp_collective(Site site, WarpOp op, unsigned mask, uint64_t value, int source) {
  Fiber& f = current_fiber();
  if (mask != 0xffffffffu) {
    std::ostringstream s;
    s << "warp collective at " << where(site) << " with mask 0x" << std::hex << mask
      << ": only full-warp masks (0xffffffff) are emulated";
    fail(s.str());
  }
  f.state = State::warp;
  f.site = site;
  f.op = op;
  f.value = value;
  f.source = source;
  yield_to_scheduler(*active, f, /*exiting=*/false);
  return f.result;
}

void check_width(Site site, int width) {
  if (width != 32)
    fail("shuffle at " + where(site) + " with width " + std::to_string(width) +
         ": only width 32 is emulated");
}

int lane_id() {
  return active->current % 32;
}

unsigned char* dynamic_shared_memory() {
  if (active == nullptr) fail("dynamic shared memory used outside a kernel launch");
  return active->dynamic_shared.empty() ? nullptr : active->dynamic_shared.data();
}

void set_reverse_warp_order(bool reverse) {
  const std::lock_guard<std::mutex> lock(launch_lock);
  reverse_warp_order = reverse;
}

unsigned char* static_shared_memory(Site site, size_t bytes) {
  if (active == nullptr) fail("shared memory declared outside a kernel launch");
  for (Run::StaticShared& s : active->static_shared)
    if (same_site(s.site, site)) return s.bytes.data();
  active->static_shared.push_back({site, std::vector<unsigned char>(bytes, 0xFF)});
  return active->static_shared.back().bytes.data();
}

void run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes,
              const std::function<void()>& body) {
  const std::lock_guard<std::mutex> lock(launch_lock);
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  if (threads < 1 || threads > 1024) fail("block of " + std::to_string(threads) + " threads");
  if (grid.y > 65535 || grid.z > 65535) fail("grid.y and grid.z must be at most 65535");
  Run run;
  run.body = &body;
  run.block = block;
  run.threads = static_cast<int>(threads);
  run.fibers.resize(run.threads);
  auto& pool = stack_pool();
  while (pool.size() < run.fibers.size()) pool.push_back(allocate_stack());
  for (int t = 0; t < run.threads; ++t) run.fibers[t].stack = pool[t];
  run.dynamic_shared.resize(dynamic_shared_bytes);
  gridDim = grid;
  blockDim = block;
  active = &run;
  struct Deactivate {
    ~Deactivate() { active = nullptr; }
  } deactivate;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        run_block(run);
      }
}

}  // namespace peftkern::emu
