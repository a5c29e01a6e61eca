// quantization_config -> QuantConfig: fine-grained FP8 ("fp8") and compressed-tensors
// float-quantized, with the module-name matching each producer uses.
#include <algorithm>
#include <sstream>

#include <nlohmann/json.hpp>

#include "formats/json_bounded.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/error.hpp"
#include "model/limits.hpp"

namespace fp8moe {

namespace {

using nlohmann::json;
using model::kMaxBlock;  // keeps the scale-grid arithmetic far from overflow whatever the shapes
using model::kMaxModulePatterns, model::kMaxPatternLength;

// libstdc++'s default regex executor backtracks: "(.*)*x" takes exponential time on a 40-character
// module name, so a hostile config.json could stall the loader for ever. The polynomial executor
// (a Thompson NFA, breadth first) answers the same question - does a match start at 0 - in
// O(name x pattern), and refuses back-references, which no module pattern needs.
#if defined(__GLIBCXX__)
constexpr auto kRegexFlags = std::regex::ECMAScript | std::regex_constants::__polynomial;
#else
#error "module patterns need a regex executor without exponential backtracking (libstdc++'s __polynomial)"
#endif

// The longest run of decimal digits in `s`. libstdc++'s regex compiler reads a repetition count
// or a back-reference number into a long without an overflow check (undefined behaviour, found by
// fuzz_config with "g{55555555555555555064,}"); nine digits always fit.
size_t longest_digit_run(const std::string& s) {
  size_t longest = 0, run = 0;
  for (char c : s) {
    run = c >= '0' && c <= '9' ? run + 1 : 0;
    longest = std::max(longest, run);
  }
  return longest;
}

std::shared_ptr<const std::regex> compile(const std::string& pattern, const std::string& src, const char* field) {
  FP8MOE_CHECK(static_cast<int64_t>(pattern.size()) <= kMaxPatternLength, src, ": quantization_config.", field,
               " entry of ", pattern.size(), " characters exceeds the limit of ", kMaxPatternLength,
               " (module patterns are short names)");
  FP8MOE_CHECK(longest_digit_run(pattern) <= 9, src, ": quantization_config.", field, " entry \"", pattern,
               "\" holds a number of ", longest_digit_run(pattern),
               " digits; at most 9 are accepted (layer indices, repetition counts)");
  try {
    return std::make_shared<const std::regex>(pattern, kRegexFlags);
  } catch (const std::regex_error& e) {
    FP8MOE_FAIL(src, ": quantization_config.", field, " entry \"", pattern, "\" is not a regex std::regex accepts: ",
                e.what());
  }
}

// Python's re.match: the pattern must match at the start of the name, not necessarily all of it.
bool re_match(const std::regex& re, const std::string& name) {
  return std::regex_search(name, re, std::regex_constants::match_continuous);
}

// compressed-tensors' match_name + _match_class for a Linear module.
bool ct_matches(const ModulePattern& p, const std::string& module) {
  if (p.re) return re_match(*p.re, module);
  return p.text == module || p.text == "Linear";
}

std::vector<ModulePattern> ct_patterns(const json& list, const std::string& src, const char* field) {
  FP8MOE_CHECK(list.is_array(), src, ": quantization_config.", field, " must be a list, found ", list.dump());
  FP8MOE_CHECK(static_cast<int64_t>(list.size()) <= kMaxModulePatterns, src, ": quantization_config.", field, " has ",
               list.size(), " entries, more than the limit of ", kMaxModulePatterns);
  std::vector<ModulePattern> out;
  for (const json& v : list) {
    FP8MOE_CHECK(v.is_string(), src, ": quantization_config.", field, " entries must be strings, found ", v.dump());
    ModulePattern p{v.get<std::string>(), nullptr};
    if (p.text.rfind("re:", 0) == 0) p.re = compile(p.text.substr(3), src, field);
    out.push_back(std::move(p));
  }
  return out;
}

std::string get_string(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  FP8MOE_CHECK(it != j.end() && it->is_string(), where, ": field ", key, " is missing or not a string");
  return it->get<std::string>();
}

// A [a, b] list or an "AxB" string (older compressed-tensors).
std::pair<int64_t, int64_t> block_pair(const json& v, const std::string& where) {
  if (v.is_array() && v.size() == 2 && v[0].is_number_integer() && v[1].is_number_integer())
    return {v[0].get<int64_t>(), v[1].get<int64_t>()};
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    const auto x = s.find('x');
    if (x != std::string::npos) {
      try {
        return {std::stoll(s.substr(0, x)), std::stoll(s.substr(x + 1))};
      } catch (const std::exception&) {
      }
    }
  }
  FP8MOE_FAIL(where, ": expected a block size [rows, cols], found ", v.dump());
}

WeightQuantScheme parse_ct_weights(const json& w, const std::string& where) {
  FP8MOE_CHECK(w.is_object(), where, ": expected an object, found ", w.dump());
  const auto bits = w.find("num_bits");
  FP8MOE_CHECK(bits != w.end() && bits->is_number_integer() && bits->get<int64_t>() == 8, where,
               ": only num_bits 8 is supported, found ", bits == w.end() ? std::string("none") : bits->dump());
  const std::string type = get_string(w, "type", where);
  FP8MOE_CHECK(type == "float", where, ": only type \"float\" (FP8) is supported, found \"", type, "\"");
  const auto sym = w.find("symmetric");
  FP8MOE_CHECK(sym == w.end() || (sym->is_boolean() && sym->get<bool>()), where,
               ": only symmetric quantization is supported (no zero points), found symmetric ", sym->dump());
  const auto dyn = w.find("dynamic");
  FP8MOE_CHECK(dyn == w.end() || dyn->is_null() || (dyn->is_boolean() && !dyn->get<bool>()), where,
               ": weights must be statically quantized (dynamic false), found ", dyn->dump());

  WeightQuantScheme s;
  s.dtype = DType::F8_E4M3;
  const std::string strategy = get_string(w, "strategy", where);
  if (strategy == "tensor") {
    s.kind = ScaleKind::Tensor;
  } else if (strategy == "channel") {
    s.kind = ScaleKind::Channel;
  } else if (strategy == "block") {
    const auto bs = w.find("block_structure");
    FP8MOE_CHECK(bs != w.end() && !bs->is_null(), where, ": strategy block needs block_structure");
    auto [bn, bk] = block_pair(*bs, where + ".block_structure");
    FP8MOE_CHECK(bn > 0 && bk > 0 && bn <= kMaxBlock && bk <= kMaxBlock, where, ".block_structure must be in [1, ",
                 kMaxBlock, "] (released checkpoints use 128), found ", bs->dump());
    s.kind = ScaleKind::Block;
    s.block_n = bn;
    s.block_k = bk;
  } else if (strategy == "group") {
    const auto g = w.find("group_size");
    FP8MOE_CHECK(g != w.end() && g->is_number_integer() && g->get<int64_t>() > 0, where,
                 ": strategy group needs a positive group_size, found ", g == w.end() ? std::string("none") : g->dump());
    FP8MOE_CHECK(g->get<int64_t>() <= kMaxBlock, where, ".group_size must be in [1, ", kMaxBlock,
                 "] (released checkpoints use 32 to 128), found ", g->dump());
    s.kind = ScaleKind::Group;
    s.group_size = g->get<int64_t>();
  } else {
    FP8MOE_FAIL(where, ": weight strategy \"", strategy, "\" is not supported (expected tensor, channel, block or group)");
  }
  return s;
}

void parse_fp8(const json& q, const std::string& src, QuantConfig& c) {
  const std::string where = src + ": quantization_config";
  c.fp8_weights.kind = ScaleKind::Block;
  c.fp8_weights.block_n = c.fp8_weights.block_k = 128;  // transformers' FineGrainedFP8Config default
  if (auto b = q.find("weight_block_size"); b != q.end() && !b->is_null()) {
    auto [bn, bk] = block_pair(*b, where + ".weight_block_size");
    FP8MOE_CHECK(bn > 0 && bk > 0 && bn <= kMaxBlock && bk <= kMaxBlock, where, ".weight_block_size must be in [1, ",
                 kMaxBlock, "] (released checkpoints use 128), found ", b->dump());
    c.fp8_weights.block_n = bn;
    c.fp8_weights.block_k = bk;
  }
  if (auto f = q.find("fmt"); f != q.end() && !f->is_null()) {
    FP8MOE_CHECK(f->is_string(), where, ".fmt must be a string, found ", f->dump());
    const std::string fmt = f->get<std::string>();
    if (fmt == "e4m3")
      c.fp8_weights.dtype = DType::F8_E4M3;
    else if (fmt == "e5m2")
      c.fp8_weights.dtype = DType::F8_E5M2;
    else
      FP8MOE_FAIL(where, ".fmt \"", fmt, "\" is not supported (expected e4m3 or e5m2)");
  }
  c.activation_scheme = "dynamic";
  if (auto a = q.find("activation_scheme"); a != q.end() && !a->is_null()) {
    FP8MOE_CHECK(a->is_string(), where, ".activation_scheme must be a string, found ", a->dump());
    c.activation_scheme = a->get<std::string>();
  }
  FP8MOE_CHECK(c.activation_scheme == "dynamic", where, ".activation_scheme \"", c.activation_scheme,
               "\" is not supported: fp8moe quantizes activations dynamically and has no use for static input scales");
  if (auto m = q.find("modules_to_not_convert"); m != q.end() && !m->is_null()) {
    FP8MOE_CHECK(m->is_array(), where, ".modules_to_not_convert must be a list, found ", m->dump());
    FP8MOE_CHECK(static_cast<int64_t>(m->size()) <= kMaxModulePatterns, where, ".modules_to_not_convert has ",
                 m->size(), " entries, more than the limit of ", kMaxModulePatterns);
    for (const json& v : *m) {
      FP8MOE_CHECK(v.is_string(), where, ".modules_to_not_convert entries must be strings, found ", v.dump());
      const std::string t = v.get<std::string>();
      c.modules_to_not_convert.push_back({t, compile(t, src, "modules_to_not_convert")});
    }
  }
}

void parse_compressed_tensors(const json& q, const std::string& src, QuantConfig& c) {
  const std::string where = src + ": quantization_config";
  c.format = get_string(q, "format", where);
  FP8MOE_CHECK(c.format == "float-quantized", where, ".format \"", c.format,
               "\" is not supported (expected float-quantized: FP8 weights stored as F8_E4M3 codes)");
  if (auto s = q.find("quantization_status"); s != q.end() && s->is_string()) c.quantization_status = s->get<std::string>();
  if (auto ig = q.find("ignore"); ig != q.end() && !ig->is_null()) c.ignore = ct_patterns(*ig, src, "ignore");

  const auto groups = q.find("config_groups");
  FP8MOE_CHECK(groups != q.end() && groups->is_object() && !groups->empty(), where,
               ".config_groups is missing or empty");
  for (auto it = groups->begin(); it != groups->end(); ++it) {
    const std::string gw = where + ".config_groups." + it.key();
    const json& g = it.value();
    FP8MOE_CHECK(g.is_object(), gw, ": expected an object, found ", g.dump());
    if (auto f = g.find("format"); f != g.end() && f->is_string())
      FP8MOE_CHECK(f->get<std::string>() == "float-quantized", gw, ".format \"", f->get<std::string>(),
                   "\" is not supported (expected float-quantized)");
    QuantGroup qg;
    qg.name = it.key();
    const auto t = g.find("targets");
    FP8MOE_CHECK(t != g.end(), gw, ": field targets is missing");
    qg.targets = ct_patterns(*t, src, "config_groups.targets");
    const auto w = g.find("weights");
    FP8MOE_CHECK(w != g.end() && !w->is_null(), gw, ": field weights is missing (activation-only schemes are not supported)");
    qg.weights = parse_ct_weights(*w, gw + ".weights");
    if (auto a = g.find("input_activations"); a != g.end() && !a->is_null()) {
      const std::string aw = gw + ".input_activations";
      FP8MOE_CHECK(a->is_object(), aw, ": expected an object, found ", a->dump());
      const auto bits = a->find("num_bits");
      FP8MOE_CHECK(bits != a->end() && bits->is_number_integer() && bits->get<int64_t>() == 8, aw,
                   ": only num_bits 8 is supported");
      FP8MOE_CHECK(get_string(*a, "type", aw) == "float", aw, ": only type \"float\" is supported");
      const auto dyn = a->find("dynamic");
      FP8MOE_CHECK(dyn != a->end() && dyn->is_boolean() && dyn->get<bool>(), aw,
                   ": static activation scales (dynamic false) are not supported: fp8moe quantizes activations "
                   "dynamically");
      qg.activation_strategy = get_string(*a, "strategy", aw);
    }
    c.groups.push_back(std::move(qg));
  }
}

}  // namespace

const char* quant_method_name(QuantMethod m) {
  switch (m) {
    case QuantMethod::None: return "none";
    case QuantMethod::Fp8: return "fp8";
    case QuantMethod::CompressedTensors: return "compressed-tensors";
  }
  FP8MOE_FAIL("unknown quant method code ", static_cast<int>(m));
}

ScaleSpec WeightQuantScheme::spec(int64_t rows, int64_t cols) const {
  switch (kind) {
    case ScaleKind::None: return ScaleSpec::none(rows, cols);
    case ScaleKind::Tensor: return ScaleSpec::tensor(rows, cols);
    case ScaleKind::Channel: return ScaleSpec::channel(rows, cols);
    case ScaleKind::Block: return ScaleSpec::block(rows, cols, block_n, block_k);
    case ScaleKind::Group: return ScaleSpec::group(rows, cols, group_size);
  }
  FP8MOE_FAIL("unknown scale kind code ", static_cast<int>(kind));
}

std::string WeightQuantScheme::str() const {
  std::ostringstream os;
  os << scale_kind_name(kind);
  if (kind == ScaleKind::Block) os << ' ' << block_n << 'x' << block_k;
  if (kind == ScaleKind::Group) os << ' ' << group_size;
  return os.str();
}

bool QuantConfig::excluded(const std::string& module) const {
  switch (method) {
    case QuantMethod::None: return false;
    case QuantMethod::Fp8:
      for (const ModulePattern& p : modules_to_not_convert) {
        const std::string& t = p.text;
        if (re_match(*p.re, module) ||
            (module.size() >= t.size() && module.compare(module.size() - t.size(), t.size(), t) == 0))
          return true;
      }
      return false;
    case QuantMethod::CompressedTensors:
      for (const ModulePattern& p : ignore)
        if (ct_matches(p, module)) return true;
      return false;
  }
  return false;
}

WeightQuantScheme QuantConfig::scheme_for(const std::string& module) const {
  if (method == QuantMethod::None || excluded(module)) return {};
  if (method == QuantMethod::Fp8) return fp8_weights;
  for (const QuantGroup& g : groups)
    for (const ModulePattern& t : g.targets)
      if (ct_matches(t, module)) return g.weights;
  return {};
}

QuantConfig parse_quant_config(const std::string& config_json_text, const std::string& source) {
  const json j = parse_json_bounded(config_json_text, source);
  QuantConfig c;
  c.source = source;
  const auto q = j.find("quantization_config");
  if (q == j.end() || q->is_null()) return c;
  FP8MOE_CHECK(q->is_object(), source, ": quantization_config must be an object, found ", q->dump());
  const std::string method = get_string(*q, "quant_method", source + ": quantization_config");
  if (method == "fp8") {
    c.method = QuantMethod::Fp8;
    parse_fp8(*q, source, c);
  } else if (method == "compressed-tensors") {
    c.method = QuantMethod::CompressedTensors;
    parse_compressed_tensors(*q, source, c);
  } else {
    FP8MOE_FAIL(source, ": quantization_config.quant_method \"", method,
                "\" is not supported (expected fp8 or compressed-tensors)");
  }
  return c;
}

}  // namespace fp8moe
