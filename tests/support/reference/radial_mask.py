"""A torch transcription of Radial Attention's mask functions, kept apart from our implementation.

Transcribed from github.com/mit-han-lab/radial-attention, commit 72788d4, file `radial_attn/attn_mask.py`:
`get_diagonal_split_mask`, `get_window_width`, `shrinkMaskStrict` and `gen_log_mask_shrinked`, with the
module's GPU-only imports (flashinfer, sageattention) and the printing left out, and `query` replaced by the
CPU device. The logic and the order of operations are the file's. The test checks
`mlx_video.nn.radial.radial_block_mask` against `gen_log_mask_shrinked` (benchmarks/RESULTS.md, "Radial
attention", records the check of this transcription against the repository's own functions).
"""

import torch


def get_diagonal_split_mask(i, j, token_per_frame, sparse_type):
    assert sparse_type in ["radial"]
    dist = abs(i - j)
    group = dist.bit_length()
    threshold = 128  # hard-coded in the reference
    decay_length = 2 ** token_per_frame.bit_length() / 2 ** group
    if decay_length >= threshold:
        return torch.ones((token_per_frame, token_per_frame), dtype=torch.bool)
    split_factor = int(threshold / decay_length)
    modular = dist % split_factor
    if modular == 0:
        return torch.ones((token_per_frame, token_per_frame), dtype=torch.bool)
    return torch.zeros((token_per_frame, token_per_frame), dtype=torch.bool)


def get_window_width(i, j, token_per_frame, sparse_type, num_frame, decay_factor=1, block_size=128, model_type=None):
    assert sparse_type in ["radial"]
    dist = abs(i - j)
    if model_type == "wan":
        if dist < 1:
            return token_per_frame
        if dist == 1:
            return token_per_frame
    elif model_type == "hunyuan":
        if dist <= 1:
            return token_per_frame
    else:
        raise ValueError(f"Unknown model type: {model_type}")
    group = dist.bit_length()
    decay_length = 2 ** token_per_frame.bit_length() / 2 ** group * decay_factor
    threshold = block_size
    if decay_length >= threshold:
        return decay_length
    return threshold


def shrink_mask_strict(mask, block_size=128):
    seqlen = mask.shape[0]
    block_num = seqlen // block_size
    mask = mask[: block_num * block_size, : block_num * block_size].view(block_num, block_size, block_num, block_size)
    col_densities = mask.sum(dim=1) / block_size
    non_zero_densities = col_densities > 0
    high_density_cols = col_densities > 1 / 3
    frac_high_density_cols = high_density_cols.sum(dim=-1) / (non_zero_densities.sum(dim=-1) + 1e-9)
    block_mask = frac_high_density_cols > 0.6
    block_mask[0:0] = True
    block_mask[-1:-1] = True
    return block_mask


def gen_log_mask_shrinked(s, video_token_num, num_frame, block_size=128, sparse_type="log", decay_factor=0.5,
                          model_type=None):
    final_log_mask = torch.zeros((s // block_size, s // block_size), dtype=torch.bool)
    token_per_frame = video_token_num // num_frame
    video_text_border = video_token_num // block_size

    col_indices = torch.arange(0, token_per_frame).view(1, -1)
    row_indices = torch.arange(0, token_per_frame).view(-1, 1)
    final_log_mask[video_text_border:] = True
    final_log_mask[:, video_text_border:] = True
    for i in range(num_frame):
        for j in range(num_frame):
            if j == 0 and model_type == "wan":  # attention sink
                local_mask = torch.ones((token_per_frame, token_per_frame), dtype=torch.bool)
            else:
                window_width = get_window_width(i, j, token_per_frame, sparse_type, num_frame,
                                                decay_factor=decay_factor, block_size=block_size,
                                                model_type=model_type)
                local_mask = torch.abs(col_indices - row_indices) <= window_width
                split_mask = get_diagonal_split_mask(i, j, token_per_frame, sparse_type)
                local_mask = torch.logical_and(local_mask, split_mask)

            remainder_row = (i * token_per_frame) % block_size
            remainder_col = (j * token_per_frame) % block_size
            all_length_row = remainder_row + ((token_per_frame - 1) // block_size + 1) * block_size
            all_length_col = remainder_col + ((token_per_frame - 1) // block_size + 1) * block_size
            padded_local_mask = torch.zeros((all_length_row, all_length_col), dtype=torch.bool)
            padded_local_mask[remainder_row:remainder_row + token_per_frame,
                              remainder_col:remainder_col + token_per_frame] = local_mask
            block_mask = shrink_mask_strict(padded_local_mask, block_size=block_size)
            block_row_start = (i * token_per_frame) // block_size
            block_col_start = (j * token_per_frame) // block_size
            block_row_end = block_row_start + block_mask.shape[0]
            block_col_end = block_col_start + block_mask.shape[1]
            final_log_mask[block_row_start:block_row_end, block_col_start:block_col_end] = torch.logical_or(
                final_log_mask[block_row_start:block_row_end, block_col_start:block_col_end], block_mask)
    return final_log_mask
