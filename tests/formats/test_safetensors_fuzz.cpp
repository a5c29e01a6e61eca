// Hostile files: randomized mutations of valid safetensors files and sharded checkpoints.
//
// Valid files written by SafetensorsWriter are mutated thousands of times (bit flips in the length
// prefix and header, truncations, insertions, deletions, JSON edits that keep the header
// parseable but push numbers to huge, negative or fractional values, invalid UTF-8, ...). Each
// result must either open - and then every tensor lies inside the file and reads back the bytes
// the image holds there - or throw fp8moe::Error. A crash, a hang or any other exception fails.
// The same holds for TensorStore::open on a checkpoint directory whose index and shards are
// mutated. Every run draws a fresh seed (printed); the time per test is bounded.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fp8moe/safetensors.hpp"
#include "formats/safetensors_test_util.hpp"
#include "test_support.hpp"

using fp8moe::test::fresh_seed;

namespace fp8moe {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;
using testing::le64;
using testing::read_file;
using testing::TempDir;
using testing::write_file;
using Clock = std::chrono::steady_clock;

// Bounded time per test: the mutants stop at the iteration count or the time budget, whichever
// comes first; but the minimum count, and at least one accepted and one rejected mutant, always
// run whatever the clock says, so a slow or loaded machine makes the test longer, never failed.
constexpr auto kFileBudget = std::chrono::milliseconds(2500);
constexpr auto kStoreBudget = std::chrono::milliseconds(1500);
constexpr int kFileIters = 6000, kFileMinIters = 300;  // about 1 s and 0.5 s on an idle machine
constexpr int kStoreIters = 1500, kStoreMinIters = 60;

class Rng {
 public:
  explicit Rng(uint64_t seed) : g_(seed) {}
  uint64_t u64() { return g_(); }
  // Uniform in [0, n) (0 when n is 0); the modulo bias is irrelevant here.
  size_t below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(g_() % n); }
  bool coin() { return g_() & 1; }
  template <typename T>
  const T& pick(const std::vector<T>& v) { return v[below(v.size())]; }
  char byte() { return static_cast<char>(g_()); }
  std::string bytes(size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = byte();
    return s;
  }

 private:
  std::mt19937_64 g_;
};

// ---- valid starting points --------------------------------------------------------------------

Tensor random_tensor(DType dt, Shape s, Rng& rng) {
  Tensor t(dt, s);
  auto* p = static_cast<unsigned char*>(t.data());
  for (int64_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<unsigned char>(rng.u64());
  return t;
}

// Several valid files, as byte images: mixed dtypes at unaligned offsets with metadata, scalars
// and empty tensors, a file without tensors, and an FP8 expert weight with its scale.
std::vector<std::string> valid_images(const TempDir& dir, Rng& rng) {
  std::vector<std::string> out;
  const std::string path = dir.file("valid.safetensors");
  const auto image_of = [&](const SafetensorsWriter& w) {
    w.write(path);
    out.push_back(read_file(path));
  };
  {
    SafetensorsWriter w;
    w.add("a", random_tensor(DType::F8_E4M3, {3, 5}, rng));  // 15 bytes: everything after is unaligned
    w.add("b", random_tensor(DType::BF16, {2, 3}, rng));
    w.add("c", random_tensor(DType::F32, {7}, rng));
    w.add("d", random_tensor(DType::I64, {2}, rng));
    w.set_metadata("format", "pt");
    image_of(w);
  }
  {
    SafetensorsWriter w;
    w.add("scalar", random_tensor(DType::F32, {}, rng));
    w.add("empty", random_tensor(DType::F16, {0, 4}, rng));
    w.add("one", random_tensor(DType::U8, {1}, rng));
    image_of(w);
  }
  {
    SafetensorsWriter w;
    w.set_metadata("only", "metadata");
    image_of(w);
  }
  {
    SafetensorsWriter w;
    w.add("model.layers.0.mlp.experts.0.gate_proj.weight", random_tensor(DType::F8_E4M3, {16, 33}, rng));
    w.add("model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv", random_tensor(DType::F32, {1, 1}, rng));
    w.add("model.layers.0.mlp.experts.0.down_proj.weight", random_tensor(DType::BF16, {5, 16}, rng));
    image_of(w);
  }
  return out;
}

// ---- mutations --------------------------------------------------------------------------------

uint64_t header_len(const std::string& image) {
  uint64_t n = 0;
  if (image.size() >= 8) std::memcpy(&n, image.data(), 8);
  return n;
}

// The header text of a valid image.
std::string header_of(const std::string& image) { return image.substr(8, header_len(image)); }
std::string data_of(const std::string& image) { return image.substr(8 + header_len(image)); }

// An image with header `h` (its length prefix consistent with it) and data `d`; sometimes padded
// with spaces to a multiple of 8 as the writer does.
std::string rebuild(std::string h, const std::string& d, Rng& rng) {
  if (rng.coin()) h.append((8 - h.size() % 8) % 8, ' ');
  return le64(h.size()) + h + d;
}

// A JSON value meant to break a field that wants a non-negative integer.
ojson hostile_number(Rng& rng, uint64_t current) {
  switch (rng.below(16)) {
    case 0: return std::numeric_limits<uint64_t>::max();
    case 1: return uint64_t{1} << 63;
    case 2: return (uint64_t{1} << 32) + current;
    case 3: return -1;
    case 4: return static_cast<int64_t>(current) * -1 - 1;
    case 5: return 1.5;
    case 6: return 1e30;
    case 7: return static_cast<double>(current);  // integral but a float: not an integer in JSON terms
    case 8: return std::to_string(current);
    case 9: return nullptr;
    case 10: return current + 1;
    case 11: return current == 0 ? 0 : current - 1;
    case 12: return 0;
    case 13: return ojson::array({current});
    case 14: return (uint64_t{1} << 31) - 1 + rng.below(3);
    default: return rng.u64() >> rng.below(64);
  }
}

ojson hostile_value(Rng& rng) {
  switch (rng.below(7)) {
    case 0: return nullptr;
    case 1: return 7;
    case 2: return "x";
    case 3: return ojson::array();
    case 4: return ojson::object();
    case 5: return true;
    default: return ojson::array({1, 2, 3});
  }
}

// Edits one structural element of a parseable header, keeping it valid JSON; describes the edit.
std::string edit_json(ojson& h, Rng& rng) {
  std::vector<std::string> names;
  for (auto it = h.begin(); it != h.end(); ++it)
    if (it.key() != "__metadata__") names.push_back(it.key());
  const int choice = static_cast<int>(rng.below(names.empty() ? 3 : 14));
  if (choice == 0) {
    h["__metadata__"] = rng.coin() ? hostile_value(rng) : ojson{{"k", hostile_value(rng)}};
    return "metadata replaced";
  }
  if (choice == 1) {
    const std::string name = rng.coin() ? "__metadata__" : "new";
    h[name] = {{"dtype", "U8"}, {"shape", {rng.below(4)}}, {"data_offsets", {0, rng.below(4)}}};
    return "entry '" + name + "' added";
  }
  if (choice == 2) {
    h = rng.coin() ? ojson::array({h}) : ojson(rng.below(100));
    return "header replaced by a non-object";
  }
  const std::string name = rng.pick(names);
  ojson& e = h[name];
  const std::string at = "entry '" + name + "': ";
  switch (choice) {
    case 3:
    case 4: {
      const size_t i = rng.below(2);
      const uint64_t cur = e["data_offsets"][i].get<uint64_t>();
      e["data_offsets"][i] = hostile_number(rng, cur);
      return at + "data_offsets[" + std::to_string(i) + "] = " + e["data_offsets"][i].dump();
    }
    case 5:
    case 6: {
      ojson& s = e["shape"];
      if (s.empty() || rng.below(4) == 0) {
        s.push_back(hostile_number(rng, 1));
        return at + "shape grew to " + s.dump();
      }
      const size_t i = rng.below(s.size());
      s[i] = hostile_number(rng, s[i].get<uint64_t>());
      return at + "shape = " + s.dump();
    }
    case 7: {
      static const std::vector<std::string> dtypes = {"BOOL", "U8",  "I8",      "F16",          "BF16", "F32",
                                                      "F64",  "I64", "F8_E4M3", "F8_E4M3FNUZ", "F4",   "F6_E2M3",
                                                      "C64",  "",    "F8_E4M3FN", "bf16",       "F128"};
      e["dtype"] = rng.pick(dtypes);
      return at + "dtype = " + e["dtype"].dump();
    }
    case 8: {
      static const std::vector<std::string> fields = {"dtype", "shape", "data_offsets"};
      const std::string& f = rng.pick(fields);
      if (rng.coin()) {
        e.erase(f);
        return at + f + " removed";
      }
      e[f] = hostile_value(rng);
      return at + f + " = " + e[f].dump();
    }
    case 9: {
      const std::string other = rng.pick(names);
      std::swap(e["data_offsets"], h[other]["data_offsets"]);
      return at + "data_offsets swapped with '" + other + "'";
    }
    case 10: {
      ojson& s = e["shape"];
      if (!s.empty()) s.erase(s.size() - 1);
      return at + "shape shrank to " + s.dump();
    }
    case 11: {
      e = hostile_value(rng);
      return at + "replaced by " + e.dump();
    }
    case 12: {
      // Same byte count under another element count: [n] -> [n/2, 2] and so on.
      ojson& s = e["shape"];
      s = ojson::array({0, rng.u64() >> 1, rng.u64() >> 1});
      return at + "shape = " + s.dump();
    }
    default: {
      e["data_offsets"] = ojson::array({e["data_offsets"][0], e["data_offsets"][1], 0});
      return at + "three data_offsets";
    }
  }
}

// One random mutation of `image`; `what` describes it for the failure message. A valid image
// gets any mutation; an already mutated one (`structural` false) only the byte-level ones, which
// need no parseable header.
std::string mutate(const std::string& image, Rng& rng, std::string& what, bool structural = true) {
  std::string m = image;
  if (image.size() <= 8) {
    m += rng.bytes(1 + rng.below(16));
    what = "bytes appended to a short image";
    return m;
  }
  const uint64_t n = std::min<uint64_t>(header_len(image), image.size() - 8);
  const size_t head_end = static_cast<size_t>(8 + n);
  static const std::string kJsonBytes = "{}[]\":,-+.0123456789eE\\ \t\n";
  switch (rng.below(structural ? 12 : 7)) {
    case 0: {  // bit flips in the length prefix and header
      const int flips = 1 + static_cast<int>(rng.below(4));
      for (int i = 0; i < flips; ++i) m[rng.below(head_end)] ^= static_cast<char>(1u << rng.below(8));
      what = std::to_string(flips) + " bit flips in prefix/header";
      break;
    }
    case 1: {  // a JSON-significant byte at a random header position
      const size_t at = 8 + rng.below(n);
      m[at] = kJsonBytes[rng.below(kJsonBytes.size())];
      what = "header byte " + std::to_string(at - 8) + " set to '" + std::string(1, m[at]) + "'";
      break;
    }
    case 2: {  // length prefix replaced
      const uint64_t size = image.size();
      const std::vector<uint64_t> v = {0,        1,        7,          n - 1,       n + 1,       n + 8,
                                       size - 8, size - 7, 100'000'000, 100'000'001, uint64_t{1} << 63,
                                       std::numeric_limits<uint64_t>::max(), rng.u64()};
      const uint64_t len = rng.pick(v);
      std::memcpy(m.data(), &len, 8);
      what = "length prefix = " + std::to_string(len);
      break;
    }
    case 3: {
      const size_t len = rng.below(image.size());
      m.resize(len);
      what = "truncated to " + std::to_string(len) + " bytes";
      break;
    }
    case 4: {
      const size_t at = rng.below(image.size() + 1);
      const size_t count = 1 + rng.below(16);
      m.insert(at, rng.bytes(count));
      what = std::to_string(count) + " random bytes inserted at " + std::to_string(at);
      break;
    }
    case 5: {
      const size_t at = rng.below(image.size());
      const size_t count = 1 + rng.below(16);
      m.erase(at, count);
      what = std::to_string(count) + " bytes deleted at " + std::to_string(at);
      break;
    }
    case 6: {
      const size_t count = 1 + rng.below(64);
      m += rng.bytes(count);
      what = std::to_string(count) + " bytes appended";
      break;
    }
    case 7:
    case 8: {  // JSON edit, prefix consistent; the data sometimes resized to match
      ojson h = ojson::parse(header_of(image));
      what = "JSON edit: " + edit_json(h, rng);
      std::string d = data_of(image);
      if (rng.below(4) == 0) d.resize(rng.below(2 * d.size() + 8), '\x5a');
      m = rebuild(h.dump(), d, rng);
      break;
    }
    case 9: {  // a digit run replaced textually, prefix consistent
      std::string h = header_of(image);
      std::vector<size_t> starts;
      for (size_t i = 0; i < h.size(); ++i)
        if (std::isdigit(static_cast<unsigned char>(h[i])) && (i == 0 || !std::isdigit(static_cast<unsigned char>(h[i - 1]))))
          starts.push_back(i);
      if (starts.empty()) starts.push_back(0);
      const size_t at = rng.pick(starts);
      size_t end = at;
      while (end < h.size() && std::isdigit(static_cast<unsigned char>(h[end]))) ++end;
      static const std::vector<std::string> numbers = {
          "18446744073709551615", "18446744073709551616", "99999999999999999999999", "-1", "-0", "1e3", "0.5",
          "00", "9223372036854775808", "4294967296", "2147483648", "1E400", "-9223372036854775809"};
      const std::string& num = rng.pick(numbers);
      h.replace(at, end - at, num);
      what = "number at header byte " + std::to_string(at) + " replaced by " + num;
      m = rebuild(h, data_of(image), rng);
      break;
    }
    case 10: {  // ill-formed UTF-8 or a control character, prefix consistent
      std::string h = header_of(image);
      static const std::vector<std::string> bad = {"\xc0\xaf", "\xff", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xe2\x82",
                                                   std::string(1, '\0'), "\x01", "\\ud800", "\\u0000", "\\"};
      const size_t at = rng.below(h.size() + 1);
      h.insert(at, rng.pick(bad));
      what = "odd bytes inserted at header byte " + std::to_string(at);
      m = rebuild(h, data_of(image), rng);
      break;
    }
    default: {  // a duplicate key: the first entry repeated textually
      std::string h = header_of(image);
      const size_t open = h.find('{');
      const size_t comma = h.find("},");
      if (open != std::string::npos && comma != std::string::npos && comma > open) {
        const std::string first = h.substr(open + 1, comma - open);  // "name":{...}
        h.insert(open + 1, first + ",");
      } else {
        h.insert(0, " ");
      }
      what = "first entry duplicated";
      m = rebuild(h, data_of(image), rng);
      break;
    }
  }
  return m;
}

// ---- checks on an accepted file ---------------------------------------------------------------

// A view's strides are the exact row-major strides of its shape, each representable in int64 (a
// shape like [0, 2^62, 4] has no elements, yet its outer stride 2^64 cannot be represented).
// Non-fatal, so that one such file does not end a fuzz run.
void expect_exact_strides(const TensorView& v, const std::string& what) {
  int64_t expected = 1;
  for (int i = v.rank() - 1; i >= 0; --i) {
    if (v.strides[i] != expected) {
      ADD_FAILURE() << what << ": stride " << i << " of shape " << v.shape.str() << " is " << v.strides[i]
                    << ", expected " << expected;
      return;
    }
    if (__builtin_mul_overflow(expected, v.shape[i], &expected) && i > 0) {
      ADD_FAILURE() << what << ": shape " << v.shape.str()
                    << " has strides beyond int64; the file should have been refused";
      return;
    }
  }
}

// An accepted file's tensors tile its data buffer, and each view reads back the image's bytes at
// the entry's offsets (a view outside the mapping would fault here).
void expect_views_inside(const SafetensorsFile& f, const std::string& image, const std::string& what) {
  ASSERT_EQ(f.file_size(), image.size()) << what;
  const uint64_t data_start = 8 + header_len(image);
  ASSERT_LE(data_start, image.size()) << what;
  uint64_t covered = 0;
  for (const std::string& name : f.names()) {
    const SafetensorsEntry& e = f.entry(name);
    ASSERT_LE(e.begin, e.end) << what << ", tensor " << name;
    ASSERT_LE(e.end, image.size() - data_start) << what << ", tensor " << name;
    covered += e.end - e.begin;
    const TensorView v = f.view(name);
    expect_exact_strides(v, what + ", tensor " + name);
    if (dtype_bits(e.dtype) % 8 != 0) continue;  // sub-byte: no nbytes()
    ASSERT_EQ(static_cast<uint64_t>(v.nbytes()), e.end - e.begin) << what << ", tensor " << name;
    if (v.nbytes() > 0)
      ASSERT_EQ(std::memcmp(v.data, image.data() + data_start + e.begin, static_cast<size_t>(v.nbytes())), 0)
          << what << ", tensor " << name;
  }
  EXPECT_EQ(covered, image.size() - data_start) << what;
}

struct Tally {
  int accepted = 0, rejected = 0, iterations = 0;

  // Whether to draw another mutant (see the budgets above).
  bool more(int max_iters, int min_iters, Clock::time_point start, Clock::duration budget) const {
    if (iterations >= max_iters) return false;
    return iterations < min_iters || accepted == 0 || rejected == 0 || Clock::now() - start < budget;
  }
};

// Opens `path` holding `image`; records the outcome, fails on anything but success or Error.
void open_one(const std::string& path, const std::string& image, const std::string& what, Tally& t) {
  try {
    const auto f = SafetensorsFile::open(path);
    ++t.accepted;
    expect_views_inside(*f, image, what);
  } catch (const Error&) {
    ++t.rejected;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": threw a non-fp8moe exception: " << e.what();
  } catch (...) {
    ADD_FAILURE() << what << ": threw a non-exception object";
  }
}

TEST(SafetensorsFuzz, MutatedFilesOpenCleanlyOrThrowError) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::printf("SafetensorsFuzz file seed %llu\n", static_cast<unsigned long long>(seed));
  Rng rng(seed);
  TempDir dir;
  const std::vector<std::string> valid = valid_images(dir, rng);
  // The starting points themselves are valid.
  Tally t;
  for (size_t i = 0; i < valid.size(); ++i) {
    const std::string path = dir.file("valid" + std::to_string(i) + ".safetensors");
    write_file(path, valid[i]);
    open_one(path, valid[i], "unmutated image", t);
  }
  ASSERT_EQ(t.accepted, static_cast<int>(valid.size()));

  t = {};
  const auto start = Clock::now();
  for (int i = 0; t.more(kFileIters, kFileMinIters, start, kFileBudget); ++i) {
    const size_t which = rng.below(valid.size());
    std::string what;
    std::string image = mutate(valid[which], rng, what);
    if (rng.below(8) == 0) {  // sometimes a second, byte-level mutation on top
      std::string second;
      image = mutate(image, rng, second, /*structural=*/false);
      what += "; then " + second;
    }
    // A fresh file each time (see ShardedFixture on rewriting files in place).
    const std::string path = dir.file("mutant" + std::to_string(i) + ".safetensors");
    write_file(path, image);
    open_one(path, image, "iteration " + std::to_string(i) + " (image " + std::to_string(which) + "): " + what, t);
    fs::remove(path);
    ++t.iterations;
    if (::testing::Test::HasFatalFailure()) return;
  }
  std::printf("SafetensorsFuzz files: %d mutants, %d accepted, %d rejected\n", t.iterations, t.accepted, t.rejected);
  EXPECT_GE(t.iterations, kFileMinIters);
  // Both outcomes occur: mutations inside the data buffer are harmless, most others are not.
  EXPECT_GT(t.accepted, 0);
  EXPECT_GT(t.rejected, t.iterations / 2);
}

// An empty tensor whose shape has a zero dimension but whose outer strides overflow int64: the
// format accepts it (numel 0 x anything is 0), but its TensorView cannot be built. The reader must
// refuse it, or hand out exact strides; computing them wraps around (signed overflow).
TEST(SafetensorsFuzz, EmptyTensorWithStridesBeyondInt64IsRefused) {
  TempDir dir;
  const std::string path = dir.file("strides.safetensors");
  for (const char* shape : {"[0,4611686018427387904,4]", "[3037000500,3037000500,0]", "[0,9223372036854775807,2]"}) {
    SCOPED_TRACE(shape);
    const std::string header =
        std::string(R"({"e":{"dtype":"F16","shape":)") + shape + R"(,"data_offsets":[0,0]}})";
    write_file(path, testing::st_image(header));
    try {
      const auto f = SafetensorsFile::open(path);
      expect_exact_strides(f->view("e"), "accepted file");
    } catch (const Error&) {
      // refused: fine
    }
  }
}

// A FIFO (or any non-regular file) is refused, and opening it must not block waiting for a writer.
// Runs in a child process so that a hang is reported as a failure instead of stalling the suite.
TEST(SafetensorsFuzz, NonRegularFilesAreRefusedWithoutBlocking) {
  TempDir dir;
  const std::string fifo = dir.file("pipe.safetensors");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  for (const std::string& path : {fifo, std::string("/dev/zero"), dir.path().string()}) {
    SCOPED_TRACE(path);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      int code = 3;
      try {
        SafetensorsFile::open(path);
        code = 1;  // accepted
      } catch (const Error&) {
        code = 0;
      } catch (...) {
        code = 2;
      }
      ::_exit(code);
    }
    int status = 0;
    bool done = false;
    for (int i = 0; i < 200 && !done; ++i) {  // up to 2 s
      done = ::waitpid(pid, &status, WNOHANG) == pid;
      if (!done) ::usleep(10'000);
    }
    if (!done) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      ADD_FAILURE() << "SafetensorsFile::open('" << path << "') blocked for 2 s instead of refusing a non-regular file";
      continue;
    }
    ASSERT_TRUE(WIFEXITED(status)) << "the child crashed (signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0) << ")";
    EXPECT_EQ(WEXITSTATUS(status), 0) << "expected fp8moe::Error (exit 0); 1 = accepted, 2 = another exception";
  }
}

// ---- TensorStore on a mutated checkpoint directory ----------------------------------------------

// A sharded checkpoint (3 shards, one in a subdirectory) kept in memory, a valid shard outside the
// checkpoint, and the means to lay a (mutated) copy out in a fresh directory. Fresh files, because
// rewriting a file in place through truncation makes ext4 flush it on close: milliseconds each.
struct ShardedFixture {
  fs::path root, outside;
  std::map<std::string, std::string> files;  // file name relative to the checkpoint -> pristine bytes
  ojson index;
  std::vector<std::string> shard_names;

  ShardedFixture(const TempDir& dir, Rng& rng) : root(dir.path()), outside(dir.path() / "outside") {
    fs::create_directories(outside);
    shard_names = {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                   "sub/model-00003-of-00003.safetensors"};
    const std::vector<std::vector<std::string>> names = {
        {"model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv"},
        {"model.layers.0.mlp.gate.weight", "lm_head.weight"},
        {"model.norm.weight"}};
    ojson wm = ojson::object();
    for (size_t s = 0; s < shard_names.size(); ++s) {
      SafetensorsWriter w;
      for (const std::string& n : names[s]) {
        const DType dt = n.find("scale") != std::string::npos ? DType::F32 : (s == 0 ? DType::F8_E4M3 : DType::BF16);
        w.add(n, random_tensor(dt, {3, static_cast<int64_t>(1 + rng.below(9))}, rng));
        wm[n] = shard_names[s];
      }
      const std::string scratch = (dir.path() / ("shard" + std::to_string(s) + ".safetensors")).string();
      w.write(scratch);
      files[shard_names[s]] = read_file(scratch);
      fs::remove(scratch);
    }
    index = {{"metadata", {{"total_size", 1234}}}, {"weight_map", wm}};
    files["model.safetensors.index.json"] = index.dump(2);
    write_file((outside / "evil.safetensors").string(), files[shard_names[0]]);
  }

  // Writes `contents` (relative name -> bytes) into the new directory `ckpt`, with its "sub"
  // directory and a symlink "link" to the outside directory.
  void lay_out(const fs::path& ckpt, const std::map<std::string, std::string>& contents) const {
    fs::create_directories(ckpt / "sub");
    fs::create_directory_symlink(outside, ckpt / "link");
    for (const auto& [name, bytes] : contents) write_file((ckpt / name).string(), bytes);
  }
};

// The files of a mutated copy of the checkpoint that will live at `ckpt` (a missing file is absent
// from the map); `what` describes the mutation.
std::map<std::string, std::string> mutate_checkpoint(const ShardedFixture& fx, const fs::path& ckpt, Rng& rng,
                                                     std::string& what) {
  std::map<std::string, std::string> out = fx.files;
  const std::string kIndex = "model.safetensors.index.json";
  std::vector<std::string> names;
  for (auto it = fx.index["weight_map"].begin(); it != fx.index["weight_map"].end(); ++it) names.push_back(it.key());
  switch (rng.below(6)) {
    case 0:
    case 1: {  // a weight_map value replaced by a hostile spelling
      ojson idx = fx.index;
      const std::string& name = rng.pick(names);
      const std::vector<ojson> spellings = {
          fx.shard_names[0], fx.shard_names[1], fx.shard_names[2], "./" + fx.shard_names[0], "", ".", "..", "sub",
          "sub/", "../outside/evil.safetensors", "link/evil.safetensors", (fx.outside / "evil.safetensors").string(),
          (ckpt / fx.shard_names[0]).string(), "sub/../" + fx.shard_names[0], fx.shard_names[0] + "/",
          "missing.safetensors", kIndex, "/dev/zero", 3, nullptr, ojson::array(), ojson::object()};
      idx["weight_map"][name] = rng.pick(spellings);
      out[kIndex] = idx.dump();
      what = "weight_map['" + name + "'] = " + idx["weight_map"][name].dump();
      break;
    }
    case 2: {  // entries removed, added, or the structure broken
      ojson idx = fx.index;
      switch (rng.below(6)) {
        case 0: idx["weight_map"].erase(rng.pick(names)), what = "an entry removed"; break;
        case 1: idx["weight_map"]["ghost.weight"] = rng.pick(fx.shard_names), what = "a ghost entry added"; break;
        case 2: idx["weight_map"] = hostile_value(rng), what = "weight_map = " + idx["weight_map"].dump(); break;
        case 3: idx["metadata"] = hostile_value(rng), what = "metadata = " + idx["metadata"].dump(); break;
        case 4: idx.erase("weight_map"), what = "weight_map removed"; break;
        default: idx = ojson::array({idx}), what = "index is an array"; break;
      }
      out[kIndex] = idx.dump();
      break;
    }
    case 3: {  // byte-level damage to the index text
      std::string& text = out[kIndex];
      const size_t at = rng.below(text.size());
      if (rng.coin()) {
        text[at] = "{}[]\":,\\0x"[rng.below(10)];
      } else {
        text.resize(at);
      }
      what = "index text damaged at byte " + std::to_string(at);
      break;
    }
    case 4: {  // one shard mutated like a single file
      const std::string& shard = rng.pick(fx.shard_names);
      std::string how;
      out[shard] = mutate(fx.files.at(shard), rng, how);
      what = "shard " + shard + ": " + how;
      break;
    }
    default: {  // no index: the unindexed directory with a mutated top-level shard
      out.erase(kIndex);
      const std::string& shard = fx.shard_names[rng.below(2)];
      std::string how;
      out[shard] = mutate(fx.files.at(shard), rng, how);
      what = "no index, shard " + shard + ": " + how;
      break;
    }
  }
  return out;
}

// Every tensor of an accepted store lies in a file inside the checkpoint directory, and its view
// reads back that file's bytes at the entry's offsets, with exact strides.
void expect_store_sound(const TensorStore& st, const fs::path& ckpt, const std::string& what) {
  const fs::path root = fs::canonical(ckpt);
  for (const std::string& name : st.names()) {
    const SafetensorsFile& f = st.file_of(name);
    const fs::path parent = fs::canonical(fs::path(f.path()).parent_path());
    EXPECT_EQ(parent.string().rfind(root.string(), 0), 0u) << what << ": tensor " << name << " read from " << f.path();
    const std::string image = read_file(f.path());
    const SafetensorsEntry& e = st.entry(name);
    const uint64_t data_start = 8 + header_len(image);
    ASSERT_LE(data_start + e.end, image.size()) << what << ": tensor " << name;
    const TensorView v = st.view(name);
    expect_exact_strides(v, what + ": tensor " + name);
    if (dtype_bits(e.dtype) % 8 == 0 && v.nbytes() > 0)
      ASSERT_EQ(std::memcmp(v.data, image.data() + data_start + e.begin, static_cast<size_t>(v.nbytes())), 0)
          << what << ": tensor " << name;
  }
}

TEST(SafetensorsFuzz, MutatedShardedCheckpointsOpenCleanlyOrThrowError) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::printf("SafetensorsFuzz store seed %llu\n", static_cast<unsigned long long>(seed));
  Rng rng(seed);
  TempDir dir;
  const ShardedFixture fx(dir, rng);
  {
    const fs::path ckpt = dir.path() / "pristine";
    fx.lay_out(ckpt, fx.files);
    const TensorStore st = TensorStore::open(ckpt.string());
    EXPECT_EQ(st.names().size(), 5u);
    expect_store_sound(st, ckpt, "pristine checkpoint");
  }

  Tally t;
  const auto start = Clock::now();
  for (int i = 0; t.more(kStoreIters, kStoreMinIters, start, kStoreBudget); ++i) {
    const fs::path ckpt = dir.path() / ("ckpt" + std::to_string(i));
    std::string how;
    fx.lay_out(ckpt, mutate_checkpoint(fx, ckpt, rng, how));
    const std::string what = "iteration " + std::to_string(i) + ": " + how;
    try {
      const TensorStore st = TensorStore::open(ckpt.string());
      ++t.accepted;
      expect_store_sound(st, ckpt, what);
    } catch (const Error&) {
      ++t.rejected;
    } catch (const std::exception& e) {
      ADD_FAILURE() << what << ": threw a non-fp8moe exception: " << e.what();
    } catch (...) {
      ADD_FAILURE() << what << ": threw a non-exception object";
    }
    fs::remove_all(ckpt);
    ++t.iterations;
    if (::testing::Test::HasFatalFailure()) return;
  }
  std::printf("SafetensorsFuzz stores: %d mutants, %d accepted, %d rejected\n", t.iterations, t.accepted, t.rejected);
  EXPECT_GE(t.iterations, kStoreMinIters);
  EXPECT_GT(t.accepted, 0);
  EXPECT_GT(t.rejected, 0);
}

}  // namespace
}  // namespace fp8moe
