"""Hostile and broken files, written without torch: what an attacker or a damaged download can hand mlxvid.

Each builder writes one file (or folder) and returns its path. `convert_cases` and `model_folder_cases` list
them as `mlxvid` command lines for `scripts/hostile_driver.py`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------------
# safetensors


def safetensors_bytes(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file: `header` (a dict, or raw JSON bytes as is) padded with spaces to `header_len`."""
    body = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if header_len is not None:
        assert header_len >= len(body), (header_len, len(body))
        body += b" " * (header_len - len(body))
    return struct.pack("<Q", len(body)) + body + data


def one_tensor(header_len: int | None = None, name: str = "w") -> bytes:
    """A valid file with one float32 (2, 3) tensor, its header padded to `header_len` bytes."""
    data = np.arange(6, dtype=np.float32).tobytes()
    header = {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    return safetensors_bytes(header, data, header_len)


def entry(**over) -> dict:
    e = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    e.update(over)
    return {"w": e}


def bad_safetensors() -> dict[str, bytes]:
    data = bytes(24)
    deep = b"[" * 200_000 + b"]" * 200_000
    return {
        "list-dtype": safetensors_bytes(entry(dtype=["F32"]), data),
        "dict-dtype": safetensors_bytes(entry(dtype={"a": 1}), data),
        "string-offsets": safetensors_bytes(entry(data_offsets=["0", "24"]), data),
        "float-offsets": safetensors_bytes(entry(data_offsets=[0.0, 24.0]), data),
        "negative-offsets": safetensors_bytes(entry(data_offsets=[-24, 0]), data),
        "three-offsets": safetensors_bytes(entry(data_offsets=[0, 12, 24]), data),
        "bool-shape": safetensors_bytes(entry(shape=[True, 6]), data),
        "string-shape": safetensors_bytes(entry(shape=["2", "3"]), data),
        "float-shape": safetensors_bytes(entry(shape=[2.0, 3.0]), data),
        "2**64-shape": safetensors_bytes(entry(shape=[2**64, 0]), data),
        "2**64-shape-times-0": safetensors_bytes(entry(shape=[2**64, 2**64], data_offsets=[0, 0]), data),
        "negative-shape": safetensors_bytes(entry(shape=[-2, -3]), data),
        "deep-shape": safetensors_bytes(entry(shape=[1] * 100), data),
        "string-metadata": safetensors_bytes({**entry(), "__metadata__": "format"}, data),
        "list-metadata": safetensors_bytes({**entry(), "__metadata__": ["a"]}, data),
        "int-metadata-value": safetensors_bytes({**entry(), "__metadata__": {"a": 1}}, data),
        "entry-not-object": safetensors_bytes({"w": [1, 2, 3]}, data),
        "header-is-list": safetensors_bytes(b"[1,2,3]", data),
        "deep-json-200k": safetensors_bytes(b'{"w":' + deep + b"}", data),
        "deep-json-list-200k": safetensors_bytes(deep, data),
        "nan-in-header": safetensors_bytes(b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,24]}}', data),
        "not-utf8-header": safetensors_bytes(b'{"w\xff\xfe":{}}', data),
        "header-length-2**63": struct.pack("<Q", 2**63) + b"{}",
        "header-length-past-end": struct.pack("<Q", 1000) + b"{}",
        "empty-file": b"",
        "seven-bytes": b"\x08\x00\x00\x00\x00\x00\x00",
        "truncated-data": safetensors_bytes(entry(), bytes(10)),
        "overlapping": safetensors_bytes({"a": entry()["w"], "b": entry()["w"]}, data),
        "unknown-dtype": safetensors_bytes(entry(dtype="C64"), data),
        "pk-low-bytes-garbage": struct.pack("<Q", 0x4B50) + b"x" * 10,
    }


# header lengths whose low byte(s) look like another format's start: 0x80 (a pickle), "PK" (a zip), "GG"
SPECIAL_HEADER_LENGTHS = [0x80, 0x180, 0x1980, 0x4B50, 0x14B50, 0x4747, 0x100, 0x17B, 0x120]


# ---------------------------------------------------------------------------------------------------
# torch.save zip archives, written by hand


def _int(v: int) -> bytes:
    if 0 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def tensor_pickle(tensors: dict[str, tuple]) -> bytes:
    """data.pkl of {name: tensor}; each tensor (storage key, storage dtype class, storage numel, offset, size,
    stride), rebuilt with torch._utils._rebuild_tensor_v2 as torch.save writes it (protocol 2)."""
    out = b"\x80\x02}("
    for name, (key, storage_cls, numel, offset, size, stride) in tensors.items():
        storage = b"ctorch\n" + storage_cls.encode() + b"\n"
        pid = _tuple([_str("storage"), storage, _str(key), _str("cpu"), _int(numel)]) + b"Q"
        shape = [_tuple([_int(s) for s in size]), _tuple([_int(s) for s in stride])]
        args = _tuple([pid, _int(offset), *shape, b"\x89", b"N"])
        out += _str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"
    return out + b"u."


def _deflate_zeros(nbytes: int) -> tuple[bytes, int]:
    """A raw deflate stream of `nbytes` zero bytes (a multiple of 1 MiB) and a dummy CRC-32, made from one
    compressed MiB repeated (each piece ends on a full flush), so that gigabytes cost milliseconds."""
    mib = 1 << 20
    assert nbytes % mib == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    return piece * (nbytes // mib) + end, 0  # the CRC is checked only at the end, which no reader must reach


def write_zip(path: Path, entries: list[tuple[str, bytes, int | None, int | None]]) -> Path:
    """A zip by hand: (name, bytes as stored, uncompressed size and CRC when deflated (None: stored))."""
    local, central = b"", b""
    for name, raw, usize, crc in entries:
        method = 0 if usize is None else 8
        usize = len(raw) if usize is None else usize
        crc = zlib.crc32(raw) if crc is None else crc
        fields = struct.pack("<HHHHHIII", 20, 0, method, 0, 0x21, crc, len(raw), usize)
        header = b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name.encode()
        central += (b"PK\x01\x02" + struct.pack("<H", 20) + fields
                    + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, len(local)) + name.encode())
        local += header + raw
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


def pth_archive(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    entries = [("archive/data.pkl", data_pkl, None, None)]
    entries += [(f"archive/data/{k}", v, None, None) for k, v in (storages or {}).items()]
    return write_zip(path, entries)


def shared_list_pickle(depth: int = 40) -> bytes:
    """`l = [l, l]` `depth` levels deep: a few hundred bytes, 2**depth paths through it."""
    x: list = []
    for _ in range(depth):
        x = [x, x]
    return pickle.dumps(x, protocol=2)


def bad_pth(folder: Path) -> dict[str, Path]:
    f = folder
    good_storage = np.arange(6, dtype=np.float32).tobytes()
    one = {"w": ("0", "FloatStorage", 6, 0, (2, 3), (3, 1))}
    stride0 = tensor_pickle({"w": ("0", "ByteStorage", 1, 0, (2**31,), (0,))})
    stride0b = tensor_pickle({"w": ("0", "FloatStorage", 1, 0, (2**17, 2**17), (0, 0))})
    past = tensor_pickle({"w": ("0", "FloatStorage", 6, 4, (2, 3), (3, 1))})
    cases = {
        "pth-valid": pth_archive(f / "valid.pth", tensor_pickle(one), {"0": good_storage}),
        "pth-shared-list-40": pth_archive(f / "shared.pth", shared_list_pickle(40)),
        "pth-stride0-2**31": pth_archive(f / "stride0.pth", stride0, {"0": b"\x01"}),
        "pth-stride0-2**34": pth_archive(f / "stride0b.pth", stride0b, {"0": bytes(4)}),
        "pth-missing-storage": pth_archive(f / "missing.pth", tensor_pickle(one)),
        "pth-storage-short": pth_archive(f / "short.pth", tensor_pickle(one), {"0": bytes(8)}),
        "pth-view-past-storage": pth_archive(f / "past.pth", past, {"0": good_storage}),
        "pth-os-system": pth_archive(f / "evil.pth", b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00trueq\x85R."),
        "pth-deep-pickle": pth_archive(f / "deep.pth", b"\x80\x02" + b"]" * 0 + b"(" * 100_000 + b"t" * 100_000 + b"."),
        "pth-deep-lists": pth_archive(f / "deeplists.pth", b"\x80\x02" + b"](" * 50_000 + b"e" * 50_000 + b"."),
        "pth-self-containing": pth_archive(f / "self.pth", b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s."),
        "pth-long4-huge": pth_archive(f / "long4.pth", b"\x80\x02\x8b\xff\xff\xff\x7f" + b"\x00" * 16 + b"."),
        "pth-binbytes-huge": pth_archive(f / "bb.pth", b"\x80\x03B\xff\xff\xff\x7f" + b"\x00" * 16 + b"."),
        "pth-garbage-pickle": pth_archive(f / "garbage.pth", b"\x80\x02" + os.urandom(0) + b"\xff" * 64),
        "pth-no-data-pkl": write_zip(f / "nopkl.pth", [("archive/other", b"x", None, None)]),
        "pth-truncated-zip": f / "trunc.pth",
        "pth-legacy-garbage": f / "legacy.pth",
        "pth-empty": f / "empty.pth",
    }
    (f / "trunc.pth").write_bytes((f / "valid.pth").read_bytes()[:-30])
    (f / "legacy.pth").write_bytes(b"\x80\x02\x8a\x0a" + b"\xff" * 40)
    (f / "empty.pth").write_bytes(b"")
    # deflate bombs: a 2 GiB storage in 2 MB, a 1.5 GiB data.pkl in 1.5 MB
    raw, crc = _deflate_zeros(2 << 30)
    big = {"w": ("0", "ByteStorage", 2 << 30, 0, (2 << 30,), (1,))}
    cases["pth-deflated-storage-2GiB"] = write_zip(
        f / "bomb.pth", [("archive/data.pkl", tensor_pickle(big), None, None), ("archive/data/0", raw, 2 << 30, crc)]
    )
    raw, crc = _deflate_zeros(1536 << 20)
    cases["pth-deflated-data-pkl-1.5GiB"] = write_zip(f / "pklbomb.pth", [("archive/data.pkl", raw, 1536 << 20, crc)])
    cases["pth-ratio-impossible"] = write_zip(f / "ratio.pth", [("archive/data.pkl", b"\x03\x00", (1 << 32) - 1, 0)])
    return cases


# ---------------------------------------------------------------------------------------------------
# GGUF


def _gstr(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(kv: bytes, n_kv: int, n_tensors: int = 0, tensors: bytes = b"", version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kv + tensors + bytes(64)


def bad_gguf() -> dict[str, bytes]:
    nested = b"".join(struct.pack("<IQ", 9, 1) for _ in range(100_000)) + struct.pack("<IQ", 4, 0)
    return {
        "gguf-arrays-100k-deep": gguf_bytes(_gstr("a") + struct.pack("<I", 9) + nested, 1),
        "gguf-huge-kv-count": gguf_bytes(b"", 2**60),
        "gguf-huge-string": gguf_bytes(struct.pack("<Q", 2**62) + b"a", 1),
        "gguf-huge-array": gguf_bytes(_gstr("a") + struct.pack("<IIQ", 9, 4, 2**62), 1),
        "gguf-huge-dims": gguf_bytes(b"", 0, 1, _gstr("t") + struct.pack("<I", 2) + struct.pack("<QQ", 2**63, 2**63)
                                     + struct.pack("<IQ", 0, 0)),
        "gguf-many-dims": gguf_bytes(b"", 0, 1, _gstr("t") + struct.pack("<I", 2**31)),
        "gguf-bad-alignment": gguf_bytes(_gstr("general.alignment") + struct.pack("<II", 4, 3), 1),
        "gguf-string-alignment": gguf_bytes(_gstr("general.alignment") + struct.pack("<I", 8) + _gstr("x"), 1),
        "gguf-unknown-type": gguf_bytes(_gstr("a") + struct.pack("<I", 77), 1),
        "gguf-version-1": gguf_bytes(b"", 0, version=1),
        "gguf-big-endian": gguf_bytes(b"", 0, version=3 << 24),
        "gguf-truncated": b"GGUF" + struct.pack("<I", 3),
    }


# ---------------------------------------------------------------------------------------------------
# the cases, as command lines


def write_inputs(root: Path) -> dict[str, Path]:
    """Every hostile single file, under root/in/; returns name -> path."""
    folder = root / "in"
    folder.mkdir(parents=True)
    files: dict[str, Path] = {}
    for n in SPECIAL_HEADER_LENGTHS:
        files[f"st-header-{n:#x}"] = folder / f"len{n}.safetensors"
        files[f"st-header-{n:#x}"].write_bytes(one_tensor(n))
    files["st-header-0x80-named-bin"] = folder / "len128.bin"
    files["st-header-0x80-named-bin"].write_bytes(one_tensor(0x80))
    for name, data in {**bad_safetensors(), **bad_gguf()}.items():
        suffix = ".gguf" if name.startswith("gguf") else ".safetensors"
        files[name] = folder / (name.replace("*", "") + suffix)
        files[name].write_bytes(data)
    files.update(bad_pth(folder))
    return files


def convert_argv(root: Path, src: Path, name: str, base: str = "wan2.2-ti2v-5b") -> list[str]:
    """`mlxvid convert` with `src` as the transformer (read first) and harmless other components."""
    good = root / "in" / "len256.safetensors"
    tok = root / "in" / "spiece.model"
    if not tok.exists():
        tok.write_bytes(b"not a tokenizer")
    return ["convert", "--base", base, "--transformer", str(src), "--text-encoder", str(good), "--vae", str(good),
            "--tokenizer", str(tok), str(root / "out" / name)]


def folder_cases(root: Path) -> dict[str, list[str]]:
    """Source folders and destinations that are wrong in themselves."""
    user = root / "user"
    user.mkdir(exist_ok=True)
    (user / "keep.txt").write_text("the user's own file")
    src = root / "srcs"
    cases = {}

    def diffusers(name: str) -> Path:
        d = src / name
        d.mkdir(parents=True)
        (d / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
        for comp in ("transformer", "text_encoder", "vae"):
            (d / comp).mkdir()
            (d / comp / "diffusion_pytorch_model.safetensors").write_bytes(one_tensor(256))
            (d / comp / "config.json").write_text(json.dumps({"num_layers": 1}))
        return d

    d = diffusers("vae-loop")
    shutil.rmtree(d / "vae")
    os.symlink("vae", d / "vae")
    cases["src-vae-symlink-loop"] = ["convert", str(d), str(root / "out" / "vae-loop")]
    d = diffusers("broken-link")
    os.symlink(root / "nowhere", d / "text_encoder_2")
    cases["src-broken-symlink"] = ["convert", str(d), str(root / "out" / "broken-link")]
    for name, body in {"index-list": b"[1]", "index-not-utf8": b"\xff\xfe", "index-deep": b"[" * 100_000,
                       "index-escape": json.dumps({"weight_map": {"w": "../../user/keep.txt"}}).encode()}.items():
        d = diffusers(name)
        (d / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_bytes(body)
        cases[f"src-{name}"] = ["convert", str(d), str(root / "out" / name)]
    for name, body in {"config-list": b"[]", "config-not-utf8": b"\xff", "config-deep": b"{\"a\":" * 100_000}.items():
        d = diffusers(name)
        (d / "transformer" / "config.json").write_bytes(body)
        cases[f"src-{name}"] = ["convert", str(d), str(root / "out" / name)]
    model_indexes = {"model-index-list": b"[]", "model-index-not-utf8": b"\xff", "model-index-deep": b"[" * 100_000}
    for name, body in model_indexes.items():
        d = diffusers(name)
        (d / "model_index.json").write_bytes(body)
        cases[f"src-{name}"] = ["convert", str(d), str(root / "out" / name)]

    valid = root / "in" / "len256.safetensors"
    part_file = root / "out" / "part-file"
    part_file.parent.mkdir(exist_ok=True)
    part_file.with_name("part-file.part").write_text("a file, not ours")
    cases["dst-part-is-a-file"] = convert_argv(root, valid, "part-file")
    os.symlink(user, root / "out" / "part-link.part")
    cases["dst-part-is-a-symlink-to-user-files"] = convert_argv(root, valid, "part-link")
    (root / "out" / "part-user.part").mkdir()
    (root / "out" / "part-user.part" / "thesis.txt").write_text("the user's thesis")
    cases["dst-part-holds-user-files"] = convert_argv(root, valid, "part-user")
    cases["dst-under-a-file"] = convert_argv(root, valid, "../user/keep.txt/out")
    return cases


def model_folder_variants(model: Path, root: Path) -> dict[str, Path]:
    """Copies of a converted model folder, each broken in one way; name -> folder."""
    out: dict[str, Path] = {}

    def variant(name: str) -> Path:
        d = root / "models" / name
        shutil.copytree(model, d)
        out[name] = d
        return d

    def shard_of(d: Path, comp: str) -> Path:
        return sorted((d / comp).glob("model-*.safetensors"))[0]

    variant("mf-manifest-list").joinpath("mlxvid.json").write_bytes(b"[]")
    variant("mf-manifest-not-utf8").joinpath("mlxvid.json").write_bytes(b"{\"a\": \"\xff\"}")
    variant("mf-manifest-deep").joinpath("mlxvid.json").write_bytes(b"[" * 200_000)
    for name, edit in {
        "mf-no-components": lambda m: m.pop("components"),
        "mf-components-string": lambda m: m.update(components="transformer"),
        "mf-component-escapes": lambda m: m.update(components=["../../user"]),
        "mf-dtype-list": lambda m: m.update(dtype=["x"]),
        "mf-defaults-list": lambda m: m.update(defaults=[1]),
    }.items():
        d = variant(name)
        manifest = json.loads((d / "mlxvid.json").read_text())
        edit(manifest)
        (d / "mlxvid.json").write_text(json.dumps(manifest))
    index = "model.safetensors.index.json"
    variant("mf-index-not-json").joinpath("transformer", index).write_bytes(b"{")
    variant("mf-index-list").joinpath("transformer", index).write_bytes(b"[]")
    escape = {"weight_map": {"a": "../../../user/keep.txt"}}
    variant("mf-index-escape").joinpath("transformer", index).write_text(json.dumps(escape))
    variant("mf-config-list").joinpath("transformer", "config.json").write_bytes(b"[]")
    variant("mf-config-not-utf8").joinpath("vae", "config.json").write_bytes(b"\xff")
    shard_of(variant("mf-vae-shard-empty"), "vae").write_bytes(b"")
    s = shard_of(variant("mf-vae-shard-truncated"), "vae")
    s.write_bytes(s.read_bytes()[: s.stat().st_size // 2])
    s = shard_of(variant("mf-transformer-shard-garbage"), "transformer")
    s.write_bytes(os.urandom(4096))
    s = shard_of(variant("mf-shard-list-dtype"), "text_encoder")
    data = s.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["dtype"] = ["F32"]
    s.write_bytes(safetensors_bytes(header, data[8 + n :]))
    s = shard_of(variant("mf-shard-lacks-a-tensor"), "transformer")
    data = s.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop(next(k for k in header if k != "__metadata__"))  # the index still names it
    s.write_bytes(safetensors_bytes(header, data[8 + n :]))
    return out


# ---------------------------------------------------------------------------------------------------
# running cases in hostile_driver.py and judging what they printed

DRIVER = Path(__file__).parent / "scripts" / "hostile_driver.py"
GIB = 1 << 30


def run_driver(cases: list[dict], folder: Path, seconds: float = 5.0, limit_bytes: int = GIB) -> dict[str, dict]:
    """Each case in `hostile_driver.py` under `seconds` and `limit_bytes`; name -> its result."""
    spec, results = folder / "cases.json", folder / "results.json"
    spec.write_text(json.dumps({"cases": cases, "seconds": seconds, "limit_bytes": limit_bytes}))
    paths = [str(DRIVER.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(folder), "MLXVID_HOME": str(folder / "mlxvid-home"),
           "PYTHONPATH": os.pathsep.join(paths)}
    subprocess.run([sys.executable, str(DRIVER), str(spec), str(results)], check=True, env=env, cwd=folder,
                   timeout=60 + len(cases) * (seconds + 3))
    return {r["name"]: r for r in json.loads(results.read_text())}


def message_lines(stderr: str) -> list[str]:
    """What a run printed on stderr, progress bars left out."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    return [line for line in lines if line and not line.startswith("converting:")]


def problems(result: dict, seconds: float = 5.0, limit_bytes: int = GIB) -> list[str]:
    """Why a case did not end in success or one clean line of error, in time and memory (empty if it did)."""
    out = []
    if result["signal"] is not None:
        out.append(f"killed by signal {result['signal']} (time or memory limit)")
    if result["seconds"] > seconds:
        out.append(f"took {result['seconds']:.1f} s")
    if result["peak_bytes"] > limit_bytes:
        out.append(f"peaked at {result['peak_bytes'] / GIB:.2f} GiB")
    lines = message_lines(result["stderr"])
    if "Traceback" in result["stderr"] or result["code"] not in (0, 1):
        out.append(f"exit {result['code']}: {' | '.join(lines[-3:])[:300]}")
    elif result["code"] == 1 and (len(lines) != 1 or not lines[0].startswith("error: ")):
        out.append(f"not one line of error: {lines[:4]}")
    return out
