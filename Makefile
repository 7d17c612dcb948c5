# Switchboard — every target a user needs. `make run` and `make test` are the two commands.
CARGO ?= cargo
DB ?= data/switchboard.db

# Tests run with a PostgreSQL and a Redis on loopback (installed and started when needed) and a
# throwaway database per run: see scripts/test-services.sh.
SERVICES := bash scripts/test-services.sh

.PHONY: run build release test unit integration services cluster bench-quick bench bench-cluster fmt clippy clean

run: release ## build, migrate data/switchboard.db, serve the demo on 127.0.0.1:6001
	./target/release/switchboard serve --demo --database sqlite://$(DB)

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release --bin switchboard

test: services build ## every test: unit tests of the domain and black-box tests against a real server
	$(SERVICES) $(CARGO) test --workspace --all-targets -- --test-threads=4

unit:
	$(SERVICES) $(CARGO) test -p switchboard-actors -p switchboard

integration: services build
	$(SERVICES) $(CARGO) test -p switchboard-integration -- --test-threads=4

# First, so that a missing service fails fast and libpq-dev is there before the build.
services: ## make sure the local PostgreSQL and Redis run (installs them when missing)
	$(SERVICES) --ensure

cluster: services release ## three nodes on 127.0.0.1:6001-6003, one PostgreSQL database, one Redis (docs/cluster.md)
	bash scripts/cluster.sh

bench-quick: ## 20k messages from 50 HTTP clients, 100 WebSocket subscribers
	$(CARGO) build --release -p switchboard -p switchboard-integration --bin switchboard --bin switchboard-bench
	./target/release/switchboard-bench quick

bench: ## every scenario at its target size (~4 min), merged into bench/results/<date>.json
	$(CARGO) build --release -p switchboard -p switchboard-integration --bin switchboard --bin switchboard-bench
	$(CARGO) build --release -p switchboard-actors --example persistence_bench
	./bench/run-all.sh

bench-cluster: ## one node vs three (shared database, own Redis): idle sockets and fan-out, one run (~4 min)
	$(CARGO) build --release -p switchboard -p switchboard-integration --bin switchboard --bin switchboard-bench
	./bench/run-cluster.sh

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets

clean:
	$(CARGO) clean
