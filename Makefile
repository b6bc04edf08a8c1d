# Developer shortcuts.  `make` builds in place, `make debug` builds with debug info.
PY ?= python3

.PHONY: build debug test clean bench
build:
	$(PY) setup.py build_ext --inplace

debug:
	MTP_CY_DEBUG=1 MTP_CY_BUILD_DIR=build/native-debug $(PY) setup.py build_ext --inplace --force

test: build
	$(PY) -m pytest -ra

bench: build
	$(PY) benchmarks/bench_mtp.py

clean:
	rm -rf build/temp.* mtp_cy/_core.cpp mtp_cy/*.so
