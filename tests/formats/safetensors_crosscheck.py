#!/usr/bin/env python3
"""Cross-checks fp8moe's safetensors reader and writer against the reference implementation
(the PyPI `safetensors` package, with numpy). Driven by tests/formats/test_safetensors.cpp.

  write DIR SEED       writes, with the package, DIR/numpy.safetensors (safetensors.numpy.save_file:
                       every dtype numpy has) and DIR/raw.safetensors (safetensors.serialize_file
                       from raw little-endian bytes: BF16, F8_E4M3, F8_E5M2, which numpy lacks),
                       plus DIR/manifest.json describing both.
  read FILE MANIFEST   reads FILE (written by fp8moe) with the package and compares it with
                       MANIFEST; exit status 0 when everything matches, 1 with a message if not.

Manifests: write's is {"files": {file: metadata}, "tensors": {name: TENSOR + "file"}}, read's
is {"metadata": {str: str}, "tensors": {name: TENSOR}}, where TENSOR = {"dtype", "shape", "hex",
"values"?}: "hex" is the tensor's little-endian bytes, "values" its flattened elements as numbers
(BF16/FP8 decoded here, independently of fp8moe), absent where JSON cannot hold them (complex).
"""
import json
import os
import sys

import numpy as np
import safetensors
import safetensors.numpy

NUMPY_DTYPES = {  # safetensors name -> numpy dtype
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U64": np.uint64,
    "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_, "C64": np.complex64,
}
# Raw dtypes: the package's serializer name, bytes per element.
RAW_DTYPES = {"BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}


def decode_minifloat(codes, exp_bits, man_bits):
    """Exact values of finite minifloat codes (IEEE-style bias, subnormals at exponent 0)."""
    bias = (1 << (exp_bits - 1)) - 1
    out = []
    for c in codes:
        c = int(c)
        sign = -1.0 if c >> (exp_bits + man_bits) else 1.0
        e = (c >> man_bits) & ((1 << exp_bits) - 1)
        m = c & ((1 << man_bits) - 1)
        if e == 0:
            out.append(sign * m * 2.0 ** (1 - bias - man_bits))
        else:
            out.append(sign * (1 + m / (1 << man_bits)) * 2.0 ** (e - bias))
    return out


def numpy_values(dtype, a):
    if dtype == "C64":
        return None  # complex numbers have no JSON form; "hex" covers them
    return [float(x) if dtype.startswith("F") else int(x) for x in a.reshape(-1).tolist()]


def random_array(rng, dtype, shape):
    t = NUMPY_DTYPES[dtype]
    if dtype == "BOOL":
        return np.asarray(rng.integers(0, 2, size=shape), dtype=np.bool_)
    if dtype.startswith("F"):
        return np.asarray(rng.standard_normal(size=shape) * 3, dtype=t)
    if dtype == "C64":
        return np.asarray(rng.standard_normal(size=shape) + 1j * rng.standard_normal(size=shape), dtype=t)
    info = np.iinfo(t)
    return np.asarray(rng.integers(info.min, info.max, size=shape, dtype=t, endpoint=True))


def random_raw(rng, dtype, shape):
    """Random finite codes as uint8/uint16 arrays, and their exact values."""
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "BF16":
        bits = rng.standard_normal(size=n).astype(np.float32).view(np.uint32) >> 16
        codes = bits.astype("<u2")
        return codes, (codes.astype(np.uint32) << 16).view(np.float32).astype(float).tolist()
    codes = rng.integers(0, 256, size=n, dtype=np.uint8)
    if dtype == "F8_E4M3":
        codes[(codes & 0x7F) == 0x7F] = 0x7E  # 0x7F/0xFF are NaN
        return codes, decode_minifloat(codes, 4, 3)
    codes[(codes & 0x7F) >= 0x7C] = 0x7B  # e5m2 infinities and NaNs
    return codes, decode_minifloat(codes, 5, 2)


def serialize_raw(specs, path, metadata):
    """specs: name -> (package dtype name, shape, contiguous numpy array of the bytes)."""
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8 takes pointers
        specs = {k: safetensors.TensorSpec(dtype=d, shape=list(s), data_ptr=a.ctypes.data, data_len=a.nbytes)
                 for k, (d, s, a) in specs.items()}
    else:
        specs = {k: {"dtype": d, "shape": list(s), "data": a.tobytes()} for k, (d, s, a) in specs.items()}
    safetensors.serialize_file(specs, path, metadata=metadata)


def write(out_dir, seed):
    rng = np.random.default_rng(seed)
    tensors = {}
    files = {"numpy.safetensors": {"format": "np", "seed": str(seed), "unicode": "gr\u00fc\u00dfe \u2713"},
                "raw.safetensors": {"written_by": "safetensors.serialize_file"}}
    arrays = {}
    cases = [(dtype, [(3,), (2, 5), (4, 1, 3)][k % 3], "") for k, dtype in enumerate(NUMPY_DTYPES)]
    cases += [("F32", (), ".scalar"), ("I64", (), ".scalar"), ("U8", (0,), ".empty"), ("BOOL", (2, 0, 3), ".empty")]
    for dtype, shape, suffix in cases:
        a = random_array(rng, dtype, shape)
        name = f"np.{dtype.lower()}{suffix}"
        arrays[name] = a
        tensors[name] = {"file": "numpy.safetensors", "dtype": dtype, "shape": list(shape),
                         "hex": a.astype(a.dtype.newbyteorder("<")).tobytes().hex(),
                         "values": numpy_values(dtype, a)}
    safetensors.numpy.save_file(arrays, os.path.join(out_dir, "numpy.safetensors"),
                                metadata=files["numpy.safetensors"])

    specs = {}
    for k, dtype in enumerate(RAW_DTYPES):
        for shape in [(3, 7), (), (0, 4)][: 3 if k == 0 else 2]:
            codes, values = random_raw(rng, dtype, shape)
            name = f"raw.{dtype.lower()}.r{len(shape)}" + (".empty" if 0 in shape else "")
            specs[name] = (RAW_DTYPES[dtype][0], shape, np.ascontiguousarray(codes))
            tensors[name] = {"file": "raw.safetensors", "dtype": dtype, "shape": list(shape),
                             "hex": codes.tobytes().hex(), "values": values}
    serialize_raw(specs, os.path.join(out_dir, "raw.safetensors"), files["raw.safetensors"])

    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"files": files, "tensors": tensors}, f)


def read(path, manifest_path):
    with open(manifest_path) as f:
        manifest = json.load(f)
    errors = []
    with open(path, "rb") as f:
        content = f.read()
    # deserialize validates the whole file and returns every tensor's raw bytes, whatever the dtype.
    raw = {name: t for name, t in safetensors.deserialize(content)}
    if sorted(raw) != sorted(manifest["tensors"]):
        errors.append(f"tensor names: file has {sorted(raw)}, manifest {sorted(manifest['tensors'])}")
    with safetensors.safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
        # numpy cannot hold BF16/FP8: those are checked through their bytes only.
        arrays = {name: f.get_tensor(name) for name, t in manifest["tensors"].items()
                  if t["dtype"] in NUMPY_DTYPES and name in raw}
    if metadata != manifest["metadata"]:
        errors.append(f"metadata: file has {metadata}, manifest {manifest['metadata']}")
    for name, want in manifest["tensors"].items():
        got = raw.get(name)
        if got is None:
            continue
        if got["dtype"] != want["dtype"] or list(got["shape"]) != want["shape"]:
            errors.append(f"{name}: file has {got['dtype']}{got['shape']}, manifest {want['dtype']}{want['shape']}")
        if bytes(got["data"]).hex() != want["hex"]:
            errors.append(f"{name}: bytes differ: file {bytes(got['data']).hex()[:64]}, manifest {want['hex'][:64]}")
        if name in arrays:
            a = arrays[name]
            if a.dtype != NUMPY_DTYPES[want["dtype"]] or list(a.shape) != want["shape"]:
                errors.append(f"{name}: numpy reads {a.dtype}{list(a.shape)}")
            elif "values" in want and numpy_values(want["dtype"], a) != want["values"]:
                errors.append(f"{name}: values differ: numpy {a.reshape(-1)[:8]}, manifest {want['values'][:8]}")
    for e in errors:
        print("MISMATCH", e)
    print(f"checked {len(manifest['tensors'])} tensors of {path}: {'OK' if not errors else 'FAILED'}")
    return 0 if not errors else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "read":
        sys.exit(read(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
