"""adapters.models: offline loading, tiny test models of three families, the task head, the weights hash."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from adapters.errors import AdapterError
from adapters.models import (MINILM, head_names, load_model, load_tokenizer, resolve_model, tiny_model_dir,
                             weights_hash)

FAMILIES = {"bert": ("BertForSequenceClassification", "bert", "classifier"),
            "gpt2": ("GPT2ForSequenceClassification", "transformer", "score"),
            "llama": ("LlamaForSequenceClassification", "model", "score")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny_model_dir(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def minilm():
    return load_model(MINILM)


def _checkpoint_keys(path):
    return set(load_file(Path(resolve_model(path)) / "model.safetensors"))


def _new_parameters(model, path):
    """Parameters the checkpoint does not hold (= what transformers newly initialises), found from the file."""
    prefix = model.base_model_prefix + "."
    saved = _checkpoint_keys(path)
    return {n for n, _ in model.named_parameters() if n not in saved and n.removeprefix(prefix) not in saved}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_loads_and_handles_padding(tiny, family):
    cls, prefix, head = FAMILIES[family]
    model = load_model(tiny[family], num_labels=3).eval()
    assert type(model).__name__ == cls and model.base_model_prefix == prefix
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert head_names(model) == [head]
    # head_names = exactly the modules whose parameters are missing from the saved file.
    assert {n.split(".")[0] for n in _new_parameters(model, tiny[family])} == {head}
    # The saved body is loaded as is.
    saved = load_file(Path(tiny[family]) / "model.safetensors")
    body = getattr(model, prefix).state_dict()
    assert all(torch.equal(body[k], v) for k, v in saved.items())

    tokenizer = load_tokenizer(tiny[family])
    texts = ["short one", "a considerably longer sentence, so the first row gets padded"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    assert ("token_type_ids" in batch) == (family == "bert")  # GPT-2 would embed them with its word embeddings
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    assert padded.shape == (2, 3)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_minilm_from_the_wheel(minilm):
    assert type(minilm).__name__ == "BertForSequenceClassification"
    c = minilm.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (6, 384, 12, 1536)
    body = sum(p.numel() for n, p in minilm.named_parameters() if n.startswith("bert."))
    assert 22.6e6 < body < 22.8e6 and minilm.classifier.weight.shape == (2, 384)
    assert head_names(minilm) == ["classifier"]
    assert _new_parameters(minilm, MINILM) == {"classifier.weight", "classifier.bias"}
    assert next(minilm.parameters()).dtype == torch.float32
    assert len(load_tokenizer(MINILM)) == 30_522


def test_head_is_seeded_and_global_rng_untouched(tiny):
    path = tiny["bert"]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = load_model(path, seed=0), load_model(path, seed=0), load_model(path, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert torch.equal(a.bert.pooler.dense.weight, c.bert.pooler.dense.weight)  # pretrained: same for any seed
    eager = load_model(path, attn_implementation="eager")  # for double backward (Hessians) on CPU
    assert eager.config._attn_implementation == "eager" and a.config._attn_implementation == "sdpa"


def test_loading_is_quiet_and_restores_logging(tiny, capfd):
    before = hf_logging.get_verbosity()
    load_model(tiny["gpt2"])
    out, err = capfd.readouterr()
    assert "MISSING" not in out + err and "newly initialized" not in out + err and "Loading weights" not in err
    assert hf_logging.get_verbosity() == before and hf_logging.is_progress_bar_enabled()


def test_weights_hash(tiny, minilm):
    model = load_model(tiny["llama"], seed=0)
    h = weights_hash(model)
    assert len(h) == 64 and h == weights_hash(model)
    assert weights_hash(load_model(tiny["llama"], seed=5)) == h  # the head (seed) is excluded
    with torch.no_grad():
        model.score.weight.add_(1.0)
        assert weights_hash(model) == h
        assert weights_hash(model, exclude=[]) != weights_hash(load_model(tiny["llama"], seed=0), exclude=[])
        model.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-6  # one scalar of the body
        assert weights_hash(model) != h
        model.model.layers[1].mlp.down_proj.weight[3, 7] -= 1e-6
    # Different bodies hash differently: another seed of the same family, another family, MiniLM.
    hashes = {h, weights_hash(load_model(tiny_model_dir(tiny["llama"].parent / "llama1", "llama", seed=1))),
              weights_hash(load_model(tiny["bert"])), weights_hash(minilm)}
    assert len(hashes) == 4
    # The same seed writes the same model.
    assert weights_hash(load_model(tiny_model_dir(tiny["llama"].parent / "llama0", "llama", seed=0))) == h


def test_resolve_and_not_found_errors(tiny, tmp_path):
    assert Path(resolve_model(MINILM), "config.json").is_file()
    assert resolve_model(tiny["bert"]) == str(tiny["bert"])
    assert resolve_model("some-org/some-model") == "some-org/some-model"  # a hub id, tried from the cache
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_bytes(b"x")
    for bad, why in [("./no/such/model", "no directory"), (str(tmp_path / "missing"), "no directory"),
                     (str(tmp_path / "empty"), "without config.json"), (str(tmp_path / "file.bin"), "is a file"),
                     ("nonexistent-org-xyz/no-such-model", "nonexistent-org-xyz/no-such-model")]:
        with pytest.raises(AdapterError, match=f"model not found: .*{why}") as e:
            load_model(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(AdapterError, match="model not found"):
        load_tokenizer("./nowhere")
    with pytest.raises(AdapterError, match="unknown tiny model family 't5'"):
        tiny_model_dir(tmp_path / "t5", "t5")
    assert not (tmp_path / "t5").exists()


def test_head_names_needs_a_base_model():
    with pytest.raises(AdapterError, match="Linear has no base model"):
        head_names(torch.nn.Linear(2, 2))
