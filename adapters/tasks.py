"""Task types: what a model of each family is fine-tuned to do, and how its examples are batched and scored.

One record per type, read by training, evaluation, checkpoints and every analysis, so nothing else branches on
what a task is. A type says
  - which transformers auto class builds its model and which PEFT task_type its checkpoints carry,
  - whether the model gets a new head (classifiers: trained with every method) or keeps its own (a causal LM's
    lm_head: trained only by head-only and full fine-tuning),
  - how a list of examples becomes a batch (`collate`) and what each example costs to pad (`lengths`),
  - how a batch is scored (`score`): per example, the summed loss, the number of units it is averaged over and
    the number of correct predictions. A classifier's unit is the example; a causal LM's is a completion token.

The loss of a split is Σ loss / Σ units: the mean per-example cross-entropy for classifiers, the per-token NLL
of the completions (prompt tokens masked, as E2E fine-tuning does) for causal LMs, whose metric is
perplexity = exp(loss). The examples of each type: (text, label id), (prompt, completion), (image, label id)
with an image a uint8 array or a file path.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AdapterError

IGNORE = -100  # the label of a position that is not scored (prompt and padding tokens): transformers' ignore_index


# ---- classification of text: (text, label id) ----------------------------------------------------------------
def _text_batch(examples, *, processor, max_length):
    texts, labels = zip(*examples)
    enc = processor(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(labels, dtype=torch.long)}


def _text_lengths(processor, examples, max_length):
    ids = processor([text for text, _ in examples], truncation=True, max_length=max_length)["input_ids"]
    return [len(row) for row in ids]


def class_scores(logits, labels):
    """Per example: cross-entropy, 1 unit, 1 if the argmax is the label. (Low-precision logits: the loss in fp32.)"""
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    losses = F.cross_entropy(logits, labels, reduction="none")
    return losses, torch.ones_like(losses), (logits.argmax(-1) == labels).to(losses.dtype)


# ---- causal language modelling: (prompt, completion) ---------------------------------------------------------
def _end_token(processor):
    """The token that ends a completion (EOS; a BERT-style tokenizer's SEP), or None."""
    return processor.eos_token_id if processor.eos_token_id is not None else processor.sep_token_id


def _prompt_completion_ids(processor, prompt, completion, max_length):
    """(prompt ids, completion ids + end token), cut to max_length tokens in all.

    The two are tokenised separately, so the boundary between scored and unscored tokens is exact. When they do
    not fit, the completion keeps at least half the budget (or all of itself) and the prompt keeps its last tokens.
    """
    p = processor(prompt, add_special_tokens=False)["input_ids"]
    c = processor(completion, add_special_tokens=False)["input_ids"]
    end = _end_token(processor)
    c = c + ([end] if end is not None else [])
    c = c[:max_length - min(len(p), max_length // 2)]
    return p[len(p) - (max_length - len(c)):] if len(p) + len(c) > max_length else p, c


def _lm_batch(examples, *, processor, max_length):
    rows = [_prompt_completion_ids(processor, p, c, max_length) for p, c in examples]
    width = max(len(p) + len(c) for p, c in rows)
    pad = processor.pad_token_id if processor.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(rows):  # right padding: position t of every row is its t-th token
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c)  # only the completion is scored
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lm_lengths(processor, examples, max_length):
    return [sum(map(len, _prompt_completion_ids(processor, p, c, max_length))) for p, c in examples]


def token_scores(logits, labels):
    """Per example: the summed next-token NLL of its scored tokens, their number, and how many the argmax gets.

    Position t predicts token t+1: logits[:, :-1] are scored against labels[:, 1:], IGNORE positions left out.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    scored = labels != IGNORE
    target = labels.masked_fill(~scored, 0)
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none") * scored
    correct = ((logits.argmax(-1) == target) & scored).sum(1)
    return nll.sum(1), scored.sum(1).to(nll.dtype), correct.to(nll.dtype)


# ---- classification of images: (uint8 array or file path, label id) ------------------------------------------
def _rgb(image):
    from PIL import Image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")  # Fashion-MNIST is grey: the model takes 3 channels
    with Image.open(image) as im:
        return im.convert("RGB")


def _image_batch(examples, *, processor, max_length):
    images, labels = zip(*examples)
    pixels = processor(images=[_rgb(im) for im in images], return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels, "labels": torch.tensor(labels, dtype=torch.long)}


def _image_lengths(processor, examples, max_length):
    return [1] * len(examples)  # every image is resized to the same size: nothing to gain from grouping


def accuracy(result):
    return result["accuracy"]


def perplexity(result):
    return math.exp(result["loss"]) if result["loss"] < 700 else math.inf


@dataclass(frozen=True)
class TaskType:
    name: str
    auto_class: str          # transformers auto class of the model
    peft_task_type: str | None  # PEFT's task_type in adapter_config.json (None: PEFT has none, e.g. images)
    inputs: str              # "text" or "image": which models can take it
    new_head: bool           # the model gets a new head (trained with every method) or keeps its own
    metric: str              # name of the task metric in training_stats.json
    higher_is_better: bool   # of the metric
    metric_of: Callable      # evaluation result -> metric value
    loss_unit: str           # what the loss is a mean over
    _collate: Callable       # (examples, *, processor, max_length) -> batch dict
    _lengths: Callable       # (processor, examples, max_length) -> padded cost per example
    score: Callable          # (logits, labels) -> per example (summed loss, units, correct)

    def collate(self, processor, max_length):
        """A DataLoader collate_fn: examples -> one batch padded to its longest example. (A partial, not a
        closure, so DataLoader workers can pickle it.)"""
        return partial(self._collate, processor=processor, max_length=max_length)

    def encode(self, processor, examples, max_length):
        return self._collate(list(examples), processor=processor, max_length=max_length)

    def lengths(self, processor, examples, max_length):
        """The padded cost (tokens) of each example after truncation at max_length."""
        return self._lengths(processor, examples, max_length) if examples else []

    def trained_head(self, model, method):
        """The head modules that train with `method`: a new head always; a model's own head (an LM's lm_head,
        tied to its input embeddings in SmolLM2) only under head-only training (fft trains it with the rest,
        at the base lr)."""
        from .models import head_names
        heads = head_names(model)
        if self.new_head:
            return heads
        return heads if method.adapter is None and not method.trains_base else []

    def hash_exclude(self, head):
        """What the base weights hash leaves out of a model whose trained head is `head`: a new head (drawn per task
        and seed), never a model's own, pretrained one."""
        return list(head) if self.new_head else []


TASK_TYPES = {t.name: t for t in [
    TaskType("classification", "AutoModelForSequenceClassification", "SEQ_CLS", "text", True,
             "accuracy", True, accuracy, "example", _text_batch, _text_lengths, class_scores),
    TaskType("causal-lm", "AutoModelForCausalLM", "CAUSAL_LM", "text", False,
             "perplexity", False, perplexity, "completion token", _lm_batch, _lm_lengths, token_scores),
    TaskType("image-classification", "AutoModelForImageClassification", None, "image", True,
             "accuracy", True, accuracy, "example", _image_batch, _image_lengths, class_scores),
]}
CLASSIFICATION = TASK_TYPES["classification"]


def for_model(model):
    """The task type a transformers model is built for: causal-lm for a generative model, image-classification for
    one that takes pixel_values, else classification."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return TASK_TYPES["causal-lm"]
    if getattr(model, "main_input_name", None) == "pixel_values":
        return TASK_TYPES["image-classification"]
    return CLASSIFICATION


def get_task_type(name):
    try:
        return TASK_TYPES[name]
    except KeyError:
        raise AdapterError(f"unknown task type {name!r}; choose one of: {', '.join(TASK_TYPES)}") from None


def of_meta(meta):
    """The task type a checkpoint was trained for (checkpoints from before task types: classification)."""
    return get_task_type(meta.get("task_type", CLASSIFICATION.name))


def check_model(task_type, model_name, family):
    """Refuse a model that cannot take the task's inputs (an image task on a text model, or the reverse)."""
    if (task_type.inputs == "image") != (family == "vision"):
        want = "an image model (e.g. dinov2-small)" if task_type.inputs == "image" else "a text model"
        raise AdapterError(f"a {task_type.name} task needs {want}; {model_name} is a {family} model")
