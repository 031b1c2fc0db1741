// The CPU executor of the bridge ops.
//
// A kernel's layout walk (csrc/common/<concern>.h) emits (source view, destination view) pairs of equal sizes into
// a CopyJob, which turns each into 2-D copy pairs (for_each_piece, csrc/common/strided.h) and hands the list to one
// parallel executor (run_pairs). The executor copies contiguous runs with memcpy (whole blocks when
// both sides are contiguous, else per row) and strided / transposed pairs with cache-blocked tiles, splitting the
// work into tasks of about kTaskBytes so that at::parallel_for balances large tensors; small jobs run inline.
// Everything dispatches on the element size, never on the dtype.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/strided.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BRIDGE_HAVE_STREAM_COPY 1
#endif

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace bridge {
namespace cpu {

// Target bytes per parallel task, and the size below which a job runs inline on the calling thread.
constexpr int64_t kTaskBytes = int64_t(1) << 20;
constexpr int64_t kInlineBytes = int64_t(1) << 18;

// A 2-D copy of rows x cols elements (csrc/common/strided.h), the unit of work of run_pairs.
using Pair = Piece;

namespace detail {

// How a job's contiguous runs are stored.
//  kMemcpy: std::memcpy, for small jobs (its stores leave the data in cache for whoever reads it next).
//  kStream: non-temporal stores, for large jobs into resident memory: they skip the read-for-ownership of every
//           destination line (a plain copy moves 3 bytes of memory traffic per byte; this moves 2).
//  kFresh:  plain vector stores, for large jobs into pages that were never touched (a fresh allocation, a parameter
//           megatron allocated without initialising it). The kernel zeroes such a page on its first write, which
//           leaves it in the cache: plain stores then hit the cache, while non-temporal stores push every line out
//           and are several times slower, and glibc's memcpy of these sizes (rep movsb, itself non-temporal above a
//           threshold) measured ~30 % slower than plain vector stores into fresh pages.
enum class Store { kMemcpy, kStream, kFresh };

// Jobs of at least kFreshJobBytes ask whether their destination is resident: if not, kFresh; if so, kStream from
// kStreamJobBytes on (smaller resident jobs measured faster with plain stores: they stay in the last-level cache).
constexpr int64_t kStreamJobBytes = int64_t(32) << 20;
constexpr int64_t kFreshJobBytes = int64_t(1) << 20;

#if defined(BRIDGE_HAVE_STREAM_COPY)
template <bool kNonTemporal>
__attribute__((target("avx2"))) inline void vector_copy_avx2(char* d, const char* s, size_t n) {
  size_t head = (32 - (reinterpret_cast<uintptr_t>(d) & 31)) & 31;
  if (head > n) head = n;
  std::memcpy(d, s, head);
  d += head;
  s += head;
  n -= head;
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 64));
    const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 96));
    if (kNonTemporal) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), a);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32), b);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 64), c);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 96), e);
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + i), a);
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + i + 32), b);
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + i + 64), c);
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + i + 96), e);
    }
  }
  std::memcpy(d + i, s + i, n - i);
}

inline bool vector_copy_supported() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}
#endif

// Copies n contiguous bytes in the given mode. Non-temporal runs of at least 512 bytes take the stream loop; fresh
// runs take the plain vector loop from 2 KiB on (below that glibc's memcpy moves them with plain vector stores and
// better heads and tails; above it, it switches to rep movsb, measured ~20 % slower into fresh pages even for rows
// of a few KiB); everything else is memcpy.
inline void copy_run(char* d, const char* s, size_t n, Store mode) {
#if defined(BRIDGE_HAVE_STREAM_COPY)
  if (mode == Store::kStream && n >= 512 && vector_copy_supported()) return vector_copy_avx2<true>(d, s, n);
  if (mode == Store::kFresh && n >= 2048 && vector_copy_supported()) return vector_copy_avx2<false>(d, s, n);
#endif
  std::memcpy(d, s, n);
}

// Orders a task's non-temporal stores before the job is seen as done.
inline void stream_fence(Store mode) {
#if defined(BRIDGE_HAVE_STREAM_COPY)
  if (mode == Store::kStream) _mm_sfence();
#endif
}

// Whether the destination pages of a job are already resident (see Store). Samples the middle element of the first,
// middle and last pair of the job (one mincore call each; not a pair's first element, whose page may hold the
// allocator's header of a block that is otherwise untouched); outside Linux every destination counts as resident.
inline bool destination_resident(const std::vector<Piece>& pairs, int64_t elem) {
#if defined(__linux__)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const size_t n = pairs.size();
  const size_t picks[3] = {0, n / 2, n - 1};
  for (size_t k : picks) {
    const Piece& p = pairs[k];
    const int64_t mid = ((p.rows / 2) * p.drs + (p.cols / 2) * p.dcs) * elem;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p.dst + mid) & ~(page - 1);
    unsigned char resident = 0;
    if (mincore(reinterpret_cast<void*>(a), page, &resident) != 0) return true;  // not a mapping we can ask about
    if (!(resident & 1)) return false;
  }
#else
  (void)pairs;
  (void)elem;
#endif
  return true;
}

// The store mode of a job of `total` bytes.
inline Store store_mode(const std::vector<Piece>& pairs, int64_t total, int64_t elem) {
  if (total < kFreshJobBytes) return Store::kMemcpy;
  const bool resident = destination_resident(pairs, elem);
  if (!resident) return Store::kFresh;
  return total >= kStreamJobBytes ? Store::kStream : Store::kMemcpy;
}

template <int64_t N>
struct Bytes {
  unsigned char b[N];
};

// Cache-blocked strided copy of a rows x cols block of N-byte elements. Each tile is first gathered into a small
// contiguous buffer following the source's unit-stride direction, then scattered following the destination's, so
// both sides are read and written in whole cache lines. (Reading a transposed tile directly thrashes L1: the
// column stride of a transposed weight is usually a multiple of 4 KiB, which maps every line to the same sets.)
template <int64_t N>
void tiled_copy(const char* s, int64_t srs, int64_t scs, char* d, int64_t drs, int64_t dcs, int64_t rows,
                int64_t cols) {
  constexpr int64_t B = N <= 2 ? 64 : (N <= 8 ? 32 : 16);
  if (rows == 1) {  // one strided run
    for (int64_t j = 0; j < cols; ++j) std::memcpy(d + j * dcs * N, s + j * scs * N, N);
    return;
  }
  alignas(64) unsigned char buf[B * B * N];
  const bool src_down = srs == 1 && scs != 1;  // source unit stride runs down the rows
  const bool dst_down = drs == 1 && dcs != 1;
  for (int64_t i0 = 0; i0 < rows; i0 += B) {
    const int64_t ni = std::min(B, rows - i0);
    for (int64_t j0 = 0; j0 < cols; j0 += B) {
      const int64_t nj = std::min(B, cols - j0);
      const char* st = s + (i0 * srs + j0 * scs) * N;
      char* dt = d + (i0 * drs + j0 * dcs) * N;
      if (src_down) {  // buf is [j][i]
        for (int64_t j = 0; j < nj; ++j)
          for (int64_t i = 0; i < ni; ++i) std::memcpy(buf + (j * B + i) * N, st + (i + j * scs) * N, N);
        if (dst_down) {
          for (int64_t j = 0; j < nj; ++j)
            for (int64_t i = 0; i < ni; ++i) std::memcpy(dt + (i + j * dcs) * N, buf + (j * B + i) * N, N);
        } else {
          for (int64_t i = 0; i < ni; ++i)
            for (int64_t j = 0; j < nj; ++j) std::memcpy(dt + (i * drs + j * dcs) * N, buf + (j * B + i) * N, N);
        }
      } else {  // buf is [i][j]
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t j = 0; j < nj; ++j) std::memcpy(buf + (i * B + j) * N, st + (i * srs + j * scs) * N, N);
        if (dst_down) {
          for (int64_t j = 0; j < nj; ++j)
            for (int64_t i = 0; i < ni; ++i) std::memcpy(dt + (i + j * dcs) * N, buf + (i * B + j) * N, N);
        } else {
          for (int64_t i = 0; i < ni; ++i)
            for (int64_t j = 0; j < nj; ++j) std::memcpy(dt + (i * drs + j * dcs) * N, buf + (i * B + j) * N, N);
        }
      }
    }
  }
}

inline void tiled_copy_any(int64_t elem, const char* s, int64_t srs, int64_t scs, char* d, int64_t drs, int64_t dcs,
                           int64_t rows, int64_t cols) {
  switch (elem) {
    case 1: return tiled_copy<1>(s, srs, scs, d, drs, dcs, rows, cols);
    case 2: return tiled_copy<2>(s, srs, scs, d, drs, dcs, rows, cols);
    case 4: return tiled_copy<4>(s, srs, scs, d, drs, dcs, rows, cols);
    case 8: return tiled_copy<8>(s, srs, scs, d, drs, dcs, rows, cols);
    case 16: return tiled_copy<16>(s, srs, scs, d, drs, dcs, rows, cols);
    default:
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j)
          std::memcpy(d + (i * drs + j * dcs) * elem, s + (i * srs + j * scs) * elem, static_cast<size_t>(elem));
  }
}

// One task: rows [r0, r0+nr) and cols [c0, c0+nc) of pair p.
struct Task {
  int64_t pair, r0, nr, c0, nc;
};

inline void run_task(const Pair& p, const Task& t, int64_t elem, Store mode) {
  const char* s = p.src + (t.r0 * p.srs + t.c0 * p.scs) * elem;
  char* d = p.dst + (t.r0 * p.drs + t.c0 * p.dcs) * elem;
  if (p.scs == 1 && p.dcs == 1) {
    const size_t bytes = static_cast<size_t>(t.nc * elem);
    if (t.nr > 1 && p.srs == t.nc && p.drs == t.nc) return copy_run(d, s, bytes * t.nr, mode);  // one block
    for (int64_t i = 0; i < t.nr; ++i) copy_run(d + i * p.drs * elem, s + i * p.srs * elem, bytes, mode);
  } else {
    tiled_copy_any(elem, s, p.srs, p.scs, d, p.drs, p.dcs, t.nr, t.nc);
  }
}

}  // namespace detail

// Copies every pair (elements of `elem` bytes), in parallel when the job is large.
inline void run_pairs(std::vector<Pair>& pairs, int64_t elem) {
  using detail::Task;
  std::vector<Task> tasks;
  int64_t total = 0;
  for (size_t k = 0; k < pairs.size(); ++k) {
    Pair& p = pairs[k];
    if (p.rows == 0 || p.cols == 0) continue;
    // Column-major on both sides: swap so the unit-stride direction is the columns.
    if ((p.scs != 1 || p.dcs != 1) && p.rows > 1 && p.srs == 1 && p.drs == 1) {
      std::swap(p.rows, p.cols);
      std::swap(p.srs, p.scs);
      std::swap(p.drs, p.dcs);
    }
    const int64_t row_bytes = p.cols * elem;
    const int64_t bytes = p.rows * row_bytes;
    total += bytes;
    const bool contiguous_rows = p.scs == 1 && p.dcs == 1;
    const int64_t k64 = static_cast<int64_t>(k);
    if (bytes <= kTaskBytes) {
      tasks.push_back(Task{k64, 0, p.rows, 0, p.cols});
    } else if (contiguous_rows) {
      if (row_bytes >= kTaskBytes) {  // long rows: split each row
        const int64_t cstep = kTaskBytes / elem;
        for (int64_t r = 0; r < p.rows; ++r)
          for (int64_t c = 0; c < p.cols; c += cstep)
            tasks.push_back(Task{k64, r, 1, c, std::min(cstep, p.cols - c)});
      } else {
        const int64_t rstep = kTaskBytes / row_bytes;
        for (int64_t r = 0; r < p.rows; r += rstep) tasks.push_back(Task{k64, r, std::min(rstep, p.rows - r), 0, p.cols});
      }
    } else {
      // Strided / transposed: square-ish blocks, so that each task touches a bounded number of pages on both
      // sides (a task spanning a whole transposed row walks thousands of pages and misses the TLB on every tile).
      const int64_t side = elem <= 2 ? 512 : (elem <= 8 ? 256 : 128);
      const int64_t elems = kTaskBytes / elem;
      int64_t rstep = std::min(p.rows, side), cstep = std::min(p.cols, side);
      if (p.cols <= side) rstep = std::max<int64_t>(side, elems / p.cols / 64 * 64);
      if (p.rows <= side) cstep = std::max<int64_t>(side, elems / p.rows / 64 * 64);
      for (int64_t r = 0; r < p.rows; r += rstep)
        for (int64_t c = 0; c < p.cols; c += cstep)
          tasks.push_back(Task{k64, r, std::min(rstep, p.rows - r), c, std::min(cstep, p.cols - c)});
    }
  }
  if (tasks.empty()) return;
  const detail::Store mode = detail::store_mode(pairs, total, elem);
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) detail::run_task(pairs[tasks[i].pair], tasks[i], elem, mode);
    detail::stream_fence(mode);
  };
  const int64_t n = static_cast<int64_t>(tasks.size());
  if (total <= kInlineBytes || n == 1) {
    body(0, n);
  } else {
    at::parallel_for(0, n, 1, body);
  }
}

// Collects the copies of one op call and runs them as one parallel job. It is the Emit of the layout walks of
// csrc/common (called as emit(src, dst)); `op` names the op in its errors.
class CopyJob {
 public:
  CopyJob(const char* op, int64_t elem) : op_(op), elem_(elem) {}

  // dst <- src, views of equal sizes.
  void add(const View& src, const View& dst) {
    for_each_piece(op_, src, dst, [this](const Piece& p) { pairs_.push_back(p); });
  }
  void operator()(const View& src, const View& dst) { add(src, dst); }

  void reserve(size_t n) { pairs_.reserve(n); }
  void run() { run_pairs(pairs_, elem_); }

 private:
  const char* op_;
  int64_t elem_;
  std::vector<Pair> pairs_;
};

}  // namespace cpu
}  // namespace bridge
