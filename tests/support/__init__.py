"""What the tests share. Test modules import helpers from here (`from support.wan import ...`), never from another
`test_*` module (tests/test_support_layout.py checks both). Fixtures that several modules take by name live in
tests/conftest.py.

- `wan`: tiny random Wan 2.2 diffusers pipelines (T2V, I2V, TI2V, VACE), weight randomizer, diffusers -> official
  renames of the image-context transformer, a tiny SentencePiece tokenizer (`train_spiece`).
- `wan_checkpoints`: Wan checkpoint files for the conversion tests (official UMT5, CLIP, VAE layouts, ComfyUI and
  fp8 files, full-size Wan descriptions without weights), a converted tiny TI2V.
- `wan_s2v`: Wan2.2-S2V recorded from the official code: the transformer's cases, the pipeline's run and its
  release folder, a voice track.
- `hunyuan`: a tiny random HunyuanVideo pipeline; a diffusers state dict in the official layout; published configs;
  the official sigma grid.
- `hunyuan_i2v`: a tiny random HunyuanVideo-I2V pipeline (token replace) with its tiny LLaVA and LLaVA tokenizer.
- `hunyuan15`: tiny random HunyuanVideo 1.5 pipelines (T2V, I2V), transformers, VAE and encoders.
- `mochi`: a tiny random Mochi 1 pipeline; transformer and VAE state dicts in genmo's layout; T5-XXL's config.
- `arrays`: relative errors (`rel_err`, `rel_err_f64`), torch <-> channels-last video layouts, state-dict shapes.
- `tensor_files`: a converted folder's weights as numpy; tensors written as float32 or as torch holds them; a
  checkpoint described without its weights (`write_description`: names, dtypes, shapes; `meta_state`: a torch
  module's state dict on the meta device; `Shapes`: names and shapes as a tensor file the planner reads).
- `plans`: a planned conversion's components by name, what a component converts to, exact equality.
- `cli`: an `mlxvid generate` command line, and a run that must fail with one clean error.
- `text`: a SentencePiece model in T5's layout trained on a few sentences, and prompts for tokenizer parity.
- `serve`: an `mlxvid serve` process for the server tests, and polling helpers.
- `hostile`: hostile and broken files and folders, and the runner of `scripts/hostile_driver.py`.
- `scripts/`: programs the tests start as subprocesses (`hostile_driver.py`, `distributed_worker.py`).
- `reference/`: torch transcriptions of official code, cited in each file (`radial_mask`: Radial Attention's mask;
  `hy15_sr`: HunyuanVideo 1.5's super-resolution pieces).
"""
