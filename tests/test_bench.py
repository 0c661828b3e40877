"""The bench runs every measurement on a tiny model and writes one object per measurement with its speedup (a
behaviour check: speed itself is not asserted)."""
import json

import bench


def test_bench_writes_every_measurement(tiny_chat_dir, tmp_path):
    out = tmp_path / "bench.json"
    cfg = bench.parse_args([f"--model={tiny_chat_dir}", "--examples=2", "--prompt_max=120", "--completion_max=20",
                            "--samples=3", "--sample_tokens=6", "--answer_tokens=3", f"--out={out}"])
    res = bench.main(cfg)
    saved = json.loads(out.read_text())
    assert set(saved) >= {"sampling", "answers", "inner_loop", "arc_eval", "device", "dtype", "model", "date"}
    for key in ("sampling", "answers", "inner_loop"):
        assert saved[key]["speedup"] > 0 and saved[key]["ours_tok_s"] > 0 and saved[key]["theirs_tok_s"] > 0
    assert saved["sampling"]["samples_per_prompt"] == 3 and saved["answers"]["prompts"] == 40
    assert saved["arc_eval"]["steps"] > 0 and saved["arc_eval"]["seconds"] >= saved["arc_eval"]["train_seconds"]
    assert res["inner_loop"]["first_loss_ours"] == res["inner_loop"]["first_loss_theirs"] or \
        abs(res["inner_loop"]["first_loss_ours"] - res["inner_loop"]["first_loss_theirs"]) < 1e-3
