"""Reading checkpoint files: PyTorch archives and pickles, safetensors files, Hugging Face folders (`config.json`
beside `model.safetensors` or the shards its index lists; the folder or its weights file can be given). Nothing
here knows the backbone families: it returns what the file holds.
"""

import json
import os
import pickle

import safetensors.torch
import torch

from utils.errors import InputNotFoundError, InvalidInputError

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_CONFIG = "config.json"


class UnknownCheckpointError(InvalidInputError):
    """The checkpoint file cannot be read or matches no supported backbone family."""


def first_line(exc: Exception) -> str:
    """The first line of an exception's message, at most 160 characters."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]


def checkpoint_files(path) -> list[str]:
    """The files holding the weights of `path`: the file itself, or a Hugging Face folder's
    `model.safetensors`, or the shards its `model.safetensors.index.json` lists."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise InputNotFoundError(f"checkpoint not found: {path}")
    single = os.path.join(path, HF_WEIGHTS)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(path, HF_INDEX)
    if not os.path.isfile(index):
        raise InputNotFoundError(f"checkpoint folder {path} holds neither {HF_WEIGHTS} nor {HF_INDEX}")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UnknownCheckpointError(f"{index}: no weight_map of tensor names to shard files")
    shards = [os.path.join(path, name) for name in sorted(set(map(str, weight_map.values())))]
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise InputNotFoundError(f"checkpoint shard not found: {missing[0]} (listed in {index})")
    return shards


def read_checkpoint(path) -> object:
    """Load a checkpoint file, or a Hugging Face folder's weights, on the CPU."""
    files = checkpoint_files(path)
    if len(files) == 1:
        return _read_file(files[0])
    return {name: tensor for shard in files for name, tensor in read_safetensors(shard).items()}


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU."""
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as exc:  # a text file or a truncated download is bad input, whatever the library raises
        raise UnknownCheckpointError(
            f"{path}: not a readable safetensors file, truncated or not a weights file ({first_line(exc)})"
        ) from None


def _read_file(path: str) -> object:
    size = os.path.getsize(path)
    named_safetensors = path.endswith(".safetensors")
    if size == 0:
        kind = "safetensors file" if named_safetensors else "PyTorch checkpoint"
        raise UnknownCheckpointError(f"{path}: not a readable {kind} (the file is empty)")
    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors file starts with the length of its JSON header (8 bytes, little endian), then '{'
    header = len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8
    if named_safetensors or header:
        return read_safetensors(path)
    if not head.startswith((b"PK", b"\x80")):
        what = f"neither a zip archive nor a pickle; it begins with {head[:8]!r}"
        raise UnknownCheckpointError(f"{path}: not a readable PyTorch checkpoint ({what})")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # The official training outputs also pickle objects (an argparse Namespace, numpy scalars) that the
            # weights-only unpickler refuses; the user chose this file as a backbone, so it is unpickled in full.
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated archives, text files: any failure to read the user's file is bad input
        raise UnknownCheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or not a weights file ({first_line(exc)})"
        ) from None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError) as exc:
        raise UnknownCheckpointError(f"{path}: not a readable JSON file ({first_line(exc)})") from None
    if not isinstance(content, dict):
        raise UnknownCheckpointError(f"{path}: expected a JSON object, found a {type(content).__name__}")
    return content


def read_hf_config(path) -> dict | None:
    """The Hugging Face `config.json` in the folder given or beside a `.safetensors` file, or None."""
    path = os.fspath(path)
    if not os.path.isdir(path) and not path.endswith(".safetensors"):
        return None
    config = os.path.join(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), HF_CONFIG)
    return _read_json(config) if os.path.isfile(config) else None
