// sparse_attention.h: the per-key math of block-sparse attention with an online softmax (one query row seen key
// by key, no score matrix): the running maximum m and denominator l of the row's softmax, and the weight of
// each new key. With the accumulator acc rescaled by `rescale` and then increased by weight * value, the row's
// output is acc / l once every kept key has been folded in, the same softmax as over all kept keys at once.
//
// Requires mlxvid_shim.h.

#ifndef MLXVID_SPARSE_ATTENTION_H
#define MLXVID_SPARSE_ATTENTION_H

MLXVID_FUNC float mlxvid_negative_infinity() { return mlxvid_bits_to_float(0xff800000u); }

// Folds score s into (m, l); returns the weight of its value and sets `rescale`, the factor that the
// accumulator of the earlier values takes first. A masked key (s = -inf) adds nothing.
MLXVID_FUNC float mlxvid_softmax_fold(float s, MLXVID_THREAD float& m, MLXVID_THREAD float& l,
                                      MLXVID_THREAD float& rescale) {
  if (!(s > mlxvid_negative_infinity())) {
    rescale = 1.0f;
    return 0.0f;
  }
  if (s <= m) {
    rescale = 1.0f;
    const float p = mlxvid_exp(s - m);
    l += p;
    return p;
  }
  rescale = mlxvid_exp(m - s);  // 0 on the first kept key (m = -inf)
  l = l * rescale + 1.0f;
  m = s;
  return 1.0f;
}

// The row's output from its accumulator: acc / l, or 0 for a row that kept no key.
MLXVID_FUNC float mlxvid_softmax_finish(float acc, float l) { return l > 0.0f ? acc / l : 0.0f; }

#endif  // MLXVID_SPARSE_ATTENTION_H
