"""End to end on the real embedded model (SmolLM2-135M-Instruct), loaded once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kvpolicies
from kvpolicies import CompressedCache
from kvpolicies.cli import main
from kvpolicies.integrations.lm_eval import KVPoliciesLM
from tests.helpers import TASKS, evaluate

pytestmark = pytest.mark.slow

LONG_PROMPT = (
    "Read the notes and answer the question.\n"
    + " ".join(f"Note {i}: the shelf {i} holds {i * 7 % 13} red boxes and {i * 5 % 11} blue boxes." for i in range(40))
    + "\nQuestion: how many red boxes does shelf 3 hold?"
)


def chat_ids(tokenizer, text: str) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def generate(model, inputs, cache=None, tokens: int = 24) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, cache=cache, max_new_tokens=tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:]


def test_embedded_model_geometry(real_model):
    model, _ = real_model
    shape = kvpolicies.CacheShape.from_config(model.config, model.dtype)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (30, 3, 64)
    assert shape.entry_bytes * shape.cells == 46_080  # full KV per token in fp32


def test_full_budget_generation_is_token_identical_to_the_plain_model(real_model):
    model, tokenizer = real_model
    inputs = chat_ids(tokenizer, LONG_PROMPT)
    plain = generate(model, inputs)
    for policy, budget in (("full", 0.5), ("l2norm", 1.0)):
        assert torch.equal(generate(model, inputs, CompressedCache(model, kvpolicies.get_policy(policy), budget)), plain)


def test_half_budget_greedy_generation_halves_the_cache(real_model):
    model, tokenizer = real_model
    inputs = chat_ids(tokenizer, LONG_PROMPT)
    prompt_tokens = inputs["input_ids"].shape[1]
    assert prompt_tokens > 800
    cache = CompressedCache(model, kvpolicies.get_policy("l2norm"), kvpolicies.Budget(value=0.5, slack_tokens=0))
    with torch.no_grad():
        model(**inputs, cache=cache)
    stats = cache.stats()
    assert stats.full_bytes == prompt_tokens * 46_080
    assert stats.resident_bytes == pytest.approx(stats.full_bytes / 2, rel=0.01)
    kept = cache.kept_per_head()[:, 0]
    assert (kept[:2] == prompt_tokens).all()  # the paper's uncompressed first layers ...
    assert int(kept[2:].max()) < prompt_tokens / 2  # ... paid for by the others

    cache = CompressedCache(model, kvpolicies.get_policy("l2norm"), 0.5)
    text = tokenizer.decode(generate(model, inputs, cache), skip_special_tokens=True)
    assert text.strip()  # the compressed model still talks; its accuracy is for the leaderboard to measure
    assert cache.get_seq_length() == prompt_tokens + 23


def test_cli_generate_prints_text_and_memory(capsys):
    assert main(["generate", "--policy", "streaming", "--budget", "0.5", "--max-new-tokens", "12", LONG_PROMPT]) == 0
    out = capsys.readouterr().out
    assert "KV entries kept / full" in out and "resident KV bytes / full" in out
    assert "streaming" in out


def test_cached_conversion_is_identical_to_loading_the_gguf(real_model):
    """The converted-weights cache (a save_pretrained workaround) must not change a single logit."""
    from transformers import AutoModelForCausalLM

    from kvpolicies.integrations.models import embedded_gguf

    model, tokenizer = real_model
    gguf = embedded_gguf()
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    ).to(model.device, model.dtype).eval()
    ids = tokenizer("Paris is the capital of", return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, model(ids).logits)


def test_head_scores_find_sparse_retrieval_heads_and_drive_headkv(real_model, tmp_path):
    from kvpolicies.experiments.head_scores import (
        load_head_scores,
        retrieval_scores,
        save_head_scores,
    )

    model, tokenizer = real_model
    scores = retrieval_scores(model, tokenizer, samples=2, context_tokens=600, seed=1)
    assert scores.shape == (30, 3)
    assert float(scores.min()) >= 0 and float(scores.max()) <= 1
    assert float(scores.max()) > 0.2  # retrieval heads exist ...
    assert float((scores > 0.1).float().mean()) < 0.2  # ... and they are few
    path = tmp_path / "heads.json"
    save_head_scores(path, scores, model="embedded")
    torch.testing.assert_close(load_head_scores(path, smoothing=0.0), scores.double())

    policy = kvpolicies.get_policy("headkv", allocation="static", head_scores=str(path))
    cache = CompressedCache(model, policy, 0.25)
    allocation = cache.allocation(1000)
    assert int(allocation.tokens.sum()) == allocation.total
    top_layer, top_head = divmod(int(scores.argmax()), 3)
    assert int(allocation.tokens[top_layer, top_head]) == 1000  # the strongest retrieval head stays whole


def test_cli_inspect_prints_a_layer_by_head_table(capsys):
    assert main(["inspect", "--policy", "pyramidkv", "--budget", "0.25", "--tokens", "1000"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    assert len(lines) == 30
    first, last = (int(lines[0].split()[1]), int(lines[-1].split()[1]))
    assert first > 400 and last < 50
    assert "total: 22,500 of 90,000 entries (25.0%)" in out


def test_analyze_norms_reports_the_correlation_per_layer_and_head(capsys, tmp_path):
    """On natural text the paper's mechanism shows on this model: low key norms draw attention in most cells."""
    assert main(["analyze", "norms", "--tokens", "1024", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    negative, total = (int(x) for x in out.split("Spearman rho < 0 in ")[1].split(" layer")[0].split(" of "))
    assert total == 90 and negative >= 75
    assert (tmp_path / "norm_attention_spearman.png").exists() and (tmp_path / "norm_attention_scatter.png").exists()


ZOO = [info.name for info in kvpolicies.list_policies() if info.policy_class.compresses]


def test_every_policy_generates_and_evaluates_through_lm_eval_on_the_embedded_model(real_model):
    """Every registered policy through both user paths, on the loaded model (no reload per policy): greedy
    generation with decode-time eviction, and an lm-eval task through the adapter. The command-line entry points of
    both are run once, above and below."""
    model, tokenizer = real_model
    inputs = chat_ids(tokenizer, LONG_PROMPT).to(model.device)
    for name in ZOO:
        cache = CompressedCache(model, kvpolicies.get_policy(name), 0.5, tokenizer=tokenizer)
        assert len(generate(model, inputs, cache, tokens=4)) == 4, name
        assert 0.5 <= cache.stats().kept_fraction < 0.52, name  # half, plus what 4 tokens add within the slack

        lm = KVPoliciesLM(pretrained=model, tokenizer=tokenizer, policy=name, budget=0.25)
        results = evaluate(lm, ["kvp_passkey"], {"lengths": [512], "depths": [0.5], "per_cell": 1}, limit=1)
        assert results["config"]["kvpolicies"]["policy"] == name
        assert results["config"]["kvpolicies"]["kv_memory"]["resident_fraction_mean"] < 0.35, name


def test_lm_eval_drop_in_runs_on_the_embedded_model_and_names_its_results_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["lm-eval", "--model", "kvpolicies", "--model_args", "policy=headkv,budget=0.25",
                 "--tasks", "kvp_passkey", "--include_path", TASKS, "--limit", "1",
                 "--metadata", json.dumps({"lengths": [512], "depths": [0.5], "per_cell": 1}),
                 "--output_path", "out"]) == 0
    written = list(Path("out").rglob("results_*.json"))
    assert [path.parent.name for path in written] == ["smollm2-135m-instruct"]  # not a random folder name
    results = json.loads(written[0].read_text())
    assert results["config"]["kvpolicies"]["policy"] == "headkv"
