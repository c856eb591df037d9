"""distill's Perceiver Resampler as a torch.nn.Module.

Loads the `resampler_config.json` + `resampler.safetensors` pair that `distill train` writes
into its adapter folder and computes what distill computes: the student's last hidden states
[B, T, dim_in] -> SDXL's `prompt_embeds` [B, num_queries, dim_seq] and
`pooled_prompt_embeds` [B, dim_pooled]. Needs only torch and the standard library (the
safetensors files are read and written here directly), so it drops into a diffusers or
accelerate/DeepSpeed setup as is. Parameter names are distill's safetensors names, so
`state_dict()` round-trips with distill.

    resampler = DistillResampler.from_pretrained("runs/qwen3-4b-coco/adapter")
    seq, pooled = resampler(hidden_states, attention_mask)
"""

import json
import math
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "resampler_config.json"
WEIGHTS_FILE = "resampler.safetensors"

# distill's defaults (src/models/resampler.ts); dim_in has none. num_positions and seq_bias
# are optional features, off unless their key is in the config.
DEFAULTS = {
    "dim": 2048,
    "depth": 4,
    "heads": 16,
    "dim_head": 128,
    "ff_mult": 4,
    "num_queries": 77,
    "dim_seq": 2048,
    "dim_pooled": 1280,
    "num_positions": 0,
    "seq_bias": False,
}

LN_EPS = 1e-5

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def read_safetensors(path):
    """Every tensor of a safetensors file (F32, F16 or BF16) by name, on the CPU."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    header.pop("__metadata__", None)
    start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor '{name}' is {info['dtype']}; expected F32, F16 or BF16")
        begin, end = info["data_offsets"]
        raw = bytearray(data[start + begin : start + end])
        flat = torch.frombuffer(raw, dtype=_DTYPES[info["dtype"]]) if raw else torch.empty(0)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Writes tensors (F32, F16 or BF16, contiguous, little-endian) as a safetensors file."""
    header = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)


def parse_config(config, where="resampler config"):
    """distill's resampler_config.json as keyword arguments, with the defaults filled in."""
    unknown = set(config) - set(DEFAULTS) - {"dim_in"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: dim_in, {', '.join(DEFAULTS)}")
    if "dim_in" not in config:
        raise ValueError(f"{where}: 'dim_in' (the student's hidden size) is required")
    return {**DEFAULTS, **config}


class _Attention(nn.Module):
    """Latents attend to [norm_x(x); norm_l(latents)]; padded text positions are hidden."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm_x = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_l = nn.LayerNorm(dim, eps=LN_EPS)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents, visible):
        b, q_len = latents.shape[0], latents.shape[1]
        latents_n = self.norm_l(latents)
        q = self.to_q(latents_n)
        k, v = self.to_kv(torch.cat([self.norm_x(x), latents_n], dim=1)).chunk(2, dim=-1)

        def heads(t):
            return t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(self.dim_head)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        out = scores.softmax(dim=-1) @ heads(v)
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim, mult):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.w1 = nn.Linear(dim, dim * mult, bias=False)
        self.w2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(self.norm(x))))


class _Block(nn.Module):
    def __init__(self, dim, heads, dim_head, ff_mult):
        super().__init__()
        self.attn = _Attention(dim, heads, dim_head)
        self.ff = _FeedForward(dim, ff_mult)


class DistillResampler(nn.Module):
    """Learned latent queries cross-attend to the student's hidden states (SPEC section 4)."""

    def __init__(
        self,
        dim_in,
        dim=2048,
        depth=4,
        heads=16,
        dim_head=128,
        ff_mult=4,
        num_queries=77,
        dim_seq=2048,
        dim_pooled=1280,
        num_positions=0,
        seq_bias=False,
    ):
        super().__init__()
        self.config = {
            "dim_in": dim_in,
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "dim_head": dim_head,
            "ff_mult": ff_mult,
            "num_queries": num_queries,
            "dim_seq": dim_seq,
            "dim_pooled": dim_pooled,
            "num_positions": num_positions,
            "seq_bias": bool(seq_bias),
        }
        # Initialised as distill's initResampler (PyTorch's defaults for Linear/LayerNorm).
        self.latents = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.proj_in = nn.Linear(dim_in, dim)
        self.pos_emb = nn.Parameter(torch.zeros(num_positions, dim)) if num_positions else None
        self.layers = nn.ModuleList(_Block(dim, heads, dim_head, ff_mult) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim_seq)
        self.seq_bias = nn.Parameter(torch.zeros(num_queries, dim_seq)) if seq_bias else None
        self.norm_pool = nn.LayerNorm(dim, eps=LN_EPS)
        self.proj_pooled = nn.Linear(dim, dim_pooled)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device=None):
        """The resampler in an adapter folder (or any folder holding the config + weights)."""
        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        config = parse_config(json.loads(config_path.read_text()), str(config_path))
        model = cls(**config)
        weights = read_safetensors(folder / WEIGHTS_FILE)
        state = {k: v.to(torch.float32) for k, v in weights.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{folder / WEIGHTS_FILE} does not match {config_path}: "
                f"missing {missing}, unexpected {unexpected}"
            )
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, folder):
        """Writes the config and F32 weights in distill's format (optional keys only when on)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        optional_off = {"num_positions": 0, "seq_bias": False}
        config = {k: v for k, v in self.config.items() if optional_off.get(k, None) != v}
        write_safetensors(
            folder / WEIGHTS_FILE,
            {k: v.float() for k, v in self.state_dict().items()},
            {"format": "pt"},
        )
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    def forward(self, hidden_states, attention_mask=None):
        """hidden_states [B, T, dim_in] and attention_mask [B, T] (1 = real token; None: all)
        -> (prompt_embeds [B, num_queries, dim_seq], pooled_prompt_embeds [B, dim_pooled])."""
        b, t, _ = hidden_states.shape
        x = self.proj_in(hidden_states)
        if self.pos_emb is not None:
            if t > self.pos_emb.shape[0]:
                raise ValueError(f"{t} positions, but this resampler has num_positions {self.pos_emb.shape[0]}")
            x = x + self.pos_emb[:t]
        latents = self.latents.expand(b, -1, -1)
        text_visible = (
            torch.ones(b, t, dtype=torch.bool, device=x.device)
            if attention_mask is None
            else attention_mask.to(device=x.device).bool()
        )
        latents_visible = torch.ones(b, latents.shape[1], dtype=torch.bool, device=x.device)
        visible = torch.cat([text_visible, latents_visible], dim=1)
        for block in self.layers:
            latents = latents + block.attn(x, latents, visible)
            latents = latents + block.ff(latents)
        seq = self.proj_out(latents)
        if self.seq_bias is not None:
            seq = seq + self.seq_bias
        pooled = self.proj_pooled(self.norm_pool(latents.mean(dim=1)))
        return seq, pooled
