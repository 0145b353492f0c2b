"""Wan2.2-Animate-14B against diffusers 0.42.1 at tiny random configurations, fp32: the transformer (motion
encoder, face encoder and blocks, pose embedding, CLIP image context; 3 heads of width 10, face blocks every 2
of 4 layers), the CLIP vision tower and its preprocessing, the official key layout, and the whole
`WanAnimatePipeline` in both modes over two segments through `mlxvid convert` and `mlxvid generate`.

The reference, as diffusers leaves it open: `--init-latents` is one noise draw per segment, stacked on axis 0,
given to the reference's `prepare_latents` segment by segment; its final latents are taken at each segment's
last step. The CLIP preprocessing reference is transformers' PIL-backed `CLIPImageProcessorPil` (the
torchvision-backed `CLIPImageProcessor` is not installable beside torch 2.13 here); both resize with the
bicubic filter on 8 bits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

import mlx.core as mx  # noqa: E402

from mlx_video.cli import main  # noqa: E402
from mlx_video.convert.rules import convert_weights  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.run import prepare  # noqa: E402
from support.wan import (  # noqa: E402
    WAN_IMAGE_OFFICIAL_RENAMES, randomize_, renamed_keys, train_spiece, use_official_sigmas,
)
from support.arrays import rel_err  # noqa: E402
from support.tensor_files import Shapes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # torch on one thread (tests/conftest.py)

PROMPT = "a dancer in a red coat"
NEGATIVE = "blurry"
HEADS, HEAD_DIM = 3, 10
FACE = 16  # face crops (the motion encoder's size: two residual blocks)
WIDTH, HEIGHT, SEGMENT, POSE_FRAMES = 48, 32, 5, 7  # 7 pose frames in segments of 5 (4 new each): two segments


def transformer_config(text_dim=32, image_dim=160):
    return dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=None,
                latent_channels=4, out_channels=4, text_dim=text_dim, freq_dim=16, ffn_dim=36, num_layers=4,
                image_dim=image_dim, added_kv_proj_dim=HEADS * HEAD_DIM, rope_max_seq_len=1024,
                motion_encoder_channel_sizes={"4": 8, "8": 6, "16": 5}, motion_encoder_size=FACE, motion_style_dim=12,
                motion_dim=5, motion_encoder_dim=14, face_encoder_hidden_dim=18, face_encoder_num_heads=2,
                inject_face_latents_blocks=2, motion_encoder_batch_size=3)


def clip_config():
    from transformers import CLIPVisionConfig

    # 2 heads of width 80: the official file does not say the head count, and its heads are 80 wide
    return CLIPVisionConfig(hidden_size=160, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                            image_size=28, patch_size=7, hidden_act="gelu")


def tiny_transformer(seed=1):
    from diffusers.models.transformers.transformer_wan_animate import WanAnimateTransformer3DModel

    torch.manual_seed(seed)
    model = WanAnimateTransformer3DModel(**transformer_config()).eval()
    randomize_(model, seed)
    return model


def ours_from(state_dict, keymap, cfg):
    from mlx_video.families.wan.animate_model import WanAnimateTransformer

    model = WanAnimateTransformer(cfg)
    weights = convert_weights(keymap, {k: mx.array(v.detach().numpy()) for k, v in state_dict.items()})
    model.load_weights(list(weights.items()))
    return model


def config_of(state_dict, keymap, heads=None):
    from mlx_video.families.wan.animate_planner import animate_config, target_shapes

    return animate_config(target_shapes(Shapes(state_dict), keymap), heads)


def test_transformer_matches_diffusers():
    from mlx_video.families.wan.animate_keys import DIFFUSERS_ANIMATE

    ref = tiny_transformer()
    cfg = config_of(ref.state_dict(), DIFFUSERS_ANIMATE, HEADS)
    assert (cfg.motion_size, cfg.face_every, cfg.face_heads, cfg.in_channels) == (FACE, 2, 2, 12)
    model = ours_from(ref.state_dict(), DIFFUSERS_ANIMATE, cfg)
    rng = np.random.default_rng(0)
    b, t, h, w = 2, 3, 4, 6
    x = rng.standard_normal((b, 12, t + 1, h, w)).astype(np.float32)
    pose = rng.standard_normal((b, 4, t, h, w)).astype(np.float32)
    face = rng.uniform(-1, 1, (b, 3, 4 * (t - 1) + 1, FACE, FACE)).astype(np.float32)
    text = rng.standard_normal((b, 512, 32)).astype(np.float32)
    text[:, 7:] = 0
    image = rng.standard_normal((b, 5, 160)).astype(np.float32)
    timestep = np.array([731.0, 208.0], np.float32)
    with torch.no_grad():
        expected = ref(hidden_states=torch.from_numpy(x), timestep=torch.from_numpy(timestep),
                       encoder_hidden_states=torch.from_numpy(text), encoder_hidden_states_image=torch.from_numpy(image),
                       pose_hidden_states=torch.from_numpy(pose), face_pixel_values=torch.from_numpy(face),
                       return_dict=False)[0].numpy()

    def channels_last(a):
        return mx.array(a).transpose(0, 2, 3, 4, 1)

    out = model(channels_last(x), mx.array(timestep), mx.array(text), mx.array(image), channels_last(pose),
                model.encode_face(channels_last(face)))
    err = rel_err(np.array(out.transpose(0, 4, 1, 2, 3)), expected)
    print(f"Animate transformer: relative error {err:.2e}")
    assert err < 1e-5


def official_names(state_dict):
    """The diffusers state dict under the official `WanAnimateModel` names (Wan-Video/Wan2.2
    wan/modules/animate/): renamed here, then checked against diffusers' own official -> diffusers converter
    (`convert_wan_transformer_to_diffusers`), which must give the diffusers names back."""
    import re

    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    renames = WAN_IMAGE_OFFICIAL_RENAMES + [
        (r"motion_encoder\.motion_synthesis_weight", lambda m: "motion_encoder.dec.direction.weight"),
        (r"motion_encoder\.conv_in\.weight", lambda m: "motion_encoder.enc.net_app.convs.0.0.weight"),
        (r"motion_encoder\.conv_in\.act_fn\.bias", lambda m: "motion_encoder.enc.net_app.convs.0.1.bias"),
        (r"motion_encoder\.res_blocks\.(\d+)\.conv1\.weight",
         lambda m: f"motion_encoder.enc.net_app.convs.{int(m[1]) + 1}.conv1.0.weight"),
        (r"motion_encoder\.res_blocks\.(\d+)\.conv1\.act_fn\.bias",
         lambda m: f"motion_encoder.enc.net_app.convs.{int(m[1]) + 1}.conv1.1.bias"),
        (r"motion_encoder\.res_blocks\.(\d+)\.conv2\.weight",
         lambda m: f"motion_encoder.enc.net_app.convs.{int(m[1]) + 1}.conv2.1.weight"),
        (r"motion_encoder\.res_blocks\.(\d+)\.conv2\.act_fn\.bias",
         lambda m: f"motion_encoder.enc.net_app.convs.{int(m[1]) + 1}.conv2.2.bias"),
        (r"motion_encoder\.res_blocks\.(\d+)\.conv_skip\.weight",
         lambda m: f"motion_encoder.enc.net_app.convs.{int(m[1]) + 1}.skip.1.weight"),
        (r"motion_encoder\.conv_out\.weight", lambda m: f"motion_encoder.enc.net_app.convs.{blocks + 1}.weight"),
        (r"motion_encoder\.motion_network", lambda m: "motion_encoder.enc.fc"),
        (r"face_encoder\.(conv1_local|conv2|conv3)", lambda m: f"face_encoder.{m[1]}.conv"),
        (r"face_adapter\.(\d+)\.to_q", lambda m: f"face_adapter.fuser_blocks.{m[1]}.linear1_q"),
        (r"face_adapter\.(\d+)\.to_out", lambda m: f"face_adapter.fuser_blocks.{m[1]}.linear2"),
        (r"face_adapter\.(\d+)\.norm_([qk])", lambda m: f"face_adapter.fuser_blocks.{m[1]}.{m[2]}_norm"),
    ]
    blocks = len({k.split(".")[2] for k in state_dict if k.startswith("motion_encoder.res_blocks.")})
    official = {key: value.clone() for key, value in renamed_keys(state_dict, renames).items()}
    for name in [k for k in official if k.startswith("motion_encoder.enc.net_app") and k.endswith(".bias")]:
        official[name] = official[name].reshape(1, -1, 1, 1)  # the official FusedLeakyReLU bias
    for i in {re.match(r"face_adapter\.(\d+)\.to_k", k)[1] for k in official if re.match(r"face_adapter\.\d+\.to_k", k)}:
        fuser = f"face_adapter.fuser_blocks.{i}"
        for p in ("weight", "bias"):
            k = official.pop(f"face_adapter.{i}.to_k.{p}")
            v = official.pop(f"face_adapter.{i}.to_v.{p}")
            official[f"{fuser}.linear1_kv.{p}"] = torch.cat([k, v])  # one linear, keys first
    back = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in official.items()})
    # diffusers' converter names the last conv by its full-size index (convs.8: seven residual blocks for 512x512
    # crops); at this size (16x16: two blocks) it is convs.3
    if "motion_encoder.enc.net_app.convs.3.weight" in back:
        back["motion_encoder.conv_out.weight"] = back.pop("motion_encoder.enc.net_app.convs.3.weight")
    back = {k: v.reshape(state_dict[k].shape) if k in state_dict else v for k, v in back.items()}
    assert set(back) == set(state_dict)
    for k, v in back.items():
        assert v.shape == state_dict[k].shape and (v.is_meta or torch.equal(v, state_dict[k])), k
    for block in range(1, blocks + 1):  # the blur kernels the official motion encoder keeps as buffers
        official[f"motion_encoder.enc.net_app.convs.{block}.conv2.0.kernel"] = torch.ones(4, 4) / 64
        official[f"motion_encoder.enc.net_app.convs.{block}.skip.0.kernel"] = torch.ones(4, 4) / 64
    return official


def test_official_layout_converts_like_diffusers():
    from mlx.utils import tree_flatten

    from mlx_video.families.wan.animate_keys import DIFFUSERS_ANIMATE, OFFICIAL_ANIMATE

    ref = tiny_transformer(seed=5)
    official = official_names(ref.state_dict())
    cfg = config_of(official, OFFICIAL_ANIMATE, HEADS)
    assert cfg == config_of(ref.state_dict(), DIFFUSERS_ANIMATE, HEADS)
    ours = dict(tree_flatten(ours_from(official, OFFICIAL_ANIMATE, cfg).parameters()))
    theirs = dict(tree_flatten(ours_from(ref.state_dict(), DIFFUSERS_ANIMATE, cfg).parameters()))
    assert set(ours) == set(theirs)
    for k in ours:
        np.testing.assert_array_equal(np.array(ours[k]), np.array(theirs[k]), err_msg=k)


def test_clip_vision_and_preprocessing_match_transformers():
    from transformers import CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from mlx_video.image_encoders.clip_vision import TRANSFORMERS_CLIP_VISION
    from mlx_video.image_encoders.clip_vision import CLIPPreprocess, CLIPVisionConfig, CLIPVisionEncoder

    ref = CLIPVisionModel(clip_config()).eval()
    randomize_(ref, 3)
    cfg = CLIPVisionConfig.from_transformers(clip_config().to_dict())
    ours = CLIPVisionEncoder(cfg)
    sd = {k: mx.array(v.detach().numpy()) for k, v in ref.state_dict().items()}
    ours.load_weights(list(convert_weights(TRANSFORMERS_CLIP_VISION, sd).items()))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    preprocess = CLIPPreprocess.from_transformers(processor.to_dict())
    for h, w in [(50, 37), (28, 28), (41, 90)]:  # portrait, exact, landscape (odd crop offsets)
        image = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels = processor(images=PIL.fromarray(image), return_tensors="pt")["pixel_values"]
        mine = preprocess(image)
        assert np.abs(mine - pixels[0].permute(1, 2, 0).numpy()).max() < 1e-6
        with torch.no_grad():
            expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].numpy()
        err = rel_err(np.array(ours.penultimate(mx.array(mine)[None])), expected)
        print(f"CLIP vision {w}x{h}: relative error {err:.2e}")
        assert err < 1e-5


# ---- the pipeline, end to end ----

def build_pipeline(folder):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanAnimatePipeline
    from transformers import CLIPVisionModel, T5Tokenizer, UMT5Config, UMT5EncoderModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    (folder / "spiece").mkdir(parents=True, exist_ok=True)
    spiece = train_spiece(folder / "spiece" / "spiece.model")
    tokenizer = T5Tokenizer.from_pretrained(str(folder / "spiece"), extra_ids=0)
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    randomize_(text_encoder, 1, scale=0.5)
    rng = np.random.default_rng(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           latents_mean=rng.normal(0, 0.5, 4).tolist(), latents_std=rng.uniform(0.5, 2.0, 4).tolist()).eval()
    image_encoder = CLIPVisionModel(clip_config()).eval()
    randomize_(image_encoder, 4)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = WanAnimatePipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        image_encoder=image_encoder, transformer=tiny_transformer(seed=2))
    pipe.save_pretrained(folder)
    spiece.rename(folder / "tokenizer" / "spiece.model")
    (folder / "spiece").rmdir()
    use_official_sigmas(pipe)
    return pipe


def write_frames(folder, frames):
    folder.mkdir()
    for i, frame in enumerate(frames):
        PIL.fromarray(frame).save(folder / f"frame_{i:05d}.png")
    return [PIL.fromarray(f) for f in frames]


def smooth_frames(count, width, height, seed, grey=False):
    base = np.random.default_rng(seed).integers(0, 256, (height // 4, width // 4 + count, 3), dtype=np.uint8)
    wide = np.asarray(PIL.fromarray(base).resize((width + 4 * count, height), PIL.BILINEAR))
    frames = [np.ascontiguousarray(wide[:, 4 * i:4 * i + width]) for i in range(count)]
    if grey:  # a mask: white where the character goes
        frames = [np.repeat(np.where(f[..., :1] > 128, 255, 0).astype(np.uint8), 3, axis=2) for f in frames]
    return frames


@pytest.fixture(scope="module")
def animate(tmp_path_factory):
    root = tmp_path_factory.mktemp("animate")
    pipe = build_pipeline(root / "diffusers")
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    character = np.random.default_rng(9).integers(0, 256, (40, 50, 3), dtype=np.uint8)  # another aspect: fitted
    PIL.fromarray(character).save(root / "character.png")
    videos = {
        "pose": write_frames(root / "pose", smooth_frames(POSE_FRAMES, WIDTH, HEIGHT, 1)),
        # face crops, background and mask of other sizes: resized (Lanczos) as diffusers resizes them
        "face": write_frames(root / "face", smooth_frames(POSE_FRAMES, FACE + 4, FACE + 4, 2)),
        "background": write_frames(root / "background", smooth_frames(POSE_FRAMES + 2, WIDTH + 8, HEIGHT + 4, 3)),
        "mask": write_frames(root / "mask", smooth_frames(POSE_FRAMES, WIDTH - 8, HEIGHT - 4, 4, grey=True)),
    }
    return root, pipe, PIL.fromarray(character), videos


def run_reference(pipe, character, videos, mode, noise, guidance):
    calls = {"n": 0}
    finals = []

    def prepare_latents(*args, **kwargs):
        calls["n"] += 1
        return torch.from_numpy(noise[calls["n"] - 1][None].copy())

    def keep_last(p, i, t, kw):
        if i == 2:
            finals.append(kw["latents"].numpy().copy())
        return {}

    pipe.prepare_latents = prepare_latents
    extra = {"background_video": videos["background"], "mask_video": videos["mask"]} if mode == "replace" else {}
    with torch.no_grad():
        frames = pipe(image=character, pose_video=videos["pose"], face_video=videos["face"], prompt=PROMPT,
                      negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, segment_frame_length=SEGMENT,
                      num_inference_steps=3, mode=mode, guidance_scale=guidance, output_type="np",
                      callback_on_step_end=keep_last, **extra).frames[0]
    del pipe.prepare_latents
    return np.concatenate(finals), frames


def check_resume(args, expected, tmp_path, monkeypatch):
    """Interrupted after its first segment, the run resumes from the kept segment when repeated, here by
    --from-sidecar of the first run (so the replay settles the very same settings): only the second segment is
    made again, and the result is the uninterrupted one, bit for bit."""
    from mlx_video.families.wan.animate_pipeline import WanAnimatePipeline

    made = []
    original = WanAnimatePipeline.run_segment

    def run_segment(self, j, *rest):
        made.append(j)
        if j == 1 and made.count(1) == 1:
            raise KeyboardInterrupt  # as Ctrl-C would
        return original(self, j, *rest)

    monkeypatch.setattr(WanAnimatePipeline, "run_segment", run_segment)
    again = [a.replace(str(tmp_path / "out"), str(tmp_path / "again")).replace(str(tmp_path / "frames"),
                                                                               str(tmp_path / "frames2")) for a in args]
    with pytest.raises(SystemExit):
        main(again)
    assert list(tmp_path.glob(".frames2*.segments"))  # the first segment is kept beside the output
    main(["generate", "--from-sidecar", str(tmp_path / "out.json"), "--save-latents", str(tmp_path / "again.npy"),
          "--output", str(tmp_path / "frames2") + "/", "--overwrite", "--quiet"])
    assert made == [0, 1, 1]
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), expected)
    assert not list(tmp_path.glob(".frames2*.segments"))  # removed once the video is made


@pytest.mark.parametrize("mode,guidance", [("animate", 2.0), ("replace", 1.0)])
def test_pipeline_matches_diffusers_over_two_segments(animate, tmp_path, monkeypatch, mode, guidance):
    root, pipe, character, videos = animate
    latent_frames = (SEGMENT - 1) // 4 + 2  # the character's, then the segment's
    noise = np.random.default_rng(21).standard_normal((2, 4, latent_frames, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    expected_latents, expected_frames = run_reference(pipe, character, videos, mode, noise, guidance)
    np.save(tmp_path / "noise.npy", noise)
    args = ["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
            "--image", str(root / "character.png"), "--pose-video", str(root / "pose"), "--face-video",
            str(root / "face"), "--size", f"{WIDTH}x{HEIGHT}", "--segment-frames", str(SEGMENT), "--steps", "3",
            "--guidance", str(guidance), "--init-latents", str(tmp_path / "noise.npy"),
            "--save-latents", str(tmp_path / "out.npy"), "--output", str(tmp_path / "frames") + "/", "--quiet"]
    if mode == "replace":
        args += ["--background-video", str(root / "background"), "--mask-video", str(root / "mask")]
    main(args)
    ours = np.load(tmp_path / "out.npy")
    assert ours.shape == expected_latents.shape == noise.shape
    errors = [rel_err(ours[j], expected_latents[j]) for j in range(2)]
    frames = np.stack([np.asarray(PIL.open(p)) for p in sorted((tmp_path / "frames").glob("*.png"))])
    assert frames.shape == (POSE_FRAMES, HEIGHT, WIDTH, 3)
    mean_abs = float(np.abs(frames / 255.0 - expected_frames).mean() * 255)
    print(f"Animate {mode}: segment latents relative errors {errors[0]:.2e}, {errors[1]:.2e}; frames "
          f"{mean_abs:.3f}/255 mean absolute (std {frames.std():.1f} levels)")
    assert max(errors) < 1e-3
    assert mean_abs < 1.0
    if mode == "replace":  # (guidance 1: the cheaper runs)
        check_resume(args, ours, tmp_path, monkeypatch)
    record = json.loads((tmp_path / "out.json").read_text())["settings"]
    assert record["animate_mode"] == mode and record["segments"] == 2 and record["frames"] == SEGMENT
    assert record["input_files"]["face_video"]["name"] == "face" and len(record["input_files"]["pose_video"]["sha256"]) == 64


def refusal(root, tmp_path, **options) -> str:
    base = {"model": str(root / "mlx"), "prompt": PROMPT, "image": str(root / "character.png"),
            "pose_video": str(root / "pose"), "face_video": str(root / "face"), "size": f"{WIDTH}x{HEIGHT}",
            "segment_frames": SEGMENT, "save_latents": str(tmp_path / "x.npy")}
    options = {k: v for k, v in {**base, **options}.items() if v is not None}
    with pytest.raises(MlxVideoError) as info:
        prepare(options, check_memory=False)
    return str(info.value)


def test_animate_refusals_before_any_weights_load(animate, tmp_path):
    root = animate[0]
    assert "needs --face-video" in refusal(root, tmp_path, face_video=None)
    assert "needs --pose-video" in refusal(root, tmp_path, pose_video=None)
    assert "animates a character: pass --image" in refusal(root, tmp_path, image=None)
    assert "replace needs --mask-video" in refusal(root, tmp_path, background_video=str(root / "background"))
    assert "replace needs --background-video" in refusal(root, tmp_path, animate_mode="replace",
                                                         mask_video=str(root / "mask"))
    assert "are for --animate-mode replace" in refusal(root, tmp_path, animate_mode="animate",
                                                      background_video=str(root / "background"),
                                                      mask_video=str(root / "mask"))
    short = tmp_path / "short"
    write_frames(short, smooth_frames(POSE_FRAMES - 2, FACE + 4, FACE + 4, 7))
    message = refusal(root, tmp_path, face_video=str(short))
    assert f"--face-video {short} has {POSE_FRAMES - 2} frames; the pose video has {POSE_FRAMES}" in message
    assert "no such file or folder" in refusal(root, tmp_path, pose_video=str(tmp_path / "missing.mp4"))
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert "bad.mp4" in refusal(root, tmp_path, face_video=str(tmp_path / "bad.mp4"))
    assert "--frames is not supported" in refusal(root, tmp_path, frames=9)
    assert "--cache is not supported" in refusal(root, tmp_path, cache="easycache")
    assert "dense only" in refusal(root, tmp_path, attention="radial")
    assert "4n+1" in refusal(root, tmp_path, segment_frames=10)
    np.save(tmp_path / "noise.npy", np.zeros((1, 4, 3, 4, 6), np.float32))
    assert "(2, 4, 3, 4, 6)" in refusal(root, tmp_path, init_latents=str(tmp_path / "noise.npy"))
    # the driving videos on a model that takes none
    t2v = tmp_path / "t2v"
    t2v.mkdir()
    manifest = json.loads((root / "mlx" / "mlxvid.json").read_text())
    (t2v / "mlxvid.json").write_text(json.dumps({**manifest, "model": "wan2.2-t2v-a14b", "task": "t2v", "experts": 1}))
    for entry in (root / "mlx").iterdir():
        if entry.name != "mlxvid.json":
            (t2v / entry.name).symlink_to(entry)
    message = refusal(t2v, tmp_path, model=str(t2v), image=None, pose_video=None)
    assert "--face-video: for character animation models (wan2.2-animate-14b)" in message


def test_full_size_keys_and_shapes():
    """The published sizes: diffusers' model (built on the meta device, added_kv_proj_dim 5120: the official
    k_img / v_img) and its official names give our published config, every key and shape of our model; the
    same for the ViT-H/14 CLIP tower."""
    from diffusers.models.transformers.transformer_wan_animate import WanAnimateTransformer3DModel
    from mlx.utils import tree_flatten
    from transformers import CLIPVisionConfig as HFVisionConfig
    from transformers import CLIPVisionModel

    from mlx_video.families.wan.animate_keys import DIFFUSERS_ANIMATE, OFFICIAL_ANIMATE
    from mlx_video.image_encoders.clip_vision import TRANSFORMERS_CLIP_VISION
    from mlx_video.families.wan.animate_model import WAN_ANIMATE_14B, WanAnimateTransformer
    from mlx_video.families.wan.animate_planner import target_shapes
    from mlx_video.image_encoders.clip_vision import CLIP_VIT_H14, CLIPVisionEncoder

    with torch.device("meta"):
        ref = WanAnimateTransformer3DModel(added_kv_proj_dim=5120)
        clip = CLIPVisionModel(HFVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                              num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu"))
    ours = {k: tuple(v.shape) for k, v in tree_flatten(WanAnimateTransformer(WAN_ANIMATE_14B).parameters())}
    for state, keymap in ((ref.state_dict(), DIFFUSERS_ANIMATE), (official_names(ref.state_dict()), OFFICIAL_ANIMATE)):
        assert config_of(state, keymap) == WAN_ANIMATE_14B
        assert target_shapes(Shapes(state), keymap) == ours
    assert len(ours) > 1000
    vision = {k: tuple(v.shape) for k, v in tree_flatten(CLIPVisionEncoder(CLIP_VIT_H14).parameters())}
    assert target_shapes(Shapes(clip.state_dict()), TRANSFORMERS_CLIP_VISION) == vision


def test_server_takes_the_driving_videos_as_uploads(tmp_path):
    """The server's request bodies take the pose, face, background and mask videos as uploads (never paths)."""
    from mlx_video.server.bodies import Upload, from_fields

    uploads = []
    for field in ("pose_video", "face_video", "background_video", "mask_video"):
        (tmp_path / f"{field}.mp4").write_bytes(b"")
        uploads.append(Upload(field, f"{field}.mp4", tmp_path / f"{field}.mp4"))
    options = from_fields({"prompt": PROMPT, "animate_mode": "replace"}, uploads, "wan2.2-animate-14b")
    assert all(options[f] == tmp_path / f"{f}.mp4" for f in ("pose_video", "face_video", "background_video",
                                                               "mask_video"))
    assert options["animate_mode"] == "replace"
    with pytest.raises(MlxVideoError, match="takes an uploaded file"):
        from_fields({"prompt": PROMPT, "face_video": "/etc/passwd"}, [], "wan2.2-animate-14b")


def test_download_fetches_the_image_encoder_too(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("MLXVID_HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["download", "wan2.2-animate-14b"])
    assert calls[0][0] == "Wan-AI/Wan2.2-Animate-14B-Diffusers"
    assert {"transformer/*", "image_encoder/*", "image_processor/*", "vae/*"} <= set(calls[0][1])


def test_official_release_folder_converts_like_the_diffusers_one(animate, tmp_path):
    """The official release's layout (the model shards with their config.json, the CLIP and T5 .pth files,
    google/umt5-xxl/) converts to the same weights as the diffusers folder. The official names of the
    transformer are checked against diffusers' converter (`official_names`); the CLIP file's are as read from
    the official module, not checked against a released file. (The official Wan2.1_VAE.pth path is the other
    Wan models' and needs the published 16-channel statistics, which this tiny 4-channel VAE lacks.)"""
    import shutil

    from safetensors.torch import save_file

    from mlx_video.families.wan.animate_planner import OFFICIAL_CLIP
    from support.tensor_files import converted_weights
    from support.wan_checkpoints import official_clip, official_umt5

    root, pipe = animate[:2]
    src = tmp_path / "Wan2.2-Animate-14B"
    (src / "google" / "umt5-xxl").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in official_names(pipe.transformer.state_dict()).items()},
              str(src / "diffusion_pytorch_model.safetensors"))
    (src / "config.json").write_text(json.dumps({"_class_name": "WanModel", "in_dim": 12, "dim": HEADS * HEAD_DIM,
                                                 "num_heads": HEADS, "num_layers": 4}))
    torch.save(official_umt5(pipe.text_encoder.state_dict()), src / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(official_clip(pipe.image_encoder.state_dict()), src / OFFICIAL_CLIP)
    shutil.copyfile(root / "diffusers" / "tokenizer" / "spiece.model", src / "google" / "umt5-xxl" / "spiece.model")
    main(["convert", str(src), str(tmp_path / "mlx"), "--dtype", "fp32"])
    assert json.loads((tmp_path / "mlx" / "mlxvid.json").read_text())["model"] == "wan2.2-animate-14b"
    for component in ("transformer", "image_encoder", "text_encoder"):
        ours, want = converted_weights(tmp_path / "mlx", component), converted_weights(root / "mlx", component)
        assert ours.keys() == want.keys(), component
        for k in want:
            np.testing.assert_array_equal(ours[k], want[k], err_msg=f"{component}: {k}")


def test_lora_on_backbone_and_animate_layers_matches_diffusers(animate, tmp_path):
    """A PEFT LoRA (written by diffusers' save_lora_weights) on backbone and Animate-only layers (the image
    key projection, a face block's query and key: the key is a slice of our fused k|v), at strength 0.7:
    diffusers' load_lora_weights + set_adapters against ours fused at load."""
    import copy

    pytest.importorskip("peft")
    from diffusers import WanAnimatePipeline

    root, pipe, character, videos = animate
    rng = np.random.default_rng(22)
    dim, rank = HEADS * HEAD_DIM, 3
    layers = ["blocks.1.attn1.to_q", "blocks.2.attn2.add_k_proj", "face_adapter.1.to_q", "face_adapter.0.to_k"]
    tensors = {}
    for name in layers:
        tensors[f"{name}.lora_A.weight"] = torch.from_numpy((rng.standard_normal((rank, dim)) / np.sqrt(dim)).astype(np.float32))
        tensors[f"{name}.lora_B.weight"] = torch.from_numpy((rng.standard_normal((dim, rank)) * 0.3).astype(np.float32))
    meta = {"r": rank, "lora_alpha": 6.0, "target_modules": sorted(n.split(".", 2)[2] for n in layers)}
    WanAnimatePipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=tensors,
                                         transformer_lora_adapter_metadata=meta, weight_name="animate_lora.safetensors")
    ref_pipe = copy.deepcopy(pipe)
    use_official_sigmas(ref_pipe)
    ref_pipe.load_lora_weights(str(tmp_path / "animate_lora.safetensors"), adapter_name="style")
    ref_pipe.transformer.set_adapters(["style"], weights=[0.7])
    latent_frames = (SEGMENT - 1) // 4 + 2
    noise = np.random.default_rng(23).standard_normal((2, 4, latent_frames, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    expected, _ = run_reference(ref_pipe, character, videos, "animate", noise, 1.0)
    np.save(tmp_path / "noise.npy", noise)
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
          "--image", str(root / "character.png"), "--pose-video", str(root / "pose"), "--face-video",
          str(root / "face"), "--size", f"{WIDTH}x{HEIGHT}", "--segment-frames", str(SEGMENT), "--steps", "3",
          "--init-latents", str(tmp_path / "noise.npy"), "--lora", f"{tmp_path / 'animate_lora.safetensors'}:0.7",
          "--save-latents", str(tmp_path / "out.npy"), "--quiet"])
    ours = np.load(tmp_path / "out.npy")
    errors = [rel_err(ours[j], expected[j]) for j in range(2)]
    print(f"Animate with a LoRA on backbone and Animate layers: relative errors {errors[0]:.2e}, {errors[1]:.2e}")
    assert max(errors) < 1e-3
    record = json.loads((tmp_path / "out.json").read_text())["settings"]
    assert record["loras"][0]["format"] == "peft" and record["loras"][0]["scale"] == 0.7
