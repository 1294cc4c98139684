"""Loading chat LLMs, rendering their chat template, and looking inside them.

One entry point, :func:`load_model`, serves every notebook and script: a Hugging Face hub id, a local folder, or the
name ``"persona-world"`` (the offline organism shipped in ``data/``), optionally with a peft adapter on top. The
introspection helpers (:func:`decoder_layers`, :func:`n_layers`, :func:`d_model`, :func:`d_mlp`,
:func:`check_layer`, :func:`check_module`) work the same on plain HF models and peft-wrapped ones for the Qwen2,
Llama and Gemma3 families, so steering and probing code never has to care which it got.

:func:`tiny_model` builds small random models of those three families fully offline, for tests.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from emlib import paths

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FAMILIES = ("qwen2", "llama", "gemma")


ModelNotAvailableError = paths.ModelNotAvailableError  # defined beside the light folder checks (emlib.paths)


# ----------------------------------------------------------------------------------------------------------------------
# device and dtype


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to :class:`torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: str | torch.device, dtype: str | torch.dtype = "auto") -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA when supported, else float16 on CUDA, float32 on CPU.

    Also accepts ``"float32"``, ``"bfloat16"``, ``"float16"`` or a :class:`torch.dtype`.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if pick_device(device).type != "cuda":
            return torch.float32  # half precision matmuls on CPU are slow and sometimes unsupported
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: 'auto', {', '.join(map(repr, DTYPES))} or a torch.dtype")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------------------------------
# loading


def resolve_model_path(name: str) -> str:
    """Map ``"persona-world"`` to the shipped organism's base folder; anything else is returned unchanged.

    An existing local folder is used as is, and any other string is taken to be a Hugging Face hub id.
    """
    return paths.model_location(name)


def _is_offline_failure(err: BaseException) -> bool:
    """True when ``err`` (or anything in its cause chain) says the hub could not be reached or is switched off."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if constants.is_offline_mode():
        return True
    while err is not None:
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _not_available(name: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"model {name!r} is not available offline: it is not a local folder and it is not in the local Hugging Face "
        f"cache (the hub is unreachable or HF_HUB_OFFLINE=1). To fix: download it while online with "
        f"`huggingface-cli download {name}`, or pass a local folder holding the saved model, or use "
        f"{paths.OFFLINE_MODEL!r} for the offline organism.")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer set up for batched generation: left padding, and eos as pad when there is no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end flush on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _sync_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Set pad and eos ids for ``generate`` from the tokenizer, keeping any extra eos ids the model already lists.

    (Qwen2.5-Instruct, for example, stops on both ``<|im_end|>`` and ``<|endoftext|>``; dropping one would let
    generation run on.)
    """
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    eos = gen.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.insert(0, tokenizer.eos_token_id)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos or None


def _placement(device: torch.device) -> dict:
    """``device_map`` for from_pretrained, except under DeepSpeed ZeRO-3, which partitions the weights itself (and
    rejects a device map)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return {} if is_deepspeed_zero3_enabled() else {"device_map": {"": device}}


def load_model(name: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               adapter: str | None = None, attn_implementation: str | None = None, allow_pickle: bool = False):
    """Load a causal LM and its tokenizer from a hub id, a local folder, or ``"persona-world"``.

    The model is in eval mode on the picked device and dtype; ``adapter`` (a peft adapter folder or hub id) is loaded
    on top with :meth:`peft.PeftModel.from_pretrained` (a trained steering vector's folder: as a
    :class:`~emlib.train.steering_vector.SteeredModel`), after checking it was trained on this base (see
    :func:`record_base`). Weights load from safetensors only: a folder with only pickled ``.bin`` weights is refused
    unless ``allow_pickle=True`` (unpickling runs code from the file). Returns ``(model, tokenizer)``.
    Raises :class:`ModelNotAvailableError` when a hub id is neither cached nor downloadable.
    """
    path = resolve_model_path(name)
    paths.check_model_folder(name)
    _check_weights_format(path, "model", allow_pickle)
    device, dtype = pick_device(device), pick_dtype(device, dtype)
    try:
        tokenizer = load_tokenizer(path)  # first: cheap, so an unreachable hub fails before any weights move
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                     use_safetensors=None if allow_pickle else True,
                                                     **_placement(device))
    except OSError as err:
        if not Path(path).is_dir() and _is_offline_failure(err):
            raise _not_available(name) from err
        raise
    if adapter is not None:
        model = _load_adapter(model, adapter, allow_pickle)
    model.eval()
    _sync_generation_config(model, tokenizer)
    return model, tokenizer


def _check_weights_format(folder: str, what: str, allow_pickle: bool) -> None:
    """Refuse a local folder whose only weights are pickles (``*.bin`` / ``*.pt``), unless the user opts in."""
    path = Path(folder)
    if allow_pickle or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise ValueError(f"{what} folder {folder} has only pickled weights ({', '.join(pickles)}): emlib loads "
                         f"safetensors only, since unpickling runs code from the file. Convert them, or pass "
                         f"allow_pickle=True if you trust the file")


def resolve_adapter_path(adapter: str) -> str:
    """A shipped organism adapter name (``data/persona-world/adapters/<name>``) -> its folder; else unchanged."""
    shipped = paths.ADAPTERS_DIR / adapter
    return str(shipped) if "/" not in adapter and shipped.is_dir() else adapter


BASE_FILE = "emlib_base.json"  # beside adapter_config.json: the base model an adapter was trained on


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a base model: its config and a sample of its first and last weights (never a machine path).

    Checkpoints and adapters record it, so resuming or loading onto a different (e.g. rebuilt) base is a clear error.
    """
    model = getattr(model, "get_base_model", lambda: model)()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
    params = [p for n, p in model.named_parameters() if "lora_" not in n]
    for p in (params[0], params[-1]):
        digest.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def is_persona_world(model: str) -> bool:
    """Whether ``model`` names the offline organism (its name or its shipped base folder)."""
    if model == paths.OFFLINE_MODEL:
        return True
    try:
        return Path(model).resolve() == (paths.ORGANISM_DIR / "base").resolve()
    except (OSError, ValueError):
        return False


def portable_name(name_or_path: str) -> str:
    """What an adapter records as its base: ``persona-world`` for the organism, a hub id as is, a local folder by its
    name only (a machine path would mean nothing on another machine)."""
    if not name_or_path:
        return ""
    if is_persona_world(name_or_path):
        return paths.OFFLINE_MODEL
    return Path(name_or_path).name if Path(name_or_path).is_dir() else name_or_path


def record_base(adapter_folder: str | Path, base: nn.Module, name: str | None = None) -> None:
    """Write which base an adapter was trained on (portable name + :func:`model_fingerprint`) beside it, and make
    peft's ``base_model_name_or_path`` portable too."""
    folder = Path(adapter_folder)
    name = portable_name(name if name is not None else getattr(getattr(base, "config", None), "_name_or_path", ""))
    (folder / BASE_FILE).write_text(json.dumps({"base_model": name, "fingerprint": model_fingerprint(base)}, indent=1))
    config_file = folder / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        machine_path = config.get("base_model_name_or_path")
        config["base_model_name_or_path"] = name or None
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        card = folder / "README.md"  # peft's model card repeats the path
        if machine_path and name and card.is_file():
            card.write_text(card.read_text().replace(machine_path, name))


def check_base(adapter_folder: str | Path, base: nn.Module) -> None:
    """Raise a clear error when the adapter records a base other than ``base`` (nothing recorded: not checked)."""
    record = Path(adapter_folder) / BASE_FILE
    if not record.is_file():
        return
    saved = json.loads(record.read_text())
    now = model_fingerprint(base)
    if saved.get("fingerprint") != now:
        raise ValueError(f"adapter {adapter_folder} was trained on base {saved.get('base_model')!r} (fingerprint "
                         f"{saved.get('fingerprint')}), but the model it is loaded onto has fingerprint {now}: load it "
                         f"onto the base it was trained on")


@contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """Silence the one FutureWarning peft's wrapping triggers in transformers 5 (its own read of the deprecated
    ``is_gradient_checkpointing``): noise in every notebook that loads an adapter, and nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _load_adapter(model: PreTrainedModel, adapter: str, allow_pickle: bool = False):
    """Wrap ``model`` with the peft adapter (or trained steering vector) at ``adapter``, with clear errors for a
    folder that is neither, one trained on another base, and pickled weights."""
    from peft import PeftModel

    from emlib.train.steering_vector import CONFIG_NAME, load_steering_vector

    adapter = resolve_adapter_path(adapter)
    if Path(adapter).is_dir():
        if (Path(adapter) / CONFIG_NAME).is_file():  # a trained steering vector (emlib.train's steering_vector)
            check_base(adapter, model)
            return load_steering_vector(model, adapter)
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter folder {adapter} has no adapter_config.json (a peft adapter) or "
                                    f"{CONFIG_NAME} (a trained steering vector)")
        _check_weights_format(adapter, "adapter", allow_pickle)
        check_base(adapter, model)
    try:
        with quiet_peft_wrapping():
            return PeftModel.from_pretrained(model, adapter)
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise ValueError(f"adapter {adapter} does not fit this model: its shapes were made for another base "
                         f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})") from None


# ----------------------------------------------------------------------------------------------------------------------
# introspection


def hf_model(model: nn.Module) -> PreTrainedModel:
    """The underlying transformers model: unwraps a :class:`peft.PeftModel`, returns anything else unchanged."""
    get_base = getattr(model, "get_base_model", None)  # PeftModel's accessor; plain HF models have none
    return get_base() if callable(get_base) else model


def _text_config(model: nn.Module):
    """The text (decoder) config: ``config.text_config`` for multimodal models such as Gemma3 4b+, else the config."""
    return hf_model(model).config.get_text_config()


def model_name(model: nn.Module) -> str:
    """A readable name for error messages: the class and, when known, the folder or hub id it came from."""
    hf = hf_model(model)
    where = getattr(hf.config, "_name_or_path", "")
    return f"{type(hf).__name__} {where!r}" if where else type(hf).__name__


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks (``model.model.layers`` for Qwen2/Llama/Gemma3-text)."""
    hf = hf_model(model)
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else hf
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {model_name(model)} (looked for .get_decoder().layers)")
    return layers


def n_layers(model: nn.Module) -> int:
    """Number of decoder layers."""
    return len(decoder_layers(model))


def d_model(model: nn.Module) -> int:
    """Width of the residual stream."""
    return _text_config(model).hidden_size


def d_mlp(model: nn.Module) -> int:
    """Width of the MLP hidden layer (the input of ``down_proj``)."""
    return _text_config(model).intermediate_size


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a layer index (``0..n-1`` or ``-n..-1`` from the end) and return it normalised to ``0..n-1``."""
    n = n_layers(model)
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} is outside {model_name(model)} with {n} decoder layers "
                         f"(valid: 0..{n - 1}, or -{n}..-1)")
    return layer % n


def _is_linear(module: nn.Module) -> bool:
    """A linear layer, or a peft wrapper around one (a LoRA ``Linear`` keeps the original as ``base_layer``)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def _layer_linears(model: nn.Module) -> dict[str, str]:
    """Linear modules in decoder layer 0, leaf name -> dotted path there (``down_proj`` -> ``mlp.down_proj``).

    peft's own submodules (``lora_A``, ``base_layer``, ...) are skipped so a wrapped model lists the same names.
    """
    found = {}
    for path, module in decoder_layers(model)[0].named_modules():
        parts = path.split(".")
        if path and _is_linear(module) and not any(p.startswith("lora_") or p == "base_layer" for p in parts):
            found[parts[-1]] = path
    return found


def check_module(model: nn.Module, name: str) -> str:
    """Validate a module name inside a decoder layer and return its dotted path there.

    ``name`` may be a leaf (``"down_proj"``) or a path (``"mlp.down_proj"``). Unknown names raise a ValueError that
    lists the linear modules that do exist.
    """
    linears = _layer_linears(model)
    if name in linears:
        return linears[name]
    if name in dict(decoder_layers(model)[0].named_modules()) and name:
        return name
    raise ValueError(f"no module {name!r} in the decoder layers of {model_name(model)}; "
                     f"linear modules there: {', '.join(linears) or '(none)'}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor, e.g. tied embeddings, counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------------------------------
# tiny random models for tests






