# nullmap — build, test, demo, bench, install.
#
#   make               build the library (static + shared) and the `nullmap` tool
#   make test          install Debian packages if missing, build, run the Check suite + CLI tests
#   make test SAN=1    the same under AddressSanitizer + UBSan (separate build dir build-san/)
#   make valgrind      a full `nullmap run` under valgrind, failing on any leak or error
#   make killtest      crash safety: batch and train killed (SIGKILL) at random moments and
#                      resumed, concurrent readers (minutes; KILLTEST_ARGS=--seed 2 …)
#   make demo          install, build, run the shipped trained model on a held-out sample image
#   make bench         speed benchmarks (ratios measured side by side in one run)
#   make install PREFIX=/usr/local
#
# Variables: SAN=1, OPT=-O2, PREFIX=/usr/local, NVCC=auto (path to nvcc or "none").

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

# CUDA: detected, built when present (the GPU backend arrives with issue 5; kernels/ holds it).
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)

LIB_SRC := $(wildcard lib/*.c) $(wildcard viz/*.c)
LIB_OBJ := $(patsubst %.c,$(BUILD)/%.o,$(LIB_SRC))
TOOL_SRC := $(wildcard tools/*.c)
TOOL_OBJ := $(patsubst %.c,$(BUILD)/%.o,$(TOOL_SRC))
TEST_SRC := $(wildcard tests/test_*.c) tests/check_main.c tests/test_util.c
TEST_OBJ := $(patsubst %.c,$(BUILD)/%.o,$(sort $(TEST_SRC)))
BENCH_SRC := $(wildcard tests/bench/*.c)

VERSION := 0.1.0
NULLMAP := $(BUILD)/nullmap

.PHONY: all deps test valgrind killtest demo bench install clean fixtures

CU_SRC := $(wildcard kernels/*.cu)

all: $(NULLMAP) $(BUILD)/libnullmap.a $(BUILD)/libnullmap.so
ifeq ($(NVCC),)
	@echo "nullmap: nvcc not found: CPU backend only (set NVCC=/path/to/nvcc to build the CUDA backend)"
else ifeq ($(CU_SRC),)
	@echo "nullmap: nvcc found at $(NVCC); no CUDA kernels in kernels/ yet: CPU backend only"
endif

deps:
	@tools/install-deps.sh

$(BUILD)/%.o: %.c $(wildcard lib/*.h viz/*.h tests/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -DNM_VERSION='"$(VERSION)"' -c $< -o $@

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
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' -e 's|@BLAS_DIR@|$(BLAS_DIR)|' \
	    lib/nullmap.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/nullmap.pc

clean:
	rm -rf build build-san out
