"""Plain PEFT LoRA directories: every adapter_config field that changes outputs loads exactly or is refused."""
import json

import pytest
import torch

import adapters
from adapters import models
from tests.conftest import tiny, tiny_batch


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny BERT classifier (built in memory, then saved: a PEFT directory names its base by path)."""
    path = tmp_path_factory.mktemp("base") / "bert"
    tiny("bert").save_pretrained(str(path))
    return str(path)


def _peft_dir(path, base_dir, **config):
    """A PEFT LoRA adapter on query/value with every trained tensor (lora_A, lora_B, biases, head) random."""
    import peft
    peft_model = peft.get_peft_model(models.load_model(base_dir, 2), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS", **config))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(path))
    return path


def _logits(model):
    batch = {k: v for k, v in tiny_batch(5, 9, seed=3).items() if k != "labels"}
    with torch.no_grad():
        return model.eval()(**batch).logits


def _peft_logits(path, base_dir):
    import peft
    # Another head seed: the adapter's own head must be what PEFT uses (it is in modules_to_save).
    return _logits(peft.PeftModel.from_pretrained(models.load_model(base_dir, 2, seed=5), str(path)))


@pytest.mark.parametrize("config", [
    dict(alpha_pattern={"value": 24, r"layer\.1\.attention\.self\.query": 2}),
    dict(rank_pattern={"query": 2, "layer.1.attention.self.value": 6}),
    dict(rank_pattern={r".*\.0\..*": 2}, alpha_pattern={"query": 3}, use_rslora=True),
    dict(bias="lora_only"),
    dict(bias="all"),
], ids=["alpha_pattern", "rank_pattern", "patterns_rslora", "bias_lora_only", "bias_all"])
def test_plain_peft_directory_loads_with_peft_logits(tmp_path, base_dir, config):
    path = _peft_dir(tmp_path / "peft", base_dir, **config)
    ours = adapters.load(path)
    torch.testing.assert_close(_logits(ours), _peft_logits(path, base_dir), rtol=0, atol=1e-6)
    # What PEFT trained trains here too: the biases it saved, the head, the LoRA factors.
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    if config.get("bias") == "lora_only":
        assert "bert.encoder.layer.0.attention.self.query.base.bias" in trained
        assert "bert.encoder.layer.0.attention.self.key.bias" not in trained
    if config.get("bias") == "all":
        assert "bert.encoder.layer.0.attention.self.key.bias" in trained


def test_lowrank_factors_fold_each_modules_own_scaling(tmp_path, base_dir):
    path = _peft_dir(tmp_path / "peft", base_dir, rank_pattern={"query": 2}, alpha_pattern={"value": 24})
    factors = adapters.lowrank_factors(path)
    from safetensors.torch import load_file
    raw = load_file(str(path / "adapter_model.safetensors"))
    for name, (B, A) in factors.items():
        r, alpha = (2, 16) if name.endswith("query") else (4, 24 if name.endswith("value") else 16)
        assert A.shape[0] == r
        torch.testing.assert_close(B, raw[f"base_model.model.{name}.lora_B.weight"] * (alpha / r), rtol=0, atol=0)


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("lora_bias", True), ("layer_replication", [[0, 1], [0, 2]]),
    ("trainable_token_indices", [1, 2]), ("init_lora_weights", "pissa"), ("alora_invocation_tokens", [5]),
    ("bias", "some"), ("a_future_field", {"on": True}),
])
def test_plain_peft_directory_with_an_unsupported_field_is_refused_by_name(tmp_path, base_dir, field, value):
    path = _peft_dir(tmp_path / "peft", base_dir)
    config = json.loads((path / "adapter_config.json").read_text())
    config[field] = value
    (path / "adapter_config.json").write_text(json.dumps(config))
    for read in (adapters.load, adapters.lowrank_factors, adapters.read_meta):
        with pytest.raises(adapters.CheckpointError, match=f"unsupported {field}="):
            read(path)


def test_dora_directory_made_by_peft_is_refused(tmp_path, base_dir):
    path = _peft_dir(tmp_path / "peft", base_dir, use_dora=True)
    with pytest.raises(adapters.CheckpointError, match="unsupported use_dora=true"):
        adapters.load(path)


def test_a_tensor_that_lands_nowhere_is_an_error(tmp_path, base_dir):
    from safetensors.torch import load_file, save_file
    path = _peft_dir(tmp_path / "peft", base_dir, bias="lora_only")
    file = str(path / "adapter_model.safetensors")
    tensors = load_file(file)
    # X.bias of an adapted layer is X.base_layer.bias in PEFT: under the plain name it fits nothing.
    key = "base_model.model.bert.encoder.layer.0.attention.self.query"
    tensors[f"{key}.bias"] = tensors.pop(f"{key}.base_layer.bias")
    save_file(tensors, file)
    with pytest.raises(adapters.CheckpointError, match=r"tensor bert\.encoder\.layer\.0\.attention\.self\.query\.bias"):
        adapters.load(path)


@pytest.mark.parametrize("config", [
    dict(alpha_pattern={"value": 24, r"layer\.1\.attention\.self\.query": 2}),
    dict(rank_pattern={r".*\.0\..*": 2}, alpha_pattern={"query": 3}, use_rslora=True),
], ids=["alpha_pattern", "patterns_rslora"])
def test_the_trained_parametrisation_puts_back_each_modules_own_peft_scale(tmp_path, base_dir, config):
    """analysis' trainable space of a PEFT directory is PEFT's own: per module, B and the scale PEFT trains with."""
    import peft
    from analysis import spaces
    path = _peft_dir(tmp_path / "peft", base_dir, **config)
    ours = adapters.load(path)
    s = spaces.as_trained(ours, adapters.read_meta(path))
    theirs = peft.PeftModel.from_pretrained(models.load_model(base_dir, 2), str(path)).base_model.model
    from adapters.inject import adapted_layers
    layers = adapted_layers(ours)
    assert isinstance(s, dict) and set(s) == set(layers) and len(set(s.values())) > 1
    for name, layer in layers.items():
        peft_layer = theirs.get_submodule(name)
        assert layer.scale == pytest.approx(peft_layer.scaling["default"], rel=1e-12)
        torch.testing.assert_close(layer.B, peft_layer.lora_B["default"].weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_logits(ours), _peft_logits(path, base_dir), rtol=0, atol=1e-6)  # the same function


SAVE_SCRIPT = """
import sys
import adapters
from tests.conftest import tiny
model = tiny("bert")
adapters.apply(model, "cla", rank=2, alpha=4, targets=["all-linear"], seed=0)
adapters.save(model, sys.argv[1], base_model=sys.argv[2], base_model_hash="h")
"""


def test_the_same_checkpoint_is_written_byte_for_byte_whatever_the_string_hash_seed(tmp_path, base_dir):
    """PEFT keeps target_modules as a set, whose order follows Python's per-process string hash: written sorted,
    adapter_config.json (and so the weights digest that covers it) is the same for the same run."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).parent.parent
    texts = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(root))
        subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(out), base_dir], check=True, env=env, cwd=root)
        texts.append((out / "adapter_config.json").read_text())
    assert texts[0] == texts[1] == texts[2]
    modules = json.loads(texts[0])["target_modules"]
    assert modules == sorted(modules) and len(modules) == 13  # 2 layers × (q, k, v, attention out, up, down), pooler
