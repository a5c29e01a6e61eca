#include "fp8moe/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <string_view>

#include <nlohmann/json.hpp>

#include "formats/checked.hpp"
#include "formats/json_bounded.hpp"  // kMaxJsonDepth

namespace fp8moe {

// The format is little-endian; views hand out the mapped bytes as they are.
static_assert(std::endian::native == std::endian::little, "safetensors views assume a little-endian host");

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference reader's limit (rule 2)
constexpr const char* kIndexName = "model.safetensors.index.json";

// Offset of the first byte that does not start a well-formed UTF-8 sequence (overlong forms,
// surrogates and code points above U+10FFFF are ill-formed), or nullopt when `s` is valid.
std::optional<size_t> find_invalid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp, min_cp;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1Fu, min_cp = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0Fu, min_cp = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07u, min_cp = 0x10000;
    } else {
      return i;
    }
    if (s.size() - i < len) return i;
    for (size_t k = 1; k < len; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (d & 0x3Fu);
    }
    if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::nullopt;
}

std::string hex_byte(unsigned char c) {
  constexpr char kDigits[] = "0123456789abcdef";
  return {'0', 'x', kDigits[c >> 4], kDigits[c & 0xF]};
}

// json::parse, but a key repeated within one object is an error (nlohmann silently keeps the last
// one; safetensors forbids duplicate names) and so is nesting deeper than kMaxJsonDepth (a header
// of 100 MB of '[' must not build a 100M-deep tree). `where` prefixes every message;
// `top_level_keys` says what the root object's keys are ("tensor name" in a safetensors header).
json parse_json_strict(std::string_view text, const std::string& where, const char* top_level_keys = "key") {
  std::vector<std::set<std::string>> keys;  // keys seen so far, one set per open object
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > kMaxJsonDepth) FP8MOE_FAIL(where, ": JSON nested deeper than ", kMaxJsonDepth, " levels");
    switch (event) {
      case json::parse_event_t::object_start: keys.emplace_back(); break;
      case json::parse_event_t::object_end: keys.pop_back(); break;
      case json::parse_event_t::key: {
        auto key = parsed.get<std::string>();
        if (keys.back().count(key)) {
          if (keys.size() == 1) FP8MOE_FAIL(where, ": duplicate ", top_level_keys, " '", key, "' (must be unique)");
          FP8MOE_FAIL(where, ": duplicate key '", key, "' within one JSON object");
        }
        keys.back().insert(std::move(key));
        break;
      }
      default: break;
    }
    return true;
  };
  try {
    return json::parse(text.data(), text.data() + text.size(), callback);
  } catch (const json::exception& e) {
    FP8MOE_FAIL(where, ": invalid JSON: ", e.what());
  }
}

// A JSON integer >= 0 as u64. nlohmann parses fractions, exponents and integers beyond u64 as
// floats, so those (and negatives) come back empty: safetensors wants non-negative integers.
std::optional<uint64_t> as_u64(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() == 0) return 0;  // "-0"
  return std::nullopt;
}

std::string dims_str(const std::vector<uint64_t>& d) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < d.size(); ++i) os << (i ? ", " : "") << d[i];
  os << ']';
  return os.str();
}

struct RawEntry {
  std::string name;
  DType dtype;
  std::vector<uint64_t> dims;
  uint64_t begin, end;
};

// Schema of one tensor entry (rule 5): dtype, shape and data_offsets present and well typed;
// unknown extra fields are ignored, as the reference reader does.
RawEntry parse_entry(const std::string& name, const json& v, const std::string& where) {
  const std::string at = where + ": tensor '" + name + "'";
  FP8MOE_CHECK(v.is_object(), at, ": expected an object {dtype, shape, data_offsets}, found JSON ", v.type_name());
  for (const char* field : {"dtype", "shape", "data_offsets"})
    FP8MOE_CHECK(v.contains(field), at, ": missing field \"", field, "\"");
  RawEntry e{name, DType::U8, {}, 0, 0};

  const json& dt = v["dtype"];
  FP8MOE_CHECK(dt.is_string(), at, ": dtype must be a string, found JSON ", dt.type_name());
  const auto parsed = parse_dtype(dt.get<std::string>());
  FP8MOE_CHECK(parsed.has_value(), at, ": unknown dtype \"", dt.get<std::string>(), "\"");
  e.dtype = *parsed;

  const json& shape = v["shape"];
  FP8MOE_CHECK(shape.is_array(), at, ": shape must be an array, found JSON ", shape.type_name());
  for (size_t i = 0; i < shape.size(); ++i) {
    const auto d = as_u64(shape[i]);
    FP8MOE_CHECK(d.has_value(), at, ": shape[", i, "] must be a non-negative integer, found ", shape[i].dump());
    e.dims.push_back(*d);
  }

  const json& off = v["data_offsets"];
  FP8MOE_CHECK(off.is_array(), at, ": data_offsets must be an array, found JSON ", off.type_name());
  FP8MOE_CHECK(off.size() == 2, at, ": data_offsets must have exactly 2 entries [begin, end], found ", off.size());
  const auto begin = as_u64(off[0]), end = as_u64(off[1]);
  FP8MOE_CHECK(begin.has_value(), at, ": data_offsets[0] must be a non-negative integer, found ", off[0].dump());
  FP8MOE_CHECK(end.has_value(), at, ": data_offsets[1] must be a non-negative integer, found ", off[1].dump());
  e.begin = *begin;
  e.end = *end;
  return e;
}

struct ParsedHeader {
  uint64_t data_start = 0;                // 8 + N
  std::vector<SafetensorsEntry> entries;  // sorted by begin offset
  std::map<std::string, std::string> metadata;
};

// Rules 1-10 of formats.md section 1 over the mapped bytes [size]; `where` names the file.
ParsedHeader validate(const unsigned char* bytes, uint64_t size, const std::string& where) {
  FP8MOE_CHECK(size >= 8, where, ": file is shorter than 8 bytes (", size, " bytes): no header length");
  uint64_t n;
  std::memcpy(&n, bytes, 8);
  FP8MOE_CHECK(n <= kMaxHeaderBytes, where, ": header length N = ", n, " exceeds the limit of ", kMaxHeaderBytes,
               " bytes");
  FP8MOE_CHECK(n <= size - 8, where, ": header runs past the end of the file: 8 + N = 8 + ", n, " bytes, file has ",
               size, " bytes");
  const std::string_view text(reinterpret_cast<const char*>(bytes) + 8, n);
  if (const auto bad = find_invalid_utf8(text))
    FP8MOE_FAIL(where, ": header is not valid UTF-8: ill-formed sequence at header byte ", *bad, " (",
                hex_byte(static_cast<unsigned char>(text[*bad])), ")");

  const json header = parse_json_strict(text, where, "tensor name");
  FP8MOE_CHECK(header.is_object(), where, ": header must be a JSON object, found JSON ", header.type_name());

  ParsedHeader out;
  out.data_start = 8 + n;
  std::vector<RawEntry> raw;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      FP8MOE_CHECK(v.is_object(), where, ": __metadata__ must be an object of strings, found JSON ", v.type_name());
      for (const auto& [k, s] : v.items()) {
        FP8MOE_CHECK(s.is_string(), where, ": __metadata__ value of \"", k, "\" must be a string, found JSON ",
                     s.type_name(), " ", s.dump());
        out.metadata[k] = s.get<std::string>();
      }
      continue;
    }
    raw.push_back(parse_entry(name, v, where));
  }

  // Rule 6: sorted by offsets, the tensors tile [0, last end) with no gap or overlap.
  std::sort(raw.begin(), raw.end(), [](const RawEntry& a, const RawEntry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t expected_begin = 0;
  const std::string* previous = nullptr;
  for (const RawEntry& e : raw) {
    const std::string at = where + ": tensor '" + e.name + "'";
    auto after = [&] { return previous ? "the previous tensor '" + *previous + "' ends at " : "the data buffer starts at "; };
    FP8MOE_CHECK(e.begin <= expected_begin, at, ": gap in the data buffer: data_offsets begin is ", e.begin,
                 " but ", after(), expected_begin, " (tensors must tile the buffer)");
    FP8MOE_CHECK(e.begin >= expected_begin, at, ": overlap in the data buffer: data_offsets begin is ", e.begin,
                 " but ", after(), expected_begin, " (tensors must tile the buffer)");
    FP8MOE_CHECK(e.end >= e.begin, at, ": data_offsets end ", e.end, " is before begin ", e.begin);

    // Rules 7-9, with checked arithmetic: shapes come from the file and can be anything.
    const auto bits = static_cast<uint64_t>(dtype_bits(e.dtype));
    const uint64_t numel = checked::product<uint64_t>(e.dims, at, ": element count x bits");
    const uint64_t total_bits = checked::mul(numel, bits, at, ": element count x bits");
    FP8MOE_CHECK(total_bits % 8 == 0, at, ": shape ", dims_str(e.dims), " of ", dtype_name(e.dtype), " holds ",
                 total_bits, " bits, not a multiple of 8");
    FP8MOE_CHECK(e.end - e.begin == total_bits / 8, at, ": data_offsets span ", e.end - e.begin, " bytes, expected ",
                 total_bits / 8, " for shape ", dims_str(e.dims), " of ", dtype_name(e.dtype));

    // Limits of this library's Shape, not of the format.
    FP8MOE_CHECK(e.dims.size() <= static_cast<size_t>(kMaxRank), at, ": rank ", e.dims.size(),
                 " exceeds the maximum rank ", kMaxRank, " supported here");
    for (uint64_t d : e.dims)
      FP8MOE_CHECK(d <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), at, ": dimension ", d,
                   " exceeds int64");
    // An empty tensor passes the byte-count rules whatever its other dims are, but its row-major
    // strides (suffix products) must still fit int64 for a TensorView to describe it.
    int64_t stride = 1;
    for (size_t i = e.dims.size(); i-- > 1;)
      stride = checked::mul(stride, static_cast<int64_t>(e.dims[i]), at, ": the strides of shape ",
                             [&e] { return dims_str(e.dims); });
    std::vector<int64_t> dims(e.dims.begin(), e.dims.end());
    out.entries.push_back(SafetensorsEntry{e.name, e.dtype, Shape(dims), e.begin, e.end});
    expected_begin = e.end;
    previous = &e.name;
  }

  // Rule 10: the last tensor ends exactly at the end of the file (data_start <= size holds).
  const uint64_t data_bytes = size - out.data_start;
  FP8MOE_CHECK(expected_begin <= data_bytes, where, ": file is truncated: tensors end at data byte ", expected_begin,
               " but the file (", size, " bytes) holds only ", data_bytes, " data bytes after the header");
  FP8MOE_CHECK(expected_begin >= data_bytes, where, ": ", data_bytes - expected_begin,
               " trailing bytes after the last tensor: tensors end at data byte ", expected_begin, " but the file (",
               size, " bytes) holds ", data_bytes, " data bytes after the header");
  return out;
}

// write(2) all of [n] bytes, retrying on short writes and EINTR.
void write_all(int fd, const unsigned char* p, size_t n, const std::string& where) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    FP8MOE_CHECK(w > 0, where, ": write failed: ", std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// True when `inner` is strictly below `outer`, compared element by element (both canonical, so
// "/a/bc" is not inside "/a/b").
bool is_inside(const fs::path& inner, const fs::path& outer) {
  const auto [o, i] = std::mismatch(outer.begin(), outer.end(), inner.begin(), inner.end());
  return o == outer.end() && i != inner.end();
}

}  // namespace

// ---- SafetensorsFile

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  const std::string where = "safetensors file '" + path + "'";
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());  // owns the mapping from here on
  f->path_ = path;

  // O_NONBLOCK: opening a FIFO read-only would otherwise wait for a writer (regular files ignore it).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  FP8MOE_CHECK(fd >= 0, where, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    FP8MOE_FAIL(where, ": cannot stat: ", std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    FP8MOE_FAIL(where, ": expected a regular file, found another kind of file (a directory?)");
  }
  f->size_ = static_cast<uint64_t>(st.st_size);
  if (f->size_ >= 8) {  // shorter files fail rule 1 below; mmap refuses length 0
    void* m = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    FP8MOE_CHECK(m != MAP_FAILED, where, ": mmap of ", f->size_, " bytes failed: ", std::strerror(err));
    f->map_ = m;
  } else {
    ::close(fd);
  }

  ParsedHeader h = validate(static_cast<const unsigned char*>(f->map_), f->size_, where);
  f->data_start_ = h.data_start;
  f->metadata_ = std::move(h.metadata);
  for (SafetensorsEntry& e : h.entries) {
    f->names_.push_back(e.name);
    f->entries_.emplace(e.name, std::move(e));
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_);
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  const auto it = entries_.find(name);
  FP8MOE_CHECK(it != entries_.end(), "safetensors file '", path_, "': no tensor named '", name, "'");
  return it->second;
}

TensorView SafetensorsFile::view(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  return TensorView(static_cast<unsigned char*>(map_) + data_start_ + e.begin, e.dtype, e.shape);
}

// ---- SafetensorsWriter

void SafetensorsWriter::add(const std::string& name, const TensorView& t) {
  const std::string at = "SafetensorsWriter: tensor '" + name + "'";
  FP8MOE_CHECK(!find_invalid_utf8(name), at, ": the name is not valid UTF-8");
  FP8MOE_CHECK(name != "__metadata__", at, ": \"__metadata__\" is reserved and cannot name a tensor");
  FP8MOE_CHECK(!names_.count(name), at, ": duplicate name (already added)");
  FP8MOE_CHECK(t.device == Device::CPU, at, ": expected a host tensor, found ", t.str());
  FP8MOE_CHECK(dtype_bits(t.dtype) % 8 == 0, at, ": sub-byte dtype ", dtype_name(t.dtype), " is not supported");
  for (int i = 0; i < t.rank(); ++i)
    FP8MOE_CHECK(t.shape[i] >= 0, at, ": negative dimension in shape ", t.shape.str());
  FP8MOE_CHECK(t.is_contiguous(), at, ": expected a contiguous tensor, found strides that are not");
  const auto nbytes = static_cast<size_t>(t.nbytes());
  FP8MOE_CHECK(nbytes == 0 || t.data != nullptr, at, ": null data for ", t.str());
  Item item{name, t.dtype, t.shape, std::vector<unsigned char>(nbytes)};
  if (nbytes) std::memcpy(item.bytes.data(), t.data, nbytes);
  items_.push_back(std::move(item));
  names_.insert(name);
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  FP8MOE_CHECK(!find_invalid_utf8(key) && !find_invalid_utf8(value), "SafetensorsWriter: metadata \"", key,
               "\": key and value must be valid UTF-8");
  metadata_[key] = value;
}

void SafetensorsWriter::write(const std::string& path) const {
  // ordered_json keeps insertion order, so the header lists tensors in file order.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const Item& it : items_) {
    header[it.name] = {{"dtype", std::string(dtype_name(it.dtype))},
                       {"shape", it.shape.vec()},
                       {"data_offsets", {offset, offset + it.bytes.size()}}};
    offset += it.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data buffer starts 8-byte aligned
  const uint64_t n = text.size();

  const std::string tmp = path + ".tmp";
  const std::string where = "SafetensorsWriter: '" + tmp + "'";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  FP8MOE_CHECK(fd >= 0, where, ": cannot create: ", std::strerror(errno));
  try {
    unsigned char len[8];
    std::memcpy(len, &n, 8);
    write_all(fd, len, 8, where);
    write_all(fd, reinterpret_cast<const unsigned char*>(text.data()), text.size(), where);
    for (const Item& it : items_) write_all(fd, it.bytes.data(), it.bytes.size(), where);
    // Durable before the rename, so a crash leaves either the old file or the complete new one.
    FP8MOE_CHECK(::fsync(fd) == 0, where, ": fsync failed: ", std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    FP8MOE_FAIL(where, ": cannot finish writing '", path, "': ", std::strerror(err));
  }
}

// ---- TensorStore

// A function-try-block, so that std::filesystem failures (permissions, races) surface as
// fp8moe::Error naming the checkpoint, like every other loader error.
TensorStore TensorStore::open(const std::string& path) try {
  TensorStore s;
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  FP8MOE_CHECK(status.type() != fs::file_type::not_found, "checkpoint '", path, "': no such file or directory");
  FP8MOE_CHECK(!ec, "checkpoint '", path, "': cannot access: ", ec.message());

  // Opens one file into files_ and returns its index there.
  auto add_file = [&s](const std::string& file) {
    s.files_.push_back(SafetensorsFile::open(file));
    return s.files_.size() - 1;
  };

  if (fs::is_regular_file(status)) {
    s.root_ = fs::canonical(fs::absolute(path).parent_path()).string();
    const size_t i = add_file(path);
    for (const std::string& name : s.files_[i]->names()) s.where_[name] = i;
    return s;
  }
  FP8MOE_CHECK(fs::is_directory(status), "checkpoint '", path, "': expected a .safetensors file or a directory");
  const fs::path root = fs::canonical(path);
  s.root_ = root.string();
  const fs::path index_path = root / kIndexName;

  if (!fs::exists(index_path)) {
    // No index: every *.safetensors file of the directory, and no name in two of them.
    std::vector<fs::path> shards;
    for (const fs::directory_entry& de : fs::directory_iterator(root))
      if (de.path().extension() == ".safetensors" && de.is_regular_file()) shards.push_back(de.path());
    FP8MOE_CHECK(!shards.empty(), "checkpoint directory '", s.root_, "': holds neither ", kIndexName,
                 " nor any *.safetensors file");
    std::sort(shards.begin(), shards.end());
    for (const fs::path& shard : shards) {
      const size_t i = add_file(shard.string());
      for (const std::string& name : s.files_[i]->names()) {
        const auto [it, fresh] = s.where_.emplace(name, i);
        FP8MOE_CHECK(fresh, "checkpoint directory '", s.root_, "' (no ", kIndexName, "): tensor '", name,
                     "' is in two files: '", s.files_[it->second]->path(), "' and '", shard.string(), "'");
      }
    }
    return s;
  }

  const std::string where = "index '" + index_path.string() + "'";
  std::ifstream in(index_path, std::ios::binary);
  FP8MOE_CHECK(in, where, ": cannot read");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const json index = parse_json_strict(text, where);
  FP8MOE_CHECK(index.is_object(), where, ": expected a JSON object, found JSON ", index.type_name());
  FP8MOE_CHECK(!index.contains("metadata") || index["metadata"].is_object(), where,
               ": \"metadata\" must be an object, found JSON ", index.value("metadata", json()).type_name());
  FP8MOE_CHECK(index.contains("weight_map"), where, ": missing \"weight_map\"");
  const json& weight_map = index["weight_map"];
  FP8MOE_CHECK(weight_map.is_object(), where, ": \"weight_map\" must be an object, found JSON ",
               weight_map.type_name());

  // Shard spellings -> index into files_; two spellings of one file ("a" and "./a") share it.
  std::map<std::string, size_t> shard_file;
  std::map<fs::path, size_t> by_canonical;
  std::vector<std::string> shard_spelling;  // per files_ entry: its name in the index, for messages
  for (const auto& [name, v] : weight_map.items()) {
    FP8MOE_CHECK(v.is_string(), where, ": weight_map entry of tensor '", name, "' must be a shard file name, found JSON ",
                 v.type_name());
    const std::string shard = v.get<std::string>();
    if (shard_file.count(shard)) continue;
    // Shard names come from the (untrusted) index: keep them inside the directory, lexically and
    // with every directory component resolved. The shard file itself may be a symlink pointing
    // elsewhere: that is how Hugging Face cache snapshots link shards into their blob store, and
    // the link was made by whoever laid out the directory, not by the index.
    const fs::path rel(shard);
    const std::string at = where + ": shard '" + shard + "' (of tensor '" + name + "')";
    FP8MOE_CHECK(!shard.empty() && rel.is_relative() && !rel.has_root_name() && !rel.has_root_directory(), at,
                 ": expected a relative path inside the checkpoint directory, found an absolute or empty path");
    for (const fs::path& part : rel)
      FP8MOE_CHECK(part != "..", at, ": expected a path inside the checkpoint directory, found a '..' component");
    const fs::path full = root / rel;
    FP8MOE_CHECK(fs::exists(full), at, ": shard file '", full.string(), "' does not exist");
    const fs::path parent = fs::canonical(full.parent_path());
    FP8MOE_CHECK(parent == root || is_inside(parent, root), at, ": its directory resolves to '", parent.string(),
                 "', outside the checkpoint directory '", s.root_, "'");
    FP8MOE_CHECK(fs::is_regular_file(full), at, ": '", full.string(), "' is not a regular file");
    const fs::path canonical = fs::canonical(full);
    const auto [it, fresh] = by_canonical.emplace(canonical, s.files_.size());
    if (fresh) {
      add_file(full.string());
      shard_spelling.push_back(shard);
    }
    shard_file[shard] = it->second;
  }

  for (const auto& [name, v] : weight_map.items()) {
    const size_t i = shard_file.at(v.get<std::string>());
    FP8MOE_CHECK(s.files_[i]->contains(name), where, ": maps tensor '", name, "' to shard '", v.get<std::string>(),
                 "', which does not contain it");
    s.where_[name] = i;
  }
  for (size_t i = 0; i < s.files_.size(); ++i) {
    for (const std::string& name : s.files_[i]->names()) {
      const auto it = s.where_.find(name);
      FP8MOE_CHECK(it != s.where_.end(), where, ": tensor '", name, "' of shard '", shard_spelling[i],
                   "' is absent from the weight_map");
      FP8MOE_CHECK(it->second == i, where, ": tensor '", name, "' is in two shards: '", shard_spelling[i],
                   "' and '", shard_spelling[it->second], "' (the weight_map names '", shard_spelling[it->second], "')");
    }
  }
  return s;
} catch (const fs::filesystem_error& e) {
  FP8MOE_FAIL("checkpoint '", path, "': ", e.what());
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [name, i] : where_) out.push_back(name);
  return out;
}

const SafetensorsFile& TensorStore::file_of(const std::string& name) const {
  const auto it = where_.find(name);
  FP8MOE_CHECK(it != where_.end(), "checkpoint '", root_, "': no tensor named '", name, "'");
  return *files_[it->second];
}

const SafetensorsEntry& TensorStore::entry(const std::string& name) const { return file_of(name).entry(name); }

TensorView TensorStore::view(const std::string& name) const { return file_of(name).view(name); }

}  // namespace fp8moe
