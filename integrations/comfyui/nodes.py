"""ComfyUI nodes that turn prompts into SDXL CONDITIONING with distill.

"Distill Encode" asks a running `distill serve` for a prompt's conditioning; "Load Distill
Conditioning" reads a file `distill encode` wrote. Both return the positive and negative
CONDITIONING in ComfyUI's form, [[prompt_embeds [1, 77, 2048], {"pooled_output": [1, 1280]}]];
ComfyUI's SDXL model adds the size conditioning (width, height, crops) itself.

Only torch and the standard library are used: safetensors files are parsed here directly
(8-byte little-endian header length, JSON header, raw little-endian data).
"""

import json
import os
import struct
import urllib.error
import urllib.request

import torch

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

DEFAULT_SERVER = "http://127.0.0.1:8411"


def parse_safetensors(data, where):
    """Tensors (as float32) by name from safetensors bytes; `where` names them in errors."""
    if len(data) < 8:
        raise ValueError(f"{where}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as err:
        raise ValueError(f"{where}: not a safetensors file ({err})") from err
    header.pop("__metadata__", None)
    start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{where}: tensor '{name}' is {info['dtype']}; expected F32, F16 or BF16")
        begin, end = info["data_offsets"]
        raw = bytearray(data[start + begin : start + end])
        flat = torch.frombuffer(raw, dtype=_DTYPES[info["dtype"]])
        tensors[name] = flat.reshape(info["shape"]).float()
    return tensors


def parse_json_conditioning(data, where):
    """Tensors by name from the JSON form `distill encode --format json` writes."""
    doc = json.loads(data)
    if doc.get("format") != "distill-conditioning":
        raise ValueError(f"{where}: not a distill conditioning file (no \"format\": \"distill-conditioning\")")
    return {
        name: torch.tensor(t["data"], dtype=torch.float32).reshape(t["shape"])
        for name, t in doc["tensors"].items()
    }


def conditioning_pair(tensors, row, where):
    """(positive, negative) CONDITIONING for one row of an encode file's tensors."""
    names = ["prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing}; is it a distill conditioning file?")
    rows = tensors["prompt_embeds"].shape[0]
    if not 0 <= row < rows:
        raise ValueError(f"{where}: holds {rows} prompt(s); index {row} is out of range (0 to {rows - 1})")

    def cond(seq, pooled):
        return [[tensors[seq][row : row + 1].clone(), {"pooled_output": tensors[pooled][row : row + 1].clone()}]]

    return (
        cond("prompt_embeds", "pooled_prompt_embeds"),
        cond("negative_prompt_embeds", "negative_pooled_prompt_embeds"),
    )


class DistillEncode:
    """Prompt and negative prompt -> CONDITIONING, from a running `distill serve`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "server_url": ("STRING", {"default": DEFAULT_SERVER}),
                "prompt": ("STRING", {"multiline": True, "default": ""}),
                "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
            },
            "optional": {
                "token": ("STRING", {"default": ""}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"
    CATEGORY = "conditioning/distill"
    DESCRIPTION = (
        "SDXL conditioning from distill's Qwen3 student via `distill serve`. An empty negative "
        "prompt gives zero tensors, as diffusers' SDXL pipeline does."
    )

    def encode(self, server_url, prompt, negative_prompt, token=""):
        body = {"prompt": prompt, "dtype": "f32"}
        if negative_prompt != "":
            body["negative_prompt"] = negative_prompt
        headers = {"content-type": "application/json"}
        token = token or os.environ.get("DISTILL_TOKEN", "")
        if token:
            headers["authorization"] = f"Bearer {token}"
        url = server_url.rstrip("/") + "/v1/encode"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                data = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]
            except (ValueError, KeyError, TypeError):
                pass
            raise RuntimeError(f"distill serve at {server_url} answered {err.code}: {detail}") from err
        except urllib.error.URLError as err:
            raise RuntimeError(
                f"cannot reach distill serve at {server_url} ({err.reason}); start it with "
                "`deno task serve --qwen <folder> --adapter <folder>`"
            ) from err
        return conditioning_pair(parse_safetensors(data, url), 0, url)


class LoadDistillConditioning:
    """A file `distill encode` wrote (safetensors or JSON) -> the CONDITIONING pair of one row."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "path": ("STRING", {"default": "conditioning.safetensors"}),
                "index": ("INT", {"default": 0, "min": 0, "max": 1 << 20}),
            }
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "load"
    CATEGORY = "conditioning/distill"
    DESCRIPTION = "Reads one prompt's conditioning (row `index`) from a `distill encode` file."

    def load(self, path, index=0):
        with open(path, "rb") as f:
            data = f.read()
        is_json = path.lower().endswith(".json")
        tensors = parse_json_conditioning(data, path) if is_json else parse_safetensors(data, path)
        return conditioning_pair(tensors, index, path)

    @classmethod
    def IS_CHANGED(cls, path, index=0):
        # Re-run when the file is rewritten.
        return os.path.getmtime(path) if os.path.exists(path) else float("nan")


NODE_CLASS_MAPPINGS = {
    "DistillEncode": DistillEncode,
    "LoadDistillConditioning": LoadDistillConditioning,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DistillEncode": "Distill Encode",
    "LoadDistillConditioning": "Load Distill Conditioning",
}
