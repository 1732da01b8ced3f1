"""Writes a GGUF model of a real model's shape with random 4-bit weights, for throughput
benchmarks where the real weights cannot travel (as vLLM's dummy load format does): decoding
reads every weight once per step whatever its values, so tokens/s is the real model's.

    python3 random_gguf.py --shape llama3-8b --out model.gguf

Shapes: `tiny` (a CPU test), `llama3-8b` (dense), `qwen3-30b-a3b` (MoE, 3.3B active of
30.5B; mistral.rs 0.8.1 runs MoE GGUF on CUDA only). Every matrix is Q4_K (4.5 bits a
weight), norms F32, the router Q8_0. Standard library only, about a second per GB.

The weights are w = d * (q - 7.5) with random 4-bit q (zero mean) and d giving a standard
deviation of 0.02, so activations and logits stay finite and centred on 0. The output rows of the end-of-text tokens are
zero, so their logit is 0 against a maximum near 4 over the vocabulary: answers run to
max_tokens, as a benchmark needs (mistral.rs has no ignore_eos). The tokenizer is a GPT-2
byte-level BPE of the shape's vocabulary size (bytes, then merged pairs), with ChatML.
"""

import argparse
import os
import random
import struct
import sys
import time

SHAPES = {
    "tiny": dict(arch="llama", layers=2, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=2048, rope=10000.0),
    "llama3-8b": dict(arch="llama", layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256,
                      rope=500000.0),
    "qwen3-30b-a3b": dict(arch="qwen3moe", layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128,
                          experts=128, experts_used=8, expert_ffn=768, vocab=151936, rope=1000000.0),
}
CONTEXT = 16384
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ALIGNMENT = 32
F32, Q8_0, Q4_K = 0, 8, 12
# Bytes per block and values per block.
BLOCKS = {F32: (4, 1), Q8_0: (34, 32), Q4_K: (144, 256)}
SIGMA = 0.02
# Random bytes drawn once, which every tensor's weights are cut from.
POOL = 16 << 20

# GGUF value types.
U32, I32, F32_VALUE, STRING, ARRAY = 4, 5, 6, 8, 9


def bytes_to_unicode():
    """GPT-2's map from bytes to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(printable, chars))]


def vocabulary(size):
    """Tokens and merges of a byte-level BPE with `size` tokens, the control tokens last."""
    alphabet = bytes_to_unicode()
    tokens = alphabet[:]
    merges = []
    wanted = size - len(CONTROL)
    pairs = ((a, b) for a in range(256) for b in range(256))
    while len(tokens) < wanted:
        try:
            a, b = next(pairs)
            left, right = alphabet[a], alphabet[b]
        except StopIteration:
            # Past all byte pairs: a two-character token and a byte, three characters each.
            i = len(tokens) - 256 - 65536
            left, right = tokens[256 + i // 256], alphabet[i % 256]
        tokens.append(left + right)
        merges.append(f"{left} {right}")
    return tokens + CONTROL, merges


class Writer:
    def __init__(self):
        self.kv = bytearray()
        self.count = 0

    @staticmethod
    def string(value):
        data = value.encode()
        return struct.pack("<Q", len(data)) + data

    def add(self, key, kind, value):
        self.count += 1
        self.kv += self.string(key) + struct.pack("<I", kind)
        if kind == U32:
            self.kv += struct.pack("<I", value)
        elif kind == F32_VALUE:
            self.kv += struct.pack("<f", value)
        elif kind == STRING:
            self.kv += self.string(value)
        else:
            raise ValueError(kind)

    def array(self, key, kind, values):
        self.count += 1
        self.kv += self.string(key) + struct.pack("<IIQ", ARRAY, kind, len(values))
        if kind == STRING:
            self.kv += b"".join(self.string(v) for v in values)
        elif kind == I32:
            self.kv += struct.pack(f"<{len(values)}i", *values)
        else:
            raise ValueError(kind)


def tensors(shape):
    """(name, GGUF dims innermost first, type) of every tensor of the shape."""
    h, v = shape["hidden"], shape["vocab"]
    hd = shape.get("head_dim", h // shape["heads"])
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    out = [("token_embd.weight", [h, v], Q4_K)]
    for i in range(shape["layers"]):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", [h], F32),
            (b + "attn_q.weight", [h, q], Q4_K),
            (b + "attn_k.weight", [h, kv], Q4_K),
            (b + "attn_v.weight", [h, kv], Q4_K),
            (b + "attn_output.weight", [q, h], Q4_K),
            (b + "ffn_norm.weight", [h], F32),
        ]
        if shape["arch"] == "qwen3moe":
            e, m = shape["experts"], shape["expert_ffn"]
            out += [
                (b + "attn_q_norm.weight", [hd], F32),
                (b + "attn_k_norm.weight", [hd], F32),
                (b + "ffn_gate_inp.weight", [h, e], Q8_0),
                (b + "ffn_gate_exps.weight", [h, m, e], Q4_K),
                (b + "ffn_up_exps.weight", [h, m, e], Q4_K),
                (b + "ffn_down_exps.weight", [m, h, e], Q4_K),
            ]
        else:
            f = shape["ffn"]
            out += [
                (b + "ffn_gate.weight", [h, f], Q4_K),
                (b + "ffn_up.weight", [h, f], Q4_K),
                (b + "ffn_down.weight", [f, h], Q4_K),
            ]
    out += [("output_norm.weight", [h], F32), ("output.weight", [h, v], Q4_K)]
    return out


def size_of(dims, kind):
    count = 1
    for d in dims:
        count *= d
    block_bytes, per_block = BLOCKS[kind]
    if dims[0] % per_block:
        raise ValueError(f"a row of {dims[0]} is not a whole number of {per_block}-value blocks")
    return count // per_block * block_bytes


def data(dims, kind, rng, pool):
    """Random weights of one tensor, laid out as GGUF stores them: a stretch of the pool of
    random bytes, repeated as needed (a step's speed depends on how many bytes it reads,
    not on whether they repeat, and copying is 10x faster than drawing)."""
    size = size_of(dims, kind)
    if kind == F32:
        return struct.pack("<f", 1.0) * (size // 4)
    start = rng.randrange(len(pool))
    buf = bytearray((pool * (size // len(pool) + 2))[start:start + size])
    block, _ = BLOCKS[kind]
    blocks = size // block
    if kind == Q8_0:
        # w = d * q, q a random i8 (std 73.9).
        d = struct.pack("<e", SIGMA / 73.9)
        buf[0::block], buf[1::block] = d[:1] * blocks, d[1:] * blocks
        return buf
    # Q4_K: d, dmin, then the eight 6-bit scales and mins packed in 12 bytes (bytes 0-3 the
    # low scales, 4-7 the low mins, 8-11 the high ones' low bits): every scale 1, dmin d/2
    # and every min 15, so w = d * q - d / 2 * 15 = d * (q - 7.5), q uniform in 0..15
    # (mean 0, std 4.61).
    d = SIGMA / 4.61
    head = struct.pack("<ee", d, d / 2) + bytes([1, 1, 1, 1, 15, 15, 15, 15, 0xF1, 0xF1, 0xF1, 0xF1])
    for offset, byte in enumerate(head):
        buf[offset::block] = bytes([byte]) * blocks
    return buf


def write(path, name, seed=2026, log=sys.stderr):
    shape = SHAPES[name]
    tokens, merges = vocabulary(shape["vocab"])
    assert len(tokens) == shape["vocab"]
    arch = shape["arch"]
    hd = shape.get("head_dim", shape["hidden"] // shape["heads"])
    w = Writer()
    w.add("general.architecture", STRING, arch)
    w.add("general.name", STRING, f"random {name}")
    w.add("general.alignment", U32, ALIGNMENT)
    for key, value in [
        ("block_count", shape["layers"]),
        ("context_length", CONTEXT),
        ("embedding_length", shape["hidden"]),
        ("attention.head_count", shape["heads"]),
        ("attention.head_count_kv", shape["kv_heads"]),
        ("attention.key_length", hd),
        ("attention.value_length", hd),
        ("rope.dimension_count", hd),
    ]:
        w.add(f"{arch}.{key}", U32, value)
    if arch == "qwen3moe":
        w.add(f"{arch}.expert_count", U32, shape["experts"])
        w.add(f"{arch}.expert_used_count", U32, shape["experts_used"])
        w.add(f"{arch}.expert_feed_forward_length", U32, shape["expert_ffn"])
    else:
        w.add(f"{arch}.feed_forward_length", U32, shape["ffn"])
    w.add(f"{arch}.attention.layer_norm_rms_epsilon", F32_VALUE, 1e-6)
    w.add(f"{arch}.rope.freq_base", F32_VALUE, shape["rope"])
    w.add("tokenizer.ggml.model", STRING, "gpt2")
    w.array("tokenizer.ggml.tokens", STRING, tokens)
    w.array("tokenizer.ggml.token_type", I32, [1] * (len(tokens) - len(CONTROL)) + [3] * len(CONTROL))
    w.array("tokenizer.ggml.merges", STRING, merges)
    w.add("tokenizer.ggml.eos_token_id", U32, tokens.index("<|im_end|>"))
    w.add("tokenizer.ggml.bos_token_id", U32, tokens.index("<|endoftext|>"))
    w.add("tokenizer.chat_template", STRING, CHAT_TEMPLATE)

    layout = tensors(shape)
    infos = bytearray()
    offset = 0
    offsets = []
    for tensor, dims, kind in layout:
        offset = -(-offset // ALIGNMENT) * ALIGNMENT
        offsets.append(offset)
        infos += Writer.string(tensor) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", kind, offset)
        offset += size_of(dims, kind)
    header = b"GGUF" + struct.pack("<IQQ", 3, len(layout), w.count) + w.kv + infos
    rng = random.Random(seed)
    pool = rng.randbytes(POOL)
    started = time.monotonic()
    with open(path, "wb") as out:
        out.write(header)
        out.write(b"\0" * (-len(header) % ALIGNMENT))
        start = out.tell()
        for (tensor, dims, kind), at in zip(layout, offsets):
            out.write(b"\0" * (start + at - out.tell()))
            weights = data(dims, kind, rng, pool)
            if tensor == "output.weight":
                # The end-of-text tokens' rows: zero, so answers run to max_tokens.
                row = size_of([dims[0]], kind)
                for control in CONTROL:
                    token = tokens.index(control)
                    weights[token * row:(token + 1) * row] = bytes(row)
            out.write(weights)
    total = os.path.getsize(path)
    print(f"random_gguf: {name} ({arch}) {total / 1e9:.2f} GB in {path} "
          f"({time.monotonic() - started:.0f}s)", file=log)
    return total


def weight_bytes(name):
    """Bytes of weights one decoding step reads, by the number of sequences in the batch:
    every matrix but the embedding (one row each), and for MoE the experts the batch's
    tokens pick, in expectation over a random router."""
    shape = SHAPES[name]
    dense = experts = 0
    for tensor, dims, kind in tensors(shape):
        if tensor == "token_embd.weight":
            continue
        if "_exps." in tensor:
            experts += size_of(dims, kind)
        else:
            dense += size_of(dims, kind)

    def per_step(batch):
        if not experts:
            return dense
        e, k = shape["experts"], shape["experts_used"]
        picked = e * (1 - (1 - k / e) ** batch)
        return dense + experts * picked / e

    return per_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    write(args.out, args.shape, args.seed)


if __name__ == "__main__":
    main()
