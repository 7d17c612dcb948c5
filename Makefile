# Switchboard — every target a user needs. `make run` and `make test` are the two commands.
CARGO ?= cargo
DB ?= data/switchboard.db

.PHONY: run build release test unit integration bench-quick bench fmt clippy clean

run: release ## build, migrate data/switchboard.db, serve the demo on 127.0.0.1:6001
	./target/release/switchboard serve --demo --database sqlite://$(DB)

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release --bin switchboard

test: build ## every test: unit tests of the domain and black-box tests against a real server
	$(CARGO) test --workspace --all-targets -- --test-threads=4

unit:
	$(CARGO) test -p switchboard-actors -p switchboard

integration: build
	$(CARGO) test -p switchboard-integration -- --test-threads=4

bench-quick: ## 20k messages from 50 HTTP clients, 100 WebSocket subscribers
	$(CARGO) build --release -p switchboard -p switchboard-integration --bin switchboard --bin switchboard-bench
	./target/release/switchboard-bench quick

bench: ## every scenario at its target size (~4 min), merged into bench/results/<date>.json
	$(CARGO) build --release -p switchboard -p switchboard-integration --bin switchboard --bin switchboard-bench
	$(CARGO) build --release -p switchboard-actors --example persistence_bench
	./bench/run-all.sh

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets

clean:
	$(CARGO) clean
