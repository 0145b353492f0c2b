"""One Wan 2.2 denoising step through ours and through other MLX ports of Wan, as a script:

    python benchmarks/ports.py --model wan2.2-t2v-a14b --size 832x480 --frames 5 --layers 2 --repeats 5 \
        --blaizzy /tmp/blaizzy-mlx-video --mlx-gen /tmp/mlx-gen/src --json ports.json

The ports are public MLX implementations, imported at run time from a checkout given on the command line (never
copied here):
  blaizzy   Blaizzy/mlx-video, `mlx_video/models/wan_2` (official Wan parameter names). Its package is also
            called `mlx_video`, so its Wan modules are imported under the private package name `_port_blaizzy`.
  mlx-gen   lpalbou/mlx-gen, `mflux/models/wan/model/wan_transformer` (diffusers parameter names).
  ours-unfolded  a control, not a port: our step with every text row a key (the zero padding not folded).

Same computation: every port is built at the same reduced depth and real width, and its parameters are OUR
model's arrays (the same MLX buffers where the layout agrees: the weights are held once and count in every
side's memory alike), renamed and, where a port lays a tensor out differently, rearranged. The relative L2
difference of the velocities (fp32) shows that the same step ran.

Each side's step is the way its own generation loop runs it, with what that loop prepares once per prompt done
before the timing:
  ours      CFG batched (batch 2), `prepare_context` (text embedding and every block's cross-attention K/V once
            per prompt), eager (the pipeline does not compile), `guidance_batched` as the pipeline calls it.
  blaizzy   CFG batched (batch 2): `embed_text` + `prepare_cross_kv` + `prepare_rope` once, the forward through
            `mx.compile(model)` (its default), then uncond + g (cond - uncond).
  mlx-gen   two forwards of batch 1 (cond, then uncond) evaluated together, the text embedding inside every
            forward, eager (compile is opt-in there), timesteps per token for TI2V-5B (its text-to-video
            path), per sample for A14B.

Text: `--prompt-tokens N,M` zeroes the context rows past the prompt's N and the negative prompt's M tokens, as the
text encoders pad them to 512; every side attends to the 512 rows as its pipeline does, ours with the padding
folded into one key per sample (`mlx_video.nn.attention.fold_zero_padding`). Without it every row is random.

Memory: `mx.get_peak_memory()` over one step of each side (reset before), minus the bytes alive before it that
the side does not own (the other sides' prepared state), i.e. weights + that side's prepared state + its
activations.
"""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import types
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    _finish,
    _fmt_bytes,
    _materialise,
    _release,
    _table,
    side_by_side,
    step_case,
)

from mlx_video.pipelines.loop import guidance_batched  # noqa: E402
from mlx_video.registry import get_spec  # noqa: E402

TIMESTEP = 500.0
GUIDANCE_SCALE = 5.0  # any value != 1 makes the step run both passes; the value does not change the cost


def _our_model(model_id: str, layers: int, size, frames: int, seed: int):
    """(spec, dtype, config, geometry, batch, guidance, model, weight bytes): the family's step case of `model_id`
    (its bench module) at `layers` blocks, fp32, its transformer built with random weights."""
    case = step_case(model_id, size, frames, layers, "fp32", seed=seed)
    geo = {"latent": case.info["latent"], "grid": case.info["grid"], "tokens": case.tokens}
    model = case.model("fp32")
    weights = _materialise(model, "fp32")
    return get_spec(case.model_id), "fp32", case.config, geo, case.batch, GUIDANCE_SCALE, model, weights


# ---------------------------------------------------------------------------------------------- importing ports


def _bare_package(name: str, path: Path) -> None:
    """Register package `name` searching `path` without running its __init__ (which imports the port's whole
    application)."""
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module


def _git_head(path: Path) -> str | None:
    for p in [path, *path.parents]:
        head = p / ".port_commit"
        if head.exists():
            return head.read_text().strip()
    return None


def import_blaizzy(root: str | Path):
    """Blaizzy/mlx-video's Wan 2.x model modules (wan_2.py, config.py) from a checkout at `root`."""
    root = Path(root)
    wan2 = root / "mlx_video" / "models" / "wan_2"
    _bare_package("_port_blaizzy", wan2)
    # config.py imports `mlx_video.models.ltx_2.config` (its own package, whose name ours shadows): load that
    # file privately and let the import find it by that name only while config.py runs.
    spec = importlib.util.spec_from_file_location("_port_blaizzy_ltx2_config", root / "mlx_video/models/ltx_2/config.py")
    ltx2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ltx2)
    key = "mlx_video.models.ltx_2.config"
    saved = sys.modules.get(key)
    sys.modules[key] = ltx2
    try:
        config = importlib.import_module("_port_blaizzy.config")
    finally:
        if saved is None:
            sys.modules.pop(key, None)
        else:
            sys.modules[key] = saved
    model = importlib.import_module("_port_blaizzy.wan_2")
    return config, model


def import_mlx_gen(src: str | Path):
    """lpalbou/mlx-gen's Wan transformer modules from its `src` folder."""
    src = Path(src)
    base = src / "mflux"
    for name in ("mflux", "mflux.utils", "mflux.models", "mflux.models.wan", "mflux.models.wan.model",
                 "mflux.models.wan.model.wan_transformer", "mflux.models.wan.latent_creator"):
        _bare_package(name, base.joinpath(*name.split(".")[1:]))
    transformer = importlib.import_module("mflux.models.wan.model.wan_transformer.wan_transformer")
    policy = importlib.import_module("mflux.models.wan.latent_creator.wan_timestep_policy")
    return transformer, policy


# ---------------------------------------------------------------------------------------------- parameter maps


def _flat(tree):
    from mlx.utils import tree_flatten

    return dict(tree_flatten(tree))


def _patch_to_channel_major(w, cfg):
    """Our patch embedding's input order is (pt, ph, pw, C); Blaizzy's is (C, pt, ph, pw)."""
    pt, ph, pw = cfg.patch_size
    return w.reshape(cfg.dim, pt, ph, pw, cfg.in_channels).transpose(0, 4, 1, 2, 3).reshape(cfg.dim, -1)


def blaizzy_params(ours: dict, cfg) -> dict:
    """Our flat parameters under Blaizzy/mlx-video's names and layouts."""
    top = {
        "text_embedding.linear_1": "text_embedding_0", "text_embedding.linear_2": "text_embedding_1",
        "time_embedding.linear_1": "time_embedding_0", "time_embedding.linear_2": "time_embedding_1",
        "time_projection": "time_projection", "head.linear": "head.head",
    }
    out = {}
    for name, value in ours.items():
        prefix, _, leaf = name.rpartition(".")
        if name == "patch_embedding.weight":
            out["patch_embedding_proj.weight"] = _patch_to_channel_major(value, cfg)
        elif name == "patch_embedding.bias":
            out["patch_embedding_proj.bias"] = value
        elif prefix in top:
            out[f"{top[prefix]}.{leaf}"] = value
        elif name == "head.modulation":
            out[name] = value[None]
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            if rest == "modulation":
                value = value[None]
            rest = rest.replace("norm_cross.", "norm3.")
            out[f"blocks.{i}.{rest}"] = value
        else:
            raise KeyError(f"no Blaizzy name for {name}")
    return out


def mlx_gen_params(ours: dict, cfg) -> dict:
    """Our flat parameters under mlx-gen's (diffusers) names and layouts."""
    top = {
        "text_embedding.linear_1": "condition_embedder.text_embedder.linear_1",
        "text_embedding.linear_2": "condition_embedder.text_embedder.linear_2",
        "time_embedding.linear_1": "condition_embedder.time_embedder.linear_1",
        "time_embedding.linear_2": "condition_embedder.time_embedder.linear_2",
        "time_projection": "condition_embedder.time_proj", "head.linear": "proj_out",
    }
    attn = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}
    block = {"self_attn": "attn1", "cross_attn": "attn2", "norm_cross": "norm2"}
    pt, ph, pw = cfg.patch_size
    out = {}
    for name, value in ours.items():
        prefix, _, leaf = name.rpartition(".")
        if name == "patch_embedding.weight":  # Conv3d (out, kt, kh, kw, in): our (pt, ph, pw, C) order
            out[name] = value.reshape(cfg.dim, pt, ph, pw, cfg.in_channels)
        elif name == "patch_embedding.bias":
            out[name] = value
        elif prefix in top:
            out[f"{top[prefix]}.{leaf}"] = value
        elif name == "head.modulation":
            out["scale_shift_table"] = value[None]
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            parts = rest.split(".")
            if rest == "modulation":
                out[f"blocks.{i}.scale_shift_table"] = value[None]
                continue
            if parts[0] in ("self_attn", "cross_attn"):
                parts = [block[parts[0]], attn[parts[1]], *parts[2:]]
            elif parts[0] == "norm_cross":
                parts = [block[parts[0]], *parts[1:]]
            elif parts[0] == "ffn":
                parts = ["ffn", "net", {"fc1": "0", "fc2": "1"}[parts[1]], *parts[2:]]
            out[f"blocks.{i}." + ".".join(parts)] = value
        else:
            raise KeyError(f"no mlx-gen name for {name}")
    return out


def _install(module, params: dict, own: tuple = ()) -> None:
    """Replace every parameter of `module` with `params` (exact key set and shapes); `own` names the arrays
    the port computes itself (its RoPE tables), which it keeps."""
    from mlx.utils import tree_unflatten

    theirs = _flat(module.parameters())
    missing, extra = set(theirs) - set(params) - set(own), set(params) - set(theirs)
    if missing or extra:
        raise KeyError(f"parameter names differ: missing {sorted(missing)[:8]}, unexpected {sorted(extra)[:8]}")
    for k, v in params.items():
        if tuple(v.shape) != tuple(theirs[k].shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} != {tuple(theirs[k].shape)}")
    module.update(tree_unflatten(list(params.items())))


# ---------------------------------------------------------------------------------------------- the sides


class _Channels:
    """A port's velocity (B, C, T, H, W) in MLX, read to numpy only when compared (not inside a timing)."""

    def __init__(self, value):
        self.value = value

    def float(self):
        return self

    def detach(self):  # harness.output_agreement reads a torch tensor as .detach().float().cpu().numpy()
        return self

    def cpu(self):
        return self

    def numpy(self):
        import mlx.core as mx
        import numpy as np

        return np.asarray(self.value.astype(mx.float32))


def _nbytes(tree) -> int:
    return sum(v.nbytes for v in _flat(tree).values() if v is not None) if not hasattr(tree, "nbytes") else tree.nbytes


def make_blaizzy(root, cfg, ours_params: dict, latents, context, g: float, compiled: bool = True):
    """(step, own bytes, note). latents: ours (1, T, H, W, C); context (2, L, text_dim): cond, uncond."""
    import mlx.core as mx

    config_mod, model_mod = import_blaizzy(root)
    pcfg = config_mod.WanModelConfig(
        dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, in_dim=cfg.in_channels,
        out_dim=cfg.out_channels, num_heads=cfg.num_heads, num_layers=cfg.num_layers, patch_size=cfg.patch_size,
        text_len=context.shape[1], eps=cfg.eps, qk_norm=True, cross_attn_norm=True)
    model = model_mod.WanModel(pcfg)
    params = blaizzy_params(ours_params, cfg)
    _install(model, params, own=("freqs",))
    own = [params["patch_embedding_proj.weight"], model.freqs, model._inv_freq]

    x = latents[0].transpose(3, 0, 1, 2)  # (C, T, H, W), the port's latent layout
    _, t_lat, h_lat, w_lat = x.shape
    pt, ph, pw = cfg.patch_size
    grid = (t_lat // pt, h_lat // ph, w_lat // pw)
    seq_len = grid[0] * grid[1] * grid[2]
    # what its generate() prepares once per prompt: text embedding, cross-attention K/V, RoPE tables
    emb = model.embed_text([context[0], context[1]])
    ctx = mx.concatenate([emb[0:1], emb[1:2]], axis=0)
    kv = model.prepare_cross_kv(ctx)
    rope = model.prepare_rope([grid, grid])
    mx.eval(x, ctx, kv, rope, *own)
    own_bytes = sum(a.nbytes for a in own) + ctx.nbytes + _nbytes(kv) + _nbytes(list(rope))
    call = mx.compile(model) if compiled else model
    t = mx.array([TIMESTEP, TIMESTEP])

    def step():
        cond, uncond = call([x, x], t=t, context=ctx, seq_len=seq_len, cross_kv_caches=kv, y=None,
                            rope_cos_sin=rope)
        v = uncond + g * (cond - uncond)
        mx.eval(v)
        return _Channels(v[None])

    return step, own_bytes, ("CFG batch 2, prepared text/cross-K/V/RoPE, " +
                             ("mx.compile(model) (its default)" if compiled else "eager"))


def make_mlx_gen(src, cfg, ours_params: dict, latents, context, g: float, per_token_time: bool):
    import mlx.core as mx

    tmod, policy = import_mlx_gen(src)
    model = tmod.WanTransformer(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps,
        rope_max_seq_len=cfg.rope_max_positions)
    params = mlx_gen_params(ours_params, cfg)
    _install(model, params, own=("rope.freqs_cos", "rope.freqs_sin"))
    x = latents.transpose(0, 4, 1, 2, 3)  # (1, C, T, H, W)
    if per_token_time:  # TI2V-5B's text-to-video path: one timestep per token
        t = policy.WanTimestepPolicy.expand_for_text_to_video(latent_shape=x.shape, timestep=TIMESTEP,
                                                              patch_size=cfg.patch_size)
    else:
        t = mx.array([TIMESTEP])
    cond_ctx, uncond_ctx = context[:1], context[1:]
    mx.eval(x, t, cond_ctx, uncond_ctx)
    own = [model.rope.freqs_cos, model.rope.freqs_sin]
    mx.eval(*own)

    def step():
        cond = model(hidden_states=x, timestep=t, encoder_hidden_states=cond_ctx)
        uncond = model(hidden_states=x, timestep=t, encoder_hidden_states=uncond_ctx)
        v = uncond + g * (cond - uncond)
        mx.eval(v)
        return _Channels(v)

    note = "two batch-1 forwards (cond, uncond), text embedding per forward, eager, timestep " + (
        "per token" if per_token_time else "per sample")
    return step, sum(a.nbytes for a in own), note


def our_step(model, prepared, latents, t, context, g: float):
    """Our step as the pipeline runs it: CFG batched over `prepared` text, the velocity evaluated."""
    import mlx.core as mx

    def step():
        v = guidance_batched(lambda xb, tb, c: model(xb, tb, prepared), latents, t, context[:1], context[1:], g)
        mx.eval(v)
        return v

    return step


def make_ours_unfolded(model, latents, context, t, g: float):
    """Our step with the text prepared without folding the zero padding: every row a key, as before the fold."""
    import mlx.core as mx

    from mlx_video.families.wan.transformer import PreparedContext, TextKV

    text = model.text_embedding(context)
    kv = [TextKV(*block.cross_attn.project_kv(text), None) for block in model.blocks]
    mx.eval(text, kv)
    step = our_step(model, PreparedContext(text, kv), latents, t, context, g)
    return lambda: _Channels(step().transpose(0, 4, 1, 2, 3)), _nbytes(text) + _nbytes(kv), "ours with every text row a key (the padding not folded), a control"


# ---------------------------------------------------------------------------------------------- the run


def run_ports(model_id: str = "wan2.2-t2v-a14b", size=(832, 480), frames: int = 5, layers: int = 2,
              repeats: int = 5, warmup: int = 1, ports=("blaizzy", "mlx-gen"), blaizzy_root=None, mlx_gen_src=None,
              blaizzy_compile: bool = True, prompt_tokens: tuple[int, int] | None = None, seed: int = 0,
              json_path=None, echo=click.echo, command: str | None = None) -> dict:
    """prompt_tokens: (prompt, negative prompt) token counts; the context rows past them are zero, as the text
    encoders pad them to text_len (None: every row random, nothing to fold)."""
    import mlx.core as mx

    _release()
    spec, dtype, cfg, geo, batch, g, model, weights = _our_model(model_id, layers, size, frames, seed)
    width, height = size
    text_len = spec.default("text_len", 512)
    k1, k2 = mx.random.split(mx.random.key(seed + 1))
    latents = mx.random.normal((1, *geo["latent"], cfg.in_channels), key=k1)
    context = mx.random.normal((2, text_len, cfg.text_dim), key=k2)
    if prompt_tokens is not None:
        if not all(1 <= n <= text_len for n in prompt_tokens):
            raise click.UsageError(f"--prompt-tokens must be between 1 and {text_len}")
        rows = mx.arange(text_len)[None, :, None] < mx.array(prompt_tokens)[:, None, None]
        context = mx.where(rows, context, 0.0)
    mx.eval(latents, context)
    inputs = latents.nbytes + context.nbytes
    params = _flat(model.parameters())

    # ours, as the pipeline runs a step: context prepared once per prompt, CFG batched
    prepared = model.prepare_context(context)
    model.rope_tables(tuple(geo["grid"]))
    ours_own = _nbytes(prepared.text) + _nbytes(prepared.kv)
    t = mx.array([TIMESTEP], dtype=mx.float32)

    ours_step = our_step(model, prepared, latents, t, context, g)

    rows, record_ports = [], {}
    for name in ports:
        if name == "blaizzy":
            if not blaizzy_root:
                raise click.UsageError("--blaizzy PATH (a checkout of Blaizzy/mlx-video) is needed")
            ref_step, own, note = make_blaizzy(blaizzy_root, cfg, params, latents, context, g, blaizzy_compile)
            commit = _git_head(Path(blaizzy_root))
        elif name == "mlx-gen":
            if not mlx_gen_src:
                raise click.UsageError("--mlx-gen PATH (lpalbou/mlx-gen's src folder) is needed")
            ref_step, own, note = make_mlx_gen(mlx_gen_src, cfg, params, latents, context, g,
                                               per_token_time=spec.id == "wan2.2-ti2v-5b")
            commit = _git_head(Path(mlx_gen_src))
        elif name == "ours-unfolded":  # a control: our step with all text rows as keys (no padding folded)
            ref_step, own, note = make_ours_unfolded(model, latents, context, t, g)
            commit = None
        else:
            raise click.UsageError(f"unknown port {name}")
        with _LoadAverage() as load:
            rel, ours_t, ref_t, _, _, _, _ = side_by_side(ours_step, ref_step, repeats, 0, warmup)
        # memory of each side over one step: weights + its own prepared state + activations
        ours_peak = _peak(ours_step) - own - inputs  # minus what only the port holds, and the shared inputs
        ref_peak = _peak(ref_step) - ours_own - inputs
        ratio_med = statistics.median(ours_t) / statistics.median(ref_t)
        ratio_min = min(ours_t) / min(ref_t)
        record_ports[name] = {
            "port": name, "commit": commit, "how": note, "ours_times_s": ours_t, "port_times_s": ref_t,
            "ours_seconds_median": statistics.median(ours_t), "port_seconds_median": statistics.median(ref_t),
            "time_ratio_median_ours_over_port": ratio_med, "time_ratio_fastest_ours_over_port": ratio_min,
            "ours_peak_bytes": ours_peak, "port_peak_bytes": ref_peak, "memory_ratio_ours_over_port": ours_peak / ref_peak,
            "ours_prepared_bytes": ours_own, "port_own_bytes": own, "output_relative_l2": rel,
            "load_average_before_after": load.values,
        }
        rows.append((name, f"{statistics.median(ours_t):.2f} ({min(ours_t):.2f})",
                     f"{statistics.median(ref_t):.2f} ({min(ref_t):.2f})", f"{ratio_med:.3f} ({ratio_min:.3f})",
                     _fmt_bytes(ours_peak), _fmt_bytes(ref_peak), f"{ours_peak / ref_peak:.3f}", f"{rel:.1e}",
                     " -> ".join("/".join(f"{x:.1f}" for x in v) for v in load.values)))
        ref_step = None
        _release()

    record = {"harness": "ports", "model": spec.id, "config": cfg.to_dict(), "width": width, "height": height,
              "frames": frames, "layers": layers, "prompt_tokens": prompt_tokens, "text_len": text_len,
              "ours_cross_attention_keys": prepared.text.shape[1], "dtype": dtype, "batch": batch, "tokens": geo["tokens"],
              "repeats": repeats, "weights_bytes": weights, "inputs_bytes": inputs, "ports": record_ports}
    echo(f"ports: {spec.id}, {width}x{height}x{frames} ({geo['tokens']} tokens per sample, CFG), {layers} blocks at "
         f"width {cfg.dim}, fp32, {mx.default_device()}; weights {_fmt_bytes(weights)} (shared); prompt tokens "
         f"{prompt_tokens or 'all random'} of {text_len} (ours attends to {prepared.text.shape[1]} keys)")
    _table(rows, echo, header=("port", "ours s median (fastest)", "port s median (fastest)",
                               "ours/port median (fastest)", "ours peak", "port peak", "mem ours/port", "rel L2",
                               "load avg 1/5/15 before -> after"))
    for name, r in record_ports.items():
        echo(f"  {name}: {r['how']}; runs ours {', '.join(f'{x:.2f}' for x in r['ours_times_s'])}; "
             f"port {', '.join(f'{x:.2f}' for x in r['port_times_s'])}")
    return _finish(record, json_path, echo, command)


def profile_block(model_id: str = "wan2.2-t2v-a14b", size=(832, 480), frames: int = 5, repeats: int = 3,
                  seed: int = 0, json_path=None, echo=click.echo, command: str | None = None) -> dict:
    """Where one of our blocks spends its time (CFG batch 2, prepared cross-attention K/V, fp32): the block, then
    its parts alone on the same inputs: the eight linear layers, self- and cross-attention (`attention` on ready
    q/k/v), and the element-wise rest (adaLN, norms, RoPE, gates, GELU) as the block minus those."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_video.kernels import adaln_modulate, apply_rope_qk, gated_residual
    from mlx_video.families.wan import cost_model as F
    from mlx_video.nn.attention import attention

    from harness import _timed, measure_matmul

    spec, dtype, cfg, geo, batch, g, model, _ = _our_model(model_id, 1, size, frames, seed)
    n, dim, text_len = geo["tokens"], cfg.dim, spec.default("text_len", 512)
    block = model.blocks[0]
    keys = mx.random.split(mx.random.key(seed + 1), 4)
    x = mx.random.normal((batch, 1, n, dim), key=keys[0])
    time_ = mx.random.normal((batch, 1, 6, dim), key=keys[1]) * 0.1
    text = mx.random.normal((batch, text_len, dim), key=keys[2])
    kv = block.cross_attn.project_kv(text)
    rope = model.rope_tables(tuple(geo["grid"]))
    mx.eval(x, time_, text, kv)
    rows2 = x.reshape(batch * n, dim)
    ff = mx.random.normal((batch * n, cfg.ffn_dim), key=keys[3])
    heads, hd = cfg.num_heads, cfg.head_dim
    q4 = rows2.reshape(batch, n, heads, hd)
    mx.eval(ff, q4)
    ev = lambda f: (lambda: mx.eval(f()))  # noqa: E731
    med = lambda f: statistics.median(_timed(ev(f), repeats))  # noqa: E731
    sa, ca = block.self_attn, block.cross_attn
    parts = {
        "block": med(lambda: block(x, time_, text, rope, kv)),
        "linear self q,k,v,o": sum(med(lambda layer=layer: layer(rows2)) for layer in (sa.q, sa.k, sa.v, sa.o)),
        "linear cross q,o": sum(med(lambda layer=layer: layer(rows2)) for layer in (ca.q, ca.o)),
        "linear ffn fc1": med(lambda: block.ffn.fc1(rows2)),
        "linear ffn fc2": med(lambda: block.ffn.fc2(ff)),
        "self-attention (scores, softmax, values)": med(lambda: attention(q4, q4, q4)),
        "cross-attention": med(lambda: attention(q4, *kv)),
        "adaLN x2 + gated residual x2": med(lambda: [adaln_modulate(x, time_[:, :, 0:1], time_[:, :, 1:2], cfg.eps),
                                                   gated_residual(x, time_[:, :, 2:3], x)]) * 2,
        "RoPE q,k": med(lambda: apply_rope_qk(q4, q4, rope)),
        "q/k RMSNorm x3, cross LayerNorm": med(lambda: [sa.norm_q(rows2), sa.norm_k(rows2), ca.norm_q(rows2),
                                                        block.norm_cross(x)]),
        "GELU": med(lambda: nn.gelu_approx(ff)),
    }
    total = parts["block"]
    lin = sum(v for k, v in parts.items() if k.startswith("linear"))
    att = parts["self-attention (scores, softmax, values)"] + parts["cross-attention"]
    fl = F.forward_flops(cfg, n, text_len, batch, 1)
    lin_flops = 2 * batch * n * (6 * dim * dim + 2 * dim * cfg.ffn_dim)
    peak = measure_matmul("fp32", 2048)
    echo(f"profile: one {spec.id} block, {n} tokens, batch {batch}, fp32, {mx.default_device()}; "
         f"2048^3 matmul {peak:.3f} TFLOP/s; load {os.getloadavg()}")
    _table([(k, f"{v:.3f}", f"{v / total:.1%}") for k, v in parts.items()]
           + [("sum of linears", f"{lin:.3f}", f"{lin / total:.1%}"),
              ("attention (self + cross)", f"{att:.3f}", f"{att / total:.1%}"),
              ("block - linears - attention (element-wise, copies)", f"{total - lin - att:.3f}",
               f"{(total - lin - att) / total:.1%}"),
              ("linears' TFLOP/s (utilisation of the 2048^3 matmul)", f"{lin_flops / lin / 1e12:.3f}",
               f"{lin_flops / lin / 1e12 / peak:.0%}")],
           echo, header=("part", "seconds", "share of the block"))
    record = {"harness": "ports-profile", "model": spec.id, "tokens": n, "batch": batch, "parts_s": parts,
              "linear_s": lin, "attention_s": att, "rest_s": total - lin - att, "linear_flops": lin_flops,
              "matmul_2048_tflops": peak, "forward_flops_1_block_model": fl.total}
    return _finish(record, json_path, echo, command)


def _peak(step) -> int:
    import mlx.core as mx

    _release()
    mx.reset_peak_memory()
    step()
    return mx.get_peak_memory()


class _LoadAverage:
    def __enter__(self):
        self.values = [os.getloadavg()]
        return self

    def __exit__(self, *exc):
        self.values.append(os.getloadavg())


def _parse_size(value: str) -> tuple[int, int]:
    w, h = value.lower().split("x")
    return int(w), int(h)


@click.command()
@click.option("--model", "model_id", default="wan2.2-t2v-a14b")
@click.option("--size", default="832x480", callback=lambda c, p, v: _parse_size(v))
@click.option("--frames", default=5, type=int)
@click.option("--layers", default=2, type=int)
@click.option("--repeats", default=5, type=int)
@click.option("--warmup", default=1, type=int)
@click.option("--ports", default="blaizzy,mlx-gen", callback=lambda c, p, v: [s for s in v.split(",") if s])
@click.option("--blaizzy", "blaizzy_root", default=None, help="a checkout of Blaizzy/mlx-video")
@click.option("--mlx-gen", "mlx_gen_src", default=None, help="the src folder of a checkout of lpalbou/mlx-gen")
@click.option("--no-blaizzy-compile", is_flag=True, help="run Blaizzy's forward eagerly (its --no-compile)")
@click.option("--prompt-tokens", default=None, metavar="N,M",
              callback=lambda c, p, v: None if v is None else tuple(int(x) for x in v.split(",")),
              help="token counts of the prompt and the negative prompt: context rows past them are zero, as the "
                   "text encoder pads them (default: all 512 rows random)")
@click.option("--profile", is_flag=True, help="instead: where one of our blocks spends its time")
@click.option("--json", "json_path", default=None)
def main(model_id, size, frames, layers, repeats, warmup, ports, blaizzy_root, mlx_gen_src, no_blaizzy_compile,
         prompt_tokens, profile, json_path):
    if profile:
        profile_block(model_id, size, frames, repeats, json_path=json_path, command=" ".join(sys.argv))
        return
    run_ports(model_id, size, frames, layers, repeats, warmup, ports, blaizzy_root, mlx_gen_src,
              not no_blaizzy_compile, prompt_tokens, json_path=json_path, command=" ".join(sys.argv))


if __name__ == "__main__":
    main()
