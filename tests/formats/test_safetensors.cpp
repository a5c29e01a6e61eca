// safetensors reader, writer and TensorStore: round trips, every rejection rule of formats.md
// section 1 (each proven by its message), unusual valid files, sharded checkpoints, and a
// cross-check in both directions with the reference implementation (PyPI safetensors).
#include "fp8moe/safetensors.hpp"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "formats/safetensors_test_util.hpp"
#include "test_support.hpp"

using fp8moe::test::expect_error;

namespace fp8moe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testing::le64;
using testing::read_file;
using testing::st_image;
using testing::TempDir;
using testing::write_file;

std::string bytes_of(const TensorView& v, uint64_t nbytes) {
  return {static_cast<const char*>(v.data), static_cast<size_t>(nbytes)};
}

std::string to_hex(const std::string& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) out += {digits[c >> 4], digits[c & 15]};
  return out;
}

std::vector<DType> byte_sized_dtypes() {
  std::vector<DType> out;
  for (int i = 0; i <= static_cast<int>(DType::F6_E3M2); ++i)
    if (dtype_bits(static_cast<DType>(i)) % 8 == 0) out.push_back(static_cast<DType>(i));
  return out;
}

// Random bytes with no all-zero tensor (a zeroed buffer must not pass for a correct read).
std::string random_bytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  if (n) s[0] = static_cast<char>(s[0] | 1);
  return s;
}

// ---------------------------------------------------------------- writer round trips

TEST(SafetensorsWriter, RoundTripsEveryByteSizedDtype) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  TempDir dir;

  struct Expected {
    std::string name;
    DType dtype;
    Shape shape;
    std::string bytes;
  };
  std::vector<Expected> expected;
  SafetensorsWriter w;
  int k = 0;
  for (DType t : byte_sized_dtypes()) {
    // One random-shaped tensor per dtype, plus a scalar and an empty tensor for some of them.
    std::vector<Shape> shapes{Shape(std::vector<int64_t>{static_cast<int64_t>(1 + rng() % 7),
                                                           static_cast<int64_t>(1 + rng() % 5)})};
    if (k % 3 == 0) shapes.push_back(Shape{});
    if (k % 4 == 1) shapes.push_back(Shape{3, 0, 2});
    for (const Shape& s : shapes) {
      const std::string name = "t" + std::to_string(k++) + "." + std::string(dtype_name(t));
      std::string bytes = random_bytes(rng, static_cast<size_t>(s.numel() * dtype_size(t)));
      w.add(name, TensorView(bytes.data(), t, s));
      expected.push_back({name, t, s, bytes});
    }
  }
  w.set_metadata("format", "pt");
  w.set_metadata("note", "gr\xc3\xbc\xc3\x9f" "e");
  w.write(dir.file("rt.safetensors"));
  EXPECT_FALSE(fs::exists(dir.file("rt.safetensors.tmp")));

  const auto f = SafetensorsFile::open(dir.file("rt.safetensors"));
  ASSERT_EQ(f->names().size(), expected.size());
  uint64_t n;
  std::memcpy(&n, read_file(f->path()).data(), 8);
  EXPECT_EQ(n % 8, 0u) << "header must be padded to a multiple of 8";
  uint64_t offset = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const Expected& e = expected[i];
    SCOPED_TRACE(e.name);
    EXPECT_EQ(f->names()[i], e.name) << "insertion order";
    const SafetensorsEntry& entry = f->entry(e.name);
    EXPECT_EQ(entry.dtype, e.dtype);
    EXPECT_EQ(entry.shape, e.shape);
    EXPECT_EQ(entry.begin, offset) << "dense packing";
    offset = entry.end;
    const TensorView v = f->view(e.name);
    EXPECT_EQ(v.shape, e.shape);
    EXPECT_EQ(bytes_of(v, e.bytes.size()), e.bytes);
  }
  EXPECT_EQ(f->file_size(), 8 + n + offset);
  EXPECT_EQ(f->metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"note", "gr\xc3\xbc\xc3\x9f" "e"}}));
}

TEST(SafetensorsWriter, WritesMetadataOnlyWhenSet) {
  TempDir dir;
  const float x[2] = {1.5f, -2.25f};
  SafetensorsWriter w;
  w.add("x", TensorView(const_cast<float*>(x), DType::F32, {2}));
  w.write(dir.file("a.safetensors"));
  const std::string image = read_file(dir.file("a.safetensors"));
  uint64_t n;
  std::memcpy(&n, image.data(), 8);
  const json header = json::parse(image.substr(8, n));
  EXPECT_FALSE(header.contains("__metadata__"));
  EXPECT_EQ(header["x"]["data_offsets"], json::array({0, 8}));
  EXPECT_TRUE(SafetensorsFile::open(dir.file("a.safetensors"))->metadata().empty());
}

TEST(SafetensorsWriter, CopiesAtAddTime) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  TempDir dir;
  std::string buf = random_bytes(rng, 24);
  const std::string original = buf;
  SafetensorsWriter w;
  w.add("w", TensorView(buf.data(), DType::BF16, {3, 4}));
  buf.assign(buf.size(), '\x7f');  // the caller reuses its buffer before write()
  w.write(dir.file("c.safetensors"));
  const auto f = SafetensorsFile::open(dir.file("c.safetensors"));
  EXPECT_EQ(bytes_of(f->view("w"), 24), original);
}

TEST(SafetensorsWriter, ReplacesAnExistingFile) {
  TempDir dir;
  write_file(dir.file("o.safetensors"), "old content that is not safetensors");
  const int32_t v = 7;
  SafetensorsWriter w;
  w.add("v", TensorView(const_cast<int32_t*>(&v), DType::I32, Shape{}));
  w.write(dir.file("o.safetensors"));
  const auto f = SafetensorsFile::open(dir.file("o.safetensors"));
  EXPECT_EQ(load_as_double(f->view("v").data, DType::I32, 0), 7.0);
  EXPECT_FALSE(fs::exists(dir.file("o.safetensors.tmp")));
}

TEST(SafetensorsWriter, RejectsBadInput) {
  TempDir dir;
  float x[6] = {1, 2, 3, 4, 5, 6};
  SafetensorsWriter w;
  w.add("a", TensorView(x, DType::F32, {2, 3}));
  expect_error([&] { w.add("a", TensorView(x, DType::F32, {6})); }, {"'a'", "duplicate name"});
  expect_error([&] { w.add("__metadata__", TensorView(x, DType::F32, {6})); }, {"reserved"});
  TensorView strided(x, DType::F32, {2, 3});
  std::swap(strided.shape[0], strided.shape[1]);  // a transpose: [3, 2] with strides [1, 3]
  std::swap(strided.strides[0], strided.strides[1]);
  expect_error([&] { w.add("t", strided); }, {"'t'", "contiguous"});
  expect_error([&] { w.add("f4", TensorView(x, DType::F4, {4})); }, {"'f4'", "sub-byte"});
  expect_error([&] { w.add("bad\xff", TensorView(x, DType::F32, {1})); }, {"UTF-8"});
  expect_error([&] { w.add("cuda", TensorView(x, DType::F32, {1}, Device::CUDA)); }, {"'cuda'", "host"});
  const std::string target = (dir.path() / "no-such-dir" / "x.safetensors").string();
  expect_error([&] { w.write(target); }, {target + ".tmp", "cannot create"});
  EXPECT_FALSE(fs::exists(target));
}

// ---------------------------------------------------------------- malformed files

struct Malformed {
  const char* name;
  std::string image;    // the whole file
  const char* message;  // a substring proving the right rule fired
};

// An entry body for hand-written headers.
std::string ent(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

std::vector<Malformed> malformed_cases() {
  const std::string d16(16, '\x11');
  const std::string f32x4 = ent("F32", "[4]", "[0,16]");
  std::string deep = "[";
  for (int i = 0; i < 200; ++i) deep += "[";
  deep += std::string(201, ']');
  return {
      // rule 1
      {"Empty", "", "shorter than 8 bytes"},
      {"SevenBytes", std::string("\x02\0\0\0\0\0\0", 7), "shorter than 8 bytes"},
      // rule 2
      {"HeaderLengthOverLimit", le64(100'000'001) + "{}", "exceeds the limit of 100000000"},
      {"HeaderLengthMaxU64", le64(std::numeric_limits<uint64_t>::max()) + "{}", "exceeds the limit"},
      // rule 3
      {"HeaderPastEndOfFile", le64(64) + R"({"a":)", "header runs past the end of the file"},
      // rule 4
      {"Utf8InvalidByte", st_image("{\"a\xff\":" + f32x4 + "}", d16), "not valid UTF-8"},
      {"Utf8Overlong", st_image("{\"a\xc0\xaf\":" + f32x4 + "}", d16), "not valid UTF-8"},
      {"Utf8Surrogate", st_image("{\"a\xed\xa0\x80\":" + f32x4 + "}", d16), "not valid UTF-8"},
      {"Utf8AboveMaxCodePoint", st_image("{\"a\xf4\x90\x80\x80\":" + f32x4 + "}", d16), "not valid UTF-8"},
      {"Utf8TruncatedAtEnd", st_image("{} \xe2\x82"), "ill-formed sequence at header byte 3"},
      // rule 5: JSON syntax and schema
      {"InvalidJson", st_image(R"({"a":{"dtype":"F32",)"), "invalid JSON"},
      {"TrailingJsonGarbage", st_image("{} {}"), "invalid JSON"},
      {"HeaderNotObject", st_image("[]"), "header must be a JSON object, found JSON array"},
      {"UnknownDtype", st_image(R"({"a":)" + ent("F128", "[4]", "[0,16]") + "}", d16), "unknown dtype \"F128\""},
      {"LowercaseDtype", st_image(R"({"a":)" + ent("f32", "[4]", "[0,16]") + "}", d16), "unknown dtype \"f32\""},
      {"DtypeNotString", st_image(R"({"a":{"dtype":7,"shape":[4],"data_offsets":[0,16]}})", d16),
       "dtype must be a string, found JSON number"},
      {"MetadataValueNotString", st_image(R"({"__metadata__":{"k":1},"a":)" + f32x4 + "}", d16),
       "__metadata__ value of \"k\" must be a string"},
      {"MetadataNotObject", st_image(R"({"__metadata__":"x","a":)" + f32x4 + "}", d16),
       "__metadata__ must be an object"},
      {"MetadataNull", st_image(R"({"__metadata__":null,"a":)" + f32x4 + "}", d16), "__metadata__ must be an object"},
      {"ShapeNegative", st_image(R"({"a":)" + ent("F32", "[-4]", "[0,16]") + "}", d16),
       "shape[0] must be a non-negative integer, found -4"},
      {"ShapeFractional", st_image(R"({"a":)" + ent("F32", "[2,1.5]", "[0,16]") + "}", d16),
       "shape[1] must be a non-negative integer, found 1.5"},
      {"ShapeIntegralFloat", st_image(R"({"a":)" + ent("F32", "[4.0]", "[0,16]") + "}", d16),
       "shape[0] must be a non-negative integer, found 4.0"},
      {"ShapeExponent", st_image(R"({"a":)" + ent("F32", "[4e0]", "[0,16]") + "}", d16),
       "shape[0] must be a non-negative integer"},
      {"ShapeBeyondU64", st_image(R"({"a":)" + ent("F32", "[18446744073709551616]", "[0,16]") + "}", d16),
       "shape[0] must be a non-negative integer"},
      {"ShapeString", st_image(R"({"a":)" + ent("F32", R"(["4"])", "[0,16]") + "}", d16),
       "shape[0] must be a non-negative integer, found \"4\""},
      {"ShapeNotArray", st_image(R"({"a":)" + ent("F32", "4", "[0,16]") + "}", d16),
       "shape must be an array, found JSON number"},
      {"OffsetNegative", st_image(R"({"a":)" + ent("F32", "[4]", "[-16,0]") + "}", d16),
       "data_offsets[0] must be a non-negative integer, found -16"},
      {"OffsetFractional", st_image(R"({"a":)" + ent("F32", "[4]", "[0,16.5]") + "}", d16),
       "data_offsets[1] must be a non-negative integer, found 16.5"},
      {"OffsetsThreeEntries", st_image(R"({"a":)" + ent("F32", "[4]", "[0,16,16]") + "}", d16),
       "data_offsets must have exactly 2 entries [begin, end], found 3"},
      {"OffsetsOneEntry", st_image(R"({"a":)" + ent("F32", "[4]", "[16]") + "}", d16),
       "data_offsets must have exactly 2 entries [begin, end], found 1"},
      {"OffsetsNotArray", st_image(R"({"a":)" + ent("F32", "[4]", R"({"begin":0})") + "}", d16),
       "data_offsets must be an array, found JSON object"},
      {"MissingDtype", st_image(R"({"a":{"shape":[4],"data_offsets":[0,16]}})", d16), "missing field \"dtype\""},
      {"MissingShape", st_image(R"({"a":{"dtype":"F32","data_offsets":[0,16]}})", d16), "missing field \"shape\""},
      {"MissingOffsets", st_image(R"({"a":{"dtype":"F32","shape":[4]}})", d16), "missing field \"data_offsets\""},
      {"EntryNotObject", st_image(R"({"a":[0,16]})", d16), "tensor 'a': expected an object"},
      {"DuplicateTensorName", st_image(R"({"a":)" + ent("F32", "[2]", "[0,8]") + R"(,"a":)" + ent("F32", "[2]", "[8,16]") + "}", d16),
       "duplicate tensor name 'a'"},
      {"DuplicateFieldInEntry", st_image(R"({"a":{"dtype":"F32","dtype":"I32","shape":[4],"data_offsets":[0,16]}})", d16),
       "duplicate key 'dtype'"},
      {"NestedTooDeep", st_image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16],"x":)" + deep + "}}", d16),
       "nested deeper than 128"},
      // rule 6: tiling
      {"GapAtStart", st_image(R"({"a":)" + ent("F32", "[3]", "[4,16]") + "}", d16),
       "tensor 'a': gap in the data buffer: data_offsets begin is 4 but the data buffer starts at 0"},
      {"GapBetween", st_image(R"({"a":)" + ent("F32", "[1]", "[0,4]") + R"(,"b":)" + ent("F32", "[2]", "[8,16]") + "}", d16),
       "tensor 'b': gap in the data buffer: data_offsets begin is 8 but the previous tensor 'a' ends at 4"},
      {"Overlap", st_image(R"({"a":)" + ent("F32", "[3]", "[0,12]") + R"(,"b":)" + ent("F32", "[2]", "[8,16]") + "}", d16),
       "tensor 'b': overlap in the data buffer: data_offsets begin is 8 but the previous tensor 'a' ends at 12"},
      {"SameRangeTwice", st_image(R"({"a":)" + ent("F32", "[4]", "[0,16]") + R"(,"b":)" + ent("F32", "[4]", "[0,16]") + "}", d16),
       "overlap in the data buffer"},
      {"EndBeforeBegin", st_image(R"({"a":)" + ent("F32", "[2]", "[0,8]") + R"(,"b":)" + ent("F32", "[0]", "[8,4]") + "}", d16),
       "tensor 'b': data_offsets end 4 is before begin 8"},
      // rule 7
      {"NumelOverflow", st_image(R"({"a":)" + ent("U8", "[4294967296,4294967296]", "[0,16]") + "}", d16),
       "element count x bits overflows 64 bits"},
      {"NumelTimesBitsOverflow", st_image(R"({"a":)" + ent("F32", "[1152921504606846976]", "[0,16]") + "}", d16),
       "element count x bits overflows 64 bits"},
      // rule 8
      {"SubByteNotWholeBytes", st_image(R"({"a":)" + ent("F4", "[3]", "[0,2]") + "}", std::string(2, '\1')),
       "holds 12 bits, not a multiple of 8"},
      // rule 9
      {"SizeMismatch", st_image(R"({"a":)" + ent("F32", "[3]", "[0,16]") + "}", d16),
       "data_offsets span 16 bytes, expected 12"},
      // rule 10
      {"TruncatedData", st_image(R"({"a":)" + f32x4 + "}", d16.substr(0, 12)),
       "file is truncated: tensors end at data byte 16"},
      {"TrailingBytes", st_image(R"({"a":)" + f32x4 + "}", d16 + "x"), "1 trailing bytes after the last tensor"},
      {"ZeroTensorsWithData", st_image(R"({"__metadata__":{}})", "abcd"), "4 trailing bytes after the last tensor"},
      // this library's Shape holds rank <= 6
      {"RankAboveSupported", st_image(R"({"a":)" + ent("U8", "[1,1,1,1,1,1,2]", "[0,2]") + "}", "ab"),
       "rank 7 exceeds the maximum rank 6"},
  };
}

// gtest prints a failing case by this, not by its bytes.
void PrintTo(const Malformed& m, std::ostream* os) { *os << m.name; }

class SafetensorsMalformed : public ::testing::TestWithParam<Malformed> {};

TEST_P(SafetensorsMalformed, IsRejectedByTheRightRule) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  write_file(path, GetParam().image);
  expect_error([&] { SafetensorsFile::open(path); }, {"safetensors file '" + path + "'", GetParam().message});
}

INSTANTIATE_TEST_SUITE_P(Rules, SafetensorsMalformed, ::testing::ValuesIn(malformed_cases()),
                         [](const ::testing::TestParamInfo<Malformed>& i) { return std::string(i.param.name); });

TEST(SafetensorsReader, RejectsMissingAndNonRegularFiles) {
  TempDir dir;
  expect_error([&] { SafetensorsFile::open(dir.file("absent.safetensors")); },
               {dir.file("absent.safetensors"), "cannot open"});
  expect_error([&] { SafetensorsFile::open(dir.path().string()); }, {dir.path().string(), "expected a regular file"});
}

// ---------------------------------------------------------------- unusual valid files

TEST(SafetensorsReader, ReadsUnalignedTensors) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  // A 3-byte U8 tensor first, so the F32 and F64 ones start at odd offsets; N = 6 (mod 8), so
  // the data buffer itself is misaligned too and the F32 view lands at 1 (mod 4).
  float f[4];
  double g;
  for (float& x : f) x = normal(rng);
  g = normal(rng);
  const std::string u8 = random_bytes(rng, 3);
  std::string data = u8 + std::string(reinterpret_cast<const char*>(f), 16) + std::string(reinterpret_cast<const char*>(&g), 8);
  const std::string header = "{\"u\":" + ent("U8", "[3]", "[0,3]") + ",\"f\":" + ent("F32", "[2,2]", "[3,19]") +
                             ",\"g\":" + ent("F64", "[]", "[19,27]") + "}";
  TempDir dir;
  write_file(dir.file("u.safetensors"), st_image(header + std::string(14 - header.size() % 8, ' '), data));

  const auto file = SafetensorsFile::open(dir.file("u.safetensors"));
  EXPECT_EQ(file->names(), (std::vector<std::string>{"u", "f", "g"}));
  const TensorView fv = file->view("f");
  EXPECT_NE(reinterpret_cast<uintptr_t>(fv.data) % 4, 0u) << "the test wants a misaligned F32 view";
  EXPECT_EQ(fv.shape, (Shape{2, 2}));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(load_as_double(fv.data, DType::F32, i), f[i]);
  const TensorView gv = file->view("g");
  EXPECT_EQ(gv.rank(), 0);
  EXPECT_EQ(gv.numel(), 1);
  EXPECT_EQ(load_as_double(gv.data, DType::F64, 0), g);
  EXPECT_EQ(bytes_of(file->view("u"), 3), u8);
}

TEST(SafetensorsReader, AcceptsWhitespaceReorderedKeysAndExtraFields) {
  TempDir dir;
  const uint16_t bf[2] = {0x3f80, 0xc040};  // 1.0, -3.0
  const std::string header = " \n\t{ \"w\" : {\"data_offsets\":[0,4], \"x-extra\": {\"nested\": [1, {\"k\": null}]},"
                             " \"shape\": [2], \"dtype\": \"BF16\", \"note\": \"ignored\"} }\r\n   ";
  write_file(dir.file("w.safetensors"), st_image(header, std::string(reinterpret_cast<const char*>(bf), 4)));
  const auto f = SafetensorsFile::open(dir.file("w.safetensors"));
  ASSERT_TRUE(f->contains("w"));
  EXPECT_EQ(f->entry("w").dtype, DType::BF16);
  EXPECT_EQ(load_as_double(f->view("w").data, DType::BF16, 0), 1.0);
  EXPECT_EQ(load_as_double(f->view("w").data, DType::BF16, 1), -3.0);
}

TEST(SafetensorsReader, AcceptsScalarsAndEmptyTensorsAnywhere) {
  TempDir dir;
  const int64_t s = -123456789012345;
  const std::string header = "{\"e0\":" + ent("F32", "[0]", "[0,0]") + ",\"s\":" + ent("I64", "[]", "[0,8]") +
                             ",\"e1\":" + ent("BF16", "[4,0,3]", "[8,8]") + ",\"e2\":" + ent("U8", "[0]", "[8,8]") +
                             ",\"b\":" + ent("BOOL", "[1]", "[8,9]") + ",\"e3\":" + ent("F8_E4M3", "[0,2]", "[9,9]") + "}";
  write_file(dir.file("s.safetensors"), st_image(header, std::string(reinterpret_cast<const char*>(&s), 8) + "\1"));
  const auto f = SafetensorsFile::open(dir.file("s.safetensors"));
  EXPECT_EQ(f->names().size(), 6u);
  EXPECT_EQ(f->names().front(), "e0");
  EXPECT_EQ(f->names().back(), "e3");
  int64_t got;
  std::memcpy(&got, f->view("s").data, 8);
  EXPECT_EQ(got, s);
  EXPECT_EQ(f->view("e1").shape, (Shape{4, 0, 3}));
  EXPECT_EQ(f->view("e1").numel(), 0);
  EXPECT_EQ(f->entry("e3").begin, f->entry("e3").end);
}

TEST(SafetensorsReader, AcceptsFilesWithoutTensors) {
  TempDir dir;
  write_file(dir.file("z.safetensors"), st_image("{}"));
  const auto z = SafetensorsFile::open(dir.file("z.safetensors"));
  EXPECT_TRUE(z->names().empty());
  EXPECT_TRUE(z->metadata().empty());
  write_file(dir.file("m.safetensors"), st_image(R"({"__metadata__":{"a":"b","c":""}})"));
  const auto m = SafetensorsFile::open(dir.file("m.safetensors"));
  EXPECT_TRUE(m->names().empty());
  EXPECT_EQ(m->metadata(), (std::map<std::string, std::string>{{"a", "b"}, {"c", ""}}));
  SafetensorsWriter().write(dir.file("w.safetensors"));
  EXPECT_TRUE(SafetensorsFile::open(dir.file("w.safetensors"))->names().empty());
}

TEST(SafetensorsReader, ListsNamesInOffsetOrderAndExposesSubByteViews) {
  TempDir dir;
  const std::string header = "{\"late\":" + ent("U8", "[2]", "[2,4]") + ",\"early\":" + ent("F4", "[2,2]", "[0,2]") + "}";
  write_file(dir.file("o.safetensors"), st_image(header, "\x12\x34\x56\x78"));
  const auto f = SafetensorsFile::open(dir.file("o.safetensors"));
  EXPECT_EQ(f->names(), (std::vector<std::string>{"early", "late"}));
  const TensorView v = f->view("early");
  EXPECT_EQ(v.dtype, DType::F4);
  EXPECT_EQ(v.shape, (Shape{2, 2}));
  EXPECT_EQ(*static_cast<const unsigned char*>(v.data), 0x12);
  EXPECT_THROW(v.nbytes(), Error) << "sub-byte views have no element size";
  expect_error([&] { f->view("absent"); }, {"o.safetensors", "no tensor named 'absent'"});
}

// ---------------------------------------------------------------- TensorStore

// Writes a file holding one small random F32 tensor per name and returns name -> bytes.
std::map<std::string, std::string> write_shard(const std::string& path, std::initializer_list<const char*> names,
                                               std::mt19937_64& rng) {
  std::map<std::string, std::string> out;
  SafetensorsWriter w;
  for (const char* name : names) {
    std::string bytes = random_bytes(rng, 4 * (1 + rng() % 6));
    w.add(name, TensorView(bytes.data(), DType::F32, {static_cast<int64_t>(bytes.size() / 4)}));
    out[name] = bytes;
  }
  w.write(path);
  return out;
}

void write_index(const fs::path& dir, const json& weight_map) {
  write_file((dir / "model.safetensors.index.json").string(),
             json{{"metadata", {{"total_size", 1234}}}, {"weight_map", weight_map}}.dump(2));
}

class TensorStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    ckpt_ = dir_.path() / "ckpt";
    fs::create_directory(ckpt_);
  }
  std::string shard(const std::string& name) const { return (ckpt_ / name).string(); }
  std::string index() const { return (ckpt_ / "model.safetensors.index.json").string(); }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  TempDir dir_;
  fs::path ckpt_;  // the checkpoint directory, inside dir_ so that files can sit "outside" it
};

TEST_F(TensorStoreTest, OpensAShardedCheckpoint) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  auto bytes = write_shard(shard("model-00001-of-00002.safetensors"), {"a", "b"}, rng_);
  bytes.merge(write_shard(shard("model-00002-of-00002.safetensors"), {"c"}, rng_));
  write_shard(shard("stale-unlisted.safetensors"), {"a", "z"}, rng_);  // not in the map: ignored
  fs::create_directory(ckpt_ / "sub");
  bytes.merge(write_shard((ckpt_ / "sub" / "d.safetensors").string(), {"d"}, rng_));
  fs::create_symlink(ckpt_ / "sub" / "d.safetensors", ckpt_ / "link.safetensors");  // stays inside
  write_index(ckpt_, {{"a", "model-00001-of-00002.safetensors"},
                      {"b", "./model-00001-of-00002.safetensors"},  // same file, other spelling
                      {"c", "model-00002-of-00002.safetensors"},
                      {"d", "link.safetensors"}});

  const TensorStore store = TensorStore::open(ckpt_.string());
  EXPECT_EQ(store.root(), fs::canonical(ckpt_).string());
  EXPECT_EQ(store.names(), (std::vector<std::string>{"a", "b", "c", "d"}));
  EXPECT_EQ(store.files().size(), 3u);
  EXPECT_FALSE(store.contains("z"));
  EXPECT_EQ(fs::path(store.file_of("b").path()).filename(), "model-00001-of-00002.safetensors");
  for (const auto& [name, b] : bytes) {
    EXPECT_EQ(store.entry(name).dtype, DType::F32);
    EXPECT_EQ(bytes_of(store.view(name), b.size()), b) << name;
  }
  expect_error([&] { store.view("z"); }, {store.root(), "no tensor named 'z'"});
}

TEST_F(TensorStoreTest, OpensASingleFileAndAnUnindexedDirectory) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  auto bytes = write_shard(shard("one.safetensors"), {"x", "y"}, rng_);
  bytes.merge(write_shard(shard("two.safetensors"), {"w"}, rng_));
  write_file(shard("notes.txt"), "not a tensor file");

  const TensorStore single = TensorStore::open(shard("one.safetensors"));
  EXPECT_EQ(single.root(), fs::canonical(ckpt_).string());
  EXPECT_EQ(single.names(), (std::vector<std::string>{"x", "y"}));

  const TensorStore dir = TensorStore::open(ckpt_.string());
  EXPECT_EQ(dir.names(), (std::vector<std::string>{"w", "x", "y"}));
  for (const auto& [name, b] : bytes) EXPECT_EQ(bytes_of(dir.view(name), b.size()), b) << name;
}

TEST_F(TensorStoreTest, RejectsANameInTwoFilesWithoutIndex) {
  write_shard(shard("one.safetensors"), {"x", "y"}, rng_);
  write_shard(shard("two.safetensors"), {"y"}, rng_);
  expect_error([&] { TensorStore::open(ckpt_.string()); },
               {"tensor 'y' is in two files", "one.safetensors", "two.safetensors"});
}

TEST_F(TensorStoreTest, RejectsAnEmptyDirectoryAndAMissingPath) {
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {ckpt_.string(), "neither model.safetensors.index.json"});
  expect_error([&] { TensorStore::open((ckpt_ / "nope").string()); }, {"nope", "no such file or directory"});
}

TEST_F(TensorStoreTest, RejectsAMappedNameMissingFromItsShard) {
  write_shard(shard("s1.safetensors"), {"a"}, rng_);
  write_index(ckpt_, {{"a", "s1.safetensors"}, {"ghost", "s1.safetensors"}});
  expect_error([&] { TensorStore::open(ckpt_.string()); },
               {index(), "maps tensor 'ghost' to shard 's1.safetensors', which does not contain it"});
}

TEST_F(TensorStoreTest, RejectsANameInTwoShards) {
  write_shard(shard("s1.safetensors"), {"a", "shared"}, rng_);
  write_shard(shard("s2.safetensors"), {"b", "shared"}, rng_);
  write_index(ckpt_, {{"a", "s1.safetensors"}, {"b", "s2.safetensors"}, {"shared", "s1.safetensors"}});
  expect_error([&] { TensorStore::open(ckpt_.string()); },
               {index(), "tensor 'shared' is in two shards: 's2.safetensors' and 's1.safetensors'"});
}

TEST_F(TensorStoreTest, RejectsAShardTensorAbsentFromTheWeightMap) {
  write_shard(shard("s1.safetensors"), {"a", "unlisted"}, rng_);
  write_index(ckpt_, {{"a", "s1.safetensors"}});
  expect_error([&] { TensorStore::open(ckpt_.string()); },
               {index(), "tensor 'unlisted' of shard 's1.safetensors' is absent from the weight_map"});
}

TEST_F(TensorStoreTest, RejectsShardPathsEscapingTheDirectory) {
  const std::string outside = (dir_.path() / "outside.safetensors").string();
  write_shard(outside, {"a"}, rng_);
  fs::create_directory(ckpt_ / "sub");

  write_index(ckpt_, {{"a", "../outside.safetensors"}});
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), "'../outside.safetensors'", "'..' component"});

  write_index(ckpt_, {{"a", "sub/../../outside.safetensors"}});
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), "'..' component"});

  write_index(ckpt_, {{"a", outside}});
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), outside, "absolute or empty path"});

  write_index(ckpt_, {{"a", ""}});
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), "absolute or empty path"});

  // A shard that is itself a symlink to a file elsewhere is how Hugging Face cache snapshots
  // look (snapshots/<rev>/x.safetensors -> ../../blobs/<sha>): accepted.
  fs::create_symlink(outside, ckpt_ / "blob_link.safetensors");
  write_index(ckpt_, {{"a", "blob_link.safetensors"}});
  EXPECT_TRUE(TensorStore::open(ckpt_.string()).contains("a"));

  fs::create_directory_symlink(dir_.path(), ckpt_ / "up");  // a directory link out of the checkpoint
  write_index(ckpt_, {{"a", "up/outside.safetensors"}});
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), "outside the checkpoint directory"});
}

TEST_F(TensorStoreTest, RejectsAMissingShardFile) {
  write_shard(shard("s1.safetensors"), {"a"}, rng_);
  write_index(ckpt_, {{"a", "s1.safetensors"}, {"b", "s2.safetensors"}});
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), "'s2.safetensors'", "does not exist"});
}

TEST_F(TensorStoreTest, RejectsMalformedIndexesAndShards) {
  write_shard(shard("s1.safetensors"), {"a"}, rng_);
  write_file(index(), R"({"metadata": {}})");
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), "missing \"weight_map\""});
  write_file(index(), R"({"weight_map": ["a"]})");
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), "\"weight_map\" must be an object"});
  write_file(index(), R"({"weight_map": {"a": 3}})");
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), "tensor 'a' must be a shard file name"});
  write_file(index(), R"({"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}})");
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), "duplicate key 'a'"});
  write_file(index(), R"({"weight_map": {"a": "s1.safetensors"})");
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {index(), "invalid JSON"});

  write_file(shard("s2.safetensors"), st_image("{}", "junk"));
  write_file(index(), R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  expect_error([&] { TensorStore::open(ckpt_.string()); }, {"s2.safetensors'", "4 trailing bytes"});
}

// ---------------------------------------------------------------- reference implementation

// Runs a shell command with its output captured into `log`; returns the exit status.
int run_logged(const std::string& command, const std::string& log) {
  const int status = std::system((command + " > '" + log + "' 2>&1").c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Checks a view's elements against a manifest's "values": floats through load_as_double (so
// fp8moe's BF16/F16/FP8 decoding is checked against Python's), integers bit-exactly.
void expect_values(const TensorView& v, const json& values, const std::string& name) {
  ASSERT_EQ(static_cast<int64_t>(values.size()), v.numel()) << name;
  const auto* p = static_cast<const unsigned char*>(v.data);
  auto load = [&](auto zero, int64_t i) {
    decltype(zero) x;
    std::memcpy(&x, p + i * static_cast<int64_t>(sizeof x), sizeof x);
    return json(x);
  };
  for (int64_t i = 0; i < v.numel(); ++i) {
    json got;
    switch (v.dtype) {
      case DType::BOOL: case DType::U8: got = load(uint8_t{}, i); break;
      case DType::I8: got = load(int8_t{}, i); break;
      case DType::I16: got = load(int16_t{}, i); break;
      case DType::U16: got = load(uint16_t{}, i); break;
      case DType::I32: got = load(int32_t{}, i); break;
      case DType::U32: got = load(uint32_t{}, i); break;
      case DType::I64: got = load(int64_t{}, i); break;
      case DType::U64: got = load(uint64_t{}, i); break;
      default: got = load_as_double(v.data, v.dtype, i);
    }
    ASSERT_EQ(got, values[i]) << name << "[" << i << "]";
  }
}

TEST(SafetensorsCrossCheck, AgreesWithTheReferenceImplementation) {
  const uint64_t seed = std::random_device{}() % 1'000'000'007;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  TempDir dir;
  const std::string script = FP8MOE_SOURCE_DIR "/tests/formats/safetensors_crosscheck.py";
  const std::string log = dir.file("log.txt");
  ASSERT_EQ(run_logged("python3 -c 'import numpy, safetensors'", log), 0)
      << "python3 with numpy and safetensors is required for this test: run scripts/setup.sh (CI installs "
         "them). Output:\n" << read_file(log);

  // Reference -> fp8moe: files written by the safetensors package, read through a TensorStore.
  fs::create_directory(dir.path() / "ref");
  ASSERT_EQ(run_logged("python3 '" + script + "' write '" + dir.file("ref") + "' " + std::to_string(seed), log), 0)
      << read_file(log);
  const json manifest = json::parse(read_file(dir.file("ref/manifest.json")));
  const TensorStore store = TensorStore::open(dir.file("ref"));
  EXPECT_EQ(store.names().size(), manifest["tensors"].size());
  for (const auto& [name, want] : manifest["tensors"].items()) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(store.contains(name));
    const SafetensorsEntry& e = store.entry(name);
    EXPECT_EQ(dtype_name(e.dtype), want["dtype"].get<std::string>());
    EXPECT_EQ(e.shape.vec(), want["shape"].get<std::vector<int64_t>>());
    EXPECT_EQ(fs::path(store.file_of(name).path()).filename(), want["file"].get<std::string>());
    EXPECT_EQ(to_hex(bytes_of(store.view(name), e.end - e.begin)), want["hex"].get<std::string>());
    if (want.contains("values") && !want["values"].is_null()) expect_values(store.view(name), want["values"], name);
  }
  for (const auto& [file, metadata] : manifest["files"].items())
    EXPECT_EQ(SafetensorsFile::open(dir.file("ref/" + file))->metadata(),
              (metadata.get<std::map<std::string, std::string>>())) << file;

  // fp8moe -> reference: a file from SafetensorsWriter, read by the package and compared with a
  // manifest. The U8 tensor of odd size first leaves every later tensor unaligned.
  json ours = {{"metadata", {{"writer", "fp8moe"}, {"seed", std::to_string(seed)}}}, {"tensors", json::object()}};
  SafetensorsWriter w;
  for (const auto& [k, v] : ours["metadata"].items()) w.set_metadata(k, v.get<std::string>());
  const std::vector<std::pair<DType, Shape>> cases = {
      {DType::U8, {3}},      {DType::F32, {2, 3}},   {DType::BF16, {4, 5}}, {DType::F8_E4M3, {2, 2, 2}},
      {DType::F8_E5M2, {5}}, {DType::F16, {3, 1}},   {DType::F64, {}},      {DType::I64, {2}},
      {DType::I32, {0, 3}},  {DType::BOOL, {4}},     {DType::U16, {3}},     {DType::C64, {1}},
      {DType::F8_E8M0, {2}}, {DType::F32, {}}};
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& [t, s] = cases[i];
    const std::string name = "fp8moe." + std::to_string(i) + "." + std::string(dtype_name(t));
    std::string bytes = random_bytes(rng, static_cast<size_t>(s.numel() * dtype_size(t)));
    if (t == DType::BOOL)
      for (char& c : bytes) c = static_cast<char>(c & 1);
    json tj = {{"dtype", std::string(dtype_name(t))}, {"shape", s.vec()}, {"hex", to_hex(bytes)}};
    if (t == DType::F32 || t == DType::F64) {  // random bits may be NaN, which JSON cannot hold
      json values = json::array();
      for (int64_t j = 0; j < s.numel(); ++j) {
        const double x = load_as_double(bytes.data(), t, j);
        if (!std::isfinite(x)) break;
        values.push_back(x);
      }
      if (static_cast<int64_t>(values.size()) == s.numel()) tj["values"] = values;
    }
    w.add(name, TensorView(bytes.data(), t, s));
    ours["tensors"][name] = tj;
  }
  w.write(dir.file("ours.safetensors"));
  write_file(dir.file("ours.json"), ours.dump());
  const std::string read_cmd = "python3 '" + script + "' read '" + dir.file("ours.safetensors") + "' '";
  EXPECT_EQ(run_logged(read_cmd + dir.file("ours.json") + "'", log), 0) << read_file(log);

  // The comparison itself must be able to fail: one flipped byte in the manifest is reported.
  std::string& hex = ours["tensors"]["fp8moe.2.BF16"]["hex"].get_ref<std::string&>();
  hex[0] = hex[0] == '0' ? '1' : '0';
  write_file(dir.file("wrong.json"), ours.dump());
  EXPECT_EQ(run_logged(read_cmd + dir.file("wrong.json") + "'", log), 1) << read_file(log);
  EXPECT_NE(read_file(log).find("fp8moe.2.BF16: bytes differ"), std::string::npos) << read_file(log);
}

}  // namespace
}  // namespace fp8moe
