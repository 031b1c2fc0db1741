// Parameter names: the (layer, expert) sort key, local -> global renaming, and the ordered name list gathered over a
// c10d process group (section 5 of conversion_semantics.md). Parsing is hand-written: these run on ~10^5 names.
//
// These kernels mirror the Python home of Megatron's naming rules, megatron_bridge_ext/naming.py (keep both in step;
// test_names.py checks that they agree):
//   sort_key / param_sort_key_cpu (and the order of gather_param_names_cpu)  <->  naming.sort_key
//   local_to_global_name_cpu                                                 <->  naming.local_to_global
// The other naming rules (decoder / MTP layer indices, routed experts, vocabulary tensors, TE fused-norm spellings,
// wrapper prefixes) live in naming.py only.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace bridge {
namespace {

inline bool is_digit(char c) { return c >= '0' && c <= '9'; }

// A run of ASCII digits at s[begin, end).
struct Digits {
  size_t begin = std::string_view::npos;
  size_t end = std::string_view::npos;
  bool found() const { return begin != std::string_view::npos; }
};

// End of the run of ASCII digits starting at `pos` (== pos when there is none).
inline size_t digits_end(std::string_view s, size_t pos) {
  while (pos < s.size() && is_digit(s[pos])) ++pos;
  return pos;
}

// Leftmost `token(\d+)` (greedy digits); with `dot_after`, `token(\d+)\.`.
Digits find_number_after(std::string_view s, std::string_view token, bool dot_after = false) {
  for (size_t at = s.find(token); at != std::string_view::npos; at = s.find(token, at + 1)) {
    const size_t begin = at + token.size();
    const size_t end = digits_end(s, begin);
    if (end > begin && (!dot_after || (end < s.size() && s[end] == '.'))) return {begin, end};
  }
  return {};
}

// Decimal value of s[d.begin, d.end); names carry small indices, so more than 18 digits is an error.
int64_t parse_index(std::string_view s, Digits d, const char* op) {
  TORCH_CHECK(d.end - d.begin <= 18, op, ": index '", s.substr(d.begin, d.end - d.begin),
              "' is too large in parameter name '", s, "'");
  int64_t v = 0;
  for (size_t i = d.begin; i < d.end; ++i) v = v * 10 + (s[i] - '0');
  return v;
}

// layer = first `layers\.(\d+)`; expert = first `(?:bias|weight)(\d+)`, else first `local_experts\.(\d+)`;
// -1 where absent.
std::pair<int64_t, int64_t> sort_key(std::string_view name) {
  static constexpr const char* op = "param_sort_key";
  const Digits layer = find_number_after(name, "layers.");
  // Leftmost of the two alternatives (they cannot start at the same position).
  Digits expert = find_number_after(name, "bias");
  const Digits w = find_number_after(name, "weight");
  if (w.found() && (!expert.found() || w.begin - 6 < expert.begin - 4)) expert = w;
  if (!expert.found()) expert = find_number_after(name, "local_experts.");
  return {layer.found() ? parse_index(name, layer, op) : -1, expert.found() ? parse_index(name, expert, op) : -1};
}

}  // namespace

std::tuple<int64_t, int64_t> param_sort_key_cpu(c10::string_view name) {
  const auto key = sort_key(std::string_view(name.data(), name.size()));
  return {key.first, key.second};
}

std::string local_to_global_name_cpu(c10::string_view name_in, int64_t layer_offset, int64_t expert_offset) {
  static constexpr const char* op = "local_to_global_name";
  const std::string_view name(name_in.data(), name_in.size());
  // Each edit replaces the digits d by str(value(d) + offset); edits never overlap (layer digits are followed by '.',
  // grouped expert digits end the name, sequential expert digits follow "local_experts.").
  struct Edit {
    Digits d;
    int64_t offset;
    const char* what;
  };
  std::vector<Edit> edits;
  if (layer_offset != 0) {
    const Digits layer = find_number_after(name, "layers.", /*dot_after=*/true);
    if (layer.found()) edits.push_back({layer, layer_offset, "layer"});
  }
  // Like the reference, adapter parameters keep their local expert numbering.
  if (expert_offset != 0 && name.find(".adapter.") == std::string_view::npos) {
    if (name.find(".mlp.experts.linear_fc") != std::string_view::npos) {
      // Grouped experts: the last component is `weight{e}` or `bias{e}`.
      const size_t dot = name.rfind('.');
      const std::string_view last = name.substr(dot + 1);
      for (std::string_view kind : {std::string_view("weight"), std::string_view("bias")}) {
        if (last.size() > kind.size() && last.substr(0, kind.size()) == kind &&
            digits_end(last, kind.size()) == last.size()) {
          edits.push_back({{dot + 1 + kind.size(), name.size()}, expert_offset, "expert"});
          break;
        }
      }
    }
    const Digits seq = find_number_after(name, ".mlp.experts.local_experts.", /*dot_after=*/true);
    if (seq.found()) edits.push_back({seq, expert_offset, "expert"});
  }
  if (edits.empty()) return std::string(name);
  std::sort(edits.begin(), edits.end(), [](const Edit& a, const Edit& b) { return a.d.begin < b.d.begin; });
  std::string out;
  out.reserve(name.size() + 8);
  size_t pos = 0;
  for (const Edit& e : edits) {
    const int64_t local = parse_index(name, e.d, op);
    const int64_t global = local + e.offset;
    TORCH_CHECK(global >= 0, op, ": ", e.what, " index ", local, " + offset ", e.offset, " is negative for '", name,
                "'");
    out.append(name.substr(pos, e.d.begin - pos));
    out.append(std::to_string(global));
    pos = e.d.end;
  }
  out.append(name.substr(pos));
  return out;
}

namespace {

// One rank's names as bytes: for each name a uint32 length (host byte order) then its UTF-8 bytes.
int64_t serialised_size(const c10::List<std::string>& names) {
  int64_t total = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& n = names.get(i);
    TORCH_CHECK(n.size() <= UINT32_MAX, "gather_param_names: names[", i, "] is ", n.size(),
                " bytes long, more than the limit of ", UINT32_MAX, " bytes (it starts '", n.substr(0, 80), "')");
    total += static_cast<int64_t>(sizeof(uint32_t) + n.size());
  }
  return total;
}

void serialise_into(const c10::List<std::string>& names, char* p) {
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& n = names.get(i);
    const auto len = static_cast<uint32_t>(n.size());
    std::memcpy(p, &len, sizeof(len));
    std::memcpy(p + sizeof(len), n.data(), n.size());
    p += sizeof(len) + n.size();
  }
}

// Appends the names held in buf[0, size) to `out` (views into buf).
void parse_names(const char* buf, int64_t size, int rank, std::vector<std::string_view>& out) {
  int64_t pos = 0;
  while (pos < size) {
    uint32_t len = 0;
    TORCH_CHECK(pos + static_cast<int64_t>(sizeof(len)) <= size, "gather_param_names: corrupt buffer from rank ", rank,
                " (truncated length at byte ", pos, " of ", size, ")");
    std::memcpy(&len, buf + pos, sizeof(len));
    pos += sizeof(len);
    TORCH_CHECK(pos + static_cast<int64_t>(len) <= size, "gather_param_names: corrupt buffer from rank ", rank,
                " (name of ", len, " bytes at byte ", pos, " of ", size, ")");
    out.emplace_back(buf + pos, len);
    pos += len;
  }
}

// All-gathers every rank's serialised names over `pg` (two collectives: sizes, then padded buffers) and appends views
// of them to `all`; returns the CPU [world, max_size] byte tensor the views point into.
at::Tensor all_gather_names(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const std::string& group_name,
                            const at::Device& device, const c10::List<std::string>& names,
                            std::vector<std::string_view>& all) {
  const int world = pg->getSize();
  at::Tensor gathered;
  try {
    const int64_t local_size = serialised_size(names);
    // 1) every rank's byte count (one int64 each).
    at::Tensor my_size = at::full({1}, local_size, at::kLong).to(device);
    at::Tensor all_sizes = at::empty({world}, my_size.options());
    {
      std::vector<at::Tensor> in{my_size};
      std::vector<std::vector<at::Tensor>> out(1);
      for (int r = 0; r < world; ++r) out[0].push_back(all_sizes.narrow(0, r, 1));
      pg->allgather(out, in)->wait();
    }
    all_sizes = all_sizes.to(at::kCPU);
    const int64_t* sizes = all_sizes.data_ptr<int64_t>();
    // 2) the buffers, padded to the largest (at least one byte: no zero-size collective).
    const int64_t max_size = std::max<int64_t>(1, *std::max_element(sizes, sizes + world));
    at::Tensor padded = at::empty({max_size}, at::kByte);
    serialise_into(names, reinterpret_cast<char*>(padded.data_ptr<uint8_t>()));
    padded = padded.to(device);
    gathered = at::empty({world, max_size}, padded.options());
    {
      std::vector<at::Tensor> in{padded};
      std::vector<std::vector<at::Tensor>> out(1);
      for (int r = 0; r < world; ++r) out[0].push_back(gathered[r]);
      pg->allgather(out, in)->wait();
    }
    gathered = gathered.to(at::kCPU);
    all.reserve(names.size() * static_cast<size_t>(world));
    const auto* base = reinterpret_cast<const char*>(gathered.data_ptr<uint8_t>());
    for (int r = 0; r < world; ++r) {
      TORCH_CHECK(sizes[r] >= 0 && sizes[r] <= max_size, "gather_param_names: rank ", r, " of group '", group_name,
                  "' reported ", sizes[r], " bytes (this is rank ", pg->getRank(), ")");
      parse_names(base + r * max_size, sizes[r], r, all);
    }
  } catch (const std::exception& e) {
    // Staging or collective failures (no backend for the device, a timeout, ...) name the group and its backend.
    TORCH_CHECK(false, "gather_param_names: all-gather over process group '", group_name, "' (backend ",
                pg->getBackendName(), ", staging device ", device, ") failed: ", e.what());
  }
  return gathered;
}

}  // namespace

// c10::List (not std::vector) in and out: the strings are not copied again at the boxed call boundary.
c10::List<std::string> gather_param_names_cpu(const c10::List<std::string>& names, c10::string_view group_name_in,
                                                std::optional<at::Device> device_in) {
  const std::string group_name(group_name_in.data(), group_name_in.size());
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(group_name);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "gather_param_names: no process group is registered under the name '", group_name,
                "' (pass ProcessGroup.group_name of a group this rank belongs to): ", e.what());
  }
  const at::Device device = device_in.value_or(at::Device(at::kCPU));
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), "gather_param_names: staging device must be CPU (gloo) or CUDA ",
              "(nccl), got ", device, " for process group '", group_name, "'");
  const int world = pg->getSize();

  std::vector<std::string_view> all;
  at::Tensor gathered;  // CPU [world, max_size] bytes that `all` points into
  if (world == 1) {
    all.reserve(names.size());
    for (size_t i = 0; i < names.size(); ++i) all.emplace_back(names.get(i));
  } else {
    gathered = all_gather_names(pg, group_name, device, names, all);
  }

  // Sort by ((layer, expert), name), then drop duplicates. Keys are computed once per name.
  struct Keyed {
    int64_t layer, expert;
    std::string_view name;
  };
  std::vector<Keyed> keyed;
  keyed.reserve(all.size());
  for (std::string_view n : all) {
    const auto k = sort_key(n);
    keyed.push_back({k.first, k.second, n});
  }
  // std::string_view compares bytes as unsigned char: UTF-8 byte order equals Python's code point order.
  std::sort(keyed.begin(), keyed.end(), [](const Keyed& a, const Keyed& b) {
    return std::tie(a.layer, a.expert, a.name) < std::tie(b.layer, b.expert, b.name);
  });
  c10::List<std::string> result;
  result.reserve(keyed.size());
  for (size_t i = 0; i < keyed.size(); ++i) {
    if (i > 0 && keyed[i].name == keyed[i - 1].name) continue;  // equal names have equal keys: adjacent
    result.push_back(std::string(keyed[i].name));
  }
  return result;
}

}  // namespace bridge

// These ops take no tensor, so the dispatcher computes no backend key (CPU never applies); a
// CompositeExplicitAutograd kernel also fills the Undefined key, so torch.ops.bridge.* reaches it on any input.
TORCH_LIBRARY_IMPL(bridge, CompositeExplicitAutograd, m) {
  m.impl("gather_param_names", &bridge::gather_param_names_cpu);
  m.impl("param_sort_key", &bridge::param_sort_key_cpu);
  m.impl("local_to_global_name", &bridge::local_to_global_name_cpu);
}
