"""Names vulture cannot see used (read by vulture in .ci/run; never imported). Each says who uses it."""
# ruff: noqa: F821, B018

# attributes set on objects of other libraries, which read them
_.pts  # av frames and packets
_.color_primaries  # av video streams
_.color_trc
_.color_range
_.thread_type
_.row_factory  # sqlite3 connections (mlx_video/server/store.py)
_.binary_location  # selenium's Chrome options (tests/test_serve_browser.py)
pytestmark  # read by pytest
_.bit_rate
_.normalizer  # tokenizers.Tokenizer parts
_.pre_tokenizer
_.post_processor
_.weight_scale  # read by name from a layer's parameters (fp8 linear layers)
_.__path__  # a module object made a package
_.__signature__  # read by inspect.signature
_.autocast_enabled  # set on the official HunyuanVideo 1.5 SR pipeline, which reads them (tests/test_hunyuan15_sr.py)
_.encode_prompt
_._prepare_byt5_embeddings

# methods and classes called by name
_.find_class  # pickle.Unpickler hooks
_.persistent_load
_.persistent_id
HunyuanPipeline  # mlx_video.families names pipeline classes as "module:Class"
HunyuanI2VPipeline
Hunyuan15Pipeline
Hunyuan15SRPipeline
WanS2VPipeline
WanAnimatePipeline
MAG_TABLES  # family tables named by a Family as "module:NAME" (mlx_video.families.optional_table)
RECIPES
takes_true_cfg  # pipeline capabilities read by name (mlx_video.options.CAPABILITIES)
takes_last_image
takes_video
takes_pose_video
takes_animate
takes_mask_video
text_encoders  # a Family field read by name (mlx_video.cli._per_family)
download  # click commands, registered by their decorators
vs_reference

# fields of records that are data, listed for the reader (dataclasses)
post_layernorm  # CLIP vision's final LayerNorm: a checkpoint parameter, loaded; hidden_states[-2] does not use it
gpu_cores  # mlx_video.cost.Chip
notes  # mlx_video.recipes.Recipe

# test-only: torch modules' attributes set to configure a reference model
_.time_proj
_.timesteps_proj
_.use_framewise_encoding
_.use_framewise_decoding
_.tile_sample_min_num_frames
_.tile_sample_stride_num_frames
