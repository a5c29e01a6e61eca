// libFuzzer target: the safetensors header and file parser (SafetensorsFile::open), on any bytes.
//
// Properties of an accepted file:
//  - every tensor lies inside the file and its view reads exactly the bytes the input holds at
//    8 + N + begin (N: the header length), nbytes() matching end - begin for byte-sized dtypes;
//  - written back by SafetensorsWriter (byte-sized dtypes), the file reopens with the same names,
//    dtypes, shapes, bytes and metadata.
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "fp8moe/error.hpp"
#include "fp8moe/safetensors.hpp"
#include "fuzz_util.hpp"

namespace fp8moe::fuzz {
namespace {

void check_round_trip(const SafetensorsFile& f) {
  SafetensorsWriter w;
  for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
  for (const std::string& name : f.names()) w.add(name, f.view(name));
  const std::string again = (scratch_dir() / "again.safetensors").string();
  w.write(again);
  const auto g = SafetensorsFile::open(again);
  if (g->names().size() != f.names().size() || g->metadata() != f.metadata())
    fuzz_fail("round trip: names or metadata differ");
  for (const std::string& name : f.names()) {
    const SafetensorsEntry &a = f.entry(name), &b = g->entry(name);
    if (a.dtype != b.dtype || a.shape != b.shape || a.end - a.begin != b.end - b.begin)
      fuzz_fail("round trip: tensor '" + name + "' changed");
    if (std::memcmp(f.view(name).data, g->view(name).data, a.end - a.begin) != 0)
      fuzz_fail("round trip: tensor '" + name + "' reads other bytes");
  }
}

}  // namespace
}  // namespace fp8moe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fp8moe;
  using namespace fp8moe::fuzz;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::string path = (scratch_dir() / "input.safetensors").string();
  write_file(path, input);
  std::shared_ptr<SafetensorsFile> f;
  try {
    f = SafetensorsFile::open(path);
  } catch (const Error&) {
    return 0;  // refused by name: what a hostile file should get
  }
  uint64_t n;
  std::memcpy(&n, data, 8);  // an accepted file has its 8-byte length prefix
  bool byte_sized = true;
  for (const std::string& name : f->names()) {
    const SafetensorsEntry& e = f->entry(name);
    if (e.end > f->file_size() - 8 - n || e.begin > e.end) fuzz_fail("tensor '" + name + "' lies outside the file");
    const TensorView v = f->view(name);
    const size_t bytes = e.end - e.begin;
    if (bytes && std::memcmp(v.data, data + 8 + n + e.begin, bytes) != 0)
      fuzz_fail("tensor '" + name + "' does not view the bytes at its data_offsets");
    if (dtype_bits(e.dtype) % 8 != 0) {
      byte_sized = false;
      continue;
    }
    if (v.nbytes() != static_cast<int64_t>(bytes)) fuzz_fail("tensor '" + name + "': nbytes differs from its extent");
  }
  if (byte_sized) {
    try {
      check_round_trip(*f);
    } catch (const Error& e) {
      fuzz_fail(std::string("round trip of an accepted file refused: ") + e.what());
    }
  }
  return 0;
}
