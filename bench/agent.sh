#!/usr/bin/env bash
# Benchmark: the coding agent harness's own overhead against a model with zero think time
# (tests/fake-llm/scripted_model.py), in one run (bench/agent.py):
#   - a tool round trip: from the end of the model's `tool_use` answer to the tool's result
#     reaching the model, for `bash true`, p50/p99, beside a plain `ssh VM@HOST true`;
#   - chat delivery: from the model sending a text delta to the chat's SSE stream (what the
#     browser's EventSource reads, through the HTTPS edge) delivering it, p50/p99.
# Run as root after `scripts/build release` and `nook image build IMAGE`:
#   bench/agent.sh [IMAGE]        (default: tiny; BENCH_ROUNDS sets the tool calls per run)
# NOOK_IMAGES_DIR picks the images (default /var/lib/nook/images); NOOK_BIN the nook binary.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-tiny}
nook=${NOOK_BIN:-$PWD/target/release/nook}
tmp=$(mktemp -d /tmp/nook-agent-bench.XXXX)
cleanup() {
  NOOK_DATA_DIR=$tmp/data "$nook" vm rm bench >/dev/null 2>&1 || true
  kill "${nook_pid:-}" "${model_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); https=$(free_port)
key=sk-ant-bench
coproc MODEL { exec python3 tests/fake-llm/scripted_model.py --port 0 --anthropic-key "$key"; }
model_pid=$MODEL_PID
read -r _ model_port <&"${MODEL[0]}"
mkdir -p "$tmp/data"
cat >"$tmp/data/nook.toml" <<TOML
llm_anthropic_base_url = "http://127.0.0.1:$model_port"
llm_anthropic_key = "$key"
agent_model = "anthropic/fake-claude"
[llm_prices.anthropic.fake-claude]
input = 1.0
output = 2.0
TOML
ssh-keygen -q -t ed25519 -N '' -f "$tmp/key"
opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR -i "$tmp/key")
lobby() { ssh "${opts[@]}" -p "$port" lobby@127.0.0.1 "$@"; }

# User-mode networking: every tool call goes through the guest agent, so no taps are needed.
NOOK_DATA_DIR=$tmp/data NOOK_SSH_ADDR=127.0.0.1:$port NOOK_NET=user NOOK_HTTPS_ADDR=127.0.0.1:$https \
  NOOK_VM_PORTS=off "$nook" serve >"$tmp/nook.log" 2>&1 &
nook_pid=$!
for _ in $(seq 100); do lobby signup bench@example.com >/dev/null 2>&1 && break; sleep 0.1; done
NOOK_DATA_DIR=$tmp/data "$nook" account credit bench@example.com --set 1000 >/dev/null
lobby new --name bench --image "$image" >/dev/null
login=$(lobby browser | grep -o 'token=[^ ]*' | head -1 | cut -d= -f2)
BENCH_HTTPS_PORT=$https BENCH_SSH_PORT=$port BENCH_MODEL_PORT=$model_port BENCH_LOGIN_TOKEN=$login \
  BENCH_KEY=$tmp/key BENCH_CA=$(NOOK_DATA_DIR=$tmp/data "$nook" ca path) \
  python3 bench/agent.py
