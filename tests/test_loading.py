"""How models load (device, dtype, device_map, attention, revision): the same options for generate, bench, sweeps
and grid files, carried to where the model loads, dtype and revision in each cell's key, the rest in its record."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import kvpolicies
from kvpolicies.cli import build_parser, main
from kvpolicies.cli.sweeps import sweep_config
from kvpolicies.errors import UsageError
from kvpolicies.experiments.grid import SweepConfig, cells
from kvpolicies.experiments.sweep import run_sweep
from kvpolicies.integrations.loading import Loading
from kvpolicies.integrations.lm_eval import KVPoliciesLM
from kvpolicies.integrations.models import load_model


@pytest.fixture(scope="module")
def eight_b_attention(tmp_path_factory, tiny_pretrained) -> str:
    """Llama-3-8B's attention shapes (32 query heads, 8 KV heads, head_dim 128, RoPE theta 500k) in one layer, with
    a small MLP and vocabulary so that it loads in a second: what device_map and dtype must carry on a CPU."""
    folder = tmp_path_factory.mktemp("llama3-8b-attention")
    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_device_map_auto_places_the_model_through_accelerate_and_compresses_it(eight_b_attention):
    model, tokenizer = load_model(eight_b_attention, device_map="auto", dtype="bfloat16", attn_implementation="eager")
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # all a CPU-only machine has
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(3, len(tokenizer), (1, 96))
    with torch.no_grad():
        plain = model(ids, logits_to_keep=1).logits
        kept = model(ids, cache=kvpolicies.CompressedCache(model, "snapkv", 1.0), logits_to_keep=1).logits
        cache = kvpolicies.CompressedCache(model, "snapkv", 0.25)
        model(ids, cache=cache)
    assert torch.equal(kept, plain)  # budget 1.0 is the model itself
    stats = cache.stats()
    assert stats.resident_bytes == stats.physical_bytes and stats.kept_fraction <= 0.25 + 1e-9


def test_a_device_and_a_device_map_together_are_refused(eight_b_attention):
    with pytest.raises(UsageError, match="not both"):
        load_model(eight_b_attention, device="cpu", device_map="auto")
    with pytest.raises(ValidationError, match="not both"):
        Loading(device="cpu", device_map="auto")
    with pytest.raises(UsageError, match="not both"):
        KVPoliciesLM(pretrained=eight_b_attention, policy="snapkv", device="cpu", device_map="auto")
    with pytest.raises(UsageError, match="device_map=auto"):
        KVPoliciesLM(pretrained=eight_b_attention, policy="snapkv", device_map="balanced")


def test_the_lm_eval_model_takes_device_map_dtype_and_attention(eight_b_attention):
    lm = KVPoliciesLM(pretrained=eight_b_attention, policy="snapkv", device_map="auto", dtype="bfloat16",
                      attn_implementation="eager")
    assert lm.model.dtype == torch.bfloat16 and str(lm.device) == "cpu"
    assert lm.model.config._attn_implementation.endswith("eager")  # wrapped by kvpolicies' attention


def test_dtype_and_revision_are_in_a_cells_key_and_the_rest_only_in_its_record():
    base = SweepConfig.model_validate({"policies": ["snapkv"], "budgets": [0.5]})
    keys = lambda config: [cell.key() for cell in cells(config)]  # noqa: E731
    same = [SweepConfig.model_validate(base.model_dump() | {"loading": loading})
            for loading in ({"device": "cpu"}, {"device_map": "auto"}, {"attn_implementation": "eager"})]
    assert all(keys(config) == keys(base) for config in same)
    other = [SweepConfig.model_validate(base.model_dump() | {"loading": loading})
             for loading in ({"dtype": "bfloat16"}, {"dtype": "float16"}, {"revision": "v1"})]
    found = [set(keys(config)) for config in [base, *other]]
    assert all(a.isdisjoint(b) for i, a in enumerate(found) for b in found[i + 1:])
    with pytest.raises(ValidationError, match="loading.dtype"):
        SweepConfig.model_validate({"loading": {"dtype": "float64"}})


def test_sweep_flags_override_the_grid_files_loading_one_by_one(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"policies": ["snapkv"], "budgets": [0.5],
                                "loading": {"dtype": "bfloat16", "attn_implementation": "eager"}}))
    config = sweep_config(build_parser().parse_args(["sweep", "--config", str(grid), "--dtype", "float16",
                                                     "--revision", "v2"]))
    assert config.loading == Loading(dtype="float16", attn_implementation="eager", revision="v2")
    assert all(cell.loading == config.loading for cell in cells(config))


def test_a_sweep_loads_its_models_as_the_grid_says_and_records_how(tiny_pretrained, tmp_path):
    config = SweepConfig.model_validate({
        "models": [tiny_pretrained], "policies": ["full", "snapkv"], "budgets": [0.5],
        "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [200], "depths": [0.5], "per_cell": 1}}],
        "loading": {"dtype": "bfloat16", "device_map": "auto", "attn_implementation": "eager"}})
    done = list(run_sweep(config, tmp_path / "out", progress=False))
    assert len(done) == 2 and all(r.status == "ok" for r in done)
    for record in done:
        assert record.identity.model_extra["dtype"] == "bfloat16"
        assert record.loading["dtype"] == "bfloat16" and record.loading["devices"] == ["cpu"]
        assert record.loading["device_map"] == "auto" and record.loading["attn_implementation"].endswith("eager")


def test_generate_takes_the_loading_flags(tiny_pretrained, capsys):
    assert main(["generate", "--model", tiny_pretrained, "--policy", "snapkv", "--budget", "0.5", "--device-map",
                 "auto", "--dtype", "bfloat16", "--attn-implementation", "eager", "--max-new-tokens", "4",
                 "The KV cache of a transformer holds"]) == 0
    assert capsys.readouterr().out.strip()


def test_the_lm_eval_command_takes_device_map_without_a_device(tiny_pretrained, tmp_path, monkeypatch):
    """`kvpolicies lm-eval` gives lm-eval this machine's device when none is given, but not beside device_map."""
    from tests.helpers import TASKS
    from tests.test_lm_eval import PASSKEY

    monkeypatch.chdir(tmp_path)
    assert main(["lm-eval", "--model", "kvpolicies", "--model_args",
                 f"pretrained={tiny_pretrained},policy=snapkv,compression_ratio=0.5,device_map=auto,dtype=bfloat16",
                 "--tasks", "kvp_passkey", "--include_path", TASKS, "--limit", "1",
                 "--metadata", json.dumps(PASSKEY), "--output_path", "out"]) == 0
    [written] = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(written.read_text())["config"]["kvpolicies"]["kv_memory"]["sequences"] == 1


def test_an_attention_kernel_not_installed_is_one_error_naming_the_fix(tiny_pretrained, capsys):
    """transformers raises ImportError for flash_attention_2 without flash-attn: a load failure like any other."""
    pytest.importorskip("transformers")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    assert main(["generate", "--model", tiny_pretrained, "--attn-implementation", "flash_attention_2",
                 "--max-new-tokens", "2", "hello"]) == 2
    err = capsys.readouterr().err
    assert f"cannot load model '{tiny_pretrained}'" in err and "leave --attn-implementation at sdpa" in err
