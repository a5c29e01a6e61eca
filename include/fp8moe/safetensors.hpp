// safetensors: a memory-mapped, validating reader (zero-copy views), a writer, and a multi-file
// store for sharded checkpoints (model.safetensors.index.json).
//
// The reader enforces every rule of ../shared/docs/formats.md section 1 (and rejects duplicate
// names); every error names the file, the tensor where there is one, what was expected and what
// was found. Views point into the mapping and may be unaligned: read them with memcpy
// (load_as_double does).
//
// Sub-byte dtypes (F4, F6_*) are accepted by the reader and exposed as views, but a TensorView
// counts in whole elements: dtype_size() (and so nbytes()) throws for them; use entry().begin/end
// for their byte extent. The writer takes byte-sized dtypes only.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "fp8moe/dtype.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe {

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte offsets within the data buffer, end exclusive
};

class SafetensorsFile {
 public:
  // Maps and validates `path`; throws fp8moe::Error naming the file and the broken rule.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Names in file order (sorted by begin offset).
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  // Throws naming the file and the tensor when absent.
  const SafetensorsEntry& entry(const std::string& name) const;
  // Host view into the read-only mapping (writing through it faults). Possibly unaligned; valid
  // while this SafetensorsFile lives.
  TensorView view(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return size_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;  // [size_] bytes, PROT_READ, MAP_PRIVATE
  uint64_t size_ = 0;
  uint64_t data_start_ = 0;  // 8 + N
  std::map<std::string, SafetensorsEntry> entries_;
  std::vector<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors, then writes one file: header padded with spaces to a multiple of 8 bytes,
// tensors in insertion order, densely packed, "__metadata__" only when some was set.
// add() copies the bytes, so the caller may free or reuse its buffer right after.
class SafetensorsWriter {
 public:
  // Host, contiguous, byte-sized dtypes only. Duplicate names (and "__metadata__") are an error.
  void add(const std::string& name, const TensorView& t);
  // Sets (or replaces) one metadata entry.
  void set_metadata(const std::string& key, const std::string& value);
  void write(const std::string& path) const;  // atomic: writes path + ".tmp" then renames

 private:
  struct Item {
    std::string name;
    DType dtype;
    Shape shape;
    std::vector<unsigned char> bytes;  // [numel * dtype_size] copied at add()
  };
  std::vector<Item> items_;
  std::set<std::string> names_;  // of items_, for the duplicate check
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint: one file, a directory with model.safetensors.index.json (sharded),
// or a directory of *.safetensors files without an index. With an index: every mapped name must
// exist in its shard, every tensor of a mapped shard must be in the weight_map (mapped to that
// shard: no name in two shards), and shard names must be relative paths that resolve (symlinks
// included) inside the directory; shard files the index does not name are ignored. Without an
// index: every *.safetensors file is loaded and no name may be in two files.
class TensorStore {
 public:
  static TensorStore open(const std::string& path);

  // The checkpoint directory (for a single file: the directory holding it), canonical.
  const std::string& root() const { return root_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const;
  TensorView view(const std::string& name) const;
  const SafetensorsFile& file_of(const std::string& name) const;
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::string root_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
};

}  // namespace fp8moe
