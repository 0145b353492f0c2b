"""Wan VACE against diffusers' WanVACEPipeline at tiny random configs (fp32, CPU torch): a Wan2.1-VACE-style
model (3 heads of width 10, 3 blocks with context blocks at 0 and 2) and a Wan2.2 VACE-Fun-style pair of
experts (2 heads of width 12), 5 and 9 frames at 48x32; --init-latents is the reference's noise including the
reference-image frames, --save-latents the final latents (which keep them, as diffusers' latent output does).

The four runs the issue names: a control video alone; inpainting (--video with a --mask-video holding grey
values too, which the mask channels keep and the video split binarizes); two reference images (one not a
multiple of 8 pixels, and of other aspect ratios than the video); a control video with a reference image at
--control-scale 0.7, on two experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.run import prepare  # noqa: E402
from support.wan import build_tiny_vace_pipeline, use_official_sigmas  # noqa: E402
from support.arrays import rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # torch on one thread (tests/conftest.py)

PROMPT = "a red kite over a green hill"
NEGATIVE = "blurry"
WIDTH, HEIGHT = 48, 32


def write_frames(folder, count, width, height, seed, grey=False):
    """A PNG folder of `count` smooth frames; returns them as PIL images (RGB)."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.integers(0, 256, (height // 8, width // 8, 1 if grey else 3), dtype=np.uint8)
        image = PIL.fromarray(small[..., 0] if grey else small).resize((width, height), PIL.BILINEAR)
        image.convert("RGB").save(folder / f"frame_{i:05d}.png")
    return [PIL.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def write_masks(folder, count, width, height):
    """White (generate) boxes that move, a grey band (0.5 < 160/255: generated; 96/255: kept, but both kept as
    values in the mask channels), black elsewhere."""
    folder.mkdir()
    for i in range(count):
        mask = np.zeros((height, width), np.uint8)
        mask[8:24, 4 + 3 * i:20 + 3 * i] = 255
        mask[26:29] = 160 if i % 2 else 96
        PIL.fromarray(mask).convert("RGB").save(folder / f"mask_{i:05d}.png")
    return [PIL.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def write_image(path, width, height, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8)
    PIL.fromarray(rgb).resize((width, height), PIL.BILINEAR).save(path)
    return PIL.open(path).convert("RGB")


def decode_like_diffusers(pipe, latents):
    """(frames, H, W, 3) in [0, 1]: the pipeline's own output_type="np" decoding (reference frames dropped)."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    video = vae.decode(latents * std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="np")[0]


def text_embeddings(pipe):
    """The reference's own prompt and negative-prompt embeddings (its encode_prompt, 512 positions), computed once
    per pipeline: the tiny UMT5 at 512 positions is most of a reference run's time."""
    if not hasattr(pipe, "_test_embeddings"):
        pipe._test_embeddings = pipe.encode_prompt(prompt=PROMPT, negative_prompt=NEGATIVE,
                                                   do_classifier_free_guidance=True, max_sequence_length=512)
    return pipe._test_embeddings


def run_both(monkeypatch, tmp_path, root, pipe, frames, refs, call, cli, steps=2, guidance=3.0, decode=False):
    import diffusers.pipelines.wan.pipeline_wan_vace as vace

    latent_frames = (frames - 1) // 4 + 1 + refs
    noise = np.random.default_rng(frames + refs).standard_normal((1, 4, latent_frames, HEIGHT // 8, WIDTH // 8))
    noise = noise.astype(np.float32)
    monkeypatch.setattr(vace, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    with torch.no_grad():
        positive, negative = text_embeddings(pipe)
        expected = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, height=HEIGHT, width=WIDTH,
                        num_frames=frames, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                        **call).frames
        ref_frames = decode_like_diffusers(pipe, expected[:, :, refs:]) if decode else None
    np.save(tmp_path / "noise.npy", noise)
    out = tmp_path / "out.npy"
    extra = ["--output", str(tmp_path / "frames")] if decode else []
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
          "--size", f"{WIDTH}x{HEIGHT}", "--frames", str(frames), "--steps", str(steps), "--guidance", str(guidance),
          "--init-latents", str(tmp_path / "noise.npy"), "--save-latents", str(out), "--quiet", *extra, *cli])
    record = json.loads(out.with_suffix(".json").read_text())["settings"]
    return np.load(out), expected.numpy(), record, ref_frames


@pytest.fixture(scope="module")
def vace21(tmp_path_factory):
    root = tmp_path_factory.mktemp("vace21")
    pipe = build_tiny_vace_pipeline(root / "diffusers", heads=3, head_dim=10)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    use_official_sigmas(pipe)
    clip = write_frames(root / "clip", 9, WIDTH, HEIGHT, 3)
    control = write_frames(root / "control", 7, WIDTH, HEIGHT, 4, grey=True)
    masks = write_masks(root / "masks", 9, WIDTH, HEIGHT)
    refs = [write_image(root / "ref_a.png", 40, 56, 5), write_image(root / "ref_b.png", 50, 30, 6)]
    return root, pipe, clip, control, masks, refs


def test_control_video_matches_diffusers(vace21, monkeypatch, tmp_path):
    root, pipe, _, control, _, _ = vace21
    ours, expected, record, _ = run_both(monkeypatch, tmp_path, root, pipe, 5, 0, dict(video=control[:5]),
                                         ["--control-video", str(root / "control")])
    err = rel_err(ours, expected)
    print(f"VACE control video: relative error {err:.2e}")
    assert err < 1e-3
    assert record["input_files"]["control_video"]["name"] == "control"
    assert len(record["input_files"]["control_video"]["sha256"]) == 64


def test_mask_inpainting_matches_diffusers(vace21, monkeypatch, tmp_path):
    root, pipe, clip, _, masks, _ = vace21
    ours, expected, record, ref_frames = run_both(
        monkeypatch, tmp_path, root, pipe, 9, 0, dict(video=clip, mask=masks),
        ["--video", str(root / "clip"), "--mask-video", str(root / "masks")], decode=True)
    err = rel_err(ours, expected)
    frames = np.stack([np.asarray(PIL.open(p)) for p in sorted((tmp_path / "frames").glob("*.png"))])
    pixel_err = float(np.abs(frames.astype(np.float64) - np.round(ref_frames * 255)).mean())
    print(f"VACE inpainting: relative error {err:.2e}, frames mean abs {pixel_err:.3f}/255")
    assert err < 1e-3 and pixel_err < 1.0
    assert frames.shape == (9, HEIGHT, WIDTH, 3)
    assert record["input_files"]["mask_video"]["name"] == "masks"


def test_two_reference_images_match_diffusers(vace21, monkeypatch, tmp_path):
    root, pipe, _, _, _, refs = vace21
    ours, expected, record, _ = run_both(
        monkeypatch, tmp_path, root, pipe, 5, 2, dict(reference_images=refs),
        ["--reference-image", str(root / "ref_a.png"), "--reference-image", str(root / "ref_b.png")])
    err = rel_err(ours, expected)
    print(f"VACE two reference images: relative error {err:.2e}")
    assert ours.shape == (1, 4, 2 + 2, HEIGHT // 8, WIDTH // 8)  # the reference frames kept in front
    assert err < 1e-3
    assert [f["name"] for f in record["input_files"]["reference_image"]] == ["ref_a.png", "ref_b.png"]
    # --from-sidecar repeats the run: the same references, in the same order
    main(["generate", "--from-sidecar", str(tmp_path / "out.json"), "--save-latents", str(tmp_path / "replay.npy"),
          "--quiet"])
    np.testing.assert_array_equal(np.load(tmp_path / "replay.npy"), ours)
    # mlxvid decode drops the reference frames, as the run's own decoding does
    main(["decode", str(tmp_path / "out.npy"), "--output", str(tmp_path / "decoded"), "--quiet"])
    assert len(list((tmp_path / "decoded").glob("*.png"))) == 5


def test_runs_of_one_pipeline_decode_their_own_reference_frames(vace21, tmp_path):
    """Two runs of one pipeline object, with one and with two reference images, both generated before either is
    written: each decodes its own 5 frames (its reference frames dropped, not the last resolved run's count), the
    frames of its last 2 latent frames."""
    from mlx_video.pipelines.base import Pipeline

    root = vace21[0]
    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    jobs = [prepare({"model": str(root / "mlx"), "prompt": PROMPT, "size": f"{WIDTH}x{HEIGHT}", "frames": 5,
                     "steps": 1, "reference_image": [str(root / r) for r in refs], "output": str(tmp_path / name),
                     "quiet": True}, pipe) for name, refs in (("one", ["ref_b.png"]), ("two", ["ref_a.png", "ref_b.png"]))]
    results = [job.generate() for job in jobs]
    for job, result, refs in zip(jobs, results, (1, 2)):
        assert result.latents.shape[2] == 2 + refs
        job.finish(result.latents, job.record(), result.timings, echo=lambda *a, **k: None)
        written = np.stack([np.asarray(PIL.open(p)) for p in sorted(job.output.glob("*.png"))])
        alone, _ = pipe.decode(np.asarray(result.latents)[:, :, refs:])
        assert written.shape == (5, HEIGHT, WIDTH, 3) and np.array_equal(written, alone), refs


@pytest.fixture(scope="module")
def vace_fun(tmp_path_factory):
    root = tmp_path_factory.mktemp("vace-fun")
    pipe = build_tiny_vace_pipeline(root / "diffusers", two_experts=True, shift=12.0, heads=2, head_dim=12,
                                    vace_layers=(0, 1), num_layers=2)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    use_official_sigmas(pipe)
    control = write_frames(root / "control", 9, WIDTH, HEIGHT, 7)
    ref = write_image(root / "ref.png", 24, 64, 8)
    return root, pipe, control, ref


def test_control_and_reference_at_scale_on_two_experts(vace_fun, monkeypatch, tmp_path):
    root, pipe, control, ref = vace_fun
    ours, expected, record, _ = run_both(
        monkeypatch, tmp_path, root, pipe, 9, 1,
        dict(video=control, reference_images=[ref], conditioning_scale=0.7, guidance_scale_2=3.0),
        ["--control-video", str(root / "control"), "--reference-image", str(root / "ref.png"),
         "--control-scale", "0.7", "--guidance-2", "3"], steps=3)  # the boundary falls before step 3
    err = rel_err(ours, expected)
    print(f"VACE control + reference, scale 0.7, two experts: relative error {err:.2e}, experts {record['experts']}")
    assert err < 1e-3
    assert set(record["experts"]) == {"transformer", "transformer_2"}
    assert record["control_scale"] == 0.7


def refusal(model, tmp_path, **options) -> str:
    base = {"model": str(model), "prompt": PROMPT, "save_latents": str(tmp_path / "x.npy"), "size": f"{WIDTH}x{HEIGHT}"}
    with pytest.raises(MlxVideoError) as info:
        prepare({**base, **options}, check_memory=False)
    return str(info.value)


def test_vace_refusals_before_any_weights_load(vace21, tmp_path, monkeypatch):
    import mlx_video.model_folder as model_folder

    root, _, _, _, _, _ = vace21
    model, clip, control = root / "mlx", str(root / "clip"), str(root / "control")
    monkeypatch.setattr(model_folder.ModelFolder, "load_module", lambda *a, **k: pytest.fail("weights were read"))
    PIL.new("L", (40, 24), 255).save(tmp_path / "small_mask.png")
    assert "is 40x24, the video 48x32: the mask must have the video's size" in refusal(
        model, tmp_path, video=clip, mask=str(tmp_path / "small_mask.png"))
    PIL.new("RGB", (WIDTH, HEIGHT), (255, 40, 40)).save(tmp_path / "red_mask.png")
    assert "is in colour" in refusal(model, tmp_path, video=clip, mask=str(tmp_path / "red_mask.png"))
    assert "has 7 frames; --frames 9 needs at least 9" in refusal(model, tmp_path, control_video=control, frames=9)
    assert "--mask-video" in refusal(model, tmp_path, video=clip, mask_video=str(root / "control"), frames=9)
    assert "drop --strength" in refusal(model, tmp_path, video=clip, mask=str(root / "masks" / "mask_00000.png"),
                                        strength=0.5)
    assert "give the --video" in refusal(model, tmp_path, mask=str(root / "masks" / "mask_00000.png"))
    assert "not both" in refusal(model, tmp_path, video=clip, control_video=control)
    assert "LEFT,TOP,RIGHT,BOTTOM" in refusal(model, tmp_path, video=clip, outpaint="8,8")
    assert "leaves no room" in refusal(model, tmp_path, video=clip, outpaint="24,0,24,0")
    assert "builds its own mask" in refusal(model, tmp_path, video=clip, outpaint="8,0,8,0",
                                            mask=str(root / "masks" / "mask_00000.png"))
    assert "--reference-image" in refusal(model, tmp_path, image=str(root / "ref_a.png"))
    assert "magcache" in refusal(model, tmp_path, control_video=control, frames=5, cache="magcache")
    assert "radial" in refusal(model, tmp_path, control_video=control, frames=5, attention="radial")
    assert "no such file" in refusal(model, tmp_path, reference_image=[str(tmp_path / "missing.png")])
    import mlx_video.distributed as distributed

    with monkeypatch.context() as patch:  # launched on two processes without guidance: sequence-parallel
        patch.setattr(distributed, "current_split", lambda uses_cfg: distributed.Split(2, 0, 1, 2))
        assert "does not run sequence-parallel" in refusal(model, tmp_path, control_video=control, frames=5)
    # a model without VACE names the models that take it
    plain = tmp_path / "plain"
    plain.mkdir()
    manifest = json.loads((model / "mlxvid.json").read_text())
    (plain / "mlxvid.json").write_text(json.dumps({**manifest, "model": "wan2.2-t2v-a14b", "task": "t2v"}))
    for entry in model.iterdir():
        if entry.name != "mlxvid.json":
            (plain / entry.name).symlink_to(entry)
    message = refusal(plain, tmp_path, control_video=control, control_scale=0.5)
    assert "--control-video, --control-scale: for VACE models (wan2.1-vace-1.3b, wan2.1-vace-14b, " in message


def test_outpainting_and_extension_inputs(vace21, tmp_path):
    """--outpaint fits the video inside the frame with mid grey around it and a mask that generates the border;
    a --video shorter than --frames is extended: its frames kept (mask 0), grey frames generated after them."""
    root = vace21[0]
    base = {"model": str(root / "mlx"), "prompt": PROMPT, "save_latents": str(tmp_path / "x.npy")}
    job = prepare({**base, "video": str(root / "clip"), "outpaint": "8,0,8,8", "size": f"{WIDTH}x{HEIGHT}",
                   "image_fit": "stretch"}, check_memory=False)
    video, mask = job.inputs["video"], job.inputs["mask"]
    assert video.shape == (9, HEIGHT, WIDTH, 3) and mask.shape == (9, HEIGHT, WIDTH)
    assert (mask[:, :HEIGHT - 8, 8:WIDTH - 8] == 0).all() and mask[:, :, :8].min() == 1 and mask[:, -8:].min() == 1
    assert (video[:, :, :8] == 0).all() and np.abs(video[:, :HEIGHT - 8, 8:WIDTH - 8]).max() > 0.1
    job = prepare({**base, "video": str(root / "clip"), "frames": 13, "size": f"{WIDTH}x{HEIGHT}"},
                  check_memory=False)
    video, mask = job.inputs["video"], job.inputs["mask"]
    assert video.shape[0] == mask.shape[0] == 13 and job.settings.frames == 13
    assert (mask[:9] == 0).all() and (mask[9:] == 1).all() and (video[9:] == 0).all()
    assert job.pipe.latent_shape(job.settings) == (1, 4, 4, HEIGHT // 8, WIDTH // 8)
    job = prepare({**base, "reference_image": [str(root / "ref_a.png")], "size": f"{WIDTH}x{HEIGHT}", "frames": 5},
                  check_memory=False)
    assert job.pipe.latent_shape(job.settings) == (1, 4, 3, HEIGHT // 8, WIDTH // 8)  # one reference frame in front
    canvas = job.inputs["reference_images"][0]
    assert canvas.shape == (HEIGHT, WIDTH, 3) and (canvas[:, :4] == 1).all()  # white where the image is not


def test_server_takes_vace_uploads(tmp_path):
    from mlx_video.server.bodies import Upload, check_upload, from_fields

    for name in ("control.mp4", "mask.png", "a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    options = from_fields({"prompt": PROMPT, "control_scale": "0.7", "outpaint": "8,0,8,0"},
                          [Upload("control_video", "c.mp4", tmp_path / "control.mp4"),
                           Upload("mask", "m.png", tmp_path / "mask.png"),
                           Upload("reference_image", "a.png", tmp_path / "a.png"),
                           Upload("reference_image", "b.png", tmp_path / "b.png")], "wan2.1-vace-1.3b")
    assert options["reference_image"] == (tmp_path / "a.png", tmp_path / "b.png")
    assert options["control_video"] == tmp_path / "control.mp4" and options["control_scale"] == 0.7
    assert check_upload("mask_video", "m.mp4") == ".mp4"
    with pytest.raises(MlxVideoError, match="takes an uploaded file"):
        from_fields({"prompt": PROMPT, "reference_image": "/etc/passwd"}, [], "wan2.1-vace-1.3b")


def test_lora_on_main_and_context_blocks_matches_diffusers(vace21, monkeypatch, tmp_path):
    """A PEFT LoRA (written by diffusers' save_lora_weights) on a main block's and a context block's layers, at
    strength 0.7: diffusers' load_lora_weights + set_adapters against ours fused at load."""
    import copy

    pytest.importorskip("peft")
    from diffusers import WanVACEPipeline

    root, pipe, _, control, _, _ = vace21
    rng = np.random.default_rng(21)
    dim, rank = 30, 3
    layers = ["blocks.1.attn1.to_q", "blocks.2.ffn.net.2", "vace_blocks.0.attn1.to_v", "vace_blocks.1.proj_out"]
    tensors = {}
    for name in layers:
        inner = 40 if name.endswith("ffn.net.2") else dim
        tensors[f"{name}.lora_A.weight"] = torch.from_numpy((rng.standard_normal((rank, inner)) / np.sqrt(inner)).astype(np.float32))
        tensors[f"{name}.lora_B.weight"] = torch.from_numpy((rng.standard_normal((dim, rank)) * 0.3).astype(np.float32))
    meta = {"r": rank, "lora_alpha": 6.0, "target_modules": sorted(n.split(".", 2)[2] for n in layers)}
    WanVACEPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=tensors,
                                      transformer_lora_adapter_metadata=meta, weight_name="vace_lora.safetensors")
    ref_pipe = copy.deepcopy(pipe)
    use_official_sigmas(ref_pipe)  # the copy's scheduler, not the original's
    ref_pipe.load_lora_weights(str(tmp_path / "vace_lora.safetensors"), adapter_name="style")
    ref_pipe.transformer.set_adapters(["style"], weights=[0.7])
    ours, expected, record, _ = run_both(monkeypatch, tmp_path, root, ref_pipe, 5, 0, dict(video=control[:5]),
                                         ["--control-video", str(root / "control"), "--lora",
                                          f"{tmp_path / 'vace_lora.safetensors'}:0.7"], steps=1)
    err = rel_err(ours, expected)
    print(f"VACE with a LoRA on main and context blocks: relative error {err:.2e}")
    assert err < 1e-3
    assert record["loras"][0]["format"] == "peft" and record["loras"][0]["scale"] == 0.7


def test_step_caches_run_the_context_hints(vace21, tmp_path):
    """The step caches split the blocks (first block, then the rest) through the shared code: at threshold 0
    first-block caching reuses nothing and gives the uncached run (parity-checked above) exactly; at a large
    threshold it reuses steps and the hints still reach the blocks it runs."""
    root = vace21[0]
    noise = np.random.default_rng(3).standard_normal((1, 4, 2, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)

    def run(name, *extra):
        out = tmp_path / f"{name}.npy"
        main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", f"{WIDTH}x{HEIGHT}", "--frames",
              "5", "--steps", "2", "--control-video", str(root / "control"), "--init-latents",
              str(tmp_path / "noise.npy"), "--save-latents", str(out), "--quiet", *extra])
        return np.load(out), json.loads(out.with_suffix(".json").read_text())["settings"]

    plain, _ = run("plain")
    exact, record = run("fbcache0", "--cache", "fbcache:0")
    np.testing.assert_array_equal(exact, plain)
    assert record["reused_steps"] == []
    reused, record = run("fbcache", "--cache", "fbcache:100")
    assert record["reused_steps"] and np.isfinite(reused).all()


def test_batch_manifest_takes_the_vace_keys(vace21, tmp_path):
    """A batch job names the same keys as the command line; relative paths (each reference image too) are taken
    from the manifest's folder, and the job is checked (inputs read, nothing loaded) when the batch is planned."""
    import shutil

    from mlx_video.batch import plan_batch

    root = vace21[0]
    for name in ("ref_a.png", "ref_b.png"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "control", tmp_path / "control")
    job = {"model": str(root / "mlx"), "prompt": PROMPT, "size": f"{WIDTH}x{HEIGHT}", "frames": 5,
           "control_video": "control", "reference_image": ["ref_a.png", "ref_b.png"], "control_scale": 0.5,
           "save_latents": "out.npy"}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n" + json.dumps({**job, "mask": "missing.png",
                                                                              "save_latents": "other.npy"}) + "\n")
    jobs = plan_batch(tmp_path / "jobs.jsonl", {})
    assert jobs[0].status != "invalid", jobs[0].error
    assert jobs[0].options["reference_image"] == (tmp_path / "ref_a.png", tmp_path / "ref_b.png")
    assert jobs[1].status == "invalid" and "missing.png" in jobs[1].error


def test_memory_preflight_counts_reference_frames(vace21, tmp_path):
    """Each reference image is one more latent frame of tokens in the denoising estimate (nothing loaded)."""
    root = vace21[0]
    base = {"model": str(root / "mlx"), "prompt": PROMPT, "size": f"{WIDTH}x{HEIGHT}", "frames": 5,
            "save_latents": str(tmp_path / "x.npy")}
    plain = prepare(base).estimate["detail"]["denoising"]["activations"]
    with_refs = prepare({**base, "reference_image": [str(root / "ref_a.png"), str(root / "ref_b.png")]})
    assert with_refs.estimate["detail"]["denoising"]["activations"] > plain


def test_server_job_owns_each_reference_upload(vace21, tmp_path):
    """A job with two uploaded reference images: both become the job's files (renamed to <job id>-...), and a
    job made again gets its own copies of both."""
    import shutil

    from mlx_video.server.bodies import Upload, from_fields, stored_name
    from mlx_video.server.state import Server, ServerConfig

    root = vace21[0]
    server = Server(ServerConfig(data=tmp_path / "data", models={"vace": str(root / "mlx")}, check_memory=False))
    uploads = []
    for field, source in (("reference_image", "ref_a.png"), ("reference_image", "ref_b.png")):
        stored = server.uploads / stored_name(".png")
        shutil.copy(root / source, stored)
        uploads.append(Upload(field, source, stored))
    options = from_fields({"prompt": PROMPT, "model": "vace", "size": f"{WIDTH}x{HEIGHT}", "frames": 5}, uploads,
                          None)
    job = server.submit("videos", options, uploads)
    paths = [Path(p) for p in job.options["reference_image"]]
    assert len(paths) == 2 and all(p.is_file() and p.name.startswith(job.id + "-") for p in paths)
    again = server.again(job.id, new_seed=True)
    copies = [Path(p) for p in again.options["reference_image"]]
    assert all(p.is_file() and p.name.startswith(again.id + "-") for p in copies) and set(copies).isdisjoint(paths)
