import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

VOCAB = 100


def tiny(family="bert", num_labels=2, seed=0, attn_implementation=None):
    """A tiny randomly initialised sequence classifier (bert, gpt2 or llama), built in memory.

    attn_implementation="eager" for double backward (Hessians): SDPA has none on CPU."""
    torch.manual_seed(seed)
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, num_labels=num_labels, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, num_labels=num_labels,
                                      pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, intermediate_size=64, num_labels=num_labels,
                                       pad_token_id=0)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return transformers.AutoModelForSequenceClassification.from_config(cfg, **kwargs).eval()


def tiny_batch(n=4, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(1, VOCAB, (n, t), generator=g),
                attention_mask=torch.ones(n, t, dtype=torch.long),
                labels=torch.randint(0, 2, (n,), generator=g))


@pytest.fixture
def tiny_bert():
    return tiny("bert")
