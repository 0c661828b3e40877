"""The bench runs every measurement on a tiny model and writes one object per measurement with its speedup (a
behaviour check: speed itself is not asserted)."""
import json

import pytest
import torch

from tools import bench


def test_bench_writes_every_measurement(tiny_chat_dir, tmp_path):
    out = tmp_path / "bench.json"
    cfg = bench.parse_args([f"--model={tiny_chat_dir}", "--examples=2", "--prompt_max=120", "--completion_max=20",
                            "--samples=3", "--sample_tokens=6", "--answer_tokens=3", f"--out={out}"])
    res = bench.main(cfg)
    saved = json.loads(out.read_text())
    assert set(saved) >= {"sampling", "answers", "inner_loop", "arc_inner", "knowledge_inner", "knowledge_answers",
                          "arc_eval", "device", "dtype", "model", "date"}
    for key in ("sampling", "answers", "inner_loop", "arc_inner", "knowledge_inner", "knowledge_answers"):
        assert saved[key]["speedup"] > 0 and saved[key]["ours_tok_s"] > 0 and saved[key]["theirs_tok_s"] > 0
    assert saved["sampling"]["samples_per_prompt"] == 3 and saved["answers"]["prompts"] == 40
    # the knowledge preset's shapes: bf16, batch 1 (one step per sequence), every token after the first a target;
    # its reward's sampling: 8 answers to each of 10 questions
    # the ARC preset's: inner_loop's data and adapter (fp32 on a CPU) on bf16 weights
    arc, fp32 = saved["arc_inner"], saved["inner_loop"]
    assert arc["dtype"] == "torch.bfloat16" and fp32["dtype"] == "torch.float32"
    assert (arc["real_tokens"], arc["lora_params"], arc["steps"]) == (fp32["real_tokens"], fp32["lora_params"],
                                                                      fp32["steps"])
    assert arc["first_loss_ours"] == pytest.approx(fp32["first_loss_ours"], abs=5e-2)
    kn = saved["knowledge_inner"]
    assert kn["dtype"] == "torch.bfloat16" and kn["steps"] == kn["examples"] == 12
    assert kn["target_tokens"] == kn["real_tokens"] - 12 and kn["padded_tokens_baseline"] == kn["real_tokens"]
    assert kn["lora_params"] == 2 * 32 * sum(i + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128),
                                                                   (64, 128), (128, 64)])  # r32 on all 7, 2 layers
    assert kn["first_loss_ours"] == pytest.approx(kn["first_loss_theirs"], abs=2e-2)  # bf16 on both sides
    ka = saved["knowledge_answers"]
    assert ka["prompts"] == 10 and ka["samples_per_prompt"] == 8 and ka["same_rows"] is None
    assert saved["arc_eval"]["steps"] > 0 and saved["arc_eval"]["seconds"] >= saved["arc_eval"]["train_seconds"]
    assert res["inner_loop"]["first_loss_ours"] == res["inner_loop"]["first_loss_theirs"] or \
        abs(res["inner_loop"]["first_loss_ours"] - res["inner_loop"]["first_loss_theirs"]) < 1e-3


def test_bench_on_random_weights_of_a_shape(monkeypatch, tmp_path):
    """random:NAME (what the GPU bench adds for Llama-3.2-1B) builds both models from SHAPES, and the decoding
    figures (prefill apart, step time, GB/s against the bytes a step must read) come out for both measurements."""
    from conftest import LLAMA
    monkeypatch.setitem(bench.SHAPES, "tiny", {**LLAMA, "eos_token_id": 2})
    cfg = bench.parse_args(["--model=random:tiny", "--only=sampling,answers,inner_loop", "--examples=2",
                            "--prompt_min=20", "--prompt_max=60", "--completion_max=10", "--samples=2", "--sample_tokens=5",
                            "--answer_tokens=3", f"--out={tmp_path / 'b.json'}"])
    res = bench.main(cfg)
    assert res["model"] == "random:tiny" and "arc_eval" not in res
    assert res["answers"]["same_rows"] == 40  # greedy: both stacks decode the same tokens for every question
    assert res["sampling"]["same_rows"] is None  # sampled: no comparison
    for key in ("sampling", "answers"):
        r = res[key]
        assert r["prefill_seconds_ours"] > 0 and r["step_ms_ours"] > 0 and r["decode_gb_s_ours"] > 0
    ours, _ = bench.build_models("random:tiny", 0, "cpu", torch.float32)
    weights = sum(p.numel() for p in ours.parameters()) * 4  # fp32, untied
    kv_per_token = 2 * 2 * 2 * 16 * 4  # keys and values, 2 layers, 2 KV heads of 16, fp32
    # one 700-token prompt read once, plus 2 samples' own tokens, 2.5 of them on average over 5 steps
    assert res["sampling"]["bytes_per_step"] == pytest.approx(weights + kv_per_token * (700 + 2 * 2.5))
    assert res["inner_loop"]["first_loss_ours"] == pytest.approx(res["inner_loop"]["first_loss_theirs"], abs=1e-3)
    # the figure of merit, counted by hand for LLAMA (dim 64, 4 heads and 2 KV heads of 16, FFN 128, 2 layers) with
    # r=128 LoRA on q, v, gate, up, down: the base's products forward and backward (4 FLOPs a weight), the adapter's
    # with its weight gradients (6 FLOPs a weight)
    il = res["inner_loop"]
    base = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 3 * 64 * 128                     # weights of one layer's products
    adapter = 128 * ((64 + 64) + (64 + 32) + 2 * (64 + 128) + (128 + 64))          # r * (in + out), per layer
    assert il["lora_params"] == 2 * adapter
    assert il["flops_per_token"] == 4 * 2 * base + 6 * 2 * adapter == 1523712
    assert il["flop_s_ours"] == pytest.approx(il["ours_tok_s"] * il["flops_per_token"])
    peak = il["matmul_peak"]
    assert peak["dtype"] == "torch.float32" and peak["threads"] == 1 and len(peak["by_shape"]) == 3
    assert peak["peak_flop_s"] == max(peak["by_shape"].values()) > 0
    assert il["share_of_matmul_peak_ours"] == pytest.approx(il["flop_s_ours"] / peak["peak_flop_s"])
    assert "mfu_ours" not in il  # a CPU has no card peak: the measured matmul peak is its ceiling
    with pytest.raises(SystemExit, match="unknown shape"):
        bench.main(bench.parse_args(["--model=random:nope", "--only=sampling", "--out="]))


def test_card_peaks_match_exact_names_first():
    assert bench.card_peaks_of("NVIDIA H200") == (989.0, 4800.0)
    assert bench.card_peaks_of("NVIDIA H200 NVL") == (835.0, 4800.0)  # not the H200's
    assert bench.card_peaks_of("NVIDIA H100 NVL") == (835.0, 3900.0)  # not the H100's
    assert bench.card_peaks_of("NVIDIA GH200 480GB") == (989.0, 4000.0)  # not the H200's 4800 GB/s
    assert bench.card_peaks_of("NVIDIA H100 PCIe") == (756.0, 2000.0)
    assert bench.card_peaks_of("NVIDIA L40S") == (362.0, 864.0)
    assert bench.card_peaks_of("NVIDIA H200 MIG 1g.18gb") == (None, None)  # a slice: not the whole card's
    assert bench.card_peaks_of("NVIDIA A100-SXM4-40GB MIG 3g.20gb") == (None, None)
    assert bench.card_peaks_of("NVIDIA RTX 4090") == (None, None)
    assert bench.card_peaks_of("NVIDIA L40") == (None, None)  # not L40S's
    assert bench.card_peaks_of("cpu") == (None, None)


def test_each_measurement_is_on_disk_as_soon_as_it_is_measured(tmp_path):
    """gpu_check.py cuts a bench off at its cap: what it measured before must already be in --out."""
    import os
    import subprocess
    import sys
    import time
    from conftest import ROOT
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "tools/bench.py", "--model=random:tiny", "--only=inner_loop,sampling",
                             "--examples=2", "--prompt_min=20", "--prompt_max=40", "--completion_max=12",
                             "--samples=8", "--sample_tokens=4000", f"--out={out}"],  # a long sampling race
                            cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        t0 = time.monotonic()
        while not out.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.1)
        assert proc.poll() is None  # still sampling
        saved = json.loads(out.read_text())
        assert saved["inner_loop"]["steps"] == 1 and "sampling" not in saved
    finally:
        proc.kill()
        proc.wait()


def test_references_that_raise_leave_our_figures(monkeypatch, tmp_path):
    """transformers and PEFT meet versions and configs this code has not seen: a baseline that raises, or a
    reference generate that rejects its settings, costs only their own figures. Ours are measured and saved, and
    why the reference failed is kept beside them."""
    import peft
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError("refused by this version")
    monkeypatch.setattr(peft, "get_peft_model", refuse)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "generate", refuse)
    out = tmp_path / "b.json"
    bench.main(bench.parse_args(["--model=random:tiny", "--only=sampling,answers,inner_loop", "--examples=2",
                                 "--prompt_min=20", "--prompt_max=40", "--completion_max=10", "--samples=2",
                                 "--sample_tokens=4", "--answer_tokens=3", f"--out={out}"]))
    saved = json.loads(out.read_text())
    for key in ("inner_loop", "sampling", "answers"):
        r = saved[key]
        assert r["ours_tok_s"] > 0 and "speedup" not in r and "theirs_tok_s" not in r, key
        assert "refused by this version" in str(r["reference_errors"]), key
    assert saved["inner_loop"]["steps"] == 1 and saved["inner_loop"]["flop_s_ours"] > 0
    # a reference that cannot even be built: every figure of ours still comes back
    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", refuse)
    res = bench.main(bench.parse_args(["--model=random:tiny", "--only=answers,inner_loop", "--examples=2",
                                       "--prompt_min=20", "--prompt_max=40", "--completion_max=10",
                                       "--answer_tokens=3", "--out="]))
    assert res["inner_loop"]["ours_tok_s"] > 0 and res["answers"]["ours_tok_s"] > 0
    assert "refused" in res["reference_errors"]["build"]


def test_an_evaluation_that_stops_early_is_timed_without_its_phases(tiny_chat_dir):
    """An ARC evaluation that stops before training (here an unreadable self-edit) has no training or answering
    seconds: they come back as None beside the reason, not as a KeyError that loses the stage."""
    import seal
    from domains import arc
    acfg = arc.ArcConfig(model=str(tiny_chat_dir), split="tiny", fmt="compact", device="cpu")
    learner = seal.Learner(acfg, acfg.model)
    dom = arc.Arc(acfg, learner.tok)
    res = bench.timed_arc_eval(learner, dom, dom.eval_items[0], "not a self-edit", "tiny")
    assert res["train_seconds"] is None and res["answer_seconds"] is None and res["reward"] == 0
    assert res["reason"] and res["seconds"] > 0
