# nullmap — build, test, demo, bench, install.
#
#   make               build the library (static + shared) and the `nullmap` tool
#   make test          install Debian packages if missing, build, run the Check suite + CLI tests
#   make test SAN=1    the same under AddressSanitizer + UBSan (separate build dir build-san/)
#   make valgrind      a full `nullmap run` under valgrind, failing on any leak or error
#   make killtest      crash safety: batch and train killed (SIGKILL) at random moments and
#                      resumed, concurrent readers (minutes; KILLTEST_ARGS=--seed 2 …)
#   make demo          install, build, run the shipped trained model on a held-out sample image
#   make bench         speed benchmarks (ratios measured side by side in one run; the GPU part
#                      runs only where a CUDA device is present)
#   make sandbox       the CUDA kernel sandbox (build/sandbox: each kernel against the CPU reference)
#   make install PREFIX=/usr/local
#   make fuzz          libFuzzer harnesses (clang; tests/fuzz/, separate build dir build-fuzz/)
#   make fuzz-run      run each harness on its corpus: FUZZ_SECONDS=N each, or FUZZ_RUNS=N inputs
#   make fuzz-regress  replay every corpus file and every tests/fuzz/crashes/* input once (CI)
#
# Variables: SAN=1, OPT=-O2, PREFIX=/usr/local, NVCC=auto (path to nvcc or "none"),
#            CUDA_ARCH (nvcc -gencode flags; default: sm_80 and sm_90 code + compute_90 PTX).

SAN ?= 0
OPT ?= -O2
PREFIX ?= /usr/local
BUILD ?= build$(if $(filter 1,$(SAN)),-san,)

ifneq ($(filter-out 0 1,$(SAN)),)
$(error SAN must be 0 or 1, got '$(SAN)')
endif

CC ?= cc
PKGS := hdf5 jansson libpng cairo fontconfig
# OpenBLAS: we link the OpenMP build explicitly so that OpenBLAS and our own parallel loops
# share one thread pool (two pools on two cores thrash; see ../shared/FINDINGS.md).
BLAS_DIR := /usr/lib/x86_64-linux-gnu/openblas-openmp
BLAS_LIBS := -L$(BLAS_DIR) -l:libopenblas.so.0 -Wl,-rpath,$(BLAS_DIR)

PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS = $(shell pkg-config --libs $(PKGS) 2>/dev/null)
CHECK_CFLAGS = $(shell pkg-config --cflags check 2>/dev/null)
CHECK_LIBS = $(shell pkg-config --libs check 2>/dev/null)

WARN := -std=c11 -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter
CFLAGS_ALL := $(WARN) $(OPT) -g -fopenmp -fPIC -D_DEFAULT_SOURCE -D_FILE_OFFSET_BITS=64 \
              -Ilib -Iviz $(PKG_CFLAGS) $(CFLAGS)
LDLIBS_ALL := $(PKG_LIBS) -ljpeg $(BLAS_LIBS) -fopenmp -lm $(LDLIBS)
ifeq ($(SAN),1)
CFLAGS_ALL += -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
LDLIBS_ALL += -fsanitize=address,undefined
endif

# CUDA: the GPU backend (kernels/*.cu) is built whenever nvcc is found; NVCC=none turns it off.
# /usr/local/cuda comes first (where the toolkit lives here); then nvcc on PATH. On some machines
# PATH holds /usr/local/bin/nvcc, a two-line wrapper script that execs the real nvcc, so the
# toolkit root is not always realpath(nvcc)/..: we try that, then $(CUDA_HOME), /usr/local/cuda,
# and last the TOP= line that nvcc itself prints in a dry run.
NVCC ?= $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
ifeq ($(NVCC),none)
override NVCC :=
endif
CU_SRC := $(filter-out kernels/sandbox.cu,$(wildcard kernels/*.cu))
ifneq ($(NVCC),)
cudart_in = $(patsubst %/,%,$(dir $(firstword $(foreach r,$(1),$(wildcard \
                $(r)/lib64/libcudart.so $(r)/targets/x86_64-linux/lib/libcudart.so)))))
CUDA_ROOTS := $(patsubst %/bin/nvcc,%,$(realpath $(NVCC))) $(CUDA_HOME) /usr/local/cuda
CUDA_LIBDIR := $(call cudart_in,$(CUDA_ROOTS))
ifeq ($(CUDA_LIBDIR),)
CUDA_ROOTS += $(realpath $(shell $(NVCC) --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | \
                  sed -n 's/^#\$$ TOP=//p'))
CUDA_LIBDIR := $(call cudart_in,$(CUDA_ROOTS))
endif
ifeq ($(CUDA_LIBDIR),)
$(error nvcc found at $(NVCC) but no libcudart.so under lib64 or targets/x86_64-linux/lib of $(CUDA_ROOTS); set CUDA_HOME=/path/to/toolkit, or NVCC=none for a CPU-only build)
endif
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_90,code=compute_90
NVCC_FLAGS := -std=c++17 $(OPT) -g $(CUDA_ARCH) -Werror all-warnings \
              -Xcompiler -Wall,-Wextra,-Werror,-Wno-unused-parameter,-fPIC -Ilib -Ikernels
CUDA_LIBS := -L$(CUDA_LIBDIR) -lcublas -lcudart -Wl,-rpath,$(CUDA_LIBDIR) -lstdc++
CU_OBJ := $(patsubst %.cu,$(BUILD)/%.o,$(CU_SRC))
CFLAGS_ALL += -DNM_HAVE_CUDA=1 -Ikernels
LDLIBS_ALL += $(CUDA_LIBS)
CUDA_STATE := on
else
CU_OBJ :=
CUDA_STATE := off
endif

LIB_SRC := $(wildcard lib/*.c) $(wildcard viz/*.c)
LIB_OBJ := $(patsubst %.c,$(BUILD)/%.o,$(LIB_SRC)) $(CU_OBJ)
TOOL_SRC := $(wildcard tools/*.c)
TOOL_OBJ := $(patsubst %.c,$(BUILD)/%.o,$(TOOL_SRC))
TEST_SRC := $(wildcard tests/test_*.c) tests/check_main.c tests/test_util.c
TEST_OBJ := $(patsubst %.c,$(BUILD)/%.o,$(sort $(TEST_SRC)))
BENCH_SRC := $(wildcard tests/bench/*.c)

VERSION := 0.1.0
NULLMAP := $(BUILD)/nullmap

.PHONY: all deps test valgrind killtest demo bench install clean fixtures sandbox fuzz fuzz-run fuzz-regress

all: $(NULLMAP) $(BUILD)/libnullmap.a $(BUILD)/libnullmap.so
ifeq ($(NVCC),)
	@echo "nullmap: nvcc not found (or NVCC=none): CPU backend only (set NVCC=/path/to/nvcc to build the CUDA backend)"
else
	@echo "nullmap: CUDA backend built with $(NVCC) (libraries in $(CUDA_LIBDIR))"
endif

deps:
	@tools/install-deps.sh

$(BUILD)/%.o: %.c $(wildcard lib/*.h viz/*.h tests/*.h kernels/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -DNM_VERSION='"$(VERSION)"' -c $< -o $@

$(BUILD)/kernels/%.o: kernels/%.cu $(wildcard kernels/*.cuh kernels/*.h lib/*.h)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@

# The registry (nm_backend.c) is compiled with or without the CUDA backend: a stamp file per
# state rebuilds it when NVCC changes between builds in one build directory.
$(BUILD)/lib/nm_backend.o: $(BUILD)/.cuda-$(CUDA_STATE)
$(BUILD)/.cuda-$(CUDA_STATE):
	@mkdir -p $(BUILD)
	@rm -f $(BUILD)/.cuda-*
	@touch $@

$(BUILD)/libnullmap.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libnullmap.so: $(LIB_OBJ)
	$(CC) -shared -o $@ $^ $(LDLIBS_ALL)

$(NULLMAP): $(TOOL_OBJ) $(BUILD)/libnullmap.a
	$(CC) -o $@ $(TOOL_OBJ) $(BUILD)/libnullmap.a $(LDLIBS_ALL)

$(BUILD)/run_tests: $(TEST_OBJ) $(BUILD)/libnullmap.a
	$(CC) -o $@ $(TEST_OBJ) $(BUILD)/libnullmap.a $(CHECK_LIBS) $(LDLIBS_ALL)

$(BUILD)/tests/%.o: CFLAGS_ALL += $(CHECK_CFLAGS) -DNM_TEST_DIR='"$(CURDIR)/tests"'

# Sanitizer runs: LeakSanitizer must see our leaks but not the libraries' one-time allocations.
SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
           LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 \
           UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
TEST_ENV := OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE $(if $(filter 1,$(SAN)),$(SAN_ENV),)

test: deps
	@$(MAKE) --no-print-directory all $(BUILD)/run_tests
	$(TEST_ENV) NULLMAP=$(NULLMAP) $(BUILD)/run_tests
	@# the numeric kernels have AVX-512, AVX2 and portable paths chosen at run time: test each
	NM_ISA=avx2 $(TEST_ENV) NULLMAP=$(NULLMAP) CK_RUN_SUITE=fixtures $(BUILD)/run_tests
	NM_ISA=avx2 $(TEST_ENV) NULLMAP=$(NULLMAP) CK_RUN_SUITE=router $(BUILD)/run_tests
	NM_ISA=avx2 $(TEST_ENV) NULLMAP=$(NULLMAP) CK_RUN_SUITE=engine $(BUILD)/run_tests
	NM_ISA=generic $(TEST_ENV) NULLMAP=$(NULLMAP) CK_RUN_SUITE=fixtures $(BUILD)/run_tests
	NM_ISA=generic $(TEST_ENV) NULLMAP=$(NULLMAP) CK_RUN_SUITE=router $(BUILD)/run_tests
	NM_ISA=generic $(TEST_ENV) NULLMAP=$(NULLMAP) CK_RUN_SUITE=engine $(BUILD)/run_tests
	$(TEST_ENV) NULLMAP=$(NULLMAP) tests/cli_test.sh
ifeq ($(SAN),0)
	tests/build_config_test.sh
	tests/install_test.sh
endif

valgrind: deps
	@$(MAKE) --no-print-directory all SAN=0
	tests/valgrind_run.sh build/nullmap

# tests/kill_test.sh: 120 batch kills + 80 training kills by default; prints the totals.
killtest: deps
	@$(MAKE) --no-print-directory all SAN=0
	NULLMAP=build/nullmap tests/kill_test.sh $(KILLTEST_ARGS)

# The demo uses the shipped, trained default model (samples/models/k8-trained: K^8 at rho = 0.5,
# trained by `nullmap train` on the synthetic set; README "The shipped model") on a held-out image.
DEMO_MODEL := samples/models/k8-trained
# A seeded random model of the same family, made on demand (what an untrained router does).
SAMPLE_MODEL := samples/models/random-k8
$(SAMPLE_MODEL)/model.safetensors: $(NULLMAP) samples/configs/random-k8.json
	$(NULLMAP) init --config samples/configs/random-k8.json --seed 1 --out $(SAMPLE_MODEL) --force

demo: deps
	@$(MAKE) --no-print-directory all
	$(NULLMAP) info $(DEMO_MODEL)
	$(NULLMAP) run --model $(DEMO_MODEL) --image samples/images/synthetic-colour.png \
	    --prompt "Name the colour of the circle." --max-new-tokens 8 --out out/demo --force
	$(NULLMAP) info out/demo/trace.h5

# The bench runs the PyTorch baseline itself (tests/bench/torch_alg1.py, with its own thread
# settings) so that every ratio comes from one run. BENCH_ARGS: e.g. --no-torch, --reps 15.
# OMP_WAIT_POLICY stays at libgomp's default (spin briefly, then sleep): nullmap has a single
# OpenMP pool (the OpenMP build of OpenBLAS shares it), so FINDINGS.md's two-pool trap cannot
# arise; PASSIVE would add a futex wake-up to every parallel region (T = 256 ~20% slower,
# token-by-token decode ~2x slower) and ACTIVE would keep spinning while PyTorch runs.
BENCH_ENV := env -u OMP_WAIT_POLICY OMP_NUM_THREADS=2
bench: deps
	@$(MAKE) --no-print-directory all $(BUILD)/bench_moe
	$(BENCH_ENV) $(BUILD)/bench_moe $(BENCH_ARGS)
	$(BENCH_ENV) NULLMAP=$(NULLMAP) tests/bench/bench_render.sh
ifeq ($(NVCC),)
	@echo "bench: GPU part skipped: the CUDA backend is not built (nvcc not found or NVCC=none)"
else
	@$(MAKE) --no-print-directory sandbox
	@rc=0; $(BUILD)/sandbox --bench || rc=$$?; \
	 if [ $$rc -eq 77 ]; then echo "bench: GPU part skipped: no CUDA device"; \
	 elif [ $$rc -ne 0 ]; then exit $$rc; fi
endif

# The CUDA kernel sandbox (kernels/sandbox.cu): each kernel against the CPU reference at
# several sizes, with time and GB/s or TFLOP/s; --bench adds the paper-scale MoE layer. Exits 77
# (skip) where no CUDA device is present.
ifneq ($(NVCC),)
sandbox: $(BUILD)/sandbox
$(BUILD)/sandbox: $(BUILD)/kernels/sandbox.o $(BUILD)/libnullmap.a
	$(CC) -o $@ $< $(BUILD)/libnullmap.a $(LDLIBS_ALL)
else
sandbox:
	@echo "sandbox: needs nvcc (the CUDA backend is not built)"; exit 1
endif

$(BUILD)/bench_moe: $(BENCH_SRC) $(BUILD)/libnullmap.a
	$(CC) $(CFLAGS_ALL) -o $@ $(BENCH_SRC) $(BUILD)/libnullmap.a $(LDLIBS_ALL)

# PyTorch float64 references (Debian python3-torch; /usr/bin/python3). The outputs are committed.
fixtures:
	/usr/bin/python3 tests/gen_fixtures.py --out tests/fixtures
	/usr/bin/python3 tests/gen_moe_grad_fixtures.py --out tests/fixtures
	/usr/bin/python3 tests/gen_model_grad_fixtures.py --out tests/fixtures
	/usr/bin/python3 tests/gen_grad_fixtures.py --out tests/fixtures/grad_torch
	/usr/bin/python3 tests/gen_optim_fixture.py --out tests/fixtures/adamw_torch

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/include/nullmap
	install -m 755 $(NULLMAP) $(DESTDIR)$(PREFIX)/bin/nullmap
	install -m 644 $(BUILD)/libnullmap.a $(DESTDIR)$(PREFIX)/lib/
	install -m 755 $(BUILD)/libnullmap.so $(DESTDIR)$(PREFIX)/lib/
	install -m 644 $(filter-out lib/nm_simd.h lib/nm_ops_generic.h lib/nm_moe_generic.h lib/nm_train_model_generic.h,$(wildcard lib/*.h)) $(wildcard viz/*.h) $(DESTDIR)$(PREFIX)/include/nullmap/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' -e 's|@BLAS_DIR@|$(BLAS_DIR)|' -e 's|@CUDA_LIBS@|$(CUDA_LIBS)|' \
	    lib/nullmap.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/nullmap.pc

# ---- fuzzing (tests/fuzz/README.md) ----
# libnullmap is compiled again by clang with the fuzzer's coverage instrumentation plus ASan and
# UBSan into build-fuzz/ (the gcc build is untouched); each harness links it with libFuzzer.
FUZZ_CC ?= clang
FUZZ_BUILD := build-fuzz
FUZZERS := safetensors config png jpeg trace dataset prompt
FUZZ_SECONDS ?= 60
FUZZ_RUNS ?=
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_CFLAGS := $(WARN) -O1 -g -fopenmp -fPIC -D_DEFAULT_SOURCE -D_FILE_OFFSET_BITS=64 -Ilib -Iviz $(PKG_CFLAGS) \
               $(FUZZ_SAN) -DNM_VERSION='"$(VERSION)"'
FUZZ_LIB_OBJ := $(patsubst %.c,$(FUZZ_BUILD)/%.o,$(LIB_SRC))
FUZZ_UTIL_OBJ := $(FUZZ_BUILD)/tests/fuzz/fuzz_util.o $(FUZZ_BUILD)/tests/fuzz/fuzz_image.o
FUZZ_BINS := $(patsubst %,$(FUZZ_BUILD)/fuzz_%,$(FUZZERS))
.SECONDARY: $(patsubst %,$(FUZZ_BUILD)/tests/fuzz/fuzz_%.o,$(FUZZERS)) $(FUZZ_UTIL_OBJ)
# The environment of every fuzz run: leaks fail (third-party leaks suppressed, each explained in
# tests/fuzz/lsan-fuzz.supp), UBSan stops at the first report.
FUZZ_ENV := ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
            LSAN_OPTIONS=suppressions=$(CURDIR)/tests/fuzz/lsan-fuzz.supp:print_suppressions=0 \
            UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 OMP_NUM_THREADS=1
FUZZ_OPTS := -rss_limit_mb=2048 -timeout=10 -print_final_stats=1

$(FUZZ_BUILD)/%.o: %.c $(wildcard lib/*.h viz/*.h tests/fuzz/*.h)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_BUILD)/libnullmap-fuzz.a: $(FUZZ_LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(FUZZ_BUILD)/fuzz_%: $(FUZZ_BUILD)/tests/fuzz/fuzz_%.o $(FUZZ_UTIL_OBJ) $(FUZZ_BUILD)/libnullmap-fuzz.a
	$(FUZZ_CC) $(FUZZ_SAN) -fsanitize=fuzzer -fopenmp -o $@ $< $(FUZZ_UTIL_OBJ) $(FUZZ_BUILD)/libnullmap-fuzz.a \
	    $(PKG_LIBS) -ljpeg $(BLAS_LIBS) -lm

fuzz: deps
	@$(MAKE) --no-print-directory $(FUZZ_BINS)

# Each harness in turn on a scratch copy of its corpus (new inputs go to build-fuzz/corpus/, the
# committed corpus stays small); prints libFuzzer's final stats (execs, cov, ft, exec/s).
fuzz-run: fuzz
	@set -e; for f in $(FUZZERS); do \
	    mkdir -p $(FUZZ_BUILD)/corpus/$$f $(FUZZ_BUILD)/artifacts/$$f; \
	    echo "== fuzz_$$f: $(if $(FUZZ_RUNS),$(FUZZ_RUNS) runs,$(FUZZ_SECONDS) s)"; \
	    $(FUZZ_ENV) $(FUZZ_BUILD)/fuzz_$$f $(FUZZ_OPTS) \
	        $(if $(FUZZ_RUNS),-runs=$(FUZZ_RUNS),-max_total_time=$(FUZZ_SECONDS)) \
	        -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$f/ $$([ -f tests/fuzz/dict/$$f.dict ] && echo -dict=tests/fuzz/dict/$$f.dict) \
	        $(FUZZ_BUILD)/corpus/$$f tests/fuzz/corpus/$$f >$(FUZZ_BUILD)/fuzz_$$f.log 2>&1 \
	        || { tail -n 60 $(FUZZ_BUILD)/fuzz_$$f.log; echo "fuzz_$$f: FAILED (inputs in $(FUZZ_BUILD)/artifacts/$$f/)"; exit 1; }; \
	    grep -E '^#[0-9]+[[:space:]]+DONE|^stat::' $(FUZZ_BUILD)/fuzz_$$f.log | tr '\n' ' '; echo; \
	done

# Every committed input once: the corpora and the regression inputs of past crashes.
fuzz-regress: fuzz
	@set -e; for f in $(FUZZERS); do \
	    files=$$(find tests/fuzz/corpus/$$f tests/fuzz/crashes/$$f -type f 2>/dev/null | sort); \
	    $(FUZZ_ENV) $(FUZZ_BUILD)/fuzz_$$f -runs=1 $$files >$(FUZZ_BUILD)/regress_$$f.log 2>&1 \
	        || { tail -n 60 $(FUZZ_BUILD)/regress_$$f.log; echo "fuzz_$$f: regression input failed"; exit 1; }; \
	    echo "fuzz_$$f: $$(echo $$files | wc -w) inputs ok"; \
	done

clean:
	rm -rf build build-san build-fuzz out
