# carhook — one command to run it, one to test it. See README.md.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
STACK := deploy/stack/stack.sh
DEV_TOKEN := carhook-dev-token-NOT-FOR-PRODUCTION
export CARHOOK__SMARTCAR__MANAGEMENT_TOKENS ?= $(DEV_TOKEN)
RECEIVER_LISTEN := $(or $(CARHOOK__RECEIVER__LISTEN),127.0.0.1:8080)
RECEIVER_ADMIN := $(or $(CARHOOK__RECEIVER__ADMIN_LISTEN),127.0.0.1:9090)

.PHONY: up down run test lint bench fuzz chaos stack-up stack-down build-release status

## up: build release binaries, start Kafka + Cassandra, the receiver and one processor; wait for readiness.
up: build-release stack-up
	@deploy/services.sh start
	@token="$$CARHOOK__SMARTCAR__MANAGEMENT_TOKENS"; \
	echo ""; \
	echo "carhook is up."; \
	echo "  webhook URL : http://$(RECEIVER_LISTEN)/webhooks/smartcar"; \
	if [ "$$token" = "$(DEV_TOKEN)" ]; then echo "  token       : $$token  (development token; set CARHOOK__SMARTCAR__MANAGEMENT_TOKENS for real use)"; \
	else echo "  token       : from CARHOOK__SMARTCAR__MANAGEMENT_TOKENS ($$(echo "$$token" | tr ',' '\n' | wc -l) configured)"; fi; \
	echo "  health      : http://$(RECEIVER_ADMIN)/health  and  http://$${CARHOOK__PROCESSOR__ADMIN_LISTEN:-127.0.0.1:9091}/health  (also /ready, /metrics)"; \
	echo "  logs        : $(CURDIR)/.stack/logs/{receiver,processor,kafka,cassandra}.log"; \
	echo "  stop        : make down"

## down: stop everything `make up` started.
down:
	@deploy/services.sh stop
	@$(STACK) down

## run: make up, then follow the logs; Ctrl-C stops everything.
run: up
	@trap '$(MAKE) --no-print-directory down' INT TERM EXIT; tail -n 20 -F .stack/logs/receiver.log .stack/logs/processor.log

status:
	@$(STACK) status; deploy/services.sh status

build-release:
	cargo build --release --bin receiver --bin processor

stack-up:
	@$(STACK) up

stack-down:
	@$(STACK) down

## test: start the stack if needed, then unit + integration tests against real Kafka and CQL, then lint.
## The outage suite (it stops and restarts the broker and the store) runs first: a broker restarts
## in time proportional to the partitions it holds, and the other suites add thousands.
test: stack-up
	cargo build --workspace --bins
	cargo test -p carhook-tests --test outage --no-fail-fast
	cargo test --workspace --no-fail-fast --exclude carhook-tests
	cargo test -p carhook-tests --no-fail-fast --lib --bins --test it
	bash deploy/check-observability.sh
	bash helm/check.sh
	@$(MAKE) --no-print-directory lint

## bench: measure each figure next to its limit (release build, real broker and store); writes bench/.
## BENCH_ARGS picks figures and runs, e.g. BENCH_ARGS='--figure processor --runs 3' (see --help).
bench: stack-up
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) # the receiver figure's load
	cargo build --release --bin carhook-bench --bin processor --bin receiver
	BENCH_GIT=$$(git rev-parse --short HEAD) target/release/carhook-bench $(BENCH_ARGS)

## chaos: the fault campaign at a larger size (kill -9 of every part, SIGSTOP), against ground truth.
chaos: stack-up
	cargo build --workspace --bins
	CHAOS_VEHICLES=$${CHAOS_VEHICLES:-60} CHAOS_EVENTS_PER_VEHICLE=$${CHAOS_EVENTS_PER_VEHICLE:-60} \
	  cargo test -p carhook-tests --test outage -- fault_campaign --nocapture

## fuzz: cargo-fuzz on signature verification, envelope parsing, event parsing (FUZZ_SECONDS each, default 60).
fuzz:
	bash fuzz/run.sh

## lint: formatting, clippy with warnings as errors, cargo-deny (licences, bans, sources; advisories
## only with CARGO_DENY_ADVISORIES=1, since the advisory database cannot be fetched here).
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	@command -v cargo-deny >/dev/null || cargo install cargo-deny --locked
	cargo deny check licenses bans sources $${CARGO_DENY_ADVISORIES:+advisories}
