"""Hugging Face models from local folders, with the optional ``hf`` extra (``transformers``).

* ``hf:PATH`` loads a classifier saved with ``save_pretrained`` (its ``config.json`` and weights):
  ``AutoModelForSequenceClassification`` for text, ``AutoModelForImageClassification`` for images.
* ``hf-config:PATH`` builds the same family with random weights from a ``config.json`` (a folder
  or the file itself); options override the config's fields, so ``--student hf-config:TEACHER
  --student-option num_hidden_layers=2`` is the DistilBERT recipe: the teacher's family, smaller.
* A causal language model (a config whose ``architectures`` name a ``...ForCausalLM`` or
  ``...LMHeadModel``) is loaded with ``AutoModelForCausalLM`` and wrapped in :class:`HFCausalLM`:
  token ids ``(B, L)`` to logits ``(B, L, V)``, with its final hidden states and output projection
  for the chunked loss (language-model runs, ``--block-length``).

Nothing is downloaded: folders are read with ``local_files_only``. A model is wrapped in
:class:`HFClassifier`, so it maps rows to logits as every other model does: text rows are token
ids ``(N, L)`` (stored as floats, as every feature is; padding is the tokenizer's pad id), image
rows are pixels ``(N, C, H, W)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from softtargets.errors import SoftTargetsError, first_line
from softtargets.extras import require
from softtargets.files import parse_json, read_small_text


def is_hf_name(name: str) -> bool:
    """Whether ``name`` is ``hf:PATH`` or ``hf-config:PATH``."""
    return name.startswith(("hf:", "hf-config:"))


class HFClassifier(nn.Module):
    """A Hugging Face classifier as a rows-to-logits module.

    ``forward``: text ``(N, L)`` token ids (any dtype) -> ``(N, K)``, with the attention mask
    ``ids != pad_token_id``; images ``(N, C, H, W)`` -> ``(N, K)``.
    """

    def __init__(self, model: nn.Module, text: bool, pad_token_id: int | None) -> None:
        super().__init__()
        self.model = model
        self.text = text
        self.pad_token_id = pad_token_id

    def forward(self, x: Tensor) -> Tensor:
        if not self.text:
            return self.model(pixel_values=x).logits
        ids = x.long()
        mask = None if self.pad_token_id is None else (ids != self.pad_token_id).long()
        return self.model(input_ids=ids, attention_mask=mask).logits


class HFCausalLM(nn.Module):
    """A Hugging Face causal language model as softtargets' language models are: ``forward(ids
    (B, L)) -> logits (B, L, V)``, ``hidden(ids) -> (B, L, D)`` (the backbone's last hidden
    states) and ``output_weight (V, D)`` (its output projection), so that a student's loss can
    form the logits chunk by chunk."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids.long()).logits

    def hidden(self, ids: Tensor) -> Tensor:
        return self.model.base_model(input_ids=ids.long()).last_hidden_state

    @property
    def output_weight(self) -> Tensor:
        return self.model.get_output_embeddings().weight


def is_causal_lm(config: Any) -> bool:
    """Whether a Hugging Face config is a causal language model's (by its architectures)."""
    names = getattr(config, "architectures", None) or []
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)


def config_folder(name: str) -> Path:
    """The local folder (or ``config.json``) an ``hf:``/``hf-config:`` name points to, checked."""
    path = Path(name.split(":", 1)[1]).expanduser()
    if not path.exists():
        raise SoftTargetsError(
            f"{name}: no such local folder (models are read from disk, never downloaded)"
        )
    config = path if path.is_file() else path / "config.json"
    if not config.is_file():
        raise SoftTargetsError(
            f"{name}: {path} has no config.json; save the model with save_pretrained(PATH)"
        )
    return path


def check_hf_classes(model: nn.Module, class_names: tuple[str, ...], what: str) -> None:
    """Refuse a Hugging Face classifier whose named labels (``id2label``) are not the data's
    classes in the data's order: its logit ``k`` would be scored as the wrong class."""
    if not isinstance(model, HFClassifier):
        return
    labels = [str(v) for _, v in sorted(model.model.config.id2label.items())]
    generic = all(label == f"LABEL_{i}" for i, label in enumerate(labels))
    if not generic and labels != list(class_names):
        raise SoftTargetsError(
            f"{what} names its classes {labels[:5]} but the data's are {list(class_names)[:5]} "
            "(in index order); give data with the same classes, or a model of that order"
        )


def hf_weights_file(name: str) -> Path:
    """The ``model.safetensors`` of an ``hf:`` folder (what keys a store its teacher made)."""
    path = config_folder(name) / "model.safetensors"
    if not path.is_file():
        raise SoftTargetsError(
            f"{name}: no model.safetensors in the folder; save the model with "
            "save_pretrained(PATH) (safetensors is its default)"
        )
    return path


def _is_text(transformers: Any, config: Any) -> bool:
    text = transformers.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    image = transformers.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
    if type(config) in text:
        return True
    if type(config) in image:
        return False
    raise SoftTargetsError(
        f"a {config.model_type} model is neither a sequence nor an image classifier; softtargets "
        "distils AutoModelForSequenceClassification and AutoModelForImageClassification models"
    )


def build_hf(name: str, num_classes: int, options: dict[str, Any]) -> nn.Module:
    """The model an ``hf:``/``hf-config:`` name gives, wrapped in :class:`HFClassifier`."""
    transformers = require("transformers", "hf")
    transformers.utils.logging.disable_progress_bar()  # softtargets' own bars show progress
    path = config_folder(name)
    try:
        if path.is_file():
            given = parse_json(read_small_text(path, "config.json"), str(path))
            if not isinstance(given, dict):
                raise SoftTargetsError(f"{path} is not a JSON object of a model's config")
            config = transformers.AutoConfig.for_model(**given)
        else:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except SoftTargetsError:
        raise
    except Exception as err:
        raise SoftTargetsError(
            f"{name}: its config.json cannot be read ({first_line(err)})"
        ) from None
    causal = is_causal_lm(config)
    text = causal or _is_text(transformers, config)
    auto = (
        transformers.AutoModelForCausalLM
        if causal
        else transformers.AutoModelForSequenceClassification
        if text
        else transformers.AutoModelForImageClassification
    )
    outputs = "vocab_size" if causal else "num_labels"  # a language model's classes: its tokens
    pretrained = name.startswith("hf:")
    if pretrained and options:
        raise SoftTargetsError(
            f"{name} is a trained model: its options are its config's; use hf-config:PATH with "
            "options for a new model of that family"
        )
    if pretrained:
        if getattr(config, outputs) != num_classes:
            what = "tokens in its vocabulary" if causal else "output classes"
            raise SoftTargetsError(
                f"{name} has {getattr(config, outputs)} {what} but the data has {num_classes}"
                + ("; the tokenizer and the model must match" if causal else "")
            )
        try:
            model = auto.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except Exception as err:
            raise SoftTargetsError(
                f"{name}: its weights cannot be loaded ({first_line(err)}); it needs "
                "model.safetensors beside config.json"
            ) from None
    else:
        unknown = sorted(k for k in options if not hasattr(config, k))
        if unknown:
            raise SoftTargetsError(f"option {unknown[0]!r} is not a field of {name}'s config")
        for key, value in options.items():
            setattr(config, key, value)
        setattr(config, outputs, num_classes)
        try:
            model = auto.from_config(config)
        except Exception as err:
            raise SoftTargetsError(f"{name} cannot be built ({first_line(err)})") from None
    if causal:
        return HFCausalLM(model)
    pad = getattr(config, "pad_token_id", None)
    return HFClassifier(model, text, pad if text else None)


def describe_hf(model: nn.Module) -> dict[str, Any]:
    """What a saved model needs to be rebuilt without its source folder (empty when ``model`` is
    not a Hugging Face one): its config, whether it reads text, and its pad id (a causal
    language model: its config)."""
    if isinstance(model, HFCausalLM):
        return {"hf_config": model.model.config.to_dict(), "causal_lm": True}
    if not isinstance(model, HFClassifier):
        return {}
    return {
        "hf_config": model.model.config.to_dict(),
        "text": model.text,
        "pad_token_id": model.pad_token_id,
    }


def rebuild_hf(described: dict[str, Any]) -> nn.Module:
    """An :class:`HFClassifier` (or :class:`HFCausalLM`) of random weights from
    :func:`describe_hf`'s record, for its saved weights to be loaded into."""
    transformers = require("transformers", "hf")
    if described.get("causal_lm"):
        cfg = transformers.AutoConfig.for_model(**described["hf_config"])
        with torch.random.fork_rng(devices=[]):
            return HFCausalLM(transformers.AutoModelForCausalLM.from_config(cfg))
    text, pad = bool(described["text"]), described["pad_token_id"]
    cfg = transformers.AutoConfig.for_model(**described["hf_config"])
    auto = (
        transformers.AutoModelForSequenceClassification
        if text
        else transformers.AutoModelForImageClassification
    )
    with torch.random.fork_rng(devices=[]):
        return HFClassifier(auto.from_config(cfg), text, pad)
