// Checkpoint conversion BF16 <-> FP8 (include/fp8moe/convert.hpp).
//
// Which tensors are FP8 is decided per tensor, as the loader does (formats.md section 8): dtype
// F8_E4M3/F8_E5M2 AND a `<name>_scale` / `<name>_scale_inv` sibling; the scale grid comes from
// the loader's own rule (model::fp8_weight_spec), so convert, inspect and load agree.
//
// Layout of this file: the two kernels (dequantize rows, quantize rows), bit-identical to
// quant.hpp's reference; the staging folder; the plan of one output file; the worker pool; and
// convert_checkpoint, which plans, runs and commits file after file.
#include "fp8moe/convert.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fp8moe/checkpoint.hpp"
#include "fp8moe/error.hpp"
#include "fp8moe/safetensors.hpp"
#include "model/convert_kernels.hpp"
#include "model/experts.hpp"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace fp8moe {

namespace {

using model::DequantSource;
using model::QuantSource;

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr uint64_t kChunkBytes = 4ull << 20;  // source bytes per job: load balance vs per-job cost

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  FP8MOE_CHECK(f.good(), "cannot read ", p.string());
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  FP8MOE_CHECK(f.good(), "cannot create ", p.string());
  f << text;
  f.close();
  FP8MOE_CHECK(f.good(), "cannot write ", p.string());
}

// The module a weight belongs to: "X.weight" -> "X"; a fused stack ("...experts.gate_up_proj")
// is its own module.
std::string module_of(const std::string& weight) {
  return ends_with(weight, ".weight") ? weight.substr(0, weight.size() - 7) : weight;
}

// A source tensor's scale sibling, if any: "<name>_scale_inv" (fp8) or "<name>_scale"
// (compressed-tensors). Both present is ambiguous, hence an error.
std::string scale_of(const TensorStore& store, const std::string& name) {
  const bool inv = store.contains(name + "_scale_inv"), plain = store.contains(name + "_scale");
  FP8MOE_CHECK(!(inv && plain), "tensor ", name, ": has both ", name, "_scale_inv and ", name,
               "_scale; expected exactly one scale");
  return inv ? name + "_scale_inv" : plain ? name + "_scale" : std::string();
}

// If `name` is a scale (`<w>_scale` / `<w>_scale_inv` with tensor <w> present), returns <w>.
// A ".weight_scale[_inv]" whose weight is absent is an error: a scale without a weight.
std::string weight_of_scale(const TensorStore& store, const std::string& name) {
  for (const char* suffix : {"_scale_inv", "_scale"}) {
    if (!ends_with(name, suffix)) continue;
    const std::string w = name.substr(0, name.size() - std::string(suffix).size());
    if (store.contains(w)) return w;
    FP8MOE_CHECK(!ends_with(w, ".weight"), "tensor ", name, ": a weight scale without its weight (expected tensor ", w,
                 " in the checkpoint, found none)");
  }
  return {};
}

// F32 copy of a stored scale (F32/BF16/F16; exact) with `numel` elements.
Tensor scale_as_f32(const TensorView& s, const std::string& scale_name, int64_t numel) {
  FP8MOE_CHECK(s.dtype == DType::F32 || s.dtype == DType::BF16 || s.dtype == DType::F16, "tensor ", scale_name,
               ": expected an F32/BF16/F16 scale, found ", dtype_name(s.dtype));
  FP8MOE_CHECK(s.numel() == numel, "tensor ", scale_name, ": expected ", numel, " scales, found ", s.shape.str());
  Tensor out(DType::F32, Shape{numel});
  for (int64_t i = 0; i < numel; ++i) out.ptr<float>()[i] = static_cast<float>(load_as_double(s.data, s.dtype, i));
  return out;
}

// =============================================================================================
// The staging folder: the output is built in `.<name>.fp8moe-partial-<pid>` beside the
// destination and renamed into place at the end; removed by the destructor unless committed.
class Staging {
 public:
  explicit Staging(const fs::path& dst) : dst_(dst) {
    const fs::path parent = dst.parent_path().empty() ? fs::path(".") : dst.parent_path();
    fs::create_directories(parent);
    const std::string prefix = "." + dst.filename().string() + ".fp8moe-partial-";
    // A staging folder of an earlier run that was killed outright (no chance to clean up) is
    // removed; one whose process still runs means two conversions into one destination.
    for (const fs::directory_entry& de : fs::directory_iterator(parent)) {
      const std::string n = de.path().filename().string();
      if (n.compare(0, prefix.size(), prefix) != 0) continue;
      const std::string digits = n.substr(prefix.size());
      if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
      const long pid = std::stol(digits);
      FP8MOE_CHECK(::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH, "convert: another conversion (process ", pid,
                   ") is writing ", dst.string(), " (its staging folder ", de.path().string(), " exists)");
      std::error_code ec;
      fs::remove_all(de.path(), ec);
      removed_stale_ = de.path().string();
    }
    path_ = parent / (prefix + std::to_string(::getpid()));
    fs::create_directory(path_);
  }
  ~Staging() {
    if (committed_) return;
    std::error_code ec;  // best effort: the conversion's own error is what the caller sees
    fs::remove_all(path_, ec);
  }
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;

  const fs::path& path() const { return path_; }
  const std::string& removed_stale() const { return removed_stale_; }
  // Path for relative name `rel` (parent folders created).
  fs::path file(const fs::path& rel) const {
    const fs::path p = path_ / rel;
    fs::create_directories(p.parent_path());
    return p;
  }
  // What the user sees in messages: the destination path, not the staging one.
  std::string shown(const fs::path& rel) const { return (dst_ / rel).string(); }
  // Renames the staging folder to the destination (which must be absent or an empty directory).
  void commit() {
    std::error_code ec;
    fs::rename(path_, dst_, ec);
    FP8MOE_CHECK(!ec, "convert: cannot move the finished output ", path_.string(), " to ", dst_.string(), ": ",
                 ec.message());
    committed_ = true;
  }

 private:
  fs::path dst_, path_;
  std::string removed_stale_;
  bool committed_ = false;
};

// =============================================================================================
// One output file, planned before anything is written: its tensors in order with their offsets
// (so the header is known), and the jobs that fill them.

struct OutTensor {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin = 0, bytes = 0;  // within the data buffer
};

enum class JobKind : uint8_t { Copy, Dequantize, Quantize };

struct Work {  // one source tensor's worth of work
  JobKind kind = JobKind::Copy;
  TensorView src;                    // the source tensor (mapped)
  size_t out = 0, out_scale = 0;     // indices into the plan's tensors (out_scale: Quantize only)
  DequantSource dq;                  // Dequantize
  QuantSource q;                     // Quantize
};

struct Job {
  size_t work = 0;
  int64_t lo = 0, hi = 0;  // rows (Dequantize, Quantize) or bytes (Copy) [lo, hi)
  uint64_t src_bytes = 0;  // for progress
};

struct FilePlan {
  fs::path rel;
  std::map<std::string, std::string> metadata;
  std::vector<OutTensor> tensors;
  std::vector<Work> work;
  std::vector<Job> jobs;
  std::string header;  // 8-byte length excluded; padded as SafetensorsWriter pads
  uint64_t data_bytes = 0, src_bytes = 0;
  int64_t tensors_in = 0;

  size_t add(const std::string& name, DType dtype, const Shape& shape) {
    for (const OutTensor& t : tensors)
      FP8MOE_CHECK(t.name != name, "convert: output tensor ", name, " would be written twice in ", rel.string());
    const uint64_t bytes = static_cast<uint64_t>(shape.numel() * dtype_size(dtype));
    tensors.push_back({name, dtype, shape, data_bytes, bytes});
    data_bytes += bytes;
    return tensors.size() - 1;
  }
  // The header exactly as SafetensorsWriter writes it: "__metadata__" first when present, tensors
  // in file order, padded with spaces so the data buffer starts 8-byte aligned.
  void finish_header() {
    json h = json::object();
    if (!metadata.empty()) h["__metadata__"] = metadata;
    for (const OutTensor& t : tensors)
      h[t.name] = {{"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape.vec()}, {"data_offsets", {t.begin, t.begin + t.bytes}}};
    header = h.dump();
    header.append((8 - header.size() % 8) % 8, ' ');
  }
  uint64_t data_start() const { return 8 + header.size(); }
  // Splits work item `w` of `rows` rows of `row_bytes` source bytes into jobs of about
  // kChunkBytes, each a multiple of `align` rows.
  void split_rows(size_t w, int64_t rows, uint64_t row_bytes, int64_t align) {
    int64_t step = std::max<int64_t>(1, static_cast<int64_t>(kChunkBytes / std::max<uint64_t>(row_bytes, 1)));
    step = std::max<int64_t>(align, step / align * align);
    for (int64_t r = 0; r < rows; r += step) {
      const int64_t hi = std::min(rows, r + step);
      jobs.push_back({w, r, hi, static_cast<uint64_t>(hi - r) * row_bytes});
    }
  }
};

// Hands the mapped source pages of [p, p + n) back to the kernel once a job has read them, so the
// process does not hold the whole source file; only pages wholly inside the range (neighbouring
// jobs may still read a shared page). The mapping is private and read-only: a later read simply
// faults the page in again.
void release_pages(const void* p, uint64_t n) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + page - 1) / page * page, hi = (a + n) / page * page;
  if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

void pwrite_all(int fd, const void* p, uint64_t n, uint64_t off, const std::string& shown) {
  const auto* b = static_cast<const unsigned char*>(p);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, b, std::min<uint64_t>(n, 1ull << 30), static_cast<off_t>(off));
    if (w < 0 && errno == EINTR) continue;
    FP8MOE_CHECK(w > 0, "convert: cannot write ", shown, ": ", std::strerror(errno));
    b += w, off += static_cast<uint64_t>(w), n -= static_cast<uint64_t>(w);
  }
}

// A worker's buffers, reused from job to job.
struct Buffers {
  std::vector<unsigned char> bytes;  // codes or BF16 rows of one job
  std::vector<float> band, scales;   // quantize: one band of rows as fp32, the job's scales
};

// Runs one job: computes its rows (or takes its bytes) and writes them at their final offsets.
void run_job(const FilePlan& plan, const Job& job, int fd, const std::string& shown, Buffers& b) {
  const Work& w = plan.work[job.work];
  const OutTensor& out = plan.tensors[w.out];
  const uint64_t base = plan.data_start() + out.begin;
  const auto* src = static_cast<const unsigned char*>(w.src.data);
  switch (w.kind) {
    case JobKind::Copy:
      pwrite_all(fd, src + job.lo, static_cast<uint64_t>(job.hi - job.lo), base + job.lo, shown);
      release_pages(src + job.lo, static_cast<uint64_t>(job.hi - job.lo));
      return;
    case JobKind::Dequantize: {
      const int64_t K = w.dq.spec.cols;
      b.bytes.resize(static_cast<size_t>((job.hi - job.lo) * K * 2));
      model::dequantize_rows(w.dq, job.lo, job.hi, reinterpret_cast<uint16_t*>(b.bytes.data()));
      pwrite_all(fd, b.bytes.data(), b.bytes.size(), base + static_cast<uint64_t>(job.lo * K * 2), shown);
      release_pages(src + job.lo * K, static_cast<uint64_t>((job.hi - job.lo) * K));
      return;
    }
    case JobKind::Quantize: {
      const int64_t K = w.q.w.size(1), gk = (K + w.q.bk - 1) / w.q.bk;
      const int64_t bands = (job.hi - job.lo + w.q.bn - 1) / w.q.bn;
      b.bytes.resize(static_cast<size_t>((job.hi - job.lo) * K));
      b.scales.resize(static_cast<size_t>(bands * gk));
      model::quantize_rows(w.q, job.lo, job.hi, b.band, b.bytes.data(), b.scales.data());
      pwrite_all(fd, b.bytes.data(), b.bytes.size(), base + static_cast<uint64_t>(job.lo * K), shown);
      const OutTensor& so = plan.tensors[w.out_scale];
      pwrite_all(fd, b.scales.data(), b.scales.size() * 4,
                 plan.data_start() + so.begin + static_cast<uint64_t>((job.lo / w.q.bn) * gk * 4), shown);
      const int64_t esz = dtype_size(w.q.w.dtype);
      release_pages(src + job.lo * K * esz, static_cast<uint64_t>((job.hi - job.lo) * K * esz));
      return;
    }
  }
}

json quantization_config_json(const ConvertOptions& opt, const std::vector<std::string>& left_bf16) {
  json q;
  if (opt.scheme == ScaleKind::Channel) {
    // compressed-tensors' FP8_DYNAMIC preset (formats.md section 4).
    q["quant_method"] = "compressed-tensors";
    q["format"] = "float-quantized";
    q["quantization_status"] = "compressed";
    json weights = {{"num_bits", 8}, {"type", "float"}, {"strategy", "channel"}, {"symmetric", true}, {"dynamic", false}};
    json acts = {{"num_bits", 8}, {"type", "float"}, {"strategy", "token"}, {"dynamic", true}};
    q["config_groups"] = {{"group_0", {{"targets", {"Linear"}}, {"weights", weights}, {"input_activations", acts}}}};
    q["ignore"] = left_bf16;
  } else {
    // Fine-grained FP8 as the Qwen3 FP8 releases write it (formats.md section 3).
    q["quant_method"] = "fp8";
    q["fmt"] = "e4m3";
    q["activation_scheme"] = "dynamic";
    q["weight_block_size"] = {opt.block, opt.block};
    q["modules_to_not_convert"] = left_bf16;
  }
  return q;
}

// Is `p` (absolute, normalised) `root` or below it?
bool is_within(const fs::path& p, const fs::path& root) {
  auto r = root.begin(), q = p.begin();
  for (; r != root.end(); ++r, ++q)
    if (q == p.end() || *q != *r) return false;
  return true;
}

}  // namespace

bool fp8_convertible_weight(const std::string& name, int rank) {
  if (rank != 2 || !ends_with(name, ".weight")) return false;
  const std::string m = module_of(name);
  // Routers (mlp.gate, Mixtral's block_sparse_moe.gate, GPT-OSS's mlp.router), Qwen2-MoE's
  // shared_expert_gate [1, H], embeddings, the output heads, and any norm stay as they are.
  for (const char* keep : {".gate", ".router", "shared_expert_gate", "embed_tokens", "lm_head", "shared_head.head"})
    if (ends_with(m, keep)) return false;
  const size_t dot = m.rfind('.');
  return m.find("norm", dot == std::string::npos ? 0 : dot) == std::string::npos;
}

std::vector<int64_t> fp8_readable_block_sizes() { return {16, 32, 64, 128, 256}; }

bool fp8_block_size_readable(int64_t block) {
  const std::vector<int64_t> ok = fp8_readable_block_sizes();
  return std::find(ok.begin(), ok.end(), block) != ok.end();
}

ConvertReport convert_checkpoint(const std::string& src_path, const std::string& dst_path, const ConvertOptions& opt) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  const fs::path src(src_path);
  FP8MOE_CHECK(fs::is_directory(src), "convert: source ", src_path, " must be a checkpoint directory (config.json + safetensors)");
  const fs::path config_path = src / "config.json";
  FP8MOE_CHECK(fs::is_regular_file(config_path), "convert: source ", src_path, " has no config.json");
  if (opt.to == ConvertTarget::FP8) {
    FP8MOE_CHECK(opt.scheme == ScaleKind::Channel || opt.scheme == ScaleKind::Block, "convert: FP8 scheme must be channel or block, found ",
                 scale_kind_name(opt.scheme));
    FP8MOE_CHECK(opt.block > 0, "convert: block size must be positive, found ", opt.block);
  }

  // The destination: absent or an empty directory, neither the source nor inside it.
  fs::path dst(dst_path);
  if (dst.filename().empty()) dst = dst.parent_path();  // "out/"
  const fs::path src_c = fs::canonical(src), dst_c = fs::weakly_canonical(fs::absolute(dst));
  std::error_code ec;
  const bool dst_exists = fs::exists(dst, ec);
  FP8MOE_CHECK(!(dst_exists && fs::equivalent(src, dst)), "convert: destination ", dst_path,
               " is the source checkpoint; refusing to overwrite it");
  FP8MOE_CHECK(!is_within(dst_c, src_c), "convert: destination ", dst_path, " lies inside the source checkpoint ", src_path,
               "; refusing to write into it (choose a folder outside ", src_path, ")");
  if (dst_exists) {
    FP8MOE_CHECK(fs::is_directory(dst), "convert: destination ", dst_path, " already exists and is not an empty directory (it is a file)");
    if (!fs::is_empty(dst)) {
      const std::string first = fs::directory_iterator(dst)->path().filename().string();
      FP8MOE_FAIL("convert: destination ", dst_path, " already exists and is not an empty directory (it holds '", first,
                  "'...); choose a new destination or empty it first");
    }
  }

  const std::string config_text = read_text(config_path);
  json config;
  try {
    config = json::parse(config_text);
  } catch (const json::exception& e) {
    FP8MOE_FAIL(config_path.string(), ": invalid JSON: ", e.what());
  }
  FP8MOE_CHECK(config.is_object(), config_path.string(), ": expected a JSON object");
  const std::string model_type = config.contains("model_type") && config["model_type"].is_string()
                                     ? config["model_type"].get<std::string>() : std::string();
  const QuantConfig qc = parse_quant_config(config_text, config_path.string());
  const TensorStore store = TensorStore::open(src.string());
  const std::vector<std::string> all = store.names();
  const auto first_fp8 = std::find_if(all.begin(), all.end(), [&](const std::string& n) { return is_fp8(store.entry(n).dtype); });
  if (opt.to == ConvertTarget::BF16) {
    FP8MOE_CHECK(qc.method != QuantMethod::None || first_fp8 != all.end(), "convert --to bf16: ", config_path.string(),
                 " has no quantization_config and no tensor is FP8; the checkpoint is not FP8, nothing to dequantize");
  } else {
    FP8MOE_CHECK(qc.method == QuantMethod::None, "convert --to fp8: ", config_path.string(), " already declares quant_method ",
                 quant_method_name(qc.method), "; convert it to bf16 first");
    FP8MOE_CHECK(first_fp8 == all.end(), "convert --to fp8: tensor ", first_fp8 == all.end() ? "" : *first_fp8, " is already ",
                 first_fp8 == all.end() ? "" : dtype_name(store.entry(*first_fp8).dtype),
                 " (the checkpoint holds FP8 weights although its config.json has no quantization_config); "
                 "convert it to bf16 first");
  }

  const fs::path root(store.root());
  const bool indexed = fs::exists(root / kIndexName);
  // Source files by their name relative to the checkpoint: output order and progress are stable.
  std::vector<std::pair<fs::path, const SafetensorsFile*>> files;
  for (const auto& f : store.files()) files.emplace_back(fs::relative(fs::canonical(f->path()), root), f.get());
  std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  ConvertProgress prog;
  prog.files = static_cast<int64_t>(files.size());
  for (const auto& [rel, f] : files)
    for (const std::string& n : f->names()) prog.bytes_total += f->entry(n).end - f->entry(n).begin;

  const int threads = opt.threads > 0 ? opt.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  Staging staging(dst);
  ConvertReport rep;
  rep.threads = threads;
  json weight_map = json::object();
  std::set<std::string> left_bf16;  // Linear modules kept in BF16 (FP8 direction)
  std::vector<std::thread> closers;  // fsync + close of finished files, behind the next file's work
  std::mutex close_mu;
  std::string close_error;
  auto join_closers = [&] {
    for (std::thread& t : closers) t.join();
    closers.clear();
  };
  auto cancelled = [&] { return opt.cancel && opt.cancel->load(); };
  const std::string cancel_message =
      "convert: cancelled; the partial output was removed and " + dst.string() + " was not written";
  auto seconds = [&] { return std::chrono::duration<double>(clock::now() - t_start).count(); };

  try {
    for (size_t fi = 0; fi < files.size(); ++fi) {
      const fs::path& rel = files[fi].first;
      const SafetensorsFile& f = *files[fi].second;
      const std::string shown = staging.shown(rel);
      // ---- plan
      FilePlan plan;
      plan.rel = rel;
      plan.metadata = f.metadata();
      for (const std::string& name : f.names()) {
        const TensorView t = f.view(name);
        const uint64_t nbytes = f.entry(name).end - f.entry(name).begin;
        ++plan.tensors_in;
        plan.src_bytes += nbytes;
        Work w;
        w.src = t;
        if (opt.to == ConvertTarget::BF16) {
          if (!weight_of_scale(store, name).empty()) continue;  // folded into its weight
          const std::string scale = scale_of(store, name);
          if (is_fp8(t.dtype)) {
            // The loader's rule: the declared (or shape-stated) scheme, checked against the scale.
            const ScaleSpec spec = model::fp8_weight_spec(store, qc, name, model_type);
            const int64_t lead = t.rank() == 3 ? t.size(0) : 1;
            w.kind = JobKind::Dequantize;
            w.dq.codes = t;
            w.dq.spec = spec;
            w.dq.scale = scale_as_f32(store.view(scale), scale, lead * spec.numel());
            w.out = plan.add(name, DType::BF16, t.shape);
            plan.work.push_back(std::move(w));
            plan.split_rows(plan.work.size() - 1, lead * spec.rows, static_cast<uint64_t>(spec.cols), 1);
            ++rep.converted;
            continue;
          }
          FP8MOE_CHECK(scale.empty(), "tensor ", name, ": has scale ", scale, " but is stored as ", dtype_name(t.dtype),
                       ", not FP8");
        } else if (fp8_convertible_weight(name, t.rank()) && is_float(t.dtype)) {
          const int64_t N = t.size(0), K = t.size(1);
          w.kind = JobKind::Quantize;
          w.q = {name, t, opt.scheme == ScaleKind::Channel ? 1 : opt.block, opt.scheme == ScaleKind::Channel ? K : opt.block};
          w.out = plan.add(name, DType::F8_E4M3, t.shape);
          w.out_scale = plan.add(name + (opt.scheme == ScaleKind::Channel ? "_scale" : "_scale_inv"), DType::F32,
                                 Shape{(N + w.q.bn - 1) / w.q.bn, (K + w.q.bk - 1) / w.q.bk});
          plan.work.push_back(std::move(w));
          plan.split_rows(plan.work.size() - 1, N, static_cast<uint64_t>(K * dtype_size(t.dtype)), plan.work.back().q.bn);
          ++rep.converted;
          continue;
        } else if (t.rank() == 2 && ends_with(name, ".weight") && !ends_with(module_of(name), "embed_tokens")) {
          left_bf16.insert(module_of(name));
        }
        w.kind = JobKind::Copy;
        w.out = plan.add(name, t.dtype, t.shape);
        plan.work.push_back(std::move(w));
        for (uint64_t b = 0; b < nbytes; b += kChunkBytes) {
          const uint64_t hi = std::min(nbytes, b + kChunkBytes);
          plan.jobs.push_back({plan.work.size() - 1, static_cast<int64_t>(b), static_cast<int64_t>(hi), hi - b});
        }
      }
      plan.finish_header();
      for (const OutTensor& t : plan.tensors) weight_map[t.name] = rel.generic_string();

      // ---- write: header first, then the jobs, each at its offset
      const fs::path out_path = staging.file(rel);
      const int fd = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      FP8MOE_CHECK(fd >= 0, "convert: cannot create ", shown, ": ", std::strerror(errno));
      std::atomic<size_t> next{0};
      std::atomic<uint64_t> done{0};
      std::atomic<bool> stop{false};
      std::mutex mu;
      std::condition_variable cv;
      int finished = 0;
      std::exception_ptr error;
      std::vector<std::thread> pool;
      try {
        const uint64_t n = plan.header.size();
        unsigned char len[8];
        std::memcpy(len, &n, 8);
        pwrite_all(fd, len, 8, 0, shown);
        pwrite_all(fd, plan.header.data(), n, 8, shown);
        FP8MOE_CHECK(::ftruncate(fd, static_cast<off_t>(plan.data_start() + plan.data_bytes)) == 0, "convert: cannot size ",
                     shown, ": ", std::strerror(errno));
        const int nthreads = static_cast<int>(std::min<size_t>(static_cast<size_t>(threads), std::max<size_t>(plan.jobs.size(), 1)));
        for (int i = 0; i < nthreads; ++i)
          pool.emplace_back([&] {
            Buffers b;
            try {
              for (size_t j = next++; j < plan.jobs.size() && !stop; j = next++) {
                run_job(plan, plan.jobs[j], fd, shown, b);
                done += plan.jobs[j].src_bytes;
              }
            } catch (...) {
              std::lock_guard<std::mutex> lk(mu);
              if (!error) error = std::current_exception();
              stop = true;
            }
            std::lock_guard<std::mutex> lk(mu);
            ++finished;
            cv.notify_all();
          });
        // The calling thread reports progress and watches for a cancellation.
        auto last_report = clock::now() - std::chrono::seconds(1);
        for (;;) {
          std::unique_lock<std::mutex> lk(mu);
          if (cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return finished == nthreads; })) break;
          lk.unlock();
          if (cancelled()) stop = true;
          if (opt.progress && clock::now() - last_report >= std::chrono::milliseconds(200)) {
            ConvertProgress p = prog;
            p.bytes_done += done;
            p.seconds = seconds();
            p.file = static_cast<int64_t>(fi + 1);
            p.file_name = rel.generic_string();
            opt.progress(p);
            last_report = clock::now();
          }
        }
        for (std::thread& t : pool) t.join();
        pool.clear();
      } catch (...) {
        stop = true;
        for (std::thread& t : pool) t.join();
        ::close(fd);
        throw;
      }
      if (error) {
        ::close(fd);
        std::rethrow_exception(error);
      }
      if (cancelled()) {
        ::close(fd);
        throw ConvertCancelled(cancel_message);
      }
      // Durable before the final rename; flushed behind the next file's work.
      closers.emplace_back([fd, shown, &close_mu, &close_error] {
        const bool ok = ::fsync(fd) == 0;
        const int err = errno;
        if (::close(fd) != 0 || !ok) {
          std::lock_guard<std::mutex> lk(close_mu);
          if (close_error.empty()) close_error = "convert: cannot finish writing " + shown + ": " + std::strerror(err);
        }
      });
      prog.bytes_done += plan.src_bytes;
      rep.tensors_in += plan.tensors_in;
      rep.tensors_out += static_cast<int64_t>(plan.tensors.size());
      rep.bytes_in += plan.src_bytes;
      rep.bytes_out += plan.data_bytes;
      ++rep.files;
      if (opt.progress) {
        ConvertProgress p = prog;
        p.seconds = seconds();
        p.file = static_cast<int64_t>(fi + 1);
        p.file_name = rel.generic_string();
        p.file_done = true;
        p.file_tensors_in = plan.tensors_in;
        p.file_tensors_out = static_cast<int64_t>(plan.tensors.size());
        p.file_bytes_out = plan.data_bytes;
        opt.progress(p);
      }
    }

    if (indexed) {
      json index;
      index["metadata"] = {{"total_size", rep.bytes_out}};
      index["weight_map"] = weight_map;
      write_text(staging.file(kIndexName), index.dump(2) + "\n");
    }
    if (opt.to == ConvertTarget::BF16)
      config.erase("quantization_config");
    else
      config["quantization_config"] = quantization_config_json(opt, {left_bf16.begin(), left_bf16.end()});
    write_text(staging.file("config.json"), config.dump(2) + "\n");

    // The rest of the checkpoint (tokenizer, generation config, ...) travels unchanged.
    for (const fs::directory_entry& de : fs::directory_iterator(src)) {
      const std::string fname = de.path().filename().string();
      if (!de.is_regular_file() || fname == "config.json" || fname == kIndexName || de.path().extension() == ".safetensors")
        continue;
      fs::copy_file(de.path(), staging.file(fname));
    }
    join_closers();
    FP8MOE_CHECK(close_error.empty(), close_error);
    if (cancelled()) throw ConvertCancelled(cancel_message);
  } catch (...) {
    join_closers();
    throw;
  }
  staging.commit();
  rep.removed_partial = staging.removed_stale();
  rep.seconds = seconds();
  return rep;
}

}  // namespace fp8moe
