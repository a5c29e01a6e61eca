# The W8A8 kernel of the CUDA backend (src/backends/cuda/cutlass/, w8a8.cuh): CUTLASS 4.2's Hopper
# FP8 grouped GEMM, header-only. Built when the library has CUDA, an sm_90a target and the CUTLASS
# headers, found in this order:
#   1. FP8MOE_CUTLASS_DIR: a CUTLASS source root (include/, tools/util/include/)
#   2. the pip package nvidia-cutlass (scripts/setup.sh installs it where nvcc is): cutlass_library/source
#   3. ${FP8MOE_DEPS_DIR}/nvidia_cutlass-*.whl, unpacked into the build folder
# Without them the W8A8 path is absent and asking for it is an error naming this (w8a8.cu).
# The kernel TUs compile for sm_90a only (their own object library), one TU per configuration so
# that they build in parallel; CPU-only builds never reach this file's work.
# On by default since the whole GPU suite passes with it (H100, bench/NOTES.md, twenty-fifth
# session: 127/127); it was off while its first runs left tests failing (ninth session). Building it
# costs the CUTLASS TUs' compile time; the engine still runs W8A16 unless W8A8 is asked for.
option(FP8MOE_W8A8 "Build the W8A8 (CUTLASS FP8 x FP8) forward path where sm_90a is targeted and CUTLASS is found" ON)
set(FP8MOE_CUTLASS_DIR "" CACHE PATH "CUTLASS source root for the W8A8 kernel (empty: pip nvidia-cutlass, else .deps wheel)")
set(FP8MOE_HAS_W8A8 OFF)
if(FP8MOE_W8A8 AND FP8MOE_HAS_CUDA AND FP8MOE_CUDA_ARCHS MATCHES "90a")
  set(_root "${FP8MOE_CUTLASS_DIR}")
  if(NOT _root)
    find_program(FP8MOE_PYTHON3 NAMES python3 python)
    if(FP8MOE_PYTHON3)
      execute_process(COMMAND "${FP8MOE_PYTHON3}" -c "import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))"
                      OUTPUT_VARIABLE _pkg OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
      if(_rc EQUAL 0 AND EXISTS "${_pkg}/source/include/cutlass/cutlass.h")
        set(_root "${_pkg}/source")
      endif()
    endif()
  endif()
  if(NOT _root)
    file(GLOB _whl "${FP8MOE_DEPS_DIR}/nvidia_cutlass-*.whl")
    if(_whl)
      list(GET _whl 0 _whl)
      set(_dst "${CMAKE_BINARY_DIR}/cutlass_headers")
      if(NOT EXISTS "${_dst}/cutlass_library/source/include/cutlass/cutlass.h")
        file(ARCHIVE_EXTRACT INPUT "${_whl}" DESTINATION "${_dst}"
             PATTERNS "cutlass_library/source/include/*" "cutlass_library/source/tools/util/include/*")
      endif()
      set(_root "${_dst}/cutlass_library/source")
    endif()
  endif()
  if(_root AND EXISTS "${_root}/include/cutlass/cutlass.h")
    set(FP8MOE_HAS_W8A8 ON)
    add_library(fp8moe_w8a8_sm90 OBJECT src/backends/cuda/cutlass/fp8_grouped_sm90.cu)
    set_target_properties(fp8moe_w8a8_sm90 PROPERTIES CUDA_ARCHITECTURES 90a-real POSITION_INDEPENDENT_CODE ON)
    target_include_directories(fp8moe_w8a8_sm90 PRIVATE include src)
    target_include_directories(fp8moe_w8a8_sm90 SYSTEM PRIVATE "${_root}/include" "${_root}/tools/util/include")
    target_link_libraries(fp8moe_w8a8_sm90 PRIVATE nlohmann_json::nlohmann_json)
    target_compile_definitions(fp8moe_w8a8_sm90 PRIVATE FP8MOE_HAS_CUDA=1)
    target_compile_options(fp8moe_w8a8_sm90 PRIVATE --expt-relaxed-constexpr -lineinfo)
    if(FP8MOE_PYTHON)
      set_target_properties(fp8moe_w8a8_sm90 PROPERTIES CXX_VISIBILITY_PRESET hidden CUDA_VISIBILITY_PRESET hidden
                                                        VISIBILITY_INLINES_HIDDEN ON)
    endif()
    target_sources(fp8moe PRIVATE $<TARGET_OBJECTS:fp8moe_w8a8_sm90>)
    target_compile_definitions(fp8moe PRIVATE FP8MOE_HAS_W8A8=1)
  endif()
endif()
if(FP8MOE_HAS_CUDA)
  if(FP8MOE_HAS_W8A8)
    message(STATUS "fp8moe: W8A8 kernel ON (CUTLASS headers: ${_root})")
  else()
    message(STATUS "fp8moe: W8A8 kernel OFF (needs -DFP8MOE_W8A8=ON, an sm_90a target and the CUTLASS headers: "
                   "pip install nvidia-cutlass)")
  endif()
endif()
